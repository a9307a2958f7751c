"""Offline generation with tq_vllm's compressed offload connector (TQConnector): a long document is prefilled once,
pushed out of vLLM's own KV cache by other requests, and loaded back from the connector's tiers (CPU RAM, and
disk / Redis when given) instead of being prefilled again. The blocks move as compressed pages.

    python examples/offline_connector.py                                  # CPU tier only, SmolLM2-135M-Instruct
    python examples/offline_connector.py --disk-dir /tmp/tqkv             # + disk; run it twice: the second run
                                                                          #   loads the document from disk at once
    python examples/offline_connector.py --redis-url redis://127.0.0.1:6379/0 --model DIR   # + Redis, any model

vLLM's KV cache is made deliberately small here (`num_gpu_blocks_override`) so that three other documents evict
the first one; in production the tiers simply extend a full GPU cache. Inspect the stored blocks afterwards with
`tq-vllm store ls|verify DISK_DIR`.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

TOPICS = ["apples", "copper", "violins", "satellites", "glaciers", "tea", "bridges", "owls"]
CITIES = ["Lyon", "Osaka", "Quito", "Tromso", "Perth", "Tunis", "Lima", "Riga", "Hanoi", "Malmo"]


def document(n: int, sentences: int) -> str:
    """A plain-text 'report' (deterministic): long enough to span many KV blocks."""
    lines = [f"Report {n}."]
    for i in range(sentences):
        lines.append(f"Entry {i}: the warehouse in {CITIES[(i * 7 + n) % len(CITIES)]} stores "
                     f"{(i * 37 + n * 11) % 900 + 100} crates of {TOPICS[(i + n) % len(TOPICS)]}.")
    return " ".join(lines)


def default_model(tiny: bool) -> str:
    from tq_vllm import assets

    if tiny:
        return str(assets.make_tiny_llama(assets.cache_dir() / "tiny-llama-example", layers=4))
    return str(assets.fetch_smollm2())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model name or directory (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--tiny", action="store_true", help="a random-weight tiny Llama instead")
    ap.add_argument("--preset", default="tq4")
    ap.add_argument("--cpu-bytes", default="256M", help="CPU tier budget (e.g. 256M, 8G)")
    ap.add_argument("--disk-dir", help="enable the disk tier in this directory")
    ap.add_argument("--redis-url", default=None, help="enable the Redis tier (e.g. redis://127.0.0.1:6379/0)")
    ap.add_argument("--sentences", type=int, default=40, help="length of each document (~16 tokens per sentence)")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--eager", action=argparse.BooleanOptionalAction, default=None)
    ap.add_argument("--dtype", default=None,
                    help="model dtype (default: float32 on CPU, where bf16 activations differ between batch shapes "
                         "enough to flip a near-tie; the model's own dtype on GPU)")
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    # vLLM 0.26 seeds block hashes randomly per process unless PYTHONHASHSEED is set: a disk tier reused by a later
    # run (or Redis shared by several instances) needs one fixed value. vLLM 0.32+ (sha256 hashes) needs nothing.
    os.environ.setdefault("PYTHONHASHSEED", "0")

    import torch
    from vllm import LLM, SamplingParams

    work = Path(tempfile.mkdtemp(prefix="tq-connector-example-"))
    stats_file = work / "stats.json"
    extra = {"cpu_bytes": args.cpu_bytes, "stats_file": str(stats_file), "log_interval_s": 0}
    if args.disk_dir:
        extra["disk_dir"] = args.disk_dir
        extra["disk_write"] = "through"  # every saved block also goes to disk at once (default: when evicted)
    if args.redis_url:
        extra["redis_url"] = args.redis_url
    block, max_len = 32, 2048
    llm = LLM(
        model=args.model or default_model(args.tiny),
        attention_backend="CUSTOM",
        additional_config={"tq_vllm": {"preset": args.preset}},
        kv_transfer_config={
            "kv_connector": "TQConnector",                    # tq_vllm's connector ...
            "kv_connector_module_path": "tq_vllm.connector",  # ... imported by vLLM from here
            "kv_role": "kv_both",                             # saves and loads
            "kv_connector_extra_config": extra,               # its tiers (tq_vllm/connector/config.py)
        },
        enable_prefix_caching=True,
        block_size=block,
        max_model_len=max_len,
        max_num_seqs=4,
        num_gpu_blocks_override=max_len // block + 8,  # small on purpose: one document at a time fits
        enforce_eager=args.eager if args.eager is not None else not torch.cuda.is_available(),
        dtype=args.dtype or ("auto" if torch.cuda.is_available() else "float32"),
    )
    sp = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    question = "\nQuestion: which city is named in entry 3? Answer:"

    def counters() -> dict:
        try:
            return json.loads(stats_file.read_text())
        except (OSError, ValueError):
            return {}

    def ask(label: str, doc: str) -> str:
        before = counters()
        out = llm.generate([doc + question], sp, use_tqdm=False)[0]
        after = counters()
        hits = {t: int(after.get(f"hit_blocks_{t}", 0) - before.get(f"hit_blocks_{t}", 0))
                for t in ("cpu", "disk", "redis")}
        print(f"{label}: {len(out.prompt_token_ids)} prompt tokens, {out.num_cached_tokens} not recomputed "
              f"(connector hits in blocks: {', '.join(f'{t} {n}' for t, n in hits.items())}) -> "
              f"{out.outputs[0].text.strip()!r}")
        return out.outputs[0].text

    doc0 = document(0, args.sentences)
    first = ask("document 0, first time      ", doc0)
    for n in (1, 2, 3):  # other documents push document 0 out of vLLM's small KV cache
        llm.generate([document(n, args.sentences) + question], sp, use_tqdm=False)
    again = ask("document 0 after 3 others   ", doc0)
    print(f"same answer as the first time: {'yes' if again == first else 'no'}")
    total = counters()
    print("connector totals: " + ", ".join(f"{k} {int(v)}" for k, v in sorted(total.items())
                                           if k.startswith(("hit_blocks", "save_blocks", "load_blocks", "miss"))))
    if args.disk_dir:
        print(f"disk tier: {args.disk_dir} (inspect: tq-vllm store ls {args.disk_dir})")


if __name__ == "__main__":
    main()
