#!/usr/bin/env python
"""Quality sweep: perplexity under decode semantics (and NIAH) of our presets, research variants and baselines.

Appends one JSON object per measurement to benchmarks/results/quality.jsonl and draws a Pareto plot
(bytes per token per KV head vs Δ perplexity) of the latest rows of our presets and every baseline.

    python benchmarks/bench_quality.py --suite main --windows 4            # presets + baselines
    python benchmarks/bench_quality.py --suite research --windows 2        # the research variants
    python benchmarks/bench_quality.py --suite niah --context 2048 4096 7168 --engine hf
    python benchmarks/bench_quality.py --spec tq4:block=16 --spec emu:k_scale=nc   # ad hoc
    python benchmarks/bench_quality.py --plot-only

Rows (ppl): {"kind": "ppl", "model", "model_shape", "preset", "group", "bytes_per_token_head" (averaged over the
model's layers at its head_dim), "bytes_per_token_head_layer", "bytes_per_token_head_d128", "tokens" (predicted),
"windows", "window_titles", "ppl", "ppl_bf16", "delta_pct", "per_window_delta_pct", "seconds", "engine", "time"}.
Rows (niah): {"kind": "niah", "model", "preset", "engine", "context", "prompt_tokens", "depth", "found", "answer",
"seconds", "time"}.
Heavy: run under `flock /tmp/tq_heavy.lock` on shared machines.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results" / "quality.jsonl"
PLOT = ROOT / "benchmarks" / "results" / "quality_pareto.png"

BASELINES = ["fp8", "vllm:k8v4", "vllm:4bit_nc", "vllm:k3v4_nc", "vllm:3bit_nc",
             "vllm:4bit_nc:boundary=0", "vllm:3bit_nc:boundary=0"]
PRESETS = ["tq4", "tq35", "tq3", "tq25", "tq4-prod", "tq8"]

# research variants: (group, spec). Defaults are tq4 = emu (LS scale, key block-mean at 3 bits, Hadamard).
RESEARCH = [
    # per-vector scale: least squares vs the paper's norm vs norm correction (vLLM's "nc")
    ("scale", "emu:k_scale=norm,v_scale=norm"), ("scale", "emu:k_scale=nc,v_scale=nc"),
    ("scale", "emu:k_center=none"), ("scale", "emu:k_center=none,k_scale=norm,v_scale=norm"),
    ("scale", "emu:k_center=none,k_scale=nc,v_scale=nc"),
    # values: rotated Lloyd–Max vs vLLM-style uniform min/max (rotated or not)
    ("values", "emu:v_quant=uniform,v_rot=0"), ("values", "emu:v_quant=uniform,v_rot=1"),
    ("values", "emu:k_bits=3,v_bits=3,v_center=q,v_quant=uniform,v_rot=0"),
    # QJL (prod) vs mse at equal bytes
    ("qjl", "tq4-prod:k_center=1"), ("qjl", "tq4:k_center=0"),
    # key / value centering and its precision
    ("center", "emu:k_center=exact"), ("center", "tq4:v_center=1"), ("center", "tq3:v_center=0"),
    ("center", "tq3:k_center=0,v_center=0"),
    ("mean_bits", "tq4:mean_bits=2"), ("mean_bits", "tq4:mean_bits=4"), ("mean_bits", "tq4:mean_bits=8"),
    ("mean_bits", "tq3:mean_bits=2"), ("mean_bits", "tq3:mean_bits=4"),
    # block size
    ("block", "tq4:block=16"), ("block", "tq4:block=64"), ("block", "tq3:block=16"), ("block", "tq3:block=64"),
    # outlier channels at more bits (the paper's 2.5 / 3.5-bit splits, d=64: 16 of 64 channels)
    ("outlier", "emu:k_bits=3,v_bits=3,k_out=16,k_out_bits=4,v_out=16,v_out_bits=4,v_center=q"),
    ("outlier", "emu:k_bits=2,v_bits=2,k_out=16,k_out_bits=3,v_out=16,v_out_bits=3,v_center=q"),
    ("outlier", "emu:k_bits=3,v_bits=3,k_out=16,k_out_bits=4,v_center=q"),
    ("outlier", "emu:k_bits=4,v_bits=4,k_out=8,k_out_bits=5"),
    # boundary layers at higher precision; sink block exact
    ("boundary", "tq4:boundary=2"), ("boundary", "tq3:boundary=2"), ("boundary", "tq3:boundary=2,boundary_fmt=tq8"),
    ("boundary", "tq4:boundary=1"),
    ("sink", "tq4:sink_blocks=1"), ("sink", "tq3:sink_blocks=1"), ("sink", "vllm:4bit_nc:sink_tok=1"),
    # rotations
    ("rotation", "tq4:rotation=qr"), ("rotation", "emu:rot=hadamard_nosign"), ("rotation", "emu:rot_per=head"),
    ("rotation", "emu:rot=qr,rot_per=head"),
    # bit splits between K and V
    ("bits", "tq4:k_bits=5,v_bits=3"), ("bits", "tq3:k_bits=4,v_bits=2"), ("bits", "tq25:k_center=1,v_center=0"),
]


def _git_rev() -> str:
    try:
        import subprocess

        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True).stdout.strip()
    except Exception:
        return ""


def append(rows: list[dict], path: Path = RESULTS) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def run_ppl(specs: list[tuple[str, str]], *, model_dir: str, text: str, tokens: int, windows: int,
            out: Path, dtype: str = "float32", stats: bool = False) -> list[dict]:
    from tq_vllm.eval.formats import make_format
    from tq_vllm.eval.ppl import load_model, model_shape, ppl_hf, text_windows

    model, tok = load_model(model_dir, dtype)
    shape = model_shape(model)
    wins = text_windows(tok, text, tokens, windows)
    D, L = shape["head_dim"], shape["num_layers"]
    print(f"[bench] {model_dir}: {shape}; {windows} x {tokens} tokens: {[w.title for w in wins]}", flush=True)
    base = ppl_hf(model, wins, ["bf16"])["bf16"]
    print(f"[bench] bf16 ppl {base.ppl:.4f} ({base.seconds:.0f} s)", flush=True)
    rows = []
    common = {"kind": "ppl", "model": Path(model_dir).name, "model_shape": shape, "engine": "hf",
              "tokens": base.count, "windows": windows, "window_tokens": tokens,
              "window_titles": [w.title for w in wins], "ppl_bf16": base.ppl, "git": _git_rev()}
    first = {"group": "baseline", "preset": "bf16", "bytes_per_token_head": 4.0 * D,
             "bytes_per_token_head_layer": 4 * D, "bytes_per_token_head_d128": 512.0, "ppl": base.ppl,
             "delta_pct": 0.0, "per_window_delta_pct": [0.0] * windows, "seconds": round(base.seconds, 1)}
    rows.append({**common, **first, "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
    append(rows[-1:], out)
    for group, spec in specs:
        f = make_format(spec)
        r = ppl_hf(model, wins, [f], collect_stats=stats)[f.name]
        row = {**common, "group": group, "preset": spec,
               "bytes_per_token_head": f.bytes_per_token_head(D, L), "bytes_per_token_head_layer": f.layer_bytes(D),
               "bytes_per_token_head_d128": f.bytes_per_token_head(128, L) if _d128_ok(f) else None,
               "ppl": r.ppl, "delta_pct": 100 * (r.ppl / base.ppl - 1),
               "per_window_delta_pct": [100 * (a / b - 1) for a, b in zip(r.per_window, base.per_window)],
               "seconds": round(r.seconds, 1), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        row["definition"] = _definition(f)
        if stats and r.stats:
            row["layer_stats"] = r.stats
        rows.append(row)
        append([row], out)
        print(f"[bench] {group:9s} {spec:70s} {row['bytes_per_token_head']:7.1f} B  ppl {r.ppl:.4f}  "
              f"{row['delta_pct']:+6.2f}%  ({r.seconds:.0f} s)", flush=True)
    return rows


def _definition(f) -> dict:
    import dataclasses

    d = {"semantics": f.base.semantics, "block_size": f.block_size, "sink": f.sink, "boundary": f.boundary}
    if hasattr(f.base, "preset"):
        d["preset"] = f.base.preset.to_dict()
    if hasattr(f.base, "k") and dataclasses.is_dataclass(f.base.k):
        d["emu"] = dataclasses.asdict(f.base.k)
    return d


def _d128_ok(f) -> bool:
    try:
        f.layer_bytes(128)
        return True
    except Exception:
        return False


def run_niah(specs: list[str], *, model_dir: str, text: str, contexts: list[int], depths: list[float],
             engine: str, out: Path) -> list[dict]:
    from transformers import AutoTokenizer

    from tq_vllm.eval.niah import make_cases, run_hf, run_vllm

    tok = AutoTokenizer.from_pretrained(model_dir)
    cases = make_cases(tok, text, contexts, depths)
    rows = []
    model = None
    for spec in specs:
        t0 = time.perf_counter()
        extra = {}
        if engine == "vllm":
            res, t_start, t_gen = run_vllm(model_dir, cases, None if spec == "bf16" else spec)
            extra = {"engine_start_s": round(t_start, 1), "generate_s": round(t_gen, 1)}
        else:
            if model is None:
                from tq_vllm.eval.ppl import load_model

                model, _ = load_model(model_dir)
            res = run_hf(model, tok, cases, spec)
        for r in res:
            row = {"kind": "niah", "model": Path(model_dir).name, "preset": spec, "engine": engine, **r.to_dict(),
                   **extra, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "git": _git_rev()}
            rows.append(row)
            print(f"[niah] {spec:24s} ctx {r.context:5d} ({r.prompt_tokens} tok) depth {r.depth:.2f} "
                  f"found={r.found} answer={r.answer[:30]!r} {r.seconds:.0f} s", flush=True)
        append(rows[-len(res):], out)
        print(f"[niah] {spec}: {sum(r.found for r in res)}/{len(res)} in {time.perf_counter() - t0:.0f} s", flush=True)
    return rows


# ------------------------------------------------------------------------------------------------ plot
def plot(path: Path = RESULTS, png: Path = PLOT, model: str | None = None) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]
    rows = [r for r in rows if r.get("kind") == "ppl" and (model is None or r["model"] == model)]
    if not rows:
        return None
    model = model or rows[-1]["model"]
    # latest row per preset among the main groups, preferring the most windows
    latest: dict[str, dict] = {}
    for r in rows:
        if r["model"] != model or r["group"] not in ("baseline", "preset", "candidate"):
            continue
        old = latest.get(r["preset"])
        if old is None or (r["windows"], r["time"]) >= (old["windows"], old["time"]):
            latest[r["preset"]] = r
    fig, ax = plt.subplots(figsize=(8, 5.5))
    styles = {"vllm": ("tab:red", "s", "vLLM TurboQuant (re-implemented)"), "tq": ("tab:blue", "o", "tq_vllm presets"),
              "other": ("tab:gray", "^", "fp8 / other")}
    seen = set()
    for name, r in sorted(latest.items()):
        if name == "bf16":
            continue
        kind = "vllm" if name.startswith("vllm:") else "tq" if name.startswith("tq") else "other"
        c, m, lab = styles[kind]
        y = max(r["delta_pct"], 1e-3)
        ax.scatter(r["bytes_per_token_head"], y, c=c, marker=m, s=50, label=None if kind in seen else lab)
        seen.add(kind)
        ax.annotate(name.replace("vllm:", ""), (r["bytes_per_token_head"], y), textcoords="offset points",
                    xytext=(5, 3), fontsize=8)
    shape = next(iter(latest.values()))["model_shape"]
    ax.set_yscale("log")
    ax.set_xlabel(f"bytes per token per KV head (K+V, averaged over {shape['num_layers']} layers, "
                  f"head_dim {shape['head_dim']}; bf16 = {4 * shape['head_dim']})")
    ax.set_ylabel("Δ perplexity vs bf16 KV, % (decode semantics, log)")
    any_r = next(iter(latest.values()))
    ax.set_title(f"{model}: {any_r['windows']} x {any_r['window_tokens']} tokens of Wikipedia")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return png


def table(path: Path = RESULTS, windows: int | None = None, groups: list[str] | None = None) -> str:
    """Markdown table of the latest ppl row per (preset, windows) (optionally one window count / some groups)."""
    rows = [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]
    latest: dict[tuple, dict] = {}
    for r in rows:
        if r.get("kind") != "ppl" or (windows and r["windows"] != windows) or (groups and r["group"] not in groups):
            continue
        latest[(r["preset"], r["windows"])] = r
    out = ["| format | group | B/token/head (model avg) | d=128 | windows x tokens | ppl | bf16 ppl | Δ ppl |",
           "|---|---|---|---|---|---|---|---|"]
    for (name, w), r in sorted(latest.items(), key=lambda kv: (kv[0][1], kv[1]["group"], kv[1]["bytes_per_token_head"])):
        d128 = r.get("bytes_per_token_head_d128")
        out.append(f"| `{name}` | {r['group']} | {r['bytes_per_token_head']:.1f} | "
                   f"{'' if d128 is None else f'{d128:.1f}'} | {w} x {r['window_tokens']} | {r['ppl']:.3f} | "
                   f"{r['ppl_bf16']:.3f} | {r['delta_pct']:+.2f} % |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", choices=("main", "research", "niah", "none"), default="main")
    ap.add_argument("--spec", action="append", default=[], help="extra format specs (group 'adhoc')")
    ap.add_argument("--group", default=None, help="group name for --spec rows (default adhoc)")
    ap.add_argument("--only", default=None, help="research: only this group")
    ap.add_argument("--model", default=None)
    ap.add_argument("--text", default=None)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--context", type=int, nargs="+", default=[2048, 4096, 7168])
    ap.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    ap.add_argument("--engine", choices=("hf", "vllm"), default="hf", help="niah engine")
    ap.add_argument("--niah-spec", action="append", default=None)
    ap.add_argument("--stats", action="store_true", help="record per-layer error statistics")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--png", type=Path, default=PLOT)
    ap.add_argument("--plot-only", action="store_true")
    ap.add_argument("--table", action="store_true", help="print a markdown table of the results and exit")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    if a.table:
        print(table(a.out, a.windows if "--windows" in (argv or sys.argv) else None))
        return 0
    if a.plot_only:
        print(plot(a.out, a.png))
        return 0
    import torch

    torch.set_num_threads(a.threads)
    from tq_vllm import assets

    model = a.model or str(assets.fetch_smollm2())
    text = a.text or str(assets.fetch_wikipedia())
    t0 = time.perf_counter()
    specs: list[tuple[str, str]] = []
    if a.suite == "main":
        specs = [("preset", s) for s in PRESETS] + [("baseline", s) for s in BASELINES]
    elif a.suite == "research":
        specs = [(g, s) for g, s in RESEARCH if a.only in (None, g)]
    specs += [(a.group or "adhoc", s) for s in a.spec]
    if a.suite == "niah":
        run_niah(a.niah_spec or ["bf16", "tq4", "tq3"], model_dir=model, text=text, contexts=a.context,
                 depths=a.depths, engine=a.engine, out=a.out)
    elif specs:
        run_ppl(specs, model_dir=model, text=text, tokens=a.tokens, windows=a.windows, out=a.out, stats=a.stats)
    png = plot(a.out, a.png)
    print(f"[bench] done in {time.perf_counter() - t0:.0f} s; results {a.out}; plot {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
