"""Fused store: gather the exact tokens of every block completed in a step, code them, write the head pages.

One program per (completed block, KV head) writes the whole head page (both K and V, means, scales, QJL,
zero padding), exactly as `PageLayout` / `LayerCodec.encode_blocks` do:
  rotate (y = x @ Π.T, tensor cores, tf32x3 ~ fp32; the product's columns permuted so that a thread holds
  consecutive dims), block mean of y (centered kinds) coded with the mean codebook, the robust norm by a power of
  two per row, codes = bucketize(y/‖y‖, boundaries) (on the GPU from a cell table, code and centroid in one asm
  block; counted from |u| in the interpreter), least-squares or norm scale rounded to bf16, bit planes packed
  token-major (8 codes to a word); prod keys add sign(S·e) and ‖e‖.
Entries of `qb_row` < 0 are skipped, so a caller may pad the list to a fixed length (CUDA graphs).
"""
from __future__ import annotations

import struct

import triton
import triton.language as tl


@triton.jit
def _load_rows(X, s_xt, s_xh, STGK, s_g2, qs, ctx, pos, tok, tvalid, h, dd, dmask):
    """Exact rows: staging (slot row pointers STGK [T]) for positions < ctx, the step input for the rest.
    qs, ctx, pos, tok, tvalid: [T] per-row vectors. Returns [T, len(dd)] fp32."""
    from_stg = tvalid & (pos < ctx)
    from_in = tvalid & (pos >= ctx)
    m2 = dmask[None, :]
    xs = tl.load(STGK[:, None] + tok.to(tl.int64)[:, None] * s_g2 + dd[None, :], mask=from_stg[:, None] & m2,
                 other=0.0)
    xi = tl.load(X + (qs + pos - ctx).to(tl.int64)[:, None] * s_xt + h * s_xh + dd[None, :],
                 mask=from_in[:, None] & m2, other=0.0)
    return tl.where(from_stg[:, None], xs.to(tl.float32), xi.to(tl.float32))


@triton.jit
def _load_rows_raw(X, s_xt, s_xh, STGK, s_g2, qs, ctx, blk0, tok, tvalid, h, dd, dmask, DMASK: tl.constexpr):
    """`_load_rows` of positions blk0 + tok in the input's own dtype, where the staging has it too: one load through a
    per-row pointer (staging or step input) instead of a load from each and a select in fp32; DMASK: mask the columns
    (dd may pass D). blk0, qs, ctx may be scalars (one block per program): the 64-bit parts are then computed once."""
    if X.dtype.element_ty == STGK.dtype.element_ty:
        xb = X + h * s_xh + (qs - ctx + blk0).to(tl.int64) * s_xt  # (tok * stride: < B rows, 32-bit)
        rp = tl.where(blk0 + tok < ctx, STGK + tok * s_g2, xb + tok * s_xt)
        m = tvalid[:, None]
        if DMASK:
            m = m & dmask[None, :]
        x = tl.load(rp[:, None] + dd[None, :], mask=m, other=0.0)
    else:
        x = _load_rows(X, s_xt, s_xh, STGK, s_g2, qs, ctx, blk0 + tok, tok, tvalid, h, dd,
                       dmask).to(X.dtype.element_ty)
    return x


