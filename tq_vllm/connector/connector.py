"""TQConnector: vLLM KV connector that keeps full KV blocks (tq_vllm's compressed pages, or any backend's pages as
opaque bytes) in CPU, disk and Redis tiers and loads them back for prefix hits. Works with vLLM 0.26-0.33 on the
CPU and CUDA platforms. See docs/connector.md.

Scheduler side (EngineCore process): owns the CPU/disk index (index.py), answers prefix lookups from it and from
Redis, and emits one `Plan` per step. Worker side (every worker process): executes the plan in order
(loads in `start_load_kv`, saves in `wait_for_save`; both synchronous with respect to the forward), checks every
record it reads and reports failures through vLLM's load-error mechanism (`get_block_ids_with_load_errors`,
with `kv_load_failure_policy="recompute"`, which this connector sets) so that vLLM recomputes the block.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

try:  # 0.26+
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorWorkerMetadata
except ImportError:  # pragma: no cover - older vLLM
    KVConnectorWorkerMetadata = object  # type: ignore[misc,assignment]

from .config import ConnectorConfig
from .disk import SegmentStore
from .fingerprint import full_fingerprint, namespace_digest, namespace_string, rank_name, rank_names
from .index import CPU, DISK, REDIS, LoadItem, Plan, TierIndex
from .record import HEADER_SIZE, RecordError, block_key, check_record, crc32_parts, pack_header_crc
from .remote import RemoteStore
from .stats import Counters, TQConnectorStats, summarize, write_json_atomic
from .transfer import BlockPool, build_parts

logger = logging.getLogger("vllm.tq_vllm.connector")  # under vLLM's logger tree: same format and level
FAIL = "fail"


# ============================================================================ messages between the two sides
class TQConnectorMetadata(KVConnectorMetadata):
    def __init__(self, step: int, plan: Plan | None, outputs_seen: int = 0):
        self.step = step
        self.plan = plan
        self.outputs_seen = outputs_seen  # step outputs the scheduler had processed when it built this plan


class TQWorkerMeta(KVConnectorWorkerMetadata):
    """Worker -> scheduler: keys whose data is not where the index says (failed reads/writes)."""

    def __init__(self, failed_keys: set | None = None, failed_segments: set | None = None):
        self.failed_keys = set(failed_keys or ())
        self.failed_segments = set(failed_segments or ())

    def aggregate(self, other):
        if other is not None:
            self.failed_keys |= getattr(other, "failed_keys", set())
            self.failed_segments |= getattr(other, "failed_segments", set())
        return self


@dataclass
class _Req:
    request: Any
    block_ids: list[int] = field(default_factory=list)
    keys: list[bytes] = field(default_factory=list)
    saved_upto: int = 0  # leading blocks already saved or known to be stored
    load_step: int = -1  # step of its last external load (saves of that step wait for its outcome on TP/PP>1)


def _spec_of(kv_cache_config):
    groups = kv_cache_config.kv_cache_groups
    return groups[0].kv_cache_spec if groups else None


def layer_specs(spec) -> list:
    """Per-layer specs of a group: a plain attention spec, or vLLM's UniformTypeKVCacheSpecs (layers of one type
    with different page sizes, e.g. tq_vllm's boundary layers)."""
    specs = getattr(spec, "kv_cache_specs", None)
    return list(specs.values()) if isinstance(specs, dict) and specs else [spec]


def block_bytes_of(kv_cache_config) -> int:
    """Bytes of one block over all layers of this rank, from the KV cache config."""
    group = kv_cache_config.kv_cache_groups[0]
    spec = group.kv_cache_spec
    if isinstance(getattr(spec, "kv_cache_specs", None), dict):
        return int(spec.page_size_bytes)
    return int(spec.page_size_bytes) * len(group.layer_names)


