"""The device scripts (scripts/device/): shell syntax, the parts round trip of collect_parts.sh, the step runner's
timeout and budget, and the JSON extraction of jsonl.py. Fast; no GPU, no vLLM engine."""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEV = ROOT / "scripts" / "device"
pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


@pytest.mark.parametrize("name", sorted(p.name for p in DEV.glob("*.sh")))
def test_shell_syntax(name):
    subprocess.run(["bash", "-n", str(DEV / name)], check=True)


@pytest.mark.skipif(shutil.which("xz") is None or shutil.which("sha256sum") is None, reason="needs xz, sha256sum")
def test_collect_parts_joins_once_all_parts_arrived(tmp_path):
    payload = {"a.gguf": os.urandom(3000), "b.bz2": b"text" * 100}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in payload.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    blob = subprocess.run(["xz", "-c"], input=buf.getvalue(), capture_output=True, check=True).stdout
    cuts = [0, 100, len(blob) // 2, len(blob)]
    parts = [blob[a:b] for a, b in zip(cuts, cuts[1:])]
    sums = [(hashlib.sha256(p).hexdigest(), f"model.tar.xz.part-{i:02d}") for i, p in enumerate(parts)]
    sums.append((hashlib.sha256(blob).hexdigest(), "model.tar.xz"))
    checkout = tmp_path / "checkout"
    env = dict(os.environ, TQ_PARTS_DIR=str(tmp_path / "parts"), TQ_VLLM_CACHE=str(tmp_path / "cache"))
    outputs = []
    for i, part in enumerate(parts):  # one device call per part: only that part's folder is there
        shutil.rmtree(checkout, ignore_errors=True)
        m = checkout / ".stage" / f"m{i + 1}"
        m.mkdir(parents=True)
        (m / f"model.tar.xz.part-{i:02d}").write_bytes(part)
        (m / "model.nparts").write_text(str(len(parts)))
        (m / "model.sha256").write_text("".join(f"{h}  {n}\n" for h, n in sums))
        r = subprocess.run(["bash", str(DEV / "collect_parts.sh")], cwd=checkout, env=env, capture_output=True,
                           text=True, check=True)
        outputs.append(r.stdout)
    assert "have 1 of 3" in outputs[0] and "have 2 of 3" in outputs[1] and "unpacked" in outputs[2]
    for name, data in payload.items():
        assert (tmp_path / "cache" / "downloads" / name).read_bytes() == data
    r = subprocess.run(["bash", str(DEV / "collect_parts.sh")], cwd=checkout, env=env, capture_output=True,
                       text=True, check=True)
    assert "already unpacked" in r.stdout


@pytest.mark.skipif(shutil.which("timeout") is None, reason="needs coreutils timeout")
def test_step_runner_timeout_budget_and_summary(tmp_path):
    script = f"""
        source {DEV / 'lib.sh'}
        tq_init t 6
        tq_step quick 30 "$OUT/quick.log" echo hello
        tq_step slow 2 "$TQ_LOGS/slow.log" sleep 20
        tq_step failing 30 "$TQ_LOGS/failing.log" bash -c 'echo boom; exit 3'
        tq_step eater 100 "$TQ_LOGS/eater.log" sleep 100
        tq_step late 30 "$TQ_LOGS/late.log" echo never
        echo "rc=$?"
    """
    env = dict(os.environ, OUT=str(tmp_path / "out"), TQ_LOGS=str(tmp_path / "logs"), TQ_PYTHON=sys.executable,
               TQ_MIN_STEP_S="1", TQ_KILL_GRACE_S="0")
    env.pop("TQ_CALL_T0", None)
    r = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=60)
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert "OK    quick" in summary and "hello" in (tmp_path / "out" / "quick.log").read_text()
    assert "TIMED OUT after 2 s" in summary
    assert "FAILED rc=3" in summary and "boom" in summary
    assert "eater" in summary and "SKIP  late" in summary and "rc=200" in r.stdout  # cut to the budget
    assert (tmp_path / "out" / "logs.tar.gz").exists()


def test_jsonl_takes_the_last_json_object(tmp_path):
    log = tmp_path / "ppl.log"
    rec = {"engine": "vllm", "results": [{"preset": "tq4", "ppl": 14.3, "delta_pct": 0.1, "seconds": 3,
                                          "kv_cache_dtype": "auto", "attention_backend": "CUSTOM"}]}
    log.write_text("INFO 11-26 [core.py] {not json}\n(EngineCore pid=1) INFO started\n" + json.dumps(rec) + "\n"
                   "INFO shutdown\n")
    out = tmp_path / "q.jsonl"
    r = subprocess.run([sys.executable, str(DEV / "jsonl.py"), str(log), str(out), "device=H200", "step=ppl"],
                       capture_output=True, text=True, check=True)
    row = json.loads(out.read_text())
    assert row["device"] == "H200" and row["step"] == "ppl" and row["results"] == rec["results"] and "date" in row
    assert "ppl tq4" in r.stdout
    empty = tmp_path / "empty.log"
    empty.write_text("Traceback ...\n")
    assert subprocess.run([sys.executable, str(DEV / "jsonl.py"), str(empty), str(out)]).returncode == 1


