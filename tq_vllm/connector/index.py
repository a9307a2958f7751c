"""Scheduler-side index of the CPU and disk tiers, and the planner that turns lookups/saves into worker ops.

The scheduler owns placement and eviction; workers only execute the plan, in order, so every rank's CPU pool and
disk segments hold the same blocks in the same places (each rank its own shard of the pages).

CPU tier: `num_slots` slots of one block each (all layers of this rank). An LRU map key -> slot. Slots read by
this step's loads or written by its promotions are *pinned* for the step and never chosen for eviction.

Disk tier: inclusive (a block promoted from disk stays on disk). Blocks leaving the CPU pool that are not on disk
yet are appended to a *segment*: one file per rank per step and phase, records of a fixed size, written to a
temporary name and renamed (atomic). Segments are evicted whole, least recently used first, when the disk budget
is exceeded; their files are deleted by the workers at the end of the step (after any read of the step).

Remote tier (Redis) is not indexed here: it is shared with other instances, so lookups ask Redis itself.
"""
from __future__ import annotations

import heapq
from collections import OrderedDict
from dataclasses import dataclass, field

CPU, DISK, REDIS = "cpu", "disk", "redis"


@dataclass
class Demote:
    """Blocks to copy from CPU slots into one new disk segment (and/or Redis) before the slots are reused."""

    seg: int | None  # None: no disk write (disk off or block already on disk)
    items: list[tuple[int, bytes]] = field(default_factory=list)  # (slot, key); record index = position
    redis_items: list[tuple[int, bytes]] = field(default_factory=list)  # (slot, key) pushed to Redis on evict


@dataclass
class LoadItem:
    block_id: int
    key: bytes
    src: str  # CPU | DISK | REDIS
    slot: int  # CPU: slot to read; DISK/REDIS: slot the record is promoted into (then read from there)
    seg: int = -1
    rec: int = -1
    req_id: str = ""


@dataclass
class SaveItem:
    block_id: int
    key: bytes
    slot: int
    req_id: str = ""


@dataclass
class Plan:
    """Everything the workers do in one step, in execution order."""

    loads: list[LoadItem] = field(default_factory=list)
    load_demote: Demote | None = None  # before promotions overwrite slots (start_load_kv)
    saves: list[SaveItem] = field(default_factory=list)
    save_demote: Demote | None = None  # before saves overwrite slots (wait_for_save)
    disk_through: Demote | None = None  # write-through of this step's saves (disk_write="through")
    redis_puts: list[tuple[int, bytes]] = field(default_factory=list)  # (slot, key) write-through after saves
    drop_segments: list[int] = field(default_factory=list)  # delete at the end of the step

    def empty(self) -> bool:
        return not (self.loads or self.saves or self.drop_segments or self.redis_puts
                    or (self.load_demote and self.load_demote.items) or (self.save_demote and self.save_demote.items))


@dataclass
class Segment:
    seg: int
    records: int = 0
    live: set = field(default_factory=set)

    def nbytes(self, record_bytes: int) -> int:
        return self.records * record_bytes


