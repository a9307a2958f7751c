"""Page layout, page codec and the torch reference of paged store/attention (decode semantics)."""
import random
import zlib

import pytest
import torch

from paged_sim import PagedSim, naive_decode_semantics
from tq_vllm.quant import PRESETS, PageLayout, get_preset
from tq_vllm.quant import reference as ref
from tq_vllm.quant.codec import LayerCodec
from tq_vllm.quant.plan import StagingAllocator, StagingEvictedError


@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("dim", [64, 96, 128, 256])
@pytest.mark.parametrize("block", [16, 32, 128])
def test_layout_fields_disjoint_aligned_and_exact(preset, dim, block):
    lay = PageLayout(preset, dim, block)
    spans = sorted((f.offset, f.end, f.name) for f in lay.fields.values())
    for (a0, a1, _), (b0, _, _) in zip(spans, spans[1:]):
        assert a1 <= b0
    assert spans[-1][1] == lay.used_bytes <= lay.page_bytes == lay.bytes_per_token * block
    assert lay.page_bytes - lay.used_bytes < block  # C is the ceiling, not more
    for f in lay.fields.values():
        if f.item_bytes == 2:
            assert f.offset % 2 == 0
    p = get_preset(preset)
    # the codes alone: (k_code_bits + v_bits) * dim / 8 bytes per token
    codes = sum(f.nbytes for n, f in lay.fields.items() if "_codes" in n)
    assert codes == block * dim * (p.k_code_bits + p.v_bits) // 8


def test_layout_refusals_and_fingerprint():
    with pytest.raises(ValueError, match="head_dim 80"):
        PageLayout("tq4", 80, 16)
    with pytest.raises(ValueError, match="block_size"):
        PageLayout("tq4", 64, 24)
    with pytest.raises(ValueError, match="known presets"):
        PageLayout("tq5", 64, 16)
    fps = {PageLayout(p, 128, 32).fingerprint() for p in PRESETS}
    assert len(fps) == len(PRESETS)
    assert PageLayout("tq4", 128, 32).fingerprint() != PageLayout("tq4", 128, 16).fingerprint()


def test_capacity_targets_at_head_dim_128():
    assert 4 * 128 / PageLayout("tq4", 128, 32).bytes_per_token >= 3.8
    assert 4 * 128 / PageLayout("tq3", 128, 32).bytes_per_token >= 4.9


@pytest.mark.parametrize("preset", list(PRESETS))
def test_pages_roundtrip_and_untouched_blocks(preset):
    torch.manual_seed(0)
    D, H, B = 64, 3, 16
    codec = LayerCodec(preset, D, B, layer_index=1)
    C = codec.layout.bytes_per_token
    cache = torch.randint(0, 256, (10, H, B, C), dtype=torch.uint8)
    before = cache.clone()
    k, v = torch.randn(2, B, H, D) * 3 + 1, torch.randn(2, B, H, D)
    ids = torch.tensor([7, 2])
    fields = codec.encode_blocks(k, v)
    codec.write_pages(cache, ids, fields)
    others = [i for i in range(10) if i not in (7, 2)]
    assert torch.equal(cache[others], before[others])
    pad = codec.layout.page_bytes - codec.layout.used_bytes
    if pad:
        assert torch.all(cache.view(10, H, -1)[ids, :, -pad:] == 0)
    kd, vd = codec.dequantize_pages(cache, ids)
    rel_k = ((kd - k) ** 2).sum() / (k ** 2).sum()
    rel_v = ((vd - v) ** 2).sum() / (v ** 2).sum()
    bound = {2: 0.2, 3: 0.06, 4: 0.02, 8: 1e-3}
    # prod keys trade MSE for unbiased inner products: (b-1)-bit error plus the QJL term
    assert rel_k < (0.08 if codec.preset.k_mode == "prod" else bound[codec.layout.k_bits])
    assert rel_v < bound[codec.layout.v_bits]


def _random_schedule(lengths, rng, max_chunk):
    """Random chunked-prefill/decode schedule: each step schedules a random subset with random chunk sizes."""
    done = {r: 0 for r in lengths}
    steps = []
    while any(done[r] < lengths[r] for r in lengths):
        step = []
        for r in lengths:
            left = lengths[r] - done[r]
            if left and rng.random() < 0.8:
                n = min(left, rng.choice([1, 1, 2, 3, rng.randint(1, max_chunk)]))
                step.append((r, n))
                done[r] += n
        if step:
            steps.append(step)
    return steps


