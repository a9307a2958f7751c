"""Counters of the connector and their vLLM `KVConnectorStats` wrapper (logged as "KV Transfer metrics")."""
from __future__ import annotations

import json
import os
import threading
from collections import defaultdict

try:
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats
except Exception:  # vLLM without connector metrics: a stand-in with the same interface
    from dataclasses import dataclass, field

    @dataclass
    class KVConnectorStats:  # type: ignore[no-redef]
        data: dict = field(default_factory=dict)


class Counters:
    """Thread-safe additive counters with a 'take the delta' operation."""

    def __init__(self):
        self._d: dict[str, float] = defaultdict(float)
        self._lock = threading.Lock()

    def add(self, name: str, value: float = 1) -> None:
        if value:
            with self._lock:
                self._d[name] += value

    def update(self, other: dict) -> None:
        with self._lock:
            for k, v in other.items():
                if isinstance(v, (int, float)) and v:
                    self._d[k] += v

    def take(self) -> dict:
        with self._lock:
            out = {k: v for k, v in self._d.items() if v}
            self._d.clear()
        return out

    def snapshot(self) -> dict:
        with self._lock:
            return dict(self._d)


def _gbps(nbytes: float, seconds: float) -> float:
    return round(nbytes / seconds / 1e9, 3) if seconds > 0 else 0.0


class TQConnectorStats(KVConnectorStats):
    """Counters of one interval, summed over the scheduler and every worker."""

    def reset(self):
        self.data = {}

    def aggregate(self, other: "KVConnectorStats") -> "KVConnectorStats":
        if other is not None:
            for k, v in (getattr(other, "data", None) or {}).items():
                if isinstance(v, (int, float)):
                    self.data[k] = self.data.get(k, 0) + v
        return self

    def reduce(self) -> dict:
        return summarize(self.data)

    def is_empty(self) -> bool:
        return not any(self.data.values())


def summarize(d: dict) -> dict:
    """The numbers worth a log line: hits/misses per tier, bytes moved per tier, rates, errors."""
    out: dict = {}
    hits = {t: int(d.get(f"hit_blocks_{t}", 0)) for t in ("cpu", "disk", "redis")}
    out["hit_blocks"] = "/".join(f"{t}:{n}" for t, n in hits.items())
    out["miss_blocks"] = int(d.get("miss_blocks", 0))
    out["hit_tokens"] = int(d.get("hit_tokens", 0))
    for t in ("cpu", "disk", "redis"):
        nb = d.get(f"load_bytes_{t}", 0)
        if nb:
            out[f"load_MB_{t}"] = round(nb / 1e6, 3)
    if d.get("save_bytes"):
        out["save_MB"] = round(d["save_bytes"] / 1e6, 3)
        out["save_GBps"] = _gbps(d["save_bytes"], d.get("save_s", 0))
    load_bytes = sum(d.get(f"load_bytes_{t}", 0) for t in ("cpu", "disk", "redis"))
    if load_bytes:
        out["load_GBps"] = _gbps(load_bytes, d.get("load_s", 0))
    for k in ("disk_write_bytes", "redis_put_bytes"):
        if d.get(k):
            out[k.replace("_bytes", "_MB")] = round(d[k] / 1e6, 3)
    errors = {k[len("load_error_"):]: int(v) for k, v in d.items() if k.startswith("load_error_") and v}
    if errors:
        out["load_errors"] = errors
    for k in ("cpu_evictions", "disk_segments_dropped", "redis_errors", "redis_put_dropped", "disk_write_errors"):
        if d.get(k):
            out[k] = int(d[k])
    return out


def write_json_atomic(path: str, data: dict) -> None:
    tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
    with open(tmp, "w") as f:
        json.dump(data, f, sort_keys=True)
    os.replace(tmp, path)
