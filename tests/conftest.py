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
