"""Worker-side page views and the CPU block pool with its host<->device copy engine (no vLLM import).

Pages are opaque bytes. Every layer's KV tensor is re-viewed as one or more *parts* `(num_blocks, part_bytes)`
uint8 with the tensor's block stride (`stride(0)` for block-first tensors such as tq_vllm's
`[num_blocks, H, block_size, C]` or vLLM 0.32's `[B, H, N, C]` views; block-second tensors such as
`(2, num_blocks, ...)` give one part per leading index). A block's bytes inside a part must be dense (any
permutation of a dense layout), which holds for every layout vLLM allocates.

The CPU pool is one `(num_slots, block_bytes)` tensor (pinned on CUDA): slot s holds a block's parts one after
the other, which is also the payload of its disk/Redis record.

CUDA: a gather (`index_select`) into a device staging buffer runs on the compute stream, right after the forward
that wrote the pages, so no later kernel can overwrite a block before it is copied; the device->host copy of the
staging buffer runs on the connector's own stream (one copy per run of consecutive slots) and overlaps with
the next step. Loads copy host->device on the connector's stream and scatter (`index_copy_`) on the compute
stream after an event, so the forward that follows sees the pages, without blocking the CPU. Two staging buffers
alternate; events guard their reuse, and `sync()` waits for every copy that touches the pool before the CPU reads
or writes it (disk, Redis, promotions).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class Part:
    layer: str
    index: int  # leading index for block-second tensors (e.g. 0 = K, 1 = V); -1 for block-first
    raw: torch.Tensor  # (num_blocks, nbytes) uint8 view with the block stride
    nbytes: int


def _dense_span(shape, stride) -> int:
    return 1 + sum((s - 1) * st for s, st in zip(shape, stride) if s > 0)


def _byte_view(t: torch.Tensor, num_blocks: int) -> tuple[torch.Tensor, int]:
    """(num_blocks, bytes) uint8 view of a tensor whose dim 0 is the block dimension."""
    es = t.element_size()
    inner_shape, inner_stride = tuple(t.shape[1:]), tuple(t.stride()[1:])
    numel = math.prod(inner_shape)
    if any(st < 0 for st in t.stride()) or _dense_span(inner_shape, inner_stride) != numel:
        raise ValueError(f"a block of this KV tensor is not dense (shape {tuple(t.shape)}, stride {t.stride()})")
    nbytes = numel * es
    bstride = t.stride(0) * es
    if num_blocks > 1 and bstride < nbytes:
        raise ValueError(f"blocks overlap (block stride {bstride} B < block bytes {nbytes} B)")
    # the lowest address of a block is its first element when all strides are non-negative
    raw = torch.empty(0, dtype=torch.uint8, device=t.device)
    raw.set_(t.untyped_storage(), t.storage_offset() * es, (num_blocks, nbytes), (bstride, 1))
    return raw, nbytes


def build_parts(kv_caches: dict[str, torch.Tensor], num_blocks: int) -> list[Part]:
    """Opaque byte parts of every distinct KV tensor, in sorted layer-name order (identical in every process)."""
    parts: list[Part] = []
    seen: set[tuple] = set()
    for name in sorted(kv_caches):
        t = kv_caches[name]
        if isinstance(t, (list, tuple)):  # some backends hand a (k, v) pair
            subs = list(enumerate(t))
        elif t.shape[0] == num_blocks:
            subs = [(-1, t)]
        elif t.dim() >= 2 and t.shape[1] == num_blocks:
            subs = list(enumerate(t.unbind(0)))
        else:
            raise ValueError(f"layer {name}: cannot find the block dimension ({num_blocks}) in shape {tuple(t.shape)}")
        for idx, sub in subs:
            ident = (sub.untyped_storage().data_ptr(), sub.storage_offset(), tuple(sub.shape), tuple(sub.stride()))
            if ident in seen:  # KV-sharing layers alias another layer's cache
                continue
            seen.add(ident)
            raw, nbytes = _byte_view(sub, num_blocks)
            parts.append(Part(name, idx, raw, nbytes))
    if not parts:
        raise ValueError("no KV cache tensors")
    return parts


def slot_runs(slots: list[int], start: int, stop: int):
    """(row, slot, length) runs of consecutive slots among rows [start, stop)."""
    i = start
    while i < stop:
        j = i + 1
        while j < stop and slots[j] == slots[j - 1] + 1:
            j += 1
        yield i - start, slots[i], j - i
        i = j


class BlockPool:
    """The CPU tier's memory on one worker, and the copies between it and the device pages.

    Slot-major: `flat[slot]` is one block's whole payload (part after part), so a slot is one contiguous
    host<->device copy however fragmented the free slots become, and one contiguous record for disk/Redis."""

    def __init__(self, parts: list[Part], num_slots: int, *, pin: bool = True, staging_bytes: int = 256 << 20):
        self.parts = parts
        self.num_slots = num_slots
        self.part_bytes = [p.nbytes for p in parts]
        self.block_bytes = sum(self.part_bytes)
        self.offsets = [sum(self.part_bytes[:i]) for i in range(len(parts))]
        self.device = parts[0].raw.device
        self.cuda = self.device.type == "cuda"
        pin = bool(pin and self.cuda)
        self.flat = torch.empty(num_slots, self.block_bytes, dtype=torch.uint8, pin_memory=pin)
        self.pool = [self.flat[:, o:o + nb] for o, nb in zip(self.offsets, self.part_bytes)]  # per-part views
        self.flat_np = self.flat.numpy()
        self.slot_keys: list[bytes | None] = [None] * num_slots  # what each slot really holds on this worker
        self.pinned = pin
        if self.cuda:
            self.stream = torch.cuda.Stream(device=self.device)
            nbuf = max(staging_bytes, self.block_bytes)
            self.rows_per_chunk = max(1, nbuf // self.block_bytes)
            self.staging = [torch.empty(self.rows_per_chunk, self.block_bytes, dtype=torch.uint8, device=self.device)
                            for _ in range(2)]
            self._buf_evt: list = [None, None]
            self._pending = None  # last event of the connector stream (covers every host<->device copy so far)
            self._turn = 0

    # ------------------------------------------------------------------ CPU-side access to slots
    def slot_views(self, slot: int) -> list:
        """The payload of one slot as a list of writable numpy buffers (one contiguous buffer here)."""
        return [self.flat_np[slot]]

    def sync(self) -> None:
        """Waits for every asynchronous copy that reads or writes the pool."""
        if self.cuda and self._pending is not None:
            self._pending.synchronize()
            self._pending = None

    # ------------------------------------------------------------------ device <-> pool
    def save(self, block_ids: list[int], slots: list[int]) -> None:
        """Copies device blocks into pool slots (asynchronous on CUDA: call sync() before the CPU reads them)."""
        if not block_ids:
            return
        if not self.cuda:
            ids = torch.tensor(block_ids, dtype=torch.long, device=self.device)
            sl = torch.tensor(slots, dtype=torch.long)
            for part, pool in zip(self.parts, self.pool):
                pool.index_copy_(0, sl, part.raw.index_select(0, ids).to("cpu"))
            return
        cur = torch.cuda.current_stream(self.device)
        ids = torch.tensor(block_ids, dtype=torch.long).to(self.device, non_blocking=True)
        for c0 in range(0, len(block_ids), self.rows_per_chunk):
            c1 = min(c0 + self.rows_per_chunk, len(block_ids))
            n = c1 - c0
            b = self._turn
            self._turn ^= 1
            st = self.staging[b][:n]
            if self._buf_evt[b] is not None:
                cur.wait_event(self._buf_evt[b])
            for part, o in zip(self.parts, self.offsets):  # gather on the compute stream, right after the forward
                st[:, o:o + part.nbytes].copy_(part.raw.index_select(0, ids[c0:c1]))
            gathered = cur.record_event()
            self.stream.wait_event(gathered)
            with torch.cuda.stream(self.stream):
                for row, slot, length in slot_runs(slots, c0, c1):
                    self.flat[slot:slot + length].copy_(st[row:row + length], non_blocking=True)
                done = self.stream.record_event()
            self._buf_evt[b] = done
            self._pending = done

    def load(self, slots: list[int], block_ids: list[int]) -> None:
        """Copies pool slots into device blocks, ordered before whatever the compute stream runs next."""
        if not block_ids:
            return
        if not self.cuda:
            ids = torch.tensor(block_ids, dtype=torch.long, device=self.device)
            sl = torch.tensor(slots, dtype=torch.long)
            for part, pool in zip(self.parts, self.pool):
                part.raw.index_copy_(0, ids, pool.index_select(0, sl).to(self.device))
            return
        cur = torch.cuda.current_stream(self.device)
        ids = torch.tensor(block_ids, dtype=torch.long).to(self.device, non_blocking=True)
        for c0 in range(0, len(block_ids), self.rows_per_chunk):
            c1 = min(c0 + self.rows_per_chunk, len(block_ids))
            n = c1 - c0
            b = self._turn
            self._turn ^= 1
            st = self.staging[b][:n]
            if self._buf_evt[b] is not None:
                self.stream.wait_event(self._buf_evt[b])
            with torch.cuda.stream(self.stream):
                for row, slot, length in slot_runs(slots, c0, c1):
                    st[row:row + length].copy_(self.flat[slot:slot + length], non_blocking=True)
                copied = self.stream.record_event()
            self._pending = copied
            cur.wait_event(copied)
            for part, o in zip(self.parts, self.offsets):
                part.raw.index_copy_(0, ids[c0:c1], st[:, o:o + part.nbytes])
            self._buf_evt[b] = cur.record_event()
