"""Prefill / chunk rows through FlashAttention over dequantized pages (host plan + launches).

Semantics are the decode semantics of docs/design.md: a query at position p sees the blocks before its own block
dequantized from the pages, and its own block (up to p) exact. FlashAttention's paged, variable-length call does
exactly that when every *segment* (the queries of one row that share one block b) gets its own block-table row:

    [dequantized blocks 0 .. b-1 of the row] + [one workspace block holding the exact tokens of block b]

with `causal=True` (bottom-right aligned, so query p sees keys <= p). The dequantized blocks of a row are written
once into a bounded workspace (`PrefillWorkspace`) and shared by all its segments; the exact blocks come from the
step's K/V and, for the part of block ctx//B cached before the step, from staging.

A step whose blocks do not fit the workspace is split into passes. Rows (and groups of at most `group` segments of
a row) are packed into passes in query order; a group whose prefix alone is larger is attended window by window
over its dequantized blocks and the windows are merged with their log-sum-exps. No pass materialises more than
the workspace, whatever the context length.

Everything here is host-side integer planning (numpy) done once per step, plus eager launches per layer; prefill
steps do not run inside CUDA graphs.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = ["PrefillPass", "PrefillPlan", "PrefillWorkspace", "plan_prefill", "flash_attn_fn", "varlen_paged_ref",
           "merge_into", "workspace_for"]


@dataclass
class PrefillPass:
    """One FlashAttention call over the workspace. Query tokens [q0, q1) of the step; `segments` rows of the
    block table. `group` >= 0: the pass is a window of a multi-window group (its output is merged into the
    group's running output); `first_of_group`: it writes the output and starts the group's log-sum-exp."""

    q0: int
    q1: int
    causal: bool
    group: int  # -1: a plain pass (writes out)
    first_of_group: bool
    max_q: int
    max_k: int
    # device int32 tensors (filled by PrefillPlan.to_device)
    cu_q: torch.Tensor | None = None  # [S + 1], relative to q0
    seqused_k: torch.Tensor | None = None  # [S]
    block_table: torch.Tensor | None = None  # [S, cols] workspace block ids
    deq_row: torch.Tensor | None = None  # [N] plan row of each dequantized block
    deq_blk: torch.Tensor | None = None  # [N] block index within the row
    deq_dst: torch.Tensor | None = None  # [N] workspace block
    deq_first: torch.Tensor | None = None  # [N] 1 where the block is the row's block 0 (sink lookup)
    in_src: torch.Tensor | None = None  # [E] step token index -> ...
    in_dst: torch.Tensor | None = None  # [E] ... flat workspace token (block * B + offset)
    st_row: torch.Tensor | None = None  # [F] plan row whose staging slot holds the token ...
    st_off: torch.Tensor | None = None  # [F] ... at this offset of the slot ...
    st_dst: torch.Tensor | None = None  # [F] ... -> flat workspace token
    deq_ids: torch.Tensor | None = None  # [N] vLLM block ids of the dequantized blocks (first layer of the step)
    host: dict = field(default_factory=dict)  # the numpy arrays (tests inspect them)


@dataclass
class PrefillPlan:
    passes: list
    num_groups: int  # multi-window groups (each needs a running log-sum-exp)
    group_q: list  # (q0, q1) of each multi-window group

    def to_device(self, device) -> "PrefillPlan":
        """One host-to-device copy for every pass's index arrays. Each array starts 16-byte aligned in the shared
        buffer: Triton specializes pointer arguments on 16-byte alignment, and arrays at arbitrary offsets made the
        dequantization kernel compile a new variant in the middle of serving (~3 s stalls on an H200)."""
        names = ("cu_q", "seqused_k", "block_table", "deq_row", "deq_blk", "deq_dst", "deq_first", "in_src", "in_dst",
                 "st_row", "st_off", "st_dst")
        flat, spans = [], []
        off = 0
        for p in self.passes:
            for n in names:
                a = np.ascontiguousarray(p.host[n], dtype=np.int32)
                pad = -a.size % 4  # 4 int32 = 16 bytes
                flat.append(np.concatenate([a.reshape(-1), np.zeros(pad, dtype=np.int32)]) if pad else a.reshape(-1))
                spans.append((p, n, off, a.shape))
                off += a.size + pad
        if not flat:
            return self
        buf = torch.from_numpy(np.concatenate(flat))
        if torch.device(device).type == "cuda":
            buf = buf.pin_memory().to(device, non_blocking=True)
        else:
            buf = buf.to(device)
        for p, n, o, shape in spans:
            size = int(np.prod(shape)) if len(shape) else 1
            setattr(p, n, buf[o:o + size].view(*shape))
        self._keepalive = buf
        return self


def _row_segments(c: int, L: int, B: int):
    """Blocks b of the row's queries and, per block, (first query position, end position)."""
    b = np.arange(c // B, (L - 1) // B + 1, dtype=np.int64)
    qa = np.maximum(c, b * B)
    qe = np.minimum(L, (b + 1) * B)
    return b, qa, qe


def plan_prefill(qsl, seq, ctx, rows, B: int, ws_blocks: int, group: int | None = None) -> PrefillPlan:
    """Passes for rows `rows` (host ints; qsl [R+1], seq [R], ctx [R]) with a workspace of `ws_blocks` blocks.
    `group`: most segments (query blocks) attended in one pass per row (default ws_blocks // 4)."""
    qsl = np.asarray(qsl, dtype=np.int64)
    seq = np.asarray(seq, dtype=np.int64)
    ctx = np.asarray(ctx, dtype=np.int64)
    WB = int(ws_blocks)
    if WB < 2:
        raise ValueError(f"prefill workspace of {WB} blocks is too small (need >= 2)")
    GQ = min(max(1, int(group) if group else WB // 4), WB - 1)
    units = []  # (row, seg slice arrays) per query group
    for r in rows:
        c, L = int(ctx[r]), int(seq[r])
        if L - c <= 0:
            continue
        b, qa, qe = _row_segments(c, L, B)
        for g0 in range(0, len(b), GQ):
            units.append((int(r), b[g0:g0 + GQ], qa[g0:g0 + GQ], qe[g0:g0 + GQ]))

    passes, group_q = [], []
    batch = []  # single-window units waiting for a pass
    used = 0

    def flush():
        nonlocal batch, used
        if batch:
            passes.append(_make_pass(batch, qsl, ctx, B, causal=True, group=-1, first=False))
        batch, used = [], 0

    for u in units:
        r, b, qa, qe = u
        n_exact = len(b)
        n_deq = int(b[-1])  # blocks 0 .. b_last-1
        need = n_deq + n_exact
        if need <= WB:
            if used + need > WB:
                flush()
            batch.append((r, b, qa, qe, 0, n_deq, True))
            used += need
            continue
        flush()
        gid = len(group_q)
        group_q.append((int(qsl[r] + qa[0] - ctx[r]), int(qsl[r] + qe[-1] - ctx[r])))
        wd = WB - n_exact
        starts = list(range(0, n_deq, wd))
        # the final window (with the exact blocks) first: it covers every query and starts the running lse
        wf = starts[-1]
        passes.append(_make_pass([(r, b, qa, qe, wf, n_deq, True)], qsl, ctx, B, causal=True, group=gid, first=True))
        for w0 in starts[:-1]:
            keep = b > w0  # segments that see some of this window
            passes.append(_make_pass([(r, b[keep], qa[keep], qe[keep], w0, w0 + wd, False)], qsl, ctx, B,
                                     causal=False, group=gid, first=False))
    flush()
    return PrefillPlan(passes=passes, num_groups=len(group_q), group_q=group_q)


def _make_pass(items, qsl, ctx, B, causal: bool, group: int, first: bool) -> PrefillPass:
    """items: (row, blocks b, query starts qa, ends qe, window w0, window end w1, with_exact) in query order."""
    seg_len, seg_k, bt_rows = [], [], []
    deq_row, deq_blk, deq_dst, in_src, in_dst, st_row, st_off, st_dst = ([] for _ in range(8))
    nxt = 0  # next free workspace block
    q0 = q1 = None
    for r, b, qa, qe, w0, w1, exact in items:
        c = int(ctx[r])
        qs = int(qsl[r])
        lo, hi = int(w0), int(min(w1, b[-1]))  # dequantized blocks [lo, hi) of this row in the pass
        nd = max(0, hi - lo)
        deq_row.append(np.full(nd, r))
        deq_blk.append(np.arange(lo, lo + nd))
        deq_dst.append(np.arange(nxt, nxt + nd))
        dbase = nxt
        nxt += nd
        cols = np.clip(np.minimum(b, hi) - lo, 0, None)  # dequantized columns per segment
        col = np.arange(max(1, int(cols.max()) + int(exact)))[None, :]
        bt = np.where(col < cols[:, None], dbase + col, 0)  # unused entries point at block 0 of the pass
        if exact:
            ex = np.arange(nxt, nxt + len(b))
            nxt += len(b)
            n_ex = qe - b * B  # exact keys of block b up to the segment's last query
            seg_k.append(cols * B + n_ex)
            bt[np.arange(len(b)), cols] = ex
            # exact tokens: positions b0*B .. L-1 (block by block); from staging below ctx, from the input above
            p = np.arange(int(b[0]) * B, int(qe[-1]))
            dst = ex[p // B - int(b[0])] * B + p % B
            old = p < c
            if old.any():
                st_row.append(np.full(int(old.sum()), r))
                st_off.append(p[old] % B)
                st_dst.append(dst[old])
            in_src.append(qs + p[~old] - c)
            in_dst.append(dst[~old])
            # zeros after the last exact key: FlashAttention masks those keys' scores but may still load their
            # values (whole pages), and 0 x NaN of a stale workspace value would be NaN in the output
            tail = np.arange(int(qe[-1]), (int(b[-1]) + 1) * B)
            in_src.append(np.full(len(tail), -1))
            in_dst.append(ex[-1] * B + tail % B)
        else:
            seg_k.append(cols * B)
        bt_rows.append(bt)
        seg_len.append(qe - qa)
        a, e = qs + int(qa[0]) - c, qs + int(qe[-1]) - c
        q0 = a if q0 is None else q0
        assert q1 is None or a == q1, "passes cover contiguous query ranges"
        q1 = e
    lens = np.concatenate(seg_len)
    width = max(x.shape[1] for x in bt_rows)
    bt = np.zeros((len(lens), width), dtype=np.int64)
    o = 0
    for x in bt_rows:
        bt[o:o + x.shape[0], :x.shape[1]] = x
        o += x.shape[0]
    cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0, dtype=np.int64)  # noqa: E731
    sk = cat(seg_k)
    host = dict(cu_q=np.concatenate([[0], np.cumsum(lens)]), seqused_k=sk, block_table=bt,
                deq_row=cat(deq_row), deq_blk=cat(deq_blk), deq_dst=cat(deq_dst),
                deq_first=(cat(deq_blk) == 0).astype(np.int64), in_src=cat(in_src), in_dst=cat(in_dst),
                st_row=cat(st_row), st_off=cat(st_off), st_dst=cat(st_dst))
    assert nxt > 0 and int(sk.min()) > 0
    return PrefillPass(q0=int(q0), q1=int(q1), causal=causal, group=group, first_of_group=first,
                       max_q=int(lens.max()), max_k=int(sk.max()), host=host)


# ------------------------------------------------------------------------------------------------ workspace
@dataclass
class PrefillWorkspace:
    """Dequantized K and V blocks `[blocks, B, H, D]` (model dtype), shared by every layer of a device."""

    k: torch.Tensor
    v: torch.Tensor

    @property
    def blocks(self) -> int:
        return int(self.k.shape[0])


_WORKSPACES: dict = {}
DEFAULT_WS_TOKENS = 32768


def ws_tokens(requested: int | None = None) -> int:
    env = os.environ.get("TQ_VLLM_PREFILL_WS_TOKENS")
    if env:
        return int(env)
    return int(requested) if requested else DEFAULT_WS_TOKENS


def workspace_for(device, dtype, B: int, H: int, D: int, tokens: int | None = None) -> PrefillWorkspace:
    """The shared workspace of (device, dtype, B, H, D), allocated on first use (`tokens` rounded up to blocks)."""
    device = torch.device(device)
    key = (device.type, device.index, dtype, int(B), int(H), int(D))
    ws = _WORKSPACES.get(key)
    n = max(2, math.ceil(ws_tokens(tokens) / B))
    if ws is None or ws.blocks != n:
        shape = (n, B, H, D)
        ws = _WORKSPACES[key] = PrefillWorkspace(torch.empty(shape, dtype=dtype, device=device),
                                                 torch.empty(shape, dtype=dtype, device=device))
    return ws


# ------------------------------------------------------------------------------------------------ attention
_FA: dict = {}


def flash_attn_fn():
    """vLLM's bundled FlashAttention as `fn(q, k_cache, v_cache, cu_q, max_q, seqused_k, max_k, block_table,
    scale, causal, out) -> (out, lse [Hq, Tq])`, or None where it is not available (CPU, no CUDA build)."""
    if "fn" in _FA:
        return _FA["fn"]
    fn = None
    try:
        if torch.cuda.is_available():
            from vllm.vllm_flash_attn import flash_attn_varlen_func
            from vllm.vllm_flash_attn.flash_attn_interface import is_fa_version_supported
            ver = 3 if is_fa_version_supported(3) else 2

            sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
            import inspect
            try:  # (a build whose function hides its signature just keeps FlashAttention's own split choice)
                has_splits = "num_splits" in inspect.signature(flash_attn_varlen_func).parameters
            except (TypeError, ValueError):
                has_splits = False

            def fn(q, kc, vc, cu_q, max_q, seqused_k, max_k, bt, scale, causal, out=None):
                # split-KV count: none once the segments alone fill the GPU (a fresh prompt has one per block;
                # FlashAttention's heuristic split them and paid a combine kernel: 4.40 -> 4.35 ms for a 16K-token
                # prompt, H200), else FlashAttention's heuristic; TQ_VLLM_PREFILL_SPLITS overrides
                ns = int(os.environ.get("TQ_VLLM_PREFILL_SPLITS", "-1"))
                if ns < 0:
                    ns = 1 if bt.shape[0] >= sms else 0
                extra = {"num_splits": ns} if has_splits and ns else {}
                return flash_attn_varlen_func(q=q, k=kc, v=vc, max_seqlen_q=max_q, cu_seqlens_q=cu_q,
                                              max_seqlen_k=max_k, seqused_k=seqused_k, softmax_scale=scale,
                                              causal=causal, block_table=bt, return_softmax_lse=True, out=out,
                                              fa_version=ver, **extra)
    except Exception:  # noqa: BLE001 - no CUDA build of vLLM's FlashAttention: the Triton prefill kernel is used
        fn = None
    _FA["fn"] = fn
    return fn


def varlen_paged_ref(q, kc, vc, cu_q, max_q, seqused_k, max_k, bt, scale, causal, out=None):
    """Torch model of the FlashAttention call above (the tests' stand-in on CPU): q [Tq, Hq, D],
    kc/vc [blocks, B, H, D], per segment s queries cu_q[s]..cu_q[s+1] and keys = the first seqused_k[s] tokens of
    its block-table row; causal aligned bottom-right. Returns (out [Tq, Hq, D] q dtype, lse [Hq, Tq] float32).
    Like FlashAttention with whole-page loads, the values of the last page's keys past seqused_k enter the product
    with weight 0 (so a NaN there makes the output NaN: the workspace must hold finite values there)."""
    Tq, Hq, D = q.shape
    _, B, H, _ = kc.shape
    G = Hq // H
    o = torch.zeros(Tq, Hq, D, dtype=torch.float32, device=q.device)
    lse = torch.full((Hq, Tq), float("-inf"), dtype=torch.float32, device=q.device)
    cu, sk = cu_q.tolist(), seqused_k.tolist()
    for s in range(len(sk)):
        a, e, n = cu[s], cu[s + 1], sk[s]
        if e <= a or n <= 0:
            continue
        blocks = bt[s, :-(-n // B)].long()
        k = kc[blocks].reshape(-1, H, D).float().repeat_interleave(G, 1)  # whole pages
        v = vc[blocks].reshape(-1, H, D).float().repeat_interleave(G, 1)
        x = torch.einsum("qhd,khd->hqk", q[a:e].float(), k) * scale
        m = e - a
        i = torch.arange(m, device=q.device)[:, None]
        j = torch.arange(k.shape[0], device=q.device)[None, :]
        vis = (j <= i + (n - m)) if causal else (j < n)
        x = x.masked_fill(~(vis & (j < n))[None], float("-inf"))
        lse[:, a:e] = torch.logsumexp(x, -1)
        o[a:e] = torch.einsum("hqk,khd->qhd", torch.softmax(x, -1), v)
    if out is None:
        return o.to(q.dtype), lse
    out.copy_(o.to(out.dtype))
    return out, lse


def merge_into(out: torch.Tensor, lse: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor) -> None:
    """out, lse <- log-sum-exp merge of (out, lse) and (o2, lse2); out [T, Hq, D], lse [Hq, T] float32. An empty
    part (lse = ±inf: FlashAttention 2 and 3 differ) weighs nothing."""
    lse2 = torch.where(torch.isinf(lse2), torch.full_like(lse2, float("-inf")), lse2.float())
    m = torch.maximum(lse, lse2)
    w1 = torch.exp(lse - m)
    w2 = torch.exp(lse2 - m)
    tot = w1 + w2
    a = (w1 / tot).transpose(0, 1)[..., None]
    b = (w2 / tot).transpose(0, 1)[..., None]
    out.copy_((out.float() * a + o2.float() * b).to(out.dtype))
    lse.copy_(m + torch.log(tot))
