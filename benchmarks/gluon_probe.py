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
coordinates 4t + r, as in attention.py). Variants (constexpr NSTAGE):

  0 or 1  the plane bytes and P loaded straight from global memory in the MMA operand layouts (byte loads, no
          pipelining: 1,157 GB/s of code and P bytes on an H200, 28 % of the copy bandwidth);
  >= 2    cp.async (16 B per copy) of tile i + NSTAGE - 1's planes and P into a ring of NSTAGE shared slots while
          tile i is decoded; the planes are read back in the A layout with the MMA rows permuted so that a thread's
          two rows share its reads (NAT0 .. RD1 below: 32 shared reads per tile and thread instead of 64, no bank
          conflicts), P with ldmatrix.trans. Results come out in the same order (row m is stored as column sigma(m)).
          H200, 2026-11-29: 1,950 GB/s at NSTAGE 2, 3 and 4 alike (48 %; docs/benchmarks.md, fourth session).

    python benchmarks/gluon_probe.py --stages 0,2,3,4          # compile for sm_90 offline: registers, spills, mix
    python benchmarks/gluon_probe.py --run --stages 0,2,3,4    # on a GPU: per variant ms, GB/s, error against torch

What it does not have yet: keys, the softmax, the split bookkeeping.
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

# Shared layouts of the pipelined variant (NSTAGE >= 2) as gl.SharedLinearLayout offset bases (offset bit -> logical
# index, XOR-combined; for TOK = 64, XV = 32, 2 warps). The planes land in the page's token-major byte order, 16 B
# chunks kept whole, but with token bits 2, 3 XOR-ed into the row-in-128-B-line bits (token bit 3 for the 1-bit
# plane): one A-operand read touches 4 tokens 4 apart (token bits 2, 3 are lanes 0, 1), which would otherwise be
# 128 B apart, in the same banks (a 4-way conflict on every read).
NAT0 = [[0, 1], [0, 2], [0, 4], [0, 8], [0, 16], [1, 0], [2, 0], [5, 0], [10, 0], [16, 0], [32, 0]]  # [TOK, XV]
NAT1 = [[0, 1], [0, 2], [0, 4], [0, 8], [1, 0], [2, 0], [4, 0], [9, 0], [16, 0], [32, 0]]  # [TOK, XV // 2]
# The same bytes read in the A operand's shape with its rows permuted: MMA row m holds lattice column t = sigma(m)
# (t bit 0 = m bit 3, a register bit of the A layout; t bits 1..3 = m bits 0..2, lanes 2..4; t bit 4 = m bit 4, the
# warp), so a thread's rows m and m + 8 are adjacent bytes of the 2-bit plane (one 16-bit read for both) and the two
# nibbles of one byte of the 1-bit plane (one 8-bit read for both): 32 reads per tile and thread instead of 64.
RD0 = [[8, 0], [1, 0], [2, 0], [4, 0], [16, 0], [0, 1], [0, 2], [0, 5], [0, 10], [0, 16], [0, 32]]  # [XV (m), TOK]
RD1 = [[0, 1, 0], [0, 2, 0], [0, 4, 0], [1, 0, 0], [0, 0, 1], [0, 0, 2], [0, 0, 4], [0, 0, 9], [0, 0, 16],
       [0, 0, 32]]  # [2 (m bit 4), 8 (m bits 0..2), TOK]: the 1-bit plane byte t // 2 of rows m, m + 8


def sigma(m):
    """The lattice column held by MMA row m in the pipelined variant (ints or integer tensors)."""
    return ((m >> 3) & 1) | ((m & 7) << 1) | (m & 16)


