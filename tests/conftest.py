"""Shared pytest set-up: offline defaults and the `gpu` / `engine` markers' skips."""
from __future__ import annotations

import importlib.util
import os

import pytest

# Same defaults as the Makefile, for a bare `pytest` run: nothing may reach a model hub, and a CPU vLLM engine
# must not reserve most of RAM for its KV cache.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def _import_triton_for_the_interpreter() -> None:
    """Without a GPU the kernel tests run Triton's interpreter. Triton builds its own @jit library (tl.max, ...)
    once, at import, in the mode TRITON_INTERPRET says then; other tests import vLLM/torch (and so triton) first,
    which would leave that library compiled-mode and break interpreted kernels. Import it in interpreter mode
    before anything else does, then restore the variable (engine subprocesses must not see it)."""
    if os.environ.get("TRITON_INTERPRET") is not None:
        return
    try:
        import torch

        if torch.cuda.is_available():
            return
        os.environ["TRITON_INTERPRET"] = "1"
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except ImportError:
        pass
    finally:
        os.environ.pop("TRITON_INTERPRET", None)


_import_triton_for_the_interpreter()


@pytest.fixture(autouse=True)
def _poisoned_partials(monkeypatch):
    """Every test: the decode launch's split partials start as NaN, so a reduction that reads one nobody wrote shows
    (`tq_vllm.kernels.POISON_PARTIALS`)."""
    from tq_vllm import kernels

    monkeypatch.setattr(kernels, "POISON_PARTIALS", True)


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    need_gpu = [item for item in items if "gpu" in item.keywords]
    if need_gpu and not _has_cuda():
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in need_gpu:
            item.add_marker(skip)
    if importlib.util.find_spec("vllm") is None:
        skip = pytest.mark.skip(reason="vLLM is not installed")
        for item in items:
            if "engine" in item.keywords:
                item.add_marker(skip)


class _Shard:
    """TQ_TEST_SHARD=i/n keeps every n-th selected test from the i-th, so that n pytest processes share one GPU (the
    GPU sweeps spend their time compiling kernels, one CPU core per process)."""

    def __init__(self, i: int, n: int):
        self.i, self.n = i, n

    @pytest.hookimpl(trylast=True)  # after -m / -k deselection: even shards
    def pytest_collection_modifyitems(self, config, items):
        config.hook.pytest_deselected(items=[it for j, it in enumerate(items) if j % self.n != self.i])
        items[:] = [it for j, it in enumerate(items) if j % self.n == self.i]


def pytest_configure(config):
    shard = os.environ.get("TQ_TEST_SHARD")
    if shard:
        try:
            i, n = (int(x) for x in shard.split("/"))
            assert 0 <= i < n
        except (ValueError, AssertionError):
            raise pytest.UsageError(f"TQ_TEST_SHARD={shard!r}: expected i/n with 0 <= i < n, e.g. 0/4") from None
        config.pluginmanager.register(_Shard(i, n), "tq_shard")
