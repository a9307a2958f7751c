"""Long-context offline generation with a TurboQuant KV cache: a needle in a long haystack.

    python examples/offline_long_context.py                              # SmolLM2-135M-Instruct, 6K-token prompt
    python examples/offline_long_context.py --context 1500               # quicker (CPU CI)
    python examples/offline_long_context.py --model meta-llama/Llama-3.1-8B-Instruct --context 120000 --preset tq3

The prompt is prefilled in chunks (`max_num_batched_tokens`); every chunk after the first attends to the already
compressed pages of the earlier ones, exactly as decoding does, so this is what long prompts see in serving. The
script prints the answer, whether the needle was found, and the KV capacity in tokens.
"""
from __future__ import annotations

import argparse
import os
import time

FILLER = ("The committee met again on Tuesday to review the quarterly figures. Most of the discussion concerned the "
          "new irrigation canals, the price of grain in the northern markets and the repair of the old harbour "
          "walls. Nothing unusual was decided, and the minutes were approved without comment. ")
NEEDLE = "The secret passcode for the archive is 73914. "
QUESTION = "What is the secret passcode for the archive? Answer with the number only."


def default_model(tiny: bool) -> str:
    from tq_vllm import assets

    if tiny:
        return str(assets.make_tiny_llama(assets.cache_dir() / "tiny-llama-example", layers=4, max_position=8192))
    return str(assets.fetch_smollm2())  # trained on 8K-token contexts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model name or directory (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--tiny", action="store_true", help="a random-weight tiny Llama instead")
    ap.add_argument("--preset", default="tq4")
    ap.add_argument("--context", type=int, default=6000, help="prompt length in tokens (about)")
    ap.add_argument("--depth", type=float, default=0.5, help="where the needle goes (0 = start, 1 = end)")
    ap.add_argument("--chunk", type=int, default=1024, help="prefill chunk (max_num_batched_tokens)")
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--eager", action=argparse.BooleanOptionalAction, default=None)
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

    import torch
    from vllm import LLM, SamplingParams

    max_len = args.context + 512
    llm = LLM(
        model=args.model or default_model(args.tiny),
        attention_backend="CUSTOM",
        additional_config={"tq_vllm": {"preset": args.preset}},
        block_size=32,
        max_model_len=max_len,
        max_num_seqs=4,
        max_num_batched_tokens=args.chunk,
        enable_chunked_prefill=True,
        enforce_eager=args.eager if args.eager is not None else not torch.cuda.is_available(),
    )
    tok = llm.get_tokenizer()
    per = len(tok.encode(FILLER, add_special_tokens=False))
    n = max(1, (args.context - 80) // per)
    at = int(n * args.depth)
    haystack = FILLER * at + NEEDLE + FILLER * (n - at)
    msg = f"Read this document.\n\n{haystack}\n\n{QUESTION}"
    if getattr(tok, "chat_template", None):
        prompt = tok.apply_chat_template([{"role": "user", "content": msg}], tokenize=False, add_generation_prompt=True)
    else:
        prompt = msg + "\nAnswer:"
    t0 = time.perf_counter()
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=args.max_tokens), use_tqdm=False)[0]
    dt = time.perf_counter() - t0
    answer = out.outputs[0].text.strip()
    cc = llm.llm_engine.vllm_config.cache_config
    print(f"prompt {len(out.prompt_token_ids):,} tokens (needle at depth {args.depth:g}), prefilled in chunks of "
          f"{args.chunk} in {dt:.1f} s")
    print(f"answer: {answer!r} -> needle {'FOUND' if '73914' in answer else 'not found'}")
    print(f"KV cache: {cc.num_gpu_blocks * cc.block_size:,} tokens in {args.preset} pages "
          f"({cc.num_gpu_blocks * cc.block_size // max_len} prompts of this length at once)")


if __name__ == "__main__":
    main()
