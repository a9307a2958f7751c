"""Code -> fp16 centroid decoding with `prmt` byte permutes (inline PTX), no memory gathers.

A `prmt.b32 d, a, b, c` picks, for each of the 4 bytes of d, one of the 8 bytes of {a, b} by a 3-bit selector
nibble of c. With the low and the high bytes of up to 8 fp16 centroids held in two register pairs, two prmt give
the low and high bytes of 4 decoded values, and two more interleave them into 2 fp16x2 registers.

* 4-bit codes (2 per byte, lattices R=2): the Lloyd–Max codebook is symmetric (c[15-k] = -c[k]), so the 8
  magnitudes c[8..15] form the table; the magnitude index is (k&7) ^ (k<8 ? 7 : 0) and the sign is bit 3.
  Input: 4 bytes; outputs: the low-nibble values (lattice 0) and the high-nibble values (lattice 1).
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


@functools.lru_cache(maxsize=None)
def asm_4bit(centroids: tuple) -> str:
    c = list(centroids)
    assert len(c) == 16
    mag = _fp16_bits(c[8:])
    lo = [m & 0xFF for m in mag]
    hi = [m >> 8 for m in mag]
    return f"""{{
.reg .b32 tqneg, tqz, tqs3, tqm7, tqmi, tqc2, tql0, tqh0, tql1, tqh1, tqsg, tqtl0, tqtl1, tqth0, tqth1;
mov.b32 tqtl0, {_word(lo[:4])};
mov.b32 tqtl1, {_word(lo[4:])};
mov.b32 tqth0, {_word(hi[:4])};
mov.b32 tqth1, {_word(hi[4:])};
not.b32 tqneg, $4;
and.b32 tqneg, tqneg, 0x88888888;
shl.b32 tqz, tqneg, 4;
shr.u32 tqs3, $4, 3;
and.b32 tqs3, tqs3, 0x11111111;
mul.lo.u32 tqm7, tqs3, 7;
xor.b32 tqmi, $4, tqm7;
xor.b32 tqmi, tqmi, 0x77777777;
and.b32 tqmi, tqmi, 0x77777777;
shr.u32 tqc2, tqmi, 16;
prmt.b32 tql0, tqtl0, tqtl1, tqmi;
prmt.b32 tqh0, tqth0, tqth1, tqmi;
prmt.b32 tqsg, tqz, tqneg, 0x5140;
and.b32 tqsg, tqsg, 0x80808080;
or.b32 tqh0, tqh0, tqsg;
prmt.b32 $0, tql0, tqh0, 0x6240;
prmt.b32 $2, tql0, tqh0, 0x7351;
prmt.b32 tql1, tqtl0, tqtl1, tqc2;
prmt.b32 tqh1, tqth0, tqth1, tqc2;
prmt.b32 tqsg, tqz, tqneg, 0x7362;
and.b32 tqsg, tqsg, 0x80808080;
or.b32 tqh1, tqh1, tqsg;
prmt.b32 $1, tql1, tqh1, 0x6240;
prmt.b32 $3, tql1, tqh1, 0x7351;
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


def asm_for(codes_bits: int, lattices: int, centroids: torch.Tensor) -> tuple[int, str]:
    """(mode, asm) for decoding codes of `codes_bits` read with `lattices` sub-lattices; mode 0 = no asm."""
    c = tuple(float(x) for x in centroids.detach().cpu().tolist())
    if codes_bits == 4 and lattices == 2:
        cc = np.asarray(c)
        if np.allclose(cc[::-1], -cc, rtol=0, atol=1e-7):
            return 1, asm_4bit(c)
    if codes_bits in (2, 3) and lattices == 4:
        return 2, asm_lt4bit(c)
    return 0, ""


def emulate(mode: int, centroids: torch.Tensor, *inputs: torch.Tensor) -> list[torch.Tensor]:
    """Torch model of the asm (element-wise semantics), for tests on machines without a GPU."""
    c = centroids.to(torch.float16)
    if mode == 1:
        b = inputs[0].to(torch.int64)
        return [c[b & 15], c[b >> 4]]
    p0, hh = (x.to(torch.int64) for x in inputs)
    return [c[((p0 >> (2 * r)) & 3) | (((hh >> r) & 1) << 2)] for r in range(4)]
