"""Decode / store / prefill benchmark of tq_vllm's Triton kernels against bf16 FlashAttention and vLLM's TurboQuant.

Runs on a CUDA machine. vLLM (0.26.0 was used; its bundled FlashAttention and its TurboQuant decode kernel) is
optional: without it only tq_vllm rows are measured.

    python benchmarks/bench_decode.py --out DIR            # full grid (Llama-3.1-8B attention shapes)
    python benchmarks/bench_decode.py --out DIR --quick    # a few shapes
    python benchmarks/bench_decode.py --out DIR --check    # correctness spot checks vs the torch reference only

Per row: median time of a CUDA-graph replay (triton.testing.do_bench_cudagraph; graphs are how vLLM runs decode),
GB/s of the bytes that must be read (the KV pages of every (row, KV head) once), and that as % of the device copy
bandwidth measured in the same run (bytes read + written by a large device-to-device copy). Writes a table,
DIR/decode.png and DIR/decode.jsonl (one JSON object per row; append it to benchmarks/results/decode.jsonl).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import triton  # noqa: E402

from tq_vllm import kernels as K  # noqa: E402
from tq_vllm.quant import reference as ref  # noqa: E402
from tq_vllm.quant.codec import LayerCodec, new_sink_table  # noqa: E402
from tq_vllm.quant.plan import StepPlan  # noqa: E402

HQ, HK, D = 32, 8, 128  # Llama-3.1-8B attention
DEV = "cuda"


def bench(fn, graph=True):
    fn()
    torch.cuda.synchronize()
    if graph:
        try:
            return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")
        except Exception as e:  # pragma: no cover
            print("  (cuda graph failed, eager timing):", repr(e)[:200])
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def copy_bandwidth():
    n = 2 << 30
    a = torch.empty(n, dtype=torch.uint8, device=DEV)
    b = torch.empty_like(a)
    a.random_(0, 255)
    ms = triton.testing.do_bench(lambda: b.copy_(a), warmup=10, rep=100, return_mode="median")
    del a, b
    return 2 * n / ms / 1e6  # GB/s


def fix_scales(codec, cache):
    """Random page bytes, but every bf16 scale/norm field a sane value (timings must not run on NaN/Inf)."""
    lay = codec.layout
    pages = cache.view(cache.shape[0], cache.shape[1], -1)
    one = torch.tensor([1.0], dtype=torch.bfloat16).view(torch.uint8)
    for name, f in lay.fields.items():
        if name.endswith("scale") or name.endswith("rnorm"):
            pages[:, :, f.offset:f.end].view(pages.shape[0], pages.shape[1], f.count, 2)[:] = one.to(cache.device)


def decode_plan(R, ctx, B, bt, dev):
    L = ctx + 1
    i32 = dict(dtype=torch.int32, device=dev)
    return StepPlan(query_start_loc=torch.arange(R + 1, **i32), seq_lens=torch.full((R,), L, **i32),
                    ctx_lens=torch.full((R,), ctx, **i32),
                    ctx_slot=(torch.arange(R, **i32) if ctx % B else torch.full((R,), -1, **i32)),
                    open_slot=(torch.arange(R, **i32) if L % B else torch.full((R,), -1, **i32)),
                    qb_row=torch.zeros(0, **i32), qb_idx=torch.zeros(0, **i32), block_table=bt, block_size=B,
                    num_tokens=R, max_query_len=1, max_seq_len=L)


def tq_decode_case(preset, R, ctx, B, dtype=torch.bfloat16):
    codec = LayerCodec(preset, D, B, device=DEV)
    L = ctx + 1
    nbr = math.ceil(L / B)
    nb = R * nbr + 1
    C = codec.layout.bytes_per_token
    cache = torch.randint(0, 256, (nb, HK, B, C), dtype=torch.uint8, device=DEV)
    fix_scales(codec, cache)
    bt = torch.randperm(nb, device=DEV)[:R * nbr].view(R, nbr).to(torch.int32)
    staging = torch.randn(R, 2, B, HK, D, device=DEV).to(dtype)
    q = torch.randn(R, HQ, D, device=DEV).to(dtype)
    k = torch.randn(R, HK, D, device=DEV).to(dtype)
    v = torch.randn(R, HK, D, device=DEV).to(dtype)
    plan = decode_plan(R, ctx, B, bt, DEV)
    meta = K.prepare(plan, HK, HQ, num_decode_rows=R)
    out = torch.empty(R, HQ, D, dtype=dtype, device=DEV)
    sink = new_sink_table(64, HK, D, dtype, DEV)  # as the backend passes it (tags never match random pages here)
    fn = lambda: K.paged_attention(codec, q, k, v, cache, staging, plan, D ** -0.5, out=out, meta=meta,  # noqa
                                   sink=sink)
    pages = (L - 1) // B
    nbytes = R * HK * (pages * codec.layout.page_bytes + (L - pages * B) * D * 2 * 2)
    K.LAST_DECODE_LAUNCH.clear()
    fn()  # the launch actually taken (the 4-warp or the narrow decode launch)
    launch = dict(K.LAST_DECODE_LAUNCH)
    return fn, nbytes, dict(splits=launch["splits"], warps=launch["num_warps"], tile=launch["tile"],
                            lut4=launch.get("lut4"), bytes_per_token=C)


def fa_decode_case(R, ctx, B, dtype=torch.bfloat16):
    from vllm.vllm_flash_attn import flash_attn_varlen_func
    from vllm.vllm_flash_attn.flash_attn_interface import is_fa_version_supported
    ver = 3 if is_fa_version_supported(3) else 2
    L = ctx + 1
    nbr = math.ceil(L / B)
    nb = R * nbr + 1
    kc = torch.randn(nb, B, HK, D, device=DEV).to(dtype)
    vc = torch.randn(nb, B, HK, D, device=DEV).to(dtype)
    bt = torch.randperm(nb, device=DEV)[:R * nbr].view(R, nbr).to(torch.int32)
    q = torch.randn(R, HQ, D, device=DEV).to(dtype)
    cu = torch.arange(R + 1, dtype=torch.int32, device=DEV)
    su = torch.full((R,), L, dtype=torch.int32, device=DEV)
    out = torch.empty_like(q)
    fn = lambda: flash_attn_varlen_func(q=q, k=kc, v=vc, max_seqlen_q=1, cu_seqlens_q=cu, max_seqlen_k=L,  # noqa
                                        seqused_k=su, softmax_scale=D ** -0.5, causal=True, block_table=bt,
                                        out=out, fa_version=ver)
    return fn, R * HK * L * D * 2 * 2, dict(fa_version=ver)


def vllm_tq_decode_case(name, R, ctx, B, dtype=torch.bfloat16):
    from vllm.model_executor.layers.quantization.turboquant.centroids import get_centroids
    from vllm.model_executor.layers.quantization.turboquant.config import TurboQuantConfig
    from vllm.v1.attention.ops.triton_turboquant_decode import triton_turboquant_decode_attention
    cfg = TurboQuantConfig.from_cache_dtype(name, D)
    slot = cfg.slot_size_aligned
    L = ctx + 1
    nbr = math.ceil(L / B)
    nb = R * nbr + 1
    kvc = torch.randint(0, 256, (nb, HK, B, slot), dtype=torch.uint8, device=DEV)
    one16 = torch.tensor([1.0], dtype=torch.float16).view(torch.uint8).to(DEV)
    zero16 = torch.tensor([0.0], dtype=torch.float16).view(torch.uint8).to(DEV)
    mse = math.ceil(D * cfg.key_mse_bits / 8)
    kvc[..., mse:mse + 2] = one16  # key norm
    vo = cfg.key_packed_size + math.ceil(D * cfg.value_quant_bits / 8)
    kvc[..., vo:vo + 2] = one16  # value scale
    kvc[..., vo + 2:vo + 4] = zero16  # value zero
    kv = kvc.transpose(1, 2)  # (nb, B, Hk, slot), as the backend passes it
    bt = torch.randperm(nb, device=DEV)[:R * nbr].view(R, nbr).to(torch.int32)
    q = torch.randn(R, HQ, D, device=DEV).to(dtype)
    seq = torch.full((R,), L, dtype=torch.int32, device=DEV)
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < D:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    Pi = (h / math.sqrt(D)).to(torch.float32).to(DEV)
    cent = get_centroids(D, cfg.centroid_bits).to(device=DEV, dtype=torch.float32)
    mid = torch.empty(R, HQ, 32, D + 1, dtype=torch.float32, device=DEV)
    ob = torch.empty(R, HQ, D, dtype=dtype, device=DEV)
    lse = torch.empty(R, HQ, dtype=torch.float32, device=DEV)
    fn = lambda: triton_turboquant_decode_attention(  # noqa
        query=q, kv_cache=kv, block_table=bt, seq_lens=seq, Pi=Pi, centroids=cent, scale=D ** -0.5,
        mse_bits=cfg.key_mse_bits, key_packed_size=cfg.key_packed_size,
        value_quant_bits=cfg.effective_value_quant_bits, key_fp8=cfg.key_fp8, norm_correction=cfg.norm_correction,
        PiT=Pi.T.contiguous(), mid_o_buf=mid, output_buf=ob, lse_buf=lse, max_num_kv_splits=32)
    return fn, R * HK * L * slot, dict(slot=slot)


def store_case(preset, ntok, B, dtype=torch.bfloat16):
    """The store of one `ntok`-token prefill chunk: bench_store.py's chunk case at this attention shape."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import bench_store
    assert (bench_store.HK, bench_store.D) == (HK, D)
    return bench_store.chunk_case(preset, ntok, B, dtype, DEV)


