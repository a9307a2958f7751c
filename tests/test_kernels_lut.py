"""The inline-PTX centroid look-ups (tq_vllm/kernels/lut.py), checked on the CPU through a small PTX model.

The GPU runs the asm itself (tests/test_kernels.py -m gpu compares asm and table-gather decoding); here each
instruction the asm uses (b32 logic, shifts, mul.lo, prmt) is modelled per the PTX ISA, so a wrong selector or
table word fails without a GPU.
"""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from tq_vllm.kernels.lut import GRID_OFFSET, asm_4bit_i8, asm_for, emulate, emulate_i8
from tq_vllm.quant.codebook import codebook, grid_codebook, page_codebook

M32 = 0xFFFFFFFF


def _prmt(a: int, b: int, c: int) -> int:
    """prmt.b32 default mode: byte i of d = byte (c >> 4i) & 7 of {b, a}; bit 3 of the selector = sign replicate."""
    src = (b << 32) | a
    out = 0
    for i in range(4):
        sel = (c >> (4 * i)) & 0xF
        byte = (src >> (8 * (sel & 7))) & 0xFF
        if sel & 8:
            byte = 0xFF if byte & 0x80 else 0
        out |= byte << (8 * i)
    return out


def run_ptx(asm: str, inputs: list[int], nout: int) -> list[int]:
    regs = {f"${nout + i}": v for i, v in enumerate(inputs)}

    def val(t):
        t = t.strip()
        return regs[t] if t in regs else int(t, 0) & M32

    for line in asm.splitlines():
        line = line.strip().rstrip(";")
        if not line or line in "{}" or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        args = [x.strip() for x in rest.split(",")]
        d, src = args[0], [val(x) for x in args[1:]]
        r = {"mov.b32": lambda: src[0], "not.b32": lambda: ~src[0] & M32, "and.b32": lambda: src[0] & src[1],
             "or.b32": lambda: src[0] | src[1], "xor.b32": lambda: src[0] ^ src[1],
             "shl.b32": lambda: (src[0] << src[1]) & M32, "shr.u32": lambda: src[0] >> src[1],
             "mul.lo.u32": lambda: (src[0] * src[1]) & M32, "sub.u32": lambda: (src[0] - src[1]) & M32,
             "prmt.b32": lambda: _prmt(*src)}[op]()
        regs[d] = r
    return [regs[f"${i}"] for i in range(nout)]


def _halves(words):
    return np.array([h for w in words for h in (w & 0xFFFF, w >> 16)], dtype=np.uint16).view(np.float16)


@pytest.mark.parametrize("D", [64, 96, 128, 256])
@pytest.mark.parametrize("bits,lattices,form", [(4, 2, "signed"), (4, 2, "offset"), (3, 4, "signed"),
                                                (2, 4, "signed")])
def test_prmt_lut_matches_model(D, bits, lattices, form):
    c = page_codebook(D, bits, "k")[0]
    mode, asm, mult, signed = asm_for(bits, lattices, c, form)
    assert mode == (1 if bits == 4 else 2) and signed == (bits == 4 and form == "signed")
    rnd = random.Random(D * 10 + bits)
    for _ in range(200):
        bs = [rnd.randrange(256) for _ in range(4)]
        x = bs[0] | bs[1] << 8 | bs[2] << 16 | bs[3] << 24
        if mode == 1:
            out = run_ptx(asm, [x], 4)
            exp = emulate(1, c, torch.tensor(bs), signed=signed)
            assert np.array_equal(_halves(out[0:2]), exp[0].numpy())  # low nibbles: lattice 0
            assert np.array_equal(_halves(out[2:4]), exp[1].numpy())  # high nibbles: lattice 1
            # the kernel's correction: signed, asm value * mult; offset, (asm value - GRID_OFFSET) * delta
            for lat, sh in ((out[0:2], 0), (out[2:4], 4)):
                codes = torch.tensor([(b >> sh) & 15 for b in bs])
                h = torch.from_numpy(_halves(lat).astype(np.float64))
                got = h * mult if signed else (h - GRID_OFFSET) * mult
                assert torch.allclose(got, c[codes].double(), rtol=1e-6, atol=1e-9)
                if signed:  # subnormal fp16: sign bit and a mantissa below 128, exponent bits 0
                    bits16 = _halves(lat).view(np.uint16)
                    assert np.all((bits16 & 0x7C00) == 0) and np.all((bits16 & 0x3FF) < 128)
        else:
            hs = [rnd.randrange(16) if bits == 3 else 0 for _ in range(4)]
            out = run_ptx(asm, [x, hs[0] | hs[1] << 8 | hs[2] << 16 | hs[3] << 24], 8)
            exp = emulate(2, c, torch.tensor(bs), torch.tensor(hs))
            for r in range(4):
                assert np.array_equal(_halves(out[2 * r:2 * r + 2]), exp[r].numpy())


