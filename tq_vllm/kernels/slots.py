"""Staging-slot planning of one step in one program (the semantics of `quant.plan.plan_slots_torch`, which is the
reference): one launch instead of ~100 small torch kernels, so the planner adds a few microseconds per step.

Rows r < R (RP lanes), slots s < S (SP lanes). Global scratch of the table: TOUCH [SP] int32 (slots looked up in
this step), KEYS [SP] int64 (eviction order), ORDER [SP] int32 (slots by rank).
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit(do_not_specialize=["R", "maxb", "base"])
def _tq_plan_slots_kernel(QSL, SEQ, BT, s_bt, maxb, SLOT_BLOCK, SLOT_STAMP, BLOCK_SLOT, ERR, TOUCH, KEYS, ORDER,
                          CS_OUT, OS_OUT, R, base, S: tl.constexpr, NB: tl.constexpr, B: tl.constexpr,
                          RP: tl.constexpr, SP: tl.constexpr, CH: tl.constexpr, CAPTURE: tl.constexpr,
                          STAMP_BITS: tl.constexpr, SLOT_BITS: tl.constexpr):
    r = tl.arange(0, RP)
    m = r < R
    q0 = tl.load(QSL + r, mask=m, other=0).to(tl.int64)
    q1 = tl.load(QSL + r + 1, mask=m, other=0).to(tl.int64)
    L = tl.load(SEQ + r, mask=m, other=0).to(tl.int64)
    c = L - (q1 - q0)
    need_ctx = m & (c % B != 0)
    need_open = m & (L % B != 0)
    row = BT + r.to(tl.int64) * s_bt
    colc = tl.minimum(tl.maximum(c // B, 0), maxb - 1)
    colo = tl.minimum(tl.maximum(L // B, 0), maxb - 1)
    ctx_id = tl.where(need_ctx, tl.load(row + colc, mask=need_ctx, other=0).to(tl.int64), -1)
    open_id = tl.where(need_open, tl.load(row + colo, mask=need_open, other=0).to(tl.int64), -1)
    scratch = (ctx_id == 0) | (open_id == 0) | (ctx_id >= NB) | (open_id >= NB) | (ctx_id < -1) | (open_id < -1)
    if CAPTURE:
        scratch = m | scratch
    live = m & (scratch == 0)
    look = need_ctx & live
    cs = tl.load(BLOCK_SLOT + tl.minimum(tl.maximum(ctx_id, 0), NB), mask=look, other=-1).to(tl.int64)
    okc = look & (cs >= 0) & (cs < S)
    owner = tl.load(SLOT_BLOCK + tl.where(okc, cs, 0), mask=okc, other=-2).to(tl.int64)
    valid = okc & (owner == ctx_id)
    evicted = look & (valid == 0)
    # slots looked up in this step
    s = tl.arange(0, SP)
    tl.store(TOUCH + s, tl.zeros([SP], dtype=tl.int32))
    tl.debug_barrier()
    tl.store(TOUCH + cs, tl.full([RP], 1, tl.int32), mask=valid)
    tl.debug_barrier()
    touched = tl.load(TOUCH + s) != 0
    # eviction order of the untouched slots: free first (by index), then least recently touched
    sv = s < S
    occ = (tl.load(SLOT_BLOCK + s, mask=sv, other=-1) >= 0).to(tl.int64)
    stamp = tl.load(SLOT_STAMP + s, mask=sv, other=0)
    big = 0x7FFFFFFFFFFFFFFF
    key = (((occ << STAMP_BITS) | stamp) << SLOT_BITS) | s.to(tl.int64)
    key = tl.where(sv & (touched == 0), key, big)
    tl.store(KEYS + s, key)
    tl.debug_barrier()
    rank = tl.zeros([SP], dtype=tl.int32)
    for j0 in range(0, SP, CH):
        kj = tl.load(KEYS + j0 + tl.arange(0, CH))
        rank += tl.sum((kj[None, :] < key[:, None]).to(tl.int32), axis=1)
    elig = key != big
    tl.store(ORDER + rank, s, mask=elig)
    n_elig = tl.sum(elig.to(tl.int32), axis=0)
    tl.debug_barrier()
    fresh = need_open & live & (need_ctx == 0)
    k = tl.cumsum(fresh.to(tl.int32), axis=0) - 1
    avail = fresh & (k < n_elig)
    fresh_slot = tl.load(ORDER + tl.where(avail, k, 0), mask=avail, other=0).to(tl.int64)
    nospace = fresh & (avail == 0)
    same = need_ctx & (c // B == L // B)
    spare = S
    ctx_out = tl.where(need_ctx, tl.where(valid, cs, spare), -1)
    open_live = tl.where(need_ctx, tl.where(valid, cs, spare), tl.where(avail, fresh_slot, spare))
    open_out = tl.where(need_open, tl.where(scratch, spare, open_live), -1)
    tl.store(CS_OUT + r, ctx_out.to(tl.int32), mask=m)
    tl.store(OS_OUT + r, open_out.to(tl.int32), mask=m)
    # state: new owners, freed slots, recency (row order within the step)
    assign = need_open & live & ((need_ctx & valid & (same == 0)) | avail)
    a_slot = tl.where(assign, open_out, 0)
    tl.store(SLOT_BLOCK + a_slot, open_id.to(tl.int32), mask=assign)
    tl.store(BLOCK_SLOT + tl.where(assign, open_id, 0), open_out.to(tl.int32), mask=assign)
    freed = valid & (need_open == 0)
    tl.store(SLOT_BLOCK + tl.where(freed, cs, 0), tl.full([RP], -1, tl.int32), mask=freed)
    t_mask = assign | (valid & need_open)
    t_slot = tl.where(assign, open_out, cs)
    tl.store(SLOT_STAMP + tl.where(t_mask, t_slot, 0), base + r.to(tl.int64), mask=t_mask)
    tl.store(SLOT_STAMP + tl.where(freed, cs, 0), tl.zeros([RP], dtype=tl.int64), mask=freed)
    flags = tl.max(evicted.to(tl.int32), axis=0) | (tl.max(nospace.to(tl.int32), axis=0) << 1)
    tl.store(ERR, tl.load(ERR) | flags)
