"""Triton kernels (tq_vllm.kernels) against the torch reference (tq_vllm.quant.reference).

On CPU the Triton kernels run under TRITON_INTERPRET=1 at small shapes; `@pytest.mark.gpu` cases use realistic
shapes on CUDA. Every attention output is poisoned (NaN) before the run and checked to be fully written.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import zlib

import pytest
import torch

from page_check import certify_pages
from paged_sim import PagedSim, naive_decode_semantics
from tq_vllm import kernels as K
from tq_vllm.kernels.params import layout_constexprs
from tq_vllm.quant import PRESETS
from tq_vllm.quant import reference as ref
from tq_vllm.quant.codec import LayerCodec
from tq_vllm.quant.plan import StagingAllocator, make_step_plan

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"  # on a GPU machine the small cases run on CUDA too


@pytest.fixture(autouse=True)
def _triton_mode(monkeypatch):
    """CPU: run the Triton kernels in the interpreter (only for these tests: the variable is restored after) with
    small prefill tiles (faster, and several query tiles per row get exercised)."""
    if not CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        monkeypatch.setattr(K, "PREFILL_ROWS", 32)


@pytest.fixture(autouse=True)
def _no_silent_launch_fallback():
    """A launch configuration that fails to compile falls back to a safer one with a warning (`kernels._launch`):
    in these tests that would test the fallback instead of the path they name, so it fails them."""
    before = dict(K._FALLBACK_USED)
    yield
    assert K._FALLBACK_USED == before, {k: v for k, v in K._FALLBACK_USED.items() if k not in before}


@pytest.fixture(autouse=True)
def _no_silent_prefill_fallback():
    """On a GPU the prefill rows go through FlashAttention: a failure there must not hide behind the fallback."""
    n = len(K._FA_FAILED)
    yield
    assert len(K._FA_FAILED) == n, K._FA_FAILED[n:]


def _seed(*key) -> int:
    """Stable across processes (hash() of a str is salted per process)."""
    return zlib.crc32(repr(key).encode()) % 100003


def _rel(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def _tol(dtype):
    return 8e-3 if dtype == torch.bfloat16 else 4e-3


def _seqs(n, L, H, G, D, dtype, seed, kscale=2.0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q = {i: torch.randn(L, H * G, D, generator=g).to(dtype) for i in range(n)}
    k = {i: (torch.randn(L, H, D, generator=g) * kscale + 0.5 * torch.randn(1, H, D, generator=g)).to(dtype)
         for i in range(n)}
    v = {i: (torch.randn(L, H, D, generator=g) + 0.3 * torch.randn(1, H, D, generator=g)).to(dtype) for i in range(n)}
    return q, k, v


def _triton_op(codec, q, k, v, cache, staging, plan, scale, sink=None):
    out = torch.full(q.shape, float("nan"), dtype=q.dtype, device=q.device)  # poisoned
    res = K.forward_step(codec, q, k, v, cache, staging, plan, scale, out=out, force="triton", sink=sink)
    assert res is out
    assert not torch.isnan(out).any(), "some output elements were not written"
    return out


def _same_pages_op(record):
    """`_triton_op` that also appends (its output, the reference attention over the pages the kernels wrote) to
    `record`: the state the attention saw is the staging before the step and the sink table after the store."""
    def op(codec, q, k, v, cache, staging, plan, scale, sink=None):
        staging0 = staging.clone()
        sink0 = None if sink is None else tuple(t.clone() for t in sink)
        out = _triton_op(codec, q, k, v, cache, staging, plan, scale, sink=sink)
        record.append((out, ref.attention(codec, q, k, v, cache, staging0, plan, scale,
                                          sink=sink0 if _decode_only(plan) else sink)))
        return out
    return op


def _decode_only(plan) -> bool:
    """Whether every row of the step decodes one token (then the kernels write the sink entries after the
    attention: kernels.forward_step)."""
    qsl = plan.query_start_loc.cpu()
    return bool(((qsl[1:] - qsl[:-1]) == 1).all())


def _ref_op(codec, q, k, v, cache, staging, plan, scale, sink=None):
    """The reference in the kernels' order of effects: in a step where every row decodes one token the sink table
    is written after the attention (kernels.forward_step)."""
    return ref.forward_step(codec, q, k, v, cache, staging, plan, scale, sink=sink, defer_sink=_decode_only(plan))


def _certify_schedule_pages(codec, sa, sb, k, v, what) -> set:
    """Certify the pages of every completed block of a PagedSim run (`sa` the kernels', `sb` the reference's) with
    `page_check.certify_pages`; returns the requests whose pages differ from the reference's (ties only)."""
    B = codec.block_size
    ids, kb, vb, owner = [], [], [], []
    for rid, tab in sa.tables.items():
        for j in range(sa.done.get(rid, 0) // B):
            ids.append(tab[j])
            kb.append(k[rid][j * B:(j + 1) * B])
            vb.append(v[rid][j * B:(j + 1) * B])
            owner.append(rid)
    if not ids:
        return set()
    ndiff, bad = certify_pages(codec, sa.cache, sb.cache, ids, torch.stack(kb), torch.stack(vb))
    assert not bad, (what, ndiff, bad)
    if ndiff == 0:
        return set()
    differs = (codec.page_view(sa.cache)[ids] != codec.page_view(sb.cache)[ids]).flatten(1).any(1).tolist()
    return {owner[i] for i, d in enumerate(differs) if d}


def _run_schedule(preset, D, B, H, G, dtype, schedule, seed=0, num_blocks=64, device=DEV, lengths=None,
                  sink_entries=4096):
    codec = LayerCodec(preset, D, B, layer_index=3, device=device)
    n = 1 + max(r for step in schedule for r, _ in step)
    Lmax = lengths or max(sum(c for s in schedule for r2, c in s if r2 == r) for r in range(n)) + 1
    q, k, v = _seqs(n, Lmax, H, G, D, dtype, seed)
    sa, sb = (PagedSim(codec, H, num_blocks=num_blocks, num_slots=2 * n + 2, dtype=dtype, device=device, seed=seed,
                       sink_entries=sink_entries) for _ in range(2))
    scale = D ** -0.5
    same_pages = []
    for step in schedule:
        oa = sa.step(_same_pages_op(same_pages), step, q, k, v, scale)
        ob = sb.step(_ref_op, step, q, k, v, scale)
        if codec.preset.sink:
            assert torch.equal(sa.sink[1], sb.sink[1]) and torch.equal(sa.sink[0], sb.sink[0])
        # the attention kernels against the reference attention over the same (the kernels') pages
        err = _rel(*same_pages.pop())
        assert err < _tol(dtype), (preset, D, B, G, step, "same pages", err)
        assert torch.equal(sa.staging, sb.staging), (preset, D, B, G, step, "staging")
        # the store: every page the definition's, up to fp32 ties (tests/page_check.py)
        tied = _certify_schedule_pages(codec, sa, sb, k, v, (preset, D, B, G, step))
        # the whole step (store + attention) against the reference's, for the rows whose pages are byte-identical:
        # a code flipped at a tie moves a strongly attended key by one level (an output by 0.0062 in tq25, head_dim
        # 64, block 128, GQA 8), and QJL signs flip where S·e is near 0, each moving a key by ~2·sqrt(pi/2)·|e|/D
        # along a row of S: prod keys get more room
        tol = _tol(dtype) * (1.5 if codec.preset.k_mode == "prod" else 1.0)
        for rid in oa:
            assert oa[rid].dtype == dtype
            if rid not in tied:
                err = _rel(oa[rid], ob[rid])
                assert err < tol, (preset, D, B, G, step, rid, err)
    # codes may legitimately differ where a value sits on a decision boundary (fp32 summation order of the
    # rotation): a handful of bytes, never whole pages
    used = sorted({b for t in sa.tables.values() for b in t})  # pages of the schedule's blocks (not the rest)
    same = (sa.cache[used] == sb.cache[used]).float().mean().item()
    assert same >= 0.999, same
    assert torch.equal(sa.staging, sb.staging)
    return codec, sa, sb


# ---------------------------------------------------------------------------------------------------------------
# store
# ---------------------------------------------------------------------------------------------------------------
STORE_CASES = [("tq4", 64, 16), ("tq3", 64, 32), ("tq35", 96, 16), ("tq25", 64, 16), ("tq4-prod", 64, 16),
               ("tq8", 64, 16), ("tq4", 128, 64), ("tq3", 256, 16), ("tq4-prod", 96, 128)]


@pytest.mark.parametrize("preset,D,B", STORE_CASES)
def test_store_matches_reference(preset, D, B):
    """Chunk that completes blocks from staging + input (ctx % B != 0), padded qb list (graph style)."""
    _check_store(preset, D, B)


@pytest.mark.parametrize("preset,D,B", [("tq4", 64, 32), ("tq3", 128, 64), ("tq4-prod", 64, 32), ("tq25", 64, 64)])
def test_store_sub_tiles_in_parallel_match_reference(preset, D, B, monkeypatch):
    """TQ_VLLM_STORE_PAR=1 with 16-row sub-tiles: a block's sub-tiles coded by separate programs (each computes the
    block mean from the whole block; sub-tile 0 writes mean, sink tag and padding) give the reference's pages."""
    monkeypatch.setenv("TQ_VLLM_STORE_PAR", "1")
    monkeypatch.setenv("TQ_VLLM_STORE_ROWS", "16")
    _check_store(preset, D, B)


def _check_store(preset, D, B):
    torch.manual_seed(_seed(preset, D, B))
    H = 2
    codec = LayerCodec(preset, D, B, layer_index=1, device=DEV)
    C = codec.layout.bytes_per_token
    ctx, nq = B // 2 + 3, B + B // 2  # completes blocks 0 and 1 (block 0 half from staging)
    L = ctx + nq
    nb = 6
    cache = torch.randint(0, 256, (nb, H, B, C), dtype=torch.uint8, device=DEV)
    staging = torch.randn(3, 2, B, H, D, device=DEV).to(torch.bfloat16) * 3
    k = (torch.randn(nq, H, D, device=DEV) * 2 + 1).to(torch.bfloat16)
    v = torch.randn(nq, H, D, device=DEV).to(torch.bfloat16)
    k[1, 0] = 0  # a zero vector codes to scale 0
    bt = torch.tensor([[4, 1, 3]], dtype=torch.int32, device=DEV)
    alloc = StagingAllocator(3)
    alloc.assign(4)  # block 4 (index 0 of the row) is open before the step -> slot 0
    plan = make_step_plan(torch.tensor([0, nq]), torch.tensor([L]), bt, B, alloc, device=DEV)
    assert plan.qb_row.tolist() == [0, 0]
    a, b = cache.clone(), cache.clone()
    ref.store_full_blocks(codec, a, staging, k, v, plan)
    padded = dataclasses.replace(plan, qb_row=torch.tensor([0, -1, 0, -1], dtype=torch.int32, device=DEV),
                                 qb_idx=torch.tensor([0, 5, 1, 7], dtype=torch.int32, device=DEV))
    K.store_blocks(codec, b, staging, k, v, padded, force="triton")
    ids = torch.tensor([4, 1], device=DEV)
    untouched = [i for i in range(nb) if i not in (4, 1)]
    assert torch.equal(a[untouched], b[untouched]) and torch.equal(b[untouched], cache[untouched])
    # the definition's pages up to fp32 ties, from the exact input (block 0: staging, then the chunk)
    kx = torch.stack([torch.cat([staging[0, 0, :ctx], k[:B - ctx]]), k[B - ctx:2 * B - ctx]])
    vx = torch.stack([torch.cat([staging[0, 1, :ctx], v[:B - ctx]]), v[B - ctx:2 * B - ctx]])
    _, bad = certify_pages(codec, b, a, ids, kx, vx)
    assert not bad, bad
    if not CUDA:
        # byte-identical in the interpreter, except a code whose value sits within fp32 summation noise of a
        # decision boundary (the rotation's order differs): such a flip moves one code byte, nothing else
        pa, pb = codec.page_view(a), codec.page_view(b)
        diff = (pa != pb).nonzero().tolist()
        assert len(diff) <= 2, diff
        planes = [f for kind in ("k", "v") for f in codec.layout.planes(kind)]
        for blk, h, off in diff:
            assert any(f.offset <= off < f.end for f in planes), (blk, h, off)
        ka, va = codec.dequantize_pages(a, ids)
        kb, vb = codec.dequantize_pages(b, ids)
        assert _rel(kb, ka) < 2e-3 and _rel(vb, va) < 2e-3
    else:
        assert (a == b).float().mean().item() > 0.995
        ka, va = codec.dequantize_pages(a, ids)
        kb, vb = codec.dequantize_pages(b, ids)
        assert _rel(kb, ka) < 2e-3 and _rel(vb, va) < 2e-3


def test_store_special_values():
    """Zero vectors code to scale 0 (decode to zeros); any NaN/Inf to scale NaN (decode to NaN), like the reference;
    a NaN as a row's only non-finite element, rows of +-Inf, a row whose norm overflows; and the robust norm's
    range: a row with one element near the bf16 maximum (its squares overflow fp32) and a row of 1e-30 (its squares
    underflow) code as the reference does (byte-identical in the interpreter)."""
    D, B, H = 64, 16, 2
    codec = LayerCodec("tq4", D, B, device=DEV)
    C = codec.layout.bytes_per_token
    k = torch.randn(B, H, D, device=DEV).to(torch.bfloat16)
    v = torch.randn(B, H, D, device=DEV).to(torch.bfloat16)
    k[3, 1] = 0
    v[5, 0] = 0
    v[7, 1, 3] = float("nan")
    k[2, 0, 9] = float("inf")
    v[8, 0] = float("inf")
    v[9, 0] = float("inf")
    v[9, 0, ::2] = -float("inf")
    v[10, 0] = 3e38  # the norm overflows: not finite
    v[11, 0, 5] = 3e38  # one huge element: finite
    v[12, 0] = v[12, 0] * 1e-30
    v[13, 1, 4] = -float("inf")
    v[14, 1] = float("nan")
    bt = torch.tensor([[2]], dtype=torch.int32, device=DEV)
    plan = make_step_plan(torch.tensor([0, B]), torch.tensor([B]), bt, B, StagingAllocator(1), device=DEV)
    cache = torch.randint(0, 256, (3, H, B, C), dtype=torch.uint8, device=DEV)
    a, b = cache.clone(), cache.clone()
    staging = torch.zeros(1, 2, B, H, D, dtype=torch.bfloat16, device=DEV)
    ref.store_full_blocks(codec, a, staging, k, v, plan)
    K.store_blocks(codec, b, staging, k, v, plan, force="triton")
    kd, vd = codec.dequantize_pages(b, torch.tensor([2], device=DEV))
    assert torch.isnan(vd[0, 7, 1]).all() and torch.isfinite(vd[0, 6, 1]).all()
    for t, h in ((8, 0), (9, 0), (10, 0), (13, 1), (14, 1)):
        assert torch.isnan(vd[0, t, h]).all(), (t, h)
    assert torch.isfinite(vd[0, 11, 0]).all() and vd[0, 11, 0].abs().max() > 1e37
    assert torch.isfinite(vd[0, 12, 0]).all() and 0 < vd[0, 12, 0].abs().max() < 1e-28
    assert torch.isnan(kd[0, :, 0]).all()  # the Inf key poisons its block mean -> whole (block, head) NaN
    assert torch.isfinite(kd[0, :, 1]).all()
    assert torch.equal(vd[0, 5, 0], torch.zeros_like(vd[0, 5, 0]))
    if not CUDA:
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------------------------
# attention + step (paged simulator: random block ids, mixed prefill/decode, chunking)
# ---------------------------------------------------------------------------------------------------------------
MIXED = [[(0, 37), (1, 20)], [(0, 1), (1, 1), (2, 26)], [(0, 1), (1, 13), (2, 1)], [(0, 1), (2, 1), (1, 1)]]
STEP_CASES = [
    # preset, D, B, H, G, dtype
    ("tq4", 64, 16, 2, 1, torch.bfloat16),
    ("tq4", 64, 16, 2, 4, torch.float16),
    ("tq3", 64, 16, 1, 7, torch.bfloat16),
    ("tq35", 128, 32, 1, 8, torch.bfloat16),
    ("tq25", 96, 16, 2, 4, torch.float16),
    ("tq4-prod", 64, 32, 2, 4, torch.bfloat16),
    ("tq8", 64, 16, 1, 2, torch.float16),
    ("tq4", 64, 128, 1, 4, torch.bfloat16),
]


@pytest.mark.parametrize("preset,D,B,H,G,dtype", STEP_CASES)
def test_forward_step_matches_reference(preset, D, B, H, G, dtype):
    _run_schedule(preset, D, B, H, G, dtype, MIXED, seed=_seed(preset, D, B, G))


@pytest.mark.parametrize("preset,D,B,H,G,dtype,form", [("tq4", 64, 16, 2, 4, torch.bfloat16, "signed"),
                                                      ("tq4", 96, 32, 1, 7, torch.float16, "signed"),
                                                      ("tq4", 96, 32, 1, 7, torch.float16, "offset"),
                                                      ("tq35", 128, 16, 1, 8, torch.bfloat16, "signed")])
def test_grid_decode_path_matches_reference(preset, D, B, H, G, dtype, form, monkeypatch):
    """4-bit grid codes through the asm's path, in its signed form (fp16 ±a · 2^-24, scaled after the dots) or its
    offset form (fp16 GRID_BASE + u, offset and delta removed after the dots), with the asm's values gathered from a
    table (TQ_VLLM_LUT=emulate; the asm itself: test_kernels_lut.py and the GPU tests): decode splits and the fused
    prefill equal the reference."""
    monkeypatch.setenv("TQ_VLLM_LUT", "emulate")
    monkeypatch.setenv("TQ_VLLM_LUT4", form)
    codec = LayerCodec(preset, D, B)
    modes = K._lut_modes(codec, torch.device(DEV), 2, 2)  # 4-bit planes are read with 2 lattices
    assert modes["KMODE"] == 1 and modes["VMODE"] == (1 if codec.layout.v_bits == 4 else 0), modes
    assert modes["KDEL"] != 1.0 and modes["KSG"] == (form == "signed")
    _run_schedule(preset, D, B, H, G, dtype, MIXED, seed=_seed("grid", preset, D, B, G))


@pytest.mark.parametrize("preset,D,B,H,G,w2", [("tq4", 64, 16, 2, 4, False), ("tq4", 128, 32, 1, 7, False),
                                                ("tq35", 64, 16, 1, 8, True)])
def test_ki8_decode_matches_reference(preset, D, B, H, G, w2, monkeypatch):
    """The integer-MMA key path (TQ_VLLM_DECODE_KI8=1: int8 grid codes against the query rounded to int8, values
    gathered as the asm would give them, TQ_VLLM_LUT=emulate) in the 4-warp and the two-warp decode: (1) with queries
    whose rotation lies on the int8 grid, where the rounding is exact, it equals the reference; (2) with random
    queries it stays within the rounding's reach of the reference and differs from the fp16 path (the path ran)."""
    _ki8_case(preset, D, B, H, G, w2, "emulate", DEV, monkeypatch)


@pytest.mark.gpu
@pytest.mark.parametrize("preset,D,B,H,G,w2", [("tq4", 128, 32, 8, 4, False), ("tq4", 64, 16, 2, 7, False),
                                                ("tq35", 128, 32, 8, 4, True)])
def test_gpu_ki8_decode(preset, D, B, H, G, w2, monkeypatch):
    """The integer-MMA key path with the real asm (lut.asm_4bit_i8) and IMMA on the GPU, as above."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    _ki8_case(preset, D, B, H, G, w2, "asm", "cuda", monkeypatch)


def test_ki8_modes_read_the_codebook_once(monkeypatch):
    """The KI8 launch arguments come from the codebook once per codec: a later launch (a CUDA-graph capture, where a
    read of device centroids back to the host fails) must not touch the centroids again."""
    monkeypatch.setenv("TQ_VLLM_DECODE_KI8", "1")
    codec = LayerCodec("tq4", 128, 32)
    kw = dict(KMODE=1, RK=2, PROD=False, KASM="asm")
    first = K._k8_modes(codec, kw)
    assert first["KI8"] and first["K8ASM"] and first["K8DEL"] > 0

    class Unreadable:
        def tolist(self):
            raise AssertionError("centroids read again")

    monkeypatch.setitem(codec.centroids, "k", Unreadable())
    assert K._k8_modes(codec, kw) == first


def _ki8_case(preset, D, B, H, G, w2, lut, device, monkeypatch):
    monkeypatch.setenv("TQ_VLLM_LUT", lut)
    codec = LayerCodec(preset, D, B, layer_index=3, device=device)
    q, k, v = _seqs(3, 200, H, G, D, torch.float16, seed=_seed("ki8", preset, D))
    cpu = LayerCodec(preset, D, B, layer_index=3)  # (the same rotation, for the grid queries on the host)
    # the rotation of a grid query is 127 · (integers) / max: rounding it to int8 is exact (fp16 holds q exactly for
    # D = 64: Π^T v = s ∘ (H v) / 8; for D = 128, Π^T v has a factor 1/√128 and is only close to the grid)
    qg = {}
    for i, x in q.items():
        y = cpu.rotate(x.float())
        vgrid = torch.round(127 * y / y.abs().amax(-1, keepdim=True))
        qg[i] = (cpu.unrotate(vgrid) / 64).to(torch.float16)
    if D == 64:
        y = cpu.rotate(qg[0].float()) * 64
        assert torch.equal(y, y.round())  # exactly on the grid
    scale = D ** -0.5
    outs = {}

    def step(queries, tag, ki8):
        sim = PagedSim(codec, H, num_blocks=64, num_slots=8, dtype=torch.float16, device=device)
        sim.step(ref.forward_step, [(0, 150), (1, 70), (2, 99)], queries, k, v, scale)
        monkeypatch.setenv("TQ_VLLM_DECODE_KI8", ki8)
        rec = {}
        sim.step(_split_attention_op(H, G, 3, 3, w2=w2, record=rec, tol=3e-2), [(0, 1), (1, 1), (2, 1)], queries,
                 k, v, scale)
        assert rec["launch"]["ki8"] == (ki8 == "1") and rec["launch"]["num_warps"] == (2 if w2 else 4)
        outs[tag] = rec

    step(qg, "grid", "1")
    step(q, "rand", "1")
    step(q, "rand16", "0")
    # (measured in the interpreter: 2.5e-4 / 2.9e-4 on the grid, the fp16 path 3.1e-4 / 3.4e-4; random queries
    # 5.8e-3 to 6.4e-3)
    assert _rel(outs["grid"]["out"], outs["grid"]["exp"]) < 2e-3, _rel(outs["grid"]["out"], outs["grid"]["exp"])
    e8 = _rel(outs["rand"]["out"], outs["rand"]["exp"])
    e16 = _rel(outs["rand16"]["out"], outs["rand16"]["exp"])
    assert e8 < 1.5e-2 and e16 < 8e-3, (e8, e16)
    assert not torch.equal(outs["rand"]["out"], outs["rand16"]["out"])


def _split_attention_op(H, G, num_decode_rows, nsplit, narrow=False, w2=False, record=None, tol=8e-3):
    """A PagedSim step op: the reference store, then the Triton attention with `nsplit` decode splits (of the narrow
    launch with `narrow`, of the two-warp launch with `w2`, else of the 4-warp launch) into a NaN-poisoned output,
    checked against the reference attention (which the step keeps). `record` (a dict) gets the output, the reference
    and the decode launch (`K.LAST_DECODE_LAUNCH`)."""
    def op(codec_, q_, k_, v_, cache, staging, plan, sc, sink=None):
        meta = dataclasses.replace(K.prepare(plan, H, H * G, num_decode_rows=num_decode_rows), num_splits=nsplit,
                                   narrow_splits=nsplit if narrow else 0, w2_splits=nsplit if w2 else 0)
        ref.store_full_blocks(codec_, cache, staging, k_, v_, plan, sink)
        out = torch.full(q_.shape, float("nan"), dtype=q_.dtype, device=q_.device)
        K.LAST_DECODE_LAUNCH.clear()
        K.paged_attention(codec_, q_, k_, v_, cache, staging, plan, sc, out=out, meta=meta, force="triton",
                          sink=sink)
        exp = ref.attention(codec_, q_, k_, v_, cache, staging, plan, sc, sink=sink)
        assert not torch.isnan(out).any()
        assert _rel(out, exp) < tol, nsplit
        if record is not None:
            record.update(out=out, exp=exp, launch=dict(K.LAST_DECODE_LAUNCH))
        return exp
    return op


@pytest.mark.parametrize("launch", ["4-warp", "w2", "narrow"])
def test_reduce_reads_only_used_splits(launch, monkeypatch):
    """TQ_VLLM_REDUCE_USED=1: the decode launch writes no partial for a page split past a row's tiles, and the split
    reduction reads none. With the partials poisoned (NaN) the outputs equal, bit for bit, those of the launches that
    write and read every split, for rows whose tiles fill every split, some of them (trailing splits empty when a
    split holds several tiles) or none (a context shorter than a block)."""
    monkeypatch.setenv("TQ_VLLM_LUT", "emulate")
    monkeypatch.setenv("TQ_VLLM_DECODE_TILE", "32")  # (the 4-warp launch's tile; the others have their own)
    D, B, H, G = 64, 16, 2, 4
    codec = LayerCodec("tq3" if launch == "w2" else "tq4", D, B, device=DEV)
    q, k, v = _seqs(4, 300, H, G, D, torch.bfloat16, seed=_seed("used", launch))
    base = PagedSim(codec, H, num_blocks=64, num_slots=10, dtype=torch.bfloat16, device=DEV)
    scale = D ** -0.5
    base.step(ref.forward_step, [(0, 250), (1, 9), (2, 40), (3, 130)], q, k, v, scale)

    def run(nsplit):
        got = {}
        op = _split_attention_op(H, G, 4, nsplit, narrow=launch == "narrow", w2=launch == "w2", record=got)
        copy.deepcopy(base).step(op, [(0, 1), (1, 1), (2, 1), (3, 1)], q, k, v, scale)
        return got

    warps = {"4-warp": 4, "w2": 2, "narrow": 1}[launch]
    for nsplit in (3, 13):
        monkeypatch.setenv("TQ_VLLM_REDUCE_USED", "0")
        every = run(nsplit)
        monkeypatch.setenv("TQ_VLLM_REDUCE_USED", "1")
        used = run(nsplit)
        assert used["launch"]["num_warps"] == warps and used["launch"]["splits"] == nsplit, used["launch"]
        assert not torch.isnan(used["out"]).any()
        assert torch.equal(used["out"], every["out"]), nsplit
        assert _rel(used["out"], used["exp"]) < 8e-3, nsplit
    monkeypatch.setenv("TQ_VLLM_REDUCE_USED", "yes")
    with pytest.raises(ValueError, match="TQ_VLLM_REDUCE_USED"):
        run(3)


@pytest.mark.parametrize("lz", ["0", "1"])
def test_grid_path_lazy_sums_over_many_tiles(lz, monkeypatch):
    """The attention kernel with and without LZ (column sums kept per token row across page tiles, the value-scale
    maximum inside the score-maximum reduction) on the 4-bit grid path: small page tiles (many per split), value
    magnitudes that change by 10^4 between tiles, 1 and 3 splits, decode and chunked prefill rows."""
    monkeypatch.setenv("TQ_VLLM_LUT", "emulate")
    monkeypatch.setenv("TQ_VLLM_DECODE_LZ", lz)
    monkeypatch.setenv("TQ_VLLM_PREFILL_LZ", lz)
    monkeypatch.setenv("TQ_VLLM_DECODE_TILE", "32")
    monkeypatch.setenv("TQ_VLLM_PREFILL_TILE", "32")
    D, B, H, G = 64, 16, 2, 4
    codec = LayerCodec("tq4", D, B, device=DEV)
    assert K._lz("DECODE", K._lut_modes(codec, torch.device(DEV), 2, 2)) == int(lz)
    q, k, v = _seqs(3, 300, H, G, D, torch.bfloat16, seed=_seed("lz", lz))
    g = torch.Generator().manual_seed(_seed("lz-scale", lz))
    for i in v:  # per-32-token magnitude from 1e-2 to 1e2
        mag = 10.0 ** (torch.rand(300 // 32 + 1, generator=g) * 4 - 2)
        v[i] = (v[i].float() * mag.repeat_interleave(32)[:300, None, None]).to(torch.bfloat16)
    base = PagedSim(codec, H, num_blocks=96, num_slots=8, dtype=torch.bfloat16, device=DEV)
    scale = D ** -0.5
    base.step(ref.forward_step, [(0, 230), (1, 150), (2, 90)], q, k, v, scale)
    for nsplit in (1, 3):
        copy.deepcopy(base).step(_split_attention_op(H, G, 2, nsplit), [(0, 1), (1, 1), (2, 40)], q, k, v, scale)


def test_lz_defaults(monkeypatch):
    """LZ by default only in decode over 4-bit grid values; the environment overrides either way."""
    for k in ("TQ_VLLM_DECODE_LZ", "TQ_VLLM_PREFILL_LZ"):
        monkeypatch.delenv(k, raising=False)
    assert [K._lz(n, {"VMODE": m}) for n in ("DECODE", "PREFILL") for m in (0, 1, 2)] == [0, 1, 0, 0, 0, 0]
    monkeypatch.setenv("TQ_VLLM_DECODE_LZ", "0")
    monkeypatch.setenv("TQ_VLLM_PREFILL_LZ", "1")
    assert (K._lz("DECODE", {"VMODE": 1}), K._lz("PREFILL", {"VMODE": 0})) == (0, 1)


@pytest.mark.parametrize("preset,mode", [("tq4", "1"), ("tq3", "0"), ("tq35", "1"), ("tq25", "auto")])
def test_store_codes_from_abs_match_reference(preset, mode, monkeypatch):
    """TQ_VLLM_STORE_SYM: codes from |u| (on at 4 bits, off at 3, the default) give the reference's pages."""
    monkeypatch.setenv("TQ_VLLM_STORE_SYM", mode)
    _check_store(preset, 64, 32)


def test_store_sym_mode_refused(monkeypatch):
    monkeypatch.setenv("TQ_VLLM_STORE_SYM", "yes")
    codec = LayerCodec("tq4", 64, 16, device=DEV)
    with pytest.raises(ValueError, match="TQ_VLLM_STORE_SYM"):
        _check_store_codec(codec)


def _check_store_codec(codec):
    B, H, D = codec.layout.block_size, 2, codec.layout.head_dim
    cache = torch.zeros(2, H, B, codec.layout.bytes_per_token, dtype=torch.uint8, device=DEV)
    k = torch.randn(B, H, D, device=DEV).to(torch.bfloat16)
    bt = torch.tensor([[1]], dtype=torch.int32, device=DEV)
    plan = make_step_plan(torch.tensor([0, B]), torch.tensor([B]), bt, B, StagingAllocator(1), device=DEV)
    staging = torch.zeros(1, 2, B, H, D, dtype=torch.bfloat16, device=DEV)
    K.store_blocks(codec, cache, staging, k, k, plan, force="triton")


def test_symmetric_codebook_detection():
    """Every preset's codebooks mirror exactly about a zero middle boundary; a one-ulp change, a non-zero middle or
    a centroid off its mirror is detected (those tables keep the full comparison)."""
    from tq_vllm.kernels.params import symmetric_codebook
    for name in PRESETS:
        codec = LayerCodec(name, 64, 16)
        for kind in ("k", "v", "k_mean", "v_mean"):
            b, c = codec.bounds[kind].float(), codec.centroids[kind].float()
            assert symmetric_codebook(b, c), (name, kind)
            j = int(torch.randint(0, b.numel(), (1,)))
            b2 = b.clone()
            b2[j] = torch.nextafter(b2[j], torch.tensor(float("inf")))
            assert not symmetric_codebook(b2, c), (name, kind, j)
            c2 = c.clone()
            c2[0] = c2[0] * (1 + 2 ** -20)
            assert not symmetric_codebook(b, c2)
            assert not symmetric_codebook(b + 1e-3, c)
            assert not symmetric_codebook(b[:-1], c[:-1])


def test_sym_codes_at_exact_boundaries():
    """store._sym_codes against the definition (code = #{boundaries < u}, c = centroids[code]) for every preset's
    codebooks of <= 4 bits, on u exactly at each boundary, one ulp either side, +-0 and random values."""
    import importlib
    import sys
    K._kmod("store")  # the store module in the mode TRITON_INTERPRET says now
    mod = importlib.reload(sys.modules["sym_codes_kernel"]) if "sym_codes_kernel" in sys.modules else \
        importlib.import_module("sym_codes_kernel")
    g = torch.Generator().manual_seed(_seed("sym_codes"))
    seen = set()
    for name in PRESETS:
        codec = LayerCodec(name, 64, 16)
        for kind in ("k", "v", "k_mean", "v_mean"):
            b, cen = codec.bounds[kind].float(), codec.centroids[kind].float()
            bits = int(cen.numel()).bit_length() - 1
            if bits > 4 or (bits, tuple(b.tolist())) in seen:
                continue
            seen.add((bits, tuple(b.tolist())))
            inf = torch.tensor(float("inf"))
            edge = torch.cat([b, torch.nextafter(b, inf), torch.nextafter(b, -inf), torch.tensor([0.0, -0.0])])
            u = torch.cat([edge, torch.rand(512 - edge.numel(), generator=g) * 2.4 - 1.2]).view(16, 32)
            u = u.to(DEV)
            code = torch.full(u.shape, -1, dtype=torch.int32, device=DEV)  # poisoned
            c = torch.full(u.shape, float("nan"), device=DEV)
            mod.sym_codes_kernel[(1,)](u, b.to(DEV), cen.to(DEV), code, c, T=16, DP=32, BITS=bits)
            want = torch.searchsorted(b.to(DEV), u.contiguous(), right=False).to(torch.int32)
            assert torch.equal(code, want), (name, kind)
            assert torch.equal(c, cen.to(DEV)[want.long()]), (name, kind)
    assert len(seen) >= 3


def test_store_scaled_rows_norm_and_finiteness():
    """store._scaled_rows (the store's robust norm, in place of an fp32 division per element): yn = y·ysc·2^k exactly
    (yn·2^-k reproduces fl(y·ysc) wherever yn is normal), max |yn| in [1, 2) for rows of normal maxima below 2^100,
    Σ yn² finite exactly where the row is (a NaN as the only non-finite element, +-Inf, NaN rows, rows mixing both)
    and sqrt(Σ yn²)·2^-k = codec.robust_norm (fp32 rounding) for finite rows from the denormal range to the fp32
    maximum, zero rows included."""
    import importlib
    import sys

    from tq_vllm.quant.codec import robust_norm
    K._kmod("store")
    mod = importlib.reload(sys.modules["scaled_rows_kernel"]) if "scaled_rows_kernel" in sys.modules else \
        importlib.import_module("scaled_rows_kernel")
    g = torch.Generator().manual_seed(_seed("scaled_rows"))
    T, DP = 16, 32
    y = torch.randn(T, DP, generator=g)
    y[1] = 0
    y[2, 3] = float("nan")
    y[3] = float("inf")
    y[4, ::2] = -float("inf")
    y[5] = float("nan")
    y[6] *= 1e30
    y[7] *= 1e-30
    y[8] = torch.full((DP,), 3.4e38)  # the norm overflows: Σ yn² stays finite, the norm does not
    y[9, 7] = -3.4e38
    y[10] = torch.randn(DP, generator=g) * 1e-40  # denormals
    y[11, 0] = 1e-45  # one denormal, the rest 0
    y[11, 1:] = 0
    y[12, 5] = float("inf")
    y[12, 6] = float("nan")
    for ysc in (1.0, 0.125, 2 ** -0.5):
        yn, s, ip = (torch.empty_like(y), torch.empty(T), torch.empty(T))
        out = [t.to(DEV) for t in (yn, s, ip)]
        mod.scaled_rows_kernel[(1,)](y.to(DEV), *out, ysc, T=T, DP=DP)
        yn, s, ip = (t.cpu() for t in out)
        fin = torch.isfinite(y).all(-1)
        assert torch.equal(torch.isfinite(s), fin), (ysc, s)
        ys = (y * torch.tensor(ysc, dtype=torch.float32))[fin]  # (the kernel's fp32 ysc)
        # exact power-of-two scaling (where yn is normal: an element 2^126 below its row's max may round)
        nz = yn[fin].abs() >= 2 ** -126
        assert torch.equal((yn[fin] * ip[fin, None])[nz], ys[nz]), ysc
        mx = yn[fin].abs().amax(-1)
        normal = (ys.abs().amax(-1) >= 2 ** -126) & (ys.abs().amax(-1) < 2.0 ** 100)
        assert bool(((mx >= 1) & (mx < 2))[normal].all()) and bool((mx < 2 ** 28).all()), mx
        want = robust_norm(ys)
        got = s[fin].sqrt() * ip[fin]
        rel = ((got - want).abs() / want.clamp_min(1e-45))[torch.isfinite(want) & (want > 0)]
        assert rel.max() < 4e-7, rel.max()
        assert torch.equal(got == 0, want == 0) and torch.equal(torch.isinf(got), torch.isinf(want))


def _run_ptx(asm: str, operands: dict, memory: dict | None = None) -> dict:
    """A model of the store's straight-line PTX blocks (store._COUNT15_ASM, store._sym_count_asm,
    store.sym_code_cen_asm, store.cell_code_cen_asm, store.st_asm): registers hold 32-bit patterns (64-bit ones for
    addresses); operands {"$1": float32 or ("int", value), ...}; immediates 0fXXXXXXXX (float32 bits) or integers;
    `memory` {byte address: byte} for loads and stores; a predicate guard @p / @!p. Returns the registers."""
    import numpy as np

    def bits(x):
        if isinstance(x, tuple):
            return x[1]
        return int(np.float32(x).view(np.uint32))

    def f(b):
        return np.uint32(b & 0xFFFFFFFF).view(np.float32)

    regs = {k: bits(v) for k, v in operands.items()}
    mem = memory if memory is not None else {}

    def val(x):
        if x in regs:
            return regs[x]
        if x.startswith("0f"):
            return int(x[2:], 16)
        return int(x, 0) & 0xFFFFFFFF

    def load(addr, n):
        return sum(mem[addr + i] << (8 * i) for i in range(n))

    def rz(x64):  # float64 -> float32 rounded toward zero
        r = np.float32(x64)
        if abs(float(r)) > abs(x64):
            r = np.nextafter(r, np.float32(0), dtype=np.float32)
        return r

    body = asm.strip().lstrip("{").rstrip("}")
    for line in body.split(";"):
        line = line.strip()
        if not line or line.startswith(".reg"):
            continue
        if line.startswith("@"):
            guard, line = line.split(None, 1)
            want = not guard.startswith("@!")
            if bool(regs[guard.lstrip("@!")]) != want:
                continue
        op, rest = line.split(None, 1)
        if op.startswith("ld.global.nc"):
            dst, addr = rest.split("[")
            a = regs[addr.rstrip("]").strip()]
            names = [x.strip() for x in dst.strip().rstrip(",").strip("{} ").split(",")]
            for i, n in enumerate(names):
                regs[n] = load(a + 4 * i, 4)
            continue
        if op.startswith("st.global.b"):
            addr, src = rest.split("]")
            n = int(op[len("st.global.b"):]) // 8
            v = val(src.strip().lstrip(",").strip())
            for i in range(n):
                mem[regs[addr.strip().lstrip("[")] + i] = (v >> (8 * i)) & 0xFF
            continue
        d, *src = [x.strip() for x in rest.split(",")]
        v = [val(x) for x in src]
        if op == "mul.wide.u32":
            regs[d] = v[0] * v[1]
            continue
        if op == "add.s64":
            regs[d] = (v[0] + v[1]) & 0xFFFFFFFFFFFFFFFF
            continue
        if op == "setp.ne.b32":
            regs[d] = int(v[0] != v[1])
            continue
        if op == "set.gt.f32.f32":
            r = bits(1.0) if f(v[0]) > f(v[1]) else 0
        elif op == "add.f32":
            r = bits(f(v[0]) + f(v[1]))
        elif op == "sub.f32":
            r = bits(f(v[0]) - f(v[1]))
        elif op == "fma.rn.f32":  # (the model's operands are small integers: exact either way)
            r = bits(np.float32(np.float64(f(v[0])) * np.float64(f(v[1])) + np.float64(f(v[2]))))
        elif op == "cvt.rzi.s32.f32":  # (PTX: NaN converts to 0)
            r = 0 if np.isnan(f(v[0])) else int(np.trunc(f(v[0]))) & 0xFFFFFFFF
        elif op == "and.b32":
            r = v[0] & v[1]
        elif op == "shr.u32":
            r = v[0] >> v[1]
        elif op == "add.u32":
            r = (v[0] + v[1]) & 0xFFFFFFFF
        elif op == "mov.b32":
            r = v[0]
        elif op == "mul.lo.u32":
            r = (v[0] * v[1]) & 0xFFFFFFFF
        elif op == "cvt.rzi.u32.f32":
            r = int(np.trunc(f(v[0]))) & 0xFFFFFFFF
        elif op == "set.le.u32.f32":
            r = 0xFFFFFFFF if f(v[0]) <= f(v[1]) else 0
        elif op == "xor.b32":
            r = v[0] ^ v[1]
        elif op == "abs.f32":
            r = v[0] & 0x7FFFFFFF
        elif op == "shl.b32":
            r = (v[0] << v[1]) & 0xFFFFFFFF
        elif op == "fma.rz.f32":  # exact in float64 for the cell index (u times a power of two, plus a small integer)
            r = bits(rz(float(f(v[0])) * float(f(v[1])) + float(f(v[2]))))
        elif op == "prmt.b32":  # default mode: output byte i = byte (selector nibble i & 7) of {b, a}; bit 3 of
            pool = v[0] | (v[1] << 32)  # the nibble replicates that byte's sign bit
            r = 0
            for i in range(4):
                nib = (v[2] >> (4 * i)) & 15
                byte = (pool >> (8 * (nib & 7))) & 0xFF
                if nib & 8:
                    byte = 0xFF if byte & 0x80 else 0
                r |= byte << (8 * i)
        else:
            raise AssertionError(f"unmodelled PTX op {op}")
        regs[d] = r
    return regs


def _run_count_asm(asm: str, u: float, bounds) -> int:
    """The code computed by a store asm block: $0 = the result, $1 = u, $2.. = the boundaries."""
    r = _run_ptx(asm, {"$1": u, **{f"${i + 2}": b for i, b in enumerate(bounds)}})["$0"]
    return r - (1 << 32) if r >= 1 << 31 else r


def _edge_values(b, g, n=64):
    """Each boundary, one ulp either side, +-0 and n random values in [-1.2, 1.2)."""
    bt = torch.tensor(b, dtype=torch.float32)
    inf = torch.tensor(float("inf"))
    return torch.cat([bt, torch.nextafter(bt, inf), torch.nextafter(bt, -inf), torch.tensor([0.0, -0.0]),
                      torch.rand(n, generator=g) * 2.4 - 1.2]).tolist()


def test_store_count15_asm_matches_boundary_count():
    """The 4-bit store's asm count (GPU only; TQ_VLLM_STORE_CMP=2) through a model of its PTX: #{boundaries < u} for
    every preset's 4-bit codebooks, at each boundary, one ulp either side, +-0 and random u."""
    import numpy as np
    from tq_vllm.kernels.store import _COUNT15_ASM
    assert _COUNT15_ASM.count("set.gt.f32.f32") == 15
    g = torch.Generator().manual_seed(_seed("count15"))
    tables = {tuple(LayerCodec(n, 64, 16).bounds[k].float().tolist()) for n in PRESETS for k in ("k", "v")}
    tables = [b for b in tables if len(b) == 15]
    assert tables
    for b in tables:
        for u in _edge_values(b, g):
            want = int(np.searchsorted(np.asarray(b, np.float32), np.float32(u), side="left"))
            assert _run_count_asm(_COUNT15_ASM, u, b) == want, (u, want)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_store_sym_count_asm_matches_boundary_count(bits):
    """The store's code from |u| as one asm block (store._sym_count_asm; TQ_VLLM_STORE_CMP=3, on the GPU at 4 bits)
    through the PTX model: #{boundaries < u} for every preset's symmetric codebooks of `bits` bits
    (operands: the upper half of the boundaries), at each boundary, one ulp either side, +-0 and random u."""
    import numpy as np
    from tq_vllm.kernels.params import symmetric_codebook
    from tq_vllm.kernels.store import _sym_count_asm
    asm = _sym_count_asm(bits)
    mid = (1 << bits) // 2 - 1
    assert asm.count("set.gt.f32.f32") == mid + 1
    g = torch.Generator().manual_seed(_seed(f"sym_asm{bits}"))
    tables = set()
    for n in PRESETS:
        codec = LayerCodec(n, 64, 16)
        for k in ("k", "v", "k_mean", "v_mean"):
            b, c = codec.bounds[k].float(), codec.centroids[k].float()
            if b.numel() == (1 << bits) - 1 and symmetric_codebook(b, c):
                tables.add(tuple(b.tolist()))
    assert tables
    for b in tables:
        for u in _edge_values(b, g):
            want = int(np.searchsorted(np.asarray(b, np.float32), np.float32(u), side="left"))
            assert _run_count_asm(asm, u, b[mid + 1:]) == want, (b, u, want)


def test_store_sym_cen_asm_matches_codebook():
    """TQ_VLLM_STORE_CEN=1: the code and the centroid of a symmetric 4-bit codebook from one asm block
    (store.sym_cen_asm4: the centroid's bytes by byte permutes, no gather) through the PTX model, for every preset's
    symmetric 4-bit codebooks: the code is #{boundaries < u} and the centroid bit-exactly c[code], at each boundary, one
    ulp either side, +-0 and random u."""
    import numpy as np
    from tq_vllm.kernels.params import symmetric_codebook
    from tq_vllm.kernels.store import sym_cen_asm4
    g = torch.Generator().manual_seed(_seed("sym_cen_asm"))
    books = {}
    for n in PRESETS:
        codec = LayerCodec(n, 128, 32)
        for k in ("k", "v", "k_mean", "v_mean"):
            b, c = codec.bounds[k].float(), codec.centroids[k].float()
            if b.numel() == 15 and symmetric_codebook(b, c):
                books[tuple(b.tolist())] = c
    assert books
    for b, c in books.items():
        asm = sym_cen_asm4(c[8:].tolist())
        cb = c.numpy().view(np.uint32)
        for u in _edge_values(b, g):
            want = int(np.searchsorted(np.asarray(b, np.float32), np.float32(u), side="left"))
            regs = _run_ptx(asm, {"$2": u, **{f"${i + 3}": x for i, x in enumerate(b[8:])}})
            code = regs["$0"] - (1 << 32) if regs["$0"] >= 1 << 31 else regs["$0"]
            assert code == want and regs["$1"] == int(cb[want]), (b, u, want, regs["$1"], int(cb[want]))


@pytest.mark.gpu
@pytest.mark.parametrize("preset,D,B", [("tq4", 128, 32), ("tq35", 128, 16), ("tq4", 64, 16)])
def test_gpu_store_cen_asm(preset, D, B, monkeypatch):
    """TQ_VLLM_STORE_CEN=1 on the GPU (the centroid from the code's asm block, under STORE_CMP=3): pages equal the
    reference's."""
    monkeypatch.setenv("TQ_VLLM_STORE_CMP", "3")
    monkeypatch.setenv("TQ_VLLM_STORE_CEN", "1")
    _check_store(preset, D, B)


def _code_cen_cases(b, g, n=256):
    """u at each boundary, one ulp either side, +-0, +-1, one ulp past 1, NaN, denormals and n random values in
    [-1, 1]."""
    import numpy as np
    return _edge_values(b, g, 0) + [1.0, -1.0, float(np.nextafter(np.float32(1), np.float32(2))), float("nan"),
                                    1e-40, -1e-40, 1e-45, -1e-45] + (
        torch.rand(n, generator=g) * 2 - 1).tolist()


def _codebooks(bits_max=4):
    """{(bits, boundaries): centroids} of every preset's codebooks of <= bits_max bits at head_dim 64, 96, 128, 256."""
    books = {}
    for name in PRESETS:
        for D in (64, 96, 128, 256):
            codec = LayerCodec(name, D, 16)
            for k in ("k", "v", "k_mean", "v_mean"):
                b, c = codec.bounds[k].float(), codec.centroids[k].float()
                if b.numel() <= (1 << bits_max) - 1:
                    books[tuple(b.tolist())] = c
    return books


def _mem_words(base: int, words) -> dict:
    """{byte address: byte} of 32-bit words stored little-endian from `base` (the PTX model's memory)."""
    return {base + 4 * k + i: (int(w) >> (8 * i)) & 0xFF for k, w in enumerate(words) for i in range(4)}


def _want_code_cen(b, c, u):
    """torch.bucketize's code of u (right=False) and its centroid's bits; NaN codes as 0 (encode_dir's u of a row
    that is not finite)."""
    import numpy as np
    uu = np.float32(0.0 if u != u else u)
    code = int(np.searchsorted(np.asarray(b, np.float32), uu, side="left"))
    return code, int(c.numpy().view(np.uint32)[code])


def test_store_cell_table_asm_matches_bucketize():
    """The default GPU code path (TQ_VLLM_STORE_CMP=5, store.cell_table + store.cell_code_cen_asm) through the PTX
    model, for every preset's codebooks of <= 4 bits at four head dims: the code is #{boundaries < u} and the
    centroid bit-exactly c[code], at each boundary, one ulp either side, +-0, +-1, one ulp past 1, NaN (codes as u =
    0) and random u; cell edges are exact (u·κ + κ + 2 rounded toward zero). 8-bit codebooks have no table."""
    import numpy as np
    from tq_vllm.kernels.store import CELL_MAX_ENTRIES, cell_code_cen_asm, cell_table
    asm = cell_code_cen_asm()
    g = torch.Generator().manual_seed(_seed("cell_table"))
    books = _codebooks()
    assert len(books) >= 10
    # and a codebook with boundaries one ulp below and at cell edges (of κ = 4): where u·κ + κ + 2 rounded to
    # nearest would land in the next cell
    edge = [np.float32(e) for e in (-0.5, -0.25, 0.0, 0.25, 0.5)]
    syn = sorted({float(np.nextafter(e, np.float32(-1))) for e in edge[1::2]} | {float(e) for e in edge[::2]})
    books[tuple(syn)] = torch.linspace(-0.7, 0.7, len(syn) + 1)
    for b, c in books.items():
        words = cell_table(b)
        assert words is not None and 8 <= len(words) <= 2 * CELL_MAX_ENTRIES + 2, len(b)
        kap = float(np.uint32(words[0]).view(np.float32))
        assert kap == 2 ** round(math.log2(kap)) and float(np.uint32(words[1]).view(np.float32)) == kap + 2
        base, cbase = 1 << 20, 1 << 24
        mem = {**_mem_words(base, words[2:]), **_mem_words(cbase, c.numpy().view(np.uint32))}
        edges = [(j - kap - 2) / kap for j in range(1, len(words) // 2)]
        us = _code_cen_cases(b, g) + edges + [float(np.nextafter(np.float32(e), np.float32(-2))) for e in edges]
        for u in us:
            if abs(u) > 1 + 1 / kap:
                continue
            regs = _run_ptx(asm, {"$2": u, "$3": ("int", base), "$4": ("int", cbase), "$5": kap, "$6": kap + 2},
                            mem)
            assert (regs["$0"], regs["$1"]) == _want_code_cen(b, c, u), (b, u)
    big = LayerCodec("tq8", 128, 16)
    assert cell_table(big.bounds["k"].tolist()) is None


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_store_sym_code_cen_asm_matches_bucketize(bits):
    """TQ_VLLM_STORE_CMP=4 on the GPU (store.sym_code_cen_asm: the code of a symmetric codebook from |u| by FSETs
    summed as integers, its centroid a load) through the PTX model: code #{boundaries < u} and centroid c[code], at
    each boundary, one ulp either side, +-0, +-1, NaN and random u, for every preset's symmetric codebooks."""
    import numpy as np
    from tq_vllm.kernels.params import symmetric_codebook
    from tq_vllm.kernels.store import sym_code_cen_asm
    asm = sym_code_cen_asm(bits)
    mid = (1 << bits) // 2 - 1
    g = torch.Generator().manual_seed(_seed(f"sym_code_cen{bits}"))
    books = {b: c for b, c in _codebooks().items()
             if len(b) == (1 << bits) - 1 and symmetric_codebook(torch.tensor(b), c)}
    assert books
    for b, c in books.items():
        cbase = 1 << 24
        mem = _mem_words(cbase, c.numpy().view(np.uint32))
        for u in _code_cen_cases(b, g):
            ops = {"$2": u, "$3": ("int", cbase), **{f"${k + 4}": t for k, t in enumerate(b[mid + 1:])}}
            regs = _run_ptx(asm, ops, mem)
            assert (regs["$0"], regs["$1"]) == _want_code_cen(b, c, u), (b, u)


@pytest.mark.parametrize("nbits", [8, 16, 32])
def test_store_direct_st_asm(nbits):
    """store.st_asm (the GPU's plane stores from each thread's registers): the low nbits of $2 at $1 where $3 != 0,
    nothing where it is 0."""
    from tq_vllm.kernels.store import st_asm
    asm = st_asm(nbits)
    for mask in (1, 0, -1):
        mem = {}
        _run_ptx(asm, {"$1": ("int", 4096), "$2": ("int", 0x89ABCDEF), "$3": ("int", mask & 0xFFFFFFFF)}, mem)
        want = {4096 + i: (0x89ABCDEF >> (8 * i)) & 0xFF for i in range(nbits // 8)} if mask else {}
        assert mem == want


@pytest.mark.parametrize("preset,env", [("tq3", {"TQ_VLLM_STORE_PERM": "0"}), ("tq4", {"TQ_VLLM_STORE_PACK8": "0"}),
                                        ("tq25", {"TQ_VLLM_STORE_PERM": "0", "TQ_VLLM_STORE_PACK8": "0"})])
def test_store_layout_knobs_match_reference(preset, env, monkeypatch):
    """The store's previous column order (TQ_VLLM_STORE_PERM=0: the rotation's product in Π's row order) and byte
    packing (TQ_VLLM_STORE_PACK8=0: bytes built code by code) still give the reference's pages."""
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    _check_store(preset, 64, 32)


def test_store_cmp_mode_refused(monkeypatch):
    monkeypatch.setenv("TQ_VLLM_STORE_CMP", "6")
    with pytest.raises(ValueError, match="TQ_VLLM_STORE_CMP"):
        _check_store_codec(LayerCodec("tq4", 64, 16, device=DEV))
    monkeypatch.setenv("TQ_VLLM_STORE_CMP", "3")
    monkeypatch.setenv("TQ_VLLM_STORE_CEN", "2")
    with pytest.raises(ValueError, match="TQ_VLLM_STORE_CEN"):
        _check_store_codec(LayerCodec("tq4", 64, 16, device=DEV))
    monkeypatch.delenv("TQ_VLLM_STORE_CEN")
    for knob in ("TQ_VLLM_STORE_PERM", "TQ_VLLM_STORE_PACK8"):
        monkeypatch.setenv(knob, "yes")
        with pytest.raises(ValueError, match=knob):
            _check_store_codec(LayerCodec("tq4", 64, 16, device=DEV))
        monkeypatch.delenv(knob)


def test_store_register_cap_by_codes(monkeypatch):
    """The store's 128-register cap applies to codes of <= 4 bits without QJL (where it was measured); 8-bit codes and
    prod keys keep the uncapped kernel; TQ_VLLM_STORE_MAXNREG overrides either way."""
    from tq_vllm.kernels.params import store_constexprs
    monkeypatch.setattr(K, "_interp", lambda: False)  # the interpreter takes no register cap at all
    monkeypatch.delenv("TQ_VLLM_STORE_MAXNREG", raising=False)
    caps = {p: K._store_cfg(store_constexprs(LayerCodec(p, 128, 32).layout)).get("maxnreg")
            for p in ("tq4", "tq3", "tq25", "tq8", "tq4-prod")}
    assert caps == {"tq4": 128, "tq3": 128, "tq25": 128, "tq8": None, "tq4-prod": None}
    monkeypatch.setenv("TQ_VLLM_STORE_MAXNREG", "96")
    assert K._store_cfg(store_constexprs(LayerCodec("tq8", 128, 32).layout))["maxnreg"] == 96


def test_choose_splits_waves_and_tiles():
    """Split counts: at most 64; large batches keep at most 3 waves of 4 programs per SM and >= 8 tiles a split
    (unless the small-batch rule asks for more); small batches fill every resident program slot (4 per SM) once,
    or `factor` programs per SM, with >= 2 tiles a split."""
    from tq_vllm.kernels.params import choose_splits
    g = torch.Generator().manual_seed(_seed("splits"))
    for _ in range(300):
        R, H = (int(x) for x in torch.randint(1, 129, (2,), generator=g))
        L = int(torch.randint(1, 131072, (1,), generator=g))
        sms = int(torch.randint(8, 200, (1,), generator=g))
        f = (None, 2, 3)[int(torch.randint(0, 3, (1,), generator=g))]
        S = choose_splits(R, H, L, 128, sms, f)
        tiles = -(-L // 128)
        small = min(-(-(f or 4) * sms // (R * H)), -(-tiles // 2))
        assert 1 <= S <= 64
        assert S >= min(small, 64)
        if S > max(small, 1):  # chosen by the large-batch rule
            assert R * H * S <= 3 * 4 * sms and tiles // S >= 8, (R, H, L, sms, S)
    assert choose_splits(0, 8, 1000, 128, 132) == 1
    assert [choose_splits(R, 8, L, 128, 132) for R, L in ((64, 8448), (32, 32768), (8, 8192), (1, 1024))] == \
        [3, 6, 9, 4]  # the shapes timed in the docstring
    assert [choose_splits(1, 8, L, 128, 132, f) for L, f in ((32768, None), (32768, 2), (8192, 6))] == [64, 33, 32]


@pytest.mark.parametrize("D,B,G", [(64, 16, 4), (128, 32, 1)])
def test_narrow_decode_launch_matches_reference(D, B, G, monkeypatch):
    """The narrow decode launch (one warp, 32-token tiles; large batches) on the 4-bit grid path: contexts not
    multiples of B or of the tile, 1, 3 and 7 splits (empty splits for the short row), against the reference."""
    monkeypatch.setenv("TQ_VLLM_LUT", "emulate")
    H = 2
    codec = LayerCodec("tq4", D, B, device=DEV)
    q, k, v = _seqs(3, 200, H, G, D, torch.bfloat16, seed=_seed("narrow", D, B, G))
    base = PagedSim(codec, H, num_blocks=64, num_slots=8, dtype=torch.bfloat16, device=DEV)
    scale = D ** -0.5
    base.step(ref.forward_step, [(0, 171), (1, 9), (2, 100)], q, k, v, scale)
    for nsplit in (1, 3, 7):
        K.LAST_DECODE_LAUNCH.clear()
        copy.deepcopy(base).step(_split_attention_op(H, G, 3, nsplit, narrow=True), [(0, 1), (1, 1), (2, 1)], q, k,
                                 v, scale)
        assert K.LAST_DECODE_LAUNCH == dict(splits=nsplit, tile=K.NARROW_TILE, num_warps=1, lut4=K.NARROW_LUT4,
                                            split_major=False, ki8=False, maxnreg=0, pdl=False)
    # the 4-warp launch of the same step takes the signed form (each form is checked against the reference)
    K.LAST_DECODE_LAUNCH.clear()
    copy.deepcopy(base).step(_split_attention_op(H, G, 3, 3), [(0, 1), (1, 1), (2, 1)], q, k, v, scale)
    launch = K.LAST_DECODE_LAUNCH
    assert (launch["splits"], launch["num_warps"], launch["lut4"]) == (3, 4, "signed"), launch


@pytest.mark.parametrize("preset,D,B,G", [("tq3", 64, 16, 4), ("tq25", 128, 32, 1), ("tq35", 64, 32, 7)])
def test_w2_decode_launch_matches_reference(preset, D, B, G):
    """The two-warp decode launch (64-token tiles; layers with 4 value lattices: tq3, tq25 with value means, tq35
    with 4-bit keys) against the reference: contexts not multiples of B or of the tile, 1, 3 and 7 splits (empty
    splits for the short row), and the 4-warp launch of the same step."""
    H = 2
    codec = LayerCodec(preset, D, B, device=DEV)
    assert K._w2_ok(layout_constexprs(codec.layout), D, B)
    q, k, v = _seqs(3, 220, H, G, D, torch.bfloat16, seed=_seed("w2", preset, D, B, G))
    base = PagedSim(codec, H, num_blocks=64, num_slots=8, dtype=torch.bfloat16, device=DEV)
    scale = D ** -0.5
    base.step(ref.forward_step, [(0, 171), (1, 9), (2, 140)], q, k, v, scale)
    for nsplit in (1, 3, 7):
        K.LAST_DECODE_LAUNCH.clear()
        copy.deepcopy(base).step(_split_attention_op(H, G, 3, nsplit, w2=True), [(0, 1), (1, 1), (2, 1)], q, k, v,
                                 scale)
        launch = K.LAST_DECODE_LAUNCH
        assert (launch["splits"], launch["tile"], launch["num_warps"]) == (nsplit, K.W2_TILE, 2), launch
    K.LAST_DECODE_LAUNCH.clear()
    copy.deepcopy(base).step(_split_attention_op(H, G, 3, 3), [(0, 1), (1, 1), (2, 1)], q, k, v, scale)
    assert K.LAST_DECODE_LAUNCH["num_warps"] == 4, K.LAST_DECODE_LAUNCH


@pytest.mark.parametrize("launch", ["4-warp", "w2", "narrow"])
def test_split_major_grid_order(launch, monkeypatch):
    """TQ_VLLM_DECODE_SPLIT_MAJOR=1 (grid z = s·H + h: page programs before the exact-key programs) gives the
    head-major launch's output bit for bit (each program computes the same partial), checked against the reference,
    at 1, 3 and 5 splits with H = 3 heads (so the two orders differ in every program but the first)."""
    monkeypatch.setenv("TQ_VLLM_LUT", "emulate")
    preset, D, B, G, H = ("tq3", 64, 16, 4, 3) if launch == "w2" else ("tq4", 64, 16, 2, 3)
    codec = LayerCodec(preset, D, B, device=DEV)
    q, k, v = _seqs(2, 180, H, G, D, torch.bfloat16, seed=_seed("zorder", launch))
    base = PagedSim(codec, H, num_blocks=64, num_slots=6, dtype=torch.bfloat16, device=DEV)
    base.step(ref.forward_step, [(0, 150), (1, 40)], q, k, v, D ** -0.5)
    for nsplit in (1, 3, 5):
        outs = []
        for mode in ("0", "1"):
            monkeypatch.setenv("TQ_VLLM_DECODE_SPLIT_MAJOR", mode)
            rec = {}
            copy.deepcopy(base).step(_split_attention_op(H, G, 2, nsplit, narrow=launch == "narrow",
                                                         w2=launch == "w2", record=rec),
                                     [(0, 1), (1, 1)], q, k, v, D ** -0.5)
            assert rec["launch"]["split_major"] == (mode == "1")
            outs.append(rec["out"])
        assert torch.equal(outs[0], outs[1]), nsplit
    monkeypatch.setenv("TQ_VLLM_DECODE_SPLIT_MAJOR", "auto")  # the default: split-major for the two-warp launch
    assert K._split_major(True) and not K._split_major(False)
    monkeypatch.setenv("TQ_VLLM_DECODE_SPLIT_MAJOR", "yes")
    with pytest.raises(ValueError, match="TQ_VLLM_DECODE_SPLIT_MAJOR"):
        K._split_major(True)


def test_one_wave_register_cap_and_pdl_choice(monkeypatch):
    """The 4-warp decode's register cap rises to ONEWAVE_MAXNREG only while its programs fit in one wave at that cap
    (at the edge and one program past it), never over an explicit TQ_VLLM_DECODE_MAXNREG or with the knob at 0; the
    programmatic dependent launch: off in the interpreter and for CPU tensors, on with TQ_VLLM_PDL=1 even past one
    wave, off with 0, and a bad value refused."""
    from tq_vllm.kernels.params import programs_per_sm
    monkeypatch.setattr(K, "num_sms", lambda index=0: 132)
    for k in ("TQ_VLLM_DECODE_MAXNREG", "TQ_VLLM_DECODE_ONEWAVE_MAXNREG", "TQ_VLLM_PDL"):
        monkeypatch.delenv(k, raising=False)
    dev = torch.device("cpu")
    edge = 132 * programs_per_sm(K.ONEWAVE_MAXNREG, 4)
    assert K._one_wave_cfg(edge, dev) == dict(maxnreg=K.ONEWAVE_MAXNREG)
    assert K._one_wave_cfg(edge + 1, dev) == {}
    monkeypatch.setenv("TQ_VLLM_DECODE_ONEWAVE_MAXNREG", "200")
    assert K._one_wave_cfg(132 * programs_per_sm(200, 4), dev) == dict(maxnreg=200)
    assert K._one_wave_cfg(132 * programs_per_sm(200, 4) + 1, dev) == {}
    monkeypatch.setenv("TQ_VLLM_DECODE_ONEWAVE_MAXNREG", "0")
    assert K._one_wave_cfg(8, dev) == {}
    monkeypatch.delenv("TQ_VLLM_DECODE_ONEWAVE_MAXNREG")
    monkeypatch.setenv("TQ_VLLM_DECODE_MAXNREG", "128")
    assert K._one_wave_cfg(8, dev) == {}
    q = torch.zeros(1, 4, 64)
    mod = K._kmod("attention")
    assert not K._pdl(q, True, mod)  # (the interpreter, when it runs the kernels)
    monkeypatch.setattr(K, "_interp", lambda: False)
    assert not K._pdl(q, True, mod)  # a CPU tensor
    monkeypatch.setenv("TQ_VLLM_PDL", "1")
    assert K._pdl(q, False, mod)
    monkeypatch.setenv("TQ_VLLM_PDL", "0")
    assert not K._pdl(q, True, mod)
    monkeypatch.setenv("TQ_VLLM_PDL", "yes")
    with pytest.raises(ValueError, match="TQ_VLLM_PDL"):
        K._pdl(q, True, mod)


def test_w2_decode_choice(monkeypatch):
    """Which layers take the two-warp decode launch (4 value lattices, no QJL keys, head_dim 64 / 128, B <= 32),
    its split count (the split rule at 64-token tiles and 6 programs per SM), and the environment."""
    from tq_vllm.kernels.params import W2_CFG, W2_MIN_TOKENS, choose_splits, programs_per_sm
    kw = {p: layout_constexprs(LayerCodec(p, 128, 32).layout) for p in PRESETS}
    assert {p for p in PRESETS if K._w2_ok(kw[p], 128, 32)} == {"tq3", "tq35", "tq25"}
    assert K._w2_ok(kw["tq3"], 64, 16) and not K._w2_ok(kw["tq3"], 96, 32) and not K._w2_ok(kw["tq3"], 256, 32)
    assert not K._w2_ok(kw["tq3"], 128, 64) and not K._w2_ok({**kw["tq3"], "PROD": True}, 128, 32)
    assert programs_per_sm(W2_CFG["maxnreg"], W2_CFG["num_warps"]) == 6
    plan = dataclasses.make_dataclass("P", ["num_rows", "block_size", "max_seq_len", "seq_lens"])(
        64, 32, 8192, torch.zeros(1))
    for k in ("TQ_VLLM_DECODE_W2", "TQ_VLLM_DECODE_CFG", "TQ_VLLM_DECODE_TILE", "TQ_VLLM_DECODE_MAXNREG",
              "TQ_VLLM_DECODE_SPLITS"):
        monkeypatch.delenv(k, raising=False)
    g = torch.Generator().manual_seed(_seed("w2-splits"))
    for _ in range(50):
        R, H = int(torch.randint(1, 129, (1,), generator=g)), int(torch.randint(1, 17, (1,), generator=g))
        plan.max_seq_len = int(torch.randint(1, 65536, (1,), generator=g))
        got = K.prepare(plan, H, 4 * H, num_decode_rows=R).w2_splits
        want = choose_splits(R, H, plan.max_seq_len, 64, 8, per_sm=6)
        assert want >= 1 and got == (want if R * plan.max_seq_len >= W2_MIN_TOKENS else 0)
    # the token threshold, at it and one token below, and TQ_VLLM_DECODE_W2=1 taking the launch below it
    for R in (1, 3, 8):
        plan.max_seq_len = -(-W2_MIN_TOKENS // R)
        assert K.prepare(plan, 8, 32, num_decode_rows=R).w2_splits >= 1
        plan.max_seq_len = (W2_MIN_TOKENS - 1) // R
        assert K.prepare(plan, 8, 32, num_decode_rows=R).w2_splits == 0
        monkeypatch.setenv("TQ_VLLM_DECODE_W2", "1")
        assert K.prepare(plan, 8, 32, num_decode_rows=R).w2_splits == choose_splits(
            R, 8, plan.max_seq_len, 64, 8, per_sm=6) >= 1
        monkeypatch.delenv("TQ_VLLM_DECODE_W2")
    plan.max_seq_len = 8192
    monkeypatch.setenv("TQ_VLLM_DECODE_W2", "0")
    assert K.prepare(plan, 8, 32, num_decode_rows=64).w2_splits == 0
    monkeypatch.setenv("TQ_VLLM_DECODE_W2", "auto")
    monkeypatch.setenv("TQ_VLLM_DECODE_TILE", "128")  # an explicit launch configuration holds for every layer
    assert K.prepare(plan, 8, 32, num_decode_rows=64).w2_splits == 0
    monkeypatch.setenv("TQ_VLLM_DECODE_W2", "2")
    with pytest.raises(ValueError, match="TQ_VLLM_DECODE_W2"):
        K.prepare(plan, 8, 32, num_decode_rows=64)


def test_reduce_split_product_is_fp32_exact(monkeypatch):
    """The split reduction's inverse rotation with the ±1 matrix in bf16 and the sum split in three bf16 parts
    equals the fp32 product (TQ_VLLM_REDUCE_PM1=0) to fp32 rounding, seen through an fp32 output (a two-part split
    would be off by ~1e-5, one part by ~4e-3)."""
    D, B, H, G = 64, 16, 2, 4
    monkeypatch.setenv("TQ_VLLM_FWHT", "0")  # (the products; with the transform both modes skip them)
    codec = LayerCodec("tq4", D, B, device=DEV)
    assert K.tables(codec, DEV).rot_for(torch.bfloat16)[1]  # Hadamard rotation: the ±1 path applies
    q, k, v = _seqs(3, 200, H, G, D, torch.bfloat16, seed=_seed("reduce-pm1"))
    sim = PagedSim(codec, H, num_blocks=64, num_slots=8, dtype=torch.bfloat16, device=DEV)
    scale = D ** -0.5
    sim.step(ref.forward_step, [(0, 150), (1, 70), (2, 99)], q, k, v, scale)
    got = {}

    def op(codec_, q_, k_, v_, cache, staging, plan, sc, sink=None):
        meta = dataclasses.replace(K.prepare(plan, H, H * G, num_decode_rows=3), num_splits=3)
        for pm1 in ("1", "0"):  # (auto would take the fp32 product for these 3 x 2 pairs)
            monkeypatch.setenv("TQ_VLLM_REDUCE_PM1", pm1)
            out = torch.full(q_.shape, float("nan"), dtype=torch.float32, device=q_.device)
            K.paged_attention(codec_, q_, k_, v_, cache, staging, plan, sc, out=out, meta=meta, force="triton",
                              sink=sink)
            got[pm1] = out
        return ref.forward_step(codec_, q_, k_, v_, cache, staging, plan, sc, sink=sink)

    sim.step(op, [(0, 1), (1, 1), (2, 1)], q, k, v, scale)
    a, b = got["1"], got["0"]
    assert not torch.isnan(a).any() and not torch.isnan(b).any()
    assert (a - b).abs().max() <= 1e-6 * b.abs().max(), (a - b).abs().max()


def test_narrow_decode_choice(monkeypatch):
    """Which layers and batches take the narrow decode launch, and its split count: just under 3 waves of 12
    programs per SM, >= 8 tiles a split, at most 64; none below 256 (row, KV head) pairs or 512K tokens."""
    from tq_vllm.kernels.params import NARROW_MIN_PAIRS, NARROW_MIN_TOKENS, narrow_splits
    assert K._narrow_ok({"VMODE": 1, "PROD": False}, 128, 32)
    assert not K._narrow_ok({"VMODE": 2, "PROD": False}, 128, 32)  # 3-bit values: not measured
    assert not K._narrow_ok({"VMODE": 1, "PROD": True}, 128, 32)
    assert not K._narrow_ok({"VMODE": 1, "PROD": False}, 256, 32)
    assert not K._narrow_ok({"VMODE": 1, "PROD": False}, 128, 64)
    g = torch.Generator().manual_seed(_seed("narrow-splits"))
    for _ in range(300):
        R, H = int(torch.randint(1, 257, (1,), generator=g)), int(torch.randint(1, 17, (1,), generator=g))
        L = int(torch.randint(1, 131072, (1,), generator=g))
        sms = int(torch.randint(8, 200, (1,), generator=g))
        S = narrow_splits(R, H, L, sms)
        if R * H < NARROW_MIN_PAIRS or R * L < NARROW_MIN_TOKENS:
            assert S == 0
            continue
        tiles = -(-L // 32)
        assert 1 <= S <= 64 and (S == 1 or (R * H * S <= 2.9 * 12 * sms and tiles // S >= 8)), (R, H, L, sms, S)
        assert S == 1 or S == 64 or tiles // (S + 1) < 8 or R * H * (S + 1) > 2.9 * 12 * sms
    # the environment: off by default (the 4-warp launch with the signed asm is faster), auto turns the rule on, an
    # explicit launch configuration holds for every batch
    plan = dataclasses.make_dataclass("P", ["num_rows", "block_size", "max_seq_len", "seq_lens"])(
        64, 32, 8192, torch.zeros(1))
    monkeypatch.delenv("TQ_VLLM_DECODE_NARROW", raising=False)
    assert K.prepare(plan, 8, 32, num_decode_rows=64).narrow_splits == 0
    monkeypatch.setenv("TQ_VLLM_DECODE_NARROW", "auto")
    assert K.prepare(plan, 8, 32, num_decode_rows=64).narrow_splits == narrow_splits(64, 8, 8192, 8) > 0
    monkeypatch.setenv("TQ_VLLM_DECODE_NARROW", "0")
    assert K.prepare(plan, 8, 32, num_decode_rows=64).narrow_splits == 0
    monkeypatch.setenv("TQ_VLLM_DECODE_NARROW", "auto")
    monkeypatch.setenv("TQ_VLLM_DECODE_CFG", "4,2")
    assert K.prepare(plan, 8, 32, num_decode_rows=64).narrow_splits == 0
    monkeypatch.setenv("TQ_VLLM_DECODE_NARROW", "sometimes")
    with pytest.raises(ValueError, match="TQ_VLLM_DECODE_NARROW"):
        K.prepare(plan, 8, 32, num_decode_rows=64)


def test_head_dim_256_and_long_decode():
    sched = [[(0, 70)], [(0, 1)], [(0, 1)], [(0, 30), (1, 3)]]
    _run_schedule("tq3", 256, 16, 1, 1, torch.bfloat16, sched, seed=5)


@pytest.mark.parametrize("reduce_rows", [1, 2, 4])
def test_decode_many_splits_and_unaligned_context(reduce_rows, monkeypatch):
    """Decode rows with several split-K partials, contexts not multiples of B, empty splits for short rows; the
    split reduction with 1, 2 or 4 rows per program (3 rows: a partly empty last program)."""
    monkeypatch.setenv("TQ_VLLM_REDUCE_ROWS", str(reduce_rows))
    D, B, H, G = 64, 16, 2, 4
    codec = LayerCodec("tq4", D, B, device=DEV)
    q, k, v = _seqs(3, 260, H, G, D, torch.bfloat16, seed=11)
    base = PagedSim(codec, H, num_blocks=64, num_slots=8, dtype=torch.bfloat16, device=DEV)
    scale = D ** -0.5
    base.step(ref.forward_step, [(0, 203), (1, 7), (2, 100)], q, k, v, scale)
    for nsplit in (1, 3, 7):
        copy.deepcopy(base).step(_split_attention_op(H, G, 3, nsplit), [(0, 1), (1, 1), (2, 1)], q, k, v, scale)


def test_matches_naive_decode_semantics_chunked():
    """End to end through the Triton step in chunks equals the independent per-position oracle."""
    D, B, H, G = 64, 16, 1, 2
    codec = LayerCodec("tq4", D, B, device=DEV)
    q, k, v = _seqs(1, 75, H, G, D, torch.float16, seed=3)
    sim = PagedSim(codec, H, num_blocks=16, num_slots=4, dtype=torch.float16, device=DEV)
    outs = []
    for n in (21, 1, 30, 1, 1, 21):
        outs.append(sim.step(_triton_op, [(0, n)], q, k, v, D ** -0.5)[0])
    got = torch.cat(outs).float().cpu()
    exp = naive_decode_semantics(LayerCodec("tq4", D, B), q[0], k[0], v[0], D ** -0.5)
    assert _rel(got, exp) < 4e-3


def test_sink_table_miss_falls_back_to_codes():
    """An overwritten sink entry (or a page from another instance) is read from its codes, like the reference."""
    D, B, H, G = 64, 16, 2, 2
    codec = LayerCodec("tq4", D, B, device=DEV)
    q, k, v = _seqs(2, 60, H, G, D, torch.bfloat16, seed=9)
    sa = PagedSim(codec, H, num_blocks=32, num_slots=6, dtype=torch.bfloat16, device=DEV, sink_entries=4)
    sb = PagedSim(codec, H, num_blocks=32, num_slots=6, dtype=torch.bfloat16, device=DEV, sink_entries=4)
    for sim, op in ((sa, _triton_op), (sb, _ref_op)):
        sim.step(op, [(0, 40), (1, 20)], q, k, v, D ** -0.5)
        sim.sink[1][:, 0] = 12345  # entries of head 0 now belong to another sequence
    oa = sa.step(_triton_op, [(0, 1), (1, 1)], q, k, v, D ** -0.5)
    ob = sb.step(_ref_op, [(0, 1), (1, 1)], q, k, v, D ** -0.5)
    for rid in oa:
        assert _rel(oa[rid], ob[rid]) < 8e-3




@pytest.mark.parametrize("overlap", ["0", "1"])
def test_sink_entries_shared_by_first_blocks_of_one_step(overlap, monkeypatch):
    """First blocks completed in one step whose tags share a table entry (2 entries, 6 rows): the last in the
    completed-block list owns the entry, K/V and tag alike, as in the reference; in prefill steps (the table is
    written before the attention) and in decode steps (written with the staging copy, after the attention; with
    TQ_VLLM_STORE_OVERLAP=1 on a GPU the store runs beside the attention)."""
    monkeypatch.setenv("TQ_VLLM_STORE_OVERLAP", overlap)
    n = 6
    prompt = [[(r, 13 + r % 3) for r in range(n)]]  # every row's block 0 still open
    decodes = [[(r, 1) for r in range(n)] for _ in range(4)]  # all cross the first boundary, in 3 different steps
    _, sa, _ = _run_schedule("tq4", 64, 16, 2, 2, torch.bfloat16,
                             prompt + decodes + [[(r, 20) for r in range(n)], [(r, 1) for r in range(n)]], seed=41,
                             num_blocks=48, lengths=64, sink_entries=2)
    tags = sa.sink[1]
    assert bool((tags != 0).all()), "every entry written"
    # a collision really happened: 6 distinct first tokens over 2 entries
    assert len({int(t) for t in tags.flatten()}) == tags.numel()


def test_store_beside_attention_many_rows_one_step(monkeypatch):
    """Decode steps where several rows complete a block (first blocks and later ones) at once, with the store
    beside the attention on a GPU: the same pages, sink table and outputs as the reference."""
    monkeypatch.setenv("TQ_VLLM_STORE_OVERLAP", "1")
    n = 5
    steps = [[(r, 15) for r in range(n)], [(r, 1) for r in range(n)], [(0, 16), (1, 16)],
             [(r, 1) for r in range(n)], [(r, 1) for r in range(n)]]
    _run_schedule("tq4", 64, 16, 2, 2, torch.bfloat16, steps, seed=43, num_blocks=48, lengths=64)


def test_staging_in_reduce_launch(monkeypatch):
    """Steps where every row decodes one token (rows completing blocks, first blocks sharing the 2 sink entries, a
    row whose block stays open) run the staging copy and the sink commit in the split reduction's launch: no staging
    launch of their own, and outputs, pages, staging and sink table equal to the reference's (`_run_schedule`) and,
    bit for bit, to the separate launch's (TQ_VLLM_STAGE_FOLD=0)."""
    monkeypatch.setenv("TQ_VLLM_STORE_OVERLAP", "0")
    n = 5
    steps = ([[(r, 13 + r % 3) for r in range(n)]] + [[(r, 1) for r in range(n)] for _ in range(4)]
             + [[(0, 17), (1, 2)]] + [[(r, 1) for r in range(2)] for _ in range(2)])
    sims = {}
    for fold in ("1", "0"):
        monkeypatch.setenv("TQ_VLLM_STAGE_FOLD", fold)
        K.LAUNCH_COUNTS.clear()
        _, sims[fold], _ = _run_schedule("tq4", 64, 16, 2, 2, torch.bfloat16, steps, seed=47, num_blocks=48,
                                         lengths=64, sink_entries=2)
        assert K.LAUNCH_COUNTS["staging"] == (2 if fold == "1" else len(steps)), K.LAUNCH_COUNTS
        assert K.LAUNCH_COUNTS["reduce"] == len(steps) - 2
    a, b = sims["1"], sims["0"]
    assert torch.equal(a.cache, b.cache) and torch.equal(a.staging, b.staging)
    assert torch.equal(a.sink[0], b.sink[0]) and torch.equal(a.sink[1], b.sink[1])
    assert bool((a.sink[1] != 0).all())  # every entry was committed (6 first tokens over 2 entries)

    def chunk_step(codec, q, k, v, cache, staging, plan, scale, sink=None):  # a step with a prefill row: refused
        with pytest.raises(ValueError, match="every row decodes one token"):
            K.paged_attention(codec, q, k, v, cache, staging, plan, scale, force="triton", stage=True)
        return _ref_op(codec, q, k, v, cache, staging, plan, scale, sink=sink)

    codec = LayerCodec("tq4", 64, 16, device=DEV)
    q, k, v = _seqs(2, 40, 2, 2, 64, torch.bfloat16, seed=5)
    sim = PagedSim(codec, 2, num_blocks=16, num_slots=4, dtype=torch.bfloat16, device=DEV)
    sim.step(_ref_op, [(0, 20)], q, k, v, 0.125)
    sim.step(chunk_step, [(0, 1), (1, 9)], q, k, v, 0.125)


def test_write_staging_matches_reference():
    D, B, H = 64, 16, 2
    st_a = torch.randn(4, 2, B, H, D, device=DEV).to(torch.bfloat16)
    st_b = st_a.clone()
    k = torch.randn(40, H, D, device=DEV).to(torch.bfloat16)
    v = torch.randn(40, H, D, device=DEV).to(torch.bfloat16)
    alloc = StagingAllocator(4)
    bt = torch.tensor([[0, 1, 2], [3, 4, 5], [6, 7, 8]], dtype=torch.int32)
    alloc.assign(3)  # row 1 has block 3 open (ctx 5)
    # rows: new prompt of 21, decode at ctx 5 (stays open), chunk of 16 that lands exactly on a boundary
    plan = make_step_plan(torch.tensor([0, 21, 22, 38]), torch.tensor([21, 6, 32]), bt, B, alloc, device=DEV)
    ref.write_staging(st_a, k, v, plan)
    K.write_staging(st_b, k, v, plan, force="triton")
    assert torch.equal(st_a, st_b)


def test_torch_dispatch_on_cpu():
    """Without force, CPU tensors go to the torch reference (the same results as the reference)."""
    D, B, H, G = 64, 16, 1, 2
    codec = LayerCodec("tq4", D, B)
    q, k, v = _seqs(1, 40, H, G, D, torch.bfloat16, seed=1)
    sa = PagedSim(codec, H, num_blocks=8, num_slots=2, dtype=torch.bfloat16)
    sb = PagedSim(codec, H, num_blocks=8, num_slots=2, dtype=torch.bfloat16)
    oa = sa.step(lambda *a, **kw: K.forward_step(*a, force="torch", **kw), [(0, 40)], q, k, v, 0.125)[0]
    ob = sb.step(ref.forward_step, [(0, 40)], q, k, v, 0.125)[0]
    assert torch.allclose(oa.float(), ob.float(), atol=1e-2)
    if os.environ.get("TQ_VLLM_KERNELS", "auto") == "auto":
        assert not K.use_triton(torch.zeros(1))


# ---------------------------------------------------------------------------------------------------------------
# GPU: realistic shapes
# ---------------------------------------------------------------------------------------------------------------
GPU_CORE = [("tq4", "asm"), ("tq3", "asm"), ("tq4", "gather")]
GPU_MORE = [(p, "asm") for p in PRESETS if p not in ("tq4", "tq3")] + [("tq3", "gather")]


@pytest.mark.gpu
@pytest.mark.parametrize("preset,lut", GPU_CORE + [pytest.param(*c, marks=pytest.mark.slow) for c in GPU_MORE])
def test_gpu_llama_shapes(preset, lut, monkeypatch):
    monkeypatch.setenv("TQ_VLLM_LUT", lut)
    sched = [[(0, 1500), (1, 700)], [(0, 1), (1, 1), (2, 2048)], [(0, 1), (1, 1), (2, 1)],
             [(0, 1), (1, 1), (2, 1), (3, 515)]]
    _run_schedule(preset, 128, 16, 8, 4, torch.bfloat16, sched, seed=1, num_blocks=512, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("B", [16, 32])
def test_gpu_narrow_decode(B, monkeypatch):
    """The narrow decode launch (one warp at 168 registers, the real asm) at Llama shapes against the reference."""
    monkeypatch.setenv("TQ_VLLM_DECODE_NARROW", "1")
    K.LAST_DECODE_LAUNCH.clear()
    sched = [[(0, 1500), (1, 700)], [(0, 1), (1, 1), (2, 2048)], [(0, 1), (1, 1), (2, 1)],
             [(0, 1), (1, 1), (2, 1), (3, 515)]]
    _run_schedule("tq4", 128, B, 8, 4, torch.bfloat16, sched, seed=3, num_blocks=512, device="cuda")
    assert K.LAST_DECODE_LAUNCH["num_warps"] == 1 and K.LAST_DECODE_LAUNCH["tile"] == K.NARROW_TILE


@pytest.mark.gpu
@pytest.mark.parametrize("preset,B", [("tq3", 16), ("tq3", 32), ("tq25", 32), ("tq35", 32)])
def test_gpu_w2_decode(preset, B):
    """The two-warp decode launch (the default for 2/3-bit values: 168 registers, the real asm) at Llama shapes
    against the reference."""
    K.LAST_DECODE_LAUNCH.clear()
    sched = [[(0, 1500), (1, 700)], [(0, 1), (1, 1), (2, 2048)], [(0, 1), (1, 1), (2, 1)],
             [(0, 1), (1, 1), (2, 1), (3, 515)]]
    _run_schedule(preset, 128, B, 8, 4, torch.bfloat16, sched, seed=4, num_blocks=512, device="cuda")
    assert K.LAST_DECODE_LAUNCH["num_warps"] == 2 and K.LAST_DECODE_LAUNCH["tile"] == K.W2_TILE


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("D,B,G,dtype", [(64, 32, 8, torch.float16), (256, 64, 1, torch.bfloat16),
                                         (96, 128, 7, torch.bfloat16)])
def test_gpu_other_shapes(D, B, G, dtype, monkeypatch):
    """Other head dims, GQA ratios and blocks through the fused Triton prefill (the sweep and the FlashAttention
    tests cover vLLM's FlashAttention there): the kernel used where vLLM's FlashAttention is missing or fails. At
    head_dim 256 it needed 320 KB of shared memory (Π's tiles hoisted out of the exact-key loop) and failed to
    launch on the H200 (2026-11-29, seventh session)."""
    monkeypatch.setenv("TQ_VLLM_PREFILL", "triton")
    sched = [[(0, 900), (1, 300)], [(0, 1), (1, 1)], [(0, 1), (1, 77)]]
    _run_schedule("tq3", D, B, 4, G, dtype, sched, seed=2, num_blocks=256, device="cuda")


# every preset over head_dim 64/96/128/256, blocks of 16-128 tokens, fp16 and bf16, GQA 1/4/7/8: each preset sees
# every head_dim and block size once (a Latin square over the presets), in prefill, chunk and decode steps with
# several splits (run in shards in parallel on the device: TQ_TEST_SHARD, tests/conftest.py)
_SWEEP_B = (16, 32, 64, 128)
_SWEEP_G = (1, 4, 7, 8)
GPU_SWEEP = [(p, D, _SWEEP_B[(i + j) % 4], _SWEEP_G[(i + 2 * j) % 4], (torch.bfloat16, torch.float16)[(i + j) % 2])
             for i, p in enumerate(PRESETS) for j, D in enumerate((64, 128, 256, 96))]
# tq4-prod at head_dim 64, block 16, GQA 1 was 0.00896 from the reference step in one chunk row on an H200 (2026-11-28):
# against the reference attention over its own pages it is 0.0024; 3 bytes of its pages differ from the
# reference's (2 QJL sign bytes, 1 key scale byte: fp32 summation order), hence the prod tolerance in _run_schedule


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("preset,D,B,G,dtype", GPU_SWEEP)
def test_gpu_sweep(preset, D, B, G, dtype):
    sched = [[(0, 5 * B + 7), (1, B - 1)], [(0, 1), (1, 1), (2, 3 * B + 1)], [(0, 1), (1, 1), (2, 1)],
             [(0, B + 3), (1, 1), (2, 1), (3, 700)], [(0, 1), (1, 1), (2, 1), (3, 1)]]
    _run_schedule(preset, D, B, 4, G, dtype, sched, seed=_seed(preset, D, B, G), num_blocks=256, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("preset,warps,ki8", [("tq4", 4, "0"), ("tq3", 2, "0"), ("tq4", 4, "1")])
def test_gpu_cuda_graph_decode(preset, warps, ki8, monkeypatch):
    """A decode step captured in a CUDA graph (meta given, no host sync) replays to the eager result, for the 4-warp
    launch (tq4), the two-warp launch (tq3) and the integer-MMA key path (whose launcher once read the centroids
    back inside the capture)."""
    monkeypatch.setenv("TQ_VLLM_DECODE_KI8", ki8)
    # (4 rows of <= 450 tokens are below params.W2_MIN_TOKENS: the two-warp launch is forced for tq3)
    monkeypatch.setenv("TQ_VLLM_DECODE_W2", "1" if warps == 2 else "auto")
    D, B, H, G, R = 128, 16, 8, 4, 4
    codec = LayerCodec(preset, D, B, device="cuda")
    q, k, v = _seqs(R, 600, H, G, D, torch.bfloat16, seed=7)
    sim = PagedSim(codec, H, num_blocks=256, num_slots=16, dtype=torch.bfloat16, device="cuda")
    sim.step(ref.forward_step, [(r, 300 + 37 * r) for r in range(R)], q, k, v, D ** -0.5)
    captured = {}

    def op(codec_, q_, k_, v_, cache, staging, plan, sc, sink=None):
        meta = K.prepare(plan, H, H * G, num_decode_rows=R)
        eager = K.paged_attention(codec_, q_, k_, v_, cache, staging, plan, sc, meta=meta, sink=sink)
        out = torch.full_like(q_, float("nan"))
        K.paged_attention(codec_, q_, k_, v_, cache, staging, plan, sc, out=out, meta=meta, sink=sink)  # warm-up
        out.fill_(float("nan"))
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            K.paged_attention(codec_, q_, k_, v_, cache, staging, plan, sc, out=out, meta=meta, sink=sink)
        out.fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
        captured["ok"] = torch.equal(out, eager)
        return K.forward_step(codec_, q_, k_, v_, cache, staging, plan, sc, meta=meta, sink=sink)

    K.LAST_DECODE_LAUNCH.clear()
    sim.step(op, [(r, 1) for r in range(R)], q, k, v, D ** -0.5)
    assert captured["ok"]
    assert K.LAST_DECODE_LAUNCH["num_warps"] == warps and K.LAST_DECODE_LAUNCH["ki8"] == (ki8 == "1")


@pytest.mark.gpu
@pytest.mark.parametrize("preset", ["tq4", "tq3"])
def test_gpu_pdl_reduction_waits_for_the_decode(preset, monkeypatch):
    """TQ_VLLM_PDL=1 (the split reduction a programmatic dependent of the decode launch, which triggers it at its
    start): over 24 decode steps of 6 rows crossing block boundaries, with NaN-poisoned partials and the staging
    copy in the reduction's launch, outputs and staging equal bit for bit those of TQ_VLLM_PDL=0 (a reduction that
    read before the decode's writes landed would see NaN)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    monkeypatch.setattr(K, "POISON_PARTIALS", True)
    D, B, H, G, R = 128, 16, 8, 4, 6
    codec = LayerCodec(preset, D, B, device="cuda")
    q, k, v = _seqs(R, 400, H, G, D, torch.bfloat16, seed=_seed("pdl", preset))
    sims = {m: PagedSim(codec, H, num_blocks=512, num_slots=16, dtype=torch.bfloat16, device="cuda")
            for m in ("0", "1")}
    scale = D ** -0.5
    for sim in sims.values():
        sim.sink = None
        sim.step(ref.forward_step, [(r, 150 + 37 * r) for r in range(R)], q, k, v, scale)

    def op_for(mode):
        def op(codec_, q_, k_, v_, cache, staging, plan, sc, sink=None):
            monkeypatch.setenv("TQ_VLLM_PDL", mode)
            ref.store_full_blocks(codec_, cache, staging, k_, v_, plan)
            out = torch.full_like(q_, float("nan"))
            K.paged_attention(codec_, q_, k_, v_, cache, staging, plan, sc, out=out, stage=True)
            assert K.LAST_DECODE_LAUNCH["pdl"] == (mode == "1")
            return out
        return op

    for _ in range(24):
        reqs = [(r, 1) for r in range(R)]
        got = sims["1"].step(op_for("1"), reqs, q, k, v, scale)
        want = sims["0"].step(op_for("0"), reqs, q, k, v, scale)
        for r in range(R):
            assert not torch.isnan(got[r]).any() and torch.equal(got[r], want[r]), r
        assert torch.equal(sims["1"].staging, sims["0"].staging)


@pytest.mark.gpu
@pytest.mark.parametrize("overlap", ["1", "0"])
def test_gpu_cuda_graph_store_beside_attention(overlap, monkeypatch):
    """A decode step whose store runs on a side stream beside the attention (first blocks sharing sink entries and
    later blocks completing), captured in a CUDA graph: the replay gives the eager step's output, pages, staging and
    sink table, and those match the reference with the sink table written after the attention. overlap=0: the store
    before the attention, the staging copy and sink commit in the split reduction's launch."""
    monkeypatch.setenv("TQ_VLLM_STORE_OVERLAP", overlap)  # 1: at any row count
    D, B, H, G, R = 128, 16, 8, 4, 6
    codec = LayerCodec("tq4", D, B, device="cuda")
    q, k, v = _seqs(R, 600, H, G, D, torch.bfloat16, seed=11)
    sim = PagedSim(codec, H, num_blocks=256, num_slots=16, dtype=torch.bfloat16, device="cuda", sink_entries=8)
    sim.step(ref.forward_step, [(r, (15, 31, 100, 15, 47, 300)[r]) for r in range(R)], q, k, v, D ** -0.5)
    res = {}

    def op(codec_, q_, k_, v_, cache, staging, plan, sc, sink=None):
        meta = K.prepare(plan, H, H * G, num_decode_rows=R)
        assert K._store_beside(q_, plan, meta) == (overlap == "1")
        K.LAUNCH_COUNTS.clear()
        state = [cache, staging, *sink]
        before = [t.clone() for t in state]
        ref_state = [t.clone() for t in before]
        exp = ref.forward_step(codec_, q_, k_, v_, ref_state[0], ref_state[1], plan, sc, sink=tuple(ref_state[2:]),
                               defer_sink=True)
        out_e = K.forward_step(codec_, q_, k_, v_, cache, staging, plan, sc, meta=meta, sink=sink)  # also warm-up
        torch.cuda.synchronize()
        after = [t.clone() for t in state]
        for t, b in zip(state, before):
            t.copy_(b)
        out = torch.full_like(q_, float("nan"))
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            K.forward_step(codec_, q_, k_, v_, cache, staging, plan, sc, out=out, meta=meta, sink=sink)
        for t, b in zip(state, before):
            t.copy_(b)
        out.fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
        res["replay_out"] = torch.equal(out, out_e)
        res["replay_state"] = [torch.equal(t, a) for t, a in zip(state, after)]
        res["ref_err"] = _rel(out_e, exp)
        res["ref_sink"] = torch.equal(sink[1], ref_state[3]) and torch.equal(sink[0], ref_state[2])
        res["ref_staging"] = torch.equal(staging, ref_state[1])
        res["ref_pages"] = (cache == ref_state[0]).float().mean().item()
        res["staging_launches"] = K.LAUNCH_COUNTS["staging"]
        return out

    sim.step(op, [(r, 1) for r in range(R)], q, k, v, D ** -0.5)
    assert res["replay_out"] and all(res["replay_state"]), res
    assert res["ref_err"] < _tol(torch.bfloat16) and res["ref_sink"] and res["ref_staging"], res
    assert res["ref_pages"] >= 0.999, res
    assert res["staging_launches"] == (2 if overlap == "1" else 0), res  # eager + capture; folded: none



def test_qrot_chunk_rule(monkeypatch):
    """The decode's query rotation is one pass at head_dim 64 / 128 below QROT_ONEPASS_ROWS rows, DC otherwise;
    TQ_VLLM_DECODE_QDC overrides and a chunk that does not divide head_dim is refused."""
    monkeypatch.delenv("TQ_VLLM_DECODE_QDC", raising=False)
    n = K.QROT_ONEPASS_ROWS
    assert [K._qrot_chunk(D, 1) for D in (64, 96, 128, 256)] == [64, K.DC, 128, K.DC]
    assert K._qrot_chunk(128, n - 1) == 128 and K._qrot_chunk(128, n) == K.DC
    monkeypatch.setenv("TQ_VLLM_DECODE_QDC", "64")
    assert K._qrot_chunk(128, 1) == 64 and K._qrot_chunk(128, n) == 64
    monkeypatch.setenv("TQ_VLLM_DECODE_QDC", "64")
    with pytest.raises(ValueError, match="TQ_VLLM_DECODE_QDC"):
        K._qrot_chunk(96, 1)


@pytest.mark.parametrize("M,N", [(4, 64), (4, 128), (16, 128), (8, 256), (2, 32)])
def test_fwht_matches_hadamard_product(M, N):
    """hadamard._fwht (the rotation of the decode and its split reduction for randomized-Hadamard Π) equals x @ H_N
    (Sylvester) on fresh random rows, output poisoned."""
    import importlib
    import sys
    from tq_vllm.quant.rotation import _sylvester
    K._kmod("hadamard")
    mod = importlib.reload(sys.modules["fwht_kernel"]) if "fwht_kernel" in sys.modules else \
        importlib.import_module("fwht_kernel")
    g = torch.Generator().manual_seed(_seed(f"fwht{M}x{N}"))
    x = torch.randn(M, N, generator=g).to(DEV)
    y = torch.full_like(x, float("nan"))
    mod.fwht_kernel[(1,)](x, y, M=M, N=N, LOG=N.bit_length() - 1)
    want = (x.double().cpu() @ _sylvester(N)).float()
    assert torch.allclose(y.cpu(), want, atol=1e-4, rtol=1e-5), (y.cpu() - want).abs().max()


def test_hadamard_tables_and_fwht_switch(monkeypatch):
    """DeviceTables.had holds exactly for the "hadamard" rotation at power-of-two head sizes (not for "qr" or 96);
    TQ_VLLM_FWHT=0 turns the transform off, other values are refused."""
    from tq_vllm.kernels.params import tables
    assert tables(LayerCodec("tq4", 128, 16), "cpu").had
    assert not tables(LayerCodec("tq4", 96, 16), "cpu").had
    tb = tables(LayerCodec("tq4", 128, 16), "cpu")
    monkeypatch.setenv("TQ_VLLM_FWHT", "0")
    assert K._fwht_args(tb, 128) == {"HAD": False, "LOGD": 0}
    monkeypatch.setenv("TQ_VLLM_FWHT", "1")
    assert K._fwht_args(tb, 128) == {"HAD": True, "LOGD": 7}
    monkeypatch.setenv("TQ_VLLM_FWHT", "yes")
    with pytest.raises(ValueError, match="TQ_VLLM_FWHT"):
        K._fwht_args(tb, 128)


@pytest.mark.parametrize("preset,D,G,launch", [("tq4", 64, 4, "4warp"), ("tq3", 128, 7, "w2"), ("tq25", 64, 1, "4warp"),
                                              ("tq4", 128, 8, "narrow"), ("tq4-prod", 64, 4, "4warp"),
                                              ("tq3", 64, 4, "w2-many"), ("tq4", 256, 2, "4warp")])
def test_decode_fwht_equals_matrix_products(preset, D, G, launch, monkeypatch):
    """The decode and its split reduction with the Walsh-Hadamard transform (TQ_VLLM_FWHT=1, the default for
    randomized-Hadamard Π) give the outputs of the products with Π (=0) up to the query's fp16 rounding, for every key
    lattice count (tq4: 2, tq3: 4, tq25: 4 with 2-bit planes), head_dim 64 / 128 / 256, the 4-warp, two-warp and
    narrow launches, and the two-warp launch from QROT_ONEPASS_ROWS rows (its query through the product, the
    reduction through the transform); fp32 output poisoned."""
    H, B = 2, 16
    if launch == "w2-many":
        monkeypatch.setattr(K, "QROT_ONEPASS_ROWS", 2)
    monkeypatch.setenv("TQ_VLLM_LUT", "emulate")  # (4-bit grid values in the interpreter: the narrow launch's)
    codec = LayerCodec(preset, D, B, device=DEV)
    assert K.tables(codec, DEV).had
    q, k, v = _seqs(3, 200, H, G, D, torch.bfloat16, seed=_seed(f"fwht-{preset}-{D}-{launch}"))
    sim = PagedSim(codec, H, num_blocks=64, num_slots=8, dtype=torch.bfloat16, device=DEV)
    scale = D ** -0.5
    sim.step(ref.forward_step, [(0, 150), (1, 70), (2, 99)], q, k, v, scale)
    got = {}

    def op(codec_, q_, k_, v_, cache, staging, plan, sc, sink=None):
        meta = dataclasses.replace(K.prepare(plan, H, H * G, num_decode_rows=3), num_splits=3,
                                   w2_splits=3 if launch.startswith("w2") else 0,
                                   narrow_splits=3 if launch == "narrow" else 0)
        for f in ("1", "0"):
            monkeypatch.setenv("TQ_VLLM_FWHT", f)
            out = torch.full(q_.shape, float("nan"), dtype=torch.float32, device=q_.device)
            K.paged_attention(codec_, q_, k_, v_, cache, staging, plan, sc, out=out, meta=meta, force="triton",
                              sink=sink)
            got[f] = out
            got["warps"] = K.LAST_DECODE_LAUNCH["num_warps"]
        return ref.forward_step(codec_, q_, k_, v_, cache, staging, plan, sc, sink=sink)

    sim.step(op, [(0, 1), (1, 1), (2, 1)], q, k, v, scale)
    assert got["warps"] == {"4warp": 4, "w2": 2, "w2-many": 2, "narrow": 1}[launch]
    a, b = got["1"], got["0"]
    assert not torch.isnan(a).any() and not torch.isnan(b).any()
    # (the rotated query is rounded to fp16 for the tensor cores, so a value next to a rounding boundary can round
    # the other way: on an H200 the narrow launch differed by 2.9e-5; a wrong sign or lattice differs by ~1)
    assert (a - b).abs().max() <= 1e-4 * b.abs().max(), (a - b).abs().max()


@pytest.mark.parametrize("preset,w2", [("tq4", False), ("tq3", True)])
def test_decode_constexprs_do_not_depend_on_rows_with_the_transform(preset, w2, monkeypatch):
    """With the transform the query chunk (QDC) is a constant, so the decode compiles once for every batch size (CUDA
    graphs capture many); the two-warp launch differs only in HAD / LOGD from QROT_ONEPASS_ROWS rows (its query
    through the product there). Both launches fall back to the products if the transform does not compile."""
    H, G, D, B, R = 2, 4, 64, 16, K.QROT_ONEPASS_ROWS + 4
    codec = LayerCodec(preset, D, B, device=DEV)
    q, k, v = _seqs(R, 60, H, G, D, torch.bfloat16, seed=_seed("constexprs", preset))
    sim = PagedSim(codec, H, num_blocks=4 * R + 8, num_slots=R + 2, dtype=torch.bfloat16, device=DEV)
    sim.step(ref.forward_step, [(i, 40) for i in range(R)], q, k, v, D ** -0.5)
    seen = []

    falls = {}

    def record(name, kernel, grid, args, kwargs, fallbacks=()):
        if name == "decode":
            seen.append(dict(kwargs))
        falls.setdefault(name, []).append(fallbacks)

    def op(codec_, q_, k_, v_, cache, staging, plan, sc, sink=None):
        nd = plan.seq_lens.numel()
        meta = dataclasses.replace(K.prepare(plan, H, H * G, num_decode_rows=nd), num_splits=3,
                                   w2_splits=3 if w2 else 0, narrow_splits=0)
        with monkeypatch.context() as m:
            m.setattr(K, "_launch", record)
            K.paged_attention(codec_, q_, k_, v_, cache, staging, plan, sc, meta=meta, force="triton", sink=sink)
        return ref.forward_step(codec_, q_, k_, v_, cache, staging, plan, sc, sink=sink)

    sim.step(op, [(0, 1), (1, 1)], q, k, v, D ** -0.5)
    sim.step(op, [(i, 1) for i in range(R)], q, k, v, D ** -0.5)
    few, many = seen
    assert few["HAD"] and few["QDC"] == K.DC
    # a Triton that cannot compile the transform falls back to the products (first, in both launches)
    assert falls["decode"][0][0] == {"HAD": False, "LOGD": 0, "QDC": K._qrot_chunk(D, 2)}
    assert falls["reduce"][0] == ({"HAD": False, "LOGD": 0},)
    diff = {key for key in few if few[key] != many.get(key)}
    assert diff == ({"HAD", "LOGD"} if w2 else set()), diff
