"""Torch reference of the paged ops: the oracle for the Triton kernels and the CPU execution path in vLLM.

Per layer and step (see docs/design.md and plan.py):
    store_full_blocks(...)  quantize every block completed in this step into its page
    attention(...)          causal attention, earlier blocks from pages, the query's own block exact
    write_staging(...)      copy the tokens of each row's open block into its staging slot (after attention)

Shapes: T tokens of the step, Hq query heads, H KV heads, D head_dim, B block_size.
    query [T, Hq, D], key/value [T, H, D], kv_cache uint8 [num_blocks, H, B, C], staging [S, 2, B, H, D],
    sink = (sink_kv [N, 2, H, D], sink_tag [N, H] int64) from codec.new_sink_table (None: token 0 stays coded).
"""
from __future__ import annotations

import torch

from .codec import LayerCodec
from .plan import StepPlan


def _gather_block_tokens(plan: StepPlan, staging, x, kv: int, row: int, blk: int) -> torch.Tensor:
    """Exact `[B, H, D]` of block `blk` of `row` from staging (positions < ctx) and the step input (the rest)."""
    B = plan.block_size
    c = int(plan.ctx_lens[row])
    qs = int(plan.query_start_loc[row])
    start = blk * B
    parts = []
    if start < c:
        slot = int(plan.ctx_slot[row])
        n_old = c - start
        parts.append(staging[slot, kv, :n_old].to(torch.float32))
        parts.append(x[qs:qs + B - n_old].to(torch.float32))
    else:
        t0 = qs + start - c
        parts.append(x[t0:t0 + B].to(torch.float32))
    return torch.cat(parts, 0)


def store_full_blocks(codec: LayerCodec, kv_cache: torch.Tensor, staging: torch.Tensor, key: torch.Tensor,
                      value: torch.Tensor, plan: StepPlan, sink=None, defer_sink: bool = False):
    """Quantize the blocks completed in this step (`plan.qb_row/qb_idx`) into their pages; the first block of a
    sequence also records its exact token 0 in the sink table `sink` = (kv [N, 2, H, D], tags [N, H]), at once or
    (`defer_sink`) through the returned pending entries and `commit_sink`."""
    M = plan.qb_row.numel()
    if M == 0:
        return None
    rows, idxs = plan.qb_row.tolist(), plan.qb_idx.tolist()
    kb = torch.stack([_gather_block_tokens(plan, staging, key, 0, r, b) for r, b in zip(rows, idxs)])
    vb = torch.stack([_gather_block_tokens(plan, staging, value, 1, r, b) for r, b in zip(rows, idxs)])
    block_ids = plan.block_table[plan.qb_row.long(), plan.qb_idx.long()]
    first = plan.qb_idx == 0
    fields = codec.encode_blocks(kb, vb, first)
    codec.write_pages(kv_cache, block_ids, fields)
    if sink is not None and codec.preset.sink and bool(first.any()):
        f = first.to(kb.device)
        tags = fields["sink_tag"].reshape(M, -1, 8).contiguous().view(torch.int64).squeeze(-1)[f]  # [M0, H]
        pending = (tags, kb[f, 0], vb[f, 0])
        if defer_sink:
            return pending
        commit_sink(sink, pending)
    return None


def commit_sink(sink, pending) -> None:
    """Write `store_full_blocks`' pending entries (tags [M0, H], k0, v0 [M0, H, D]) into the sink table, in list
    order: of first blocks sharing a table entry the last wins, K/V and tag alike."""
    if pending is None:
        return
    sink_kv, sink_tag = sink
    tags, k0, v0 = pending
    slots = tags % sink_tag.shape[0]
    heads = torch.arange(tags.shape[1], device=tags.device)
    for i in range(tags.shape[0]):
        sink_kv[slots[i], 0, heads] = k0[i].to(sink_kv.dtype)
        sink_kv[slots[i], 1, heads] = v0[i].to(sink_kv.dtype)
        sink_tag[slots[i], heads] = tags[i]