def kernel():
    """The Gluon kernel, built on first use: importing gluon inside a process that runs Triton's interpreter (the
    CPU tests) fails, and the tests import this module for `inputs`."""
    global gluon, gl, mma_v2, _KERNEL, _NAT0, _NAT1, _RD0, _RD1, _REINTERPRET
    if _KERNEL is None:
        from triton.experimental import gluon
        from triton.experimental.gluon import language as gl
        from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp
        from triton.experimental.gluon.language.nvidia.ampere import mma_v2

        # a jit function reads module globals only as constexprs
        _NAT0, _NAT1, _RD0, _RD1 = (gl.constexpr(x) for x in (NAT0, NAT1, RD0, RD1))
        # renamed after Triton 3.6 (the venv's Triton compiles this too)
        _copy = getattr(cp, "async_load", None) or cp.async_copy_global_to_shared
        _barrier = getattr(gl, "thread_barrier", None) or gl.barrier
        _REINTERPRET = gl.constexpr(hasattr(gl.shared_memory_descriptor, "reinterpret"))

        @gluon.jit
        def _view(smem, shape: gl.constexpr, layout: gl.constexpr):
            """The uint8 slot `smem` as `shape` in `layout` (same bytes)."""
            if _REINTERPRET:
                v = smem.reinterpret(gl.uint8, shape, layout)
            else:
                v = smem._reinterpret(gl.uint8, shape, layout)
            return v

        @gluon.jit
        def _sigma(m):
            """`sigma` in the kernel: the lattice column held by MMA row m."""
            return ((m >> 3) & 1) | ((m & 7) << 1) | (m & 16)

        @gluon.jit
        def _issue(CACHE, PV, s0, s1, sp, i, ok, TOK: gl.constexpr, XV: gl.constexpr, N: gl.constexpr,
                   TILE_BYTES: gl.constexpr):
            """cp.async of tile i's two planes and P tile into one ring slot, 16 contiguous bytes per thread and
            copy (the blocked layouts' size_per_thread); a false `ok` (a tile past the program's range) zero-fills."""
            l0: gl.constexpr = gl.BlockedLayout([1, 16], [16, 2], [2, 1], [1, 0])  # [TOK, XV] bytes
            l1: gl.constexpr = gl.BlockedLayout([1, 16], [32, 1], [2, 1], [1, 0])  # [TOK, XV // 2] bytes
            lp: gl.constexpr = gl.BlockedLayout([1, 8], [32, 1], [2, 1], [1, 0])  # [TOK, N] fp16
            base = CACHE + i.to(gl.int64) * TILE_BYTES
            r0 = gl.expand_dims(gl.arange(0, TOK, layout=gl.SliceLayout(1, l0)), 1)
            c0 = gl.expand_dims(gl.arange(0, XV, layout=gl.SliceLayout(0, l0)), 0)
            _copy(s0, base + r0 * XV + c0, mask=(r0 < TOK) & ok)
            r1 = gl.expand_dims(gl.arange(0, TOK, layout=gl.SliceLayout(1, l1)), 1)
            c1 = gl.expand_dims(gl.arange(0, XV // 2, layout=gl.SliceLayout(0, l1)), 0)
            _copy(s1, base + TOK * XV + r1 * (XV // 2) + c1, mask=(r1 < TOK) & ok)
            rp = gl.expand_dims(gl.arange(0, TOK, layout=gl.SliceLayout(1, lp)), 1)
            cq = gl.expand_dims(gl.arange(0, N, layout=gl.SliceLayout(0, lp)), 0)
            _copy(sp, PV + i.to(gl.int64) * (TOK * N) + rp * N + cq, mask=(rp < TOK) & ok)
            cp.commit_group()

        @gluon.jit
        def _probe_kernel(CACHE, PV, OUT, n_tiles, ASM: gl.constexpr, TOK: gl.constexpr, XV: gl.constexpr,
                          N: gl.constexpr, TILE_BYTES: gl.constexpr, NSTAGE: gl.constexpr = 0):
            """Program p: tiles [p*n_tiles, (p+1)*n_tiles) of CACHE (uint8), P tiles of PV ([tiles, TOK, N] fp16);
            OUT [programs, 4, XV, N] fp32. NSTAGE < 2: operands loaded from global memory in the MMA operand layouts;
            NSTAGE >= 2: via a ring of NSTAGE shared buffers filled by cp.async NSTAGE - 1 tiles ahead."""
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
            first = pid * n_tiles
            end = first + n_tiles
            if NSTAGE >= 2:
                # Rings of NSTAGE slots filled by cp.async (NAT0, NAT1; P row-major, read by ldmatrix.trans) and
                # read in the A layout with rows permuted (RD0, RD1: see their comment)
                nat0: gl.constexpr = gl.SharedLinearLayout(_NAT0)
                nat1: gl.constexpr = gl.SharedLinearLayout(_NAT1)
                rd0: gl.constexpr = gl.SharedLinearLayout(_RD0)
                rd1: gl.constexpr = gl.SharedLinearLayout(_RD1)
                # a_l (gl.to_linear_layout(a_l, [XV, TOK]): regs k0 k1 m3 k4 k5, lanes k2 k3 m0 m1 m2, warp m4) on
                # [m bit 4, m bit 3, m bits 0..2, k]; sliced at dim 1 it is the 1-bit plane read's layout
                h4: gl.constexpr = gl.DistributedLinearLayout(
                    reg_bases=[[0, 0, 0, 1], [0, 0, 0, 2], [0, 1, 0, 0], [0, 0, 0, 16], [0, 0, 0, 32]],
                    lane_bases=[[0, 0, 0, 4], [0, 0, 0, 8], [0, 0, 1, 0], [0, 0, 2, 0], [0, 0, 4, 0]],
                    warp_bases=[[1, 0, 0, 0]], block_bases=[], shape=[2, 2, XV // 4, TOK])
                r0 = gl.allocate_shared_memory(gl.uint8, [NSTAGE, TOK, XV], nat0)
                r1 = gl.allocate_shared_memory(gl.uint8, [NSTAGE, TOK, XV // 2], nat1)
                rp = gl.allocate_shared_memory(gl.float16, [NSTAGE, TOK, N], gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))
                t = _sigma(t)  # the lattice column of MMA row m
                for s in gl.static_range(NSTAGE - 1):  # prologue: tiles first .. first + NSTAGE - 2 in flight
                    _issue(CACHE, PV, r0.index(s), r1.index(s), rp.index(s), first + s,
                           first + s < end, TOK, XV, N, TILE_BYTES)
            for i in range(first, end):
                if NSTAGE >= 2:
                    j = i - first
                    # one commit group per tile (empty ones past the end included), so NSTAGE - 2 groups still
                    # pending means tile i's (this thread's part) has landed
                    cp.wait_group(NSTAGE - 2)
                    # makes every thread's copies of tile i visible, and guarantees all warps are done reading
                    # slot (j - 1) % NSTAGE (tile i - 1), which the copy issued next overwrites. (Triton's membar
                    # pass also puts a second one between the reads below and that copy: it cannot tell the ring's
                    # slots apart. Triton 3.9 does without it.)
                    _barrier()
                    cur = j % NSTAGE
                    p0 = _view(r0.index(cur), [XV, TOK], rd0).load(a_l)
                    # the 1-bit plane byte of rows m and m + 8, loaded once (h4 less m bit 3), broadcast over that
                    # register bit and folded back into m: a_l, nothing moved
                    h = _view(r1.index(cur), [2, XV // 4, TOK], rd1).load(gl.SliceLayout(1, h4))
                    h = gl.broadcast(gl.expand_dims(h, 1), gl.full([2, 2, XV // 4, TOK], 0, gl.uint8, h4))[0]
                    p1 = gl.convert_layout(gl.reshape(h, [XV, TOK]), a_l, assert_trivial=True)
                    pv = rp.index(cur).load(b_l)
                    nxt = (j + NSTAGE - 1) % NSTAGE
                    _issue(CACHE, PV, r0.index(nxt), r1.index(nxt), rp.index(nxt),
                           i + NSTAGE - 1, i + NSTAGE - 1 < end, TOK, XV, N, TILE_BYTES)
                else:
                    base = CACHE + i.to(gl.int64) * TILE_BYTES
                    # [XV, TOK] in a_l: the 2-bit plane byte t of token k (lattices 0..3 of column t), the 1-bit
                    # plane byte j = t // 2 (column 2j in its low nibble, 2j + 1 in its high one)
                    p0 = gl.load(base + k * XV + t)
                    p1 = gl.load(base + TOK * XV + k * (XV // 2) + t // 2)
                    pv = gl.load(PV + i.to(gl.int64) * (TOK * N) + kb * N + nb)
                hh = (p1 >> ((t % 2) * 4).to(gl.uint8)) & 15
                c0, c1, c2, c3 = gl.inline_asm_elementwise(ASM, "=r,=r,=r,=r,=r,=r,=r,=r,r,r", [p0, hh],
                                                           dtype=(gl.float16, gl.float16, gl.float16, gl.float16),
                                                           is_pure=True, pack=4)
                acc0 = mma_v2(c0, pv, acc0)
                acc1 = mma_v2(c1, pv, acc1)
                acc2 = mma_v2(c2, pv, acc2)
                acc3 = mma_v2(c3, pv, acc3)
            if NSTAGE >= 2:
                cp.wait_group(0)  # the empty trailing groups; nothing may be in flight at exit
            ro = gl.expand_dims(gl.arange(0, XV, layout=gl.SliceLayout(1, mma)), 1)
            if NSTAGE >= 2:
                ro = _sigma(ro)  # row m holds column sigma(m)
            co = gl.expand_dims(gl.arange(0, N, layout=gl.SliceLayout(0, mma)), 0)
            o = OUT + pid * (4 * XV * N) + ro * N + co
            gl.store(o, acc0)
            gl.store(o + XV * N, acc1)
            gl.store(o + 2 * XV * N, acc2)
            gl.store(o + 3 * XV * N, acc3)

        _KERNEL = _probe_kernel
    return _KERNEL


_KERNEL = _NAT0 = _NAT1 = _RD0 = _RD1 = _REINTERPRET = None


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


def launch(cache, p, out, programs: int, n_tiles: int, asm: str, nstage: int = 0):
    kernel()[(programs,)](cache, p, out, n_tiles, ASM=asm, TOK=TOK, XV=XV, N=N, TILE_BYTES=TILE_BYTES, NSTAGE=nstage,
                          num_warps=2)


def _time(fn, reps: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(reps):
        fn()
    e1.record()
    torch.cuda.synchronize()
    return e0.elapsed_time(e1) / reps


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", action="store_true", help="launch on the GPU and compare with torch")
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--stages", default="0", help="variants, comma-separated NSTAGE values: 0 (or 1) = direct loads, "
                                                  ">= 2 = cp.async ring of that many slots (default 0)")
    a = ap.parse_args(argv)
    stages = [int(x) for x in a.stages.split(",")]
    if a.run:
        # correctness: 132 programs x 16 tiles, and 5 x 3 (fewer tiles than ring slots: the zero-filled copies)
        cases = [(pr, nt, *inputs(pr, nt, "cuda", seed=pr)) for pr, nt in ((132, 16), (5, 3))]
        # throughput of the decode + MMA alone on random bytes
        progs, nt = 132 * 8, 64
        big = torch.randint(0, 256, (progs * nt * TILE_BYTES,), dtype=torch.uint8, device="cuda")
        pb = torch.randn(progs * nt, TOK, N, device="cuda").to(torch.float16)
        ob = torch.empty(progs, 4, XV, N, device="cuda")
        nbytes = big.numel() + pb.numel() * 2
        cp = torch.empty_like(big)
        ms = _time(lambda: cp.copy_(big))
        print(f"probe on {torch.cuda.get_device_name()}, {progs} programs x {nt} tiles, {nbytes / 1e6:.0f} MB of code "
              f"and P bytes; copy of the codes: {2 * big.numel() / ms / 1e6:.0f} GB/s")
        ok = True
        for ns in stages:
            errs = []
            for pr, nt_, cache, p, asm, ref in cases:
                out = torch.full((pr, 4, XV, N), float("nan"), device="cuda")
                launch(cache, p, out, pr, nt_, asm, ns)
                errs.append(((out.cpu() - ref).norm() / ref.norm()).item())
            ok &= all(e < 1e-3 for e in errs)  # a NaN fails
            ms = _time(lambda: launch(big, pb, ob, progs, nt, cases[0][4], ns))
            print(f"  NSTAGE={ns}: {ms:.4f} ms, {nbytes / ms / 1e6:.0f} GB/s, relative error against torch "
                  + " / ".join(f"{e:.2e}" for e in errs))
        return 0 if ok else 1
    os.environ.pop("TRITON_INTERPRET", None)
    import kernel_regs as KR
    KR.install(a.arch)
    programs, n_tiles = 1, 2
    cache, p, asm, _ = inputs(programs, n_tiles, "cpu")
    out = torch.zeros(programs, 4, XV, N)
    for ns in stages:
        ck = kernel().warmup(cache, p, out, n_tiles, ASM=asm, TOK=TOK, XV=XV, N=N, TILE_BYTES=TILE_BYTES, NSTAGE=ns,
                             grid=(programs,), num_warps=2)
        s = KR.stats(ck)
        print(f"gluon probe NSTAGE={ns}, sm_{a.arch}: {s['regs']} registers, {s['spills']} B spilled, "
              f"{s['shared_kb']} KB shared")
        print("    " + "  ".join(f"{k} {v}" for k, v in KR.mix(ck).items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
