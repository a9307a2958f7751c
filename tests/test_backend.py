"""The vLLM backend's glue without an engine: options, refusals, capacity arithmetic, and the builder + impl driven
through vLLM's own CommonAttentionMetadata by a small scheduler simulator (random block ids, mixed prefill/decode
batches, arbitrary chunking, speculative-decoding verification with rollback, GQA/MQA, head sizes, dtypes),
checked against the independent decode-semantics oracle of tests/paged_sim.py."""
from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm")

from paged_sim import naive_decode_semantics  # noqa: E402
from vllm.v1.attention.backend import CommonAttentionMetadata  # noqa: E402

from tq_vllm import compat  # noqa: E402
from tq_vllm.attention import backend as be  # noqa: E402
from tq_vllm.attention.capacity import Capacity, LayerCost, bytes_per_token  # noqa: E402
from tq_vllm.config import TQConfig, TQConfigError  # noqa: E402
from tq_vllm.quant.codec import LayerCodec  # noqa: E402
from tq_vllm.quant.layout import PageLayout  # noqa: E402
from tq_vllm.quant.presets import PRESETS, get_preset  # noqa: E402


# ============================================================================================== options
def test_config_defaults_and_parsing():
    c = TQConfig.from_dict(None)
    assert c.preset.name == "tq4" and not c.has_boundary and c.seed == 0
    c = TQConfig.from_dict({"preset": "tq3", "boundary_layers": 2, "boundary_preset": "bf16", "staging_slots": 40})
    assert c.preset.name == "tq3" and c.boundary_preset is None and c.boundary_name == "bf16"
    assert [c.is_boundary(i, 10) for i in range(10)] == [True, True] + [False] * 6 + [True, True]
    c = TQConfig.from_dict({"boundary_layers": [1, 0]})
    assert c.boundary_preset.name == "tq8" and [c.is_boundary(i, 4) for i in range(4)] == [True, False, False, False]
    c = TQConfig.from_dict({"preset": {"base": "tq4", "v_bits": 3, "name": "k4v3"}})
    assert c.preset.name == "k4v3" and c.preset.v_bits == 3
    vc = SimpleNamespace(additional_config={"tq_vllm": '{"preset": "tq25"}'})
    assert TQConfig.from_vllm_config(vc).preset.name == "tq25"
    assert TQConfig.from_vllm_config(SimpleNamespace(additional_config={})).preset.name == "tq4"
    assert c.num_staging_slots(64) == 64 + 8 and TQConfig().num_staging_slots(256) == 256 + 32
    assert TQConfig.from_dict({"prefill_workspace_tokens": 4096}).prefill_workspace_tokens == 4096
    assert TQConfig().prefill_workspace_tokens is None  # the kernels' default


@pytest.mark.parametrize("opts, match", [
    ({"preset": "tq5"}, r"preset='tq5' is invalid.*Known presets: tq4, tq3"),
    ({"presets": "tq4"}, r"unknown option\(s\) \['presets'\].*known options: preset, boundary_layers"),
    ({"boundary_layers": -1}, "must not be negative"),
    ({"boundary_layers": "2"}, "must be an int N"),
    ({"boundary_layers": 1, "boundary_preset": "fp8"}, r"boundary_preset='fp8' is invalid"),
    ({"boundary_preset": "tq8"}, "boundary_layers is 0"),
    ({"staging_slots": 0}, "positive int"),
    ({"preset": {"base": "tq4", "k_bits": 9}}, "between 1 and 8"),
    ({"seed": "x"}, "must be an int"),
    ({"prefill_workspace_tokens": 100}, r"prefill_workspace_tokens=100 must be an int >= 256"),
    ({"prefill_workspace_tokens": True}, r"prefill_workspace_tokens=True must be an int"),
])
def test_config_errors_name_problem_and_fix(opts, match):
    with pytest.raises(TQConfigError, match=match):
        TQConfig.from_dict(opts)


