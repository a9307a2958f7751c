#!/usr/bin/env python
"""Summarise a torch-profiler trace (Chrome JSON, optionally .gz) of K engine steps: where one step's time goes.

Prints, per step: the wall span of GPU activity, GPU busy time (union of kernel / memcpy / memset intervals), idle
time, and the kernels and CUDA runtime calls that take the most time (total per step and count per step).

    python benchmarks/trace_summary.py TRACE.json.gz --steps 8 [--top 25] [--json OUT.json]
"""
from __future__ import annotations

import argparse
import gzip
import json
from collections import defaultdict
from pathlib import Path

GPU_CATS = ("kernel", "gpu_memcpy", "gpu_memset")


def load(path: str) -> list[dict]:
    p = Path(path)
    raw = gzip.open(p, "rt").read() if p.suffix == ".gz" else p.read_text()
    doc = json.loads(raw)
    return doc["traceEvents"] if isinstance(doc, dict) else doc


def _union(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if a > end:
            total += b - a
            end = b
        elif b > end:
            total += b - end
            end = b
    return total


def _short(name: str, n: int = 90) -> str:
    return name if len(name) <= n else name[: n - 3] + "..."


def summarize(events: list[dict], steps: int, top: int = 25) -> dict:
    gpu = [e for e in events if e.get("ph") == "X" and e.get("cat") in GPU_CATS and "dur" in e]
    rt = [e for e in events if e.get("ph") == "X" and e.get("cat") in ("cuda_runtime", "cuda_driver") and "dur" in e]
    ann = [e for e in events if e.get("ph") == "X" and e.get("cat") == "user_annotation" and "dur" in e]
    if not gpu:
        return {"error": "no GPU events in the trace"}
    t0 = min(e["ts"] for e in gpu)
    t1 = max(e["ts"] + e["dur"] for e in gpu)
    busy = _union([(e["ts"], e["ts"] + e["dur"]) for e in gpu])
    k = max(1, steps)
    by_kernel: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for e in gpu:
        rec = by_kernel[f"[{e['cat']}] {e.get('name', '?')}"]
        rec[0] += e["dur"]
        rec[1] += 1
    by_rt: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for e in rt:
        rec = by_rt[e.get("name", "?")]
        rec[0] += e["dur"]
        rec[1] += 1
    by_ann: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for e in ann:
        rec = by_ann[e.get("name", "?")]
        rec[0] += e["dur"]
        rec[1] += 1
    kern = sorted(by_kernel.items(), key=lambda kv: -kv[1][0])
    rts = sorted(by_rt.items(), key=lambda kv: -kv[1][0])
    return {
        "steps": k, "span_ms_per_step": (t1 - t0) / 1000 / k, "gpu_busy_ms_per_step": busy / 1000 / k,
        "gpu_idle_ms_per_step": (t1 - t0 - busy) / 1000 / k, "gpu_events_per_step": len(gpu) / k,
        "kernels": [{"name": n, "ms_per_step": v[0] / 1000 / k, "count_per_step": v[1] / k} for n, v in kern[:top]],
        "runtime": [{"name": n, "ms_per_step": v[0] / 1000 / k, "count_per_step": v[1] / k} for n, v in rts[:12]],
        "annotations": [{"name": n, "ms_per_step": v[0] / 1000 / k, "count_per_step": v[1] / k}
                        for n, v in sorted(by_ann.items(), key=lambda kv: -kv[1][0])[:8]],
    }


def print_summary(s: dict, title: str = "") -> None:
    if "error" in s:
        print(f"{title}: {s['error']}")
        return
    print(f"== {title}: {s['steps']} steps; per step: span {s['span_ms_per_step']:.3f} ms, GPU busy "
          f"{s['gpu_busy_ms_per_step']:.3f} ms, idle {s['gpu_idle_ms_per_step']:.3f} ms, "
          f"{s['gpu_events_per_step']:.0f} GPU events")
    print(f"   {'ms/step':>8} {'n/step':>7}  kernel")
    for r in s["kernels"]:
        print(f"   {r['ms_per_step']:8.3f} {r['count_per_step']:7.1f}  {_short(r['name'])}")
    print(f"   {'ms/step':>8} {'n/step':>7}  CUDA runtime (host)")
    for r in s["runtime"]:
        print(f"   {r['ms_per_step']:8.3f} {r['count_per_step']:7.1f}  {_short(r['name'])}")
    for r in s.get("annotations", []):
        print(f"   {r['ms_per_step']:8.3f} {r['count_per_step']:7.1f}  [host annotation] {_short(r['name'])}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("trace")
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    s = summarize(load(a.trace), a.steps, a.top)
    print_summary(s, Path(a.trace).name)
    if a.json:
        Path(a.json).write_text(json.dumps(s, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
