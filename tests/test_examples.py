"""examples/*.py run as the README says (CPU here, SmolLM2-135M-Instruct), and the CPU recipe serves with
`vllm serve --config`. Each runs in its own process, like a user's; generations are short.

The KV capacity the real engine reports is compared with `tq-vllm check`'s number for the CPU recipe (same model,
preset, block size and VLLM_CPU_KVCACHE_SPACE=1): the estimate and the engine agree exactly on CPU.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.engine

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", PYTHONUNBUFFERED="1")


@pytest.fixture(scope="module")
def smollm2():
    from tq_vllm.assets import AssetError, fetch_smollm2
    try:
        return str(fetch_smollm2())
    except (AssetError, OSError, ImportError) as e:  # pragma: no cover - offline without the cached asset
        pytest.skip(f"SmolLM2 asset unavailable: {e}")


def _example(name: str, *args: str, timeout: int = 900) -> str:
    p = subprocess.run([sys.executable, str(ROOT / "examples" / name), *args], capture_output=True, text=True,
                       timeout=timeout, env=ENV, cwd=ROOT)
    assert p.returncode == 0, f"{name} failed (rc={p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
    return p.stdout


def test_offline_minimal(smollm2):
    out = _example("offline_minimal.py", "--max-tokens", "16")
    assert "'The capital of France is' -> " in out and "Paris" in out, out
    m = re.search(r"KV cache: ([\d,]+) tokens \(([\d,]+) blocks of 32\) in tq4 pages", out)
    assert m, out
    from tq_vllm.check import read_expectations
    exp = read_expectations(ROOT / "recipes" / "cpu-smollm2-tq4.yaml")
    assert int(m.group(1).replace(",", "")) == exp["kv_tokens"]  # the recipe's (check's) number is the engine's


def test_offline_connector_then_store_verify(smollm2, tmp_path):
    disk = tmp_path / "tqkv"
    out = _example("offline_connector.py", "--disk-dir", str(disk))
    first = re.search(r"document 0, first time\s*: (\d+) prompt tokens, (\d+) not recomputed", out)
    again = re.search(r"document 0 after 3 others\s*: (\d+) prompt tokens, (\d+) not recomputed \(connector hits "
                      r"in blocks: cpu (\d+), disk (\d+), redis (\d+)\)", out)
    assert first and again, out
    assert int(first.group(2)) == 0
    assert int(again.group(3)) > 0 and int(again.group(2)) == int(again.group(3)) * 32  # from the CPU tier
    assert "same answer as the first time: yes" in out, out  # loaded pages = recomputed ones (float32 on CPU)
    # what the connector wrote to disk (write-through) verifies clean with `tq-vllm store verify`
    p = subprocess.run([sys.executable, "-m", "tq_vllm.cli", "store", "verify", str(disk), "--json"],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stdout + p.stderr
    rep = json.loads(p.stdout)
    assert rep["damaged"] == 0 and sum(n["records"] for n in rep["disk"]["namespaces"]) >= int(again.group(3))


@pytest.mark.slow
def test_offline_connector_second_run_loads_from_disk(smollm2, tmp_path):
    """The docstring's promise: run it twice with --disk-dir and the second run's first request comes from disk."""
    disk = tmp_path / "tqkv"
    _example("offline_connector.py", "--disk-dir", str(disk), "--max-tokens", "4")
    out = _example("offline_connector.py", "--disk-dir", str(disk), "--max-tokens", "4")
    first = re.search(r"document 0, first time\s*: \d+ prompt tokens, (\d+) not recomputed \(connector hits in "
                      r"blocks: cpu (\d+), disk (\d+)", out)
    assert first and int(first.group(3)) > 0 and int(first.group(1)) > 0, out


def test_offline_long_context(smollm2):
    out = _example("offline_long_context.py", "--context", "1500", "--chunk", "512")
    m = re.search(r"prompt ([\d,]+) tokens .* prefilled in chunks of 512", out)
    assert m and int(m.group(1).replace(",", "")) > 1000, out
    assert re.search(r"answer: .* -> needle (FOUND|not found)", out)
    assert "KV cache:" in out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_serve_cpu_recipe(smollm2, tmp_path):
    """`vllm serve DIR --config recipes/cpu-smollm2-tq4.yaml` answers a completion through tq_vllm's backend."""
    vllm_cli = Path(sys.executable).with_name("vllm")
    cmd = [str(vllm_cli), "serve", smollm2] if vllm_cli.exists() else \
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", smollm2]
    port = _free_port()
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen(cmd + ["--config", str(ROOT / "recipes/cpu-smollm2-tq4.yaml"), "--port", str(port),
                                   "--host", "127.0.0.1"], stdout=log, stderr=subprocess.STDOUT, env=ENV, cwd=ROOT)
    try:
        deadline = time.time() + 420
        while time.time() < deadline:
            if proc.poll() is not None:
                break
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                time.sleep(2)
        assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-6000:]
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=json.dumps({
            "model": smollm2, "prompt": "The capital of France is", "max_tokens": 12, "temperature": 0}).encode(),
            headers={"Content-Type": "application/json"})
        body = json.loads(urllib.request.urlopen(req, timeout=120).read())
        assert "Paris" in body["choices"][0]["text"], body
        logtext = (tmp_path / "serve.log").read_text()
        assert "tq_vllm" in logtext and "preset tq4" in logtext  # the backend's capacity line: it really ran
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        shutil.rmtree(tmp_path / "unused", ignore_errors=True)