def test_config_errors_against_the_model():
    with pytest.raises(TQConfigError, match="staging_slots=4 is below max_num_seqs=8.*at least 16"):
        TQConfig.from_dict({"staging_slots": 4}).num_staging_slots(8)
    with pytest.raises(TQConfigError, match="covers more than the model's 4 layers"):
        TQConfig.from_dict({"boundary_layers": 3}).check_layers(4)
    with pytest.raises(TQConfigError, match="not valid JSON"):
        TQConfig.from_vllm_config(SimpleNamespace(additional_config={"tq_vllm": "{preset"}))


def test_layer_index():
    assert compat.layer_index("model.layers.7.self_attn.attn") == 7
    assert compat.layer_index("model.layers.12.attn") == 12
    assert compat.layer_index("transformer.h.3.attn.attn") == 3
    assert compat.layer_index("drafter.model.layers.0.self_attn.attn") == 0
    assert compat.layer_index("lm_head") is None


# ============================================================================================== refusals
def _check(**over):
    kw = dict(num_heads=8, head_size=128, num_kv_heads=2, alibi_slopes=None, sliding_window=None,
              kv_cache_dtype="auto", logits_soft_cap=None, attn_type="decoder", kv_sharing_target_layer_name=None,
              extra={})
    kw.update(over)
    be.check_layer(None, **kw)


@pytest.mark.parametrize("over, match", [
    (dict(attn_type="encoder_decoder"), "decoder self-attention only.*encoder_decoder.*without --attention-backend"),
    (dict(attn_type="encoder_only"), "decoder self-attention only"),
    (dict(extra={"sinks": torch.zeros(8)}), "attention sinks"),
    (dict(sliding_window=4096), r"sliding-window attention \(window 4096\).*--disable-sliding-window"),
    (dict(head_size=80), r"head size 80 is not supported \(supported: 64, 96, 128, 256\)"),
    (dict(alibi_slopes=[0.5] * 8), "ALiBi"),
    (dict(logits_soft_cap=30.0), "soft-capping"),
    (dict(kv_sharing_target_layer_name="model.layers.0.attn"), "cross-layer KV sharing"),
    (dict(kv_cache_dtype="fp8"), r"--kv-cache-dtype fp8 conflicts.*Drop --kv-cache-dtype.*known presets: tq4"),
])
def test_refusals_are_clear(over, match):
    with pytest.raises(be.TQUnsupportedError, match=match):
        _check(**over)


def test_refusals_mla_and_sparse_through_vllm_validation():
    assert "MLA models" in be.TQAttentionBackend.supports_combination(128, torch.bfloat16, "auto", 16, True, False,
                                                                       False, False, None)
    assert "sparse attention" in be.TQAttentionBackend.supports_combination(128, torch.bfloat16, "auto", 16, False,
                                                                             False, True, False, None)
    assert be.TQAttentionBackend.supports_combination(128, torch.bfloat16, "auto", 16, False, False, False, False,
                                                      None) is None


def test_sliding_window_message_names_the_layers():
    hf = SimpleNamespace(sliding_window=512, layer_types=["sliding_attention", "full_attention"] * 3,
                         num_hidden_layers=6)
    vc = SimpleNamespace(model_config=SimpleNamespace(hf_text_config=hf))
    with pytest.raises(be.TQUnsupportedError, match=r"window 512\) in layers \[0, 2, 4\] \(3 of 6\)"):
        be.check_layer(vc, num_heads=8, head_size=128, num_kv_heads=2, alibi_slopes=None, sliding_window=512,
                       kv_cache_dtype="auto", logits_soft_cap=None, attn_type="decoder",
                       kv_sharing_target_layer_name=None, extra={})


# ============================================================================================== capacity
@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("dim", [64, 128, 256])
def test_page_size_is_the_layout(preset, dim):
    p = get_preset(preset)
    assert bytes_per_token(p, dim, 32) == PageLayout(p, dim, 32).bytes_per_token
    assert bytes_per_token(None, dim, 32, 2) == 4 * dim  # exact bf16 pages


