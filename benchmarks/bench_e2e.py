#!/usr/bin/env python
"""End-to-end vLLM benchmark of KV-cache formats: the anchor table of /work/shared/notes/anchors.md.

Model: the Llama-3.1-8B shape (32 layers, 32 query / 8 KV heads, head_dim 128) from a config.json written here,
dummy weights (`load_format="dummy"`), no tokenizer (`skip_tokenizer_init`, prompt token ids), bf16,
gpu_memory_utilization 0.85, CUDA graphs on (vLLM defaults). Every KV format runs in a fresh process:

    auto (bf16, vLLM's default backend)  fp8  turboquant_4bit_nc  turboquant_3bit_nc  (vLLM's --kv-cache-dtype)
    tq4  tq3                                                                            (tq_vllm: --attention-backend
                                                                                         CUSTOM + additional_config)
Measured, per format (one JSON object appended to benchmarks/results/e2e.jsonl):
    kv_tokens       KV tokens vLLM allocated (num_gpu_blocks x block_size)
    total_s_64x8k   64 requests x (8192-token prompt + 256 generated tokens, ignore_eos), all submitted at once:
                    wall time until the last token
    tpot_ms_64x8k   median time per engine step while all 64 requests are decoding together (one token each):
                    the TPOT of a request decoding in the full batch
    tpot_ms_32k     one request, 32768-token prompt + 256 tokens: median step time of its decode
    prefill_tok_s   64 x 8192 prompt tokens / wall time of the same batch with max_tokens=1
Also recorded: device, date, vllm, kv, block_size, ttft_s_32k, tpot_ms_64x8k_req_median (median over requests of
(last - first token time) / 255) and the engine start time.

Usage (on the GPU machine; each format takes 1-3 minutes):
    python benchmarks/bench_e2e.py                       # all six formats -> benchmarks/results/e2e.jsonl
    python benchmarks/bench_e2e.py --kv tq4 auto         # a subset
    python benchmarks/bench_e2e.py --quick --kv tq4      # smoke test: 8 x 1K prompts, 32 tokens, no 32K run
    python benchmarks/bench_e2e.py --kv tq4 auto --prefill-only   # only prefill_tok_s (~1.5 min per format)
    python benchmarks/bench_e2e.py --kv tq4 --gen-len 48 --long-len 0 --profile DIR   # per-step GPU profiles
    python benchmarks/bench_e2e.py --print               # the table of what e2e.jsonl holds
    python benchmarks/bench_e2e.py --tiny --quick --kv auto tq4 --block-size 32 --out /tmp/e2e.jsonl
                                                         # checks the script itself, also on a CPU vLLM
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "e2e.jsonl"
ALL_KV = ["auto", "fp8", "turboquant_4bit_nc", "turboquant_3bit_nc", "tq4", "tq3"]
TQ_PRESETS = {"tq4", "tq3", "tq35", "tq25", "tq4-prod", "tq8"}

LLAMA31_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu", "hidden_size": 4096,
    "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 131072, "mlp_bias": False,
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8, "head_dim": 128,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "tie_word_embeddings": False,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 128256,
}


TINY = dict(LLAMA31_8B, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=64, vocab_size=130000)  # --tiny: checks this script on any machine


def write_model(root: Path, tiny: bool = False) -> str:
    d = root / ("tiny-llama-shape" if tiny else "llama-3.1-8b-shape")
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(TINY if tiny else LLAMA31_8B, indent=2))
    (d / "generation_config.json").write_text(json.dumps({"bos_token_id": 128000, "eos_token_id": 128001}))
    return str(d)


def engine_kwargs(kv: str, args) -> dict:
    kw = dict(load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16", seed=0,
              gpu_memory_utilization=args.gpu_memory_utilization, max_model_len=args.max_model_len,
              max_num_seqs=args.max_num_seqs, enable_prefix_caching=False, disable_log_stats=False)
    if args.block_size:
        kw["block_size"] = args.block_size
    if args.enforce_eager:
        kw["enforce_eager"] = True
    if getattr(args, "profile", None):
        from vllm.config import ProfilerConfig
        kw["profiler_config"] = ProfilerConfig(
            profiler="torch", torch_profiler_dir=str(Path(args.profile).resolve() / kv), torch_profiler_with_stack=False,
            torch_profiler_dump_cuda_time_total=False)
    if kv in TQ_PRESETS:
        kw.update(attention_backend="CUSTOM", additional_config={"tq_vllm": {"preset": kv}})
    elif kv != "auto":
        kw["kv_cache_dtype"] = kv
    return kw


# ------------------------------------------------------------------------------------------ one format
def _tokens(n: int, seed: int) -> list[int]:
    import random
    rng = random.Random(seed)
    return [rng.randrange(1000, 120000) for _ in range(n)]


def _run_batch(llm, prompts: list[list[int]], max_tokens: int, on_step=None):
    """Submit all requests at once and step the engine; returns (wall_s, per-step records, request outputs).
    `on_step(decoding)` is called after every step with the number of requests that decoded in it."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    eng = llm.llm_engine
    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, detokenize=False,
                        output_kind=RequestOutputKind.DELTA)
    base = f"r{time.monotonic_ns()}"
    for i, p in enumerate(prompts):
        eng.add_request(f"{base}-{i}", {"prompt_token_ids": p}, sp)
    n_tok = {f"{base}-{i}": 0 for i in range(len(prompts))}
    first, last, steps = {}, {}, []
    t0 = time.perf_counter()
    prev = t0
    while eng.has_unfinished_requests():
        outs = eng.step()
        now = time.perf_counter()
        decoding = 0
        for o in outs:
            k = len(o.outputs[0].token_ids) if o.outputs else 0
            if k:
                if n_tok[o.request_id] == 0:
                    first[o.request_id] = now
                else:
                    decoding += 1
                n_tok[o.request_id] += k
                last[o.request_id] = now
        steps.append((now - prev, decoding))
        if on_step is not None:
            on_step(decoding)
            now = time.perf_counter()
        prev = now
    wall = time.perf_counter() - t0
    return wall, steps, {r: t - t0 for r, t in first.items()}, {r: t - t0 for r, t in last.items()}, n_tok


