"""Prefill through FlashAttention over dequantized pages (tq_vllm/kernels/prefill.py, dequant.py).

CPU: the pass planner is checked against the decode semantics key by key; the dequantization kernel (Triton
interpreter) against the codec; the whole prefill path against the reference, with `prefill.varlen_paged_ref`
standing in for FlashAttention and workspaces small enough to force several passes and windowed merges.
GPU: the same with vLLM's FlashAttention (and the rest of the GPU kernel tests run it by default).
"""
from __future__ import annotations

import importlib.util
import random
import zlib

import numpy as np
import pytest
import torch

from paged_sim import PagedSim
from tq_vllm import kernels as K
from tq_vllm.kernels import prefill as P
from tq_vllm.quant import reference as ref
from tq_vllm.quant.codec import LayerCodec, new_sink_table

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"


@pytest.fixture(autouse=True)
def _triton_mode(monkeypatch):
    if not CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def _rel(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


# ------------------------------------------------------------------------------------------------ planner
def _keys_seen(pp, qsl, seq, ctx, rows, B):
    """{query token: sorted list of (position, 'q' | 'x')} over all passes, from the plan's arrays alone."""
    seen = {}
    for ps in pp.passes:
        h = ps.host
        content = {}  # workspace block -> ('q', row, blk) | ('x', row, blk)
        for r, b, d in zip(h["deq_row"], h["deq_blk"], h["deq_dst"]):
            assert int(d) not in content
            content[int(d)] = ("q", int(r), int(b))
        exact_tok = {}
        for s, d in zip(h["in_src"], h["in_dst"]):
            exact_tok[int(d)] = ("in", int(s)) if s >= 0 else ("zero",)
        for r, o, d in zip(h["st_row"], h["st_off"], h["st_dst"]):
            assert int(d) not in exact_tok
            exact_tok[int(d)] = ("st", int(r), int(o))
        # every position of an exact block is written (FlashAttention may load whole pages)
        for wb in {d // B for d in exact_tok}:
            assert all(wb * B + j in exact_tok for j in range(B)), (wb, B)
        cu = h["cu_q"]
        for s in range(len(h["seqused_k"])):
            n = int(h["seqused_k"][s])
            a, e = ps.q0 + int(cu[s]), ps.q0 + int(cu[s + 1])
            keys = []
            for j in range(n):
                wb = int(h["block_table"][s, j // B])
                if wb in content:
                    kind, r, b = content[wb]
                    keys.append(("q", r, b * B + j % B))
                else:
                    tok = exact_tok[wb * B + j % B]
                    assert tok != ("zero",), "a visible key is one of the zeros"
                    keys.append(("x", tok))
            m = e - a
            for i in range(m):
                vis = keys if not ps.causal else keys[:i + (n - m) + 1]
                seen.setdefault(a + i, []).extend(vis)
    return seen


@pytest.mark.parametrize("seed", range(8))
def test_plan_covers_decode_semantics_exactly(seed):
    """Every query sees each earlier-block key once, dequantized from its own row, and each key of its own block up
    to itself once, exact, from the right source (staging below ctx, the step input above); nothing else."""
    rng = random.Random(seed)
    B = rng.choice([16, 32])
    R = rng.randint(1, 5)
    ctx = [rng.choice([0, rng.randint(0, 300)]) for _ in range(R)]
    nq = [rng.choice([1, rng.randint(2, 120)]) for _ in range(R)]
    qsl = np.concatenate([[0], np.cumsum(nq)])
    seq = [c + n for c, n in zip(ctx, nq)]
    nd = 0
    while nd < R and nq[nd] == 1:
        nd += 1
    rows = range(nd, R)
    ws = rng.choice([4, 7, 12, 40, 1000])
    pp = P.plan_prefill(qsl, seq, ctx, rows, B, ws, group=rng.choice([None, 2, 3]))
    for ps in pp.passes:  # bounded workspace, in-range tables
        used = set(ps.host["deq_dst"].tolist()) | {int(d) // B for d in ps.host["in_dst"]} | \
            {int(d) // B for d in ps.host["st_dst"]}
        assert max(used) < ws and min(used) >= 0
        assert int(ps.host["block_table"].max()) < ws
    seen = _keys_seen(pp, qsl, seq, ctx, rows, B)
    for r in rows:
        for p in range(ctx[r], seq[r]):
            t = int(qsl[r]) + p - ctx[r]
            own = (p // B) * B
            want = [("q", r, j) for j in range(own)]
            for j in range(own, p + 1):
                want.append(("x", ("st", r, j % B) if j < ctx[r] else ("in", int(qsl[r]) + j - ctx[r])))
            assert sorted(seen.pop(t), key=repr) == sorted(want, key=repr), (r, p)
    assert not seen, "decode rows or tokens outside the prefill rows were planned"


@pytest.mark.parametrize("seed", range(4))
def test_device_plan_arrays_are_16_byte_aligned_and_equal_to_the_host_plan(seed):
    """Every index array of every pass starts 16-byte aligned in the shared device buffer (Triton specializes
    pointer arguments on it: unaligned slices made the dequantization kernel compile new variants while serving)
    and holds exactly the host plan's values."""
    rng = random.Random(100 + seed)
    B = rng.choice([16, 32])
    R = rng.randint(1, 6)
    ctx = [rng.choice([0, rng.randint(0, 400)]) for _ in range(R)]
    nq = [rng.randint(2, 150) for _ in range(R)]
    qsl = np.concatenate([[0], np.cumsum(nq)])
    seq = [c + n for c, n in zip(ctx, nq)]
    pp = P.plan_prefill(qsl, seq, ctx, range(R), B, rng.choice([7, 12, 1000])).to_device("cpu")
    names = ("cu_q", "seqused_k", "block_table", "deq_row", "deq_blk", "deq_dst", "deq_first", "in_src", "in_dst",
             "st_row", "st_off", "st_dst")
    n_checked = 0
    for ps in pp.passes:
        for n in names:
            t = getattr(ps, n)
            assert t.data_ptr() % 16 == 0, (n, t.data_ptr() % 16)
            assert np.array_equal(t.numpy(), np.asarray(ps.host[n], dtype=np.int32)), n
            n_checked += 1
    assert n_checked == len(names) * len(pp.passes) > 0


def test_plan_single_pass_when_it_fits_and_windows_when_not():
    B = 16
    qsl, seq, ctx = [0, 64], [1000], [936]
    pp = P.plan_prefill(qsl, seq, ctx, [0], B, ws_blocks=4096)
    assert len(pp.passes) == 1 and pp.num_groups == 0
    pp = P.plan_prefill(qsl, seq, ctx, [0], B, ws_blocks=20)
    assert pp.num_groups == 1 and len(pp.passes) > 3
    assert pp.passes[0].first_of_group and all(not p.first_of_group for p in pp.passes[1:])
    with pytest.raises(ValueError):
        P.plan_prefill(qsl, seq, ctx, [0], B, ws_blocks=1)


# ------------------------------------------------------------------------------------------------ dequant
@pytest.mark.parametrize("preset,D,B,npg", [("tq4", 64, 16, 1), ("tq3", 128, 32, 2), ("tq4-prod", 64, 16, 4),
                                            ("tq35", 96, 16, 2), ("tq25", 64, 32, 1), ("tq8", 64, 16, 8),
                                            ("tq4", 128, 32, 0)])
def test_dequantize_blocks_matches_codec(preset, D, B, npg, monkeypatch):
    """npg pages per program (5 pages: the last program is partly empty); sink presets take token 0 from the table."""
    monkeypatch.setenv("TQ_VLLM_DEQUANT_PAGES", str(npg))
    H, N = 2, 5
    g = torch.Generator().manual_seed(zlib.crc32(f"{preset}{D}{B}".encode()))
    codec = LayerCodec(preset, D, B, layer_index=2, device=DEV)
    k = (torch.randn(N, B, H, D, generator=g) * 2 + 0.5).to(DEV)
    v = torch.randn(N, B, H, D, generator=g).to(DEV)
    first = torch.tensor([1, 0, 0, 1, 0], dtype=torch.int32, device=DEV)
    cache = torch.zeros(N + 3, H, B, codec.layout.bytes_per_token, dtype=torch.uint8, device=DEV)
    ids = torch.tensor([4, 0, 7, 2, 5], dtype=torch.int32, device=DEV)
    fields = codec.encode_blocks(k, v, first.bool())
    codec.write_pages(cache, ids, fields)
    sink = None
    if codec.preset.sink:
        sink = _sink_table(H, D, torch.bfloat16, k, v, first, fields, ids)
    dst = torch.tensor([3, 0, 6, 1, 5], dtype=torch.int32, device=DEV)
    outs = {}
    for force in ("torch", "triton"):
        wk = torch.full((8, B, H, D), float("nan"), dtype=torch.bfloat16, device=DEV)
        wv = torch.full_like(wk, float("nan"))
        K.dequantize_blocks(codec, cache, ids, first, wk, wv, dst, sink=sink, force=force)
        outs[force] = (wk[dst.long()], wv[dst.long()])
        assert not torch.isnan(outs[force][0]).any() and not torch.isnan(outs[force][1]).any()
        assert torch.isnan(wk[2]).all(), "a block outside dst was written"
    ek, ev = codec.dequantize_pages(cache, ids)
    if sink is not None:  # token 0 of the first blocks is exact
        f = first.bool()
        ek[f, 0], ev[f, 0] = k[f, 0], v[f, 0]
    for force, (ok, ov) in outs.items():
        assert _rel(ok, ek) < 5e-3 and _rel(ov, ev) < 5e-3, force
    if sink is not None:
        assert torch.equal(outs["triton"][0][first.bool(), 0], k[first.bool(), 0].to(torch.bfloat16))


def _fill_case(g, T, H, D, B, slots, dtype):
    """A step's K/V as views of one fused qkv buffer (vLLM's layout: strided rows), a staging buffer, and random
    exact-token lists as plan_prefill makes them (distinct destination rows)."""
    Hq = 2 * H
    qkv = torch.randn(T, (Hq + 2 * H) * D, generator=g).to(dtype).to(DEV)
    key = qkv[:, Hq * D:(Hq + H) * D].view(T, H, D)
    value = qkv[:, (Hq + H) * D:].view(T, H, D)
    staging = torch.randn(slots, 2, B, H, D, generator=g).to(dtype).to(DEV)
    i32 = dict(dtype=torch.int32, device=DEV)
    rows = 3
    ctx_slot = torch.randperm(slots, generator=g)[:rows].to(**i32)
    dst = torch.randperm(4 * B, generator=g)
    E, F = int(torch.randint(1, 2 * B, (1,), generator=g)), int(torch.randint(1, B, (1,), generator=g))
    src = torch.randint(0, T, (E,), generator=g)
    src[torch.rand(E, generator=g) < 0.25] = -1  # zeros (the tail of a pass's last exact block)
    ps = K.FillLists(in_src=src.to(**i32), in_dst=dst[:E].to(**i32),
                     st_row=torch.randint(0, rows, (F,), generator=g).to(**i32),
                     st_off=torch.randint(0, B, (F,), generator=g).to(**i32), st_dst=dst[E:E + F].to(**i32))
    return key, value, staging, ctx_slot, ps


@pytest.mark.parametrize("H,D,B,dtype", [(2, 64, 16, torch.bfloat16), (1, 96, 32, torch.float16),
                                         (8, 128, 16, torch.bfloat16)])
def test_fill_workspace_matches_indexing(H, D, B, dtype):
    """The workspace fill kernel (exact tokens from the step's K/V and from staging) against torch indexing, on a
    NaN-poisoned workspace: the listed rows get the exact values, no other row is written."""
    g = torch.Generator().manual_seed(H * 1000 + D + B + random.randrange(1000))
    key, value, staging, ctx_slot, ps = _fill_case(g, 40, H, D, B, 6, dtype)
    outs = {}
    for force in ("torch", "triton"):
        wk = torch.full((4 * B, H, D), float("nan"), dtype=dtype, device=DEV)
        wv = torch.full_like(wk, float("nan"))
        K.fill_workspace(key, value, staging, ctx_slot, ps, wk, wv, force=force)
        outs[force] = (wk, wv)
    (tk, tv), (rk, rv) = outs["triton"], outs["torch"]
    assert torch.equal(torch.isnan(tk), torch.isnan(rk)) and torch.equal(torch.isnan(tv), torch.isnan(rv))
    written = torch.cat([ps.in_dst, ps.st_dst]).long()
    assert not torch.isnan(tk[written]).any()
    assert torch.equal(tk[written], rk[written]) and torch.equal(tv[written], rv[written])
    src = ps.in_src.long()
    assert torch.equal(tk[ps.in_dst.long()[src >= 0]], key[src[src >= 0]])
    assert (tk[ps.in_dst.long()[src < 0]] == 0).all() and (tv[ps.in_dst.long()[src < 0]] == 0).all()
    slots = ctx_slot[ps.st_row.long()].long()
    assert torch.equal(tv[ps.st_dst.long()], staging[slots, 1, ps.st_off.long()])
    others = torch.ones(4 * B, dtype=torch.bool, device=DEV)
    others[written] = False
    assert torch.isnan(tk[others]).all() and torch.isnan(tv[others]).all()


def test_warm_up_writes_workspace_block_0_only():
    """kernels.warm_up (the builder calls it before serving so that the prefill kernels are compiled): the Triton
    dequantization of page 0 into workspace block 0, then the fill of its token 0 (from token 1, then from staging
    slot 0); nothing else written; a no-op for the torch path."""
    D, B, H = 64, 16, 2
    codec = LayerCodec("tq4", D, B, layer_index=1, device=DEV)
    g = torch.Generator().manual_seed(7)
    k, v = torch.randn(1, B, H, D, generator=g).to(DEV), torch.randn(1, B, H, D, generator=g).to(DEV)
    cache = torch.zeros(3, H, B, codec.layout.bytes_per_token, dtype=torch.uint8, device=DEV)
    codec.write_pages(cache, torch.zeros(1, dtype=torch.int32, device=DEV),
                      codec.encode_blocks(k, v, torch.zeros(1, dtype=torch.bool, device=DEV)))
    ws = P.PrefillWorkspace(torch.full((4, B, H, D), float("nan"), dtype=torch.bfloat16, device=DEV),
                            torch.full((4, B, H, D), float("nan"), dtype=torch.bfloat16, device=DEV))
    staging = torch.randn(3, 2, B, H, D, generator=g).to(torch.bfloat16).to(DEV)
    K.warm_up(codec, cache, workspace=ws, force="torch", staging=staging)
    assert torch.isnan(ws.k).all()
    K.warm_up(codec, cache, workspace=ws, force="triton", staging=staging)
    ek, ev = codec.dequantize_pages(cache, torch.zeros(1, dtype=torch.int32, device=DEV))
    assert _rel(ws.k[0, 1:], ek[0, 1:]) < 5e-3 and _rel(ws.v[0, 1:], ev[0, 1:]) < 5e-3
    assert torch.equal(ws.k[0, 0], staging[0, 0, 0]) and torch.equal(ws.v[0, 0], staging[0, 1, 0])
    assert torch.isnan(ws.k[1:]).all() and torch.isnan(ws.v[1:]).all()


def _sink_table(H, D, dtype, k, v, first, fields, ids):
    """The sink table the store would have filled for these blocks (exact token 0 of first blocks)."""
    kv, tags = new_sink_table(16, H, D, dtype, k.device)
    f = first.bool()
    t = fields["sink_tag"].reshape(len(ids), H, 8).contiguous().view(torch.int64).squeeze(-1)[f]
    slots = t % 16
    heads = torch.arange(H, device=k.device).expand_as(t)
    kv[slots, 0, heads] = k[f, 0].to(dtype)
    kv[slots, 1, heads] = v[f, 0].to(dtype)
    tags[slots, heads] = t
    return kv, tags


# ------------------------------------------------------------------------------------------------ whole path
def _fa_op(ws_blocks, dtype, attn_fn, force, checks):
    def op(codec, q, k, v, cache, staging, plan, scale, sink=None):
        H, D, B = k.shape[1], k.shape[2], plan.block_size
        ref.store_full_blocks(codec, cache, staging, k, v, plan, sink)
        exp = ref.attention(codec, q, k, v, cache, staging, plan, scale, sink=sink)
        meta = K.prepare(plan, H, q.shape[1])
        nd = meta.num_decode_rows
        out = torch.full(q.shape, float("nan"), dtype=q.dtype, device=q.device)
        ws = P.PrefillWorkspace(torch.full((ws_blocks, B, H, D), float("nan"), dtype=dtype, device=q.device),
                                torch.full((ws_blocks, B, H, D), float("nan"), dtype=dtype, device=q.device))
        K.prefill_attention(codec, q, k, v, cache, staging, plan, scale, out, meta, attn_fn=attn_fn, sink=sink,
                            force=force, workspace=ws)
        t0 = int(plan.query_start_loc[nd])
        assert torch.isnan(out[:t0]).all(), "decode rows were written by the prefill path"
        got = out[t0:]
        assert not torch.isnan(got).any()
        if got.numel():  # (all tokens, worst token): a pass or merge that goes wrong for some queries must show
            e = exp[t0:].float()
            err = (got.float() - e).flatten(1).norm(dim=1) / e.flatten(1).norm(dim=1).clamp_min(1e-6)
            checks.append((_rel(got, e), err.max().item()))
        ref.write_staging(staging, k, v, plan)
        return exp
    return op


CASES = [
    # preset, D, B, H, G, dtype, workspace blocks
    ("tq4", 64, 16, 2, 4, torch.bfloat16, 1000),
    ("tq4", 64, 16, 2, 4, torch.bfloat16, 9),  # passes and windowed merges
    ("tq3", 128, 32, 1, 7, torch.float16, 6),
    ("tq4-prod", 64, 16, 2, 1, torch.bfloat16, 12),
    ("tq35", 96, 16, 1, 8, torch.bfloat16, 1000),
]


@pytest.mark.parametrize("preset,D,B,H,G,dtype,ws", CASES)
def test_prefill_path_matches_reference(preset, D, B, H, G, dtype, ws):
    codec = LayerCodec(preset, D, B, layer_index=1, device=DEV)
    g = torch.Generator().manual_seed(ws * 7 + D)
    L = 200
    q = {i: torch.randn(L, H * G, D, generator=g).to(dtype).to(DEV) for i in range(3)}
    k = {i: (torch.randn(L, H, D, generator=g) * 2 + 0.5 * torch.randn(1, H, D, generator=g)).to(dtype).to(DEV)
         for i in range(3)}
    v = {i: torch.randn(L, H, D, generator=g).to(dtype).to(DEV) for i in range(3)}
    sim = PagedSim(codec, H, num_blocks=64, num_slots=8, dtype=dtype, device=DEV)
    checks = []
    attn = P.varlen_paged_ref if not CUDA else P.flash_attn_fn()
    op = _fa_op(ws, dtype, attn, "triton", checks)
    # fresh prompts, a decode + chunk mix with contexts not multiples of B, a chunk crossing several blocks
    # then a long chunk whose prefix needs several windows of the small workspaces
    for step in ([(0, 37), (1, 70)], [(0, 1), (1, 21), (2, 50)], [(1, 1), (0, 45), (2, 3)], [(2, 1), (0, 40)],
                 [(1, 1), (0, 70)]):
        sim.step(op, step, q, k, v, D ** -0.5)
    assert checks and max(w for _, w in checks) < (2e-2 if dtype == torch.bfloat16 else 6e-3), checks


def test_merge_into_handles_empty_parts():
    o = torch.randn(5, 3, 8)
    lse = torch.randn(3, 5)
    o2 = torch.randn(5, 3, 8)
    for empty in (float("inf"), float("-inf")):
        a, la = o.clone(), lse.clone()
        P.merge_into(a, la, o2, torch.full((3, 5), empty))
        assert torch.allclose(a, o) and torch.allclose(la, lse)
    a, la = o.clone(), lse.clone()
    l2 = torch.randn(3, 5)
    P.merge_into(a, la, o2, l2)
    w = torch.sigmoid(lse - l2).transpose(0, 1)[..., None]
    assert torch.allclose(a, o * w + o2 * (1 - w), atol=1e-5)
    assert torch.allclose(la, torch.logaddexp(lse, l2), atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("preset", ["tq4", "tq3"])
def test_gpu_prefill_fa_llama_shapes(preset):
    """2 fresh prompts, then chunks over a long prefix with a workspace too small for it (windows). Needs vLLM (its
    bundled FlashAttention): skipped without it (scripts/device/gpu_tests.sh runs without the stage); with vLLM
    installed the FlashAttention must load."""
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed: stage it (scripts/device/README.md) for the FlashAttention prefill")
    assert CUDA and P.flash_attn_fn() is not None
    D, B, H, G, dtype = 128, 32, 8, 4, torch.bfloat16
    codec = LayerCodec(preset, D, B, layer_index=1, device="cuda")
    g = torch.Generator().manual_seed(3)
    L = 6000
    q = {i: torch.randn(L, H * G, D, generator=g).to(dtype).cuda() for i in range(2)}
    k = {i: (torch.randn(L, H, D, generator=g) * 2).to(dtype).cuda() for i in range(2)}
    v = {i: torch.randn(L, H, D, generator=g).to(dtype).cuda() for i in range(2)}
    for ws in (4096, 40):
        sim = PagedSim(codec, H, num_blocks=512, num_slots=8, dtype=dtype, device="cuda")
        checks = []
        op = _fa_op(ws, dtype, P.flash_attn_fn(), "triton", checks)
        for step in ([(0, 2000), (1, 1500)], [(0, 1), (1, 2011)], [(0, 1999), (1, 1)]):
            sim.step(op, step, q, k, v, D ** -0.5)
        assert max(w for _, w in checks) < 1.2e-2, (ws, checks)  # worst token (passed on an H200, 2026-11-26)
    assert not K._FA_FAILED


def test_workspace_is_shared_and_sized_in_blocks(monkeypatch):
    monkeypatch.delenv("TQ_VLLM_PREFILL_WS_TOKENS", raising=False)
    a = P.workspace_for("cpu", torch.bfloat16, 16, 2, 64, tokens=1000)
    assert a.k.shape == (63, 16, 2, 64) and a.v.shape == a.k.shape and a.k.dtype == torch.bfloat16
    assert P.workspace_for("cpu", torch.bfloat16, 16, 2, 64, tokens=1000) is a  # one per (device, dtype, shape)
    monkeypatch.setenv("TQ_VLLM_PREFILL_WS_TOKENS", "320")
    assert P.workspace_for("cpu", torch.bfloat16, 16, 2, 64, tokens=1000).blocks == 20


def test_flash_attention_failure_falls_back_to_the_fused_kernel(monkeypatch):
    """auto: a FlashAttention build that raises is reported once and the fused Triton kernel serves the step (and
    every later one); TQ_VLLM_PREFILL=fa raises instead."""
    def broken(*a, **kw):
        raise RuntimeError("no kernel image is available for execution on the device")

    monkeypatch.setattr(K, "_FA_FAILED", [])
    monkeypatch.setattr(K, "prefill_mode", lambda codec, q: "triton" if K._FA_FAILED else "fa")
    monkeypatch.setattr(P, "flash_attn_fn", lambda: broken)
    D, B, H, G = 64, 16, 1, 2
    codec = LayerCodec("tq4", D, B, device=DEV)
    g = torch.Generator().manual_seed(5)
    q = {0: torch.randn(50, H * G, D, generator=g).to(torch.bfloat16).to(DEV)}
    k = {0: torch.randn(50, H, D, generator=g).to(torch.bfloat16).to(DEV)}
    v = {0: torch.randn(50, H, D, generator=g).to(torch.bfloat16).to(DEV)}
    for env in ("fa", "auto"):
        monkeypatch.setenv("TQ_VLLM_PREFILL", env)
        sim = PagedSim(codec, H, num_blocks=8, num_slots=4, dtype=torch.bfloat16, device=DEV)

        def op(codec_, q_, k_, v_, cache, staging, plan, sc, sink=None):
            out = torch.full(q_.shape, float("nan"), dtype=q_.dtype, device=q_.device)
            K.forward_step(codec_, q_, k_, v_, cache, staging, plan, sc, out=out, force="triton", sink=sink)
            return out

        if env == "fa":
            with pytest.raises(K.FlashAttentionError, match="no kernel image"):
                sim.step(op, [(0, 40)], q, k, v, D ** -0.5)
            assert not K._FA_FAILED
            continue
        with pytest.warns(UserWarning, match="FlashAttention prefill failed"):
            got = sim.step(op, [(0, 40)], q, k, v, D ** -0.5)[0]
        ref_sim = PagedSim(codec, H, num_blocks=8, num_slots=4, dtype=torch.bfloat16, device=DEV)
        exp = ref_sim.step(ref.forward_step, [(0, 40)], q, k, v, D ** -0.5)[0]
        assert len(K._FA_FAILED) == 1 and _rel(got, exp) < 8e-3