def test_trace_summary_per_step_busy_idle_and_top_kernels():
    """benchmarks/trace_summary.py on a synthetic trace: overlapping kernels count once, idle is the gap, per-step
    numbers divide by the step count, kernels are ranked by time."""
    import importlib.util
    import random
    spec = importlib.util.spec_from_file_location("trace_summary", ROOT / "benchmarks" / "trace_summary.py")
    ts = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ts)
    rng = random.Random(3)
    steps = rng.randint(2, 5)
    ev, t, busy = [], 0.0, 0.0
    for _ in range(steps):
        a, b = rng.uniform(100, 300), rng.uniform(10, 50)
        ev.append({"ph": "X", "cat": "kernel", "name": "attn", "ts": t, "dur": a})
        ev.append({"ph": "X", "cat": "kernel", "name": "store", "ts": t + a / 2, "dur": a / 2 + b})  # overlaps
        ev.append({"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": t, "dur": 3.0})
        busy += a + b
        t += a + b + 40.0  # 40 us idle after each step
    s = ts.summarize(ev, steps)
    span = t - 40.0
    assert abs(s["span_ms_per_step"] - span / 1000 / steps) < 1e-9
    assert abs(s["gpu_busy_ms_per_step"] - busy / 1000 / steps) < 1e-9
    assert abs(s["gpu_idle_ms_per_step"] - 40.0 * (steps - 1) / 1000 / steps) < 1e-9
    assert [k["name"] for k in s["kernels"]] == ["[kernel] attn", "[kernel] store"]
    assert s["kernels"][0]["count_per_step"] == 1.0 and s["runtime"][0]["count_per_step"] == 1.0
    assert "error" in ts.summarize([{"ph": "X", "cat": "cpu_op", "ts": 0, "dur": 1}], 1)


def test_step_profiler_window_and_runs_shorter_than_it(tmp_path, monkeypatch):
    """bench_e2e's step profiler: starts after `warm` steps with the wanted decode count, stops after `steps` or at a
    step with another count, and `finish()` closes a profile that the run ended inside of (once)."""
    import types
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_e2e

    class FakeLLM:
        def __init__(self):
            self.starts = self.stops = 0

        def start_profile(self):
            self.starts += 1

        def stop_profile(self):
            self.stops += 1

    args = types.SimpleNamespace(profile=str(tmp_path))

    def make(want, warm, steps):
        llm = FakeLLM()
        p = bench_e2e._StepProfiler(llm, "tq4", args, want, "t", warm=warm, steps=steps)
        monkeypatch.setattr(p, "_summarize", lambda n, p=p: setattr(p, "summarized", n))
        return llm, p

    llm, p = make(0, 2, 4)  # a prefill run of 3 steps: started at the 2nd, still on when the run ends
    for _ in range(3):
        p(0)
    assert (llm.starts, llm.stops) == (1, 0)
    p.finish()
    p.finish()
    assert (llm.starts, llm.stops, p.summarized) == (1, 1, 1)

    llm, p = make(64, 3, 4)  # decode: a full window stops by itself
    for d in [10, 64, 64, 64, 64, 64, 64, 64, 64]:
        p(d)
    assert (llm.starts, llm.stops, p.summarized) == (1, 1, 4)
    p.finish()
    assert llm.stops == 1

    llm, p = make(64, 2, 8)  # a step with another decode count ends the window early
    for d in [64, 64, 64, 63, 64]:
        p(d)
    assert (llm.starts, llm.stops, p.summarized) == (1, 1, 2)

    llm, p = make(0, 2, 4)  # a run of one step never starts
    p(0)
    p.finish()
    assert (llm.starts, llm.stops) == (0, 0)


def test_ab_kernels_refuses_this_tree_and_trees_without_the_package(tmp_path):
    """ab_kernels.sh replaces OLD_TREE's benchmarks/ and tests/: it must refuse the tree it runs in (and a
    directory that is not a tq_vllm tree) before touching anything."""
    for old in (str(ROOT), str(tmp_path)):
        p = subprocess.run(["bash", str(DEV / "ab_kernels.sh"), old], cwd=ROOT, capture_output=True, text=True,
                           env={**os.environ, "OUT": str(tmp_path / "out")})
        assert p.returncode == 2 and "must be another tree" in p.stderr, (old, p.stderr)
    assert (ROOT / "tests" / "test_device_scripts.py").exists() and (ROOT / "benchmarks" / "bench_decode.py").exists()
    assert not (tmp_path / "out").exists()