class _StepProfiler:
    """Profiles `steps` engine steps once `warm` steps in a row had `want` decoding requests (vLLM's torch profiler
    in the worker), then summarises the worker's trace (benchmarks/trace_summary.py) under `title`."""

    def __init__(self, llm, kv: str, args, want: int, title: str, warm: int = 6, steps: int = 8):
        self.llm, self.dir, self.want, self.title = llm, Path(args.profile).resolve() / kv, want, title
        self.warm, self.steps, self.seen, self.state = warm, steps, 0, "wait"
        self.summary = None

    def __call__(self, decoding: int) -> None:
        if self.state == "done":
            return
        self.seen = self.seen + 1 if decoding == self.want else 0
        if self.state == "wait" and self.seen >= self.warm:
            self.before = set(self.dir.glob("**/*.json*")) if self.dir.exists() else set()
            self.llm.start_profile()
            self.state, self.count = "on", 0
        elif self.state == "on":
            self.count += 1
            if self.count >= self.steps or self.seen == 0:
                self.llm.stop_profile()
                self.state = "done"
                self._summarize(self.count)

    def finish(self) -> None:
        """Stop a profile the run ended inside of (a run shorter than warm + steps)."""
        if self.state == "on":
            self.llm.stop_profile()
            self.state = "done"
            self._summarize(self.count)

    def _summarize(self, steps: int) -> None:
        sys.path.insert(0, str(HERE))
        import trace_summary as ts
        new = []
        for _ in range(120):  # the worker writes the trace after stop_profile returns
            new = [p for p in (set(self.dir.glob("**/*.json*")) - self.before) if p.stat().st_size > 0]
            if new:
                time.sleep(2)
                break
            time.sleep(1)
        for p in sorted(new):
            s = ts.summarize(ts.load(str(p)), steps)
            if "error" not in s:
                ts.print_summary(s, f"{self.title} ({p.name})")
                self.summary = s
                (self.dir.parent / f"profile_{self.dir.name}_{self.title}.json").write_text(json.dumps(s, indent=1))
                p.unlink()  # the raw trace is large; the summary stays
                return
        print(f"[profile] {self.title}: no trace with GPU events in {self.dir}", flush=True)