def tq_prefill_case(preset, prefix, chunk, B, dtype=torch.bfloat16):
    codec = LayerCodec(preset, D, B, device=DEV)
    L = prefix + chunk
    nbr = math.ceil(L / B)
    C = codec.layout.bytes_per_token
    cache = torch.randint(0, 256, (nbr + 1, HK, B, C), dtype=torch.uint8, device=DEV)
    fix_scales(codec, cache)
    bt = torch.randperm(nbr + 1, device=DEV)[:nbr].view(1, nbr).to(torch.int32)
    q = torch.randn(chunk, HQ, D, device=DEV).to(dtype)
    k = torch.randn(chunk, HK, D, device=DEV).to(dtype)
    v = torch.randn(chunk, HK, D, device=DEV).to(dtype)
    staging = torch.randn(1, 2, B, HK, D, device=DEV).to(dtype)
    i32 = dict(dtype=torch.int32, device=DEV)
    plan = StepPlan(query_start_loc=torch.tensor([0, chunk], **i32), seq_lens=torch.tensor([L], **i32),
                    ctx_lens=torch.tensor([prefix], **i32), ctx_slot=torch.tensor([0 if prefix % B else -1], **i32),
                    open_slot=torch.tensor([0 if L % B else -1], **i32), qb_row=torch.zeros(0, **i32),
                    qb_idx=torch.zeros(0, **i32), block_table=bt, block_size=B, num_tokens=chunk,
                    max_query_len=chunk, max_seq_len=L)
    meta = K.prepare(plan, HK, HQ, num_decode_rows=0)
    out = torch.empty(chunk, HQ, D, dtype=dtype, device=DEV)
    return lambda: K.paged_attention(codec, q, k, v, cache, staging, plan, D ** -0.5, out=out, meta=meta)


