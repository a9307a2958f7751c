"""TQConnector on a GPU: transfer throughput vs the device's pinned host<->device bandwidth, and the time to first
token of a long prompt whose prefix is in the CPU tier vs recomputing it.

One command (a CUDA machine with vLLM 0.26-0.33 and this package importable; no network needed):

    python benchmarks/bench_connector.py

Parts (both by default; `--part micro` needs only torch):
* micro: pinned copy bandwidth (host->device, device->host, 1 GiB, best of N with CUDA events), then the
  connector's own copy engine (tq_vllm.connector.transfer.BlockPool: gather/scatter of opaque pages + coalesced
  async copies on its own stream) saving and loading the pages of a `--prompt-tokens` prompt of the model shape
  (Llama-3.1-8B: 32 layers, 8 KV heads, head_dim 128, block 16) in the tq4 page format. Targets: load and save
  >= 70 % of the pinned bandwidth in the same direction.
* engine: a dummy-weight model of that shape (config written locally; or --model DIR) in vLLM with tq_vllm's
  backend (`--backend tq`, default; `--backend stock` = vLLM's default backend, bf16 pages), prefix caching off so
  the only reuse is the connector's. TTFT (wall time of generate with max_tokens=1) of `--reps` distinct
  32K-token prompts: (a) recomputing, in an engine without the connector, (b) first time with the connector
  (miss + saving), (c) again, the prefix loaded from the CPU tier. Target: (a)/(c) >= 5.

Appends one JSON line to benchmarks/results/connector.jsonl: device, date, prompt_tokens, ttft_ms_hit,
ttft_ms_recompute, load_gbps, save_gbps, pinned_copy_gbps, bytes_moved, bytes_bf16_equivalent (+ details).
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results" / "connector.jsonl"

LLAMA_8B = {  # Llama-3.1-8B shape (dummy weights)
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
    "vocab_size": 128256, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 128000, "eos_token_id": 128001,
    "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "initializer_range": 0.02,
}


def log(*a):
    print("[bench_connector]", *a, flush=True)


# ============================================================================================ micro
def pinned_bandwidth(nbytes: int = 1 << 30, reps: int = 5) -> dict:
    import torch

    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    out = {}
    for name, dst, src in (("h2d", dev, host), ("d2h", host, dev)):
        best = float("inf")
        for _ in range(reps + 1):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            dst.copy_(src, non_blocking=True)
            e.record()
            e.synchronize()
            best = min(best, s.elapsed_time(e) / 1e3)
        out[name] = nbytes / best / 1e9
    del host, dev
    return out


def page_geometry(args) -> dict:
    from tq_vllm.quant.layout import PageLayout

    if args.backend == "stock":
        c = 2 * args.head_dim * 2  # K and V in bf16
    else:
        c = PageLayout(args.preset, args.head_dim, args.block_size).bytes_per_token
    bf16_c = 2 * args.head_dim * 2
    return {"C": c, "block_bytes": args.layers * args.kv_heads * args.block_size * c,
            "bf16_block_bytes": args.layers * args.kv_heads * args.block_size * bf16_c}


def micro(args) -> dict:
    import torch

    from tq_vllm.connector.transfer import BlockPool, build_parts

    geo = page_geometry(args)
    nblocks = args.prompt_tokens // args.block_size
    log(f"pages: {geo['C']} B/token/head, {geo['block_bytes']} B/block ({geo['bf16_block_bytes']} B in bf16), "
        f"{nblocks} blocks = {nblocks * geo['block_bytes'] / 1e9:.3f} GB per prompt")
    pinned = pinned_bandwidth()
    log(f"pinned copy: h2d {pinned['h2d']:.1f} GB/s, d2h {pinned['d2h']:.1f} GB/s")
    total = nblocks + 64
    kv = {f"model.layers.{i}.self_attn.attn": torch.randint(0, 256, (total, args.kv_heads, args.block_size, geo["C"]),
                                                            dtype=torch.uint8, device="cuda")
          for i in range(args.layers)}
    pool = BlockPool(build_parts(kv, total), num_slots=nblocks, pin=True, staging_bytes=args.staging_mb << 20)
    ids = list(range(32, 32 + nblocks))
    slots = list(range(nblocks))
    if args.fragmented:  # worst case: no two consecutive slots (an old, fragmented pool)
        import random

        random.Random(0).shuffle(slots)
    ref = {k: v[32:32 + nblocks].clone() for k, v in kv.items()}
    nbytes = nblocks * pool.block_bytes
    save_t, load_t = [], []
    for rep in range(args.micro_reps + 1):
        torch.cuda.synchronize()
        t = time.perf_counter()
        pool.save(ids, slots)
        pool.sync()
        torch.cuda.synchronize()
        save_t.append(time.perf_counter() - t)
        for v in kv.values():
            v[32:32 + nblocks].zero_()
        torch.cuda.synchronize()
        t = time.perf_counter()
        pool.load(slots, ids)
        torch.cuda.synchronize()
        load_t.append(time.perf_counter() - t)
    ok = all(torch.equal(kv[k][32:32 + nblocks], ref[k]) for k in kv)
    save_s, load_s = min(save_t[1:]), min(load_t[1:])
    res = {"pinned_h2d_gbps": round(pinned["h2d"], 2), "pinned_d2h_gbps": round(pinned["d2h"], 2),
           "pinned_copy_gbps": round(min(pinned["h2d"], pinned["d2h"]), 2),
           "save_gbps": round(nbytes / save_s / 1e9, 2), "load_gbps": round(nbytes / load_s / 1e9, 2),
           "micro_bytes": nbytes, "micro_blocks": nblocks, "micro_roundtrip_exact": ok,
           "block_bytes": pool.block_bytes, "page_bytes_per_token_head": geo["C"], "micro_fragmented": args.fragmented,
           "bytes_moved": nbytes, "bytes_bf16_equivalent": nblocks * geo["bf16_block_bytes"]}
    res["save_vs_pinned"] = round(res["save_gbps"] / pinned["d2h"], 3)
    res["load_vs_pinned"] = round(res["load_gbps"] / pinned["h2d"], 3)
    log(f"connector copy engine: save {res['save_gbps']} GB/s ({res['save_vs_pinned']:.0%} of d2h), load "
        f"{res['load_gbps']} GB/s ({res['load_vs_pinned']:.0%} of h2d), exact={ok}")
    del kv, pool, ref
    gc.collect()
    torch.cuda.empty_cache()
    return res


# ============================================================================================ engine
def model_dir(args) -> str:
    if args.model:
        return args.model
    d = Path(tempfile.mkdtemp(prefix="tq-bench-llama8b-"))
    cfg = dict(LLAMA_8B, num_hidden_layers=args.layers, num_key_value_heads=args.kv_heads, head_dim=args.head_dim)
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "generation_config.json").write_text(json.dumps({"bos_token_id": 128000, "eos_token_id": 128001}))
    return str(d)


def run_engine(args, model: str, with_connector: bool, prompts: list[list[int]], root: Path) -> dict:
    """Runs in a child process (one engine per process; GPU memory is fully returned between engines)."""
    import subprocess

    spec = {"model": model, "with_connector": with_connector, "prompts_seed": args.seed, "n": len(prompts),
            "tokens": args.prompt_tokens, "args": vars(args), "root": str(root)}
    env = dict(os.environ, PYTHONHASHSEED=os.environ.get("PYTHONHASHSEED", "0"))
    p = subprocess.run([sys.executable, __file__, "--_child", json.dumps(spec)], env=env, text=True,
                       capture_output=True, timeout=args.timeout)
    for line in p.stdout.splitlines():
        if line.startswith("CHILD:"):
            return json.loads(line[6:])
    sys.stderr.write(p.stdout[-5000:] + "\n" + p.stderr[-20000:])
    raise SystemExit(f"engine child failed (rc={p.returncode})")


def make_prompts(seed: int, n: int, tokens: int, vocab: int) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    lo = min(1000, vocab // 4)
    return [[rng.randrange(lo, vocab - lo) for _ in range(tokens)] for _ in range(n)]


def child(spec: dict) -> dict:
    from vllm import LLM, SamplingParams

    a = argparse.Namespace(**spec["args"])
    root = Path(spec["root"])
    stats_file = root / ("stats.json" if spec["with_connector"] else "none.json")
    kw = dict(model=spec["model"], load_format="dummy" if not a.model else "auto", skip_tokenizer_init=True,
              max_model_len=spec["tokens"] + 64, enable_prefix_caching=False, block_size=a.block_size,
              gpu_memory_utilization=a.gpu_mem, max_num_batched_tokens=a.chunk,
              max_num_seqs=4, seed=0)
    if a.eager:
        kw["enforce_eager"] = True
    if a.backend == "tq":
        kw["attention_backend"] = "CUSTOM"
        kw["additional_config"] = {"tq_vllm": {"preset": a.preset}}
    if spec["with_connector"]:
        kw["kv_transfer_config"] = {
            "kv_connector": "TQConnector", "kv_connector_module_path": "tq_vllm.connector", "kv_role": "kv_both",
            "kv_connector_extra_config": {"cpu_bytes": a.cpu_gb << 30, "stats_file": str(stats_file),
                                          "log_interval_s": 0, "staging_bytes": a.staging_mb << 20}}
    t0 = time.perf_counter()
    llm = LLM(**kw)
    startup = time.perf_counter() - t0
    vocab = int(json.loads((Path(spec["model"]) / "config.json").read_text()).get("vocab_size", 32000))
    prompts = make_prompts(spec["prompts_seed"], spec["n"], spec["tokens"], vocab)
    sp = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    warm = make_prompts(spec["prompts_seed"] + 1, 1, min(1024, spec["tokens"] // 2), vocab)
    llm.generate([{"prompt_token_ids": warm[0]}], sp, use_tqdm=False)

    def stats():
        try:
            return json.loads(stats_file.read_text())
        except (OSError, ValueError):
            return {}

    def timed(p):
        t = time.perf_counter()
        out = llm.generate([{"prompt_token_ids": p}], sp, use_tqdm=False)[0]
        return (time.perf_counter() - t) * 1e3, out

    res = {"startup_s": startup, "first": [], "hit": [], "hit_cached_tokens": [], "hit_bytes": []}
    for p in prompts:
        ms, out = timed(p)
        res["first"].append(ms)
        if spec["with_connector"]:
            s0 = stats()
            ms, out = timed(p)
            s1 = stats()
            res["hit"].append(ms)
            res["hit_cached_tokens"].append(out.num_cached_tokens)
            res["hit_bytes"].append(sum(s1.get(f"load_bytes_{t}", 0) - s0.get(f"load_bytes_{t}", 0)
                                        for t in ("cpu", "disk", "redis")))
    res["stats"] = stats()
    return res


def engine(args, micro_res: dict | None) -> dict:
    model = model_dir(args)
    root = Path(tempfile.mkdtemp(prefix="tq-bench-conn-"))
    geo = page_geometry(args)
    log(f"engine part: model {model} ({'dummy weights' if not args.model else 'weights'}), backend {args.backend}, "
        f"{args.prompt_tokens}-token prompts x {args.reps}")
    base = run_engine(args, model, False, [None] * args.reps, root)
    log(f"recompute TTFT (no connector): {[round(x) for x in base['first']]} ms")
    conn = run_engine(args, model, True, [None] * args.reps, root)
    log(f"with connector: first (miss + save) {[round(x) for x in conn['first']]} ms, hit "
        f"{[round(x) for x in conn['hit']]} ms, cached tokens {conn['hit_cached_tokens']}")
    hit_blocks = (args.prompt_tokens - 1) // args.block_size
    out = {"ttft_ms_recompute": round(statistics.median(base["first"]), 2),
           "ttft_ms_miss_with_save": round(statistics.median(conn["first"]), 2),
           "ttft_ms_hit": round(statistics.median(conn["hit"]), 2),
           "hit_cached_tokens": conn["hit_cached_tokens"],
           "bytes_moved": int(statistics.median(conn["hit_bytes"])) if conn["hit_bytes"] else 0,
           "bytes_bf16_equivalent": hit_blocks * geo["bf16_block_bytes"],
           "engine_stats": conn["stats"], "startup_s": [round(base["startup_s"], 1), round(conn["startup_s"], 1)]}
    out["ttft_speedup"] = round(out["ttft_ms_recompute"] / out["ttft_ms_hit"], 2) if out["ttft_ms_hit"] else None
    out["bytes_vs_bf16"] = round(out["bytes_moved"] / out["bytes_bf16_equivalent"], 4) if out["bytes_moved"] else None
    log(f"TTFT recompute {out['ttft_ms_recompute']} ms vs hit {out['ttft_ms_hit']} ms: {out['ttft_speedup']}x "
        f"(target >= 5x); moved {out['bytes_moved'] / 1e9:.3f} GB = {out['bytes_vs_bf16']} of bf16 pages")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("all", "micro", "engine"), default="all")
    ap.add_argument("--backend", choices=("tq", "stock"), default="tq")
    ap.add_argument("--preset", default="tq4")
    ap.add_argument("--model", default=None, help="a local model dir (default: dummy Llama-3.1-8B shape)")
    ap.add_argument("--prompt-tokens", type=int, default=32768)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--micro-reps", type=int, default=5)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--cpu-gb", type=int, default=8)
    ap.add_argument("--staging-mb", type=int, default=256)
    ap.add_argument("--chunk", type=int, default=8192, help="max_num_batched_tokens")
    ap.add_argument("--gpu-mem", type=float, default=0.85)
    ap.add_argument("--eager", action="store_true")
    ap.add_argument("--fragmented", action="store_true", help="micro: pool slots in random order")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=int, default=3600)
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._child:
        print("CHILD:" + json.dumps(child(json.loads(args._child))), flush=True)
        return 0
    import torch

    if not torch.cuda.is_available():
        log("needs a CUDA GPU")
        return 2
    rec = {"bench": "connector", "device": torch.cuda.get_device_name(0),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "prompt_tokens": args.prompt_tokens, "backend": args.backend, "preset": args.preset, "part": args.part,
           "torch": torch.__version__}
    try:
        import vllm

        rec["vllm"] = vllm.__version__
    except Exception:
        rec["vllm"] = None
    micro_res = None
    if args.part in ("all", "micro"):
        micro_res = micro(args)
        rec.update(micro_res)
    if args.part in ("all", "engine"):
        rec.update(engine(args, micro_res))
    for k in ("ttft_ms_hit", "ttft_ms_recompute", "load_gbps", "save_gbps", "pinned_copy_gbps", "bytes_moved",
              "bytes_bf16_equivalent"):
        rec.setdefault(k, None)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(rec, sort_keys=True) + "\n")
    log(f"appended to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
