"""The `tq-vllm` command: presets, check (errors with their fixes, exit code 2), store ls/stats/verify on a real
disk-tier layout (and Redis when one runs), bench pass-through, and the eval hook."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tq_vllm import check
from tq_vllm.cli import main

ROOT = Path(__file__).resolve().parents[1]
LLAMA = json.loads((ROOT / "recipes/models/Llama-3.1-8B-Instruct.json").read_text())

BASE = """\
model: {model}
attention-backend: CUSTOM
block-size: 32
max-model-len: 8192
max-num-seqs: 16
gpu-memory-utilization: 0.9
additional-config:
  tq_vllm: {{preset: tq4}}
"""


def _has_vllm() -> bool:
    import importlib.util
    return importlib.util.find_spec("vllm") is not None


def _case(tmp_path, yaml_text: str | None = None, cfg: dict | None = None, name="r.yaml") -> tuple[str, str]:
    mdir = tmp_path / "model"
    mdir.mkdir(exist_ok=True)
    (mdir / "config.json").write_text(json.dumps(cfg or LLAMA))
    r = tmp_path / name
    r.write_text(yaml_text if yaml_text is not None else BASE.format(model=mdir))
    return str(r), str(mdir)


def _run(recipe, *extra, use_vllm=False, gpu=79.1, **kw):
    return check.check_recipe(recipe, gpu_memory_gib=gpu, use_vllm=use_vllm, **kw)


def _codes(rep, level="error"):
    return {f.code for f in rep.findings if f.level == level}


# ------------------------------------------------------------------------------------------------ basics
def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for cmd in ("presets", "check", "store", "eval", "bench"):
        assert cmd in out


def test_presets_unchanged(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("tq_vllm presets (block_size 32") and "tq4" in out and "tq3" in out
    assert main(["presets", "--layout", "tq4", "--head-dim", "128"]) == 0
    assert "134 bytes per token per KV head" in capsys.readouterr().out
    assert main(["presets", "--layout", "tq9"]) == 2
    assert "unknown tq_vllm preset 'tq9'" in capsys.readouterr().err


def test_presets_stays_fast():
    """`tq-vllm presets` must not import vLLM or the heavy command modules."""
    code = ("import sys; from tq_vllm.cli import main; main(['presets']); "
            "print('VLLM' if 'vllm' in sys.modules else 'NOVLLM')")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.strip().endswith("NOVLLM"), p.stderr[-2000:]


def test_eval_hook_still_registered(capsys):
    with pytest.raises(SystemExit) as e:
        main(["eval", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "ppl" in out and "niah" in out


# ------------------------------------------------------------------------------------------------ check
def test_check_good_recipe_reports_capacity(tmp_path):
    r, _ = _case(tmp_path)
    rep = _run(r)
    assert not rep.errors and not rep.warnings, [str(f) for f in rep.findings]
    cap = rep.capacity
    assert cap.kv_bytes_per_token == 32 * 8 * 134 and cap.bf16_kv_bytes_per_token == 32 * 8 * 512
    assert 3.7 < cap.capacity_gain < 3.85
    text = rep.render()
    assert "KV tokens:" in text and "OK: 0 errors" in text


def test_check_cli_exit_codes(tmp_path, capsys):
    r, _ = _case(tmp_path)
    assert main(["check", r, "--gpu-memory-gib", "79.1", "--no-vllm-parse"]) == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text(BASE.format(model=tmp_path / "model").replace("tq4", "tq5"))
    assert main(["check", str(bad), "--gpu-memory-gib", "79.1", "--no-vllm-parse"]) == 2
    out = capsys.readouterr().out
    assert "preset='tq5' is invalid" in out and "Known presets: tq4" in out and "FAILED: 1 error" in out
    assert main(["check", str(tmp_path / "missing.yaml")]) == 2
    assert "not found" in capsys.readouterr().err
    js = tmp_path / "x.json"
    js.write_text("{}")
    assert main(["check", str(js)]) == 2
    assert ".yaml or .yml" in capsys.readouterr().err


@pytest.mark.parametrize("mutate, code, text", [
    (lambda y: y.replace("preset: tq4", "presett: tq4"), "tq_config", "unknown option(s) ['presett']"),
    (lambda y: y.replace("{preset: tq4}", "{preset: tq4, staging_slots: 4}"), "tq_config",
     "staging_slots=4 is below max_num_seqs=16"),
    (lambda y: y.replace("{preset: tq4}", "{preset: tq4, boundary_layers: 20}"), "tq_config",
     "covers more than the model's 32 layers"),
    (lambda y: y.replace("{preset: tq4}", "{preset: tq4, boundary_preset: tq8}"), "tq_config",
     "boundary_layers is 0"),
    (lambda y: y.replace("attention-backend: CUSTOM\n", ""), "no_custom_backend", "attention-backend: CUSTOM"),
    (lambda y: y + "kv-cache-dtype: fp8\n", "kv_cache_dtype", "conflicts with the tq_vllm backend"),
    (lambda y: y + "kv-cache-dtype-skip-layers: ['0']\n", "skip_layers", "boundary_layers"),
    (lambda y: y.replace("block-size: 32", "block-size: 24"), "page_layout", "multiple of 16"),
    (lambda y: y.replace("max-model-len: 8192", "max-model-len: 200000"), "max_model_len_too_long",
     "max_position_embeddings 131072"),
    (lambda y: y.replace("max-model-len: 8192", "max-model-len: 131072").replace("0.9", "0.25"),
     "max_model_len_capacity", "vLLM refuses to start"),
    (lambda y: y + "tensor-parallel-size: 3\n", "tp_heads", "does not divide the 32 query heads"),
    (lambda y: y + "speculative-config: {method: ngram, num_speculative_tokens: 40}\n", "spec_block",
     "num_speculative_tokens=40"),
])
def test_check_recipe_errors_say_what_and_how(tmp_path, mutate, code, text):
    r, mdir = _case(tmp_path)
    Path(r).write_text(mutate(Path(r).read_text()))
    rep = _run(r)
    assert code in _codes(rep), [str(f) for f in rep.findings]
    msg = " ".join(f.message for f in rep.findings if f.code == code)
    assert text in msg


@pytest.mark.parametrize("change, code, text", [
    ({"kv_lora_rank": 512, "q_lora_rank": 1536, "model_type": "deepseek_v3"}, "mla", "does not support MLA"),
    ({"sliding_window": 4096, "model_type": "mistral"}, "sliding_window", "sliding-window attention (window 4096)"),
    ({"layer_types": ["sliding_attention", "full_attention"] * 16, "sliding_window": 512}, "sliding_window",
     "layers [0, 2, 4"),
    ({"model_type": "gpt_oss"}, "sinks", "attention sinks"),
    ({"is_encoder_decoder": True, "model_type": "t5"}, "encoder_decoder", "encoder-decoder cross attention"),
    ({"model_type": "bert", "architectures": ["BertForMaskedLM"]}, "encoder_only", "is an encoder"),
    ({"model_type": "jamba", "layers_block_type": ["mamba", "attention"] * 16}, "hybrid", "Mamba/SSM or hybrid"),
    ({"layer_types": ["linear_attention", "full_attention"] * 16, "model_type": "qwen3_next"}, "hybrid",
     "linear_attention"),
    ({"head_dim": 80}, "head_size", "head size 80 is not supported"),
    ({"num_key_value_heads": 5}, "gqa", "not a multiple of 5 KV heads"),
    ({"attn_logit_softcapping": 50.0}, "softcap", "soft-capping"),
])
def test_check_refuses_unsupported_models(tmp_path, change, code, text):
    cfg = copy.deepcopy(LLAMA)
    cfg.update(change)
    r, _ = _case(tmp_path, cfg=cfg)
    rep = _run(r)
    assert code in _codes(rep), [str(f) for f in rep.findings]
    msg = " ".join(f.message for f in rep.findings if f.code == code)
    assert text in msg
    assert rep.capacity is None  # no estimate for a model that won't run


def test_check_sliding_window_ok_when_disabled(tmp_path):
    cfg = dict(LLAMA, sliding_window=4096, model_type="mistral")
    r, mdir = _case(tmp_path, cfg=cfg)
    Path(r).write_text(Path(r).read_text().replace("max-model-len: 8192", "max-model-len: 4096")
                       + "disable-sliding-window: true\n")
    rep = _run(r)
    assert not rep.errors, [str(f) for f in rep.findings]
    Path(r).write_text(Path(r).read_text().replace("max-model-len: 4096", "max-model-len: 8192"))
    assert "sliding_window_len" in _codes(_run(r))


def test_check_qwen_style_unused_sliding_window_is_fine(tmp_path):
    cfg = json.loads((ROOT / "recipes/models/Qwen3-8B.json").read_text())
    cfg["sliding_window"] = 32768  # Qwen2-style configs name a window but use_sliding_window is false
    r, _ = _case(tmp_path, cfg=cfg)
    assert not _run(r).errors


def test_check_multimodal_text_config(tmp_path):
    cfg = {"architectures": ["Qwen3VLForConditionalGeneration"], "model_type": "qwen3_vl",
           "text_config": json.loads((ROOT / "recipes/models/Qwen3-8B.json").read_text())}
    r, _ = _case(tmp_path, cfg=cfg)
    rep = _run(r)
    assert not rep.errors and rep.shape.num_layers == 36


def test_check_warnings_for_unset_sizes(tmp_path):
    r, mdir = _case(tmp_path, yaml_text=f"model: {tmp_path / 'model'}\nattention-backend: CUSTOM\n")
    rep = _run(r)
    assert {"block_size", "max_num_seqs", "max_model_len"} <= _codes(rep, "warning")
    assert "staging" in _codes(rep, "warning")  # 1024 default sequences on an 80 GiB GPU: > 1 GiB of staging


def test_check_portability_traps(tmp_path):
    r, _ = _case(tmp_path)
    Path(r).write_text(Path(r).read_text() + "enable-prefix-caching: false\nkv-transfer-config:\n"
                       "  kv_connector: TQConnector\n  kv_connector_module_path: tq_vllm.connector\n"
                       "  kv_role: kv_both\n  kv_rank: 0\n")
    rep = _run(r)
    assert "false_dropped" in _codes(rep, "warning")
    assert "kv_transfer_removed_key" in _codes(rep)


def test_check_connector_defaults_of_vllm_026_are_not_recipe_keys(tmp_path, monkeypatch):
    """vLLM 0.26's parser returns kv-transfer-config as a KVTransferConfig whose defaults include the keys 0.32
    removed (kv_buffer_size, kv_rank, ...): a recipe that does not set them checks clean (seen on the H200 with the
    tiers recipe); one that sets them is still an error."""
    import dataclasses

    @dataclasses.dataclass
    class KVTransferConfig026:  # the 0.26 fields that matter here, with its defaults
        kv_connector: str | None = None
        kv_connector_module_path: str | None = None
        kv_role: str | None = None
        kv_buffer_size: float = 1e9
        kv_rank: int | None = None
        kv_parallel_size: int = 1
        kv_ip: str = "127.0.0.1"
        kv_connector_extra_config: dict = dataclasses.field(default_factory=dict)

    def parse_026(recipe, model=None):
        s = check._settings_from_yaml(check.load_recipe(recipe), model)
        s["kv_transfer_config"] = KVTransferConfig026(**s["kv_transfer_config"])
        return s, [], "a stand-in for vLLM 0.26's parser"

    monkeypatch.setattr(check, "parse_with_vllm", parse_026)
    r, _ = _case(tmp_path)
    conn = ("kv-transfer-config:\n  kv_connector: TQConnector\n  kv_connector_module_path: tq_vllm.connector\n"
            "  kv_role: kv_both\n  kv_connector_extra_config: {cpu_bytes: 1G}\n")
    Path(r).write_text(Path(r).read_text() + conn)
    rep = _run(r, use_vllm=True)
    assert "kv_transfer_removed_key" not in _codes(rep) and not rep.errors, [f.message for f in rep.errors]
    assert "connector" in {name for name, _ in rep.sections}
    Path(r).write_text(Path(r).read_text() + "  kv_buffer_size: 1000\n")
    assert "kv_transfer_removed_key" in _codes(_run(r, use_vllm=True))


@pytest.mark.parametrize("extra, code, text", [
    ({"cpu_byte": "1G"}, "connector_config", "unknown kv_connector_extra_config keys ['cpu_byte']"),
    ({"cpu_bytes": "lots"}, "connector_config", "not a byte count"),
    ({"disk_write": "sometimes"}, "connector_config", "disk_write must be"),
    ({"redis_url": "http://x:1"}, "redis_url", "must start with redis://"),
])
def test_check_connector_errors(tmp_path, extra, code, text):
    r, _ = _case(tmp_path)
    kvt = {"kv_connector": "TQConnector", "kv_connector_module_path": "tq_vllm.connector", "kv_role": "kv_both",
           "kv_connector_extra_config": extra}
    Path(r).write_text(Path(r).read_text() + "kv-transfer-config: " + json.dumps(kvt) + "\n")
    rep = _run(r)
    assert code in _codes(rep), [str(f) for f in rep.findings]
    assert text in " ".join(f.message for f in rep.findings if f.code == code)


def test_check_connector_budgets_in_blocks(tmp_path):
    r, _ = _case(tmp_path)
    kvt = {"kv_connector": "TQConnector", "kv_connector_module_path": "tq_vllm.connector", "kv_role": "kv_both",
           "kv_connector_extra_config": {"cpu_bytes": "1G", "disk_dir": str(tmp_path / "d"), "disk_bytes": "2G",
                                         "redis_url": "env:TQ_NO_SUCH_VAR"}}
    Path(r).write_text(Path(r).read_text() + "kv-transfer-config: " + json.dumps(kvt) + "\n")
    rep = _run(r)
    assert not rep.errors, [str(f) for f in rep.errors]
    lines = dict(rep.sections)["connector"]
    block = 32 * 32 * 8 * 134  # block_size x layers x KV heads x bytes per token per KV head
    assert f"{2**30 // block:,} blocks" in lines[0]
    assert f"{2 * 2**30 // (block + 64):,} blocks" in lines[1]
    assert "redis_env" in _codes(rep, "warning")
    kvt["kv_connector_module_path"] = "somewhere.else"
    del kvt["kv_role"]
    Path(r).write_text(BASE.format(model=tmp_path / "model") + "kv-transfer-config: " + json.dumps(kvt) + "\n")
    assert {"connector_module", "kv_role"} <= _codes(_run(r))


def test_check_expectation_drift_and_update(tmp_path, capsys):
    r, _ = _case(tmp_path)
    Path(r).write_text(Path(r).read_text() + f"\n{check.EXPECT_BEGIN}\n# expect.gpu_memory_gib: 79.1\n"
                       f"# expect.kv_tokens: 123\n{check.EXPECT_END}\n")
    rep = _run(r, gpu=None)
    assert "expect_drift" in _codes(rep)
    assert "kv_tokens 123 -> " in " ".join(f.message for f in rep.errors)
    assert main(["check", r, "--no-vllm-parse", "--update-expect"]) == 0
    text = Path(r).read_text()
    assert text.count(check.EXPECT_BEGIN) == 1 and "expect.kv_tokens: 123" not in text
    assert "expect.capacity_gain:" in text and "# Expected capacity on 79.1 GiB GPU" in text
    assert not _run(r, gpu=None).errors


def test_check_cpu_kv_budget(tmp_path):
    r, _ = _case(tmp_path)
    rep = check.check_recipe(r, kv_cache_gib=1, use_vllm=False)
    assert rep.capacity.device == "cpu"
    assert rep.capacity.kv_tokens == 2**30 // (32 * 32 * 8 * 134) * 32


def test_check_model_config_resolution(tmp_path):
    r = tmp_path / "r.yaml"
    r.write_text(BASE.format(model="meta-llama/Llama-3.1-8B-Instruct"))
    rep = _run(str(r))  # not local, not in the HF cache, no recipes/models next to it
    assert "no_model_config" in _codes(rep, "warning") and rep.capacity is None
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "Llama-3.1-8B-Instruct.json").write_text(json.dumps(LLAMA))
    assert _run(str(r)).capacity is not None
    other = tmp_path / "c.json"
    other.write_text(json.dumps(dict(LLAMA, num_hidden_layers=16)))
    assert _run(str(r), model_config=str(other)).shape.num_layers == 16


@pytest.mark.skipif(not _has_vllm(), reason="vLLM is not installed")
def test_check_unknown_key_through_vllms_parser(tmp_path, capsys):
    r, _ = _case(tmp_path)
    Path(r).write_text(Path(r).read_text().replace("max-model-len", "max-modle-len"))
    assert main(["check", r, "--gpu-memory-gib", "79.1"]) == 2
    out = capsys.readouterr().out
    assert "recipe key `max-modle-len` is not an option of vLLM" in out and "did you mean `max-model-len`" in out
    Path(r).write_text(BASE.format(model=tmp_path / "model") + "kv-transfer-config: {kv_connector: TQConnector, "
                       "kv_connector_module_path: tq_vllm.connector, kv_role: kv_both, kv_buffer_size: 1}\n")
    rep = check.check_recipe(r, gpu_memory_gib=79.1)
    msgs = " ".join(f.message for f in rep.errors)
    assert "kv_buffer_size" in msgs


@pytest.mark.skipif(not _has_vllm(), reason="vLLM is not installed")
def test_check_json_output(tmp_path, capsys):
    r, _ = _case(tmp_path)
    assert main(["check", r, "--gpu-memory-gib", "79.1", "--json"]) == 0
    d = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert d["ok"] and d["capacity"]["kv_bytes_per_token"] == 34304 and d["model"]["num_layers"] == 32


# ------------------------------------------------------------------------------------------------ store
def _make_tier(root: Path, ranks=("t0of2p0of1", "t1of2p0of1"), segs=3, recs=4, payload=4096, parts=2):
    """A disk tier as the connector writes it, made with the connector's own record/disk functions."""
    import numpy as np

    from tq_vllm.connector.disk import SegmentStore
    from tq_vllm.connector.record import digest16, make_record

    ns = digest16("namespace").hex()
    rng = np.random.default_rng(0)
    for rank in ranks:
        st = SegmentStore(root, f"{ns}/dp0", rank)
        fp = digest16("fp" + rank)
        for s in range(segs):
            recs_ = [make_record(fp, digest16(f"k{s}-{i}"), parts, payload // parts,
                                 rng.integers(0, 255, payload, dtype=np.uint8)) for i in range(recs)]
            st.write_segment(s, recs_)
    return root / ns / "dp0", ns


