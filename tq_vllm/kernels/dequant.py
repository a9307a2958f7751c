"""Dequantize whole head pages into a bf16/fp16 paged workspace (original domain), Triton.

The prefill path (prefill.py) attends with vLLM's FlashAttention over these dequantized pages: one program per
(page, KV head) decodes K and V (codes -> centroids x per-token scale + block mean, QJL term for prod keys),
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
    """Rotated-domain K or V of one head page: [BP, DP] float32 (natural coordinate order, R = 1)."""
    m2 = tm[:, None] & dm[None, :]
    code = _codes(CACHE, base, tok[:, None], m2, t[None, :], 1, 0, D, O0, W0, O1, W1, O2, W2)
    y = tl.load(C32 + code, mask=m2, other=0.0) * _bf16_at(CACHE, base + SO, tok, tm)[:, None]
    if CEN:
        mc = _codes(CACHE, base, 0, dm, t, 1, 0, D, MO0, MW0, MO1, MW1, MO2, MW2)  # [DP]
        mean = tl.load(C32M + mc, mask=dm, other=0.0) * _bf16_at(CACHE, base + MSO, t * 0, dm)
        y += mean[None, :]
    return y


@triton.jit
def _unrotate_store(y, PI, PI16, rsd, W, woff, tm, DP: tl.constexpr, D: tl.constexpr, DC: tl.constexpr,
                    PM1: tl.constexpr, INTERP: tl.constexpr, sink_ok, sinkrow_ptr, tok):
    """W[woff + tok, c] = (y @ Π)[tok, c], chunk by chunk of output columns. PM1: PI16 = sqrt(D)*Π = ±1 in bf16,
    y split into bf16 high and low parts (two exact-product tensor-core passes, ~16 mantissa bits); else fp32 Π."""
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
            x = tl.dot(y, p, input_precision="ieee")
        sm = (dd * 0 + sink_ok.to(tl.int32)) > 0  # (the interpreter needs the scalar broadcast by hand)
        s0 = tl.load(sinkrow_ptr + dd, mask=sm, other=0.0).to(tl.float32)
        x = tl.where(sm[None, :] & (tok == 0)[:, None], s0[None, :], x)
        tl.store(W + woff + dd[None, :], x.to(W.dtype.element_ty), mask=tm[:, None])


@triton.jit
def _tq_dequant_kernel(
    CACHE, SRC, DST, FIRST, WK, WV, PI, PI16, SQ, CK, CV, CKM, CVM, SKV, STAG,
    rsd, n_sink, s_w0, s_w1, s_w2, s_k0, s_k1, s_k2,
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
):
    """Grid (pages, H): page SRC[i] (vLLM block id) -> workspace block DST[i]; WK, WV [blocks, B, H, D]."""
    i = tl.program_id(0)
    h = tl.program_id(1)
    blk = tl.load(SRC + i).to(tl.int64)
    dst = tl.load(DST + i).to(tl.int64)
    base = (blk * H + h) * PAGE
    tok = tl.arange(0, BP)
    tm = tok < B
    t = tl.arange(0, DP)
    dm = t < D

    sink_ok = i < 0  # a scalar False
    slot0 = i * 0
    if SINK:
        first = tl.load(FIRST + i) != 0
        tag = tl.load((CACHE + base + SINKO).to(tl.pointer_type(tl.int64)), mask=first, other=0)
        slot0 = ((tag % n_sink) + n_sink) % n_sink
        ttag = tl.load(STAG + slot0 * H + h, mask=first & (tag != 0), other=0)
        sink_ok = first & (tag != 0) & (ttag == tag)
    sk = SKV + slot0 * s_k0 + h * s_k2

    yk = _decode_side(CACHE, base, tok, tm, t, dm, CK, CKM, KO0, KW0, KO1, KW1, KO2, KW2, KSO, KC,
                      KMO0, KMW0, KMO1, KMW1, KMO2, KMW2, KMSO, D)
    if PROD:
        # + ‖e‖ sqrt(pi/2)/D * (z @ S), z = ±1 from the QJL sign bits
        m2 = tm[:, None] & dm[None, :]
        z = (_codes(CACHE, base, tok[:, None], m2, t[None, :], 1, 0, D, QJO, 1, 0, 0, 0, 0) * 2 - 1).to(tl.float32)
        sq = tl.load(SQ + t[:, None] * D + t[None, :], mask=dm[:, None] & dm[None, :], other=0.0)
        rn = _bf16_at(CACHE, base + RNO, tok, tm)
        yk += tl.dot(z, sq, input_precision="ieee") * (rn * (1.2533141373155003 / D))[:, None]
    woff = dst * s_w0 + tok.to(tl.int64)[:, None] * s_w1 + h * s_w2
    _unrotate_store(yk, PI, PI16, rsd, WK, woff, tm, DP, D, DC, PM1, INTERP, sink_ok, sk, tok)

    yv = _decode_side(CACHE, base, tok, tm, t, dm, CV, CVM, VO0, VW0, VO1, VW1, VO2, VW2, VSO, VC,
                      VMO0, VMW0, VMO1, VMW1, VMO2, VMW2, VMSO, D)
    _unrotate_store(yv, PI, PI16, rsd, WV, woff, tm, DP, D, DC, PM1, INTERP, sink_ok, sk + s_k1, tok)
