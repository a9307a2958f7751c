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


def asm_for(codes_bits: int, lattices: int, centroids: torch.Tensor) -> tuple[int, str, float]:
    """(mode, asm, delta) for decoding codes of `codes_bits` read with `lattices` sub-lattices; mode 0 = no asm.
    Mode 1 (4-bit grid codes) decodes to GRID_OFFSET + (u - 63.5): the kernel corrects with GRID_OFFSET and delta."""
    from tq_vllm.quant.codebook import grid_of
    c = tuple(float(x) for x in centroids.detach().cpu().tolist())
    if codes_bits == 4 and lattices == 2:
        g = grid_of(c)
        if g is not None:
            return 1, asm_4bit(tuple(g[1])), g[0]
    if codes_bits in (2, 3) and lattices == 4:
        return 2, asm_lt4bit(c), 1.0
    return 0, "", 1.0


def emulate(mode: int, centroids: torch.Tensor, *inputs: torch.Tensor) -> list[torch.Tensor]:
    """Torch model of the asm (element-wise semantics), for tests on machines without a GPU."""
    c = centroids.to(torch.float16)
    if mode == 1:
        from tq_vllm.quant.codebook import grid_of
        u = torch.tensor(grid_of(centroids.tolist())[1], dtype=torch.float32) + GRID_BASE
        b = inputs[0].to(torch.int64)
        return [u[b & 15].to(torch.float16), u[b >> 4].to(torch.float16)]
    p0, hh = (x.to(torch.int64) for x in inputs)
    return [c[((p0 >> (2 * r)) & 3) | (((hh >> r) & 1) << 2)] for r in range(4)]