@pytest.mark.parametrize("default,want", [(16, 32), (8, 32), (32, 32), (48, 48), (64, 64), (100, 112)])
def test_preferred_block_size_amortises_page_fields(default, want):
    b = be.TQAttentionBackend.get_preferred_block_size(default)
    assert b == want and b % be.KERNEL_BLOCK_MULTIPLE == 0
    # the page overhead per token really is smaller at the chosen size than at vLLM's default 16
    if default == 16:
        assert be.TQAttentionBackend.bytes_per_token(128, b) < be.TQAttentionBackend.bytes_per_token(128, 16)


def test_capacity_formula_mixed_layers():
    lay = [LayerCost(f"l{i}", "tq4", 8, 128, PageLayout("tq4", 128, 16).bytes_per_token) for i in range(30)]
    lay += [LayerCost("b0", "tq8", 8, 128, PageLayout("tq8", 128, 16).bytes_per_token),
            LayerCost("b1", "bf16", 8, 128, 512)]
    cap = Capacity(tuple(lay), 16)
    per_tok = sum(c.num_kv_heads * c.bytes_per_token_per_head for c in lay)
    assert cap.bytes_per_token == per_tok
    avail = 10 * 2**30
    assert cap.expected_tokens(avail) == (avail // (16 * per_tok)) * 16
    assert abs(cap.expected_tokens(avail) - avail / per_tok) < 16
    assert cap.ratio_vs_bf16 == pytest.approx(32 * 8 * 512 / per_tok)


@pytest.fixture
def tq3_exact_boundary(monkeypatch):
    cfg = TQConfig.from_dict({"preset": "tq3", "boundary_layers": 1, "boundary_preset": "bf16"})
    monkeypatch.setitem(be._ACTIVE, "config", cfg)
    monkeypatch.setitem(be._ACTIVE, "vllm_config", SimpleNamespace(model_config=SimpleNamespace(dtype=torch.bfloat16)))
    monkeypatch.setattr(be.compat, "current_vllm_config", lambda: None)
    return cfg


@pytest.mark.skipif(not compat.has_customize_spec(), reason="vLLM 0.32+ hook")
def test_page_size_through_customize_spec(tq3_exact_boundary):
    """vLLM 0.32+: customize_spec gives [blocks, H, B, C] uint8 pages of exactly the layout's bytes."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec
    spec = FullAttentionSpec(block_size=32, num_kv_heads=4, head_size=128, dtype=torch.bfloat16)
    s = be.TQAttentionBackend.customize_spec(spec)
    C = PageLayout("tq3", 128, 32).bytes_per_token
    assert s.dtype == torch.uint8 and s.page_size_bytes == 32 * 4 * C and s.state_content_size_bytes == C
    assert be.TQBoundaryBackend.customize_spec(spec).page_size_bytes == spec.page_size_bytes  # exact = bf16
    assert be.TQAttentionBackend.customize_spec(s) is s  # idempotent
    assert be.TQAttentionBackend.supported_kv_cache_layouts()[0].name == "LBHNC"
    assert be.TQAttentionBackend.get_name() == be.TQBoundaryBackend.get_name() == "CUSTOM"


@pytest.mark.skipif(compat.has_customize_spec(), reason="vLLM 0.26 route")
def test_page_size_through_the_026_layer_spec(tq3_exact_boundary):
    """vLLM 0.26: only tq_vllm's layer instances report vLLM's own TQFullAttentionSpec (uint8, tq_slot_size = C);
    vLLM groups mixed page sizes as one uniform-type group, merges equal ones keeping C, and get_kv_cache_shape
    covers exactly the page."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec, TQFullAttentionSpec, UniformTypeKVCacheSpecs

    class FakeLayer:
        head_size, sliding_window = 128, None

        def get_kv_cache_spec(self, vllm_config):
            return FullAttentionSpec(block_size=32, num_kv_heads=4, head_size=128, dtype=torch.bfloat16)

    a, b, untouched = FakeLayer(), FakeLayer(), FakeLayer()
    compat.install_layer_spec_026(a, be.TQAttentionBackend)
    compat.install_layer_spec_026(b, be.TQBoundaryBackend)
    sa, sb = a.get_kv_cache_spec(None), b.get_kv_cache_spec(None)
    C = PageLayout("tq3", 128, 32).bytes_per_token
    assert type(sa) is TQFullAttentionSpec and sa.dtype == torch.uint8 and sa.tq_slot_size == C
    assert sa.page_size_bytes == 32 * 4 * C and sb.page_size_bytes == 32 * 4 * 512
    assert type(untouched.get_kv_cache_spec(None)) is FullAttentionSpec  # the class is not patched
    assert UniformTypeKVCacheSpecs.is_uniform_type({"l0": sb, "l1": sa, "l2": sa})
    assert TQFullAttentionSpec.merge([sa, sa]).page_size_bytes == sa.page_size_bytes
    shape = be.TQAttentionBackend.get_kv_cache_shape(10, 32, 4, 128)
    assert shape == (10, 4, 32, C) and torch.Size(shape).numel() == 10 * sa.page_size_bytes
    assert be.TQBoundaryBackend.get_kv_cache_shape(10, 32, 4, 128) == (10, 4, 32, 512)


def test_cpu_selection_follows_the_config(monkeypatch):
    from vllm.v1.attention.backends.registry import AttentionBackendEnum as E

    from tq_vllm._vllm_plugin import register, register_cpu_overrides
    from tq_vllm.attention import cpu_select
    register()
    register_cpu_overrides()  # what register() does on the CPU platform (also check it on other builds)
    monkeypatch.delenv("TQ_VLLM", raising=False)
    sel = SimpleNamespace(attention_config=SimpleNamespace(backend=E.CUSTOM, backend_per_kind={}))
    other = SimpleNamespace(attention_config=SimpleNamespace(backend=None, backend_per_kind={}))
    per_kind = SimpleNamespace(attention_config=SimpleNamespace(backend=None,
                                                                backend_per_kind={"full_attention": E.CUSTOM}))
    assert cpu_select.tq_selected(sel) and cpu_select.tq_selected(per_kind) and not cpu_select.tq_selected(other)
    monkeypatch.setattr(compat, "current_vllm_config", lambda: sel)
    assert cpu_select.CPUAttentionBackend is be.TQAttentionBackend
    assert E.CPU_ATTN.get_class() is be.TQAttentionBackend
    mla = [getattr(E, n) for n in ("CPU_MLA", "AMX_MLA") if hasattr(E, n)]  # (vLLM 0.32+)
    for member in mla:
        with pytest.raises(be.TQUnsupportedError, match="MLA"):
            member.get_class()
    monkeypatch.setattr(compat, "current_vllm_config", lambda: other)
    assert E.CPU_ATTN.get_class().__name__ == "CPUAttentionBackend"
    assert E.CPU_ATTN.get_class() is not be.TQAttentionBackend
    for member in mla:
        assert member.get_class().__name__ != "TQAttentionBackend"
    monkeypatch.setenv("TQ_VLLM", "1")
    assert E.CPU_ATTN.get_class() is be.TQAttentionBackend
    assert E.CUSTOM.get_class() is be.TQAttentionBackend


# ============================================================================================== simulator
class Sim:
    """A miniature vLLM around one tq_vllm layer: random block ids, per-step CommonAttentionMetadata, the real
    builder and impl. Requests are (q, k, v) full sequences; `step({rid: n_new})` runs one batch."""

    def __init__(self, preset="tq4", D=64, H=2, Hq=4, B=16, dtype=torch.bfloat16, max_num_seqs=8, spec_tokens=0,
                 num_blocks=96, seed=0, exact=False):
        self.B, self.H, self.Hq, self.D, self.dtype = B, H, Hq, D, dtype
        opts = {"preset": preset}
        if exact:
            opts.update(boundary_layers=1, boundary_preset="bf16")
        vc = SimpleNamespace(
            additional_config={"tq_vllm": opts},
            model_config=SimpleNamespace(dtype=dtype, max_model_len=4096, hf_text_config=None,
                                         get_total_num_hidden_layers=lambda: 3),
            cache_config=SimpleNamespace(block_size=B, num_gpu_blocks=num_blocks, kv_cache_dtype_skip_layers=None),
            scheduler_config=SimpleNamespace(max_num_seqs=max_num_seqs, max_num_batched_tokens=2048),
            device_config=SimpleNamespace(device="cpu", device_type="cpu"),
            speculative_config=SimpleNamespace(num_speculative_tokens=spec_tokens) if spec_tokens else None,
            compilation_config=SimpleNamespace(static_forward_context={}),
            parallel_config=SimpleNamespace(decode_context_parallel_size=1))
        self.vc = vc
        be._ACTIVE.update(config=None, vllm_config=None)
        cfg = be._set_active(vc)
        self.builder = be.TQMetadataBuilder(SimpleNamespace(block_size=B), [], vc, torch.device("cpu"))
        self.impl = be.TQAttentionImpl(Hq, D, D ** -0.5, H)
        backend = be.TQBoundaryBackend if exact else be.TQAttentionBackend
        self.impl.bind(SimpleNamespace(head_size_v=D), "model.layers.0.self_attn.attn", 0, backend, cfg, vc)
        self.impl.ensure_staging(B, self.builder.num_slots + 1)
        C = backend.bytes_per_token(D, B, dtype)
        g = torch.Generator().manual_seed(seed)
        self.kv_cache = torch.randint(0, 256, (num_blocks, H, B, C), generator=g, dtype=torch.uint8)
        self.free = [b for b in torch.randperm(num_blocks, generator=g).tolist() if b != 0]  # 0 = null block
        self.tables: dict = {}
        self.done: dict = {}

    def step(self, sched: dict, seqs: dict):
        """sched: {rid: n_new}; seqs[rid] = (q [L,Hq,D], k [L,H,D], v). Returns {rid: out [n, Hq, D]}."""
        B = self.B
        rows = list(sched.items())
        qs, ks, vs, qsl, seq, slots = [], [], [], [0], [], []
        for rid, n in rows:
            c = self.done.get(rid, 0)
            L = c + n
            tab = self.tables.setdefault(rid, [])
            while len(tab) * B < L:
                tab.append(self.free.pop())
            q, k, v = seqs[rid]
            qs.append(q[c:L]); ks.append(k[c:L]); vs.append(v[c:L])
            qsl.append(qsl[-1] + n); seq.append(L)
            slots += [tab[p // B] * B + p % B for p in range(c, L)]
        width = max(len(self.tables[r]) for r, _ in rows) + 2
        bt = torch.zeros(len(rows), width, dtype=torch.int32)
        for i, (rid, _) in enumerate(rows):
            bt[i, :len(self.tables[rid])] = torch.tensor(self.tables[rid], dtype=torch.int32)
        qsl_t = torch.tensor(qsl, dtype=torch.int32)
        cam = CommonAttentionMetadata(
            query_start_loc=qsl_t, query_start_loc_cpu=qsl_t, seq_lens=torch.tensor(seq, dtype=torch.int32),
            num_reqs=len(rows), num_actual_tokens=qsl[-1], max_query_len=max(n for _, n in rows),
            max_seq_len=max(seq), block_table_tensor=bt, slot_mapping=torch.tensor(slots, dtype=torch.int64))
        md = self.builder.build(0, cam)
        T = qsl[-1]
        pad = 3  # vLLM may hand padded tensors; only num_actual_tokens rows count
        cat = lambda xs, h: torch.cat(xs + [torch.zeros(pad, h, self.D)]).to(self.dtype)  # noqa: E731
        out = torch.full((T + pad, self.Hq, self.D), float("nan"), dtype=self.dtype)
        self.impl.forward(None, cat(qs, self.Hq), cat(ks, self.H), cat(vs, self.H), self.kv_cache, md, out)
        res = {}
        for i, (rid, _) in enumerate(rows):
            res[rid] = out[qsl[i]:qsl[i + 1]].float()
            self.done[rid] = seq[i]
        return res

    def rollback(self, rid, n):
        self.done[rid] -= n


def _seqs(nreq, lens, Hq, H, D, seed=0, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for r in range(nreq):
        L = lens[r]
        q = torch.randn(L, Hq, D, generator=g)
        k = torch.randn(L, H, D, generator=g) * 2 + torch.randn(1, H, D, generator=g)
        v = torch.randn(L, H, D, generator=g)
        out[r] = tuple(t.to(dtype) for t in (q, k, v))
    return out


def _oracle(sim, seqs, rid, codec=None):
    q, k, v = seqs[rid]
    codec = codec or sim.impl.codec
    return naive_decode_semantics(codec, q.float(), k.float(), v.float(), sim.D ** -0.5)


def _run_schedule(sim, seqs, chunks, rng):
    """Random interleaving of every request's chunks (mixed prefill/decode batches in random order)."""
    pending = {r: list(c) for r, c in chunks.items()}
    got = {r: [] for r in chunks}
    while any(pending.values()):
        live = [r for r, c in pending.items() if c]
        batch = rng.sample(live, rng.randint(1, len(live)))
        res = sim.step({r: pending[r].pop(0) for r in batch}, seqs)
        for r, o in res.items():
            got[r].append(o)
    return {r: torch.cat(v) for r, v in got.items()}


def _tol(dtype):
    return 2e-2 if dtype == torch.float16 else 3e-2


@pytest.mark.parametrize("preset, D, H, Hq, dtype", [
    ("tq4", 64, 2, 4, torch.bfloat16),     # GQA
    ("tq3", 128, 1, 4, torch.float16),     # MQA
    ("tq4-prod", 256, 2, 2, torch.bfloat16),  # MHA, head_dim 256
    ("tq25", 96, 3, 6, torch.float32),     # non power of two head_dim (QR rotation)
])
def test_mixed_batches_any_chunking_equal_the_oracle(preset, D, H, Hq, dtype):
    rng = random.Random(1)
    B = 16
    sim = Sim(preset, D=D, H=H, Hq=Hq, B=B, dtype=dtype)
    lens = [70, 33, 16, 51, 5]
    seqs = _seqs(len(lens), lens, Hq, H, D, seed=2, dtype=dtype)
    chunks = {}
    for r, L in enumerate(lens):
        cuts, p = [], 0
        while p < L:  # prefill chunks of random size (some cross block boundaries), then 1-token decodes
            n = min(L - p, rng.choice([1, 1, 3, 7, 16, 19, 40]) if p else rng.choice([1, 9, 17, 32, 45]))
            cuts.append(n)
            p += n
        chunks[r] = cuts
    got = _run_schedule(sim, seqs, chunks, rng)
    for r in chunks:
        ref = _oracle(sim, seqs, r)
        assert torch.isfinite(got[r]).all()
        torch.testing.assert_close(got[r], ref, atol=_tol(dtype), rtol=_tol(dtype))


def test_prefix_hit_and_preemption_recompute():
    """A request whose first blocks were filled by another request (prefix-cache hit: it starts at ctx = k*B with
    those block ids) and a request recomputed from scratch after preemption (fresh blocks) equal the oracle."""
    B, D, H, Hq = 16, 64, 2, 4
    sim = Sim("tq4", D=D, H=H, Hq=Hq, B=B)
    seqs = _seqs(3, [80, 80, 60], Hq, H, D, seed=5)
    q1, k1, v1 = seqs[1]
    k1[:48], v1[:48] = seqs[0][1][:48], seqs[0][2][:48]  # request 1 shares a 3-block prefix with request 0
    for n in (20, 20, 40):
        sim.step({0: n}, seqs)
    sim.tables[1] = list(sim.tables[0][:3])  # prefix-cache hit on the 3 full blocks
    sim.done[1] = 48
    out1 = torch.cat([sim.step({1: 32}, seqs)[1]])
    ref1 = _oracle(sim, seqs, 1)[48:]
    torch.testing.assert_close(out1, ref1, atol=3e-2, rtol=3e-2)
    # preemption: request 2 runs 40 tokens, is preempted (blocks freed), then recomputed in other blocks
    sim.step({2: 40}, seqs)
    sim.free = sim.tables.pop(2) + sim.free
    sim.done[2] = 0
    sim.free.reverse()
    outs = [sim.step({2: 25}, seqs)[2], sim.step({2: 35}, seqs)[2]]
    torch.testing.assert_close(torch.cat(outs), _oracle(sim, seqs, 2), atol=3e-2, rtol=3e-2)


def test_speculative_verification_with_rollback():
    """Verification rows of 1 + k tokens, with some drafts rejected (vLLM rolls num_computed_tokens back, also
    across a block that became full in the verification step). Accepted positions must equal the oracle."""
    B, D, H, Hq, k = 16, 64, 2, 4, 3
    sim = Sim("tq4", D=D, H=H, Hq=Hq, B=B, spec_tokens=k)
    seqs = _seqs(2, [120, 120], Hq, H, D, seed=9)
    rng = random.Random(3)
    ref = {r: _oracle(sim, seqs, r) for r in seqs}
    sim.step({0: 13, 1: 30}, seqs)
    crossed = 0
    for _ in range(40):
        pos = {r: sim.done[r] for r in seqs}
        if max(pos.values()) + k + 1 > 120:
            break
        res = sim.step({r: k + 1 for r in seqs}, seqs)
        for r, o in res.items():
            acc = rng.randint(0, k)  # accepted drafts; the first token of the step is always kept
            torch.testing.assert_close(o[:acc + 1], ref[r][pos[r]:pos[r] + acc + 1], atol=3e-2, rtol=3e-2)
            if pos[r] // B != (pos[r] + k + 1) // B and (pos[r] + acc + 1) % B and \
                    (pos[r] + acc + 1) // B == pos[r] // B:
                crossed += 1
            sim.rollback(r, k - acc)
    assert crossed >= 3  # rollbacks into a block that had become full did happen


def test_exact_boundary_layer_is_plain_attention():
    B, D, H, Hq = 16, 64, 2, 4
    sim = Sim("tq4", D=D, H=H, Hq=Hq, B=B, exact=True)
    assert sim.impl.exact
    seqs = _seqs(2, [50, 37], Hq, H, D, seed=4)
    got = _run_schedule(sim, seqs, {0: [20, 17, 1, 1, 11], 1: [37]}, random.Random(0))
    for r in seqs:
        q, k, v = (t.float() for t in seqs[r])
        L = q.shape[0]
        s = torch.einsum("qhd,khd->hqk", q, k.repeat_interleave(2, 1)) * D ** -0.5
        s = s.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1)[None], float("-inf"))
        ref = torch.einsum("hqk,khd->qhd", s.softmax(-1), v.repeat_interleave(2, 1))
        torch.testing.assert_close(got[r], ref, atol=2e-2, rtol=2e-2)


def test_dummy_batches_do_not_disturb_real_requests():
    """vLLM's warm-up batches point at the null block 0 with arbitrary lengths: planned on the spare slot."""
    B, D, H, Hq = 16, 64, 2, 4
    sim = Sim("tq4", D=D, H=H, Hq=Hq, B=B)
    seqs = _seqs(1, [40], Hq, H, D, seed=1)
    a = sim.step({0: 21}, seqs)[0]
    qsl = torch.tensor([0, 3, 4], dtype=torch.int32)
    cam = CommonAttentionMetadata(query_start_loc=qsl, query_start_loc_cpu=qsl,
                                  seq_lens=torch.tensor([7, 9], dtype=torch.int32), num_reqs=2, num_actual_tokens=4,
                                  max_query_len=3, max_seq_len=9, block_table_tensor=torch.zeros(2, 4,
                                                                                                  dtype=torch.int32),
                                  slot_mapping=torch.zeros(4, dtype=torch.int64))
    md = sim.builder.build(0, cam)
    assert set(md.plan.ctx_slot.tolist()) == {sim.builder.num_slots}
    x = torch.randn(4, Hq, D, dtype=torch.bfloat16)
    sim.impl.forward(None, x, x[:, :H], x[:, :H], sim.kv_cache, md, torch.empty_like(x))
    b = sim.step({0: 19}, seqs)[0]
    torch.testing.assert_close(torch.cat([a, b]), _oracle(sim, seqs, 0), atol=3e-2, rtol=3e-2)


def test_staging_eviction_is_reported_with_the_fix():
    B, D, H, Hq = 16, 64, 1, 1
    sim = Sim("tq4", D=D, H=H, Hq=Hq, B=B, max_num_seqs=1)  # 1 + 8 slots
    seqs = _seqs(12, [20] * 12, Hq, H, D)
    sim.step({0: 5}, seqs)
    for r in range(1, 11):  # ten other requests open blocks; request 0's slot is the least recently used
        sim.step({r: 5}, seqs)
    with pytest.raises(Exception, match="raise additional_config tq_vllm.staging_slots"):
        sim.step({0: 1}, seqs)


def test_profiling_and_empty_steps_are_no_ops():
    sim = Sim("tq4")
    x = torch.randn(5, 4, 64, dtype=torch.bfloat16)
    out = torch.zeros_like(x)
    assert sim.impl.forward(None, x, x[:, :2], x[:, :2], torch.empty(0), None, out) is out
    assert (out == 0).all()
    with pytest.raises(NotImplementedError, match="fused output quantization"):
        sim.impl.forward(None, x, x[:, :2], x[:, :2], torch.empty(0), None, out, output_scale=torch.ones(1))


def test_same_codec_as_the_connector_and_kernels_expect():
    """The impl's codec is LayerCodec(preset, D, B, layer_index, seed): the layout fingerprint ties pages to it."""
    sim = Sim("tq3", D=128, H=2, Hq=4, B=32)
    c = sim.impl.codec
    ref = LayerCodec("tq3", 128, 32, layer_index=0, seed=0)
    assert c.layout.fingerprint() == ref.layout.fingerprint() and torch.equal(c.rot, ref.rot)


def test_device_path_builder_on_cpu_tensors():
    """The CUDA builder path (one packed D2H of seq_lens + block ids, persistent plan buffers filled by copies)
    run on CPU tensors: same results as the oracle."""
    rng = random.Random(4)
    sim = Sim("tq4", D=64, H=2, Hq=4, B=16, spec_tokens=0)
    sim.builder.on_cpu = False
    sim.builder._alloc_buffers()
    seqs = _seqs(3, [45, 20, 33], 4, 2, 64, seed=8)
    got = _run_schedule(sim, seqs, {0: [17, 20, 1, 1, 1, 5], 1: [20], 2: [1, 31, 1]}, rng)
    for r in seqs:
        torch.testing.assert_close(got[r], _oracle(sim, seqs, r), atol=3e-2, rtol=3e-2)


def test_graph_shaped_plan_for_uniform_decode():
    """With FULL CUDA graphs, uniform single-token decode plans have fixed shapes: qb arrays padded to R with -1
    (the kernels skip them) and max_seq_len = max_model_len, so one capture serves every replay; padding rows of a
    replayed batch (query 0, seq 0) plan nothing."""
    sim = Sim("tq4", D=64, H=2, Hq=4, B=16)
    b = sim.builder
    b.on_cpu, b.graph_plans = False, True
    b._alloc_buffers()
    seqs = _seqs(3, [40, 40, 40], 4, 2, 64, seed=1)
    sim.step({0: 15, 1: 3, 2: 9}, seqs)  # prefill (plain plan)
    qsl = torch.tensor([0, 1, 2, 3, 3], dtype=torch.int32)  # 3 decodes + 1 padding row
    bt = torch.zeros(4, 4, dtype=torch.int32)
    for i in range(3):
        bt[i, :len(sim.tables[i])] = torch.tensor(sim.tables[i], dtype=torch.int32)
    cam = CommonAttentionMetadata(query_start_loc=qsl, query_start_loc_cpu=qsl,
                                  seq_lens=torch.tensor([16, 4, 10, 0], dtype=torch.int32), num_reqs=4,
                                  num_actual_tokens=4, max_query_len=1, max_seq_len=16, block_table_tensor=bt,
                                  slot_mapping=torch.zeros(4, dtype=torch.int64))
    md = b.build(0, cam)
    p = md.plan
    assert p.qb_row.tolist() == [0, -1, -1, -1] and p.qb_idx.tolist() == [0, -1, -1, -1]
    assert p.max_seq_len == sim.vc.model_config.max_model_len and md.num_decode_rows == 3
    assert p.ctx_slot.tolist()[3] == -1 and p.open_slot.tolist()[3] == -1
