"""vLLM general plugin (entry point `vllm.general_plugins: tq_vllm = tq_vllm._vllm_plugin:register`).

vLLM calls `register()` in every process it starts (API server while building the CLI parser, `LLM(...)`,
engine core, workers). It must stay light: it only records class *paths*; nothing heavy is imported and CUDA is
never touched here.

* `AttentionBackendEnum.CUSTOM` -> tq_vllm's backend: `vllm serve M --attention-backend CUSTOM` and
  `LLM(M, attention_backend="CUSTOM")` select it (CUSTOM is a static enum member, so the choice survives the
  pickling of VllmConfig into spawned processes, unlike names registered at run time).
* CPU platform only (it ignores --attention-backend): CPU_ATTN / CPU_MLA / AMX_MLA point at
  `tq_vllm.attention.cpu_select`, which hands out tq_vllm's backend only when the engine being built selected
  CUSTOM and vLLM's own classes otherwise (see that module).
"""
from __future__ import annotations

TQ_BACKEND = "tq_vllm.attention.backend.TQAttentionBackend"
CPU_SELECT = "tq_vllm.attention.cpu_select"


def _is_cpu_platform() -> bool:
    try:
        from vllm.platforms import current_platform
        return bool(current_platform.is_cpu())
    except Exception:
        return False


def register() -> None:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    register_backend(AttentionBackendEnum.CUSTOM, TQ_BACKEND)
    if _is_cpu_platform():
        register_cpu_overrides()


def register_cpu_overrides() -> None:
    """CPU platform: route CPU_ATTN (and the MLA members) through tq_vllm.attention.cpu_select."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    register_backend(AttentionBackendEnum.CPU_ATTN, f"{CPU_SELECT}.CPUAttentionBackend")
    for name in ("CPU_MLA", "AMX_MLA"):
        member = getattr(AttentionBackendEnum, name, None)
        if member is not None:
            register_backend(member, f"{CPU_SELECT}.{name}")
