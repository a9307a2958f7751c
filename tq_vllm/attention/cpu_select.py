"""Backend selection on vLLM's CPU platform, where `--attention-backend` is ignored.

vLLM's CPU platform always answers `AttentionBackendEnum.CPU_ATTN.get_path()` for non-MLA layers (and CPU_MLA /
AMX_MLA for MLA layers); `get_path()` honours `register_backend` overrides. The plugin points those members at
the names below; this module resolves them *when they are looked up* (PEP 562 module `__getattr__`):

* the engine being built selected tq_vllm (`attention_backend=CUSTOM`, i.e. `--attention-backend CUSTOM`, or
  `attention_config.backend_per_kind` naming CUSTOM) -> tq_vllm's backend (MLA layers: a clear refusal);
* otherwise -> vLLM's own class, unchanged.

"The engine being built" is read from vLLM's current config, which every process (API server, engine core,
spawned workers) has while it constructs the model: the selection travels inside the pickled VllmConfig
(CUSTOM is a static enum member, so it survives spawn), no environment variable or user code is needed.
`TQ_VLLM=1` forces tq_vllm, `TQ_VLLM=0` forces vLLM's own backend (escape hatches, both optional).
"""
from __future__ import annotations

import os

_IN_TREE = {
    "CPUAttentionBackend": "vllm.v1.attention.backends.cpu_attn.CPUAttentionBackend",
}
TQ_PATH = "tq_vllm.attention.backend.TQAttentionBackend"


def tq_selected(vllm_config=None) -> bool:
    env = os.environ.get("TQ_VLLM", "").strip()
    if env in ("0", "false", "off"):
        return False
    if env in ("1", "true", "on"):
        return True
    if vllm_config is None:
        from tq_vllm.compat import current_vllm_config
        vllm_config = current_vllm_config()
    if vllm_config is None:
        return False
    from vllm.v1.attention.backends.registry import AttentionBackendEnum
    ac = getattr(vllm_config, "attention_config", None)
    if ac is None:
        return False
    if getattr(ac, "backend", None) == AttentionBackendEnum.CUSTOM:
        return True
    per_kind = getattr(ac, "backend_per_kind", None) or {}
    return any(v == AttentionBackendEnum.CUSTOM for v in per_kind.values())


def _resolve(path: str):
    from vllm.utils.import_utils import resolve_obj_by_qualname
    return resolve_obj_by_qualname(path)


def __getattr__(name: str):
    if name == "CPUAttentionBackend":
        return _resolve(TQ_PATH if tq_selected() else _IN_TREE[name])
    if name in ("CPU_MLA", "AMX_MLA"):
        from vllm.v1.attention.backends.registry import AttentionBackendEnum
        if tq_selected():
            from tq_vllm.attention.backend import MLA_MESSAGE, TQUnsupportedError
            raise TQUnsupportedError(MLA_MESSAGE)
        return _resolve(AttentionBackendEnum[name].value)
    raise AttributeError(name)
