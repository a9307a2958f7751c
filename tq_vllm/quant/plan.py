"""Per-step plan: which blocks get quantized, which staging slots hold the open blocks.

The host knows, per request row r of a step: `ctx[r]` tokens already cached, `seq[r]` = ctx + new tokens, and the
block ids of the block that was open before the step (`ctx // B`) and of the block left open after it (`seq // B`).
`StagingAllocator` keeps open blocks' exact K/V slots across steps; `make_step_plan` turns a step into the device
tensors that the store / attention ops (torch reference and Triton) read. See docs/design.md.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch


class StagingEvictedError(RuntimeError):
    pass


class StagingAllocator:
    """Maps open block ids -> staging slots, LRU-reusing slots of blocks that completed or whose request ended.

    Slots of completed blocks stay mapped (so a speculative-decoding rollback can re-open the block) until the
    slot is needed again. A slot touched in the current step is never taken in that step.
    """

    def __init__(self, num_slots: int):
        self.num_slots = int(num_slots)
        self.block_to_slot: dict[int, int] = {}
        self.slot_to_block: dict[int, int] = {}
        self.lru: OrderedDict[int, None] = OrderedDict((s, None) for s in range(self.num_slots))  # old -> new
        self.step = 0
        self._touched: set[int] = set()

    def begin_step(self):
        self.step += 1
        self._touched = set()

    def _touch(self, slot: int):
        self.lru.move_to_end(slot)
        self._touched.add(slot)

    def lookup(self, block_id: int) -> int:
        slot = self.block_to_slot.get(block_id)
        if slot is None:
            raise StagingEvictedError(
                f"tq_vllm: the exact staging of open block {block_id} is gone (evicted or never written); "
                f"raise additional_config tq_vllm.staging_slots (now {self.num_slots}) above max_num_seqs")
        self._touch(slot)
        return slot

    def assign(self, block_id: int, reuse_slot: int | None = None) -> int:
        """Give `block_id` a slot: `reuse_slot` if given (the slot of a block completed in this step by the same
        request), else the least recently used slot not touched in this step."""
        old = self.block_to_slot.pop(block_id, None)
        if old is not None:
            self.slot_to_block.pop(old, None)
        if reuse_slot is not None:
            slot = reuse_slot
        elif old is not None and old not in self._touched:
            slot = old
        else:
            slot = next((s for s in self.lru if s not in self._touched), None)
            if slot is None:
                raise StagingEvictedError(
                    f"tq_vllm: all {self.num_slots} staging slots are in use in one step; raise additional_config "
                    f"tq_vllm.staging_slots above max_num_seqs")
        prev = self.slot_to_block.pop(slot, None)
        if prev is not None:
            self.block_to_slot.pop(prev, None)
        self.block_to_slot[block_id] = slot
        self.slot_to_block[slot] = block_id
        self._touch(slot)
        return slot


@dataclass
class StepPlan:
    """Device tensors of one step (R rows, M blocks to quantize). Rows follow the batch order.

    query_start_loc [R+1] int32, seq_lens [R] int32, ctx_lens [R] int32,
    ctx_slot [R] int32   staging slot of block ctx//B when ctx % B != 0, else -1 (read by store and attention),
    open_slot [R] int32  slot receiving the tokens of block seq//B when seq % B != 0, else -1 (written last),
    qb_row [M] int32, qb_idx [M] int32   blocks completed in this step: row and block index within the row,
    block_table [R, max_blocks] int32.
    """

    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    ctx_lens: torch.Tensor
    ctx_slot: torch.Tensor
    open_slot: torch.Tensor
    qb_row: torch.Tensor
    qb_idx: torch.Tensor
    block_table: torch.Tensor
    block_size: int
    num_tokens: int
    max_query_len: int
    max_seq_len: int

    @property
    def num_rows(self) -> int:
        return self.seq_lens.shape[0]


def completed_blocks(ctx_lens, seq_lens, block_size: int) -> tuple[list[int], list[int]]:
    """(qb_row, qb_idx): every block that becomes full in this step, as (row, block index within the row)."""
    qb_row, qb_idx = [], []
    for r, (c, L) in enumerate(zip(ctx_lens, seq_lens)):
        for b in range(int(c) // block_size, int(L) // block_size):
            qb_row.append(r)
            qb_idx.append(b)
    return qb_row, qb_idx


def plan_rows(ctx_lens, seq_lens, block_size: int, ctx_block_ids, open_block_ids, alloc: StagingAllocator):
    """Host part of planning (python ints). `ctx_block_ids[r]`: block id at index ctx//B (or -1 if ctx % B == 0);
    `open_block_ids[r]`: block id at index seq//B (or -1 if seq % B == 0).
    Returns (ctx_slot, open_slot, qb_row, qb_idx) as python lists."""
    B = block_size
    alloc.begin_step()
    ctx_slot, open_slot = [], []
    for r, (c, L) in enumerate(zip(ctx_lens, seq_lens)):
        c, L = int(c), int(L)
        cs = alloc.lookup(int(ctx_block_ids[r])) if c % B else -1
        ctx_slot.append(cs)
        if L % B:
            ob = int(open_block_ids[r])
            if c % B and c // B == L // B:
                os_ = cs  # the same block stays open
            else:
                os_ = alloc.assign(ob, reuse_slot=cs if c % B else None)
            open_slot.append(os_)
        else:
            open_slot.append(-1)
    return (ctx_slot, open_slot, *completed_blocks(ctx_lens, seq_lens, B))


def make_step_plan(query_start_loc, seq_lens, block_table, block_size: int, alloc: StagingAllocator,
                   device=None) -> StepPlan:
    """Plan a step from host tensors (query_start_loc [R+1], seq_lens [R], block_table [R, max_blocks]).
    Used by the CPU path and the tests; the GPU builder calls `plan_rows` with its own host data."""
    qsl = torch.as_tensor(query_start_loc).to(torch.int64).cpu()
    seq = torch.as_tensor(seq_lens).to(torch.int64).cpu()
    bt = torch.as_tensor(block_table).cpu()
    qlen = qsl[1:] - qsl[:-1]
    ctx = seq - qlen
    B = block_size
    R = seq.shape[0]
    rows = torch.arange(R)
    ctx_ids = torch.where(ctx % B != 0, bt[rows, (ctx // B).clamp(max=bt.shape[1] - 1)], -1)
    open_ids = torch.where(seq % B != 0, bt[rows, (seq // B).clamp(max=bt.shape[1] - 1)], -1)
    cs, os_, qr, qi = plan_rows(ctx.tolist(), seq.tolist(), B, ctx_ids.tolist(), open_ids.tolist(), alloc)
    dev = device if device is not None else torch.as_tensor(block_table).device
    i32 = lambda v: torch.tensor(v, dtype=torch.int32, device=dev)  # noqa: E731
    return StepPlan(query_start_loc=qsl.to(dev, torch.int32), seq_lens=seq.to(dev, torch.int32),
                    ctx_lens=ctx.to(dev, torch.int32), ctx_slot=i32(cs), open_slot=i32(os_), qb_row=i32(qr),
                    qb_idx=i32(qi), block_table=torch.as_tensor(block_table).to(dev, torch.int32),
                    block_size=B, num_tokens=int(qsl[-1]), max_query_len=int(qlen.max()) if R else 0,
                    max_seq_len=int(seq.max()) if R else 0)


class SlotTable:
    """The open block -> staging slot map kept on the device, so that planning a step needs no device -> host copy.

    vLLM's GPU model runners keep block tables on the device only; reading the ids of each row's open blocks back
    to the host would stall the CPU until the previous step has finished and lose the overlap of async scheduling
    (measured on an H200: 2 ms of idle GPU per step). `plan_slots` does the slot planning with device tensor ops
    from the device's seq_lens and block table instead. Semantics (per step, rows in batch order):
      * row r continues the block that holds position ctx-1 when ctx % B != 0: its slot is looked up
        (block_slot[id], valid while slot_block[slot] == id); a missing slot sets error bit 1;
      * the block left open at seq (seq % B != 0) keeps that slot when it is the same block or when the looked-up
        block completes in this step; otherwise it takes a fresh slot: free slots first (lowest index), then the
        least recently touched slot not touched in this step (stale slots of finished requests); none left sets
        error bit 2 (impossible with num_slots > max_num_seqs);
      * a slot whose block completes without a successor becomes free;
      * rows whose block ids are the null block 0 (vLLM's dummy and warm-up batches), and every row of a capture
        batch, use the spare slot `num_slots` and change nothing.
    State (device): slot_block [S+1] int32, slot_stamp [S+1] int64, block_slot [NB+1] int32, err [1] int32; the last
    entry of each table absorbs masked writes. The error is read by the host one step later (`check`)."""

    STAMP_BITS = 50
    SLOT_BITS = 12  # slots < 4096

    def __init__(self, num_slots: int, num_blocks: int, device):
        if num_slots >= (1 << self.SLOT_BITS):
            raise ValueError(f"SlotTable: {num_slots} staging slots exceed {(1 << self.SLOT_BITS) - 1}")
        self.num_slots, self.num_blocks = int(num_slots), int(num_blocks)
        dev = torch.device(device)
        self.slot_block = torch.full((self.num_slots + 1,), -1, dtype=torch.int32, device=dev)
        self.slot_stamp = torch.zeros(self.num_slots + 1, dtype=torch.int64, device=dev)
        self.block_slot = torch.full((self.num_blocks + 1,), -1, dtype=torch.int32, device=dev)
        self.err = torch.zeros(1, dtype=torch.int32, device=dev)
        sp = 1 << max(0, (self.num_slots - 1).bit_length())
        self.scratch = (torch.zeros(sp, dtype=torch.int32, device=dev), torch.zeros(sp, dtype=torch.int64, device=dev),
                        torch.zeros(sp, dtype=torch.int32, device=dev))  # the Triton planner's TOUCH, KEYS, ORDER
        self.step = 0
        self._err_host = torch.zeros(1, dtype=torch.int32, pin_memory=dev.type == "cuda")
        self._err_event = None

    @property
    def stamp_base(self) -> int:
        """Recency stamp of row 0 in the current step: stamps grow across steps and in row order within one
        (rows < 65536)."""
        return self.step << 16

    def plan(self, query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_table: torch.Tensor,
             block_size: int, capture: bool = False):
        """(ctx_slot [R], open_slot [R]) int32 on the device for the rows of query_start_loc [R+1], seq_lens [R],
        block_table [R, max_blocks] (device tensors; no host sync). The torch implementation; `tq_vllm.kernels.
        plan_slots` runs the same planning as one Triton program on CUDA."""
        self.step += 1
        return plan_slots_torch(self, query_start_loc, seq_lens, block_table, block_size, capture)

    def record_error(self) -> None:
        """Queue the error word's copy to the host (read by `check` at a later step, without waiting)."""
        if self.err.device.type != "cuda":
            self._err_host.copy_(self.err)
            return
        self._err_host.copy_(self.err, non_blocking=True)
        ev = torch.cuda.Event()
        ev.record()
        self._err_event = ev

    def check(self) -> None:
        """Raise StagingEvictedError if an earlier step's planning found a missing slot."""
        if self._err_event is not None and not self._err_event.query():
            return
        e = int(self._err_host[0])
        if e:
            what = ("the exact staging of an open block was reused for another block" if e & 1 else
                    "no staging slot was left for a new open block")
            raise StagingEvictedError(
                f"tq_vllm: {what} (device slot planner, error {e}); raise additional_config tq_vllm.staging_slots "
                f"(now {self.num_slots}) above max_num_seqs, or set TQ_VLLM_SLOT_PLANNER=host")


def plan_slots_torch(tab: SlotTable, query_start_loc, seq_lens, block_table, B: int, capture: bool = False):
    """Reference (and the implementation) of SlotTable.plan: device tensor ops only, no data-dependent host code."""
    R = seq_lens.shape[0]
    dev = tab.slot_block.device
    S, NB = tab.num_slots, tab.num_blocks
    i64 = torch.int64
    qsl = query_start_loc[:R + 1].to(i64)
    L = seq_lens[:R].to(i64)
    c = L - (qsl[1:] - qsl[:-1])
    need_ctx = (c % B) != 0
    need_open = (L % B) != 0
    bt = block_table[:R]
    if bt.shape[1] == 0:
        bt = torch.zeros(R, 1, dtype=block_table.dtype, device=dev)

    def ids(pos, need):
        col = torch.div(pos, B, rounding_mode="floor").clamp(0, bt.shape[1] - 1)
        v = bt.gather(1, col.view(-1, 1)).view(-1).to(i64)
        return torch.where(need, v, torch.full_like(v, -1))

    ctx_id = ids(c, need_ctx)
    open_id = ids(L, need_open)
    scratch = (ctx_id == 0) | (open_id == 0) | (ctx_id >= NB) | (open_id >= NB) | (ctx_id < -1) | (open_id < -1)
    if capture:
        scratch = torch.ones_like(scratch)
    live = ~scratch
    cs = tab.block_slot[ctx_id.clamp(0, NB)].to(i64)
    owner = tab.slot_block[cs.clamp(0, S)].to(i64)
    valid = need_ctx & live & (cs >= 0) & (cs < S) & (owner == ctx_id)
    evicted = need_ctx & live & ~valid
    sink_s = torch.full_like(cs, S)
    touched = torch.zeros(S + 1, dtype=torch.bool, device=dev)
    touched.scatter_(0, torch.where(valid, cs, sink_s), torch.ones_like(valid))
    fresh = need_open & live & ~need_ctx
    k = torch.cumsum(fresh.to(i64), 0) - 1
    slots = torch.arange(S, device=dev, dtype=i64)
    occ = (tab.slot_block[:S] >= 0).to(i64)
    key = (((occ << tab.STAMP_BITS) | tab.slot_stamp[:S]) << tab.SLOT_BITS) | slots
    inf = torch.iinfo(i64).max
    key = torch.where(touched[:S], torch.full_like(key, inf), key)
    ordered = torch.sort(key).values if S else key
    pick = ordered[k.clamp(0, max(S - 1, 0))] if S else torch.full_like(k, inf)
    avail = fresh & (k < S) & (pick != inf)
    fresh_slot = pick & ((1 << tab.SLOT_BITS) - 1)
    nospace = fresh & ~avail
    same = need_ctx & (torch.div(c, B, rounding_mode="floor") == torch.div(L, B, rounding_mode="floor"))
    ctx_out = torch.where(need_ctx, torch.where(valid, cs, sink_s), torch.full_like(cs, -1))
    open_live = torch.where(need_ctx, torch.where(valid, cs, sink_s), torch.where(avail, fresh_slot, sink_s))
    open_out = torch.where(need_open, torch.where(scratch, sink_s, open_live), torch.full_like(cs, -1))
    # state: new owners, freed slots, recency (row order within the step)
    assign = need_open & live & ((need_ctx & valid & ~same) | avail)
    a_slot = torch.where(assign, open_out, sink_s)
    tab.slot_block.scatter_(0, a_slot, open_id.to(torch.int32))
    tab.block_slot.scatter_(0, torch.where(assign, open_id, torch.full_like(open_id, NB)), open_out.to(torch.int32))
    freed = valid & ~need_open
    tab.slot_block.scatter_(0, torch.where(freed, cs, sink_s), torch.full_like(cs, -1, dtype=torch.int32))
    stamp = tab.stamp_base + torch.arange(R, device=dev, dtype=i64)
    t_slot = torch.where(assign, open_out, torch.where(valid & need_open, cs, sink_s))
    tab.slot_stamp.scatter_(0, t_slot, stamp)
    tab.slot_stamp.scatter_(0, torch.where(freed, cs, sink_s), torch.zeros_like(stamp))
    tab.err.bitwise_or_((evicted.any().to(torch.int32)) | (nospace.any().to(torch.int32) << 1))
    return ctx_out.to(torch.int32), open_out.to(torch.int32)
