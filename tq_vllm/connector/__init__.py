"""tq_vllm's KV connector: full KV blocks (compressed pages) in CPU, disk and Redis tiers, reloaded for prefix hits.

    LLM(model, kv_transfer_config={"kv_connector": "TQConnector", "kv_connector_module_path": "tq_vllm.connector",
                                   "kv_role": "kv_both", "kv_connector_extra_config": {"cpu_bytes": "8G", ...}})

See docs/connector.md. `TQConnector` is imported lazily so that the vLLM-independent parts (record format,
index, tiers, transfer engine) can be used and tested without vLLM.
"""
from __future__ import annotations

__all__ = ["TQConnector", "TQConnectorMetadata", "TQConnectorStats", "TQWorkerMeta"]


def __getattr__(name: str):
    if name in ("TQConnector", "TQConnectorMetadata", "TQWorkerMeta"):
        from . import connector

        return getattr(connector, name)
    if name == "TQConnectorStats":
        from .stats import TQConnectorStats

        return TQConnectorStats
    raise AttributeError(name)