def measure(kv: str, args) -> dict:
    import torch
    import vllm
    from vllm import LLM

    model = write_model(Path(args.workdir), args.tiny)
    t0 = time.perf_counter()
    llm = LLM(model, **engine_kwargs(kv, args))
    start_s = time.perf_counter() - t0
    cc = llm.llm_engine.vllm_config.cache_config
    rec = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
           "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "vllm": vllm.__version__,
           "kv": kv, "kv_tokens": int(cc.num_gpu_blocks) * int(cc.block_size), "block_size": int(cc.block_size),
           "num_gpu_blocks": int(cc.num_gpu_blocks), "engine_start_s": round(start_s, 1),
           "gpu_memory_utilization": args.gpu_memory_utilization,
           "model": "tiny Llama (script check)" if args.tiny else "Llama-3.1-8B shape, dummy weights"}
    vc = llm.llm_engine.vllm_config
    rec["cudagraph_mode"] = str(getattr(vc.compilation_config, "cudagraph_mode", ""))
    rec["async_scheduling"] = bool(getattr(vc.scheduler_config, "async_scheduling", False))
    if args.profile:
        rec["profiled"] = True  # the profiler slows the profiled steps: not a result to quote
    n, plen, gen = args.batch, args.prompt_len, args.gen_len
    prompts = [_tokens(plen, 1000 + i) for i in range(n)]
    _run_batch(llm, [_tokens(256, 7)], 8)  # warm-up (compiled graphs are captured at start already)

    # prefill throughput: the batch with one output token each (profiled: 4 steps after 2, none of them decodes)
    prof = _StepProfiler(llm, kv, args, 0, f"prefill_{n}x{plen // 1024}k", warm=2, steps=4) if args.profile else None
    wall, *_ = _run_batch(llm, prompts, 1, prof)
    rec["prefill_tok_s"] = round(n * plen / wall, 1)
    if prof is not None:
        prof.finish()

    if args.prefill_only:
        return _shutdown(llm, rec)

    # the batch: total time, TPOT in the full batch
    prof = _StepProfiler(llm, kv, args, n, f"{n}x{plen // 1024}k") if args.profile else None
    wall, steps, first, last, ntok = _run_batch(llm, prompts, gen, prof)
    if prof is not None:
        prof.finish()
    full = [dt for dt, dec in steps if dec == n]
    rec[f"total_s_{n}x{plen // 1024}k"] = round(wall, 2)
    rec[f"tpot_ms_{n}x{plen // 1024}k"] = round(1000 * statistics.median(full), 2) if full else None
    rec[f"full_batch_steps_{n}x{plen // 1024}k"] = len(full)
    per_req = [(last[r] - first[r]) / (ntok[r] - 1) for r in first if ntok[r] > 1]
    rec[f"tpot_ms_{n}x{plen // 1024}k_req_median"] = round(1000 * statistics.median(per_req), 2) if per_req else None

    if args.long_len:
        prof = _StepProfiler(llm, kv, args, 1, f"1x{args.long_len // 1024}k") if args.profile else None
        wall, steps, first, last, ntok = _run_batch(llm, [_tokens(args.long_len, 99)], gen, prof)
        if prof is not None:
            prof.finish()
        dec = [dt for dt, d in steps if d == 1]
        key = f"{args.long_len // 1024}k"
        rec[f"tpot_ms_{key}"] = round(1000 * statistics.median(dec), 2) if dec else None
        rec[f"ttft_s_{key}"] = round(next(iter(first.values())), 3)
    return _shutdown(llm, rec)


