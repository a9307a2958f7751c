"""Decode-semantics attention for transformers models: the fast CPU path of the quality harness.

`DecodeSemanticsAttention` holds a `KVFormat` and, per layer, the quantized-then-dequantized K/V of the positions
already coded. Its `attend()` computes, for queries at positions off .. off+Tq-1 (off = Tk - Tq), causal attention
in which query p reads

* ``block`` formats: positions in blocks before its own block from the coded K/V, its own block's positions <= p
  exact (docs/design.md: a block is coded once, when full, from exact values);
* ``token`` formats (vLLM TurboQuant, fp8): every position j <= p coded;
* ``exact``: every position exact.

All in one pass per window (a boolean mask over [coded keys | exact keys of the query chunk's own blocks]), which
equals token-by-token decoding (tested against the paged torch reference). Inputs are rounded to bf16 first (the
model dtype that vLLM stores and stages), so the `bf16` format is the bf16-KV baseline even when the model runs
in float32.

`install(model)` registers this as a transformers attention implementation ("tq_eval") and switches the model to
it; `use(session)` selects the session that the model's attention calls go to.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from .formats import KVFormat, make_format

ATTN_NAME = "tq_eval"
_CURRENT: list["DecodeSemanticsAttention"] = []


class DecodeSemanticsAttention:
    """Per-sequence state of the harness attention (call `reset()` between sequences)."""

    def __init__(self, fmt: KVFormat | str, num_layers: int, *, kv_dtype: torch.dtype | None = torch.bfloat16,
                 collect_stats: bool = False, max_chunk_elems: int = 1 << 24):
        self.fmt = make_format(fmt) if isinstance(fmt, str) else fmt
        self.num_layers = int(num_layers)
        self.kv_dtype = kv_dtype
        self.collect_stats = collect_stats
        self.max_chunk_elems = int(max_chunk_elems)
        self.stats: dict[int, dict[str, float]] = {}
        self._cache: dict[int, tuple[int, torch.Tensor, torch.Tensor]] = {}

    def reset(self):
        self._cache.clear()

    # ------------------------------------------------------------------------------------------------
    def _round(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.kv_dtype) if self.kv_dtype is not None else x
        return x.to(torch.float32)

    def coded_prefix(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """(n, k̂[:n], v̂[:n]): the coded K/V of the first n positions (n = all full blocks for block formats,
        all positions for token formats), computed incrementally: positions coded earlier are reused."""
        lf = self.fmt.layer(layer, self.num_layers)
        T = k.shape[0]
        if lf.semantics == "exact":
            return T, k, v
        B = lf.block_size
        n = (T // B) * B if lf.semantics == "block" else T
        n0, kq, vq = self._cache.get(layer, (0, k[:0], v[:0]))
        if n0 > n:  # a new, shorter sequence without reset(): start over
            n0, kq, vq = 0, k[:0], v[:0]
        if n > n0:
            kn, vn = k[n0:n], v[n0:n]
            if lf.semantics == "block":
                H, D = k.shape[1:]
                kn, vn = kn.reshape(-1, B, H, D), vn.reshape(-1, B, H, D)
                kh, vh = lf.qdq(layer, kn, vn)
                kh, vh = kh.reshape(-1, H, D), vh.reshape(-1, H, D)
            else:
                kh, vh = lf.qdq(layer, kn, vn)
            kq, vq = torch.cat([kq, kh.to(torch.float32)]), torch.cat([vq, vh.to(torch.float32)])
            s = min(self.fmt.sink_tokens(), n)
            if s and n0 < s:
                if "k" in self.fmt.sink_kv:
                    kq[n0:s] = k[n0:s]
                if "v" in self.fmt.sink_kv:
                    vq[n0:s] = v[n0:s]
            self._cache[layer] = (n, kq, vq)
            if self.collect_stats:
                self._record(layer, k[n0:n], v[n0:n], kq[n0:], vq[n0:])
        return n, kq, vq

    def _record(self, layer, k, v, kq, vq):
        st = self.stats.setdefault(layer, {})
        for key in ("n", "k_sq", "k_err", "v_sq", "v_err", "k_norm_max", "k_norm_sum", "k_mean_sq"):
            st.setdefault(key, 0.0)
        kn = k.norm(dim=-1)
        st["n"] += kn.numel()
        st["k_sq"] += float(k.pow(2).sum())
        st["v_sq"] += float(v.pow(2).sum())
        st["k_err"] += float((kq - k).pow(2).sum())
        st["v_err"] += float((vq - v).pow(2).sum())
        st["k_norm_max"] = max(st["k_norm_max"], float(kn.max()))
        st["k_norm_sum"] += float(kn.sum())
        st["k_mean_sq"] += float(k.mean(0).pow(2).sum() * k.shape[0])

    def _record_logits(self, layer, q, k, kq, scale):
        """RMS of the logit error q·(k̂-k)·scale of the last queries against all coded keys, and the RMS spread
        of the exact logits (the error that softmax sees, relative to the logits' own scale)."""
        Hq, H = q.shape[1], k.shape[1]
        G = Hq // H
        qq = q.transpose(0, 1)  # [Hq, t, D]
        kk = k.transpose(0, 1).repeat_interleave(G, 0)
        ee = (kq - k).transpose(0, 1).repeat_interleave(G, 0)
        err = torch.einsum("htd,hnd->htn", qq, ee) * scale
        lg = torch.einsum("htd,hnd->htn", qq, kk) * scale
        st = self.stats.setdefault(layer, {})
        st["logit_err_sq"] = st.get("logit_err_sq", 0.0) + float(err.pow(2).mean())
        st["logit_var"] = st.get("logit_var", 0.0) + float(lg.var(-1).mean())
        st["logit_n"] = st.get("logit_n", 0) + 1

    # ------------------------------------------------------------------------------------------------
    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """q `[Tq, Hq, D]`, k/v `[Tk, H, D]` (all positions 0..Tk-1, the queries are the last Tq) ->
        float32 `[Tq, Hq, D]`."""
        Tq, Hq, D = q.shape
        Tk, H, _ = k.shape
        off = Tk - Tq
        q = q.to(torch.float32)
        k, v = self._round(k), self._round(v)
        lf = self.fmt.layer(layer, self.num_layers)
        n, kq, vq = self.coded_prefix(layer, k, v)
        if self.collect_stats and n and Tq > 1 and lf.semantics != "exact":
            self._record_logits(layer, q[-128:], k[:n], kq[:n], scale)
        B = lf.block_size
        rows = max(B, (self.max_chunk_elems // max(1, Hq * Tk)) // B * B)
        out = torch.empty(Tq, Hq, D, dtype=torch.float32)
        r0 = 0
        while r0 < Tq:
            p0 = off + r0
            p1 = min(off + Tq, p0 + rows)  # any split is correct (the mask is per row); rows is a multiple of B
            pos = torch.arange(p0, p1)
            if lf.semantics == "exact":
                keys, vals = k[:p1], v[:p1]
                mask = torch.arange(p1)[None, :] <= pos[:, None]
            elif lf.semantics == "token":
                keys, vals = kq[:p1], vq[:p1]
                mask = torch.arange(p1)[None, :] <= pos[:, None]
            else:
                qe, e0, mask = block_span(p0, p1, n, B)
                keys = torch.cat([kq[:qe], k[e0:p1]])
                vals = torch.cat([vq[:qe], v[e0:p1]])
            o = F.scaled_dot_product_attention(
                q[r0:r0 + (p1 - p0)].transpose(0, 1)[None], keys.transpose(0, 1)[None],
                vals.transpose(0, 1)[None], attn_mask=mask[None, None], scale=scale, enable_gqa=Hq != H)
            out[r0:r0 + (p1 - p0)] = o[0].transpose(0, 1)
            r0 += p1 - p0
        return out

    def layer_error_summary(self) -> list[dict]:
        rows = []
        for layer in sorted(self.stats):
            st = self.stats[layer]
            if not st.get("n"):
                continue
            n = st["n"]
            rows.append({"layer": layer, "k_norm_mean": st["k_norm_sum"] / n, "k_norm_max": st["k_norm_max"],
                         "k_rel_err": st["k_err"] / max(st["k_sq"], 1e-30),
                         "v_rel_err": st["v_err"] / max(st["v_sq"], 1e-30),
                         "k_mean_frac": st["k_mean_sq"] / max(st["k_sq"], 1e-30),
                         "k_abs_err": math.sqrt(st["k_err"] / n),
                         "logit_err_rms": math.sqrt(st.get("logit_err_sq", 0.0) / max(1, st.get("logit_n", 0))),
                         "logit_std": math.sqrt(st.get("logit_var", 0.0) / max(1, st.get("logit_n", 0)))})
        return rows


def block_span(p0: int, p1: int, n: int, B: int) -> tuple[int, int, torch.Tensor]:
    """Keys of the queries at positions p0 .. p1-1 under block semantics: (qe, e0, mask) = the coded keys [0, qe)
    (the full blocks before the chunk's last query's block, of the n coded ones), the exact keys [e0, p1) (from
    the chunk's first query's block), and mask [p1 - p0, qe + p1 - e0]: a query reads the coded keys of the blocks
    before its own and the exact keys of its own block up to itself."""
    pos = torch.arange(p0, p1)
    own = (pos // B) * B
    qe = min(n, ((p1 - 1) // B) * B)
    e0 = (p0 // B) * B
    jq = torch.arange(qe)
    jx = torch.arange(e0, p1)
    mask = torch.cat([jq[None, :] < own[:, None], (jx[None, :] >= own[:, None]) & (jx[None, :] <= pos[:, None])], 1)
    return qe, e0, mask


# ---------------------------------------------------------------------------------------------- transformers hook
def _attention_fn(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    if not _CURRENT:
        raise RuntimeError("tq_eval attention called outside `tq_vllm.eval.attention.use(session)`")
    sess = _CURRENT[-1]
    if query.shape[0] != 1:
        raise ValueError("the tq_eval attention handles one sequence at a time (batch 1)")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = sess.attend(module.layer_idx, query[0].transpose(0, 1), key[0].transpose(0, 1),
                      value[0].transpose(0, 1), scale)
    return out[None].to(query.dtype), None


def install(model) -> None:
    """Register the harness attention with transformers and switch `model` to it."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, _attention_fn)
    try:
        model.set_attn_implementation(ATTN_NAME)
    except Exception:  # older transformers
        model.config._attn_implementation = ATTN_NAME
    if getattr(model.config, "_attn_implementation", None) != ATTN_NAME:
        model.config._attn_implementation = ATTN_NAME


@contextlib.contextmanager
def use(session: DecodeSemanticsAttention):
    _CURRENT.append(session)
    try:
        yield session
    finally:
        _CURRENT.pop()