def test_store_ls_stats_verify(tmp_path, capsys):
    d, ns = _make_tier(tmp_path / "disk")
    assert main(["store", "ls", str(tmp_path / "disk")]) == 0
    out = capsys.readouterr().out
    assert (f"{ns}/dp0: ranks t0of2p0of1,t1of2p0of1; 3 segments, 24 records = 12 blocks x 2 ranks of 4,160 B "
            f"(2 layer parts)") in out
    assert main(["store", "stats", str(tmp_path / "disk")]) == 0
    assert "24 records" in capsys.readouterr().out
    assert main(["store", "verify", str(tmp_path / "disk")]) == 0
    assert "verify: OK" in capsys.readouterr().out
    # damage: one payload byte flipped, one record zeroed (a hole: not damage), one rank file missing
    seg1 = d / "seg-0000000001.t0of2p0of1.tqs"
    data = bytearray(seg1.read_bytes())
    data[4160 + 64 + 100] ^= 0xFF
    data[2 * 4160:3 * 4160] = bytes(4160)
    seg1.write_bytes(bytes(data))
    (d / "seg-0000000002.t1of2p0of1.tqs").unlink()
    assert main(["store", "verify", str(tmp_path / "disk")]) == 1
    out = capsys.readouterr().out
    assert "DAMAGED" in out and "record 1: checksum_mismatch" in out and "1 holes" in out
    assert "lack a rank's file" in out
    assert main(["store", "verify", str(tmp_path / "disk"), "--json"]) == 1
    j = json.loads(capsys.readouterr().out)
    assert j["damaged"] == 1 and j["disk"]["namespaces"][0]["incomplete_segments"] == [2]


