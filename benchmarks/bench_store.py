#!/usr/bin/env python
"""Store kernel timing in the two situations vLLM produces, for launch variants on the same inputs.

    decode   R decode rows (one new token each) of which `valid` complete their block in this step: the block's first
             B-1 tokens come from staging, the last from the step's input; the completed-block list is padded to R
             with -1 as in the CUDA-graph plan. What every decode step of every layer pays.
    chunk    one prefill chunk of N tokens (N/B blocks from the step's input): the throughput case.

    python benchmarks/bench_store.py [--preset tq4] [--block-size 32] \
        [--variants "base:;rows32:STORE_ROWS=32;w8:STORE_CFG=8/1"]

Variants are env knobs of tq_vllm.kernels (prefix TQ_VLLM_ added, '/' for ','). Prints a table; --out appends JSON rows.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tq_vllm import kernels as K  # noqa: E402
from tq_vllm.quant.codec import LayerCodec  # noqa: E402
from tq_vllm.quant.plan import StepPlan  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import _restore_env, _set_env, parse_variants  # noqa: E402

HK, D = 8, 128


def decode_case(preset, R, valid, B, dtype=torch.bfloat16, dev="cuda"):
    codec = LayerCodec(preset, D, B, device=dev)
    C = codec.layout.bytes_per_token
    nblk_row = 4
    cache = torch.zeros(R * nblk_row + 1, HK, B, C, dtype=torch.uint8, device=dev)
    bt = (1 + torch.randperm(R * nblk_row, device=dev)).view(R, nblk_row).to(torch.int32)
    i32 = dict(dtype=torch.int32, device=dev)
    ctx = torch.full((R,), 2 * B + B // 2, **i32)
    ctx[:valid] = 3 * B - 1  # these rows complete block 2 in this step
    seq = ctx + 1
    k = torch.randn(R, HK, D, device=dev).to(dtype)
    v = torch.randn(R, HK, D, device=dev).to(dtype)
    staging = torch.randn(R + 1, 2, B, HK, D, device=dev).to(dtype)
    qr = torch.full((R,), -1, **i32)
    qi = torch.full((R,), -1, **i32)
    qr[:valid] = torch.arange(valid, **i32)
    qi[:valid] = 2
    plan = StepPlan(query_start_loc=torch.arange(R + 1, **i32), seq_lens=seq, ctx_lens=ctx,
                    ctx_slot=torch.arange(R, **i32), open_slot=torch.where(seq % B == 0, -1, torch.arange(R, **i32)),
                    qb_row=qr, qb_idx=qi, block_table=bt, block_size=B, num_tokens=R, max_query_len=1,
                    max_seq_len=int(seq.max()))
    return lambda: K.store_blocks(codec, cache, staging, k, v, plan)


def chunk_case(preset, ntok, B, dtype=torch.bfloat16, dev="cuda"):
    codec = LayerCodec(preset, D, B, device=dev)
    nblk = ntok // B
    cache = torch.zeros(nblk + 1, HK, B, codec.layout.bytes_per_token, dtype=torch.uint8, device=dev)
    bt = torch.randperm(nblk + 1, device=dev)[:nblk].view(1, nblk).to(torch.int32)
    k = torch.randn(ntok, HK, D, device=dev).to(dtype)
    v = torch.randn(ntok, HK, D, device=dev).to(dtype)
    staging = torch.zeros(1, 2, B, HK, D, device=dev, dtype=dtype)
    i32 = dict(dtype=torch.int32, device=dev)
    plan = StepPlan(query_start_loc=torch.tensor([0, ntok], **i32), seq_lens=torch.tensor([ntok], **i32),
                    ctx_lens=torch.tensor([0], **i32), ctx_slot=torch.tensor([-1], **i32),
                    open_slot=torch.tensor([-1], **i32), qb_row=torch.zeros(nblk, **i32),
                    qb_idx=torch.arange(nblk, **i32), block_table=bt, block_size=B, num_tokens=ntok,
                    max_query_len=ntok, max_seq_len=ntok)
    nbytes = ntok * HK * D * 2 * 2 + nblk * HK * codec.layout.page_bytes
    return (lambda: K.store_blocks(codec, cache, staging, k, v, plan)), nbytes


def bench(fn, reps=50):
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    st, en = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    st.record()
    for _ in range(reps):
        g.replay()
    en.record()
    torch.cuda.synchronize()
    return st.elapsed_time(en) / reps


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", nargs="+", default=["tq4"])
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--variants", default="base:")
    ap.add_argument("--out")
    a = ap.parse_args(argv)
    dev = torch.cuda.get_device_name(0)
    cases = [("decode 64 rows, 0 complete", lambda p: (decode_case(p, 64, 0, a.block_size), None)),
             ("decode 64 rows, 2 complete", lambda p: (decode_case(p, 64, 2, a.block_size), None)),
             ("decode 64 rows, 64 complete", lambda p: (decode_case(p, 64, 64, a.block_size), None)),
             ("chunk 16K tokens", lambda p: chunk_case(p, 16384, a.block_size))]
    rows = []
    for name, env in parse_variants(a.variants):
        old = _set_env(env)
        for preset in a.preset:
            for cname, mk in cases:
                try:
                    fn, nbytes = mk(preset)
                    ms = bench(fn)
                    st = K.LAST_KERNELS.get("store")
                    row = dict(device=dev, date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                               variant=name, env=env, preset=preset, B=a.block_size, case=cname, ms=round(ms, 5),
                               gbps=round(nbytes / ms / 1e6, 1) if nbytes else None,
                               regs=getattr(st, "n_regs", None), spills=getattr(st, "n_spills", None))
                except Exception as e:  # noqa: BLE001
                    row = dict(variant=name, preset=preset, case=cname, ms=None, error=repr(e)[:300])
                print("store", json.dumps(row), flush=True)
                rows.append(row)
        _restore_env(old)
    names = [c for c, _ in cases]
    print(f"{'variant':12s} {'preset':6s} " + " ".join(n[:26].rjust(27) for n in names))
    for name, _ in parse_variants(a.variants):
        for preset in a.preset:
            cells = []
            for n in names:
                r = [x for x in rows if x["variant"] == name and x["preset"] == preset and x["case"] == n]
                cells.append((f"{r[0]['ms'] * 1000:.1f} us" if r and r[0]["ms"] else "FAIL").rjust(27))
            print(f"{name:12s} {preset:6s} " + " ".join(cells), flush=True)
    if a.out:
        with open(a.out, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
