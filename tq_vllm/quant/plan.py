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


def plan_rows(ctx_lens, seq_lens, block_size: int, ctx_block_ids, open_block_ids, alloc: StagingAllocator):
    """Host part of planning (python ints). `ctx_block_ids[r]`: block id at index ctx//B (or -1 if ctx % B == 0);
    `open_block_ids[r]`: block id at index seq//B (or -1 if seq % B == 0).
    Returns (ctx_slot, open_slot, qb_row, qb_idx) as python lists."""
    B = block_size
    alloc.begin_step()
    ctx_slot, open_slot, qb_row, qb_idx = [], [], [], []
    for r, (c, L) in enumerate(zip(ctx_lens, seq_lens)):
        c, L = int(c), int(L)
        cs = alloc.lookup(int(ctx_block_ids[r])) if c % B else -1
        ctx_slot.append(cs)
        first_full = c // B  # the block holding position c
        for b in range(first_full, L // B):
            qb_row.append(r)
            qb_idx.append(b)
        if L % B:
            ob = int(open_block_ids[r])
            if c % B and c // B == L // B:
                os_ = cs  # the same block stays open
            else:
                os_ = alloc.assign(ob, reuse_slot=cs if c % B else None)
            open_slot.append(os_)
        else:
            open_slot.append(-1)
    return ctx_slot, open_slot, qb_row, qb_idx


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
