"""Code -> fp16 centroid decoding with `prmt` byte permutes (inline PTX), no memory gathers.

A `prmt.b32 d, a, b, c` picks, for each of the 4 bytes of d, one of the 8 bytes of {a, b} by a 3-bit selector
nibble of c. With the low and the high bytes of up to 8 fp16 centroids held in two register pairs, two prmt give
the low and high bytes of 4 decoded values, and two more interleave them into 2 fp16x2 registers.

* 4-bit codes (2 per byte, lattices R=2) on the page grid (quant/codebook.py: c = delta·(u − 63.5), u < 128): the
  asm returns the fp16 number 1024 + u, whose bits are 0x64 (high byte) and u (low byte), so one prmt per output
  register builds it; the kernel subtracts 1087.5 · Σq (keys) or 1087.5 · Σp (values) from the dot product and
  multiplies by delta. u comes from two 8-entry byte tables, codes 0-7 and 8-15: a code's bit 3 puts prmt into
  sign-replicate mode for the other table, which then yields 0x00 (every u has bit 7 clear), so an OR merges them.
  13 instructions per 8 codes (the earlier fp16 look-up took 24). Input: 4 bytes; outputs: the low-nibble values
  (lattice 0) and the high-nibble values (lattice 1).
* The same codes in the *signed* form (`asm_4bit_signed`, the default): the codebook is symmetric (u[15-k] = 127 -
  u[k]), so a code's centroid is sign · a · delta/2 with a = |2u - 127| from one 8-entry byte table of magnitudes
  (codes >= 8 are positive with rank code - 8, codes < 8 negative with rank 7 - code). The asm returns the fp16
  with sign bit and *subnormal* mantissa a, i.e. ±a · 2^-24, exactly proportional to the centroid: no offset to
  remove after the dots (the offset form's GRID_OFFSET · Σq and Σp terms), one table register instead of two and
  no 0x64 register, so ptxas has fewer constants to keep or re-materialize per block.
* 2- and 3-bit codes (lattices R=4): a 2-bit plane byte holds elements 4t..4t+3 (low bits), the caller passes the
  matching nibble of the 1-bit plane (high bits; 0 for 2-bit codes). The 8 (or 4) centroids form the table.
  Inputs: 4 + 4 bytes; outputs: lattices 0..3.

Every output element depends only on its own input byte(s), so Triton may group elements as it likes.
"""
from __future__ import annotations

import functools

import numpy as np
import torch


def _fp16_bits(vals) -> list[int]:
    return [int(x) for x in np.asarray(vals, dtype=np.float16).view(np.uint16)]


def _word(bs: list[int]) -> str:
    return "0x%08x" % (bs[0] | bs[1] << 8 | bs[2] << 16 | bs[3] << 24)


GRID_BASE = 1024.0  # fp16 0x6400
GRID_OFFSET = GRID_BASE + 63.5  # decoded fp16 = GRID_OFFSET + (u - 63.5): subtract GRID_OFFSET · Σ, times delta
SIGNED_UNIT = 2.0 ** 24  # signed form: decoded fp16 = ±a · 2^-24, centroid = decoded · SIGNED_UNIT · delta / 2
LUT4_FORMS = ("signed", "offset")


def grid_magnitudes(u) -> list[int] | None:
    """The 8 magnitudes a = 2u - 127 of the positive half of a symmetric 16-level grid codebook (ascending), or
    None where `u` is not symmetric (u[15-k] == 127 - u[k])."""
    u = [int(x) for x in u]
    if len(u) != 16 or any(u[15 - k] != 127 - u[k] for k in range(16)):
        return None
    return [2 * u[8 + j] - 127 for j in range(8)]


@functools.lru_cache(maxsize=None)
def asm_4bit(u: tuple) -> str:
    """4-bit grid codes -> fp16(1024 + u[code]); `u` the 16 grid integers of the codebook (all < 128)."""
    assert len(u) == 16 and all(0 <= x < 128 for x in u)
    return f"""{{
.reg .b32 tqta0, tqta1, tqtb0, tqtb1, tqc, tqw, tqs, tqa, tqb, tqx, tqy;
mov.b32 tqta0, {_word(list(u[0:4]))};
mov.b32 tqta1, {_word(list(u[4:8]))};
mov.b32 tqtb0, {_word(list(u[8:12]))};
mov.b32 tqtb1, {_word(list(u[12:16]))};
mov.b32 tqc, 0x64646464;
xor.b32 tqw, $4, 0x88888888;
prmt.b32 tqa, tqta0, tqta1, $4;
prmt.b32 tqb, tqtb0, tqtb1, tqw;
or.b32 tqx, tqa, tqb;
shr.u32 tqs, $4, 16;
shr.u32 tqw, tqw, 16;
prmt.b32 tqa, tqta0, tqta1, tqs;
prmt.b32 tqb, tqtb0, tqtb1, tqw;
or.b32 tqy, tqa, tqb;
prmt.b32 $0, tqx, tqc, 0x4240;
prmt.b32 $2, tqx, tqc, 0x4341;
prmt.b32 $1, tqy, tqc, 0x4240;
prmt.b32 $3, tqy, tqc, 0x4341;
}}"""