def test_store_truncated_segment(tmp_path, capsys):
    d, _ = _make_tier(tmp_path / "disk", ranks=("t0of1p0of1",), segs=1)
    seg = d / "seg-0000000000.t0of1p0of1.tqs"
    seg.write_bytes(seg.read_bytes()[:-100])
    assert main(["store", "verify", str(tmp_path / "disk")]) == 1
    assert "truncated" in capsys.readouterr().out


def test_store_reads_recipe_and_usage_errors(tmp_path, capsys):
    _make_tier(tmp_path / "disk", ranks=("t0of1p0of1",), segs=1)
    stats = tmp_path / "stats.json"
    stats.write_text(json.dumps({"hit_blocks_cpu": 5, "miss_blocks": 2, "save_blocks": 7, "scheduler_step": 9}))
    r = tmp_path / "r.yaml"
    r.write_text(BASE.format(model="x") + "kv-transfer-config:\n  kv_connector: TQConnector\n"
                 "  kv_connector_module_path: tq_vllm.connector\n  kv_role: kv_both\n  kv_connector_extra_config:\n"
                 f"    disk_dir: {tmp_path / 'disk'}\n    stats_file: {stats}\n")
    assert main(["store", "stats", str(r)]) == 0
    out = capsys.readouterr().out
    assert "4 records" in out and "hit_blocks: cpu:5/disk:0/redis:0" in out and "miss_blocks: 2" in out
    assert main(["store", "ls", str(tmp_path / "nope")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert main(["store", "ls"]) == 2
    assert "nothing to inspect" in capsys.readouterr().err
    assert main(["store", "ls", "--redis", "redis://127.0.0.1:1/0"]) == 2
    assert "cannot reach Redis" in capsys.readouterr().err


def _redis_url():
    url = os.environ.get("TQ_REDIS_URL") or "redis://127.0.0.1:6390/0"
    try:
        import redis
        redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1).ping()
        return url
    except Exception:
        return None


def test_store_redis_verify(capsys):
    url = _redis_url()
    if url is None:
        pytest.skip("no Redis at TQ_REDIS_URL (make test starts one)")
    import uuid

    import redis

    from tq_vllm.connector.record import digest16, make_record
    from tq_vllm.connector.remote import RemoteStore

    prefix = f"tqclitest-{uuid.uuid4().hex[:8]}"
    rs = RemoteStore(url, prefix, "ns0")
    fp = digest16("fp")
    items = [(digest16(f"k{i}"), make_record(fp, digest16(f"k{i}"), 1, 256, bytes(range(256)))) for i in range(5)]
    assert rs.put_many_sync("t0of1p0of1", items)
    cli = redis.Redis.from_url(url)
    try:
        assert main(["store", "ls", "--redis", url, "--prefix", prefix]) == 0
        assert "ns0 rank t0of1p0of1: 5 records" in capsys.readouterr().out
        assert main(["store", "verify", "--redis", url, "--prefix", prefix]) == 0
        k = rs.key("t0of1p0of1", items[2][0])
        v = bytearray(cli.get(k))
        v[-1] ^= 1
        cli.set(k, bytes(v))
        assert main(["store", "verify", "--redis", url, "--prefix", prefix]) == 1
        assert "checksum_mismatch" in capsys.readouterr().out
    finally:
        keys = list(cli.scan_iter(f"{prefix}:*"))
        if keys:
            cli.delete(*keys)
        rs.close()


# ------------------------------------------------------------------------------------------------ bench
def test_bench_lists_and_passes_arguments_through(tmp_path, capsys, monkeypatch):
    assert main(["bench"]) == 2
    out = capsys.readouterr().out
    assert "quality" in out and "decode" in out
    fake = tmp_path / "benchmarks"
    fake.mkdir()
    (fake / "bench_decode.py").write_text('"""Decode kernels."""\nimport sys, json\n'
                                          'print(json.dumps(sys.argv[1:]))\nsys.exit(3)\n')
    monkeypatch.setenv("TQ_VLLM_BENCHMARKS", str(fake))
    assert main(["bench", "--list"]) == 0
    out = capsys.readouterr().out
    assert "decode     Decode kernels." in out and "(not written yet)" in out
    p = subprocess.run([sys.executable, "-m", "tq_vllm.cli", "bench", "decode", "--help", "-x", "1"],
                       capture_output=True, text=True, env={**os.environ, "TQ_VLLM_BENCHMARKS": str(fake)})
    assert p.returncode == 3 and json.loads(p.stdout) == ["--help", "-x", "1"]
    assert main(["bench", "nosuch"]) == 2
    assert "unknown benchmark 'nosuch'" in capsys.readouterr().err


def test_bench_quality_help_through_the_cli():
    if not (ROOT / "benchmarks" / "bench_quality.py").exists():
        pytest.skip("benchmarks/bench_quality.py not in this tree")
    p = subprocess.run([sys.executable, "-m", "tq_vllm.cli", "bench", "quality", "--help"], capture_output=True,
                       text=True, timeout=120, cwd=ROOT)
    assert p.returncode == 0 and "usage:" in p.stdout


def test_check_connector_only_recipe_counts_bf16_pages(tmp_path):
    """TQConnector without tq_vllm's backend: a warning (no compression), vLLM's bf16 pages in the tier budgets."""
    r, _ = _case(tmp_path)
    kvt = {"kv_connector": "TQConnector", "kv_connector_module_path": "tq_vllm.connector", "kv_role": "kv_both",
           "kv_connector_extra_config": {"cpu_bytes": "1G"}}
    Path(r).write_text(BASE.format(model=tmp_path / "model").replace("attention-backend: CUSTOM\n", "")
                       .replace("additional-config:\n  tq_vllm: {preset: tq4}\n", "")
                       + "kv-transfer-config: " + json.dumps(kvt) + "\n")
    rep = _run(r)
    assert not rep.errors and "no_custom_backend" in _codes(rep, "warning")
    assert rep.capacity is None
    assert f"{2**30 // (32 * 32 * 8 * 512):,} blocks" in dict(rep.sections)["connector"][0]


def test_check_decoder_classifier_is_not_an_encoder(tmp_path):
    cfg = dict(json.loads((ROOT / "recipes/models/Qwen3-8B.json").read_text()),
               architectures=["Qwen3ForSequenceClassification"])
    r, _ = _case(tmp_path, cfg=cfg)
    assert not _run(r).errors