def write_staging(staging: torch.Tensor, key: torch.Tensor, value: torch.Tensor, plan: StepPlan) -> None:
    """Copy the exact K/V of every row's open block (positions max(ctx, seq//B*B) .. seq-1) to its slot."""
    B = plan.block_size
    for r in range(plan.num_rows):
        slot = int(plan.open_slot[r])
        if slot < 0:
            continue
        c, L, qs = int(plan.ctx_lens[r]), int(plan.seq_lens[r]), int(plan.query_start_loc[r])
        p0 = max(c, (L // B) * B)
        t0, t1 = qs + p0 - c, qs + L - c
        staging[slot, 0, p0 % B:p0 % B + (L - p0)] = key[t0:t1].to(staging.dtype)
        staging[slot, 1, p0 % B:p0 % B + (L - p0)] = value[t0:t1].to(staging.dtype)


def sink_lookup(codec: LayerCodec, kv_cache, block_ids, sink):
    """For pages `block_ids` [N] that start a sequence: (valid [N, H] bool, k0 [N, H, D], v0 [N, H, D] float32)
    of the exact token 0 in the sink table, valid where the page's tag matches the table's entry."""
    sink_kv, sink_tag = sink
    tags = codec.read_sink_tags(kv_cache, block_ids)  # [N, H]
    slots = tags % sink_tag.shape[0]
    heads = torch.arange(tags.shape[1], device=tags.device).expand_as(tags)
    valid = (tags != 0) & (sink_tag[slots, heads] == tags)
    return valid, sink_kv[slots, 0, heads].to(torch.float32), sink_kv[slots, 1, heads].to(torch.float32)


def attention(codec: LayerCodec, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              kv_cache: torch.Tensor, staging: torch.Tensor, plan: StepPlan, scale: float,
              rotated: bool = True, sink=None) -> torch.Tensor:
    """Causal attention of the step's queries with decode semantics; returns float32 `[T, Hq, D]`.
    Token 0 of a quantized first block is read exact from the sink table `sink` when its tag matches.

    `rotated=True` scores the rotated query against rotated-domain pages and rotates each output once;
    `rotated=False` dequantizes pages to the original domain first (the two must agree to float tolerance).
    """
    B = plan.block_size
    T, Hq, D = query.shape
    H = key.shape[1]
    G = Hq // H
    out = torch.zeros(T, Hq, D, dtype=torch.float32, device=query.device)
    for r in range(plan.num_rows):
        c, L, qs = int(plan.ctx_lens[r]), int(plan.seq_lens[r]), int(plan.query_start_loc[r])
        nq = L - c
        if nq <= 0:
            continue
        e0 = (c // B) * B  # first position that may be needed exact
        n_qblocks = (L - 1) // B  # blocks before the last query's own block are all in pages
        q = query[qs:qs + nq].to(torch.float32)  # [nq, Hq, D]
        # exact keys/values of positions e0 .. L-1
        xs_k, xs_v = [], []
        if e0 < c:
            slot = int(plan.ctx_slot[r])
            xs_k.append(staging[slot, 0, :c - e0].to(torch.float32))
            xs_v.append(staging[slot, 1, :c - e0].to(torch.float32))
        xs_k.append(key[qs:qs + nq].to(torch.float32))
        xs_v.append(value[qs:qs + nq].to(torch.float32))
        kx, vx = torch.cat(xs_k), torch.cat(xs_v)  # [L - e0, H, D]
        if n_qblocks:
            ids = plan.block_table[r, :n_qblocks]
            kq, vq = codec.dequantize_pages(kv_cache, ids, rotated=rotated)  # [n, B, H, D]
            if sink is not None and codec.preset.sink:
                valid, k0, v0 = sink_lookup(codec, kv_cache, ids[:1], sink)
                if rotated:
                    k0, v0 = codec.rotate(k0), codec.rotate(v0)
                kq[0, 0] = torch.where(valid[0, :, None], k0[0], kq[0, 0])
                vq[0, 0] = torch.where(valid[0, :, None], v0[0], vq[0, 0])
            kq, vq = kq.reshape(-1, H, D), vq.reshape(-1, H, D)
        else:
            kq = vq = torch.zeros(0, H, D, device=query.device)
        if rotated:
            q, kx, vx = codec.rotate(q), codec.rotate(kx), codec.rotate(vx)
        kq, vq, kx, vx = (t.repeat_interleave(G, dim=1) for t in (kq, vq, kx, vx))  # -> Hq heads
        pos = torch.arange(c, L, device=query.device)  # query positions
        own = (pos // B) * B
        jq = torch.arange(kq.shape[0], device=query.device)
        jx = torch.arange(e0, L, device=query.device)
        mask = torch.cat([jq[None, :] < own[:, None],
                          (jx[None, :] >= own[:, None]) & (jx[None, :] <= pos[:, None])], 1)  # [nq, Nk]
        k_all, v_all = torch.cat([kq, kx]), torch.cat([vq, vx])  # [Nk, Hq, D]
        s = torch.einsum("qhd,khd->hqk", q, k_all) * scale
        s = s.masked_fill(~mask[None], float("-inf"))
        p = torch.softmax(s, dim=-1)
        o = torch.einsum("hqk,khd->qhd", p, v_all)
        out[qs:qs + nq] = codec.unrotate(o) if rotated else o
    return out


def forward_step(codec: LayerCodec, query, key, value, kv_cache, staging, plan: StepPlan, scale: float,
                 rotated: bool = True, sink=None, defer_sink: bool = False) -> torch.Tensor:
    """One layer's whole step in the reference order: store, attend, stage. `defer_sink`: the sink-table writes
    of the store after the attention (the order of the kernels' store beside the attention)."""
    pending = store_full_blocks(codec, kv_cache, staging, key, value, plan, sink, defer_sink)
    out = attention(codec, query, key, value, kv_cache, staging, plan, scale, rotated, sink)
    write_staging(staging, key, value, plan)
    commit_sink(sink, pending)
    return out
