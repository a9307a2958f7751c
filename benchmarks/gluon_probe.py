#!/usr/bin/env python
"""Probe for the next decode design: 3-bit value tiles decoded straight in the tensor-core operand layout, in Gluon.

Triton 3.6 moves the decoded 3-bit value tile of the split decode through shared memory (132 16-bit stores per tile
and thread, CTA barriers; docs/kernels.md, Open): its layout pass hoists a dot operand's layout onto the loads only
for a chain fed by one load, and a 3-bit tile comes from two bit planes. Gluon (triton.experimental.gluon) lets a
kernel name its layouts, so the plane bytes are loaded in the MMA A-operand layout itself and the prmt look-up
(`lut.asm_lt4bit`) decodes them in the registers the MMA reads.

The probe kernel does only that part of the page loop: per program, n tiles of 64 tokens x 128 dims of 3-bit codes
(the page planes' byte order: the 2-bit plane, then the 1-bit plane, token-major), each decoded into its 4 lattices
[32, 64] and multiplied with a [64, 8] fp16 tile P into 4 fp32 accumulators [32, 8] (acc_r = sum C_r P, lattice r =
coordinates 4t + r, as in attention.py).

    python benchmarks/gluon_probe.py            # compile for sm_90 offline: registers, spills, instruction mix
    python benchmarks/gluon_probe.py --run      # on a GPU: the kernel against torch on random codes

What it does not have yet: pipelined loads (the bytes are loaded straight from global memory, not via cp.async),
keys, the softmax, the split bookkeeping.
"""
from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

TOK, D, N = 64, 128, 8  # tokens per tile, head_dim, columns of P
XV = D // 4  # columns per lattice
TILE_BYTES = TOK * D * 3 // 8  # 2-bit plane (TOK x D/4) then 1-bit plane (TOK x D/8)


