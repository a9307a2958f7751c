"""TQConnector through the real vLLM engine (CPU build): a long prefix computed once, evicted from vLLM's own small
KV cache by other requests, and reloaded from each tier (CPU, disk after a restart, Redis from another instance)
with greedy output identical to recomputing; corrupt disk segments and Redis values and a dead Redis are
recomputed, never a wrong token.

Every engine runs in its own subprocess (this file is also the driver: `python tests/test_connector_engine.py
JSON`), so engines never share a process and each starts from a clean state, like separate vLLM instances.
"""
from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

BLOCK = 32  # vLLM 0.32's CPU attention needs multiples of 32
LAYERS, KV_HEADS, HEAD_DIM = 2, 2, 64  # the tiny Llama
BACKENDS = {
    # tq_vllm's backend: TurboQuant pages (tq4)
    "tq4": {"attention_backend": "CUSTOM", "additional_config": {"tq_vllm": {"preset": "tq4"}}},
    # vLLM's own CPU attention: bf16 pages (the connector treats both as opaque bytes)
    "stock": {},
}


def block_bytes(backend: str) -> int:
    """Bytes of one block over all layers, as the connector must move them."""
    if backend == "stock":
        return LAYERS * KV_HEADS * BLOCK * HEAD_DIM * 2 * 2  # K and V, bf16
    from tq_vllm.quant.layout import PageLayout

    return LAYERS * KV_HEADS * PageLayout(backend, HEAD_DIM, BLOCK).page_bytes
SEED = "1234"  # PYTHONHASHSEED: block hashes stable across processes (needed by vLLM 0.26; harmless in 0.32)
MAX_TOKENS = 8


def prompts() -> dict[str, list[int]]:
    rng = random.Random(7)
    out = {"P1": [rng.randrange(10, 500) for _ in range(330)],  # 10 full blocks + 10 tokens
           "P3": [rng.randrange(10, 500) for _ in range(300)]}  # 9 full blocks + 12 tokens
    for i in range(1, 7):
        out[f"F{i}"] = [rng.randrange(10, 500) for _ in range(480)]  # 15 blocks each: floods the caches
    return out