class TierIndex:
    """CPU LRU slots + disk segments for one format namespace."""

    def __init__(self, num_slots: int, *, disk: bool = False, disk_bytes: int = 0, record_bytes: int = 1,
                 redis_evict: bool = False, first_segment: int = 0):
        if num_slots < 1:
            raise ValueError("the CPU tier needs at least one slot")
        self.num_slots = num_slots
        self.cpu: OrderedDict[bytes, int] = OrderedDict()  # key -> slot, LRU first
        self._free = list(range(num_slots))  # a heap: lowest free slot first (keeps batches contiguous)
        self.pinned: set[int] = set()
        self.disk_on = disk
        self.disk_bytes = disk_bytes
        self.record_bytes = record_bytes  # bytes of one record of one block over all ranks (for the budget)
        self.redis_evict = redis_evict
        self.disk: dict[bytes, tuple[int, int]] = {}  # key -> (segment, record index)
        self.segments: OrderedDict[int, Segment] = OrderedDict()  # LRU first
        self.pinned_segments: set[int] = set()
        self.next_seg = first_segment
        self._disk_records = 0  # records in all segments (live or not): what the files take
        self.counters = {"cpu_evictions": 0, "disk_demotions": 0, "disk_segments_dropped": 0,
                         "disk_blocks_dropped": 0}

    # ------------------------------------------------------------------ queries
    def tier_of(self, key: bytes) -> str | None:
        if key in self.cpu:
            return CPU
        if key in self.disk:
            return DISK
        return None

    @property
    def disk_used(self) -> int:
        return self._disk_records * self.record_bytes

    def free_capacity(self) -> int:
        """Slots that a new plan could still pin (loads need one each)."""
        return self.num_slots - len(self.pinned)

    # ------------------------------------------------------------------ step lifecycle
    def begin_step(self) -> Plan:
        return Plan()

    def end_step(self) -> None:
        self.pinned.clear()
        self.pinned_segments.clear()

    # ------------------------------------------------------------------ planning
    def pin_for_load(self, plan: Plan, block_id: int, key: bytes, req_id: str = "") -> LoadItem | None:
        """Plans the load of one block into `block_id`. Returns None if the key is not in CPU or disk."""
        if key in self.cpu:
            slot = self.cpu[key]
            self.cpu.move_to_end(key)
            self.pinned.add(slot)
            item = LoadItem(block_id, key, CPU, slot, req_id=req_id)
        elif key in self.disk:
            seg, rec = self.disk[key]
            self.pinned_segments.add(seg)
            self.segments.move_to_end(seg)
            slot = self._take_slot(plan, "load")
            if slot is None:
                return None
            self._put_cpu(key, slot)
            item = LoadItem(block_id, key, DISK, slot, seg, rec, req_id=req_id)
        else:
            return None
        plan.loads.append(item)
        return item

    def plan_remote_load(self, plan: Plan, block_id: int, key: bytes, req_id: str = "") -> LoadItem | None:
        slot = self._take_slot(plan, "load")
        if slot is None:
            return None
        self._put_cpu(key, slot)
        item = LoadItem(block_id, key, REDIS, slot, req_id=req_id)
        plan.loads.append(item)
        return item

    def plan_save(self, plan: Plan, block_id: int, key: bytes, *, disk_through: bool = False,
                  redis_through: bool = False) -> SaveItem | None:
        """Plans saving a computed block; a no-op (None) if the key is stored already."""
        if key in self.cpu:
            self.cpu.move_to_end(key)
            return None
        if key in self.disk:
            return None  # inclusive disk tier: a later hit promotes it
        slot = self._take_slot(plan, "save")
        if slot is None:
            return None
        self._put_cpu(key, slot)
        self.pinned.add(slot)  # not evicted again by a later save of this step
        item = SaveItem(block_id, key, slot)
        plan.saves.append(item)
        if disk_through and self.disk_on:
            if plan.disk_through is None:
                plan.disk_through = Demote(self._new_segment())
            self._add_disk_record(plan.disk_through, slot, key)
            self._enforce_disk_budget(plan)
        if redis_through:
            plan.redis_puts.append((slot, key))
        return item

    # ------------------------------------------------------------------ failures reported by workers
    def forget(self, key: bytes, plan_drop: list[int] | None = None) -> None:
        """Drops a key everywhere (its data failed a check or a write): the next lookup is a miss."""
        slot = self.cpu.pop(key, None)
        if slot is not None:
            heapq.heappush(self._free, slot)
        loc = self.disk.pop(key, None)
        if loc is not None:
            seg = self.segments.get(loc[0])
            if seg is not None:
                seg.live.discard(key)
                if not seg.live and plan_drop is not None and seg.seg not in self.pinned_segments:
                    self._drop_segment(seg.seg, plan_drop)

    def forget_segment(self, seg_id: int, plan_drop: list[int] | None = None) -> None:
        seg = self.segments.get(seg_id)
        if seg is None:
            return
        for key in list(seg.live):
            if self.disk.get(key, (None,))[0] == seg_id:
                del self.disk[key]
        seg.live.clear()
        if plan_drop is not None:
            self._drop_segment(seg_id, plan_drop)

    # ------------------------------------------------------------------ restart recovery
    def adopt_segment(self, seg_id: int, keys: list[bytes]) -> None:
        """Registers an existing segment found on disk at start-up (keys in record order)."""
        seg = self.segments.setdefault(seg_id, Segment(seg_id))
        self._disk_records += max(0, len(keys) - seg.records)
        seg.records = max(seg.records, len(keys))
        for rec, key in enumerate(keys):
            if key and key not in self.disk:
                self.disk[key] = (seg_id, rec)
                seg.live.add(key)
        self.next_seg = max(self.next_seg, seg_id + 1)

    # ------------------------------------------------------------------ internals
    def _put_cpu(self, key: bytes, slot: int) -> None:
        self.cpu[key] = slot
        self.cpu.move_to_end(key)
        self.pinned.add(slot)

    def _take_slot(self, plan: Plan, phase: str) -> int | None:
        if self._free:
            return heapq.heappop(self._free)
        for key, slot in self.cpu.items():  # LRU first
            if slot in self.pinned:
                continue
            del self.cpu[key]
            self.counters["cpu_evictions"] += 1
            self._demote(plan, phase, slot, key)
            return slot
        return None  # everything pinned by this step

    def _demote(self, plan: Plan, phase: str, slot: int, key: bytes) -> None:
        attr = "load_demote" if phase == "load" else "save_demote"
        batch: Demote | None = getattr(plan, attr)
        if batch is None:
            batch = Demote(None)
            setattr(plan, attr, batch)
        if self.redis_evict:
            batch.redis_items.append((slot, key))
        if not self.disk_on or key in self.disk:
            return
        if batch.seg is None:
            batch.seg = self._new_segment()
        self._add_disk_record(batch, slot, key)
        self.counters["disk_demotions"] += 1
        self._enforce_disk_budget(plan)

    def _new_segment(self) -> int:
        seg = self.next_seg
        self.next_seg += 1
        self.segments[seg] = Segment(seg)
        return seg

    def _add_disk_record(self, batch: Demote, slot: int, key: bytes) -> None:
        seg = self.segments[batch.seg]
        rec = len(batch.items)
        batch.items.append((slot, key))
        seg.records = rec + 1
        self._disk_records += 1
        seg.live.add(key)
        self.disk[key] = (batch.seg, rec)
        self.segments.move_to_end(batch.seg)

    def _enforce_disk_budget(self, plan: Plan) -> None:
        current = {b.seg for b in (plan.load_demote, plan.save_demote, plan.disk_through) if b and b.seg is not None}
        while self.disk_used > self.disk_bytes:
            victim = next((s for s in self.segments if s not in current and s not in self.pinned_segments), None)
            if victim is None:
                break  # only segments in use this step: the budget is exceeded for one step at most
            self.forget_segment(victim, plan.drop_segments)

    def _drop_segment(self, seg_id: int, plan_drop: list[int]) -> None:
        seg = self.segments.pop(seg_id, None)
        if seg is None:
            return
        self._disk_records -= seg.records
        for key in seg.live:
            if self.disk.get(key, (None,))[0] == seg_id:
                del self.disk[key]
        self.counters["disk_segments_dropped"] += 1
        self.counters["disk_blocks_dropped"] += seg.records
        plan_drop.append(seg_id)
