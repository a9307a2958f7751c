"""Dequantize whole head pages into a bf16/fp16 paged workspace (original domain), Triton.

The prefill path (prefill.py) attends with vLLM's FlashAttention over these dequantized pages: one program per
(NPG pages, KV head) decodes K and V (codes -> centroids x per-token scale + block mean, QJL term for prod keys),
rotates them back (x = y @ Π) and writes `[B, D]` rows into the workspace block the plan assigned. Token 0 of a
first block is taken from the sink table when the page's tag matches its entry, as in the attention kernel.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .attention import _bf16_at, _codes


@triton.jit
def _decode_side(CACHE, base, tok, tm, t, dm, C32, C32M, O0: tl.constexpr, W0: tl.constexpr, O1: tl.constexpr,
                 W1: tl.constexpr, O2: tl.constexpr, W2: tl.constexpr, SO: tl.constexpr, CEN: tl.constexpr,
                 MO0: tl.constexpr, MW0: tl.constexpr, MO1: tl.constexpr, MW1: tl.constexpr, MO2: tl.constexpr,
                 MW2: tl.constexpr, MSO: tl.constexpr, D: tl.constexpr):
    """Rotated-domain K or V of the rows' head pages: [NR, DP] float32 (natural coordinate order, R = 1).
    base, tok, tm: [NR] page base offset, token within the page, row valid."""
    m2 = tm[:, None] & dm[None, :]
    code = _codes(CACHE, base[:, None], tok[:, None], m2, t[None, :], 1, 0, D, O0, W0, O1, W1, O2, W2)
    y = tl.load(C32 + code, mask=m2, other=0.0) * _bf16_at(CACHE, base + SO, tok, tm)[:, None]
    if CEN:
        mc = _codes(CACHE, base[:, None], 0, m2, t[None, :], 1, 0, D, MO0, MW0, MO1, MW1, MO2, MW2)  # [NR, DP]
        mean = tl.load(C32M + mc, mask=m2, other=0.0) * _bf16_at(CACHE, base + MSO, tok * 0, tm)[:, None]
        y += mean
    return y


@triton.jit
def _unrotate_store(y, PI, PI16, rsd, W, woff, tm, DP: tl.constexpr, D: tl.constexpr, DC: tl.constexpr,
                    PM1: tl.constexpr, INTERP: tl.constexpr, sink_row, sinkrow_ptr):
    """W[woff + c] = (y @ Π)[:, c], chunk by chunk of output columns; rows where sink_row is set take the sink
    table's exact row at sinkrow_ptr instead. PM1: PI16 = sqrt(D)*Π = ±1 in bf16, y split into bf16 high and low
    parts (two exact-product tensor-core passes, ~16 mantissa bits); else fp32 Π with tf32x3 (~fp32 on tensor
    cores, as the store's product: an ieee product unrolls into D·DP·NR/threads FMAs per thread, which spilled 9-12
    KB at head_dim 96). woff, tm, sink_row, sinkrow_ptr: [NR]."""
    di = tl.arange(0, DP)
    if PM1:
        yh = y.to(tl.bfloat16)
        yl = (y - yh.to(tl.float32)).to(tl.bfloat16)
    for c in tl.static_range(0, D, DC):
        dd = c + tl.arange(0, DC)
        if PM1:
            p = tl.load(PI16 + di[:, None] * D + dd[None, :], mask=(di < D)[:, None], other=0.0)  # [DP, DC]
            if INTERP:
                x = (tl.dot(yh.to(tl.float32), p.to(tl.float32)) + tl.dot(yl.to(tl.float32), p.to(tl.float32)))
            else:
                x = tl.dot(yh, p) + tl.dot(yl, p)
            x = x * rsd
        else:
            p = tl.load(PI + di[:, None] * D + dd[None, :], mask=(di < D)[:, None], other=0.0)
            x = tl.dot(y, p, input_precision="tf32x3")
        s0 = tl.load(sinkrow_ptr[:, None] + dd[None, :], mask=sink_row[:, None], other=0.0).to(tl.float32)
        x = tl.where(sink_row[:, None], s0, x)
        tl.store(W + woff[:, None] + dd[None, :], x.to(W.dtype.element_ty), mask=tm[:, None])


@triton.jit(do_not_specialize=["n_pages"])  # one compile for any number of pages (no mid-serving JIT)
def _tq_dequant_kernel(
    CACHE, SRC, DST, FIRST, WK, WV, PI, PI16, SQ, CK, CV, CKM, CVM, SKV, STAG,
    rsd, n_sink, n_pages, s_w0, s_w1, s_w2, s_k0, s_k1, s_k2,
    H: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, B: tl.constexpr, BP: tl.constexpr, PAGE: tl.constexpr,
    KO0: tl.constexpr, KW0: tl.constexpr, KO1: tl.constexpr, KW1: tl.constexpr, KO2: tl.constexpr,
    KW2: tl.constexpr, KSO: tl.constexpr,
    VO0: tl.constexpr, VW0: tl.constexpr, VO1: tl.constexpr, VW1: tl.constexpr, VO2: tl.constexpr,
    VW2: tl.constexpr, VSO: tl.constexpr,
    KC: tl.constexpr, KMO0: tl.constexpr, KMW0: tl.constexpr, KMO1: tl.constexpr, KMW1: tl.constexpr,
    KMO2: tl.constexpr, KMW2: tl.constexpr, KMSO: tl.constexpr,
    VC: tl.constexpr, VMO0: tl.constexpr, VMW0: tl.constexpr, VMO1: tl.constexpr, VMW1: tl.constexpr,
    VMO2: tl.constexpr, VMW2: tl.constexpr, VMSO: tl.constexpr,
    PROD: tl.constexpr, QJO: tl.constexpr, RNO: tl.constexpr,
    SINK: tl.constexpr, SINKO: tl.constexpr, PM1: tl.constexpr, DC: tl.constexpr, INTERP: tl.constexpr,
    NPG: tl.constexpr = 1,
):
    """Grid (cdiv(n_pages, NPG), H): pages SRC[i] (vLLM block ids) -> workspace blocks DST[i] for NPG consecutive
    entries i per program (their tokens stacked as the M dimension of the rotation's dots); WK, WV [blocks, B, H, D]."""
    i0 = tl.program_id(0) * NPG
    h = tl.program_id(1)
    n = tl.arange(0, NPG * BP)
    i = i0 + n // BP  # entry of each row
    tok = n % BP
    pv = i < n_pages
    tm = (tok < B) & pv
    blk = tl.load(SRC + i, mask=pv, other=0).to(tl.int64)
    dst = tl.load(DST + i, mask=pv, other=0).to(tl.int64)
    base = (blk * H + h) * PAGE  # [NR]
    t = tl.arange(0, DP)
    dm = t < D

    sink_row = tok < 0  # all False
    slot0 = tok * 0
    if SINK:
        # token 0 of a first block is exact when the page's tag matches the sink table's entry
        first = (tl.load(FIRST + i, mask=pv & (tok == 0), other=0) != 0) & (tok == 0)  # token-0 rows only
        tag = tl.load((CACHE + base + SINKO).to(tl.pointer_type(tl.int64)), mask=first, other=0)
        slot0 = ((tag % n_sink) + n_sink) % n_sink
        ttag = tl.load(STAG + slot0 * H + h, mask=first & (tag != 0), other=0)
        sink_row = first & (tag != 0) & (ttag == tag) & tm
    sk = SKV + slot0 * s_k0 + h * s_k2  # [NR] pointers

    yk = _decode_side(CACHE, base, tok, tm, t, dm, CK, CKM, KO0, KW0, KO1, KW1, KO2, KW2, KSO, KC,
                      KMO0, KMW0, KMO1, KMW1, KMO2, KMW2, KMSO, D)
    if PROD:
        # + ‖e‖ sqrt(pi/2)/D * (z @ S), z = ±1 from the QJL sign bits; S in row chunks of DC (the whole fp32 S
        # as one dot operand needs 384 KB of shared memory at head_dim 256); tf32x3 as in _unrotate_store
        qjl = tl.zeros([NPG * BP, DP], dtype=tl.float32)
        for c in tl.static_range(0, D, DC):
            tc = c + tl.arange(0, DC)
            mc = tm[:, None] & (tc < D)[None, :]
            z = (_codes(CACHE, base[:, None], tok[:, None], mc, tc[None, :], 1, 0, D, QJO, 1, 0, 0, 0, 0) * 2 - 1
                 ).to(tl.float32)
            sq = tl.load(SQ + tc[:, None] * D + t[None, :], mask=(tc < D)[:, None] & dm[None, :], other=0.0)
            qjl += tl.dot(z, sq, input_precision="tf32x3")
        rn = _bf16_at(CACHE, base + RNO, tok, tm)
        yk += qjl * (rn * (1.2533141373155003 / D))[:, None]
    woff = dst * s_w0 + tok.to(tl.int64) * s_w1 + h * s_w2
    _unrotate_store(yk, PI, PI16, rsd, WK, woff, tm, DP, D, DC, PM1, INTERP, sink_row, sk)

    yv = _decode_side(CACHE, base, tok, tm, t, dm, CV, CVM, VO0, VW0, VO1, VW1, VO2, VW2, VSO, VC,
                      VMO0, VMW0, VMO1, VMW1, VMO2, VMW2, VMSO, D)
    _unrotate_store(yv, PI, PI16, rsd, WV, woff, tm, DP, D, DC, PM1, INTERP, sink_row, sk + s_k1)


@triton.jit(do_not_specialize=["n"])
def _tq_ws_fill_kernel(KIN, VIN, STG, SRC, DST, ROWS, CSLOT, WK, WV, n,
                       s_kt, s_kh, s_vt, s_vh, s_g0, s_g1, s_g2, s_g3, s_wt, s_wh,
                       H: tl.constexpr, D: tl.constexpr, HD: tl.constexpr, TT: tl.constexpr,
                       FROM_STG: tl.constexpr):
    """Exact tokens into the workspace: rows DST[i] (flat workspace token, block*B + offset) <- the step's K/V at
    token SRC[i] (FROM_STG 0; zeros where SRC[i] < 0), or staging slot CSLOT[ROWS[i]] at offset SRC[i]
    (FROM_STG 1). TT tokens x all heads per program; HD = next_pow2(H*D). (One launch for what were four torch
    index copies per pass.)"""
    i = tl.program_id(0) * TT + tl.arange(0, TT)
    ok = i < n
    j = tl.arange(0, HD)
    hh = j // D
    dd = j % D
    m = ok[:, None] & (hh < H)[None, :]
    src = tl.load(SRC + i, mask=ok, other=0).to(tl.int64)
    dst = tl.load(DST + i, mask=ok, other=0).to(tl.int64)
    ml = m & (src >= 0)[:, None]
    if FROM_STG:
        r = tl.load(ROWS + i, mask=ok, other=0)
        slot = tl.load(CSLOT + r, mask=ok, other=0).to(tl.int64)
        kp = STG + (slot * s_g0 + src * s_g2)[:, None] + (hh * s_g3 + dd)[None, :]
        vp = kp + s_g1
    else:
        kp = KIN + (src * s_kt)[:, None] + (hh * s_kh + dd)[None, :]
        vp = VIN + (src * s_vt)[:, None] + (hh * s_vh + dd)[None, :]
    wo = (dst * s_wt)[:, None] + (hh * s_wh + dd)[None, :]
    tl.store(WK + wo, tl.load(kp, mask=ml, other=0.0).to(WK.dtype.element_ty), mask=m)
    tl.store(WV + wo, tl.load(vp, mask=ml, other=0.0).to(WV.dtype.element_ty), mask=m)