@functools.lru_cache(maxsize=None)
def asm_4bit_signed(u: tuple) -> str:
    """4-bit symmetric grid codes -> fp16 ±a · 2^-24 (sign bit, subnormal mantissa a = |2u[code] - 127|)."""
    mags = grid_magnitudes(u)
    assert mags is not None and all(0 < a < 128 for a in mags), u
    return f"""{{
.reg .b32 tqt0, tqt1, tqn, tqm, tqs, tqx, tqy, tqa, tqb;
mov.b32 tqt0, {_word(mags[0:4])};
mov.b32 tqt1, {_word(mags[4:8])};
not.b32 tqn, $4;
and.b32 tqn, tqn, 0x88888888;
shr.u32 tqm, tqn, 3;
sub.u32 tqm, tqn, tqm;
xor.b32 tqs, $4, tqm;
and.b32 tqs, tqs, 0x77777777;
prmt.b32 tqx, tqt0, tqt1, tqs;
shr.u32 tqs, tqs, 16;
prmt.b32 tqy, tqt0, tqt1, tqs;
and.b32 tqb, tqn, 0x80808080;
shl.b32 tqa, tqn, 4;
and.b32 tqa, tqa, 0x80808080;
prmt.b32 $0, tqx, tqa, 0x5240;
prmt.b32 $2, tqx, tqb, 0x5341;
prmt.b32 $1, tqy, tqa, 0x7260;
prmt.b32 $3, tqy, tqb, 0x7361;
}}"""
# tqn: bit 3 of a nibble set where the code is < 8 (negative centroid); tqm: 7 there, so tqs = the magnitude rank
# (7 - code for negative codes, code - 8 for positive ones) with bit 3 clear (prmt's sign-replicate bit); tqa / tqb:
# byte k = 0x80 where the low / high nibble code of byte k is negative, the fp16 sign byte of its value.


@functools.lru_cache(maxsize=None)
def asm_4bit_i8(u: tuple) -> str:
    """4-bit grid codes -> int8 u[code] (0..127) for an integer MMA: 4 input bytes (8 codes, coordinates 8w .. 8w + 7
    of a page row) -> $0 = the codes of coordinates 8w .. 8w + 3 (the nibbles of bytes 0, 1), $1 = 8w + 4 .. 8w + 7.
    The two-table look-up of `asm_4bit` without its spread into fp16 halves: 9 instructions per 8 codes (the signed
    fp16 form takes 16)."""
    assert len(u) == 16 and all(0 <= x < 128 for x in u)
    return f"""{{
.reg .b32 tqta0, tqta1, tqtb0, tqtb1, tqw, tqs, tqa, tqb;
mov.b32 tqta0, {_word(list(u[0:4]))};
mov.b32 tqta1, {_word(list(u[4:8]))};
mov.b32 tqtb0, {_word(list(u[8:12]))};
mov.b32 tqtb1, {_word(list(u[12:16]))};
xor.b32 tqw, $2, 0x88888888;
prmt.b32 tqa, tqta0, tqta1, $2;
prmt.b32 tqb, tqtb0, tqtb1, tqw;
or.b32 $0, tqa, tqb;
shr.u32 tqs, $2, 16;
shr.u32 tqw, tqw, 16;
prmt.b32 tqa, tqta0, tqta1, tqs;
prmt.b32 tqb, tqtb0, tqtb1, tqw;
or.b32 $1, tqa, tqb;
}}"""