@triton.jit
def _mma_col_of(di, DP: tl.constexpr):
    """Logical column (row of Π) held by physical column di of the rotation's product, for `_mma_cols`: physical
    32·rep + 8·w + 2·q + e holds logical w·DP/4 + q·DP/16 + 2·rep + e."""
    return ((di // 8) % 4) * (DP // 4) + ((di // 2) % 4) * (DP // 16) + (di // 32) * 2 + di % 2


@triton.jit
def _mma_cols(y, T: tl.constexpr, DP: tl.constexpr):
    """y [T, DP] of a product whose B columns were loaded in `_mma_col_of` order, relabelled to logical order (a
    permute and reshapes: no data moves). Exact for any layout; the point is the layout: in the MMA accumulator of 4
    warps (warps along the columns, n-tiles of 8, a thread holding columns 2q, 2q + 1 of each), thread (w, q) holds
    physical 32·rep + 8·w + 2·q + e, i.e. the DP/16 consecutive logical columns from w·DP/4 + q·DP/16: a byte of
    codes (2, 4 or 8 columns) then packs within one thread, without shuffles or a layout change."""
    R: tl.constexpr = DP // 32
    return tl.reshape(tl.permute(tl.reshape(y, [T, R, 4, 4, 2]), (0, 2, 3, 1, 4)), [T, DP])


@triton.jit
def _rot_rows(X, s_xt, s_xh, STGK, s_g2, qs, ctx, blk0, tok, tvalid, h, PI, PI16, rsd, D: tl.constexpr,
              DP: tl.constexpr, DC: tl.constexpr, T: tl.constexpr, PM1: tl.constexpr, INTERP: tl.constexpr,
              SCALE: tl.constexpr, PERM: tl.constexpr):
    """y = x @ Π.T for T token rows: [T, DP] fp32 (columns >= D are 0). PM1: PI16 = sqrt(D)*Π = ±1 in the
    16-bit input dtype, so one 16-bit tensor-core pass with fp32 accumulation is exact up to summation order
    (times rsd = 1/sqrt(D) when SCALE; else the caller folds rsd into its own per-row scale); else fp32 Π with tf32x3
    (~fp32; rsd is 1). PERM (DP >= 32): Π's rows loaded in `_mma_col_of` order and the product relabelled by
    `_mma_cols` (the same y, in a layout where each thread holds consecutive columns)."""
    di = tl.arange(0, DP)
    if PERM:
        li = _mma_col_of(di, DP)
    else:
        li = di
    im = li < D
    y = tl.zeros([T, DP], dtype=tl.float32)
    for c in tl.static_range(0, D, DC):
        dd = c + tl.arange(0, DC)
        if PM1:
            x = _load_rows_raw(X, s_xt, s_xh, STGK, s_g2, qs, ctx, blk0, tok, tvalid, h, dd, dd < D, c + DC > D)
            if c + DC > D or D < DP:  # (a chunk may run past D when DC > D)
                pt = tl.load(PI16 + li[None, :] * D + dd[:, None], mask=im[None, :] & (dd < D)[:, None], other=0.0)
            else:
                pt = tl.load(PI16 + li[None, :] * D + dd[:, None])  # [DC, DP] ±1
            if INTERP:
                y += tl.dot(x.to(tl.float32), pt.to(tl.float32))
            else:
                y += tl.dot(x.to(pt.dtype), pt)
        else:
            x = _load_rows(X, s_xt, s_xh, STGK, s_g2, qs, ctx, blk0 + tok, tok, tvalid, h, dd, dd < D)
            pt = tl.load(PI + li[None, :] * D + dd[:, None], mask=im[None, :] & (dd < D)[:, None], other=0.0)
            y += tl.dot(x, pt, input_precision="tf32x3")
    if PERM:
        y = _mma_cols(y, T, DP)
    if PM1 and SCALE:
        y = y * rsd
    return y


@triton.jit
def _bf16_round(x):
    """float32 -> the float32 value of its bf16 rounding, round-to-nearest-even (NaN kept). Bit arithmetic, so the
    CPU interpreter (which truncates in .to(bf16)) and the GPU agree with torch."""
    b = x.to(tl.uint32, bitcast=True)
    rb = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) << 16
    return tl.where(x != x, x, rb.to(tl.float32, bitcast=True))


@triton.jit
def _pow2_of(mx):
    """Per-row powers of two (p, 1/p) for row maxima mx: p = 2^(127 - E), E the biased exponent of mx, so that mx·p
    lies in [1, 2); clamped to [2^-100, 2^126], so that p, 1/p and p times a factor >= 2^-26 are normal (mx >= 2^100
    lands in [1, 2^28), a denormal or zero mx below 1/2, Inf and NaN get a finite p). Multiplying by p is exact."""
    e = mx.to(tl.int32, bitcast=True) & 0x7F800000
    pb = tl.minimum(tl.maximum(0x7F000000 - e, 0x0D800000), 0x7E800000)
    return pb.to(tl.float32, bitcast=True), (0x7F000000 - pb).to(tl.float32, bitcast=True)


@triton.jit
def _scaled_rows(y, ysc):
    """Rows of y·ysc (y [T, DP], ysc in [2^-26, 1] a scalar factor) scaled exactly by a per-row power of two, for the
    norm without overflow (codec.robust_norm): (yn [T, DP] = fl(y·ysc)·p, S [T] = Σ yn², ip [T] = 1/p), so that
    ‖y·ysc‖ = sqrt(S)·ip. S is finite iff every element of the row is: |yn| < 2^28 bounds S, while an Inf or NaN
    element makes S Inf or NaN (whether the row max skipped a NaN, as the GPU's max does, or not).
    fl(y·ysc·p) = fl(y·ysc)·p and fl(max|y|·ysc) = max|fl(y·ysc)| (monotone rounding): the same values as scaling y
    first, one product fewer (exactly, except an element more than 2^126 below its row's max, which rounds as a
    denormal: nothing to the norm at fp32 precision, and its sign kept)."""
    p, ip = _pow2_of(tl.max(tl.abs(y), axis=1) * ysc)
    yn = y * (p * ysc)[:, None]
    return yn, tl.sum(yn * yn, axis=1), ip


@triton.jit
def _add2(a, b, c, d):
    return a + c, b + d


@triton.jit
def _div_approx(a, b, INTERP: tl.constexpr):
    """a / b for b in [2^-126, 2^126] and a, a / b normal: div.approx.ftz on the GPU (an MUFU.RCP and a product; `/`
    is div.full, which adds a range reduction per row for the same result in that range), `/` in the interpreter."""
    if INTERP:
        q = a / b
    else:
        q = tl.inline_asm_elementwise("div.approx.ftz.f32 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.float32,
                                      is_pure=True, pack=1)
    return q


# the count of the 15 boundaries below u as one asm block: set.gt.f32.f32 compiles to FSET (1.0 / 0.0 in one
# instruction, where `(u > t).to(int32)` takes FSETP + SEL), summed exactly in fp32. Store SASS at 4 bits: 7,656 ->
# 6,216 instructions; 16K-token chunk tq4 247.0 -> 199.8 us (H200, 2026-11-27, store_variants.jsonl "2026-11-27t")
_COUNT15_ASM = ("{ .reg .f32 m<15>;\n"
                + "".join(f"set.gt.f32.f32 m{i}, $1, ${i + 2};\n" for i in range(15))
                + "add.f32 m0, m0, m1;\n"
                + "".join(f"add.f32 m0, m0, m{i};\n" for i in range(2, 15))
                + "cvt.rzi.s32.f32 $0, m0; }")
COUNT15_ASM: tl.constexpr = tl.constexpr(_COUNT15_ASM)


@triton.jit
def _count15(u, BND):
    """#{i < 15: u > BND[i]} for u [T, DP] fp32 (GPU only: inline PTX)."""
    return tl.inline_asm_elementwise(
        COUNT15_ASM, "=r" + ",r" * 16,
        [u, tl.load(BND + 0), tl.load(BND + 1), tl.load(BND + 2), tl.load(BND + 3), tl.load(BND + 4),
         tl.load(BND + 5), tl.load(BND + 6), tl.load(BND + 7), tl.load(BND + 8), tl.load(BND + 9),
         tl.load(BND + 10), tl.load(BND + 11), tl.load(BND + 12), tl.load(BND + 13), tl.load(BND + 14)],
        dtype=tl.int32, is_pure=True, pack=1)


def _f32_hex(x: float) -> str:
    return "0f%08X" % struct.unpack("<I", struct.pack("<f", x))[0]


def _sym_count_asm(bits: int, u: int = 1, bound0: int = 2, braces: bool = True) -> str:
    """PTX of the code of u for a codebook of `bits` bits antisymmetric about a zero middle boundary (as
    `_sym_codes`): operands $0 = the code, $`u` = u, $`bound0`.. = the MID = 2^(bits-1) - 1 upper boundaries. n =
    #{upper boundaries < a} (left in register m0) with a = |u| one ulp up for negative u, counted like `_COUNT15_ASM`
    (FSET, exact fp32 sums); the code is MID + 1 + n for u > 0 and MID - n otherwise, = MID - n + [u > 0] * (2n + 1),
    exact in fp32."""
    mid = (1 << bits) // 2 - 1
    lines = [f".reg .f32 m<{max(mid, 2)}>;", ".reg .b32 a, s;",
             f"and.b32 a, ${u}, 2147483647;", f"shr.u32 s, ${u}, 31;", "add.u32 a, a, s;"]
    lines += [f"set.gt.f32.f32 m{k}, a, ${k + bound0};" for k in range(mid)]
    lines += [f"add.f32 m0, m0, m{k};" for k in range(1, mid)]
    lines += [f"set.gt.f32.f32 m1, ${u}, 0f00000000;",  # [u > 0]
              "fma.rn.f32 a, m0, 0f40000000, 0f3F800000;",  # 2n + 1
              f"sub.f32 s, {_f32_hex(mid)}, m0;",  # MID - n
              "fma.rn.f32 a, m1, a, s;", "cvt.rzi.s32.f32 $0, a;"]
    body = "\n".join(lines)
    return "{ " + body + " }" if braces else body


SYM_ASM4: tl.constexpr = tl.constexpr(_sym_count_asm(4))


def sym_cen_asm4(mags) -> str:
    """PTX of `_sym_count_asm(4)`'s code and its centroid, for a symmetric 4-bit codebook whose upper centroids are
    `mags` (8 fp32, ascending: c[8 + n] = mags[n] = -c[7 - n]): operands $0 = the code, $1 = the centroid (fp32
    bits), $2 = u, $3.. = the 7 upper boundaries. The centroid takes no table gather: byte k of mags[n] is byte n
    of the 8-byte word (Tk_lo, Tk_hi), picked by one prmt per byte (selector n in every nibble) and the four bytes
    joined by three more; its sign is that of the code's half (u > 0: upper)."""
    import numpy as np
    m = np.asarray([float(x) for x in mags], dtype=np.float32).view(np.uint32)
    assert m.size == 8
    byte = [[(int(m[n]) >> (8 * k)) & 0xFF for n in range(8)] for k in range(4)]
    word = [[sum(byte[k][4 * h + j] << (8 * j) for j in range(4)) for h in range(2)] for k in range(4)]
    lines = [".reg .b32 n, sel, lo, hi, p0, p1, p2, p3, q0, q1, g;", _sym_count_asm(4, u=2, bound0=3, braces=False)]
    lines += ["cvt.rzi.u32.f32 n, m0;", "mul.lo.u32 sel, n, 0x1111;"]  # n in every selector nibble
    for k in range(4):
        lines += [f"mov.b32 lo, 0x{word[k][0]:08X};", f"mov.b32 hi, 0x{word[k][1]:08X};",
                  f"prmt.b32 p{k}, lo, hi, sel;"]
    lines += ["prmt.b32 q0, p0, p1, 0x5140;", "prmt.b32 q1, p2, p3, 0x5140;",  # bytes (a0, b0, a1, b1)
              "prmt.b32 g, q0, q1, 0x5410;",  # (q0.b0, q0.b1, q1.b0, q1.b1)
              "set.le.u32.f32 n, $2, 0f00000000;", "and.b32 n, n, 0x80000000;", "xor.b32 $1, g, n;"]
    return "{ " + "\n".join(lines) + " }"


@triton.jit
def _sym_codes_cen_asm4(u, BND, ASM: tl.constexpr):
    """(codes, centroids) of u [T, DP] for a symmetric 4-bit codebook, both from one asm block per element
    (`sym_cen_asm4`; GPU only: inline PTX)."""
    return tl.inline_asm_elementwise(
        ASM, "=r,=r" + ",r" * 8,
        [u, tl.load(BND + 8), tl.load(BND + 9), tl.load(BND + 10), tl.load(BND + 11), tl.load(BND + 12),
         tl.load(BND + 13), tl.load(BND + 14)], dtype=(tl.int32, tl.float32), is_pure=True, pack=1)


@triton.jit
def _sym_codes_asm4(u, BND):
    """Codes of u [T, DP] for a symmetric 4-bit codebook, from |u| as one asm block per element (`_sym_count_asm`;
    GPU only: inline PTX)."""
    return tl.inline_asm_elementwise(
        SYM_ASM4, "=r" + ",r" * 8,
        [u, tl.load(BND + 8), tl.load(BND + 9), tl.load(BND + 10), tl.load(BND + 11), tl.load(BND + 12),
         tl.load(BND + 13), tl.load(BND + 14)], dtype=tl.int32, is_pure=True, pack=1)


def sym_code_cen_asm(bits: int) -> str:
    """PTX of the code of u and its centroid for a codebook of `bits` (2..4) bits antisymmetric about a zero middle
    boundary (as `_sym_codes`), for u finite or NaN (NaN codes as 0 does): operands $0 = the code, $1 = the centroid
    (fp32 bits), $2 = u, $3 = the centroid table (64-bit address), $4.. = the MID = 2^(bits-1) - 1 upper boundaries.
    a = u one ulp further from 0 for negative u, so |a| > t is |u| >= t there. Each boundary below |a| is one FSET
    (1.0f = 127 << 23, no predicate: a binary search's predicates, live across the thread's 32 interleaved elements,
    spill through registers), summed as integers: bits 23.. hold -n mod 128 (127 = -1 mod 128); shifted to bits
    24..27 and added to MID there: MID - n, the code for u <= 0. For u > 0 the code is MID + 1 + n, the complement of
    MID - n in `bits` bits: one xor with FSET(u > 0), whose bits 23..29 cover the field, and the field's mask. The
    centroid is a load of table[code] (an L1 hit; Triton's own gather converts the tile's layout through shared
    memory, twice)."""
    mid = (1 << bits) // 2 - 1
    assert 1 <= mid <= 7
    lines = [f".reg .b32 a, s, x, m<{mid}>;", ".reg .f32 fa;", ".reg .b64 ad;",
             "shr.u32 s, $2, 31;", "add.u32 a, $2, s;", "abs.f32 fa, a;"]
    lines += [f"set.gt.f32.f32 m{k}, fa, ${k + 4};" for k in range(mid)]
    lines += ["mov.b32 x, m0;"] + [f"add.u32 x, x, m{k};" for k in range(1, mid)]
    lines += ["shl.b32 x, x, 1;", f"add.u32 x, x, {mid << 24};",
              "set.gt.f32.f32 s, $2, 0f00000000;", "xor.b32 x, x, s;", f"and.b32 x, x, {((1 << bits) - 1) << 24};",
              "shr.u32 x, x, 24;", "mov.b32 $0, x;", "mul.wide.u32 ad, x, 4;", "add.s64 ad, ad, $3;",
              "ld.global.nc.b32 $1, [ad];"]
    return "{ " + "\n".join(lines) + " }"


SYMC2: tl.constexpr = tl.constexpr(sym_code_cen_asm(2))
SYMC3: tl.constexpr = tl.constexpr(sym_code_cen_asm(3))
SYMC4: tl.constexpr = tl.constexpr(sym_code_cen_asm(4))


@triton.jit
def _sym_code_cen(u, BND, CEN, BITS: tl.constexpr):
    """(codes int32, centroids fp32) of u [T, DP] for a symmetric codebook of 2..4 bits from one asm block per element
    (`sym_code_cen_asm`; GPU only: inline PTX). u may be NaN (a row without a direction): code MID, as for 0."""
    cp = CEN.to(tl.int64)  # (the asm's operands broadcast with arithmetic types only)
    if BITS == 4:
        r = tl.inline_asm_elementwise(
            SYMC4, "=r,=r,r,l" + ",r" * 7,
            [u, cp, tl.load(BND + 8), tl.load(BND + 9), tl.load(BND + 10), tl.load(BND + 11), tl.load(BND + 12),
             tl.load(BND + 13), tl.load(BND + 14)], dtype=(tl.int32, tl.float32), is_pure=True, pack=1)
    elif BITS == 3:
        r = tl.inline_asm_elementwise(
            SYMC3, "=r,=r,r,l,r,r,r", [u, cp, tl.load(BND + 4), tl.load(BND + 5), tl.load(BND + 6)],
            dtype=(tl.int32, tl.float32), is_pure=True, pack=1)
    else:
        tl.static_assert(BITS == 2)
        r = tl.inline_asm_elementwise(SYMC2, "=r,=r,r,l,r", [u, cp, tl.load(BND + 2)],
                                      dtype=(tl.int32, tl.float32), is_pure=True, pack=1)
    return r


CELL_MAX_ENTRIES = 1024  # a codebook whose cell table would be longer (8-bit codes) keeps the other code paths


def cell_table(bounds) -> list[int] | None:
    """The cell table of `_cell_code_cen` for ascending fp32 boundaries (any codebook), as int32 words, or None when
    no power of two κ <= CELL_MAX_ENTRIES / 2 puts at most one boundary in each cell. Cells of width 1/κ tile
    [-1 - 1/κ, 1 + 2/κ), u's range (|u| <= 1 up to rounding): cell j >= 1 is [(j - κ - 2)/κ, (j - κ - 1)/κ), the
    floor of u·κ + κ + 2 (exact in fp32: κ a power of two, the sum rounded toward zero). Words 0, 1: κ and κ + 2
    (fp32 bits); then entry j (two words): t = the boundary inside cell j (+Inf if none) and n = #{boundaries below
    the cell}: the code of u is n + [t < u] = #{boundaries < u}, torch.bucketize's. Entry 0 (what a NaN u converts
    to) codes as u = 0."""
    import numpy as np
    b = np.asarray([float(x) for x in bounds], dtype=np.float32)
    assert b.ndim == 1 and b.size >= 1 and bool(np.all(b[1:] > b[:-1]))
    inf = np.float32(np.inf)

    def bits(x):
        return int(np.float32(x).view(np.uint32))

    kap = 1
    while 2 * kap + 4 <= CELL_MAX_ENTRIES:
        lo = (np.arange(2 * kap + 4, dtype=np.float64) - kap - 2) / kap  # cell j's lower edge (exact in fp32)
        words = [bits(kap), bits(kap + 2), bits(inf), int(np.count_nonzero(b < 0))]
        for j in range(1, 2 * kap + 4):
            inside = b[(b >= lo[j]) & (b < lo[j] + 1.0 / kap)]
            if inside.size > 1:
                break
            words += [bits(inside[0] if inside.size else inf), int(np.count_nonzero(b < lo[j]))]
        else:
            return words
        kap *= 2
    return None


def cell_code_cen_asm() -> str:
    """PTX of the code of u (#{boundaries < u}) and its centroid from the cell table of `cell_table` (any codebook):
    operands $0 = the code, $1 = the centroid (fp32 bits), $2 = u, $3 = the table's entries (64-bit address of entry
    0), $4 = the centroid table, $5 = κ, $6 = κ + 2. j = floor(u·κ + κ + 2) (fma rounded toward zero, converted; NaN
    converts to 0, entry 0), one 8-byte load of (t, n), one FSET [t < u] (1.0f = 0x3F800000: bit 29 set) and n +
    the FSET's bit 29, then a load of the centroid: 8 instructions per element, no predicate. (A 16-byte entry
    with the centroid and its step to the next, fma'd, saves the second load but needs register quads: more
    instructions and spills at 128 registers.)"""
    return "{ " + "\n".join([
        ".reg .b32 j, t, n, f;", ".reg .f32 x;", ".reg .b64 ad;",
        "fma.rz.f32 x, $2, $5, $6;", "cvt.rzi.s32.f32 j, x;", "mul.wide.u32 ad, j, 8;", "add.s64 ad, ad, $3;",
        "ld.global.nc.v2.b32 {t, n}, [ad];", "set.gt.f32.f32 f, $2, t;", "shr.u32 f, f, 29;", "add.u32 n, n, f;",
        "mov.b32 $0, n;", "mul.wide.u32 ad, n, 4;", "add.s64 ad, ad, $4;", "ld.global.nc.b32 $1, [ad];"]) + " }"


CELL_ASM: tl.constexpr = tl.constexpr(cell_code_cen_asm())


@triton.jit
def _cell_code_cen(u, CL, CEN):
    """(codes int32, centroids fp32) of u [T, DP] (finite, |u| <= 1 up to rounding, or NaN: codes as 0) from the cell
    table CL (`cell_table`, int32 words) and the centroids CEN: one asm block per element (GPU only: inline PTX)."""
    return tl.inline_asm_elementwise(
        CELL_ASM, "=r,=r,r,l,l,r,r",
        [u, (CL + 2).to(tl.int64), CEN.to(tl.int64), tl.load(CL).to(tl.float32, bitcast=True),
         tl.load(CL + 1).to(tl.float32, bitcast=True)], dtype=(tl.int32, tl.float32), is_pure=True, pack=1)


@triton.jit
def _sym_codes(u, dmask, BND, CEN, BITS: tl.constexpr):
    """Codes (#{boundaries < u}) and centroids of u [T, DP] for a codebook antisymmetric about a zero middle boundary
    (`params.symmetric_codebook`): for u > 0, MID + 1 + #{upper boundaries < |u|}; for u <= 0, MID - #{upper
    boundaries <= |u|} (the lower boundaries mirrored). a is |u| one ulp up for negative u, so `a > t` is `|u| >= t`
    there. The centroid magnitude follows the count through selects: half the comparisons and no gather (a gather
    converts the tile's layout through shared memory). Returns (code int32, c fp32; c = 0 in pad columns)."""
    MID: tl.constexpr = (1 << BITS) // 2 - 1
    ub = u.to(tl.uint32, bitcast=True)
    a = ((ub & 0x7FFFFFFF) + (ub >> 31)).to(tl.float32, bitcast=True)
    cnt = tl.zeros(u.shape, dtype=tl.int32)
    mag = tl.zeros(u.shape, dtype=tl.float32) + tl.load(CEN + MID + 1)
    for k in tl.static_range(MID):
        up = a > tl.load(BND + MID + 1 + k)
        cnt += up.to(tl.int32)
        mag = tl.where(up, tl.load(CEN + MID + 2 + k), mag)
    posu = u > 0
    code = tl.where(posu, MID + 1 + cnt, MID - cnt)
    return code, tl.where(dmask[None, :], tl.where(posu, mag, -mag), 0.0)


@triton.jit
def _encode(y, ysc, dmask, BND, CEN, CL, BITS: tl.constexpr, NORM: tl.constexpr, CMP: tl.constexpr,
            SYM: tl.constexpr, CA: tl.constexpr, CELL: tl.constexpr, DPAD: tl.constexpr, INTERP: tl.constexpr):
    """encode_dir of rows y·ysc (y [T, DP], pad columns 0; ysc in [2^-26, 1] a scalar folded into the norm's scale):
    codes int32 [T, DP], bf16-rounded scale [T] fp32, and the centroid values c[codes] (0 in pad columns). SYM:
    codes from |u| (`_sym_codes`; with CMP 4 on the GPU `_sym_code_cen`); CA (4-bit, CMP 3): the asm of
    `sym_cen_asm4` for this codebook (codes and centroids in one block, no gather), "-" for none. (Triton 3.6 takes
    no default for a string constexpr of a helper: CA is always passed.) DPAD: D < DP (pad columns to mask).
    Semantics of codec.encode_dir: yn = y·2^k exactly (`_scaled_rows`), so u = y/‖y‖ = yn/sqrt(Σ yn²) and the least
    squares scale is Σ yn·c / Σ c·c · 2^-k; a row with any NaN/Inf has a non-finite Σ yn² (so the norm is not
    finite either; the norm alone overflowing counts as non-finite too, as in the reference)."""
    yn, S, ip = _scaled_rows(y, ysc)
    nrm = tl.sqrt(S) * ip
    finite = nrm < float("inf")  # (NaN compares false)
    pos = finite & (S > 0)
    # u: 0 in a zero row, NaN in a non-finite one (codes from |u| take NaN as 0; the other paths zero it)
    u = yn * tl.where(pos, tl.math.rsqrt(S), 0.0)[:, None]
    code = tl.zeros(y.shape, dtype=tl.int32)
    if CELL:
        code, c = _cell_code_cen(u, CL, CEN)
        if DPAD:
            c = tl.where(dmask[None, :], c, 0.0)
    elif SYM and CMP >= 4:
        code, c = _sym_code_cen(u, BND, CEN, BITS)
        if DPAD:
            c = tl.where(dmask[None, :], c, 0.0)
    elif SYM and CMP == 3 and BITS == 4 and CA != "-":
        code, c = _sym_codes_cen_asm4(u, BND, CA)
        if DPAD:
            c = tl.where(dmask[None, :], c, 0.0)
    elif SYM and CMP == 3 and BITS == 4:
        code = _sym_codes_asm4(u, BND)
        c = tl.load(CEN + code, mask=dmask[None, :], other=0.0)
    elif SYM:
        code, c = _sym_codes(u, dmask, BND, CEN, BITS)
    else:
        u = tl.where(pos[:, None], u, 0.0)
        if CMP >= 2 and BITS == 4:
            code = _count15(u, BND)
        elif CMP and BITS <= 4:
            # count the boundaries below u: scalar thresholds, no dependent gathers (the same codes as the search)
            for i in tl.static_range((1 << BITS) - 1):
                code += (u > tl.load(BND + i)).to(tl.int32)
        else:
            for lev in tl.static_range(BITS):
                cand = code + (1 << (BITS - 1 - lev))
                thr = tl.load(BND + cand - 1)
                code = tl.where(u > thr, cand, code)
        c = tl.load(CEN + code, mask=dmask[None, :], other=0.0)
    if NORM:
        s = nrm
    else:
        num, den = tl.reduce((yn * c, c * c), 1, _add2)  # (one pass through shared memory for both sums)
        # (Σ c·c: D squared centroids; Σ yn·c sums |yn|·|c| >= 0, with max |yn| >= 1: both in range)
        s = _div_approx(num, den, INTERP) * ip
    s = tl.where(pos, s, 0.0)
    s = tl.where(finite, s, float("nan"))
    s = _bf16_round(s)
    return code, s, c


@triton.jit
def _put_plane(PAGE_PTR, O: tl.constexpr, W: tl.constexpr, SH: tl.constexpr, TOP: tl.constexpr, code, tok, tvalid,
               D: tl.constexpr, DP: tl.constexpr, T: tl.constexpr):
    """Pack bits SH..SH+W-1 of codes [T, DP] into plane (offset O, width W), token-major. PAGE_PTR: [T] page base
    pointer of each row; TOP: the plane holds the codes' top bits (codes are < 2^(SH+W): no mask)."""
    v = code >> SH
    if not TOP:
        v = v & ((1 << W) - 1)
    v3 = tl.reshape(v, [T, DP // (8 // W), 8 // W])
    sh = tl.arange(0, 8 // W) * W
    byte = tl.sum(v3 << sh[None, None, :], axis=2)
    tt = tl.arange(0, DP // (8 // W))
    m = tvalid[:, None]
    if D < DP:
        m = m & (tt[None, :] < D * W // 8)
    tl.store(PAGE_PTR[:, None] + O + tok[:, None] * (D * W // 8) + tt[None, :], byte.to(tl.uint8), mask=m)


def st_asm(bits: int) -> str:
    """PTX of a predicated store of the low `bits` bits of $2 at address $1 where $3 != 0 ($0: a dummy result)."""
    return "{ .reg .pred p; setp.ne.b32 p, $3, 0; @p st.global.b%d [$1], $2; mov.b32 $0, 0; }" % bits


ST8: tl.constexpr = tl.constexpr(st_asm(8))
ST16: tl.constexpr = tl.constexpr(st_asm(16))
ST32: tl.constexpr = tl.constexpr(st_asm(32))


@triton.jit
def _store_direct(p, v, m, BYTES: tl.constexpr, INTERP: tl.constexpr):
    """tl.store(p, v, mask=m) of 1-, 2- or 4-byte integers v from the registers each thread holds them in (GPU: one
    st.global per element in inline PTX; Triton's store first moves a tile into its coalescing layout through shared
    memory, ~30 instructions a plane). A replicated element is stored by each replica: the same bytes."""
    if INTERP:
        tl.store(p, v, mask=m)
    else:
        if BYTES == 1:
            asm: tl.constexpr = ST8
        elif BYTES == 2:
            asm: tl.constexpr = ST16
        else:
            asm: tl.constexpr = ST32
        tl.inline_asm_elementwise(asm, "=r,l,r,r", [p.to(tl.int64), v.to(tl.int32), m.to(tl.int32)],
                                  dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _put_plane8(PAGE_PTR, O: tl.constexpr, W: tl.constexpr, SH: tl.constexpr, w, tok, m, D: tl.constexpr,
                INTERP: tl.constexpr):
    """Plane (offset O, width W) of the codes in w [T, G] (group g: codes 8g..8g+7 in nibbles 0..7): bits SH..SH+W-1
    of each nibble compressed into a W-byte element (4 bytes: the nibbles themselves), stored at element
    tok·D/8 + g of the plane. m: [T, G] mask."""
    if W == 4:
        tl.static_assert(SH == 0)
        v = w
        ty: tl.constexpr = tl.uint32
    elif W == 2:
        v = (w >> SH) & 0x33333333
        v = (v | (v >> 2)) & 0x0F0F0F0F
        v = (v | (v >> 4)) & 0x00FF00FF
        v = (v | (v >> 8)) & 0xFFFF
        ty: tl.constexpr = tl.uint16
    else:
        tl.static_assert(W == 1)
        v = (w >> SH) & 0x11111111
        v = (v | (v >> 3)) & 0x03030303
        v = (v | (v >> 6)) & 0x000F000F
        v = (v | (v >> 12)) & 0xFF
        ty: tl.constexpr = tl.uint8
    p = (PAGE_PTR + O).to(tl.pointer_type(ty))  # PAGE_PTR [T]
    _store_direct(p[:, None] + tok[:, None] * (D // 8) + tl.arange(0, w.shape[1])[None, :], v.to(ty), m, W, INTERP)


@triton.jit
def _put_codes(PAGE_PTR, code, tok, tvalid, D: tl.constexpr, DP: tl.constexpr, T: tl.constexpr,
               O0: tl.constexpr, W0: tl.constexpr, O1: tl.constexpr, W1: tl.constexpr, O2: tl.constexpr,
               W2: tl.constexpr, PACK8: tl.constexpr, INTERP: tl.constexpr):
    """Codes [T, DP] (each < 2^(W0+W1+W2)) into their bit planes. PACK8 (codes of <= 4 bits, planes aligned to their
    width: `kernels._pack8_ok`): 8 consecutive codes shifted into the nibbles of one word (in-thread where a thread
    holds 8 consecutive columns, `_mma_cols`), each plane's bits compressed out of it by shifts and masks (a 3-bit
    code's two planes: 15 operations per 8 codes, where bytes built code by code took about 6 per code)."""
    if PACK8:
        w = tl.sum(tl.reshape(code, [T, DP // 8, 8]) << (tl.arange(0, 8) * 4)[None, None, :], axis=2)
        m = tvalid[:, None]
        if D < DP:
            m = m & (tl.arange(0, DP // 8) < D // 8)[None, :]
        _put_plane8(PAGE_PTR, O0, W0, 0, w, tok, m, D, INTERP)
        if W1 > 0:
            _put_plane8(PAGE_PTR, O1, W1, W0, w, tok, m, D, INTERP)
        if W2 > 0:
            _put_plane8(PAGE_PTR, O2, W2, W0 + W1, w, tok, m, D, INTERP)
    else:
        _put_plane(PAGE_PTR, O0, W0, 0, W1 == 0, code, tok, tvalid, D, DP, T)
        if W1 > 0:
            _put_plane(PAGE_PTR, O1, W1, W0, W2 == 0, code, tok, tvalid, D, DP, T)
        if W2 > 0:
            _put_plane(PAGE_PTR, O2, W2, W0 + W1, True, code, tok, tvalid, D, DP, T)


@triton.jit
def _put_bf16(PAGE_PTR, O: tl.constexpr, idx, val, mask):
    """Store bf16-representable fp32 values as bf16 bits; NaN as 0xFFFF (what torch writes on CPU)."""
    bits = (val.to(tl.uint32, bitcast=True) >> 16).to(tl.uint16)
    bits = tl.where(val != val, 0xFFFF, bits).to(tl.uint16)
    p = (PAGE_PTR + O).to(tl.pointer_type(tl.uint16))  # PAGE_PTR [T]
    tl.store(p + idx, bits, mask=mask)


@triton.jit
def _store_kind(X, s_xt, s_xh, STG_ROW, s_g2, qs, ctx, blk0, tvalid0, h, PAGE_ROW, PAGE_B, bval, PI, PI16, rsd,
                SQ, BND, CEN, BNDM, CENM, CL, CLM, PM1: tl.constexpr, INTERP: tl.constexpr,
                D: tl.constexpr, DP: tl.constexpr, DC: tl.constexpr, B: tl.constexpr, NBLK: tl.constexpr,
                TS: tl.constexpr, NR: tl.constexpr, NSUB: tl.constexpr, BITS: tl.constexpr, NORM: tl.constexpr,
                O0: tl.constexpr, W0: tl.constexpr, O1: tl.constexpr, W1: tl.constexpr, O2: tl.constexpr,
                W2: tl.constexpr, SO: tl.constexpr,
                CENTER: tl.constexpr, MBITS: tl.constexpr, MO0: tl.constexpr, MW0: tl.constexpr,
                MO1: tl.constexpr, MW1: tl.constexpr, MO2: tl.constexpr, MW2: tl.constexpr, MSO: tl.constexpr,
                PROD: tl.constexpr, QJO: tl.constexpr, RNO: tl.constexpr, CMP: tl.constexpr, sb_lo, sb_hi,
                RDC: tl.constexpr, SYM: tl.constexpr, MSYM: tl.constexpr, CA: tl.constexpr, PERM: tl.constexpr,
                CELL: tl.constexpr, MCELL: tl.constexpr, PACK8: tl.constexpr):
    """One kind (K or V) of NBLK blocks (rows: NBLK x TS tokens; NSUB sub-tiles of TS tokens when NBLK == 1, of
    which this program codes [sb_lo, sb_hi): the per-block mean is computed from the whole block either way and
    written by the program that codes sub-tile 0).
    Per-row vectors [NBLK*TS]: qs, ctx, blk0 (first position of the row's block), tvalid0 (block valid),
    STG_ROW (staging slot pointer), PAGE_ROW (page base pointer); per block [NBLK]: PAGE_B, bval."""
    di = tl.arange(0, DP)
    dmask = di < D
    n = tl.arange(0, NR)
    ts = n % TS
    bsel = tl.arange(0, NBLK)
    if CENTER:
        if NSUB == 1:
            tvalid = tvalid0 & (ts < B)
            y = _rot_rows(X, s_xt, s_xh, STG_ROW, s_g2, qs, ctx, blk0, ts, tvalid, h, PI, PI16, rsd, D, DP, RDC,
                           NR, PM1, INTERP, True, PERM)
            ysum = tl.sum(tl.reshape(y, [NBLK, TS, DP]), axis=1)  # [NBLK, DP] (invalid rows are 0)
        else:
            # NBLK == 1: sum x over the block's sub-tiles, then rotate the sum (rotation commutes with the mean)
            ysum1 = tl.zeros([DP], dtype=tl.float32)
            for c1 in tl.static_range(0, D, DC):
                dd = c1 + tl.arange(0, DC)
                xs = tl.zeros([DC], dtype=tl.float32)
                for sb in range(NSUB):
                    tok = sb * TS + ts
                    x = _load_rows(X, s_xt, s_xh, STG_ROW, s_g2, qs, ctx, blk0 + tok, tok, tvalid0 & (tok < B), h,
                                   dd, dd < D)
                    xs += tl.sum(x, axis=0)
                pt = tl.load(PI + di[None, :] * D + dd[:, None], mask=dmask[None, :], other=0.0)  # [DC, DP]
                ysum1 += tl.sum(pt * xs[:, None], axis=0)
            ysum = ysum1[None, :]
        mean = ysum / B  # [NBLK, DP]
        mcode, ms, mc = _encode(mean, 1.0, dmask, BNDM, CENM, CLM, MBITS, False, CMP, MSYM, "-", MCELL, D < DP, INTERP)
        mhat = ms[:, None] * mc  # [NBLK, DP]
        mval = bval & (bsel * 0 + sb_lo == 0)
        _put_codes(PAGE_B, mcode, bsel * 0, mval, D, DP, NBLK, MO0, MW0, MO1, MW1, MO2, MW2, PACK8 and MBITS <= 4,
                   INTERP)
        _put_bf16(PAGE_B, MSO, bsel * 0, ms, mval)
        if NSUB == 1:
            mrow = tl.reshape(tl.broadcast_to(mhat[:, None, :], [NBLK, TS, DP]), [NR, DP])
    for sb in range(sb_lo, sb_hi):
        tok = sb * TS + ts
        tvalid = tvalid0 & (tok < B)
        if CENTER and NSUB == 1:
            yy = y - mrow
        else:
            # rows coded as they come (no mean, no QJL residual) leave rsd to _encode's per-row scale
            yy = _rot_rows(X, s_xt, s_xh, STG_ROW, s_g2, qs, ctx, blk0, tok, tvalid, h, PI, PI16, rsd, D, DP,
                            RDC, NR, PM1, INTERP, CENTER or PROD, PERM)
            if CENTER:
                yy = yy - mhat
        ysc = rsd  # (the ±1 product's 1/sqrt(D), where _rot_rows left it out)
        if CENTER or PROD or not PM1:
            ysc = 1.0
        code, s, c = _encode(yy, ysc, dmask, BND, CEN, CL, BITS, NORM, CMP, SYM, CA, CELL, D < DP, INTERP)
        _put_codes(PAGE_ROW, code, tok, tvalid, D, DP, NR, O0, W0, O1, W1, O2, W2, PACK8 and BITS <= 4, INTERP)
        _put_bf16(PAGE_ROW, SO, tok, s, tvalid)
        if PROD:
            e = yy - s[:, None] * c
            _, se, ipe = _scaled_rows(e, 1.0)
            # (NaN if any e is not finite)
            rn = _bf16_round(tl.where(se < float("inf"), tl.sqrt(se) * ipe, float("nan")))
            _put_bf16(PAGE_ROW, RNO, tok, rn, tvalid)
            for c0 in tl.static_range(0, D, DC):
                kk = c0 + tl.arange(0, DC)
                st = tl.load(SQ + kk[None, :] * D + di[:, None], mask=dmask[:, None], other=0.0)  # S.T [DP, DC]
                proj = tl.dot(e, st, input_precision="tf32x3")  # [NR, DC]
                bit = (proj >= 0).to(tl.int32)
                b3 = tl.reshape(bit, [NR, DC // 8, 8])
                byte = tl.sum(b3 << tl.arange(0, 8)[None, None, :], axis=2)
                tt = tl.arange(0, DC // 8)
                tl.store(PAGE_ROW[:, None] + QJO + tok[:, None] * (D // 8) + c0 // 8 + tt[None, :],
                         byte.to(tl.uint8), mask=tvalid[:, None])


@triton.jit(do_not_specialize=["num_qb"])  # one compile for any number of completed blocks (no mid-serving JIT)
def _tq_store_kernel(
    KIN, VIN, STG, CACHE, BT, QSL, SEQ, CSLOT, QBR, QBI,
    PI, PI16, SQ, BK, BV, BKM, BVM, CK, CV, CKM, CVM, LK, LV, LKM, LVM, SKV, STAG, SCOEF,
    s_kt, s_kh, s_vt, s_vh, s_g0, s_g1, s_g2, s_g3, s_bt, num_qb, rsd, s_k0, s_k1, s_k2,
    H: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, DC: tl.constexpr, B: tl.constexpr, NBLK: tl.constexpr,
    TS: tl.constexpr, NSUB: tl.constexpr, PAGE: tl.constexpr, USED: tl.constexpr, PADP: tl.constexpr,
    KBITS: tl.constexpr, VBITS: tl.constexpr, MBITS: tl.constexpr, NORM: tl.constexpr,
    KO0: tl.constexpr, KW0: tl.constexpr, KO1: tl.constexpr, KW1: tl.constexpr, KO2: tl.constexpr,
    KW2: tl.constexpr, KSO: tl.constexpr,
    VO0: tl.constexpr, VW0: tl.constexpr, VO1: tl.constexpr, VW1: tl.constexpr, VO2: tl.constexpr,
    VW2: tl.constexpr, VSO: tl.constexpr,
    KC: tl.constexpr, KMO0: tl.constexpr, KMW0: tl.constexpr, KMO1: tl.constexpr, KMW1: tl.constexpr,
    KMO2: tl.constexpr, KMW2: tl.constexpr, KMSO: tl.constexpr,
    VC: tl.constexpr, VMO0: tl.constexpr, VMW0: tl.constexpr, VMO1: tl.constexpr, VMW1: tl.constexpr,
    VMO2: tl.constexpr, VMW2: tl.constexpr, VMSO: tl.constexpr,
    PROD: tl.constexpr, QJO: tl.constexpr, RNO: tl.constexpr, NR: tl.constexpr, PADR: tl.constexpr,
    PM1: tl.constexpr, INTERP: tl.constexpr, SINK: tl.constexpr, SINKT: tl.constexpr, SINKO: tl.constexpr,
    KVSPLIT: tl.constexpr = False, CMP: tl.constexpr = False, PAR: tl.constexpr = False,
    RDC: tl.constexpr = 32, KSY: tl.constexpr = False, VSY: tl.constexpr = False, KMSY: tl.constexpr = False,
    VMSY: tl.constexpr = False, KCA: tl.constexpr = "-", VCA: tl.constexpr = "-", PERM: tl.constexpr = False,
    KCL: tl.constexpr = False, VCL: tl.constexpr = False, KMCL: tl.constexpr = False, VMCL: tl.constexpr = False,
    PACK8: tl.constexpr = False,
):
    """Program (group of NBLK entries of the completed-block list[, sub-tile when PAR], KV head[, kind when
    KVSPLIT]); NR = NBLK*TS rows. KVSPLIT: K and V of a block are coded by two programs (axis 2: 0 = K with the sink
    fields and padding, 1 = V), which halves the latency of a program (a decode step stores a few blocks: latency,
    not throughput). PAR: the NSUB sub-tiles of a block are coded by NSUB programs (axis 0) instead of in sequence;
    each computes the block mean from the whole block, sub-tile 0 writes the per-block fields."""
    if PAR:
        gi = tl.program_id(0) // NSUB
        sb_lo = tl.program_id(0) % NSUB
        sb_hi = sb_lo + 1
    else:
        gi = tl.program_id(0)
        sb_lo = 0
        sb_hi = NSUB
    h = tl.program_id(1)
    kind = tl.program_id(2)
    n = tl.arange(0, NR)
    if NBLK == 1:
        # one block per program: its row's fields are scalars, loaded once (not once per token row and layout)
        rs = tl.load(QBR + gi, mask=gi < num_qb, other=-1)
        if rs < 0:
            return
        bs = tl.load(QBI + gi)
        blks = tl.load(BT + rs.to(tl.int64) * s_bt + bs).to(tl.int64)
        qs = tl.load(QSL + rs)
        ctx = tl.load(SEQ + rs) - (tl.load(QSL + rs + 1) - qs)
        slot = tl.load(CSLOT + rs).to(tl.int64)
        zn = tl.zeros([NR], dtype=tl.int32)
        valid = zn == 0
        blk0 = bs * B
        page = CACHE + (blks * H + h) * PAGE + zn  # [NR] pointers (all the same)
        stg = STG + tl.where(slot < 0, 0, slot) * s_g0 + h * s_g3 + zn  # [NR] (all the same)
        z1 = tl.zeros([1], dtype=tl.int32)
        bval = z1 == 0
        rb = rs + z1
        bb = bs + z1
        page_b = CACHE + (blks * H + h) * PAGE + z1
    else:
        e = gi * NBLK + n // TS  # qb entry of each row
        ein = e < num_qb
        r = tl.load(QBR + e, mask=ein, other=-1)
        valid = ein & (r >= 0)
        if tl.max(valid.to(tl.int32), axis=0) == 0:
            return
        r = tl.where(valid, r, 0)
        b = tl.load(QBI + e, mask=valid, other=0)
        blk = tl.load(BT + r.to(tl.int64) * s_bt + b, mask=valid, other=0).to(tl.int64)
        qs = tl.load(QSL + r, mask=valid, other=0)
        nq = tl.load(QSL + r + 1, mask=valid, other=0) - qs
        ctx = tl.load(SEQ + r, mask=valid, other=0) - nq
        slot = tl.load(CSLOT + r, mask=valid, other=0).to(tl.int64)
        slot = tl.where(slot < 0, 0, slot)
        blk0 = b * B
        page = CACHE + (blk * H + h) * PAGE  # [NR] pointers
        stg = STG + slot * s_g0 + h * s_g3
        # per block (for the mean fields)
        eb = gi * NBLK + tl.arange(0, NBLK)
        rb = tl.load(QBR + eb, mask=eb < num_qb, other=-1)
        bval = (eb < num_qb) & (rb >= 0)
        rb = tl.where(bval, rb, 0)
        bb = tl.load(QBI + eb, mask=bval, other=0)
        blkb = tl.load(BT + rb.to(tl.int64) * s_bt + bb, mask=bval, other=0).to(tl.int64)
        page_b = CACHE + (blkb * H + h) * PAGE
    if SINK and kind == 0 and sb_lo == 0:
        # first block of a sequence: content tag of its exact token 0 (codec.sink_tags), 0 in other pages
        first = bval & (bb == 0)
        tag = tl.zeros([NBLK], dtype=tl.int64)
        if tl.max(first.to(tl.int32), axis=0) > 0:  # (most programs skip it: no first block)
            qsb = tl.load(QSL + rb, mask=bval, other=0)
            ctxb = tl.load(SEQ + rb, mask=bval, other=0) - (tl.load(QSL + rb + 1, mask=bval, other=0) - qsb)
            slotb = tl.load(CSLOT + rb, mask=bval, other=0).to(tl.int64)
            stgb = STG + tl.where(slotb < 0, 0, slotb) * s_g0 + h * s_g3
            zb = bb * 0
            dd = tl.arange(0, DP)
            dmk = dd < D
            k0 = _load_rows(KIN, s_kt, s_kh, stgb, s_g2, qsb, ctxb, zb, zb, first, h, dd, dmk)  # [NBLK, DP] fp32
            v0 = _load_rows(VIN, s_vt, s_vh, stgb + s_g1, s_g2, qsb, ctxb, zb, zb, first, h, dd, dmk)
            kb_ = k0.to(tl.uint32, bitcast=True)
            vb_ = v0.to(tl.uint32, bitcast=True)
            khi = (kb_ >> 16).to(tl.int64)
            klo = (kb_ & 0xFFFF).to(tl.int64)
            vhi = (vb_ >> 16).to(tl.int64)
            vlo = (vb_ & 0xFFFF).to(tl.int64)
            c0k = tl.load(SCOEF + 0 * 2 * D + dd, mask=dmk, other=0)[None, :]
            c1k = tl.load(SCOEF + 1 * 2 * D + dd, mask=dmk, other=0)[None, :]
            c2k = tl.load(SCOEF + 2 * 2 * D + dd, mask=dmk, other=0)[None, :]
            c3k = tl.load(SCOEF + 3 * 2 * D + dd, mask=dmk, other=0)[None, :]
            c0v = tl.load(SCOEF + 0 * 2 * D + D + dd, mask=dmk, other=0)[None, :]
            c1v = tl.load(SCOEF + 1 * 2 * D + D + dd, mask=dmk, other=0)[None, :]
            c2v = tl.load(SCOEF + 2 * 2 * D + D + dd, mask=dmk, other=0)[None, :]
            c3v = tl.load(SCOEF + 3 * 2 * D + D + dd, mask=dmk, other=0)[None, :]
            P31 = 2147483647
            h1 = tl.sum(khi * c0k + klo * c1k + vhi * c0v + vlo * c1v, axis=1) % P31
            h2 = tl.sum(khi * c2k + klo * c3k + vhi * c2v + vlo * c3v, axis=1) % P31
            tag = h1 * 2147483648 + h2
            tag = tl.where(tag == 0, 1, tag)
            tag = tl.where(first, tag, 0)
            if SINKT:
                # the row's pending entry (SKV [rows, 2, H, D], STAG [rows, H]); `_sink_commit` moves it to the table
                # later, one writer per table entry
                sp = SKV + rb.to(tl.int64)[:, None] * s_k0 + h * s_k2 + dd[None, :]
                m2 = first[:, None] & dmk[None, :]
                tl.store(sp, k0.to(SKV.dtype.element_ty), mask=m2)
                tl.store(sp + s_k1, v0.to(SKV.dtype.element_ty), mask=m2)
                tl.store(STAG + rb * H + h, tag, mask=first)
        tl.store((page_b + SINKO).to(tl.pointer_type(tl.int64)), tag, mask=bval)
    if kind == 0:
        _store_kind(KIN, s_kt, s_kh, stg, s_g2, qs, ctx, blk0, valid, h, page, page_b, bval, PI, PI16, rsd, SQ, BK,
                    CK, BKM, CKM, LK, LKM, PM1, INTERP, D, DP, DC, B, NBLK, TS, NR, NSUB, KBITS, NORM, KO0, KW0, KO1,
                    KW1, KO2, KW2, KSO, KC, MBITS, KMO0, KMW0, KMO1, KMW1, KMO2, KMW2, KMSO, PROD, QJO, RNO, CMP, sb_lo,
                    sb_hi, RDC, KSY, KMSY, KCA, PERM, KCL, KMCL, PACK8)
    if kind == 1 or not KVSPLIT:
        _store_kind(VIN, s_vt, s_vh, stg + s_g1, s_g2, qs, ctx, blk0, valid, h, page, page_b, bval, PI, PI16, rsd,
                    SQ, BV, CV, BVM, CVM, LV, LVM, PM1, INTERP, D, DP, DC, B, NBLK, TS, NR, NSUB, VBITS, NORM, VO0,
                    VW0, VO1, VW1, VO2, VW2, VSO, VC, MBITS, VMO0, VMW0, VMO1, VMW1, VMO2, VMW2, VMSO, False, 0, 0, CMP,
                    sb_lo, sb_hi, RDC, VSY, VMSY, VCA, PERM, VCL, VMCL, PACK8)
    if PAGE > USED and kind == 0 and sb_lo == 0:
        # zero padding of each block's head page (each row zeroes a slice)
        pz = (n % TS)[:, None] * PADR + tl.arange(0, PADR)[None, :]
        tl.store(page[:, None] + USED + pz, tl.zeros([NR, PADR], dtype=tl.uint8),
                 mask=valid[:, None] & (pz < PAGE - USED))


@triton.jit
def _sink_commit(p, P, h, QBR, QBI, num_qb, PKV, PTAG, SKV, STAG, n_sink, s_p0, s_p1, s_p2, s_k0, s_k1, s_k2,
                 H: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, CH: tl.constexpr):
    """Sink-table entries of the first blocks completed in this step, from their rows' pending entries (PKV
    [rows, 2, H, D], PTAG [rows, H], written by the store), for entries p, p + P, ... of the completed-block list and
    KV head h. Where several first blocks' tags share a table entry, the last in the list writes it: one writer per
    entry, so a reader never gets one block's K/V under another's tag."""
    dd = tl.arange(0, DP)
    dm = dd < D
    for e in range(p, num_qb, P):
        r = tl.load(QBR + e)
        first = r >= 0
        if first:
            first = tl.load(QBI + e) == 0
        if first:
            tag = tl.load(PTAG + r * H + h)
            sl = tag % n_sink
            later = 0
            for c in range(e + 1, num_qb, CH):
                e2 = c + tl.arange(0, CH)
                r2 = tl.load(QBR + e2, mask=e2 < num_qb, other=-1)
                f2 = r2 >= 0
                f2 = f2 & (tl.load(QBI + e2, mask=f2, other=1) == 0)
                t2 = tl.load(PTAG + tl.where(f2, r2, 0) * H + h, mask=f2, other=0)
                later += tl.sum((f2 & (t2 % n_sink == sl)).to(tl.int32), axis=0)
            if later == 0:
                src = PKV + r.to(tl.int64) * s_p0 + h * s_p2 + dd
                dst = SKV + sl * s_k0 + h * s_k2 + dd
                tl.store(dst, tl.load(src, mask=dm), mask=dm)
                tl.store(dst + s_k1, tl.load(src + s_p1, mask=dm), mask=dm)
                tl.store(STAG + sl * H + h, tag)


@triton.jit(do_not_specialize=["num_qb", "n_sink"])
def _tq_sink_commit_kernel(QBR, QBI, num_qb, PKV, PTAG, SKV, STAG, n_sink, s_p0, s_p1, s_p2, s_k0, s_k1, s_k2,
                           H: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, CH: tl.constexpr):
    """Grid (P, H): `_sink_commit` of entries p, p + P, ... (between the store and the attention)."""
    _sink_commit(tl.program_id(0), tl.num_programs(0), tl.program_id(1), QBR, QBI, num_qb, PKV, PTAG, SKV, STAG,
                 n_sink, s_p0, s_p1, s_p2, s_k0, s_k1, s_k2, H, D, DP, CH)


@triton.jit
def _stage_row(r, h, KIN, VIN, STG, QSL, SEQ, OSLOT, s_kt, s_kh, s_vt, s_vh, s_g0, s_g1, s_g2, s_g3,
               D: tl.constexpr, DP: tl.constexpr, B: tl.constexpr, BP: tl.constexpr):
    """Copy the exact K/V of row r's open block (positions max(ctx, seq//B*B) .. seq-1), KV head h, into its slot."""
    slot = tl.load(OSLOT + r).to(tl.int64)
    if slot >= 0:
        qs = tl.load(QSL + r)
        nq = tl.load(QSL + r + 1) - qs
        L = tl.load(SEQ + r)
        ctx = L - nq
        p0 = tl.maximum(ctx, (L // B) * B)
        tok = tl.arange(0, BP)
        pos = p0 + tok
        ok = pos < L
        dd = tl.arange(0, DP)
        m2 = ok[:, None] & (dd < D)[None, :]
        src = (qs + pos - ctx).to(tl.int64)[:, None]
        dst = STG + slot * s_g0 + (pos % B).to(tl.int64)[:, None] * s_g2 + h * s_g3 + dd[None, :]
        k = tl.load(KIN + src * s_kt + h * s_kh + dd[None, :], mask=m2)
        tl.store(dst, k.to(STG.dtype.element_ty), mask=m2)
        v = tl.load(VIN + src * s_vt + h * s_vh + dd[None, :], mask=m2)
        tl.store(dst + s_g1, v.to(STG.dtype.element_ty), mask=m2)


@triton.jit(do_not_specialize=["num_qb", "n_sink"])
def _tq_staging_kernel(KIN, VIN, STG, QSL, SEQ, OSLOT, s_kt, s_kh, s_vt, s_vh, s_g0, s_g1, s_g2, s_g3,
                       QBR, QBI, num_qb, PKV, PTAG, SKV, STAG, n_sink, s_p0, s_p1, s_p2, s_k0, s_k1, s_k2,
                       D: tl.constexpr, DP: tl.constexpr, B: tl.constexpr, BP: tl.constexpr, H: tl.constexpr = 1,
                       COMMIT: tl.constexpr = False, CH: tl.constexpr = 16):
    """Program (r, h): `_stage_row`. COMMIT: program (r, h) also commits the pending sink entries r, r + R, ...
    (`_sink_commit`; in a step where every row decodes one token the store's sink-table writes wait until after the
    attention, which may run beside it)."""
    r = tl.program_id(0)
    h = tl.program_id(1)
    if COMMIT:
        _sink_commit(r, tl.num_programs(0), h, QBR, QBI, num_qb, PKV, PTAG, SKV, STAG, n_sink, s_p0, s_p1, s_p2,
                     s_k0, s_k1, s_k2, H, D, DP, CH)
    _stage_row(r, h, KIN, VIN, STG, QSL, SEQ, OSLOT, s_kt, s_kh, s_vt, s_vh, s_g0, s_g1, s_g2, s_g3, D, DP, B, BP)