def fa_prefill_case(prefix, chunk, B, dtype=torch.bfloat16):
    from vllm.vllm_flash_attn import flash_attn_varlen_func
    from vllm.vllm_flash_attn.flash_attn_interface import is_fa_version_supported
    ver = 3 if is_fa_version_supported(3) else 2
    L = prefix + chunk
    nbr = math.ceil(L / B)
    kc = torch.randn(nbr + 1, B, HK, D, device=DEV).to(dtype)
    vc = torch.randn(nbr + 1, B, HK, D, device=DEV).to(dtype)
    bt = torch.randperm(nbr + 1, device=DEV)[:nbr].view(1, nbr).to(torch.int32)
    q = torch.randn(chunk, HQ, D, device=DEV).to(dtype)
    cu = torch.tensor([0, chunk], dtype=torch.int32, device=DEV)
    su = torch.tensor([L], dtype=torch.int32, device=DEV)
    out = torch.empty_like(q)
    return lambda: flash_attn_varlen_func(q=q, k=kc, v=vc, max_seqlen_q=chunk, cu_seqlens_q=cu,  # noqa
                                          max_seqlen_k=L, seqused_k=su, softmax_scale=D ** -0.5, causal=True,
                                          block_table=bt, out=out, fa_version=ver)


# ------------------------------------------------------------------------------------------------------------
def check(out_dir):
    """Spot checks on the GPU: Triton vs the torch reference (same device) on paged-sim steps."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    from paged_sim import PagedSim
    lines = []
    cases = [("tq4", 128, 16, 8, 4, torch.bfloat16, "asm"), ("tq4", 128, 16, 8, 4, torch.bfloat16, "gather"),
             ("tq3", 128, 16, 8, 4, torch.bfloat16, "asm"), ("tq4-prod", 128, 32, 4, 4, torch.float16, "asm"),
             ("tq25", 64, 64, 2, 8, torch.bfloat16, "asm"), ("tq8", 96, 128, 2, 7, torch.float16, "asm")]
    for preset, Dh, B, H, G, dt, lut in cases:
        if True:
            os.environ["TQ_VLLM_LUT"] = lut
            torch.manual_seed(0)
            codec = LayerCodec(preset, Dh, B, device=DEV)
            Lmax = 1200
            q = {i: torch.randn(Lmax, H * G, Dh).to(dt) for i in range(3)}
            k = {i: (torch.randn(Lmax, H, Dh) * 2 + 0.3).to(dt) for i in range(3)}
            v = {i: torch.randn(Lmax, H, Dh).to(dt) for i in range(3)}
            sa = PagedSim(codec, H, num_blocks=200, num_slots=8, dtype=dt, device=DEV)
            sb = PagedSim(codec, H, num_blocks=200, num_slots=8, dtype=dt, device=DEV)
            errs = []
            for reqs in ([(0, 700), (1, 33)], [(0, 1), (1, 1), (2, 300)], [(0, 1), (1, 1), (2, 1)],
                         [(0, 1), (2, 150), (1, 5)]):
                oa = sa.step(lambda *a, **kw: K.forward_step(*a, force="triton", **kw), reqs, q, k, v, Dh ** -0.5)
                ob = sb.step(ref.forward_step, reqs, q, k, v, Dh ** -0.5)
                for rid in oa:
                    a_, b_ = oa[rid].float(), ob[rid].float()
                    errs.append(((a_ - b_).norm() / b_.norm()).item())
                    assert torch.isfinite(a_).all()
            same = (sa.cache == sb.cache).float().mean().item()
            line = (f"check {preset:8s} D={Dh} B={B} H={H} G={G} {str(dt)[6:]:8s} lut={lut:6s} "
                    f"max rel err {max(errs):.2e}  cache bytes equal {same:.5f}")
            print(line, flush=True)
            lines.append(line)
    os.environ["TQ_VLLM_LUT"] = "asm"
    with open(os.path.join(out_dir, "check.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")


def _kstats(name):
    k = K.LAST_KERNELS.get(name)
    if k is None:
        return {}
    try:
        return dict(regs=k.n_regs, spills=k.n_spills, smem=k.metadata.shared)
    except Exception:
        return {}


def sweep(out_dir, presets=("tq4",)):
    """Launch-config sweep (env knobs of tq_vllm.kernels): decode, store, prefill. Writes sweep.json (+ /tmp)."""
    res = {"decode": [], "store": [], "prefill": []}
    dec_variants = [("4,1", 64, 1), ("4,2", 64, 1), ("4,3", 64, 1), ("8,2", 64, 1), ("4,2", 128, 1),
                    ("8,3", 128, 1), ("4,2", 64, 16), ("4,2", 32, 1)]
    shapes = [(16, 32, 32768), (64, 32, 32768), (16, 8, 8192), (16, 1, 1024)]
    for preset in presets:
        for B, R, ctx in shapes:
            for cfg, tile, mgp in dec_variants:
                os.environ["TQ_VLLM_DECODE_CFG"] = cfg
                os.environ["TQ_VLLM_DECODE_TILE"] = str(tile)
                os.environ["TQ_VLLM_MIN_GP"] = str(mgp)
                try:
                    fn, nbytes, ex = tq_decode_case(preset, R, ctx, B)
                    ms = bench(fn)
                    st = _kstats("decode")
                    row = dict(preset=preset, B=B, R=R, ctx=ctx, cfg=cfg, tile=tile, min_gp=mgp, ms=ms,
                               gbps=nbytes / ms / 1e6, **ex, **st)
                    print("sweep decode", row, flush=True)
                    res["decode"].append(row)
                    del fn
                except Exception as e:
                    print("sweep decode FAIL", preset, B, R, ctx, cfg, tile, mgp, repr(e)[:300], flush=True)
            torch.cuda.empty_cache()
    for k_ in ("TQ_VLLM_DECODE_CFG", "TQ_VLLM_DECODE_TILE", "TQ_VLLM_MIN_GP"):
        os.environ.pop(k_, None)
    if K.LAST_KERNELS.get("decode") is not None:
        try:
            with open(os.path.join(out_dir, "decode.ttgir"), "w") as f:
                f.write(K.LAST_KERNELS["decode"].asm["ttgir"])
        except Exception:
            pass
    for preset in presets:
        for cfg in ("4,1", "8,1", "2,1", "4,2"):
            os.environ["TQ_VLLM_STORE_CFG"] = cfg
            try:
                fn, nbytes = store_case(preset, 16384, 16)
                ms = bench(fn)
                row = dict(preset=preset, cfg=cfg, ms=ms, gbps=nbytes / ms / 1e6, **_kstats("store"))
                print("sweep store", row, flush=True)
                res["store"].append(row)
            except Exception as e:
                print("sweep store FAIL", cfg, repr(e)[:300], flush=True)
        os.environ.pop("TQ_VLLM_STORE_CFG", None)
        for cfg, rows_, tile in (("8,1", 128, 64), ("4,1", 64, 64), ("8,2", 64, 32), ("4,1", 32, 64)):
            os.environ["TQ_VLLM_PREFILL_CFG"] = cfg
            os.environ["TQ_VLLM_PREFILL_ROWS"] = str(rows_)
            os.environ["TQ_VLLM_PREFILL_TILE"] = str(tile)
            try:
                fn = tq_prefill_case(preset, 32768, 2048, 16)
                ms = bench(fn, False)
                row = dict(preset=preset, cfg=cfg, rows=rows_, tile=tile, ms=ms, **_kstats("prefill"))
                print("sweep prefill", row, flush=True)
                res["prefill"].append(row)
            except Exception as e:
                print("sweep prefill FAIL", cfg, rows_, tile, repr(e)[:300], flush=True)
        for k_ in ("TQ_VLLM_PREFILL_CFG", "TQ_VLLM_PREFILL_ROWS", "TQ_VLLM_PREFILL_TILE"):
            os.environ.pop(k_, None)
    for path in (os.path.join(out_dir, "sweep.json"), "/tmp/tq_sweep.json"):
        with open(path, "w") as f:
            json.dump(res, f, indent=1)
    return res


def parse_variants(spec: str):
    """"name:KEY=V,KEY=V;name2:..." -> [(name, {TQ_VLLM_KEY: V})]; values may hold commas if quoted as a/b."""
    out = []
    for item in filter(None, (x.strip() for x in spec.split(";"))):
        name, _, kv = item.partition(":")
        env = {}
        for pair in filter(None, kv.split(" ")):
            k, _, v = pair.partition("=")
            env["TQ_VLLM_" + k] = v.replace("/", ",")
        out.append((name, env))
    return out


def _set_env(env: dict) -> dict:
    """Apply `env`; returns what to hand to `_restore_env` afterwards."""
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    return old


def _restore_env(old: dict) -> None:
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    torch.cuda.empty_cache()


def variants(spec, presets=("tq4",), B=32, shapes=((32, 32768), (8, 8192), (1, 1024)), fa=False):
    """Time decode variants (env knobs of tq_vllm.kernels) on the same inputs; returns rows, prints a table.
    fa: also bf16 FlashAttention at the same shapes (variant "bf16_fa"), the baseline of the same run."""
    rows = []

    def timed(name, env, preset, R, ctx, case, stats):
        try:
            fn, nbytes, ex = case()
            ms = bench(fn)
            row = dict(variant=name, env=env, preset=preset, B=B, R=R, ctx=ctx, ms=round(ms, 5),
                       gbps=round(nbytes / ms / 1e6, 1), **ex, **stats())
            del fn
        except Exception as e:  # noqa: BLE001
            row = dict(variant=name, env=env, preset=preset, B=B, R=R, ctx=ctx, ms=None, error=repr(e)[:300])
        print("variant", json.dumps(row), flush=True)
        rows.append(row)

    if fa:
        for R, ctx in shapes:
            timed("bf16_fa", {}, "bf16", R, ctx, lambda: fa_decode_case(R, ctx, B), dict)
    for name, env in parse_variants(spec):
        old = _set_env(env)
        for preset in presets:
            for R, ctx in shapes:
                timed(name, env, preset, R, ctx, lambda: tq_decode_case(preset, R, ctx, B), lambda: _kstats("decode"))
        _restore_env(old)
    print(f"{'variant':14s} {'preset':6s} " + " ".join(f"{R}x{c}".rjust(12) for R, c in shapes))
    for name, _ in ([("bf16_fa", {})] if fa else []) + list(parse_variants(spec)):
        for preset in (("bf16",) if name == "bf16_fa" else presets):
            cells = []
            for R, c in shapes:
                r = [x for x in rows if x["variant"] == name and x["preset"] == preset and x["R"] == R and x["ctx"] == c]
                cells.append(f"{r[0]['ms']:.4f}".rjust(12) if r and r[0]["ms"] else "FAIL".rjust(12))
            print(f"{name:14s} {preset:6s} " + " ".join(cells), flush=True)
    return rows


def prefill_variants(spec, preset="tq4", B=32, shapes=((32768, 2048),)):
    """Time prefill variants (env knobs) on one chunk over a compressed prefix, for each (prefix, chunk) of
    `shapes`, and bf16 FlashAttention on the same shape; returns rows."""
    rows = []
    for prefix, chunk in shapes:
        try:
            ms = bench(fa_prefill_case(prefix, chunk, B), False)
            row = dict(variant="bf16_fa", env={}, kind="prefill", preset="bf16", B=B, prefix=prefix, chunk=chunk,
                       ms=round(ms, 4))
        except Exception as e:  # noqa: BLE001
            row = dict(variant="bf16_fa", env={}, kind="prefill", preset="bf16", B=B, prefix=prefix, chunk=chunk,
                       ms=None, error=repr(e)[:300])
        print("variant", json.dumps(row), flush=True)
        print(f"prefill {prefix}+{chunk} {'bf16_fa':14s} {row['ms']}", flush=True)
        rows.append(row)
        for name, env in parse_variants(spec):
            old = _set_env(env)
            K.LAST_KERNELS.pop("prefill", None)  # the FlashAttention path launches no Triton prefill kernel
            try:
                fn = tq_prefill_case(preset, prefix, chunk, B)
                ms = bench(fn, False)
                row = dict(variant=name, env=env, kind="prefill", preset=preset, B=B, prefix=prefix, chunk=chunk,
                           ms=round(ms, 4), **_kstats("prefill"))
                del fn
            except Exception as e:  # noqa: BLE001
                row = dict(variant=name, env=env, kind="prefill", preset=preset, B=B, prefix=prefix, chunk=chunk,
                           ms=None, error=repr(e)[:300])
            print("variant", json.dumps(row), flush=True)
            print(f"prefill {prefix}+{chunk} {name:14s} {row['ms']}", flush=True)
            rows.append(row)
            _restore_env(old)
        torch.cuda.empty_cache()
    return rows


def tune(presets=("tq4",)):
    """Small decode launch sweep at 32 x 32K (B=16) and 32 x 32K (B=64); returns {B: (cfg, tile)} of the fastest."""
    best = {}
    for B in (16, 64):
        res = []
        for cfg, tile in (("4,2", 128), ("4,1", 64), ("4,2", 64), ("8,2", 128), ("4,3", 128)):
            os.environ["TQ_VLLM_DECODE_CFG"], os.environ["TQ_VLLM_DECODE_TILE"] = cfg, str(tile)
            try:
                fn, nbytes, ex = tq_decode_case(presets[0], 32, 32768, B)
                ms = bench(fn)
                res.append((ms, cfg, tile))
                print(f"tune B={B} cfg={cfg} tile={tile}: {ms:.4f} ms {nbytes / ms / 1e6:.0f} GB/s {_kstats('decode')}",
                      flush=True)
                del fn
            except Exception as e:
                print(f"tune B={B} cfg={cfg} tile={tile}: FAIL {repr(e)[:200]}", flush=True)
        if res:
            best[B] = min(res)[1:]
    for k_ in ("TQ_VLLM_DECODE_CFG", "TQ_VLLM_DECODE_TILE"):
        os.environ.pop(k_, None)
    print("tune best:", best, flush=True)
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--check", action="store_true", help="only the correctness spot checks")
    ap.add_argument("--with-check", action="store_true", help="spot checks before the benchmark")
    ap.add_argument("--block-size", type=int, nargs="+", default=[16])
    ap.add_argument("--presets", default="tq4,tq3")
    ap.add_argument("--eager", action="store_true", help="time without CUDA graphs")
    ap.add_argument("--sweep", action="store_true", help="launch-config sweep only")
    ap.add_argument("--tune", action="store_true", help="pick the decode launch config by a small sweep first")
    ap.add_argument("--no-vllm-tq", action="store_true", help="skip vLLM's TurboQuant (its first compile is slow)")
    ap.add_argument("--variants", default=None,
                    help='decode variants to time first, "name:KEY=V KEY=V;name2:..." (KEY without TQ_VLLM_, a/b '
                         'for a,b), e.g. "base:DECODE_PF=0;pf3:DECODE_PF=1 DECODE_CFG=4/3"')
    ap.add_argument("--pick", action="store_true", help="run the grid with the variant fastest at 32 x 32K (tq4)")
    ap.add_argument("--variants-only", action="store_true")
    ap.add_argument("--variant-fa", action="store_true", help="also bf16 FlashAttention at the --variant-shapes")
    ap.add_argument("--variant-presets", default="tq4", help="presets the --variants are timed for")
    ap.add_argument("--variant-shapes", default="32x32768,8x8192,1x1024",
                    help='(rows x context) shapes of the --variants, e.g. "64x8192,32x32768"')
    ap.add_argument("--prefill-variants", default=None, help="prefill variants, same syntax (2K chunk over 32K)")
    ap.add_argument("--prefill-shapes", default="32768:2048",
                    help='(prefix:chunk) shapes of the prefill variants, e.g. "32768:2048,0:16384"')
    ap.add_argument("--vllm-tq-quick", action="store_true", help="vLLM's TurboQuant only at 1x1K, 8x8K, 32x32K")
    ap.add_argument("--vllm-tq-only", action="store_true", help="only vLLM's TurboQuant rows (implies --vllm-tq-quick)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.variants:
        vshapes = tuple(tuple(int(x) for x in sh.split("x")) for sh in args.variant_shapes.split(","))
        vrows = variants(args.variants, tuple(args.variant_presets.split(",")), B=args.block_size[0], shapes=vshapes,
                         fa=args.variant_fa)
        with open(os.path.join(args.out, "variants.jsonl"), "a") as f:
            for r in vrows:
                f.write(json.dumps(r) + "\n")
        if args.pick:
            ok = [r for r in vrows if r["ms"] and r["preset"] == "tq4" and (r["R"], r["ctx"]) == (32, 32768)]
            if ok:
                best = min(ok, key=lambda r: r["ms"])
                os.environ.update(best["env"])
                print("picked variant", best["variant"], best["env"], flush=True)
    if args.prefill_variants:
        shapes = tuple(tuple(int(x) for x in sh.split(":")) for sh in args.prefill_shapes.split(","))
        prow = prefill_variants(args.prefill_variants, B=args.block_size[0], shapes=shapes)
        with open(os.path.join(args.out, "variants.jsonl"), "a") as f:
            for r in prow:
                f.write(json.dumps(r) + "\n")
        ok = [r for r in prow if r["ms"] and r["variant"] != "bf16_fa" and (r["prefix"], r["chunk"]) == shapes[0]]
        if args.pick and ok:
            best = min(ok, key=lambda r: r["ms"])
            os.environ.update(best["env"])
            print("picked prefill variant", best["variant"], best["env"], flush=True)
    if args.variants_only:
        return
    dev_name = torch.cuda.get_device_name()
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    if args.check or args.with_check:
        try:
            check(args.out)
        except Exception:
            traceback.print_exc()
        if args.check:
            return
    if args.sweep:
        sweep(args.out)
        return
    presets = args.presets.split(",")
    best = tune(tuple(presets)) if args.tune else {}
    graph = not args.eager
    copy_gbps = copy_bandwidth()
    print(f"device {dev_name}; copy bandwidth {copy_gbps:.0f} GB/s (read+write)", flush=True)
    try:
        import vllm  # noqa: F401
        have_vllm = True
    except Exception as e:
        print("vLLM not importable, baselines skipped:", repr(e)[:200])
        have_vllm = False
    grid = [(1, 1024), (1, 8192), (1, 32768), (8, 1024), (8, 8192), (8, 32768), (32, 1024), (32, 8192),
            (32, 32768), (64, 1024), (64, 8192), (64, 32768)]
    if args.quick:
        grid = [(1, 1024), (8, 8192), (32, 32768)]
    free = torch.cuda.mem_get_info()[0]
    grid = [(R, c) for R, c in grid if R * HK * (c + 1) * D * 4 * 1.3 < free]
    rows = []
    jl = open(os.path.join(args.out, "decode.jsonl"), "a")

    def record(impl, preset, R, ctx, B, ms, nbytes, extra=None):
        gbps = nbytes / ms / 1e6
        row = dict(device=dev_name, date=date, impl=impl, preset=preset, batch=R, context=ctx, block_size=B,
                   ms=round(ms, 5), gbps=round(gbps, 1), pct_copy_bw=round(100 * gbps / copy_gbps, 1),
                   copy_gbps=round(copy_gbps), timing="cudagraph" if graph else "eager", **(extra or {}))
        rows.append(row)
        jl.write(json.dumps(row) + "\n")
        jl.flush()
        print(f"{impl:16s} {preset:20s} B={B:<3d} {R:3d} x {ctx:6d}: {ms:8.4f} ms  {gbps:7.0f} GB/s "
              f"({100 * gbps / copy_gbps:5.1f}% of copy)  {extra or ''}", flush=True)

    def run(impl, preset, R, ctx, B, make, graph_=graph):
        try:
            fn, nbytes, ex = make()
            record(impl, preset, R, ctx, B, bench(fn, graph_), nbytes, ex)
        except Exception:
            traceback.print_exc()
        torch.cuda.empty_cache()

    if args.vllm_tq_only:
        args.vllm_tq_quick = True
    for B in ([] if args.vllm_tq_only else args.block_size):
        if B in best:
            os.environ["TQ_VLLM_DECODE_CFG"], os.environ["TQ_VLLM_DECODE_TILE"] = best[B][0], str(best[B][1])
        for R, ctx in grid:
            for preset in presets:
                run("tq_vllm", preset, R, ctx, B, lambda: tq_decode_case(preset, R, ctx, B))
        for k_ in ("TQ_VLLM_DECODE_CFG", "TQ_VLLM_DECODE_TILE"):
            os.environ.pop(k_, None)
        if have_vllm:
            for R, ctx in grid:
                run("bf16_flash", "bf16", R, ctx, B, lambda: fa_decode_case(R, ctx, B))
    B0 = args.block_size[0]
    # store throughput: one 16K-token chunk
    for preset in ([] if args.vllm_tq_only else presets):
        run("tq_vllm_store", preset, 1, 16384, B0, lambda: (*store_case(preset, 16384, B0), None))
    # prefill: a chunk over a 32K compressed prefix (attention only)
    for chunk in (() if args.vllm_tq_only else (2048,) if args.quick else (512, 2048)):
        for preset in presets:
            run("tq_vllm_prefill", preset, 1, 32768 + chunk, B0,
                lambda: (tq_prefill_case(preset, 32768, chunk, B0), 1, dict(chunk=chunk)), False)
        if have_vllm:
            run("bf16_flash_prefill", "bf16", 1, 32768 + chunk, B0,
                lambda: (fa_prefill_case(32768, chunk, B0), 1, dict(chunk=chunk)), False)
    if have_vllm and not args.no_vllm_tq:
        for B in args.block_size:
            for R, ctx in grid:
                if args.vllm_tq_quick and (R, ctx) not in ((1, 1024), (8, 8192), (32, 32768)):
                    continue
                for name in ("turboquant_4bit_nc", "turboquant_3bit_nc"):
                    run("vllm_turboquant", name, R, ctx, B, lambda: vllm_tq_decode_case(name, R, ctx, B))
    jl.close()
    summary(rows, args.out)


def summary(rows, out_dir):
    dec = [r for r in rows if r["impl"] in ("tq_vllm", "bf16_flash", "vllm_turboquant")]
    key = lambda r: (r["block_size"], r["batch"], r["context"])  # noqa
    shapes = sorted({key(r) for r in dec})
    print("\nblock batch x context | " + " | ".join(
        ["tq4 ms (%copy)", "tq3 ms (%copy)", "bf16 FA ms", "vLLM TQ4 ms", "vLLM TQ3 ms", "tq4/FA", "tq3/FA",
         "vLLM4/tq4"]))
    for s in shapes:
        got = {(r["impl"], r["preset"]): r for r in dec if key(r) == s}
        g = lambda i, p: got.get((i, p))  # noqa
        t4, t3, fa = g("tq_vllm", "tq4"), g("tq_vllm", "tq3"), g("bf16_flash", "bf16")
        v4, v3 = g("vllm_turboquant", "turboquant_4bit_nc"), g("vllm_turboquant", "turboquant_3bit_nc")
        f = lambda r: f"{r['ms']:.4f} ({r['pct_copy_bw']:.0f}%)" if r else "-"  # noqa
        ratio = lambda a, b: f"{b['ms'] / a['ms']:.2f}x" if a and b else "-"  # noqa
        print(f"{s[0]:5d} {s[1]:3d} x {s[2]:6d} | {f(t4)} | {f(t3)} | {f(fa)} | {f(v4)} | {f(v3)} | "
              f"{ratio(t4, fa)} | {ratio(t3, fa)} | {ratio(t4, v4)}")
    for r in rows:
        if r["impl"] not in ("tq_vllm", "bf16_flash", "vllm_turboquant"):
            print(f"{r['impl']:18s} {r['preset']:6s} {r['batch']} x {r['context']}: {r['ms']:.4f} ms"
                  + (f", {r['gbps']:.0f} GB/s ({r['pct_copy_bw']:.0f}% of copy)" if r["impl"].endswith("store")
                     else ""))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(1, 2, figsize=(13, 5))
        for (impl, preset), grp in sorted({(r["impl"], r["preset"]): None for r in dec}.items()):
            pts = sorted((r["batch"] * r["context"], r["ms"], r["gbps"]) for r in dec
                         if r["impl"] == impl and r["preset"] == preset and r["block_size"] == dec[0]["block_size"])
            if pts:
                ax[0].plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"{impl} {preset}")
                ax[1].plot([p[0] for p in pts], [p[2] for p in pts], "o-", label=f"{impl} {preset}")
        for a, yl in zip(ax, ("ms (median, CUDA graph)", "GB/s of KV bytes read")):
            a.set_xscale("log")
            a.set_yscale("log")
            a.set_xlabel("batch x context tokens")
            a.set_ylabel(yl)
            a.grid(True, which="both", alpha=0.3)
        ax[1].axhline(rows[0]["copy_gbps"], color="k", ls="--", lw=1, label="device copy bandwidth")
        ax[0].legend(fontsize=7)
        ax[1].legend(fontsize=7)
        fig.suptitle(f"paged decode, Llama-3.1-8B attention (32 q / 8 kv heads, d=128), {rows[0]['device']}")
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "decode.png"), dpi=110)
    except Exception:
        traceback.print_exc()


if __name__ == "__main__":
    main()
