"""Minimal offline generation with a TurboQuant-compressed KV cache (vLLM's `LLM` class + tq_vllm).

    python examples/offline_minimal.py                       # SmolLM2-135M-Instruct (built from PyPI), CPU or GPU
    python examples/offline_minimal.py --model meta-llama/Llama-3.1-8B-Instruct --preset tq3   # GPU, any model
    python examples/offline_minimal.py --tiny                # a random-weight tiny Llama: the fastest smoke test

tq_vllm is selected with vLLM's public options only: `attention_backend="CUSTOM"` (the plugin registers its
backend there; installing the package is all it takes) and `additional_config={"tq_vllm": {...}}` for its options.
On a CPU machine the KV space is VLLM_CPU_KVCACHE_SPACE GiB (this script defaults it to 1).
"""
from __future__ import annotations

import argparse
import os

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Water boils at 100 degrees Celsius. Water freezes at"]


def default_model(tiny: bool) -> str:
    from tq_vllm import assets

    if tiny:
        return str(assets.make_tiny_llama(assets.cache_dir() / "tiny-llama-example", layers=4))
    return str(assets.fetch_smollm2())  # SmolLM2-135M-Instruct as a bf16 Hugging Face directory


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model name or directory (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--tiny", action="store_true", help="a random-weight tiny Llama instead (output is gibberish)")
    ap.add_argument("--preset", default="tq4", help="KV format: tq4, tq3, tq35, tq25, tq8 (`tq-vllm presets`)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--eager", action=argparse.BooleanOptionalAction, default=None,
                    help="skip torch.compile / CUDA graphs (default: on CPU, where it starts much faster)")
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # CPU platform: GiB of KV cache (ignored on GPU)

    import torch
    from vllm import LLM, SamplingParams

    eager = args.eager if args.eager is not None else not torch.cuda.is_available()
    llm = LLM(
        model=args.model or default_model(args.tiny),
        attention_backend="CUSTOM",                             # tq_vllm's attention backend
        additional_config={"tq_vllm": {"preset": args.preset}},  # its options (docs/presets.md)
        block_size=32,
        max_model_len=args.max_model_len,
        max_num_seqs=8,
        dtype=args.dtype,
        enforce_eager=eager,
    )
    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=args.max_tokens))
    for out in outputs:
        print(f"{out.prompt!r} -> {out.outputs[0].text!r}")
    cc = llm.llm_engine.vllm_config.cache_config
    print(f"KV cache: {cc.num_gpu_blocks * cc.block_size:,} tokens ({cc.num_gpu_blocks:,} blocks of "
          f"{cc.block_size}) in {args.preset} pages; the engine's 'tq_vllm ...' log line compares it with bf16")


if __name__ == "__main__":  # required: vLLM's CPU platform starts its engine in a spawned process
    main()
