#!/usr/bin/env python
"""One layer's decode step as vLLM runs it (store, decode, split reduction, staging write in one CUDA graph) in
launch variants on the same inputs, at the Llama-3.1-8B attention shape. Rows decode one token each; `--complete N`
of them complete a block in the step (their store runs), the others are mid-block, as in a batch whose prompts
finished at staggered times. The default variants: the store before the attention with the staging copy in a launch
of its own (`sep`), the same with the staging copy in the split reduction's launch (`fold`), the store beside the
attention on a second stream (`beside`).

    python benchmarks/bench_step.py                                  # the default grid -> table
    python benchmarks/bench_step.py --shapes 64x8192:2,1x32768:0 --out benchmarks/results/step_variants.jsonl
    python benchmarks/bench_step.py --variants "a:STORE_OVERLAP=0;b:STORE_OVERLAP=1"   # TQ_VLLM_ knobs

Each row: R x context : completed blocks, ms per layer step in each variant, and each against the first.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.bench_decode import DEV, HK, HQ, D, bench, fix_scales  # noqa: E402
from tq_vllm import kernels as K  # noqa: E402
from tq_vllm.quant.codec import LayerCodec, new_sink_table  # noqa: E402
from tq_vllm.quant.plan import StepPlan  # noqa: E402


def step_case(preset: str, R: int, ctx: int, n_complete: int, B: int = 32, dtype=torch.bfloat16):
    """fn() = one layer's `forward_step` for R decode rows near `ctx`; rows < n_complete complete a block."""
    codec = LayerCodec(preset, D, B, device=DEV)
    base = (ctx // B) * B
    # completing rows sit at offset B-1 of their open block, the others at 1..B-2 (staged tokens, block open)
    off = torch.tensor([B - 1 if r < n_complete else 1 + r % (B - 2) for r in range(R)])
    ctxs = base + off
    L = ctxs + 1
    nbr = int((L.max() + B - 1) // B)
    nb = R * nbr + 1
    cache = torch.randint(0, 256, (nb, HK, B, codec.layout.bytes_per_token), dtype=torch.uint8, device=DEV)
    fix_scales(codec, cache)
    i32 = dict(dtype=torch.int32, device=DEV)
    bt = torch.randperm(nb, device=DEV)[:R * nbr].view(R, nbr).to(torch.int32)
    comp = off == B - 1
    qb_row = torch.full((R,), -1, **i32)  # padded to R, as the CUDA-graph plan is
    qb_idx = torch.full((R,), -1, **i32)
    qb_row[:n_complete] = torch.arange(n_complete, **i32)
    qb_idx[:n_complete] = (L[:n_complete] // B - 1).to(**i32)
    plan = StepPlan(query_start_loc=torch.arange(R + 1, **i32), seq_lens=L.to(**i32), ctx_lens=ctxs.to(**i32),
                    ctx_slot=torch.arange(R, **i32), open_slot=torch.where(comp, -1, torch.arange(R)).to(**i32),
                    qb_row=qb_row, qb_idx=qb_idx, block_table=bt, block_size=B, num_tokens=R, max_query_len=1,
                    max_seq_len=int(L.max()))
    staging = torch.randn(R, 2, B, HK, D, device=DEV).to(dtype)
    q = torch.randn(R, HQ, D, device=DEV).to(dtype)
    k = torch.randn(R, HK, D, device=DEV).to(dtype)
    v = torch.randn(R, HK, D, device=DEV).to(dtype)
    out = torch.empty(R, HQ, D, dtype=dtype, device=DEV)
    sink = new_sink_table(1024, HK, D, dtype, DEV)
    K.sink_pending(DEV, dtype, R, HK, D)
    meta = K.prepare(plan, HK, HQ, num_decode_rows=R)
    return lambda: K.forward_step(codec, q, k, v, cache, staging, plan, D ** -0.5, out=out, meta=meta, sink=sink)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tq4")
    ap.add_argument("--shapes", default="1x32768:0,1x32768:1,4x8192:0,4x8192:1,16x8192:1,32x8192:1,64x8192:0,"
                                        "64x8192:2,64x8192:8,128x8192:4")
    ap.add_argument("--variants", default="sep:STORE_OVERLAP=0 STAGE_FOLD=0;fold:STORE_OVERLAP=0 STAGE_FOLD=1;"
                                          "beside:STORE_OVERLAP=1",
                    help="name:KEY=V KEY=V;... (keys without the TQ_VLLM_ prefix)")
    ap.add_argument("--out", default=None, help="append one JSON object per row")
    ap.add_argument("--note", default="")
    a = ap.parse_args(argv)
    variants = []
    for spec in a.variants.split(";"):
        name, _, kv = spec.partition(":")
        variants.append((name.strip(), dict(x.split("=", 1) for x in kv.split())))
    dev = torch.cuda.get_device_name()
    print(f"{dev}, {a.preset}, one layer's decode step in a CUDA graph, ms")
    print(f"{'rows':>5} {'context':>8} {'blocks':>6} " + " ".join(f"{n:>8}" for n, _ in variants)
          + "".join(f" {n + '/' + variants[0][0]:>12}" for n, _ in variants[1:]))
    for spec in a.shapes.split(","):
        shape, nc = spec.split(":")
        R, ctx = (int(x) for x in shape.split("x"))
        fn = step_case(a.preset, R, ctx, int(nc))
        ms = {}
        for name, env in variants:
            saved = {k: os.environ.get("TQ_VLLM_" + k) for k in env}
            os.environ.update({"TQ_VLLM_" + k: v for k, v in env.items()})
            try:
                ms[name] = bench(fn)
            finally:
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop("TQ_VLLM_" + k, None)
                    else:
                        os.environ["TQ_VLLM_" + k] = v
        base = ms[variants[0][0]]
        print(f"{R:>5} {ctx:>8} {int(nc):>6} " + " ".join(f"{ms[n]:>8.4f}" for n, _ in variants)
              + "".join(f" {ms[n] / base:>12.3f}" for n, _ in variants[1:]), flush=True)
        if a.out:
            with open(a.out, "a") as f:
                f.write(json.dumps(dict(device=dev, date=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                                        preset=a.preset, rows=R, context=ctx, completed_blocks=int(nc),
                                        ms={n: round(ms[n], 5) for n, _ in variants},
                                        variants={n: env for n, env in variants}, note=a.note)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