def kernel():
    """The Gluon kernel, built on first use: importing gluon inside a process that runs Triton's interpreter (the
    CPU tests) fails, and the tests import this module for `inputs`."""
    global gluon, gl, mma_v2, _KERNEL
    if _KERNEL is None:
        from triton.experimental import gluon
        from triton.experimental.gluon import language as gl
        from triton.experimental.gluon.language.nvidia.ampere import mma_v2

        @gluon.jit
        def _probe_kernel(CACHE, PV, OUT, n_tiles, ASM: gl.constexpr, TOK: gl.constexpr, XV: gl.constexpr,
                          N: gl.constexpr, TILE_BYTES: gl.constexpr):
            """Program p: tiles [p*n_tiles, (p+1)*n_tiles) of CACHE (uint8), P tiles of PV ([tiles, TOK, N] fp16);
            OUT [programs, 4, XV, N] fp32."""
            mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[2, 1], instr_shape=[16, 8])
            a_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=4)
            b_l: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=4)
            t = gl.expand_dims(gl.arange(0, XV, layout=gl.SliceLayout(1, a_l)), 1)  # [XV, 1] lattice column
            k = gl.expand_dims(gl.arange(0, TOK, layout=gl.SliceLayout(0, a_l)), 0)  # [1, TOK] token
            kb = gl.expand_dims(gl.arange(0, TOK, layout=gl.SliceLayout(1, b_l)), 1)
            nb = gl.expand_dims(gl.arange(0, N, layout=gl.SliceLayout(0, b_l)), 0)
            acc0 = gl.zeros([XV, N], gl.float32, mma)
            acc1 = gl.zeros([XV, N], gl.float32, mma)
            acc2 = gl.zeros([XV, N], gl.float32, mma)
            acc3 = gl.zeros([XV, N], gl.float32, mma)
            pid = gl.program_id(0)
            for i in range(pid * n_tiles, (pid + 1) * n_tiles):
                base = CACHE + i.to(gl.int64) * TILE_BYTES
                # [XV, TOK] in a_l: the 2-bit plane byte t of token k (lattices 0..3 of column t), the 1-bit plane
                # byte j = t // 2 (column 2j in its low nibble, 2j + 1 in its high one)
                p0 = gl.load(base + k * XV + t)
                p1 = gl.load(base + TOK * XV + k * (XV // 2) + t // 2)
                hh = (p1 >> ((t % 2) * 4).to(gl.uint8)) & 15
                c0, c1, c2, c3 = gl.inline_asm_elementwise(ASM, "=r,=r,=r,=r,=r,=r,=r,=r,r,r", [p0, hh],
                                                           dtype=(gl.float16, gl.float16, gl.float16, gl.float16),
                                                           is_pure=True, pack=4)
                pv = gl.load(PV + i.to(gl.int64) * (TOK * N) + kb * N + nb)
                acc0 = mma_v2(c0, pv, acc0)
                acc1 = mma_v2(c1, pv, acc1)
                acc2 = mma_v2(c2, pv, acc2)
                acc3 = mma_v2(c3, pv, acc3)
            ro = gl.expand_dims(gl.arange(0, XV, layout=gl.SliceLayout(1, mma)), 1)
            co = gl.expand_dims(gl.arange(0, N, layout=gl.SliceLayout(0, mma)), 0)
            o = OUT + pid * (4 * XV * N) + ro * N + co
            gl.store(o, acc0)
            gl.store(o + XV * N, acc1)
            gl.store(o + 2 * XV * N, acc2)
            gl.store(o + 3 * XV * N, acc3)

        _KERNEL = _probe_kernel
    return _KERNEL


_KERNEL = None


def inputs(programs: int, n_tiles: int, device, seed: int = 0):
    """Random 3-bit codes packed as page planes, P tiles, the asm and the torch result [programs, 4, XV, N]."""
    from tq_vllm.kernels.lut import asm_for
    from tq_vllm.quant.codebook import page_codebook
    from tq_vllm.quant.packing import pack
    g = torch.Generator().manual_seed(seed)
    tiles = programs * n_tiles
    c = page_codebook(D, 3, "v")[0]
    codes = torch.randint(0, 8, (tiles, TOK, D), generator=g)
    packed = pack(codes.reshape(-1, D), 3).reshape(tiles, TOK, -1)  # [tiles, TOK, D/4 + D/8]
    cache = torch.cat([packed[:, :, :XV].reshape(tiles, -1), packed[:, :, XV:].reshape(tiles, -1)], 1)
    p = torch.randn(tiles, TOK, N, generator=g).to(torch.float16)
    cent = c.to(torch.float16)[codes].float()  # [tiles, TOK, D]
    ref = torch.stack([torch.einsum("itc,itn->icn", cent[:, :, r::4], p.float()) for r in range(4)], 1)
    ref = ref.reshape(programs, n_tiles, 4, XV, N).sum(1)
    asm = asm_for(3, 4, c)[1]
    return cache.reshape(-1).to(device), p.to(device), asm, ref


def launch(cache, p, out, programs: int, n_tiles: int, asm: str):
    kernel()[(programs,)](cache, p, out, n_tiles, ASM=asm, TOK=TOK, XV=XV, N=N, TILE_BYTES=TILE_BYTES, num_warps=2)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", action="store_true", help="launch on the GPU and compare with torch")
    ap.add_argument("--arch", type=int, default=90)
    a = ap.parse_args(argv)
    programs, n_tiles = (132, 16) if a.run else (1, 2)
    if a.run:
        cache, p, asm, ref = inputs(programs, n_tiles, "cuda")
        out = torch.full((programs, 4, XV, N), float("nan"), device="cuda")
        launch(cache, p, out, programs, n_tiles, asm)
        err = ((out.cpu() - ref).norm() / ref.norm()).item()
        print(f"probe on {torch.cuda.get_device_name()}: relative error against torch {err:.2e}")
        # throughput of the decode + MMA alone on random bytes (no pipelining yet: a floor for the design, not a result)
        progs, nt = 132 * 8, 64
        big = torch.randint(0, 256, (progs * nt * TILE_BYTES,), dtype=torch.uint8, device="cuda")
        pb = torch.randn(progs * nt, TOK, N, device="cuda").to(torch.float16)
        ob = torch.empty(progs, 4, XV, N, device="cuda")
        launch(big, pb, ob, progs, nt, asm)
        torch.cuda.synchronize()
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        for _ in range(20):
            launch(big, pb, ob, progs, nt, asm)
        e1.record()
        torch.cuda.synchronize()
        ms = e0.elapsed_time(e1) / 20
        nbytes = big.numel() + pb.numel() * 2
        print(f"  {progs} programs x {nt} tiles: {ms:.4f} ms, {nbytes / ms / 1e6:.0f} GB/s of code and P bytes")
        return 0 if err < 1e-3 else 1
    os.environ.pop("TRITON_INTERPRET", None)
    import kernel_regs as KR
    KR.install(a.arch)
    cache, p, asm, _ = inputs(programs, n_tiles, "cpu")
    out = torch.zeros(programs, 4, XV, N)
    ck = kernel().warmup(cache, p, out, n_tiles, ASM=asm, TOK=TOK, XV=XV, N=N, TILE_BYTES=TILE_BYTES,
                              grid=(programs,), num_warps=2)
    s = KR.stats(ck)
    print(f"gluon probe, sm_{a.arch}: {s['regs']} registers, {s['spills']} B spilled, {s['shared_kb']} KB shared")
    print("    " + "  ".join(f"{k} {v}" for k, v in KR.mix(ck).items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