@pytest.mark.parametrize("preset,dim,block,gqa", [("tq4", 64, 16, 4), ("tq3", 128, 32, 1), ("tq25", 64, 16, 7),
                                                   ("tq4-prod", 64, 16, 2), ("tq35", 256, 16, 8)])
def test_reference_is_chunk_invariant_and_matches_oracle(preset, dim, block, gqa):
    rng = random.Random(zlib.crc32(f"{preset}{dim}".encode()))
    torch.manual_seed(rng.randint(0, 10**6))
    H = 2 if gqa != 7 else 1
    Hq = H * gqa
    codec = LayerCodec(preset, dim, block, layer_index=rng.randint(0, 30))
    lengths = {0: 3 * block + 5, 1: block, 2: block - 3, 3: 2 * block + 1}
    q = {r: torch.randn(L, Hq, dim).bfloat16() for r, L in lengths.items()}
    k = {r: (torch.randn(L, H, dim) * 2 + torch.randn(dim)).bfloat16() for r, L in lengths.items()}
    v = {r: torch.randn(L, H, dim).bfloat16() for r, L in lengths.items()}
    scale = dim ** -0.5
    for trial in range(2):
        sim = PagedSim(codec, H, num_blocks=32, num_slots=6, seed=trial)
        outs = {r: [] for r in lengths}
        for step in _random_schedule(lengths, rng, max_chunk=2 * block):
            for r, o in sim.step(ref.forward_step, step, q, k, v, scale).items():
                outs[r].append(o)
        for r in lengths:
            got = torch.cat(outs[r])
            want = naive_decode_semantics(codec, q[r], k[r], v[r], scale)
            assert torch.isfinite(got).all()
            torch.testing.assert_close(got, want, rtol=2e-4, atol=2e-4)


def test_rotated_query_path_equals_dequantize_path():
    torch.manual_seed(3)
    D, H, Hq, B = 128, 2, 8, 16
    codec = LayerCodec("tq3", D, B, layer_index=4)
    L = 5 * B + 7
    q = {0: torch.randn(L, Hq, D)}
    k = {0: torch.randn(L, H, D) + 0.5}
    v = {0: torch.randn(L, H, D)}
    outs = {}
    for rotated in (True, False):
        sim = PagedSim(codec, H, num_blocks=16, num_slots=2, dtype=torch.float32)
        op = lambda *a, rotated=rotated, sink=None: ref.forward_step(*a, rotated=rotated, sink=sink)  # noqa: E731
        outs[rotated] = torch.cat([sim.step(op, [(0, n)], q, k, v, D ** -0.5)[0] for n in (40, 1, 1, 30, 15)])
    torch.testing.assert_close(outs[True], outs[False], rtol=1e-4, atol=1e-5)


def test_error_vs_exact_attention_shrinks_with_bits():
    torch.manual_seed(5)
    D, H, Hq, B, L = 64, 2, 4, 16, 8 * 16
    q = torch.randn(L, Hq, D) * 2
    k = torch.randn(L, H, D) * 2 + torch.randn(D)
    v = torch.randn(L, H, D)
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    s = torch.einsum("qhd,khd->hqk", q, kk) * D ** -0.5
    s = s.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1)[None], float("-inf"))
    fp = torch.einsum("hqk,khd->qhd", torch.softmax(s, -1), vv)
    errs = []
    for bits in (2, 3, 4, 8):
        codec = LayerCodec(get_preset("tq4", k_bits=bits, v_bits=bits, name=f"b{bits}"), D, B)
        out = naive_decode_semantics(codec, q, k, v, D ** -0.5)
        errs.append(((out - fp) ** 2).mean().item())
    assert errs == sorted(errs, reverse=True) and errs[-1] < errs[0] / 50


def test_staging_allocator_reuse_rollback_and_eviction_error():
    a = StagingAllocator(3)
    a.begin_step()
    s1 = a.assign(100)
    s2 = a.assign(200)
    assert s1 != s2
    a.begin_step()
    assert a.lookup(100) == s1
    s3 = a.assign(300, reuse_slot=s1)  # block 100 completed, the same request opens block 300 in s1
    assert s3 == s1
    a.begin_step()
    s4 = a.assign(400)  # the never-used slot comes first
    assert s4 not in (s1, s2)
    a.begin_step()
    a.assign(500)  # least recently used: block 200's slot (its request presumably finished)
    with pytest.raises(StagingEvictedError, match="staging_slots"):
        a.lookup(200)
    a.begin_step()
    a.lookup(300)
    a.lookup(400)
    a.lookup(500)
    with pytest.raises(StagingEvictedError, match="staging_slots"):
        a.assign(600)  # every slot is in use in this very step


