"""The connector's settings: everything comes from `kv_transfer_config.kv_connector_extra_config`, in one place.

    kv_transfer_config = {
        "kv_connector": "TQConnector", "kv_connector_module_path": "tq_vllm.connector", "kv_role": "kv_both",
        "kv_connector_extra_config": {
            "cpu_bytes": 8 << 30,            # CPU tier (pinned on CUDA): LRU pool of whole blocks, byte budget
            "disk_dir": "/var/cache/tq",     # disk tier: segment files under DIR/<format namespace>/; None = off
            "disk_bytes": 64 << 30,          # disk budget (all ranks together); oldest segments are deleted
            "redis_url": "redis://host:6379/0",   # remote tier; None = off ("env:VAR" reads the URL from $VAR)
        }}

Numbers accept ints or strings with a binary suffix ("8G", "512M", "64KiB"). Unknown keys are an error, so a typo
does not silently turn a tier off.
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Any

_SUFFIX = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_bytes(value: Any) -> int:
    """`8G`, `512MiB`, `1.5g`, `4096` or an int -> bytes (binary multiples)."""
    if isinstance(value, bool):
        raise ValueError(f"not a byte count: {value!r}")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"byte count must be >= 0, got {value!r}")
        return int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgtKMGT]?)(i?[bB])?\s*", str(value))
    if not m:
        raise ValueError(f"not a byte count: {value!r} (use e.g. 4096, '512M', '8GiB')")
    return int(float(m.group(1)) * _SUFFIX[m.group(2).lower()])


@dataclass
class ConnectorConfig:
    # ---- CPU tier (always on; it is also the staging area for disk/Redis hits) -----------------------------
    cpu_bytes: int = 4 << 30
    """Byte budget of the CPU pool (per worker process). Rounded down to whole blocks; at least 1 block."""
    pin_memory: bool = True
    """Pin the CPU pool on CUDA (needed for fast, asynchronous host<->device copies)."""

    # ---- disk tier ----------------------------------------------------------------------------------------
    disk_dir: str | None = None
    """Root of the disk tier; None disables it. Blocks evicted from the CPU pool are written here."""
    disk_bytes: int = 16 << 30
    """Disk budget over all ranks' segment files; whole segments are deleted, least recently used first."""
    disk_fsync: bool = False
    """fsync each segment before its atomic rename (durable across power loss, slower)."""
    disk_write: str = "evict"
    """"evict": write blocks when they leave the CPU pool; "through": also write every saved block at once."""

    # ---- remote tier (Redis) ------------------------------------------------------------------------------
    redis_url: str | None = None
    """redis://host:port/db; None disables the tier. "env:NAME" takes the URL from environment variable NAME."""
    redis_prefix: str = "tqkv"
    """Namespace prefix of every key written to Redis."""
    redis_write: str = "through"
    """"through": every saved block is also pushed to Redis (so other instances can use it at once);
    "evict": only blocks leaving the CPU pool; "off": read-only."""
    redis_ttl_s: int = 0
    """Expiry of Redis records (0 = none; bound Redis itself with maxmemory + allkeys-lru)."""
    redis_timeout_s: float = 1.0
    """Socket connect/read timeout. A failure opens a circuit for redis_retry_s: no Redis use meanwhile."""
    redis_retry_s: float = 10.0
    redis_queue: int = 256
    """Pending asynchronous Redis writes per worker; beyond that new writes are dropped (and counted)."""

    # ---- behaviour ----------------------------------------------------------------------------------------
    save: bool = True
    """Save full blocks of running requests (False: load-only consumer)."""
    load: bool = True
    """Look up and load prefixes (False: save-only producer)."""
    min_hit_blocks: int = 1
    """Ignore hits shorter than this many blocks."""
    load_failure_policy: str = "recompute"
    """Set vLLM's kv_load_failure_policy: "recompute" (a failed load is recomputed) or "keep" (leave vLLM's)."""
    model_tag: str = ""
    """Extra text mixed into the format fingerprint (bump it when weights change under the same model path)."""
    stats_file: str | None = None
    """If set, the scheduler side writes its cumulative counters (JSON) there whenever they change."""
    log_interval_s: float = 30.0
    """Summary line in the log at most this often (0 = never)."""

    # ---- CUDA transfer engine -----------------------------------------------------------------------------
    staging_bytes: int = 256 << 20
    """Device staging buffer for gathers/scatters on CUDA (two of them for double buffering)."""

    extra: dict = field(default_factory=dict)

    @classmethod
    def from_extra_config(cls, extra: dict | None) -> "ConnectorConfig":
        extra = dict(extra or {})
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        unknown = sorted(k for k in extra if k not in names and not k.startswith("_"))
        if unknown:
            raise ValueError(f"TQConnector: unknown kv_connector_extra_config keys {unknown}; known: {sorted(names)}")
        kw: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name not in extra:
                continue
            v = extra[f.name]
            if f.name in ("cpu_bytes", "disk_bytes", "staging_bytes"):
                v = parse_bytes(v)
            elif f.type in ("bool",):
                v = v if isinstance(v, bool) else str(v).lower() in ("1", "true", "yes", "on")
            elif f.type in ("int",):
                v = int(v)
            elif f.type in ("float",):
                v = float(v)
            kw[f.name] = v
        cfg = cls(**kw)
        cfg.extra = {k: v for k, v in extra.items() if k.startswith("_")}
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if self.disk_write not in ("evict", "through"):
            raise ValueError(f"disk_write must be 'evict' or 'through', got {self.disk_write!r}")
        if self.redis_write not in ("through", "evict", "off"):
            raise ValueError(f"redis_write must be 'through', 'evict' or 'off', got {self.redis_write!r}")
        if self.load_failure_policy not in ("recompute", "keep"):
            raise ValueError(f"load_failure_policy must be 'recompute' or 'keep', got {self.load_failure_policy!r}")
        if self.min_hit_blocks < 1:
            raise ValueError("min_hit_blocks must be >= 1")

    @property
    def resolved_redis_url(self) -> str | None:
        url = self.redis_url
        if url and url.startswith("env:"):
            url = os.environ.get(url[4:]) or None
        return url or None
