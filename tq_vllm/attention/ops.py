"""The per-layer step ops the backend calls: one indirection so the kernels can be swapped in by one line.

`forward_step` goes to `tq_vllm.kernels.forward_step` when that module exists (Triton on CUDA, the torch
reference elsewhere, by its own dispatch) and to `tq_vllm.quant.reference.forward_step` otherwise.
`exact_forward` serves the optional exact ("bf16") boundary layers.
"""
from __future__ import annotations

import functools
import logging

import torch

logger = logging.getLogger("vllm.tq_vllm")


@functools.lru_cache(maxsize=None)
def _resolve():
    """(module or None, name). THE one line to change if the kernels' entry point moves."""
    try:
        import tq_vllm.kernels as k
        if hasattr(k, "forward_step"):
            return k, "tq_vllm.kernels.forward_step"
    except ImportError:
        pass
    return None, "tq_vllm.quant.reference.forward_step"


def forward_step_name() -> str:
    return _resolve()[1]


def kernels_graph_safe() -> bool:
    """Whether the kernels' CUDA path may be captured in a FULL CUDA graph: their launches are host-sync free once
    given a `KernelMeta` (`tq_vllm.kernels.prepare`) and accept -1 padding in StepPlan.qb_row. They may opt out
    with `tq_vllm.kernels.CUDA_GRAPH_SAFE = False`."""
    k, _ = _resolve()
    return k is not None and hasattr(k, "prepare") and bool(getattr(k, "CUDA_GRAPH_SAFE", True))


def prepare_meta(plan, num_kv_heads: int, num_q_heads: int, num_decode_rows: int, host_rows=None):
    """Host launch parameters of the kernels for this step (None without kernels). `host_rows`: host
    (query_start_loc, seq_lens, ctx_lens), so that the prefill plan reads no device tensor."""
    k, _ = _resolve()
    if k is None or not hasattr(k, "prepare"):
        return None
    return k.prepare(plan, num_kv_heads, num_q_heads, num_decode_rows=num_decode_rows, host_rows=host_rows)


def plan_slots(table, query_start_loc, seq_lens, block_table, block_size: int, capture: bool = False):
    """The step's staging slots from the device slot table (`SlotTable`): the kernels' one-program planner on CUDA,
    the torch planner otherwise."""
    k, _ = _resolve()
    if k is not None and hasattr(k, "plan_slots"):
        return k.plan_slots(table, query_start_loc, seq_lens, block_table, block_size, capture=capture)
    return table.plan(query_start_loc, seq_lens, block_table, block_size, capture=capture)


def warm_up(codec, kv_cache, sink=None, workspace=None, staging=None) -> None:
    """Compile the kernels' prefill-only pieces before serving (no-op without kernels or off CUDA)."""
    k, _ = _resolve()
    if k is not None and hasattr(k, "warm_up"):
        k.warm_up(codec, kv_cache, sink=sink, workspace=workspace, staging=staging)


def forward_step(codec, query, key, value, kv_cache, staging, plan, scale, out=None, sink=None, meta=None,
                 workspace=None):
    """store -> attention -> staging write of one layer and step (see docs/design.md). Returns the output
    `[T, Hq, D]` (written into `out` when given). `sink` = (kv, tags) table of exact first tokens; `workspace`:
    the CUDA prefill workspace (tq_vllm.kernels.prefill)."""
    k, _ = _resolve()
    if k is not None:
        r = k.forward_step(codec, query, key, value, kv_cache, staging, plan, scale, out=out, meta=meta, sink=sink,
                           workspace=workspace)
    else:
        from tq_vllm.quant.reference import forward_step as ref
        r = ref(codec, query, key, value, kv_cache, staging, plan, scale, sink=sink)
    if out is not None and r is not out:
        out.copy_(r)
        return out
    return r


# ------------------------------------------------------------------------------------ exact boundary layers
def exact_forward(query, key, value, kv_cache, plan, slot_mapping, scale, out):
    """Plain paged attention for the exact ("bf16") boundary layers.

    `kv_cache` is the layer's uint8 page tensor `[num_blocks, H, B, 2*D*itemsize]`, viewed in the model dtype as
    K ‖ V per (block, head, token). Store every new token at its slot, then causal attention over the row.
    """
    T, Hq, D = query.shape
    nb, H, B, _ = kv_cache.shape
    kv = kv_cache.view(key.dtype).view(nb, H, B, 2 * D)
    sm = slot_mapping[:T].to(torch.int64)
    valid = sm >= 0
    if bool(valid.all()):
        blk, off = torch.div(sm, B, rounding_mode="floor"), sm % B
        kv[blk, :, off, :D] = key
        kv[blk, :, off, D:] = value
    else:
        blk, off = torch.div(sm[valid], B, rounding_mode="floor"), sm[valid] % B
        kv[blk, :, off, :D] = key[valid]
        kv[blk, :, off, D:] = value[valid]
    G = Hq // H
    qsl = plan.query_start_loc.tolist()
    seqs = plan.seq_lens.tolist()
    for r in range(plan.num_rows):
        q0, q1, L = qsl[r], qsl[r + 1], seqs[r]
        nq = q1 - q0
        if nq <= 0:
            continue
        nblk = (L + B - 1) // B
        ids = plan.block_table[r, :nblk].to(torch.int64)
        pages = kv[ids].permute(0, 2, 1, 3).reshape(nblk * B, H, 2 * D)[:L].to(torch.float32)
        k, v = pages[..., :D], pages[..., D:]
        if G > 1:
            k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
        q = query[q0:q1].to(torch.float32)
        s = torch.einsum("qhd,khd->hqk", q, k) * scale
        pos = torch.arange(L - nq, L, device=q.device)
        mask = torch.arange(L, device=q.device)[None, :] <= pos[:, None]
        s = s.masked_fill(~mask[None], float("-inf"))
        out[q0:q1] = torch.einsum("hqk,khd->qhd", torch.softmax(s, -1), v).to(out.dtype)
    return out
