"""`tq-vllm eval ...`: perplexity and needle-in-a-haystack under decode semantics (see docs/quality.md).

    tq-vllm eval ppl  --model DIR --text FILE --preset NAME [--baseline SPEC ...] [--tokens N] [--windows K]
                      [--block-size B] [--engine hf|vllm] [--json]
    tq-vllm eval niah --model DIR --preset NAME --context N [N ...] [--depths 0.1 0.5 0.9] [--engine vllm|hf]
                      [--text FILE] [--json]
    tq-vllm eval formats [--head-dim 64 128]      bytes per token per KV head of every built-in format

`--model` / `--text` default to the SmolLM2-135M-Instruct and Wikipedia assets (tq_vllm.assets).
Heavy imports (torch, transformers, vLLM) happen only when a command runs.
"""
from __future__ import annotations

import argparse
import json
import sys
import time


def add_eval_subcommands(subparsers) -> None:
    """Add the `eval` command (with sub-commands ppl / niah / formats) to the `tq-vllm` parser."""
    ev = subparsers.add_parser("eval", help="quality: perplexity and needle-in-a-haystack with a compressed KV cache",
                               description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ev.add_subparsers(dest="eval_command", metavar="EVAL_COMMAND")
    ev.set_defaults(func=lambda a: (ev.print_help(), 2)[1])

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", default=None, help="Hugging Face model directory (default: SmolLM2-135M asset)")
    common.add_argument("--block-size", type=int, default=None, help="block size (default 32, the GPU backend's)")
    common.add_argument("--json", action="store_true", help="print one JSON object (for machines)")
    common.add_argument("--no-progress", action="store_true", help="no progress bar")
    common.add_argument("--threads", type=int, default=None, help="torch CPU threads")

    p = sub.add_parser("ppl", parents=[common], help="perplexity with the KV cache in a preset's format vs bf16 KV",
                       description="Perplexity of the text under decode semantics (every token attends to the "
                                   "stored, quantized K/V of earlier tokens) next to bf16 KV.")
    p.add_argument("--text", default=None, help="UTF-8 text file (default: the Wikipedia sample asset)")
    p.add_argument("--preset", action="append", required=True,
                   help="KV format: a tq_vllm preset (tq4, tq3, ...) or harness spec (fp8, vllm:4bit_nc, "
                        "tq4:mean_bits=4, ...); repeatable")
    p.add_argument("--baseline", action="append", default=[],
                   help="extra formats to measure in the same run (e.g. vllm:4bit_nc, fp8); repeatable")
    p.add_argument("--tokens", type=int, default=2048, help="tokens per window (default 2048)")
    p.add_argument("--windows", type=int, default=2, help="number of windows (default 2)")
    p.add_argument("--engine", choices=("hf", "vllm"), default="hf",
                   help="hf: transformers + harness attention (fast CPU path); vllm: prompt logprobs of a real "
                        "vLLM engine with the tq_vllm backend (fp8 and vllm:*/turboquant_* specs: vLLM's own "
                        "kv_cache_dtype, CUDA build only for turboquant; use --chunk 128 for decode semantics)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="hf engine compute dtype (K/V are rounded to bf16 either way)")
    p.add_argument("--chunk", type=int, default=None, help="vllm engine: max_num_batched_tokens (chunked prefill)")
    p.set_defaults(func=_cmd_ppl)

    n = sub.add_parser("niah", parents=[common], help="needle in a haystack over depths at given context lengths")
    n.add_argument("--text", default=None, help="haystack text (default: the Wikipedia sample asset)")
    n.add_argument("--preset", action="append", required=True, help="KV format (see ppl); repeatable")
    n.add_argument("--context", type=int, nargs="+", required=True, help="prompt lengths in tokens")
    n.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    n.add_argument("--engine", choices=("vllm", "hf"), default="vllm",
                   help="vllm: the real engine with our backend (default); hf: the harness (any format)")
    n.add_argument("--max-new-tokens", type=int, default=32)
    n.add_argument("--prompt", choices=("end", "both"), default="end",
                   help="end: text then question; both: the task also stated before the text")
    n.set_defaults(func=_cmd_niah)

    f = sub.add_parser("formats", help="bytes per token per KV head of the presets and baselines")
    f.add_argument("--head-dim", type=int, nargs="+", default=[64, 128])
    f.add_argument("--block-size", type=int, default=32)
    f.add_argument("--num-layers", type=int, default=30, help="for the average over layers (vLLM boundary layers)")
    f.add_argument("--json", action="store_true")
    f.set_defaults(func=_cmd_formats)


# ------------------------------------------------------------------------------------------------ helpers
def _setup(args):
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from tq_vllm import assets

    model = args.model or str(assets.fetch_smollm2())
    text = getattr(args, "text", None)
    if hasattr(args, "text") and text is None:
        text = str(assets.fetch_wikipedia())
    return model, text


def _table(rows: list[list[str]], header: list[str]) -> str:
    w = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = lambda c: "  ".join(x.rjust(w[i]) if i else x.ljust(w[i]) for i, x in enumerate(c)).rstrip()  # noqa
    return "\n".join([line(header), line(["-" * x for x in w]), *map(line, rows)])


def _with_block(spec: str, block_size: int | None) -> str:
    if (not block_size or spec in ("bf16", "fp8") or spec.startswith(("vllm:", "turboquant_"))
            or "block=" in spec):
        return spec
    return f"{spec}{',' if '=' in spec else ':'}block={block_size}"


# ------------------------------------------------------------------------------------------------ ppl
def ppl_report(model_dir, text, specs, *, tokens=2048, windows=2, block_size=None, engine="hf", dtype="float32",
               chunk=None, progress=True) -> dict:
    """Measure bf16 and every format in `specs`; returns a JSON-able dict (also used by the benchmarks)."""
    from .formats import make_format

    t0 = time.perf_counter()
    specs = [_with_block(s, block_size) for s in specs]
    fmts = [make_format(s) for s in specs]
    if engine == "hf":
        from .ppl import load_model, model_shape, ppl_hf, text_windows

        model, tok = load_model(model_dir, dtype)
        shape = model_shape(model)
        wins = text_windows(tok, text, tokens, windows)
        res = ppl_hf(model, wins, [make_format("bf16")] + fmts, progress=progress)
    else:
        from transformers import AutoConfig, AutoTokenizer

        from .ppl import ppl_vllm, text_windows

        tok = AutoTokenizer.from_pretrained(model_dir)
        c = AutoConfig.from_pretrained(model_dir)
        shape = {"num_layers": c.num_hidden_layers, "num_heads": c.num_attention_heads,
                 "num_kv_heads": c.num_key_value_heads,
                 "head_dim": getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads}
        wins = text_windows(tok, text, tokens, windows)
        from .ppl import vllm_engine_kwargs

        for f in fmts:  # fail before the first engine starts if a format cannot run in this engine
            vllm_engine_kwargs(f)
        res = {"bf16": ppl_vllm(model_dir, wins, None, max_model_len=tokens + 8, chunk=chunk)}
        for f in fmts:
            res[f.name] = ppl_vllm(model_dir, wins, f, max_model_len=tokens + 8, chunk=chunk)
    base = res["bf16"]
    rows = []
    D, L = shape["head_dim"], shape["num_layers"]
    for name, r in res.items():
        f = make_format(name)
        rows.append({"preset": name, "ppl": r.ppl, "ppl_bf16": base.ppl,
                     "delta_pct": 100.0 * (r.ppl / base.ppl - 1.0),
                     "bytes_per_token_head": f.bytes_per_token_head(D, L),
                     "bytes_per_token_head_layer": f.layer_bytes(D),
                     "bytes_per_token_head_d128": f.bytes_per_token_head(128, L),
                     "per_window_ppl": r.per_window, "seconds": round(r.seconds, 2)})
        if engine == "vllm":  # what ran: tq_vllm's backend, or vLLM's own attention with this kv_cache_dtype
            from .ppl import vllm_engine_kwargs

            kw = vllm_engine_kwargs(None if name == "bf16" else f)
            rows[-1]["attention_backend"] = kw.get("attention_backend", "vllm-default")
            rows[-1]["kv_cache_dtype"] = kw.get("kv_cache_dtype", "auto")
    return {"model": str(model_dir), "model_shape": shape, "engine": engine, "tokens": tokens, "chunk": chunk,
            "windows": [w.title for w in wins], "predicted_tokens": base.count,
            "block_size": block_size or 32, "results": rows, "seconds": round(time.perf_counter() - t0, 2)}


def _engine_usage_error(args, specs) -> int:
    """Exit code 2 with the reason if a format cannot run in the chosen engine (before any model is loaded)."""
    if args.engine != "vllm":
        return 0
    from .ppl import vllm_engine_kwargs

    try:
        for spec in specs:
            vllm_engine_kwargs(_with_block(spec, args.block_size))
    except ValueError as e:
        print(f"tq-vllm eval {args.eval_command}: {e}", file=sys.stderr)
        return 2
    return 0


def _cmd_ppl(args) -> int:
    if rc := _engine_usage_error(args, list(args.preset) + list(args.baseline)):
        return rc
    model, text = _setup(args)
    rep = ppl_report(model, text, list(args.preset) + list(args.baseline), tokens=args.tokens,
                     windows=args.windows, block_size=args.block_size, engine=args.engine, dtype=args.dtype,
                     chunk=args.chunk, progress=not args.no_progress and not args.json)
    if args.json:
        print(json.dumps(rep))
        return 0
    s = rep["model_shape"]
    print(f"perplexity, decode semantics, engine={rep['engine']}: {len(rep['windows'])} windows x "
          f"{rep['tokens']} tokens ({rep['predicted_tokens']} predicted) of {text}")
    print(f"model {model}: {s['num_layers']} layers, {s['num_heads']} q / {s['num_kv_heads']} KV heads, "
          f"head_dim {s['head_dim']}; windows: {', '.join(rep['windows'])}")
    rows = [[r["preset"], f"{r['bytes_per_token_head']:.1f}", f"{r['bytes_per_token_head_d128']:.1f}",
             f"{r['ppl']:.4f}", f"{r['delta_pct']:+.2f}%", f"{r['seconds']:.1f}"] for r in rep["results"]]
    print(_table(rows, ["format", f"B/tok/head d={s['head_dim']}", "d=128", "perplexity", "vs bf16", "s"]))
    print(f"({rep['seconds']:.0f} s; bytes averaged over layers: vLLM recipes keep their 4 boundary layers bf16)")
    return 0


# ------------------------------------------------------------------------------------------------ niah
def _cmd_niah(args) -> int:
    if rc := _engine_usage_error(args, args.preset):
        return rc
    model, text = _setup(args)
    from transformers import AutoTokenizer

    from .niah import make_cases, run_hf, run_vllm

    tok = AutoTokenizer.from_pretrained(model)
    cases = make_cases(tok, text, args.context, args.depths, args.prompt)
    out = {"model": model, "engine": args.engine, "prompt": args.prompt, "runs": []}
    hf_model = None
    for spec in args.preset:
        spec = _with_block(spec, args.block_size)
        t0 = time.perf_counter()
        if args.engine == "vllm":
            res, t_start, t_gen = run_vllm(model, cases, spec,
                                           max_new_tokens=args.max_new_tokens, block_size=args.block_size)
            extra = {"engine_start_s": round(t_start, 1), "generate_s": round(t_gen, 1)}
        else:
            if hf_model is None:
                from .ppl import load_model

                hf_model, _ = load_model(model)
            res = run_hf(hf_model, tok, cases, spec, max_new_tokens=args.max_new_tokens,
                         progress=not args.no_progress and not args.json)
            extra = {}
        out["runs"].append({"preset": spec, "results": [r.to_dict() for r in res],
                            "found": sum(r.found for r in res), "total": len(res),
                            "seconds": round(time.perf_counter() - t0, 1), **extra})
    if args.json:
        print(json.dumps(out))
        return 0
    for run in out["runs"]:
        print(f"NIAH {run['preset']} (engine {args.engine}): {run['found']}/{run['total']} found, "
              f"{run['seconds']:.0f} s" + (f" (engine start {run['engine_start_s']} s)" if "engine_start_s" in run else ""))
        rows = [[str(r["context"]), str(r["prompt_tokens"]), f"{r['depth']:.2f}", "yes" if r["found"] else "NO",
                 r["answer"][:40]] for r in run["results"]]
        print(_table(rows, ["context", "prompt tokens", "depth", "found", "answer"]))
    return 0


# ------------------------------------------------------------------------------------------------ formats
BUILTIN_FORMATS = ("bf16", "fp8", "vllm:k8v4", "vllm:4bit_nc", "vllm:k3v4_nc", "vllm:3bit_nc")


def _cmd_formats(args) -> int:
    from tq_vllm.quant.presets import PRESETS

    from .formats import make_format

    rows, out = [], []
    for spec in list(BUILTIN_FORMATS) + list(PRESETS):
        f = make_format(spec, block_size=args.block_size)
        r = {"format": spec, "semantics": f.base.semantics, "boundary_layers": f.boundary}
        cols = [spec, f.base.semantics]
        for d in args.head_dim:
            r[f"layer_bytes_d{d}"] = f.layer_bytes(d)
            r[f"avg_bytes_d{d}"] = f.bytes_per_token_head(d, args.num_layers)
            cols += [str(f.layer_bytes(d)), f"{f.bytes_per_token_head(d, args.num_layers):.1f}",
                     f"{4 * d / f.bytes_per_token_head(d, args.num_layers):.2f}x"]
        rows.append(cols)
        out.append(r)
    if args.json:
        print(json.dumps(out))
        return 0
    hdr = ["format", "semantics"]
    for d in args.head_dim:
        hdr += [f"d={d} layer B", f"avg B ({args.num_layers} layers)", "vs bf16"]
    print(f"bytes per token per KV head (K+V), block size {args.block_size}")
    print(_table(rows, hdr))
    return 0


def main(argv=None) -> int:  # `python -m tq_vllm.eval.cli ...` (same as `tq-vllm eval ...`)
    parser = argparse.ArgumentParser(prog="tq-vllm")
    sub = parser.add_subparsers(dest="command")
    add_eval_subcommands(sub)
    args = parser.parse_args(["eval", *(argv if argv is not None else sys.argv[1:])])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
