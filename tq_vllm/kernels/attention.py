"""Paged attention over TurboQuant pages (decode semantics of docs/design.md), Triton.

One program handles one KV head and all query heads of its GQA group (so a page is read once per group), for
QT query tokens of one row: M = QT*GP score columns (GP = G padded to a power of two). Scores are computed as
S^T = K_tile @ Q^T ([tokens, D] x [D, M]) and values as O^T += V_tile^T @ P^T ([D, tokens] x [tokens, M]), so the
decoded K and V tiles are the A operands of the tensor-core dots: Triton loads their *codes* (bytes) straight into
the A-operand register layout and decodes them there (no fp16 round trip through shared memory).

Compressed pages are decoded straight to centroids (fp16) in *sub-lattices*: coordinate i = R*t + r is column t of
lattice r, so each lattice reads contiguous bytes of the widest bit plane and a byte's nibbles never need a shuffle;
the rotated query is built in the same permuted order (a dot product does not care about the order of its terms).
Decoding is a `prmt` table look-up in inline PTX for 4-, 3- and 2-bit codes (lut.py), a table gather otherwise.
Per-token scales multiply the score columns after the dot (keys) or the probabilities before it (values), the
block mean is one more coded vector per page, the QJL term of "prod" keys one more ±1 matrix product with u = S·q'.

The query's own block is exact (staging for positions < ctx, the step's K/V for the rest), and so is token 0 of a
first block when the sink table holds it (its page tag matches the table entry; it is masked out of the page tile).

Two launch modes:
* split (decode rows, QT=1): grid (rows, 1, H*(NSPLIT+1)), z = h·(NSPLIT+1) + s (SPLIT_MAJOR: s·H + h); split
  s < NSPLIT covers a range of page tiles (rotated domain), split NSPLIT the exact keys (original domain); each
  writes (acc, m, l); `_tq_reduce_kernel` merges them with a log-sum-exp and rotates the page part back by Π once.
* fused (prefill / chunk rows): grid (rows, q-tiles, H); a program walks every page its queries may see, then the
  exact keys (their values rotated into the page accumulator), and writes the output itself.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .lut import GRID_OFFSET
from .hadamard import _fwht
from .store import _sink_commit, _stage_row

try:  # programmatic dependent launch (Hopper+); constexpr-gated, never traced where absent
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - a Triton without grid dependency control
    gdc_launch_dependents = gdc_wait = None

LOG2E = 1.4426950408889634
GOFF: tl.constexpr = tl.constexpr(GRID_OFFSET)  # the 4-bit asm's fp16 of a grid code = GOFF + (u - 63.5)


@triton.jit
def _bits(b, t, R: tl.constexpr, r: tl.constexpr, W: tl.constexpr):
    """Bits of lattice r, column t, from plane bytes `b` (int32) of a W-bit plane: element i = R*t + r."""
    return (b >> (((t % ((8 // W) // R)) * R + r) * W)) & ((1 << W) - 1)


@triton.jit
def _codes(ptr, base, tok, m2, t, R: tl.constexpr, r: tl.constexpr, D: tl.constexpr,
           O0: tl.constexpr, W0: tl.constexpr, O1: tl.constexpr, W1: tl.constexpr, O2: tl.constexpr,
           W2: tl.constexpr):
    b0, b1, b2 = _raw_planes(ptr, base, tok, m2, t, R, D, O0, W0, O1, W1, O2, W2)
    return _code_raw(b0, b1, b2, t, R, r, W0, W1, W2)


@triton.jit
def _dec_all(ptr, base, tok, m2, t, C16, R: tl.constexpr, D: tl.constexpr, O0: tl.constexpr, W0: tl.constexpr,
             O1: tl.constexpr, W1: tl.constexpr, O2: tl.constexpr, W2: tl.constexpr, MODE: tl.constexpr,
             ASM: tl.constexpr, mr=None, XP: tl.constexpr = 0, TDIM: tl.constexpr = 1, SG: tl.constexpr = False):
    """fp16 centroids of all R lattices of a code tensor (rows base/tok, columns t): up to 4 [N, XP] tensors.
    MODE 1: 4-bit grid codes, SG: as ±a · 2^-24 (the caller scales by its multiplier), else as GRID_BASE + u (the
    caller removes the offset and scales by delta); MODE 2: 2/3-bit
    centroids; both by prmt look-ups in inline PTX (lut.py), one load per plane. MODE 0: table gathers (any bits)."""
    if MODE == 1:  # 4-bit codes, R == 2
        b = tl.load(ptr + (base + O0 + tok * (D // 2) + t), mask=m2, other=0)
        if ASM == "":  # TQ_VLLM_LUT=emulate: the asm's output values from the table's tail (params.DeviceTables)
            bi = b.to(tl.int32) & 255
            c0 = tl.load(C16 + (32 if SG else 16) + (bi & 15))
            c1 = tl.load(C16 + (32 if SG else 16) + (bi >> 4))
        else:
            c0, c1 = tl.inline_asm_elementwise(ASM, "=r,=r,=r,=r,r", [b], dtype=(tl.float16, tl.float16),
                                               is_pure=True, pack=4)
        c2 = c0
        c3 = c1
    elif MODE == 2:  # 2/3-bit codes, R == 4
        p0 = tl.load(ptr + (base + O0 + tok * (D // 4) + t), mask=m2, other=0)
        if W1 > 0 and XP > 0:
            # the 1-bit plane byte of columns 2j, 2j+1 is loaded once (contiguous, so it is pipelined like the
            # 2-bit plane) and its nibbles interleaved in registers; `mr` masks rows, t runs along axis TDIM
            if TDIM == 1:
                th = tl.arange(0, XP // 2)[None, :]
                p1 = tl.load(ptr + (base + O1 + tok * (D // 8) + th), mask=mr & (th < D // 8), other=0)
                hh = tl.reshape(tl.join(p1 & 15, p1 >> 4), [p1.shape[0], XP])
            else:
                th = tl.arange(0, XP // 2)[:, None]
                p1 = tl.load(ptr + (base + O1 + tok * (D // 8) + th), mask=mr & (th < D // 8), other=0)
                hh = tl.reshape(tl.permute(tl.join(p1 & 15, p1 >> 4), (0, 2, 1)), [XP, p1.shape[1]])
        elif W1 > 0:
            p1 = tl.load(ptr + (base + O1 + tok * (D // 8) + t // 2), mask=m2, other=0).to(tl.int32)
            hh = ((p1 >> ((t % 2) * 4)) & 15).to(tl.uint8)
        else:
            hh = tl.zeros_like(p0)
        c0, c1, c2, c3 = tl.inline_asm_elementwise(
            ASM, "=r,=r,=r,=r,=r,=r,=r,=r,r,r", [p0, hh],
            dtype=(tl.float16, tl.float16, tl.float16, tl.float16), is_pure=True, pack=4)
    else:
        c0 = _lut(C16, _codes(ptr, base, tok, m2, t, R, 0, D, O0, W0, O1, W1, O2, W2))
        c1 = c0
        c2 = c0
        c3 = c0
        if R > 1:
            c1 = _lut(C16, _codes(ptr, base, tok, m2, t, R, 1, D, O0, W0, O1, W1, O2, W2))
        if R > 2:
            c2 = _lut(C16, _codes(ptr, base, tok, m2, t, R, 2, D, O0, W0, O1, W1, O2, W2))
            c3 = _lut(C16, _codes(ptr, base, tok, m2, t, R, 3, D, O0, W0, O1, W1, O2, W2))
    return c0, c1, c2, c3


@triton.jit
def _dec_k8(ptr, base, tok, m2, t, C16, D: tl.constexpr, O0: tl.constexpr, ASM: tl.constexpr):
    """4-bit grid codes (rows base/tok, byte columns t of the code plane) as int8 u (0..127, centroid
    delta·(u - 63.5)) for an integer MMA: two [N, D/2] tensors, element 4w + i = coordinate 8w + i, resp. 8w + 4 + i,
    so that one asm block (lut.asm_4bit_i8) turns 4 code bytes into the 4 + 4 operand bytes with no shuffle."""
    if ASM == "":  # the interpreter / TQ_VLLM_LUT=emulate: the offset form's values (1024 + u) gathered
        ta = (t // 4) * 4 + (t % 4) // 2
        sh = (t % 2) * 4
        ba = tl.load(ptr + (base + O0 + tok * (D // 2) + ta), mask=m2, other=0).to(tl.int32)
        bb = tl.load(ptr + (base + O0 + tok * (D // 2) + ta + 2), mask=m2, other=0).to(tl.int32)
        ua = tl.load(C16 + 16 + ((ba >> sh) & 15)).to(tl.float32) - 1024.0
        ub = tl.load(C16 + 16 + ((bb >> sh) & 15)).to(tl.float32) - 1024.0
        return ua.to(tl.int8), ub.to(tl.int8)
    b = tl.load(ptr + (base + O0 + tok * (D // 2) + t), mask=m2, other=0)
    return tl.inline_asm_elementwise(ASM, "=r,=r,r", [b], dtype=(tl.int8, tl.int8), is_pure=True, pack=4)


@triton.jit
def _bf16_at(ptr, off, idx, mask):
    """bf16 values at byte offset `off` (2-aligned) + 2*idx, as float32."""
    p = (ptr + off).to(tl.pointer_type(tl.bfloat16))
    return tl.load(p + idx, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _mdot(a, b, INTERP: tl.constexpr):
    """tl.dot of model-dtype operands (the CPU interpreter of Triton 3.9 mis-multiplies bf16: use fp32 there)."""
    if INTERP:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    return tl.dot(a, b)


@triton.jit
def _qrot(Q, qoff, mvalid, MAT, R: tl.constexpr, r: tl.constexpr, D: tl.constexpr, XP: tl.constexpr,
          M: tl.constexpr, DC: tl.constexpr, PM1: tl.constexpr, INTERP: tl.constexpr):
    """Lattice r of q @ MAT.T for the M query rows at Q + qoff[m]: [M, XP] float32 (columns t: MAT row R*t + r).
    PM1: MAT holds sqrt(D)*Π = ±1 in the query dtype (exact), so one 16-bit tensor-core pass with fp32
    accumulation is as exact as fp32 (the caller multiplies by 1/sqrt(D)); else MAT is fp32 (ieee dot)."""
    t = tl.arange(0, XP)
    tm = t < D // R
    acc = tl.zeros([M, XP], dtype=tl.float32)
    for c in tl.static_range(0, D, DC):
        dd = c + tl.arange(0, DC)
        q = tl.load(Q + qoff[:, None] + dd[None, :], mask=mvalid[:, None], other=0.0)
        mt = tl.load(MAT + (R * t[None, :] + r) * D + dd[:, None], mask=tm[None, :], other=0.0)  # [DC, XP]
        if PM1:
            acc += _mdot(q, mt.to(q.dtype), INTERP)
        else:
            acc += tl.dot(q.to(tl.float32), mt, input_precision="ieee")
    return acc


@triton.jit
def _qrot_had(Q, qoff, mvalid, SGN, R: tl.constexpr, D: tl.constexpr, XP: tl.constexpr, M: tl.constexpr,
              LOG: tl.constexpr, I8: tl.constexpr = False):
    """The R lattices of √D · q @ Π.T for a randomized-Hadamard Π (`_qrot` with its matrix, which this replaces):
    (q ∘ s) @ H_D with the signs s = SGN[0:D] (row 0 of √D·Π). Returns 4 tensors [M, XP] (lattices 0..3; those
    past R repeat lattice 0). I8 (R = 2): the last two are the integer-MMA key order of `_dec_k8` instead
    (element 4w + i = coordinate 8w + i, resp. 8w + 4 + i)."""
    tl.static_assert(XP * R == D)
    dq = tl.arange(0, D)
    q = tl.load(Q + qoff[:, None] + dq[None, :], mask=mvalid[:, None], other=0.0).to(tl.float32)
    y = _fwht(q * tl.load(SGN + dq).to(tl.float32)[None, :], M, D, LOG)
    if R == 1:
        return y, y, y, y
    elif R == 2:
        y0, y1 = tl.split(tl.reshape(y, [M, XP, 2]))
        if I8:
            a, b = tl.split(tl.permute(tl.reshape(y, [M, XP // 4, 2, 4]), (0, 1, 3, 2)))
            return y0, y1, tl.reshape(a, [M, XP]), tl.reshape(b, [M, XP])
        return y0, y1, y0, y0
    else:
        tl.static_assert(R == 4)
        a, b = tl.split(tl.reshape(y, [M, XP, 2, 2]))  # coordinate 4t + 2·r1 + r0: a holds r0 = 0, b r0 = 1
        y0, y2 = tl.split(a)
        y1, y3 = tl.split(b)
        return y0, y1, y2, y3


@triton.jit
def _max2(a, b, c, d):
    return tl.maximum(a, c), tl.maximum(b, d)


@triton.jit
def _lut(C16, code):
    return tl.load(C16 + code)


@triton.jit
def _vexact_acc(acc, VT_ST, VT_IN, stg_ok, in_ok, pe, PI, R: tl.constexpr, r: tl.constexpr, D: tl.constexpr,
                XP: tl.constexpr, DC: tl.constexpr, NE: tl.constexpr, INTERP: tl.constexpr, k_at, k_lo):
    """acc[XP, M] += Π_r (V^T P^T): exact values of NE keys weighted by pe [NE, M], rotated into lattice r.
    k_at >= k_lo (the caller's loop variable and its start) is always true: above head_dim 128 it masks the loads
    of Π so that they stay inside the loop. Hoisted, the R·D/DC tiles of Π live in shared memory for the whole loop
    (320 KB at head_dim 256 for 3-bit values, past the 227 KB of an H100/H200 block: the launch fails)."""
    t = tl.arange(0, XP)
    tm = t < D // R
    if D > 128:
        tm = tm & (k_at + 0 * t >= k_lo)
    for c in tl.static_range(0, D, DC):
        dd = c + tl.arange(0, DC)
        vs = tl.load(VT_ST[None, :] + dd[:, None], mask=stg_ok[None, :], other=0.0)
        vi = tl.load(VT_IN[None, :] + dd[:, None], mask=in_ok[None, :], other=0.0)
        vt = tl.where(stg_ok[None, :], vs.to(pe.dtype), vi.to(pe.dtype))  # [DC, NE]
        w = _mdot(vt, pe, INTERP)  # [DC, M] fp32
        pr = tl.load(PI + (R * t[:, None] + r) * D + dd[None, :], mask=tm[:, None], other=0.0)  # [XP, DC]
        acc += tl.dot(pr, w, input_precision="ieee")
    return acc


@triton.jit
def _raw_planes(ptr, base, tok, m2, t, R: tl.constexpr, D: tl.constexpr, O0: tl.constexpr, W0: tl.constexpr,
                O1: tl.constexpr, W1: tl.constexpr, O2: tl.constexpr, W2: tl.constexpr):
    """The bytes (int32) of up to 3 planes holding columns t of every lattice (lattices share the bytes)."""
    b0 = tl.load(ptr + (base + O0 + tok * (D * W0 // 8) + t // ((8 // W0) // R)), mask=m2, other=0).to(tl.int32)
    b1 = b0
    b2 = b0
    if W1 > 0:
        b1 = tl.load(ptr + (base + O1 + tok * (D * W1 // 8) + t // ((8 // W1) // R)), mask=m2, other=0).to(tl.int32)
    if W2 > 0:
        b2 = tl.load(ptr + (base + O2 + tok * (D * W2 // 8) + t // ((8 // W2) // R)), mask=m2, other=0).to(tl.int32)
    return b0, b1, b2


@triton.jit
def _code_raw(b0, b1, b2, t, R: tl.constexpr, r: tl.constexpr, W0: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr):
    """Code of lattice r, column t, from the plane bytes of `_raw_planes`."""
    code = _bits(b0, t, R, r, W0)
    if W1 > 0:
        code = code | (_bits(b1, t, R, r, W1) << W0)
    if W2 > 0:
        code = code | (_bits(b2, t, R, r, W2) << (W0 + W1))
    return code


@triton.jit
def _dec_raw(b0, b1, b2, t, C16, R: tl.constexpr, W0: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr):
    """fp16 centroids of all R lattices from raw plane bytes (`_raw_planes`), by table gathers."""
    c0 = _lut(C16, _code_raw(b0, b1, b2, t, R, 0, W0, W1, W2))
    c1 = c0
    c2 = c0
    c3 = c0
    if R > 1:
        c1 = _lut(C16, _code_raw(b0, b1, b2, t, R, 1, W0, W1, W2))
    if R > 2:
        c2 = _lut(C16, _code_raw(b0, b1, b2, t, R, 2, W0, W1, W2))
        c3 = _lut(C16, _code_raw(b0, b1, b2, t, R, 3, W0, W1, W2))
    return c0, c1, c2, c3


@triton.jit
def _page_base(BT_ROW, jpage, valid, h, H: tl.constexpr, PAGE: tl.constexpr):
    """Byte offset of head h's page for block-table entries `jpage` of a row (0 where not valid); any shape."""
    return (tl.load(BT_ROW + jpage, mask=valid, other=0).to(tl.int64) * H + h) * PAGE


@triton.jit
def _tile_bases(BT_ROW, it, t_hi, n_pages, h, tp, bb, pp, H: tl.constexpr, PAGE: tl.constexpr, B: tl.constexpr,
                TP: tl.constexpr, BPS: tl.constexpr, SUBT: tl.constexpr):
    """Page base offsets of page tile `it` (0 where masked): per token row [NR] and per page [TP]."""
    pg = it // SUBT
    jpage = pg * TP + tp
    tok = (it % SUBT) * BPS + bb
    rvalid = (jpage < n_pages) & (tok < B) & (jpage * 0 + it < t_hi)  # (block-shaped: the interpreter needs it)
    jp = pg * TP + pp
    pvalid = (jp < n_pages) & (jp * 0 + it < t_hi)
    return _page_base(BT_ROW, jpage, rvalid, h, H, PAGE), _page_base(BT_ROW, jp, pvalid, h, H, PAGE)


@triton.jit
def _tile_side(CACHE, base, pbase, it, t_hi, n_pages, tp, bb, pp, tK, tKm, tVT, tVmT, B: tl.constexpr,
               TP: tl.constexpr, BPS: tl.constexpr, SUBT: tl.constexpr, RK: tl.constexpr, RV: tl.constexpr,
               D: tl.constexpr, KSO: tl.constexpr, VSO: tl.constexpr,
               KC: tl.constexpr, KMO0: tl.constexpr, KMW0: tl.constexpr, KMO1: tl.constexpr, KMW1: tl.constexpr,
               KMO2: tl.constexpr, KMW2: tl.constexpr, KMSO: tl.constexpr,
               VC: tl.constexpr, VMO0: tl.constexpr, VMW0: tl.constexpr, VMO1: tl.constexpr, VMW1: tl.constexpr,
               VMO2: tl.constexpr, VMW2: tl.constexpr, VMSO: tl.constexpr):
    """The small per-token and per-page fields of page tile `it` (scales, raw mean bytes, mean scales); issued one
    tile ahead so that their global-memory latency overlaps the current tile's work."""
    pg = it // SUBT
    jpage = pg * TP + tp
    tok = (it % SUBT) * BPS + bb
    rvalid = (jpage < n_pages) & (tok < B) & (jpage * 0 + it < t_hi)
    jp = pg * TP + pp
    pvalid = (jp < n_pages) & (jp * 0 + it < t_hi)
    ks = _bf16_at(CACHE, base + KSO, tok, rvalid)
    vsc = _bf16_at(CACHE, base + VSO, tok, rvalid)
    kb0 = tl.zeros([TP, 1], dtype=tl.int32)
    kb1 = kb0
    kb2 = kb0
    kms = tl.zeros([TP], dtype=tl.float32)
    if KC:
        kb0, kb1, kb2 = _raw_planes(CACHE, pbase[:, None], 0, pvalid[:, None] & tKm, tK, RK, D, KMO0, KMW0, KMO1,
                                    KMW1, KMO2, KMW2)
        kms = _bf16_at(CACHE, pbase + KMSO, 0, pvalid)
    vb0 = tl.zeros([1, TP], dtype=tl.int32)
    vb1 = vb0
    vb2 = vb0
    vms = tl.zeros([TP], dtype=tl.float32)
    if VC:
        vb0, vb1, vb2 = _raw_planes(CACHE, pbase[None, :], 0, pvalid[None, :] & tVmT, tVT, RV, D, VMO0, VMW0, VMO1,
                                    VMW1, VMO2, VMW2)
        vms = _bf16_at(CACHE, pbase + VMSO, 0, pvalid)
    return ks, vsc, kb0, kb1, kb2, kms, vb0, vb1, vb2, vms


@triton.jit(do_not_specialize=["NSPLIT"])  # split count is a runtime int: one compile serves every batch size
def _tq_attn_kernel(
    Q, KIN, VIN, STG, CACHE, BT, QSL, SEQ, CSLOT,
    PI, PIQ, SPI, CK, CV, CKM, CVM,
    PO, PML, OUT, SKV, STAG,
    row0, sm_log2, rsd, n_sink, NSPLIT, s_k0, s_k1, s_k2,
    s_qt, s_qh, s_kt, s_kh, s_vt, s_vh,
    s_g0, s_g1, s_g2, s_g3,
    s_bt, s_ot, s_oh,
    H: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, QT: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
    B: tl.constexpr, BPS: tl.constexpr, TP: tl.constexpr, SUBT: tl.constexpr, NE: tl.constexpr,
    PAGE: tl.constexpr,
    RK: tl.constexpr, XK: tl.constexpr, RV: tl.constexpr, XV: tl.constexpr,
    KO0: tl.constexpr, KW0: tl.constexpr, KO1: tl.constexpr, KW1: tl.constexpr, KO2: tl.constexpr,
    KW2: tl.constexpr, KSO: tl.constexpr,
    VO0: tl.constexpr, VW0: tl.constexpr, VO1: tl.constexpr, VW1: tl.constexpr, VO2: tl.constexpr,
    VW2: tl.constexpr, VSO: tl.constexpr,
    KC: tl.constexpr, KMO0: tl.constexpr, KMW0: tl.constexpr, KMO1: tl.constexpr, KMW1: tl.constexpr,
    KMO2: tl.constexpr, KMW2: tl.constexpr, KMSO: tl.constexpr,
    VC: tl.constexpr, VMO0: tl.constexpr, VMW0: tl.constexpr, VMO1: tl.constexpr, VMW1: tl.constexpr,
    VMO2: tl.constexpr, VMW2: tl.constexpr, VMSO: tl.constexpr,
    PROD: tl.constexpr, QJO: tl.constexpr, RNO: tl.constexpr,
    FUSED: tl.constexpr, DC: tl.constexpr, M: tl.constexpr, NR: tl.constexpr,
    INTERP: tl.constexpr, PM1: tl.constexpr, SINK: tl.constexpr, SINKO: tl.constexpr, KMODE: tl.constexpr,
    KASM: tl.constexpr, VMODE: tl.constexpr, VASM: tl.constexpr, PF: tl.constexpr = 0,
    H1J: tl.constexpr = 1, KDEL: tl.constexpr = 1.0, VDEL: tl.constexpr = 1.0, LZ: tl.constexpr = 0,
    KSG: tl.constexpr = False, VSG: tl.constexpr = False, USED: tl.constexpr = False, QDC: tl.constexpr = 32,
    HAD: tl.constexpr = False, LOGD: tl.constexpr = 0, SPLIT_MAJOR: tl.constexpr = False, KI8: tl.constexpr = False,
    K8ASM: tl.constexpr = None, K8DEL: tl.constexpr = 1.0, PDLT: tl.constexpr = False,
):
    if PDLT:
        # (small one-wave launches, kernels._pdl: the split reduction, launched as a programmatic dependent, may
        # start now and waits at its gdc_wait for this whole grid and its writes)
        gdc_launch_dependents()
    i = tl.program_id(0)
    j = tl.program_id(1)
    z = tl.program_id(2)
    if FUSED:
        h = z
        s = 0
    elif SPLIT_MAJOR:
        # z = s·H + h: every page program is dispatched before the short exact-key programs (s = NSPLIT)
        s = z // H
        h = z % H
    else:
        h = z // (NSPLIT + 1)
        s = z % (NSPLIT + 1)
    r = row0 + i
    qs = tl.load(QSL + r)
    nq = tl.load(QSL + r + 1) - qs
    L = tl.load(SEQ + r)
    ctx = L - nq
    q0 = j * QT
    if q0 >= nq:
        return
    mm = tl.arange(0, M)
    qi = mm // GP
    g = mm % GP
    mvalid = (g < G) & (q0 + qi < nq)
    pos = ctx + q0 + qi
    own = (pos // B) * B
    p_max = ctx + tl.minimum(nq, q0 + QT) - 1
    p_min = ctx + q0
    n_pages = p_max // B
    qoff = (qs + q0 + qi).to(tl.int64) * s_qt + (h * G + g) * s_qh  # [M]

    m_i = tl.full([M], float("-inf"), tl.float32)
    l_i = tl.zeros([M], dtype=tl.float32)
    if LZ:
        # LZ: the page loop's column sums (softmax denominator, grid-offset correction) stay per token row and are
        # summed across warps once after the loop, and the tile's value-scale maximum rides in the score-maximum
        # reduction: each cross-warp reduction costs the program's warps a barrier round per tile
        l_acc = tl.zeros([NR, M], dtype=tl.float32)
        s_acc = tl.zeros([NR, M], dtype=tl.float32)
    acc0 = tl.zeros([XV, M], dtype=tl.float32)
    if RV > 1:
        acc1 = tl.zeros([XV, M], dtype=tl.float32)
    if RV > 2:
        acc2 = tl.zeros([XV, M], dtype=tl.float32)
        acc3 = tl.zeros([XV, M], dtype=tl.float32)

    # exact attention sink: token 0 of a quantized first block comes from the sink table when the page's tag
    # matches its entry (then it is masked out of the page tiles and attended as an exact key)
    sink_v = False
    slot0 = 0
    if SINK:
        has0 = n_pages > 0
        blk_0 = tl.load(BT + r.to(tl.int64) * s_bt, mask=has0, other=0).to(tl.int64)
        tag = tl.load((CACHE + (blk_0 * H + h) * PAGE + SINKO).to(tl.pointer_type(tl.int64)), mask=has0, other=0)
        slot0 = ((tag % n_sink) + n_sink) % n_sink
        ttag = tl.load(STAG + slot0 * H + h, mask=has0 & (tag != 0), other=0)  # tags [N, H] contiguous
        sink_v = has0 & (tag != 0) & (ttag == tag)

    n_tiles, tps = _split_tiles(n_pages, NSPLIT, TP, SUBT)
    if FUSED:
        t_lo = 0
        t_hi = n_tiles
        e_lo = (p_min // B) * B
    else:
        t_lo = s * tps
        t_hi = tl.where(s < NSPLIT, tl.minimum(t_lo + tps, n_tiles), t_lo)
        e_lo = tl.where(s == NSPLIT, (p_min // B) * B, p_max + 1)
        if USED:
            # a page split past the row's tiles writes nothing: the reduction does not read it (`_used_splits`)
            if (s < NSPLIT) & (t_hi <= t_lo):
                return
    if t_hi > t_lo:
        # ---- rotated, scaled query, lattice by lattice; per-column max for an fp16 operand ----
        # KI8 (4-bit grid keys, the transform): scores of the key codes by an integer MMA, int8 codes u against the
        # query rounded to int8 (kernels.md, Open)
        K8: tl.constexpr = KI8 and KMODE == 1 and HAD and RK == 2 and not PROD
        if HAD:
            h_0, h_1, h_2, h_3 = _qrot_had(Q, qoff, mvalid, PIQ, RK, D, XK, M, LOGD, K8)
            q_0 = h_0 * (sm_log2 * rsd)
        else:
            q_0 = _qrot(Q, qoff, mvalid, PIQ, RK, 0, D, XK, M, QDC, PM1, INTERP) * (sm_log2 * rsd)
        qmax = tl.max(tl.abs(q_0), axis=1)
        if RK > 1:
            if HAD:
                q_1 = h_1 * (sm_log2 * rsd)
            else:
                q_1 = _qrot(Q, qoff, mvalid, PIQ, RK, 1, D, XK, M, QDC, PM1, INTERP) * (sm_log2 * rsd)
            qmax = tl.maximum(qmax, tl.max(tl.abs(q_1), axis=1))
        if RK > 2:
            if HAD:
                q_2 = h_2 * (sm_log2 * rsd)
                q_3 = h_3 * (sm_log2 * rsd)
            else:
                q_2 = _qrot(Q, qoff, mvalid, PIQ, RK, 2, D, XK, M, QDC, PM1, INTERP) * (sm_log2 * rsd)
                q_3 = _qrot(Q, qoff, mvalid, PIQ, RK, 3, D, XK, M, QDC, PM1, INTERP) * (sm_log2 * rsd)
            qmax = tl.maximum(qmax, tl.maximum(tl.max(tl.abs(q_2), axis=1), tl.max(tl.abs(q_3), axis=1)))
        qsc = tl.where(qmax > 0, qmax, 1.0)
        if K8:
            # q·127/qsc rounded: |q8| <= 127; the scores are (2·u·q8 - 127·Σq8)·(delta/254)·ks, times qsc below
            qa8 = tl.floor(h_2 * (sm_log2 * rsd) / qsc[:, None] * 127.0 + 0.5)
            qb8 = tl.floor(h_3 * (sm_log2 * rsd) / qsc[:, None] * 127.0 + 0.5)
            sum8 = (tl.sum(qa8, axis=1) + tl.sum(qb8, axis=1)).to(tl.int32)
            q8Ta = tl.trans(qa8.to(tl.int8))
            q8Tb = tl.trans(qb8.to(tl.int8))
        qT0 = tl.trans((q_0 / qsc[:, None]).to(tl.float16))
        if RK > 1:
            qT1 = tl.trans((q_1 / qsc[:, None]).to(tl.float16))
        if RK > 2:
            qT2 = tl.trans((q_2 / qsc[:, None]).to(tl.float16))
            qT3 = tl.trans((q_3 / qsc[:, None]).to(tl.float16))
        if KMODE == 1 and not KSG:
            # grid codes decode to GOFF + (u - 63.5): remove GOFF·Σq once per column (qT is exact fp16)
            kcorr = (tl.sum(qT0.to(tl.float32), axis=0) + tl.sum(qT1.to(tl.float32), axis=0)) * GOFF
        if PROD:
            u_0 = _qrot(Q, qoff, mvalid, SPI, RK, 0, D, XK, M, DC, False, INTERP)
            umax = tl.max(tl.abs(u_0), axis=1)
            if RK > 1:
                u_1 = _qrot(Q, qoff, mvalid, SPI, RK, 1, D, XK, M, DC, False, INTERP)
                umax = tl.maximum(umax, tl.max(tl.abs(u_1), axis=1))
            if RK > 2:
                u_2 = _qrot(Q, qoff, mvalid, SPI, RK, 2, D, XK, M, DC, False, INTERP)
                u_3 = _qrot(Q, qoff, mvalid, SPI, RK, 3, D, XK, M, DC, False, INTERP)
                umax = tl.maximum(umax, tl.maximum(tl.max(tl.abs(u_2), axis=1), tl.max(tl.abs(u_3), axis=1)))
            usc = tl.where(umax > 0, umax, 1.0)
            uT0 = tl.trans((u_0 / usc[:, None]).to(tl.float16))
            if RK > 1:
                uT1 = tl.trans((u_1 / usc[:, None]).to(tl.float16))
            if RK > 2:
                uT2 = tl.trans((u_2 / usc[:, None]).to(tl.float16))
                uT3 = tl.trans((u_3 / usc[:, None]).to(tl.float16))
            # sqrt(pi/2)/D * (S q') . sign, in the same log2 units as the scores
            usc = usc * (1.2533141373155003 / D) * sm_log2
        # the joined 1-bit plane nibbles decode wrongly on the GPU in the split launch at 16 lattice columns (3-bit
        # codes, head_dim 64: tests/test_kernels.py::test_gpu_other_shapes, H200, Triton 3.6; found 2026-11-28, the
        # fused launch and 32+ columns pass); those take one byte load per column
        HJ16: tl.constexpr = 1 if (FUSED or (XK >= 32 and XV >= 32)) else 0
        tK = tl.arange(0, XK)[None, :]
        tKm = tK < D // RK
        tVT = tl.arange(0, XV)[:, None]  # values are decoded transposed, [XV, tokens]: the dot's A operand
        tVmT = tVT < D // RV
        nr = tl.arange(0, NR)
        tp = nr // BPS
        bb = nr % BPS
        pp = tl.arange(0, TP)
        bt_row = BT + r.to(tl.int64) * s_bt
        if PF:
            # small fields one tile ahead, their page bases two tiles ahead (no dependent load inside a tile)
            sb_c, spb_c = _tile_bases(bt_row, t_lo, t_hi, n_pages, h, tp, bb, pp, H, PAGE, B, TP, BPS, SUBT)
            sb_n, spb_n = _tile_bases(bt_row, t_lo + 1, t_hi, n_pages, h, tp, bb, pp, H, PAGE, B, TP, BPS, SUBT)
            ks, vsc, kb0, kb1, kb2, kms, vb0, vb1, vb2, vms = _tile_side(
                CACHE, sb_c, spb_c, t_lo, t_hi, n_pages, tp, bb, pp, tK, tKm, tVT, tVmT, B, TP, BPS, SUBT, RK, RV, D,
                KSO, VSO, KC, KMO0, KMW0, KMO1, KMW1, KMO2, KMW2, KMSO, VC, VMO0, VMW0, VMO1, VMW1, VMO2, VMW2, VMSO)
        for it in range(t_lo, t_hi):
            pg = it // SUBT
            sub = it % SUBT
            jpage = pg * TP + tp
            tok = sub * BPS + bb
            rvalid = (jpage < n_pages) & (tok < B)
            if LZ:
                # page bases loaded in the two shapes the code loads use (no layout conversion between them)
                b2 = _page_base(bt_row, jpage[:, None], rvalid[:, None], h, H, PAGE)
                bT = _page_base(bt_row, jpage[None, :], rvalid[None, :], h, H, PAGE)
                if PROD:
                    base = _page_base(bt_row, jpage, rvalid, h, H, PAGE)
            else:
                base = _page_base(bt_row, jpage, rvalid, h, H, PAGE)
                b2 = base[:, None]
                bT = base[None, :]
            t2 = tok[:, None]
            m2 = rvalid[:, None]
            if not PF:
                sb_c, spb_c = _tile_bases(bt_row, it, t_hi, n_pages, h, tp, bb, pp, H, PAGE, B, TP, BPS, SUBT)
                ks, vsc, kb0, kb1, kb2, kms, vb0, vb1, vb2, vms = _tile_side(
                    CACHE, sb_c, spb_c, it, t_hi, n_pages, tp, bb, pp, tK, tKm, tVT, tVmT, B, TP, BPS, SUBT, RK, RV,
                    D, KSO, VSO, KC, KMO0, KMW0, KMO1, KMW1, KMO2, KMW2, KMSO, VC, VMO0, VMW0, VMO1, VMW1, VMO2, VMW2,
                    VMSO)
            # ---- keys: centroid dot products, scaled per token ----
            if K8:
                ka8, kb8 = _dec_k8(CACHE, b2, t2, m2 & tKm, tK, CK, D, KO0, K8ASM)
                xi = tl.dot(ka8, q8Ta, out_dtype=tl.int32) + tl.dot(kb8, q8Tb, out_dtype=tl.int32)
                sc = (xi * 2 - sum8[None, :] * 127).to(tl.float32) * (ks * (K8DEL / 254.0))[:, None]
            else:
                k0_, k1_, k2_, k3_ = _dec_all(CACHE, b2, t2, m2 & tKm, tK, CK, RK, D, KO0, KW0, KO1, KW1, KO2, KW2,
                                              KMODE, KASM, m2, XK * H1J * HJ16, 1, KSG)
                x = tl.dot(k0_, qT0)
                if RK > 1:
                    x += tl.dot(k1_, qT1)
                if RK > 2:
                    x += tl.dot(k2_, qT2)
                    x += tl.dot(k3_, qT3)
                if KMODE == 1 and KSG:  # signed grid codes: the dot is proportional to the centroids' (KDEL)
                    sc = x * (ks * KDEL)[:, None]
                elif KMODE == 1:
                    sc = (x - kcorr[None, :]) * KDEL * ks[:, None]
                else:
                    sc = x * ks[:, None]
            if KC:
                n0_, n1_, n2_, n3_ = _dec_raw(kb0, kb1, kb2, tK, CKM, RK, KMW0, KMW1, KMW2)
                y = tl.dot(n0_, qT0)
                if RK > 1:
                    y += tl.dot(n1_, qT1)
                if RK > 2:
                    y += tl.dot(n2_, qT2)
                    y += tl.dot(n3_, qT3)
                y = y * kms[:, None]  # [TP, M]
                sc += tl.reshape(tl.broadcast_to(y[:, None, :], [TP, BPS, M]), [NR, M])
            sc = sc * qsc[None, :]
            if PROD:
                zd = tl.dot((_codes(CACHE, b2, t2, m2 & tKm, tK, RK, 0, D, QJO, 1, 0, 0, 0, 0) * 2 - 1
                             ).to(tl.float16), uT0)
                if RK > 1:
                    zd += tl.dot((_codes(CACHE, b2, t2, m2 & tKm, tK, RK, 1, D, QJO, 1, 0, 0, 0, 0) * 2 - 1
                                  ).to(tl.float16), uT1)
                if RK > 2:
                    zd += tl.dot((_codes(CACHE, b2, t2, m2 & tKm, tK, RK, 2, D, QJO, 1, 0, 0, 0, 0) * 2 - 1
                                  ).to(tl.float16), uT2)
                    zd += tl.dot((_codes(CACHE, b2, t2, m2 & tKm, tK, RK, 3, D, QJO, 1, 0, 0, 0, 0) * 2 - 1
                                  ).to(tl.float16), uT3)
                rn = _bf16_at(CACHE, base + RNO, tok, rvalid)
                sc += zd * rn[:, None] * usc[None, :]
            vis = m2 & mvalid[None, :] & (jpage[:, None] < (pos // B)[None, :])
            if SINK:
                vis = vis & ~(sink_v & (jpage == 0) & (tok == 0))[:, None]
            sc = tl.where(vis, sc, float("-inf"))
            # ---- online softmax over the token axis ----
            if LZ:
                t_max, vmx = tl.reduce((sc, tl.broadcast_to(tl.abs(vsc)[:, None], [NR, M])), 0, _max2)
                m_new = tl.maximum(m_i, t_max)
            else:
                m_new = tl.maximum(m_i, tl.max(sc, axis=0))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_use)
            p = tl.exp2(sc - m_use[None, :])  # [NR, M]
            if LZ:
                l_acc = l_acc * alpha[None, :] + p
            else:
                l_i = l_i * alpha + tl.sum(p, axis=0)
            m_i = m_new
            # ---- values: per-token scale folded into P (normalised to keep fp16 in range) ----
            if LZ:
                vmx = tl.where(vmx > 0, vmx, 1.0)  # [M], the same in every column
                pv = (p * vsc[:, None] / vmx[None, :]).to(tl.float16)
            else:
                vmx = tl.max(tl.abs(vsc), axis=0)
                vmx = tl.where(vmx > 0, vmx, 1.0)
                pv = (p * (vsc / vmx)[:, None]).to(tl.float16)
            if VC:
                vmm = tl.max(tl.abs(vms), axis=0)
                vmm = tl.where(vmm > 0, vmm, 1.0)
                vms_t = tl.reshape(tl.broadcast_to((vms / vmm)[:, None], [TP, BPS]), [NR])
                pm = (p * vms_t[:, None]).to(tl.float16)
            tokT = tok[None, :]
            mT = rvalid[None, :] & tVmT
            v0_, v1_, v2_, v3_ = _dec_all(CACHE, bT, tokT, mT, tVT, CV, RV, D, VO0, VW0, VO1, VW1, VO2, VW2,
                                          VMODE, VASM, rvalid[None, :], XV * H1J * HJ16, 0, VSG)
            if VMODE == 1 and (VSG or LZ):  # grid values: the signed form has no offset term
                if not VSG:  # offset form: GOFF·Σpv (the fp16 pv the dots see) is removed after the loop
                    s_acc = s_acc * alpha[None, :] + pv.to(tl.float32) * vmx[None, :]
                if LZ:
                    vfac = (vmx * VDEL)[None, :]  # [1, M]
                else:
                    vfac = vmx * VDEL  # one value-scale maximum for the tile (a scalar)
                acc0 = acc0 * alpha[None, :] + tl.dot(v0_, pv) * vfac
                acc1 = acc1 * alpha[None, :] + tl.dot(v1_, pv) * vfac
            elif VMODE == 1:  # grid codes (R == 2): remove GOFF·Σpv, with the fp16 pv the dots see
                vcs = tl.sum(pv.to(tl.float32), axis=0) * GOFF
                acc0 = acc0 * alpha[None, :] + (tl.dot(v0_, pv) - vcs[None, :]) * (vmx * VDEL)
                acc1 = acc1 * alpha[None, :] + (tl.dot(v1_, pv) - vcs[None, :]) * (vmx * VDEL)
            else:
                acc0 = acc0 * alpha[None, :] + tl.dot(v0_, pv) * vmx
                if RV > 1:
                    acc1 = acc1 * alpha[None, :] + tl.dot(v1_, pv) * vmx
                if RV > 2:
                    acc2 = acc2 * alpha[None, :] + tl.dot(v2_, pv) * vmx
                    acc3 = acc3 * alpha[None, :] + tl.dot(v3_, pv) * vmx
            if VC:
                m0_, m1_, m2_, m3_ = _dec_raw(vb0, vb1, vb2, tVT, CVM, RV, VMW0, VMW1, VMW2)  # [XV, TP]
                acc0 += tl.dot(tl.reshape(tl.broadcast_to(m0_[:, :, None], [XV, TP, BPS]), [XV, NR]), pm) * vmm
                if RV > 1:
                    acc1 += tl.dot(tl.reshape(tl.broadcast_to(m1_[:, :, None], [XV, TP, BPS]), [XV, NR]), pm) * vmm
                if RV > 2:
                    acc2 += tl.dot(tl.reshape(tl.broadcast_to(m2_[:, :, None], [XV, TP, BPS]), [XV, NR]), pm) * vmm
                    acc3 += tl.dot(tl.reshape(tl.broadcast_to(m3_[:, :, None], [XV, TP, BPS]), [XV, NR]), pm) * vmm
            if PF:
                # issue the next tile's small fields and the page bases of the tile after it (used next round)
                ks, vsc, kb0, kb1, kb2, kms, vb0, vb1, vb2, vms = _tile_side(
                    CACHE, sb_n, spb_n, it + 1, t_hi, n_pages, tp, bb, pp, tK, tKm, tVT, tVmT, B, TP, BPS, SUBT, RK,
                    RV, D, KSO, VSO, KC, KMO0, KMW0, KMO1, KMW1, KMO2, KMW2, KMSO, VC, VMO0, VMW0, VMO1, VMW1, VMO2,
                    VMW2, VMSO)
                sb_n, spb_n = _tile_bases(bt_row, it + 2, t_hi, n_pages, h, tp, bb, pp, H, PAGE, B, TP, BPS, SUBT)
        if LZ:
            l_i = tl.sum(l_acc, axis=0)
            if VMODE == 1 and not VSG:
                vcs = tl.sum(s_acc, axis=0) * (GOFF * VDEL)
                acc0 -= vcs[None, :]
                acc1 -= vcs[None, :]

    # ---- own blocks, exact: staging (positions < ctx) and this step's K/V (positions >= ctx) ----
    cslot = tl.load(CSLOT + r).to(tl.int64)
    cb = (ctx // B) * B
    dd = tl.arange(0, DP)
    dm = dd < D
    qraw = tl.load(Q + qoff[:, None] + dd[None, :], mask=mvalid[:, None] & dm[None, :], other=0.0)
    qT = tl.trans(qraw)  # [DP, M] model dtype
    stg_k = STG + cslot * s_g0 + h * s_g3
    stg_v = stg_k + s_g1
    accx = tl.zeros([DP, M], dtype=tl.float32)  # split mode: exact values in the original domain
    if SINK:
        if FUSED:
            do_sink = sink_v
        else:
            do_sink = sink_v & (s == NSPLIT)
        if do_sink:
            sk = SKV + slot0 * s_k0 + h * s_k2
            k0 = tl.load(sk + dd, mask=dm, other=0.0).to(tl.float32)
            v0 = tl.load(sk + s_k1 + dd, mask=dm, other=0.0).to(tl.float32)
            s0 = tl.sum(qraw.to(tl.float32) * k0[None, :], axis=1) * sm_log2
            s0 = tl.where(mvalid & (pos // B > 0), s0, float("-inf"))
            m_new = tl.maximum(m_i, s0)
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_use)
            p0 = tl.exp2(s0 - m_use)
            l_i = l_i * alpha + p0
            m_i = m_new
            if FUSED:
                tv0 = tl.arange(0, XV)
                tvm0 = (tv0 < D // RV)[:, None] & dm[None, :]
                pr = tl.load(PI + (RV * tv0[:, None] + 0) * D + dd[None, :], mask=tvm0, other=0.0)
                acc0 = acc0 * alpha[None, :] + tl.sum(pr * v0[None, :], axis=1)[:, None] * p0[None, :]
                if RV > 1:
                    pr = tl.load(PI + (RV * tv0[:, None] + 1) * D + dd[None, :], mask=tvm0, other=0.0)
                    acc1 = acc1 * alpha[None, :] + tl.sum(pr * v0[None, :], axis=1)[:, None] * p0[None, :]
                if RV > 2:
                    pr = tl.load(PI + (RV * tv0[:, None] + 2) * D + dd[None, :], mask=tvm0, other=0.0)
                    acc2 = acc2 * alpha[None, :] + tl.sum(pr * v0[None, :], axis=1)[:, None] * p0[None, :]
                    pr = tl.load(PI + (RV * tv0[:, None] + 3) * D + dd[None, :], mask=tvm0, other=0.0)
                    acc3 = acc3 * alpha[None, :] + tl.sum(pr * v0[None, :], axis=1)[:, None] * p0[None, :]
            else:
                accx = accx * alpha[None, :] + v0[:, None] * p0[None, :]
    for k0 in tl.range(e_lo, p_max + 1, NE, num_stages=1):  # runs once per decode row: no pipelining buffers
        kk = k0 + tl.arange(0, NE)
        kval = kk <= p_max
        st_ok = kval & (kk < ctx)
        in_ok = kval & (kk >= ctx)
        st_off = (kk - cb).to(tl.int64) * s_g2
        ink = (qs + kk - ctx).to(tl.int64)
        ksv = tl.load(stg_k + st_off[:, None] + dd[None, :], mask=st_ok[:, None] & dm[None, :], other=0.0)
        kiv = tl.load(KIN + ink[:, None] * s_kt + h * s_kh + dd[None, :], mask=in_ok[:, None] & dm[None, :],
                      other=0.0)
        kx = tl.where(st_ok[:, None], ksv.to(qT.dtype), kiv.to(qT.dtype))  # [NE, DP]
        se = _mdot(kx, qT, INTERP) * sm_log2  # [NE, M]
        vis = kval[:, None] & mvalid[None, :] & (kk[:, None] >= own[None, :]) & (kk[:, None] <= pos[None, :])
        se = tl.where(vis, se, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(se, axis=0))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(se - m_use[None, :])
        l_i = l_i * alpha + tl.sum(p, axis=0)
        m_i = m_new
        pe = p.to(qT.dtype)
        vt_st = stg_v + st_off
        vt_in = VIN + ink * s_vt + h * s_vh
        if FUSED:
            acc0 = _vexact_acc(acc0 * alpha[None, :], vt_st, vt_in, st_ok, in_ok, pe, PI, RV, 0, D, XV, DC, NE,
                               INTERP, k0, e_lo)
            if RV > 1:
                acc1 = _vexact_acc(acc1 * alpha[None, :], vt_st, vt_in, st_ok, in_ok, pe, PI, RV, 1, D, XV, DC, NE,
                                   INTERP, k0, e_lo)
            if RV > 2:
                acc2 = _vexact_acc(acc2 * alpha[None, :], vt_st, vt_in, st_ok, in_ok, pe, PI, RV, 2, D, XV, DC, NE,
                                   INTERP, k0, e_lo)
                acc3 = _vexact_acc(acc3 * alpha[None, :], vt_st, vt_in, st_ok, in_ok, pe, PI, RV, 3, D, XV, DC, NE,
                                   INTERP, k0, e_lo)
        else:
            vs_ = tl.load(vt_st[None, :] + dd[:, None], mask=st_ok[None, :] & dm[:, None], other=0.0)
            vi_ = tl.load(vt_in[None, :] + dd[:, None], mask=in_ok[None, :] & dm[:, None], other=0.0)
            vt = tl.where(st_ok[None, :], vs_.to(pe.dtype), vi_.to(pe.dtype))  # [DP, NE]
            accx = accx * alpha[None, :] + _mdot(vt, pe, INTERP)

    tv = tl.arange(0, XV)
    tvm = tv < D // RV
    if FUSED:
        # out = (acc' / l) · Π, written per chunk of the head dim
        lsafe = tl.where(l_i > 0, l_i, 1.0)
        otok = (qs + q0 + qi).to(tl.int64) * s_ot + (h * G + g) * s_oh
        for c in tl.static_range(0, D, DC):
            dd = c + tl.arange(0, DC)
            pr = tl.load(PI + (RV * tv[None, :] + 0) * D + dd[:, None], mask=tvm[None, :], other=0.0)  # [DC, XV]
            o = tl.dot(pr, acc0, input_precision="ieee")
            if RV > 1:
                pr = tl.load(PI + (RV * tv[None, :] + 1) * D + dd[:, None], mask=tvm[None, :], other=0.0)
                o += tl.dot(pr, acc1, input_precision="ieee")
            if RV > 2:
                pr = tl.load(PI + (RV * tv[None, :] + 2) * D + dd[:, None], mask=tvm[None, :], other=0.0)
                o += tl.dot(pr, acc2, input_precision="ieee")
                pr = tl.load(PI + (RV * tv[None, :] + 3) * D + dd[:, None], mask=tvm[None, :], other=0.0)
                o += tl.dot(pr, acc3, input_precision="ieee")
            o = o / lsafe[None, :]  # [DC, M]
            tl.store(OUT + otok[None, :] + dd[:, None], o.to(OUT.dtype.element_ty), mask=mvalid[None, :])
    else:
        # partials: PO [rows, H, NSPLIT+1, GP, D] (rotated domain, natural coordinate order), PML [.., 2, GP]
        # split NSPLIT (the exact own block) is in the original domain, the others in the rotated one
        pidx = ((i * H + h) * (NSPLIT + 1) + s).to(tl.int64)
        po = PO + pidx * (GP * D) + mm[None, :] * D
        if s == NSPLIT:
            tl.store(po + dd[:, None], accx, mask=dm[:, None])
        else:
            tl.store(po + RV * tv[:, None] + 0, acc0, mask=tvm[:, None])
            if RV > 1:
                tl.store(po + RV * tv[:, None] + 1, acc1, mask=tvm[:, None])
            if RV > 2:
                tl.store(po + RV * tv[:, None] + 2, acc2, mask=tvm[:, None])
                tl.store(po + RV * tv[:, None] + 3, acc3, mask=tvm[:, None])
        tl.store(PML + pidx * (2 * GP) + mm, m_i)
        tl.store(PML + pidx * (2 * GP) + GP + mm, l_i)


@triton.jit
def _split_tiles(n_pages, NSPLIT, TPG: tl.constexpr, SUBT: tl.constexpr):
    """(page tiles of a row over n_pages pages, tiles per split): page split s of NSPLIT covers tiles
    [s*tps, min((s+1)*tps, n_tiles)). TPG pages per tile, SUBT tiles per page group (`kernels._tile_cfg`). The decode
    kernel and the split reduction (`_used_splits`) both read it, so they agree on which splits hold tiles."""
    n_tiles = tl.cdiv(n_pages, TPG) * SUBT
    return n_tiles, tl.maximum(tl.cdiv(n_tiles, NSPLIT), 1)


@triton.jit
def _used_splits(seq_len, NSPLIT, B: tl.constexpr, TPG: tl.constexpr, SUBT: tl.constexpr):
    """Page splits (of NSPLIT) of a decode row of `seq_len` tokens that hold a tile: s holds one iff
    s < cdiv(n_tiles, tps) (`_split_tiles`; a decode row's pages are those before its last token's block)."""
    n_tiles, tps = _split_tiles((seq_len - 1) // B, NSPLIT, TPG, SUBT)
    return tl.cdiv(n_tiles, tps)


@triton.jit(do_not_specialize=["NS1", "nd", "num_qb", "n_sink"])
def _tq_reduce_kernel(PO, PML, PI, QSL, OUT, row0, nd, s_ot, s_oh, NS1, rsd,
                      KIN, VIN, STG, SEQ, OSLOT, s_kt, s_kh, s_vt, s_vh, s_g0, s_g1, s_g2, s_g3,
                      QBR, QBI, num_qb, PKV, PTAG, SKV, STAG, n_sink, s_p0, s_p1, s_p2, s_k0, s_k1, s_k2,
                      H: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
                      S1P: tl.constexpr, DC: tl.constexpr, RB: tl.constexpr = 1, PM1: tl.constexpr = False,
                      INTERP: tl.constexpr = False, STAGE: tl.constexpr = False, B: tl.constexpr = 16,
                      BP: tl.constexpr = 16, COMMIT: tl.constexpr = False, CH: tl.constexpr = 16,
                      USED: tl.constexpr = False, TPG: tl.constexpr = 1, SUBT: tl.constexpr = 1,
                      HAD: tl.constexpr = False, LOGD: tl.constexpr = 0, SC: tl.constexpr = 1,
                      PDLW: tl.constexpr = False):
    """Log-sum-exp merge of the split partials of RB decode rows of one KV head (grid (cdiv(nd, RB), H)): partials
    0..NS1-2 (pages, rotated domain) are summed and rotated back by Π once; partial NS1-1 (the exact own block) is
    already unrotated. The RB rows' GP heads are the RG = RB*GP columns of one product with Π (Π read once).
    PM1: PI holds sqrt(D)*Π = ±1 in bf16 (exact) and the fp32 sum is split into three bf16 parts (24 bits), so three
    tensor-core products with fp32 accumulation give the fp32 product (times rsd); else PI is fp32 Π (FMA product).
    STAGE (steps where every row decodes, row0 = 0): the program also does the staging launch's work for its rows
    (`store._stage_row`) and, COMMIT, the pending sink entries p, p + P, ... (`store._sink_commit`): one launch
    fewer per layer, in the same order of effects (after the attention).
    USED: only the page partials a row's context reaches are read (`_used_splits`; the decode launch with USED
    writes no others). In CUDA graphs the split count comes from max_model_len, so most are empty at short contexts.
    HAD (Π = H·diag(s)/√D, `DeviceTables.had`): the page partials are summed SC splits at a time over the whole
    head dim, then rotated back by a Walsh-Hadamard transform and the signs of PI's row 0 (times rsd = 1/√D).
    PDLW: launched as a programmatic dependent of the decode launch: wait for it (and its writes) before any global
    access (the staging copy overwrites slots the decode reads)."""
    if PDLW:
        gdc_wait()
    h = tl.program_id(1)
    if STAGE:
        if COMMIT:
            _sink_commit(tl.program_id(0), tl.num_programs(0), h, QBR, QBI, num_qb, PKV, PTAG, SKV, STAG, n_sink,
                         s_p0, s_p1, s_p2, s_k0, s_k1, s_k2, H, D, DP, CH)
        for j in tl.static_range(RB):
            rj = tl.program_id(0) * RB + j
            if rj < nd:
                _stage_row(rj, h, KIN, VIN, STG, QSL, SEQ, OSLOT, s_kt, s_kh, s_vt, s_vh, s_g0, s_g1, s_g2, s_g3,
                           D, DP, B, BP)
    n = tl.arange(0, RB * GP)
    gg = n % GP
    i = tl.program_id(0) * RB + n // GP  # decode row of each column
    r = row0 + i
    iv = i < nd
    qs = tl.load(QSL + r, mask=iv, other=0)
    nq = tl.load(QSL + r + 1, mask=iv, other=0) - qs
    ok = iv & (nq > 0)
    sidx = tl.arange(0, S1P)
    sv = sidx < NS1
    pbase = ((i * H + h) * NS1).to(tl.int64)  # [RG]
    ml = PML + (pbase[None, :] + sidx[:, None]) * (2 * GP) + gg[None, :]  # [S1P, RG]
    m2 = sv[:, None] & ok[None, :]
    if USED:
        n_used = _used_splits(tl.load(SEQ + r, mask=iv, other=1), NS1 - 1, B, TPG, SUBT)  # [RG]
        m2 = m2 & ((sidx[:, None] < n_used[None, :]) | (sidx[:, None] == NS1 - 1))
    m_s = tl.load(ml, mask=m2, other=float("-inf"))
    l_s = tl.load(ml + GP, mask=m2, other=0.0)
    m = tl.max(m_s, axis=0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(m_s - m[None, :])  # [S1P, RG]
    w = tl.where(m2, w, 0.0)
    lt = tl.sum(w * l_s, axis=0)
    lt = tl.where(lt > 0, lt, 1.0)
    dd = tl.arange(0, DP)
    dm = dd < D
    w_x = tl.sum(tl.where((sidx == NS1 - 1)[:, None], w, 0.0), axis=0)  # [RG] weight of the exact partial
    out = tl.load(PO + ((pbase + NS1 - 1) * GP + gg)[:, None] * D + dd[None, :], mask=ok[:, None] & dm[None, :],
                  other=0.0)
    out = out * w_x[:, None]
    if HAD:
        # Π = H·diag(s)/√D: the weighted page sum, split chunk by split chunk ([SC, RG, D] tiles), then one
        # Walsh-Hadamard transform and the signs (row 0 of PI) in place of a product with Π
        o = tl.zeros([RB * GP, DP], dtype=tl.float32)
        for c in tl.static_range(0, S1P, SC):
            sc = c + tl.arange(0, SC)
            mc = (sc < NS1 - 1)[:, None] & ok[None, :]
            if USED:
                mc = mc & (sc[:, None] < n_used[None, :])
            mlc = PML + (pbase[None, :] + sc[:, None]) * (2 * GP) + gg[None, :]
            wc = tl.where(mc, tl.exp2(tl.load(mlc, mask=mc, other=float("-inf")) - m[None, :]), 0.0)  # [SC, RG]
            po = PO + ((pbase[None, :, None] + sc[:, None, None]) * GP + gg[None, :, None]) * D + dd[None, None, :]
            o += tl.sum(tl.load(po, mask=mc[:, :, None], other=0.0) * wc[:, :, None], axis=0)
        sg = tl.where(tl.load(PI + dd).to(tl.float32) > 0, rsd, -rsd)  # (bf16 `> 0`: wrong in the interpreter)
        out += _fwht(o, RB * GP, DP, LOGD) * sg[None, :]
    else:
        wr = tl.where((sidx < NS1 - 1)[:, None], w, 0.0)
        for c in tl.static_range(0, D, DC):
            dc = c + tl.arange(0, DC)
            po = PO + ((pbase[None, :, None] + sidx[:, None, None]) * GP + gg[None, :, None]) * D + dc[None, None, :]
            o = tl.sum(tl.load(po, mask=((sidx < NS1 - 1)[:, None] & m2)[:, :, None], other=0.0)
                       * wr[:, :, None], axis=0)  # [RG, DC]
            pr = tl.load(PI + dc[:, None] * D + dd[None, :], mask=dm[None, :], other=0.0)  # [DC, DP]
            if PM1:
                o1 = o.to(tl.bfloat16)
                r1 = o - o1.to(tl.float32)
                o2 = r1.to(tl.bfloat16)
                o3 = (r1 - o2.to(tl.float32)).to(tl.bfloat16)
                out += (_mdot(o1, pr, INTERP) + _mdot(o2, pr, INTERP) + _mdot(o3, pr, INTERP)) * rsd
            else:
                out += tl.dot(o, pr, input_precision="ieee")
    out = out / lt[:, None]
    optr = OUT + qs.to(tl.int64)[:, None] * s_ot + (h * G + gg)[:, None] * s_oh + dd[None, :]
    tl.store(optr, out.to(OUT.dtype.element_ty), mask=(ok & (gg < G))[:, None] & dm[None, :])