class TQConnector(KVConnectorBase_V1):
    """See the module docstring and docs/connector.md."""

    def __init__(self, vllm_config, role: KVConnectorRole, kv_cache_config=None):
        super().__init__(vllm_config, role, kv_cache_config)
        extra = getattr(self._kv_transfer_config, "kv_connector_extra_config", None) or {}
        self.cfg = ConnectorConfig.from_extra_config(extra)
        self.counters = Counters()
        self._last_log = time.monotonic()
        self.enabled = True
        spec = _spec_of(kv_cache_config) if kv_cache_config is not None else None
        if kv_cache_config is None or spec is None:
            self.enabled = False
            logger.warning("tq connector: no KV cache config; disabled")
            return
        first = layer_specs(spec)[0]
        if len(kv_cache_config.kv_cache_groups) != 1 or not hasattr(first, "head_size"):
            self.enabled = False
            logger.warning("tq connector: %d KV cache groups of %s (only models whose layers are all full "
                           "attention are supported); disabled", len(kv_cache_config.kv_cache_groups),
                           type(first).__name__)
            return
        self.block_size = int(first.block_size)
        hbs = getattr(kv_cache_config, "hash_block_size", None) or self.block_size
        self.hashes_per_block = max(1, self.block_size // int(hbs))
        self.num_layers = len(kv_cache_config.kv_cache_groups[0].layer_names)
        self.est_block_bytes = block_bytes_of(kv_cache_config)
        self.num_slots = max(1, self.cfg.cpu_bytes // max(1, self.est_block_bytes))
        pc = vllm_config.parallel_config
        self.tp, self.pp = int(pc.tensor_parallel_size), int(pc.pipeline_parallel_size)
        self.dp_rank = int(getattr(pc, "data_parallel_rank", 0) or 0)
        self.ranks = rank_names(self.tp, self.pp)
        self.ns = namespace_string(vllm_config, kv_cache_config, self.cfg.model_tag)
        self.ns_hex = namespace_digest(self.ns)
        self.disk_ns = f"{self.ns_hex}/dp{self.dp_rank}"
        url = self.cfg.resolved_redis_url
        self.remote = (RemoteStore(url, self.cfg.redis_prefix, self.ns_hex, timeout_s=self.cfg.redis_timeout_s,
                                   retry_s=self.cfg.redis_retry_s, ttl_s=self.cfg.redis_ttl_s,
                                   queue_size=self.cfg.redis_queue) if url else None)
        if role == KVConnectorRole.SCHEDULER:
            self._init_scheduler()
        else:
            self._init_worker_state()

    # ------------------------------------------------------------------ version-compat properties
    @property
    def requires_kv_delivery(self) -> bool:  # 0.32+: a best-effort cache (a dropped save is a future miss)
        return False

    @classmethod
    def get_required_kvcache_layout(cls, vllm_config) -> str | None:
        return None

    @classmethod
    def build_kv_connector_stats(cls, data: dict | None = None):
        return TQConnectorStats(data=dict(data or {}))

    # ========================================================================= scheduler side
    def _init_scheduler(self) -> None:
        cfg = self.cfg
        if cfg.load_failure_policy == "recompute":
            try:
                if getattr(self._kv_transfer_config, "kv_load_failure_policy", "recompute") != "recompute":
                    self._kv_transfer_config.kv_load_failure_policy = "recompute"
                    logger.info("tq connector: kv_load_failure_policy set to 'recompute' (a failed load is "
                                "recomputed, never an error)")
            except Exception as e:  # frozen config: still correct, a failed load then fails the request
                logger.warning("tq connector: cannot set kv_load_failure_policy=recompute (%s); set it in "
                               "kv_transfer_config", e)
        self.disk = None
        record_bytes = (HEADER_SIZE + self.est_block_bytes) * len(self.ranks)
        self.index = TierIndex(self.num_slots, disk=bool(cfg.disk_dir), disk_bytes=cfg.disk_bytes,
                               record_bytes=record_bytes, redis_evict=bool(self.remote and cfg.redis_write == "evict"))
        if cfg.disk_dir:
            self.disk = SegmentStore(cfg.disk_dir, self.disk_ns, self.ranks[0], fsync=cfg.disk_fsync)
            self._recover_disk()
        self._reqs: dict[str, _Req] = {}
        self._lookups: dict[str, tuple[int, list[str]]] = {}
        self._plan: Plan | None = None
        self._step = 0
        self._outputs_seen = 0
        self._pending_drops: list[int] = []
        self._recent_loads: deque[dict[int, tuple[bytes, str, int]]] = deque(maxlen=8)
        self._cur_loads: dict[int, tuple[bytes, str, int]] = {}
        self.cumulative = Counters()
        self._stats_dirty = False
        logger.info("tq connector (scheduler): namespace %s, block %d tokens, ~%d B/block/rank, CPU %d slots, "
                    "disk %s, redis %s", self.ns_hex, self.block_size, self.est_block_bytes, self.num_slots,
                    cfg.disk_dir or "off", "on" if self.remote else "off")

    def _recover_disk(self) -> None:
        assert self.disk is not None
        # record size: header + payload as written by the workers (read from the first record of any segment)
        segs = []
        try:
            from .record import parse_header

            for p in sorted(self.disk.dir.glob(f"seg-*.{self.ranks[0]}.tqs")):
                with open(p, "rb") as f:
                    try:
                        _, _, plen, _, _ = parse_header(f.read(HEADER_SIZE))
                    except RecordError:
                        continue
                segs = self.disk.scan(self.ranks, HEADER_SIZE + plen)
                self.index.record_bytes = (HEADER_SIZE + plen) * len(self.ranks)
                break
        except OSError as e:
            logger.warning("tq connector: disk recovery failed: %s", e)
        nblocks = 0
        for seg, keys in segs:
            self.index.adopt_segment(seg, keys)
            nblocks += sum(1 for k in keys if k)
        if segs:
            logger.info("tq connector: recovered %d blocks in %d disk segments from %s", nblocks, len(segs),
                        self.disk.dir)
        self.counters.add("disk_recovered_blocks", nblocks)

    def _req_keys(self, st: _Req) -> list[bytes]:
        hashes = st.request.block_hashes
        n_full = len(hashes) // self.hashes_per_block
        for b in range(len(st.keys), n_full):
            st.keys.append(block_key(hashes[(b + 1) * self.hashes_per_block - 1]))
        return st.keys

    def _track(self, request) -> _Req:
        st = self._reqs.get(request.request_id)
        if st is None or st.request is not request:
            st = _Req(request)
            self._reqs[request.request_id] = st
        return st

    def on_new_request(self, request) -> None:
        if self.enabled:
            self._track(request)

    def _cur_plan(self) -> Plan:
        if self._plan is None:
            self._plan = self.index.begin_step()
            self._cur_loads = {}
        return self._plan

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple[int | None, bool]:
        if not self.enabled:
            return 0, False
        st = self._track(request)
        self._lookups.pop(request.request_id, None)
        if not self.cfg.load:
            return 0, False
        B = self.block_size
        keys = self._req_keys(st)
        start = num_computed_tokens // B
        stop = min((request.num_tokens - 1) // B, len(keys))  # leave >= 1 token to compute
        if start >= stop:
            return 0, False
        tiers: list[str] = []
        for key in keys[start:stop]:
            t = self.index.tier_of(key)
            if t is None:
                break
            tiers.append(t)
        if self.remote is not None and start + len(tiers) < stop:
            n = self.remote.count_present(keys[start + len(tiers):stop], self.ranks)
            tiers.extend([REDIS] * n)
        n = min(len(tiers), self.index.free_capacity())
        if n < self.cfg.min_hit_blocks:
            n = 0
        self._lookups[request.request_id] = (start, tiers[:n], stop - start)
        return n * B, False

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        if not self.enabled:
            return
        st = self._track(request)
        lk = self._lookups.pop(request.request_id, None)
        if lk is not None:
            start, tiers, queried = lk
            n_hit = num_external_tokens // self.block_size
            self.counters.add("lookups")
            self.counters.add("miss_blocks", queried - n_hit)
        if num_external_tokens <= 0 or lk is None:
            return
        start, tiers, _ = lk
        n = num_external_tokens // self.block_size
        block_ids = blocks.get_block_ids()[0]
        keys = self._req_keys(st)
        plan = self._cur_plan()
        rid = request.request_id
        items: list[LoadItem | None] = [None] * n
        # CPU hits first (pinning them), then promotions, which may evict unpinned CPU entries
        for phase in (CPU, DISK, REDIS):
            for i in range(n):
                if items[i] is not None or tiers[i] != phase:
                    continue
                bid, key = block_ids[start + i], keys[start + i]
                tier = self.index.tier_of(key)
                if tier in (CPU, DISK):
                    items[i] = self.index.pin_for_load(plan, bid, key, rid)
                elif phase == REDIS:
                    items[i] = self.index.plan_remote_load(plan, bid, key, rid)
        for i in range(n):
            bid, key = block_ids[start + i], keys[start + i]
            item = items[i]
            if item is None:  # promised but not plannable any more: the worker reports it, vLLM recomputes
                item = LoadItem(bid, key, FAIL, -1, req_id=rid)
                plan.loads.append(item)
            self._cur_loads[bid] = (key, rid, start + i)
            self.counters.add(f"hit_blocks_{item.src}" if item.src != FAIL else "hit_blocks_lost")
        self.counters.add("hit_tokens", num_external_tokens)
        st.load_step = self._step
        by_tier: dict[str, int] = {}
        for it in plan.loads:
            if it.req_id == rid:
                by_tier[it.src] = by_tier.get(it.src, 0) + self.block_size
        self._hit_sources = (rid, by_tier)

    def get_external_cache_hit_sources(self, request, num_external_tokens: int) -> dict:
        """0.32+: which tier supplied the external tokens (CPU -> host, disk -> disk, Redis -> unspecified)."""
        if not num_external_tokens:
            return {}
        try:
            from vllm.v1.metrics.cache_hit_source import CacheHitSource
        except ImportError:
            return {}
        rid, by_tier = getattr(self, "_hit_sources", (None, {}))
        if rid != request.request_id or sum(by_tier.values()) != num_external_tokens:
            return {CacheHitSource.EXTERNAL_UNSPECIFIED: num_external_tokens}
        names = {CPU: CacheHitSource.HOST, DISK: CacheHitSource.DISK}
        out: dict = {}
        for tier, n in by_tier.items():
            src = names.get(tier, CacheHitSource.EXTERNAL_UNSPECIFIED)
            out[src] = out.get(src, 0) + n
        return out

    def build_connector_meta(self, scheduler_output) -> KVConnectorMetadata:
        if not self.enabled:
            return TQConnectorMetadata(self._step if hasattr(self, "_step") else 0, None)
        plan = self._cur_plan()
        so = scheduler_output
        for nr in so.scheduled_new_reqs:
            st = self._reqs.get(nr.req_id)
            if st is not None:
                st.block_ids = list(nr.block_ids[0]) if nr.block_ids else []
        cr = so.scheduled_cached_reqs
        resumed = getattr(cr, "resumed_req_ids", set()) or set()
        for i, rid in enumerate(cr.req_ids):
            st = self._reqs.get(rid)
            if st is None:
                continue
            nb = cr.new_block_ids[i]
            if rid in resumed:
                st.block_ids = list(nb[0]) if nb else []
            elif nb:
                st.block_ids.extend(nb[0])
        if self.cfg.save:
            multi_rank = len(self.ranks) > 1
            spec = so.scheduled_spec_decode_tokens or {}
            disk_through = self.cfg.disk_write == "through"
            redis_through = self.remote is not None and self.cfg.redis_write == "through"
            for rid, n_sched in so.num_scheduled_tokens.items():
                st = self._reqs.get(rid)
                if st is None:
                    continue
                if multi_rank and st.load_step >= self._outputs_seen and self._step - st.load_step < 8:
                    continue  # wait until the outcome of its load is known (another rank may have failed)
                req = st.request
                done = req.num_computed_tokens + n_sched - len(spec.get(rid, ()))
                keys = self._req_keys(st)
                full = min(done // self.block_size, len(keys), len(st.block_ids))
                for b in range(st.saved_upto, full):
                    if st.block_ids[b] in self._cur_loads:
                        continue
                    item = self.index.plan_save(plan, st.block_ids[b], keys[b], disk_through=disk_through,
                                                redis_through=redis_through)
                    if item is not None:
                        item.req_id = rid
                        self.counters.add("save_blocks_planned")
                st.saved_upto = max(st.saved_upto, full)
        plan.drop_segments.extend(self._pending_drops)
        self._pending_drops = []
        self.index.end_step()
        self._recent_loads.append(self._cur_loads)
        meta = TQConnectorMetadata(self._step, None if plan.empty() else plan, self._outputs_seen)
        self._plan = None
        self._cur_loads = {}
        self._step += 1
        self.counters.update(self._take_index_counters())
        return meta

    def _take_index_counters(self) -> dict:
        out = {k: v for k, v in self.index.counters.items() if v}
        for k in self.index.counters:
            self.index.counters[k] = 0
        return out

    def update_connector_output(self, connector_output) -> None:
        if not self.enabled:
            return
        self._outputs_seen += 1
        stats = getattr(connector_output, "kv_connector_stats", None)
        if stats is not None and getattr(stats, "data", None):
            self.cumulative.update(stats.data)
            self._stats_dirty = True
        failed_keys: set[bytes] = set()
        wm = getattr(connector_output, "kv_connector_worker_meta", None)
        if isinstance(wm, TQWorkerMeta):
            failed_keys |= wm.failed_keys
            for seg in wm.failed_segments:
                self.index.forget_segment(seg, self._pending_drops)
        invalid = getattr(connector_output, "invalid_block_ids", None) or set()
        for bid in invalid:
            for loads in self._recent_loads:
                if bid in loads:
                    key, rid, b = loads[bid]
                    failed_keys.add(key)
                    st = self._reqs.get(rid)
                    if st is not None:
                        st.saved_upto = min(st.saved_upto, b)
        for key in failed_keys:
            self.index.forget(key, self._pending_drops)
        if failed_keys:
            self.counters.add("forgotten_blocks", len(failed_keys))
            logger.info("tq connector: %d stored blocks failed to load or write; dropped from the index, vLLM "
                        "recomputes them", len(failed_keys))
        self._maybe_write_stats()

    def request_finished(self, request, block_ids) -> tuple[bool, dict | None]:
        if self.enabled:
            self._reqs.pop(request.request_id, None)
            self._lookups.pop(request.request_id, None)
        return False, None  # saves are synchronous: the blocks may be freed now

    def get_num_new_matched_tokens_tiers(self, request_id: str):  # for tests / introspection
        return self._lookups.get(request_id)

    def reset_cache(self) -> bool | None:
        return None  # the tiers are a shared cache; "reset" of vLLM's own prefix cache does not empty them

    def _maybe_write_stats(self, force: bool = False) -> None:
        if self.cfg.stats_file and (self._stats_dirty or force):
            data = self.cumulative.snapshot()
            data["scheduler_step"] = self._step
            try:
                write_json_atomic(self.cfg.stats_file, data)
            except OSError as e:
                logger.warning("tq connector: cannot write stats file %s: %s", self.cfg.stats_file, e)
            self._stats_dirty = False

    # ========================================================================= both sides: stats
    def get_kv_connector_stats(self):
        if not self.enabled:
            return None
        if self.remote is not None:
            self.counters.update(self.remote.take_counters())
        delta = self.counters.take()
        if self._role == KVConnectorRole.SCHEDULER and delta:
            self.cumulative.update(delta)
            self._stats_dirty = True
            self._maybe_write_stats()
        if not delta:
            return None
        self._maybe_log(delta)
        return TQConnectorStats(data=delta)

    def _maybe_log(self, delta: dict) -> None:
        self._log_acc = getattr(self, "_log_acc", Counters())
        self._log_acc.update(delta)
        if self.cfg.log_interval_s > 0 and time.monotonic() - self._last_log >= self.cfg.log_interval_s:
            self._last_log = time.monotonic()
            side = "scheduler" if self._role == KVConnectorRole.SCHEDULER else f"worker {self.rank}"
            logger.info("tq connector (%s): %s", side, summarize(self._log_acc.take()))

    # ========================================================================= worker side
    def _init_worker_state(self) -> None:
        self._phase_failures: dict[tuple[str, str], list] = {}
        self.pool: BlockPool | None = None
        self.store: SegmentStore | None = None
        self._load_errors: set[int] = set()
        self._failed_keys: set[bytes] = set()
        self._failed_segments: set[int] = set()
        self._failed_reqs: dict[str, int] = {}  # request -> step of its failed load
        self._done_phases: tuple[int, set] = (-1, set())
        try:
            from vllm.distributed.parallel_state import get_pp_group, get_tensor_model_parallel_rank

            tp_rank = get_tensor_model_parallel_rank()
            pp_rank = get_pp_group().rank_in_group
        except Exception:
            tp_rank, pp_rank = 0, 0
        self.rank = rank_name(tp_rank, self.tp, pp_rank, self.pp)

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]):
        if not self.enabled:
            return
        try:
            parts = build_parts(kv_caches, int(self._kv_cache_config.num_blocks))
        except Exception as e:
            self.enabled = False
            logger.warning("tq connector: cannot view the KV cache as pages (%s); disabled", e)
            return
        self.pool = BlockPool(parts, self.num_slots, pin=self.cfg.pin_memory, staging_bytes=self.cfg.staging_bytes)
        self.part_bytes = self.pool.part_bytes
        self.layer_bytes = self.part_bytes[0] if len(set(self.part_bytes)) == 1 else 0
        self.record_size = HEADER_SIZE + self.pool.block_bytes
        backends = self._backend_names(kv_caches)
        self.fp = full_fingerprint(self.ns, self.rank, backends, self.part_bytes)
        if self.cfg.disk_dir:
            self.store = SegmentStore(self.cfg.disk_dir, self.disk_ns, self.rank, fsync=self.cfg.disk_fsync)
        if self.pool.block_bytes != self.est_block_bytes:
            logger.info("tq connector: pages are %d B per block (config says %d B); CPU pool %.1f MiB",
                        self.pool.block_bytes, self.est_block_bytes, self.num_slots * self.pool.block_bytes / 2**20)
        logger.info("tq connector (worker %s): %d parts (%s B each), %d B per block, %d CPU slots%s, backends %s",
                    self.rank, len(parts), sorted(set(self.part_bytes)), self.pool.block_bytes, self.num_slots,
                    " (pinned)" if self.pool.pinned else "", backends)

    def _backend_names(self, kv_caches) -> list[str]:
        names: list[str] = []
        try:
            ctx = self._vllm_config.compilation_config.static_forward_context
            for lname in kv_caches:
                layer = ctx.get(lname)
                if layer is None:
                    continue
                be = getattr(layer, "attn_backend", None)
                if be is None and hasattr(layer, "get_attn_backend"):
                    be = layer.get_attn_backend()
                impl = getattr(layer, "impl", None)
                lay = getattr(impl, "layout", None) or getattr(impl, "page_layout", None)
                fp = lay.fingerprint() if hasattr(lay, "fingerprint") else ""
                names.append(f"{getattr(be, '__module__', '')}.{getattr(be, '__name__', be)}{':' + fp if fp else ''}")
        except Exception as e:  # introspection only
            logger.debug("tq connector: backend probe failed: %s", e)
        return names

    def _phase_once(self, meta: TQConnectorMetadata, phase: str) -> bool:
        step, done = self._done_phases
        if step != meta.step:
            self._done_phases = (meta.step, {phase})
            return True
        if phase in done:
            return False
        done.add(phase)
        return True

    def start_load_kv(self, forward_context, **kwargs) -> None:
        if not self.enabled or self.pool is None or not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
        if not isinstance(meta, TQConnectorMetadata) or meta.plan is None or not self._phase_once(meta, "load"):
            return
        self._step_now = meta.step
        # a failed load of step s is known to the scheduler once it has processed s's output: later plans are sound
        # (bounded to 3 steps: vLLM keeps at most 2 batches in flight)
        self._failed_reqs = {r: s for r, s in self._failed_reqs.items()
                             if meta.outputs_seen <= s and meta.step - s <= 3}
        plan = meta.plan
        if plan.loads or (plan.load_demote and plan.load_demote.items):
            self._run_load_phase(plan)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return

    def save_kv_layer(self, layer_name: str, kv_layer, attn_metadata, **kwargs) -> None:
        return

    def wait_for_save(self):
        if not self.enabled or self.pool is None or not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
        if not isinstance(meta, TQConnectorMetadata) or meta.plan is None:
            return
        if not self._phase_once(meta, "save"):
            return
        self._run_save_phase(meta.plan)

    def get_finished(self, finished_req_ids):
        # vLLM 0.26 skips wait_for_save in steps without a forward; run any pending save phase here.
        if self.enabled and self.pool is not None and self.has_connector_metadata():
            meta = self._get_connector_metadata()
            if isinstance(meta, TQConnectorMetadata) and meta.plan is not None:
                if (meta.plan.saves or meta.plan.drop_segments or meta.plan.save_demote) and \
                        self._phase_once(meta, "save"):
                    self._run_save_phase(meta.plan)
        return None, None

    def get_block_ids_with_load_errors(self) -> set[int]:
        out, self._load_errors = self._load_errors, set()
        return out

    def build_connector_worker_meta(self):
        if not self.enabled or self._role != KVConnectorRole.WORKER:
            return None
        if not (self._failed_keys or self._failed_segments):
            return None
        wm = TQWorkerMeta(self._failed_keys, self._failed_segments)
        self._failed_keys, self._failed_segments = set(), set()
        return wm

    def shutdown(self):
        if self._role == KVConnectorRole.SCHEDULER and self.enabled:
            self._maybe_write_stats(force=True)
        if getattr(self, "pool", None) is not None:
            self.pool.sync()
        if self.remote is not None:
            self.remote.close()

    # ------------------------------------------------------------------ worker: load phase
    def _fail(self, item: LoadItem, reason: str, detail: str = "") -> None:
        self._load_errors.add(item.block_id)
        self._failed_keys.add(item.key)
        if item.req_id:
            self._failed_reqs[item.req_id] = getattr(self, "_step_now", 0)
        self.counters.add(f"load_error_{reason}")
        agg = self._phase_failures.setdefault((item.src, reason), [0, detail])
        agg[0] += 1

    def _run_load_phase(self, plan: Plan) -> None:
        pool = self.pool
        assert pool is not None
        t0 = time.perf_counter()
        self._phase_failures: dict[tuple[str, str], list] = {}
        pool.sync()  # the CPU is about to read and write pool slots
        good: list[LoadItem] = []
        promos: list[LoadItem] = []
        for it in plan.loads:
            if it.src == CPU:
                if pool.slot_keys[it.slot] == it.key:
                    good.append(it)
                else:
                    self._fail(it, "slot_mismatch", f"slot {it.slot}")
            elif it.src == FAIL:
                self._fail(it, "missing", "no longer stored")
            else:
                promos.append(it)
        if plan.load_demote is not None:
            self._demote(plan.load_demote)
        disk_items = [it for it in promos if it.src == DISK]
        redis_items = [it for it in promos if it.src == REDIS]
        for it in disk_items:
            pool.slot_keys[it.slot] = None
            if self.store is None:
                self._fail(it, "missing", "disk tier off")
                continue
            td = time.perf_counter()
            try:
                self.store.read_record_into(it.seg, it.rec, self.record_size, pool.slot_views(it.slot),
                                            fingerprint=self.fp, key=it.key, num_layers=len(self.part_bytes),
                                            layer_bytes=self.layer_bytes)
            except RecordError as e:
                self._fail(it, e.reason, f"(segment {it.seg} record {it.rec}) {e}")
                continue
            self.counters.add("disk_read_s", time.perf_counter() - td)
            pool.slot_keys[it.slot] = it.key
            good.append(it)
        if redis_items:
            for it in redis_items:
                pool.slot_keys[it.slot] = None
            if self.remote is None:
                for it in redis_items:
                    self._fail(it, "missing", "redis tier off")
            else:
                for b0 in range(0, len(redis_items), 32):  # bounded memory: 32 records at a time
                    batch = redis_items[b0:b0 + 32]
                    td = time.perf_counter()
                    values = self.remote.get_many(self.rank, [it.key for it in batch])
                    self.counters.add("redis_read_s", time.perf_counter() - td)
                    down = not self.remote.available()
                    for it, val in zip(batch, values):
                        if val is None:
                            self._fail(it, "remote_unavailable" if down else "missing", "")
                            continue
                        try:
                            payload = check_record(val, fingerprint=self.fp, key=it.key,
                                                   num_layers=len(self.part_bytes), layer_bytes=self.layer_bytes,
                                                   payload_len=pool.block_bytes)
                        except RecordError as e:
                            self._fail(it, e.reason, str(e))
                            continue
                        off = 0
                        for dst in pool.slot_views(it.slot):
                            n = dst.nbytes
                            dst[:] = np.frombuffer(payload[off:off + n], dtype=np.uint8)
                            off += n
                        pool.slot_keys[it.slot] = it.key
                        good.append(it)
        if good:
            good.sort(key=lambda it: it.slot)  # coalesces runs of consecutive slots
            pool.load([it.slot for it in good], [it.block_id for it in good])
            for it in good:
                self.counters.add(f"load_blocks_{it.src}")
                self.counters.add(f"load_bytes_{it.src}", pool.block_bytes)
        self.counters.add("load_s", time.perf_counter() - t0)
        for (src, reason), (n, detail) in self._phase_failures.items():
            logger.warning("tq connector (worker %s): %d block(s) from %s not loaded: %s%s; vLLM recomputes them",
                           self.rank, n, src, reason, f" (first: {detail})" if detail else "")

    # ------------------------------------------------------------------ worker: save phase
    def _run_save_phase(self, plan: Plan) -> None:
        pool = self.pool
        assert pool is not None
        t0 = time.perf_counter()
        if plan.save_demote is not None and (plan.save_demote.items or plan.save_demote.redis_items):
            pool.sync()
            self._demote(plan.save_demote)
        saves = []
        meta = self._get_connector_metadata()
        for it in plan.saves:
            failed_at = self._failed_reqs.get(it.req_id)
            if failed_at is not None and meta.outputs_seen <= failed_at and meta.step - failed_at <= 3:
                # this request read a block that failed to load in this step (or, with asynchronous scheduling,
                # in a step whose outcome the scheduler had not seen when it planned this one): what it computed
                # after that block may be wrong, so none of it is stored
                pool.slot_keys[it.slot] = None
                self._failed_keys.add(it.key)
                self.counters.add("save_skipped_after_load_error")
                continue
            saves.append(it)
        if saves:
            pool.sync()
            pool.save([it.block_id for it in saves], [it.slot for it in saves])
            for it in saves:
                pool.slot_keys[it.slot] = it.key
            self.counters.add("save_blocks", len(saves))
            self.counters.add("save_bytes", len(saves) * pool.block_bytes)
        if plan.disk_through is not None and plan.disk_through.items:
            pool.sync()
            self._demote(plan.disk_through)
        if plan.redis_puts and self.remote is not None:
            pool.sync()
            items = [(key, self._record_bytes(slot, key)) for slot, key in plan.redis_puts
                     if pool.slot_keys[slot] == key]
            self.remote.put_many_async(self.rank, items)
        if self.store is not None:
            for seg in plan.drop_segments:
                self.store.delete_segment(seg)
        if self.pool.cuda and saves:
            # account the copy time honestly for the stats (the copies overlap with the next step otherwise)
            if self.cfg.extra.get("_sync_saves"):
                pool.sync()
        self.counters.add("save_s", time.perf_counter() - t0)

    def _record_parts(self, slot: int, key: bytes) -> tuple[bytes, list]:
        views = self.pool.slot_views(slot)
        head = pack_header_crc(self.fp, key, len(self.part_bytes), self.layer_bytes, self.pool.block_bytes,
                               crc32_parts(views))
        return head, views

    def _record_bytes(self, slot: int, key: bytes) -> bytes:
        head, views = self._record_parts(slot, key)
        return b"".join([head] + [v.tobytes() for v in views])

    def _demote(self, batch) -> None:
        pool = self.pool
        assert pool is not None
        if batch.seg is not None and batch.items:
            if self.store is None:
                self._failed_segments.add(batch.seg)
            else:
                td = time.perf_counter()
                zeros = bytes(self.record_size)
                records = []
                for slot, key in batch.items:
                    if pool.slot_keys[slot] == key:
                        head, views = self._record_parts(slot, key)
                        records.append((head, *views))
                    else:  # the slot does not hold what the index thinks: leave a hole that fails its check
                        records.append(zeros)
                        self._failed_keys.add(key)
                try:
                    n = self.store.write_segment(batch.seg, records)
                    self.counters.add("disk_write_blocks", len(batch.items))
                    self.counters.add("disk_write_bytes", n)
                except OSError as e:
                    self._failed_segments.add(batch.seg)
                    self.counters.add("disk_write_errors")
                    logger.warning("tq connector (worker %s): writing segment %s failed: %s", self.rank, batch.seg, e)
                self.counters.add("disk_write_s", time.perf_counter() - td)
        if batch.redis_items and self.remote is not None:
            items = [(key, self._record_bytes(slot, key)) for slot, key in batch.redis_items
                     if pool.slot_keys[slot] == key]
            self.remote.put_many_async(self.rank, items)