def test_sink_tags_content_addressed():
    from tq_vllm.quant.codec import sink_tags
    g = torch.Generator().manual_seed(21)
    k, v = torch.randn(6, 3, 64, generator=g).bfloat16(), torch.randn(6, 3, 64, generator=g).bfloat16()
    t = sink_tags(k, v)
    assert t.dtype == torch.int64 and t.shape == (6, 3) and bool((t > 0).all())
    assert torch.equal(t, sink_tags(k.clone(), v.clone()))
    assert len(set(t.flatten().tolist())) == 18
    k2 = k.clone()
    k2[0, 0, 5] = k2[0, 0, 5] + 0.0625  # one value changed
    assert sink_tags(k2, v)[0, 0] != t[0, 0] and torch.equal(sink_tags(k2, v)[1:], t[1:])


def _run_single(codec, q, k, v, steps, sink_entries=16, reset_sink_before=None):
    sim = PagedSim(codec, k[0].shape[1], num_blocks=24, num_slots=4, sink_entries=sink_entries)
    outs = []
    for i, n in enumerate(steps):
        if reset_sink_before == i:  # e.g. pages loaded by the connector into an instance with an empty table
            sim.sink[1].zero_()
        outs.append(sim.step(ref.forward_step, [(0, n)], q, k, v, 64 ** -0.5)[0])
    return torch.cat(outs)


def test_sink_token_exact_and_safe_fallback():
    torch.manual_seed(8)
    D, H, B, L = 64, 2, 16, 3 * 16 + 5
    codec = LayerCodec("tq3", D, B, layer_index=2)
    nosink = LayerCodec(get_preset("tq3", sink=False), D, B, layer_index=2)
    q = {0: torch.randn(L, 4, D)}
    k = {0: torch.randn(L, H, D).bfloat16()}
    v = {0: torch.randn(L, H, D).bfloat16()}
    k[0][0] *= 8  # a sink-like first key with a large norm
    want_sink = naive_decode_semantics(codec, q[0], k[0], v[0], D ** -0.5)
    want_coded = naive_decode_semantics(nosink, q[0], k[0], v[0], D ** -0.5)
    assert (want_sink - want_coded).abs().max() > 1e-3  # the exact sink matters here
    got = _run_single(codec, q, k, v, [20, 1, 12, 20])
    torch.testing.assert_close(got, want_sink, rtol=2e-4, atol=2e-4)
    # the table lost the entry (another instance, a restart): token 0 falls back to its codes, never garbage
    got = _run_single(codec, q, k, v, [20, 1, 12, 20], reset_sink_before=2)
    n_before = 21
    torch.testing.assert_close(got[:n_before], want_sink[:n_before], rtol=2e-4, atol=2e-4)
    torch.testing.assert_close(got[n_before:], want_coded[n_before:], rtol=2e-4, atol=2e-4)


def test_sink_collision_falls_back_per_sequence():
    torch.manual_seed(9)
    D, H, B = 64, 1, 16
    codec = LayerCodec("tq4", D, B)
    nosink = LayerCodec(get_preset("tq4", sink=False), D, B)
    Ls = {0: 40, 1: 40}
    q = {r: torch.randn(L, 2, D) for r, L in Ls.items()}
    k = {r: (torch.randn(L, H, D) * 3).bfloat16() for r, L in Ls.items()}
    v = {r: torch.randn(L, H, D).bfloat16() for r, L in Ls.items()}
    sim = PagedSim(codec, H, num_blocks=16, num_slots=4, sink_entries=1)  # one entry: the second evicts the first
    a = sim.step(ref.forward_step, [(0, 40)], q, k, v, D ** -0.5)[0]
    sim.step(ref.forward_step, [(1, 40)], q, k, v, D ** -0.5)
    k[0] = torch.cat([k[0], k[0][:1]]); q[0] = torch.cat([q[0], q[0][:1]]); v[0] = torch.cat([v[0], v[0][:1]])
    late = sim.step(ref.forward_step, [(0, 1)], q, k, v, D ** -0.5)[0]  # request 0 decodes after the eviction
    torch.testing.assert_close(a, naive_decode_semantics(codec, q[0][:40], k[0][:40], v[0][:40], D ** -0.5),
                               rtol=2e-4, atol=2e-4)
    want = naive_decode_semantics(nosink, q[0], k[0], v[0], D ** -0.5)[-1:]
    torch.testing.assert_close(late, want, rtol=2e-4, atol=2e-4)