@functools.lru_cache(maxsize=None)
def asm_lt4bit(centroids: tuple) -> str:
    """2- or 3-bit codes, 4 lattices. $8 = 2-bit plane bytes, $9 = high-bit nibbles (bit r = lattice r)."""
    c = list(centroids) + [0.0] * (8 - len(centroids))
    v = _fp16_bits(c)
    lo = [m & 0xFF for m in v]
    hi = [m >> 8 for m in v]
    body = [".reg .b32 tqtl0, tqtl1, tqth0, tqth1, tqa, tqb, tqw, tql, tqh;",
            f"mov.b32 tqtl0, {_word(lo[:4])};", f"mov.b32 tqtl1, {_word(lo[4:])};",
            f"mov.b32 tqth0, {_word(hi[:4])};", f"mov.b32 tqth1, {_word(hi[4:])};"]
    for r in range(4):
        body += [f"shr.u32 tqa, $8, {2 * r};", "and.b32 tqa, tqa, 0x03030303;",
                 f"shr.u32 tqb, $9, {r};", "and.b32 tqb, tqb, 0x01010101;", "shl.b32 tqb, tqb, 2;",
                 "or.b32 tqa, tqa, tqb;", "shr.u32 tqw, tqa, 12;", "or.b32 tqw, tqw, tqa;",
                 "prmt.b32 tql, tqtl0, tqtl1, tqw;", "prmt.b32 tqh, tqth0, tqth1, tqw;",
                 f"prmt.b32 ${2 * r}, tql, tqh, 0x6240;", f"prmt.b32 ${2 * r + 1}, tql, tqh, 0x7351;"]
    return "{\n" + "\n".join(body) + "\n}"


def asm_for(codes_bits: int, lattices: int, centroids: torch.Tensor, form: str = "signed"
            ) -> tuple[int, str, float, bool]:
    """(mode, asm, multiplier, signed) for decoding codes of `codes_bits` read with `lattices` sub-lattices; mode 0 =
    no asm. Mode 1 (4-bit grid codes), `form` "signed": decodes to ±a · 2^-24, the centroid is that times the
    multiplier SIGNED_UNIT · delta / 2 (symmetric codebooks; others take the offset form); "offset": decodes to
    GRID_OFFSET + (u - 63.5), the kernel removes GRID_OFFSET · Σ and multiplies by delta."""
    from tq_vllm.quant.codebook import grid_of
    if form not in LUT4_FORMS:
        raise ValueError(f"TQ_VLLM_LUT4={form!r}: choose one of {', '.join(LUT4_FORMS)}")
    c = tuple(float(x) for x in centroids.detach().cpu().tolist())
    if codes_bits == 4 and lattices == 2:
        g = grid_of(c)
        if g is not None:
            if form == "signed" and grid_magnitudes(g[1]) is not None:
                return 1, asm_4bit_signed(tuple(g[1])), g[0] * SIGNED_UNIT / 2, True
            return 1, asm_4bit(tuple(g[1])), g[0], False
    if codes_bits in (2, 3) and lattices == 4:
        return 2, asm_lt4bit(c), 1.0, False
    return 0, "", 1.0, False


def grid_values(centroids, signed: bool) -> torch.Tensor | None:
    """fp16 [16]: what the 4-bit asm returns for each code (signed or offset form), None off the grid."""
    from tq_vllm.quant.codebook import grid_of
    g = grid_of([float(x) for x in centroids])
    if g is None:
        return None
    u = torch.tensor(g[1], dtype=torch.float64)
    if signed:
        if grid_magnitudes(g[1]) is None:
            return None
        return ((2 * u - 127) / SIGNED_UNIT).to(torch.float16)
    return (u + GRID_BASE).to(torch.float16)


def emulate_i8(centroids, b: torch.Tensor) -> list[torch.Tensor]:
    """Torch model of `asm_4bit_i8`: bytes `b` [..., 4k] (each 4 consecutive a pack) -> the two int8 outputs [..., 4k]
    (element 4w + i: u of coordinate 8w + i, resp. 8w + 4 + i)."""
    from tq_vllm.quant.codebook import grid_of
    u = torch.tensor(grid_of([float(x) for x in centroids])[1], dtype=torch.int8)
    b = b.to(torch.int64)
    nib = torch.stack([b & 15, b >> 4], -1).reshape(*b.shape[:-1], -1, 8)  # [..., k, 8]: coordinates 8w + j
    return [u[nib[..., :4]].reshape(b.shape), u[nib[..., 4:]].reshape(b.shape)]


def emulate(mode: int, centroids: torch.Tensor, *inputs: torch.Tensor, signed: bool = False) -> list[torch.Tensor]:
    """Torch model of the asm (element-wise semantics), for tests on machines without a GPU."""
    c = centroids.to(torch.float16)
    if mode == 1:
        u = grid_values(centroids.tolist(), signed)
        b = inputs[0].to(torch.int64)
        return [u[b & 15], u[b >> 4]]
    p0, hh = (x.to(torch.int64) for x in inputs)
    return [c[((p0 >> (2 * r)) & 3) | (((hh >> r) & 1) << 2)] for r in range(4)]