# =========================================================================================== driver (subprocess)
def _flip_disk(root: str) -> int:
    """Flips one payload byte of every record of every segment under root."""
    from tq_vllm.connector.record import HEADER_SIZE, parse_header

    n = 0
    for p in Path(root).rglob("*.tqs"):
        data = bytearray(p.read_bytes())
        plen = parse_header(data[:HEADER_SIZE])[2]
        rs = HEADER_SIZE + plen
        for off in range(0, len(data) - rs + 1, rs):
            data[off + HEADER_SIZE + plen // 2] ^= 0x5A
            n += 1
        p.write_bytes(bytes(data))
    return n


def _flip_redis(url: str, prefix: str) -> int:
    import redis

    from tq_vllm.connector.record import HEADER_SIZE

    cli = redis.Redis.from_url(url)
    n = 0
    for k in cli.scan_iter(f"{prefix}:*"):
        v = bytearray(cli.get(k))
        v[HEADER_SIZE + (len(v) - HEADER_SIZE) // 2] ^= 0x5A
        cli.set(k, bytes(v))
        n += 1
    return n


def driver(spec: dict) -> dict:
    from vllm import LLM, SamplingParams

    kw = dict(enforce_eager=True, block_size=spec.get("block_size", BLOCK), max_model_len=736,
              num_gpu_blocks_override=24, enable_prefix_caching=True, max_num_seqs=4, dtype="bfloat16",
              seed=0, kv_transfer_config={"kv_connector": "TQConnector", "kv_connector_module_path": "tq_vllm.connector",
                                          "kv_role": "kv_both", "kv_connector_extra_config": spec["extra"]})
    kw.update(spec.get("engine", {}))
    llm = LLM(spec["model"], **kw)
    sp = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    ps = prompts()
    stats_file = spec["extra"].get("stats_file")
    results: dict = {"gen": [], "events": []}

    def stats():
        try:
            return json.loads(Path(stats_file).read_text())
        except (OSError, ValueError, TypeError):
            return {}

    for step in spec["steps"]:
        op = step[0]
        if op == "gen":
            before = stats()
            out = llm.generate([{"prompt_token_ids": ps[step[1]]}], sp, use_tqdm=False)[0]
            after = stats()
            delta = {k: after.get(k, 0) - before.get(k, 0) for k in set(after) | set(before)
                     if isinstance(after.get(k, 0), (int, float))}
            results["gen"].append({"name": step[1], "tokens": list(out.outputs[0].token_ids),
                                   "num_cached_tokens": out.num_cached_tokens,
                                   "delta": {k: v for k, v in delta.items() if v}})
        elif op == "flood":
            for name in step[1]:
                llm.generate([{"prompt_token_ids": ps[name]}], sp, use_tqdm=False)
        elif op == "corrupt_disk":
            results["events"].append(["corrupt_disk", _flip_disk(spec["extra"]["disk_dir"])])
        elif op == "corrupt_redis":
            results["events"].append(["corrupt_redis", _flip_redis(spec["extra"]["redis_url"], step[1])])
    results["stats"] = stats()
    return results


def run_engine(spec: dict, timeout: int = 600) -> dict:
    env = dict(os.environ, PYTHONHASHSEED=SEED, VLLM_CPU_KVCACHE_SPACE="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, __file__, json.dumps(spec)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=str(Path(__file__).resolve().parents[1]))
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT:"):
            res = json.loads(line[len("RESULT:"):])
            if os.environ.get("TQ_TEST_DUMP"):  # keep the engines' results for a look
                with open(os.environ["TQ_TEST_DUMP"], "a") as f:
                    f.write(json.dumps({"steps": spec["steps"], "result": res}) + "\n")
            return res
    raise AssertionError(f"engine driver failed (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-8000:]}")


# =========================================================================================== pytest side
def _redis_url() -> str | None:
    url = os.environ.get("TQ_REDIS_URL") or "redis://127.0.0.1:6390/0"
    try:
        import redis

        redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1).ping()
        return url
    except Exception:
        return None


def _dead_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"redis://127.0.0.1:{port}/0"  # nothing listens there


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from tq_vllm.assets import cache_dir, make_tiny_llama

    return str(make_tiny_llama(cache_dir() / "tiny-llama-connector", layers=LAYERS, head_dim=HEAD_DIM,
                               num_kv_heads=KV_HEADS, num_heads=4, vocab=512, max_position=1024))


@pytest.fixture(scope="module", params=list(BACKENDS))
def world(request, tiny_model, tmp_path_factory):
    """Engine 1: computes P1 and P3 (references), reloads P1 from the CPU tier, then from disk."""
    url = _redis_url()
    if url is None:
        pytest.skip("no Redis at TQ_REDIS_URL (make test starts one: scripts/ensure_redis.sh)")
    backend = request.param
    bb = block_bytes(backend)
    root = tmp_path_factory.mktemp(f"tqconn-{backend}")
    prefix = f"tqtest-{uuid.uuid4().hex[:8]}"
    extra = {"cpu_bytes": 50 * bb, "disk_dir": str(root / "disk"), "redis_url": url, "redis_prefix": prefix,
             "stats_file": str(root / "stats1.json"), "log_interval_s": 0}
    res = run_engine({"model": tiny_model, "extra": extra, "engine": BACKENDS[backend], "steps": [
        ["gen", "P1"], ["gen", "P3"],
        ["flood", ["F1", "F2"]],  # evicts P1/P3 from vLLM's 24-block cache; our CPU tier (50 blocks) keeps them
        ["gen", "P1"],  # -> CPU tier
        ["flood", ["F3", "F4", "F5", "F6"]],  # evicts P1/P3 from the CPU tier to disk
        ["gen", "P1"],  # -> disk tier (promoted back to CPU)
    ]})
    yield {"model": tiny_model, "root": root, "url": url, "prefix": prefix, "r1": res, "backend": backend, "bb": bb}
    try:
        import redis

        cli = redis.Redis.from_url(url)
        keys = list(cli.scan_iter(f"{prefix}:*"))
        if keys:
            cli.delete(*keys)
    except Exception:
        pass


def _gen(res, i):
    return res["gen"][i]


def _only_tq(world):
    if world["backend"] != "tq4":
        pytest.skip("the restart/Redis/corruption scenarios run with tq_vllm's backend; vLLM's own backend is "
                    "covered by the CPU/disk tier test")


@pytest.mark.engine
@pytest.mark.slow
def test_cpu_and_disk_tiers_same_output_and_skip_prefill(world):
    r = world["r1"]
    ref, cpu_hit, disk_hit = _gen(r, 0), _gen(r, 2), _gen(r, 3)
    assert ref["num_cached_tokens"] == 0 and "hit_tokens" not in ref["delta"]
    assert ref["delta"].get("save_blocks", 0) >= 10
    # reloaded from the CPU tier: identical greedy tokens, 10 full blocks (320 tokens) not prefilled
    assert cpu_hit["tokens"] == ref["tokens"]
    assert cpu_hit["num_cached_tokens"] == 320
    assert cpu_hit["delta"]["hit_blocks_cpu"] == 10 and cpu_hit["delta"]["load_blocks_cpu"] == 10
    assert cpu_hit["delta"]["load_bytes_cpu"] == 10 * world["bb"]  # exactly the (compressed) pages, nothing else
    # after the floods pushed it out of the 50-block CPU tier: reloaded from disk
    assert disk_hit["tokens"] == ref["tokens"]
    assert disk_hit["num_cached_tokens"] == 320
    assert disk_hit["delta"]["hit_blocks_disk"] == 10 and disk_hit["delta"]["load_blocks_disk"] == 10
    st = r["stats"]
    assert st["cpu_evictions"] > 0 and st["disk_write_blocks"] >= 19  # P1 and P3 at least went to disk
    assert not any(k.startswith("load_error_") for k in st)


@pytest.mark.engine
@pytest.mark.slow
def test_restart_reloads_from_disk_corruption_and_dead_redis_recompute(world):
    """Engine 2 = a restart on the same disk directory, with Redis down: P1 comes from the recovered segments;
    then every disk record is corrupted and P3's planned disk hit fails its checksum -> recomputed, same tokens."""
    _only_tq(world)
    r1 = world["r1"]
    extra = {"cpu_bytes": 50 * world["bb"], "disk_dir": str(world["root"] / "disk"), "redis_url": _dead_url(),
             "redis_prefix": world["prefix"], "redis_timeout_s": 0.5, "stats_file": str(world["root"] / "stats2.json"),
             "log_interval_s": 0}
    r2 = run_engine({"model": world["model"], "extra": extra, "engine": BACKENDS[world["backend"]], "steps": [
        ["gen", "P1"], ["corrupt_disk"], ["gen", "P3"], ["flood", ["F1", "F2"]], ["gen", "P3"]]})
    p1, p3_bad, p3_again = _gen(r2, 0), _gen(r2, 1), _gen(r2, 2)
    assert p1["tokens"] == _gen(r1, 0)["tokens"]
    assert p1["num_cached_tokens"] == 320 and p1["delta"]["load_blocks_disk"] == 10
    assert r2["stats"]["disk_recovered_blocks"] >= 19
    assert r2["events"][0][1] > 0
    # P3: 9 blocks planned from disk, all fail the checksum; vLLM recomputes them; output unchanged
    assert p3_bad["tokens"] == _gen(r1, 1)["tokens"]
    assert p3_bad["delta"]["hit_blocks_disk"] == 9
    assert p3_bad["delta"].get("load_error_checksum_mismatch", 0) >= 1
    assert p3_bad["delta"].get("load_blocks_disk", 0) == 0
    assert p3_bad["delta"]["forgotten_blocks"] == 9
    # the bad records were dropped from the index, the recomputed blocks saved again: after vLLM's own cache
    # is flooded, P3 comes back from the CPU tier, clean
    assert p3_again["tokens"] == _gen(r1, 1)["tokens"]
    assert p3_again["delta"]["hit_blocks_cpu"] == 9 and p3_again["delta"]["load_blocks_cpu"] == 9
    assert p3_again["delta"].get("load_error_checksum_mismatch", 0) == 0
    assert r2["stats"].get("redis_errors", 0) >= 1  # the dead Redis was noticed, and nothing broke


@pytest.mark.engine
@pytest.mark.slow
def test_second_instance_reads_redis_and_survives_corrupt_values(world):
    """Engine 3 = another instance sharing Redis (no disk): P1 comes from Redis (written through by engine 1);
    then every Redis value of the namespace is corrupted and P3's planned Redis hit is recomputed."""
    _only_tq(world)
    r1 = world["r1"]
    extra = {"cpu_bytes": 50 * world["bb"], "redis_url": world["url"], "redis_prefix": world["prefix"],
             "stats_file": str(world["root"] / "stats3.json"), "log_interval_s": 0}
    r3 = run_engine({"model": world["model"], "extra": extra, "engine": BACKENDS[world["backend"]], "steps": [
        ["gen", "P1"], ["corrupt_redis", world["prefix"]], ["gen", "P3"]]})
    p1, p3 = _gen(r3, 0), _gen(r3, 1)
    assert p1["tokens"] == _gen(r1, 0)["tokens"]
    assert p1["num_cached_tokens"] == 320
    assert p1["delta"]["hit_blocks_redis"] == 10 and p1["delta"]["load_blocks_redis"] == 10
    assert r3["events"][0][1] >= 19
    assert p3["tokens"] == _gen(r1, 1)["tokens"]
    assert p3["delta"]["hit_blocks_redis"] == 9 and p3["delta"].get("load_error_checksum_mismatch", 0) >= 1


if __name__ == "__main__":
    res = driver(json.loads(sys.argv[1]))
    print("RESULT:" + json.dumps(res), flush=True)