@pytest.mark.parametrize("D", [64, 128, 256])
def test_i8_lut_matches_model_and_codebook(D):
    """`asm_4bit_i8` (int8 u of 4-bit grid codes, for the integer-MMA key path) through the PTX model equals its torch
    model, and that model's two outputs are the codes of coordinates 8w + i and 8w + 4 + i of packed rows, with
    delta · (u - 63.5) the centroid."""
    from tq_vllm.quant.codebook import grid_of
    from tq_vllm.quant.packing import pack
    c = page_codebook(D, 4, "k")[0]
    delta, u = grid_of(c.tolist())
    asm = asm_4bit_i8(tuple(u))
    rnd = random.Random(D)
    for _ in range(200):
        bs = [rnd.randrange(256) for _ in range(4)]
        out = run_ptx(asm, [bs[0] | bs[1] << 8 | bs[2] << 16 | bs[3] << 24], 2)
        exp = emulate_i8(c, torch.tensor(bs))
        for o, e in zip(out, exp):
            assert [(o >> (8 * i)) & 0xFF for i in range(4)] == [int(x) & 0xFF for x in e]
    codes = torch.randint(0, 16, (5, D), generator=torch.Generator().manual_seed(D))
    a, b = emulate_i8(c, pack(codes, 4))  # [5, D/2] each
    w, i = torch.arange(D // 2) // 4, torch.arange(D // 2) % 4
    for got, off in ((a, 0), (b, 4)):
        cent = delta * (got.double() - 63.5)
        assert torch.allclose(cent, c[codes[:, 8 * w + off + i]].double(), rtol=1e-6, atol=1e-9)


def test_emulation_matches_codebook_decoding():
    """The element-wise model is the bit-plane decoding of packing.py (lattice r = coordinates R*t + r)."""
    from tq_vllm.quant.packing import pack
    D = 64
    for bits, R in ((4, 2), (3, 4), (2, 4)):
        c = page_codebook(D, bits, "v")[0]
        codes = torch.randint(0, 1 << bits, (5, D))
        packed = pack(codes, bits)
        if bits == 4:
            lat = emulate(1, c, packed)
        else:
            p0 = packed[:, :D // 4]
            if bits == 3:
                p1 = packed[:, D // 4:].to(torch.int64)
                t = torch.arange(D // 4)
                hh = (p1[:, t // 2] >> ((t % 2) * 4)) & 15
            else:
                hh = torch.zeros_like(p0)
            lat = emulate(2, c, p0, hh)
        for r in range(R):
            if bits == 4:  # grid codes: the offset form gives GRID_BASE + u, u = c / delta + 63.5
                _, _, delta, _ = asm_for(4, 2, c, "offset")
                exp = (c[codes[:, r::R]].double() / delta + GRID_OFFSET).round().to(torch.float16)
                assert torch.equal(lat[r], exp)
            else:
                assert torch.equal(lat[r], c.to(torch.float16)[codes[:, r::R]])
    assert asm_for(8, 1, codebook(D, 8))[0] == 0  # 8-bit codes use table gathers
    assert asm_for(4, 2, codebook(D, 4))[0] == 0  # 4-bit Lloyd–Max centroids off the grid: table gathers


@pytest.mark.parametrize("D", [64, 96, 128, 256])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_grid_codebook_is_close_to_lloyd_max(D, bits):
    """Page codebooks of <= 4 bits lie on the 128-level grid, symmetric, and cost < 0.6 % more squared error than
    the exact Lloyd–Max codebook (tq_vllm.quant.codebook)."""
    from tq_vllm.quant.codebook import _cell_mse, _codebook_np, grid_of
    g = grid_codebook(D, bits)
    delta, u = grid_of(g.tolist())
    assert all(0 <= x < 128 for x in u) and u == sorted(set(u)) and [127 - x for x in u[::-1]] == u
    assert torch.allclose(g.double(), delta * (torch.tensor(u, dtype=torch.float64) - 63.5), rtol=1e-6)
    lm = _codebook_np(D, bits)
    assert _cell_mse(D, g.double().numpy()) < _cell_mse(D, lm) * 1.006
    assert page_codebook(D, bits, "k_mean")[0].tolist() == codebook(D, bits).tolist()  # means stay Lloyd–Max