def _shutdown(llm, rec: dict) -> dict:
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:
        pass
    return rec


# ------------------------------------------------------------------------------------------ driver
def print_table(path: Path = RESULTS) -> None:
    if not path.exists():
        print(f"no results in {path}")
        return
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    cols = ["date", "device", "vllm", "kv", "kv_tokens", "total_s_64x8k", "tpot_ms_64x8k", "tpot_ms_32k",
            "prefill_tok_s"]
    w = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols}
    print("  ".join(c.ljust(w[c]) for c in cols))
    for r in rows:
        print("  ".join(str(r.get(c, "")).ljust(w[c]) for c in cols))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kv", nargs="+", default=ALL_KV, help=f"formats (default: {' '.join(ALL_KV)})")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=8192)
    ap.add_argument("--gen-len", type=int, default=256)
    ap.add_argument("--long-len", type=int, default=32768, help="single-request prompt (0: skip)")
    ap.add_argument("--max-model-len", type=int, default=33280)
    ap.add_argument("--max-num-seqs", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=0, help="0: vLLM's default for the backend")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--quick", action="store_true", help="8 x 1K prompts, 32 tokens, no long run (smoke test)")
    ap.add_argument("--print", action="store_true", help="print the table of --out and exit")
    ap.add_argument("--prefill-only", action="store_true", help="only the prefill throughput (no batch, no long run)")
    ap.add_argument("--profile", help="profile 4 prefill steps of the batch, 8 decode steps of the full batch and 8 of "
                    "the long request into this directory (torch profiler in the worker; prints and writes a "
                    "per-step summary; timings of profiled runs are not recorded as results)")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer model instead of the 8B shape (script check)")
    ap.add_argument("--per-kv-timeout", type=int, default=0, help="seconds per format (0: none)")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one format in this process
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.print:
        print_table(Path(args.out))
        return 0
    if args.quick:
        args.batch, args.prompt_len, args.gen_len, args.long_len, args.max_model_len = 8, 1024, 32, 0, 2048
    if args.one:
        os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
        rec = measure(args.one, args)
        if args.quick or args.tiny:
            rec["check_only"] = True
        if args.prefill_only:
            rec["prefill_only"] = True
        knobs = {k: v for k, v in sorted(os.environ.items()) if k.startswith("TQ_VLLM_") and k != "TQ_VLLM_CACHE"}
        if knobs:  # a variant of the defaults (kernels' switches)
            rec["env"] = knobs
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        print("RESULT " + json.dumps(rec), flush=True)
        return 0
    rc = 0
    with tempfile.TemporaryDirectory(prefix="tq_bench_e2e_") as work:
        for kv in args.kv:
            cmd = [sys.executable, __file__, "--one", kv, "--workdir", work, "--out", args.out,
                   "--batch", str(args.batch), "--prompt-len", str(args.prompt_len), "--gen-len", str(args.gen_len),
                   "--long-len", str(args.long_len), "--max-model-len", str(args.max_model_len),
                   "--max-num-seqs", str(args.max_num_seqs), "--block-size", str(args.block_size),
                   "--gpu-memory-utilization", str(args.gpu_memory_utilization)]
            cmd += ["--profile", args.profile] if args.profile else []
            cmd += ["--enforce-eager"] * args.enforce_eager + ["--quick"] * args.quick + ["--tiny"] * args.tiny
            cmd += ["--prefill-only"] * args.prefill_only
            print(f"=== {kv}: {' '.join(cmd)}", flush=True)
            try:
                p = subprocess.run(cmd, timeout=args.per_kv_timeout or None)
            except subprocess.TimeoutExpired:
                print(f"=== {kv}: TIMEOUT after {args.per_kv_timeout} s", flush=True)
                rc = 1
                continue
            if p.returncode:
                print(f"=== {kv}: FAILED (exit {p.returncode})", flush=True)
                rc = 1
    print_table(Path(args.out))
    return rc


if __name__ == "__main__":
    sys.exit(main())
