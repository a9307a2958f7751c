"""Certify the kernels' compressed pages against the format's definition, up to fp32 ties.

The store kernel and the reference (`LayerCodec.encode_blocks`) compute the rotation, the norms and the scales in
different fp32 orders, so a coordinate within a few ulps of a decision boundary may code either way, and a scale
within a few ulps of a bf16 rounding midpoint may round either way. One such flip in a strongly attended key moves
an attention output by more than the tests' tolerance (tq25, head_dim 64, block 128, GQA 8: 0.0062 against 0.004,
one 3-bit key code whose u lies 1.7e-8 from its boundary). `certify_pages` recomputes every page that differs from
the reference's in float64 from the exact input and accepts a difference only at such a tie; everything else in
the page must be the reference's bytes.
"""
from __future__ import annotations

import torch

from tq_vllm.quant.codec import LayerCodec, bf16_from_bytes
from tq_vllm.quant.packing import unpack

TIE_U = 2e-6  # |u - boundary| of a coordinate of a unit-norm row (fp32 order effects: ~1e-8 .. 1e-7)
TIE_S = 1e-5  # relative distance of a scale to a bf16 rounding midpoint
TIE_P = 1e-5  # |S·e| / ‖e‖ of a QJL sign (the store's tf32x3 product)


def _bf16_ok(got: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """Whether `got` (bf16 values, as float64) is the bf16 rounding of `exact` (float64), or its other neighbour with
    `exact` at a rounding midpoint (within TIE_S)."""
    near = exact.to(torch.bfloat16).to(torch.float64)
    mid = (got + near) / 2
    adjacent = (got - near).abs() <= 2.0 ** -7 * torch.maximum(got.abs(), near.abs())
    tie = adjacent & ((exact - mid).abs() <= TIE_S * exact.abs())
    return (got == near) | tie


def _check_dir(y, codes, s, cen, bnd, mode: str, where: str) -> list[str]:
    """y [..., D] float64 rows, `codes` [..., D] and bf16 scales `s` [...] from the page: the codes are the
    bucketize codes of u = y/‖y‖ except at ties, and s is the scale of those codes (least squares or the norm)."""
    bad = []
    nrm = y.norm(dim=-1)
    pos = nrm > 0
    u = torch.where(pos[..., None], y / torch.where(pos, nrm, 1.0)[..., None], 0.0)
    want = torch.bucketize(u, bnd)
    diff = codes != want
    if diff.any():
        lo = torch.minimum(codes, want).clamp(max=bnd.numel() - 1)
        margin = (u - bnd[lo]).abs()
        ok = ((codes - want).abs() == 1) & (margin <= TIE_U)
        wrong = diff & ~ok
        if wrong.any():
            i = tuple(wrong.nonzero()[0].tolist())
            bad.append(f"{where}: {int(wrong.sum())} codes differ from the definition away from a tie "
                       f"(first at {i}: code {int(codes[i])}, want {int(want[i])}, u {u[i].item():.9g})")
    c = cen[codes]
    exact = nrm if mode == "norm" else (y * c).sum(-1) / (c * c).sum(-1).clamp_min(1e-300)
    exact = torch.where(pos, exact, 0.0)
    sok = _bf16_ok(s, exact)
    if not sok.all():
        i = tuple((~sok).nonzero()[0].tolist())
        bad.append(f"{where}: {int((~sok).sum())} scales are not the bf16 rounding of their exact value "
                   f"(first at {i}: {s[i].item():.9g}, exact {exact[i].item():.9g})")
    return bad


def certify_pages(codec: LayerCodec, cache: torch.Tensor, ref_cache: torch.Tensor, block_ids, k: torch.Tensor,
                  v: torch.Tensor) -> tuple[int, list[str]]:
    """`cache`: the kernels' pages, `ref_cache`: the reference's for the same blocks `block_ids` [N]; `k`, `v`
    [N, B, H, D]: the blocks' exact input. Returns (page bytes that differ, violations): a page that differs must
    hold, in float64 from the exact input, the definition's codes and bf16 scales except at ties (module doc), with
    the same sink tag and padding bytes."""
    ids = torch.as_tensor(block_ids, device=cache.device).long()
    pa, pb = codec.page_view(cache)[ids], codec.page_view(ref_cache)[ids]
    ndiff = int((pa != pb).sum())
    if ndiff == 0:
        return 0, []
    lay, pre = codec.layout, codec.preset
    bad = []
    if "sink_tag" in lay.fields:
        f = lay.fields["sink_tag"]
        if not torch.equal(pa[..., f.offset:f.end], pb[..., f.offset:f.end]):
            bad.append("sink tags differ")
    if not torch.equal(pa[..., lay.used_bytes:], pb[..., lay.used_bytes:]):
        bad.append("padding bytes differ")
    fields = codec.read_fields(cache, ids)
    cpu = {n: t.cpu() for n, t in fields.items()}
    rot = codec.rot.double().cpu()
    D = codec.head_dim
    for kind, x in (("k", k), ("v", v)):
        y = (x.double().cpu() @ rot.T).permute(0, 2, 1, 3)  # [N, H, B, D]
        cen = codec.centroids[kind].double().cpu()
        bnd = codec.bounds[kind].double().cpu()
        if pre.k_center if kind == "k" else pre.v_center:
            mc = codec._get_codes(cpu, f"{kind}_mean")[:, :, 0]  # [N, H, D]
            ms = bf16_from_bytes(cpu[f"{kind}_mean_scale"])[:, :, 0].double()  # [N, H]
            mcen = codec.centroids[f"{kind}_mean"].double().cpu()
            bad += _check_dir(y.mean(2), mc, ms, mcen, codec.bounds[f"{kind}_mean"].double().cpu(), "ls",
                              f"{kind} mean")
            y = y - (ms[..., None] * mcen[mc])[:, :, None, :]  # the page's own mean: residuals relative to it
        codes = codec._get_codes(cpu, kind)
        s = bf16_from_bytes(cpu[f"{kind}_scale"]).double()  # [N, H, B]
        bad += _check_dir(y, codes, s, cen, bnd, pre.scale, kind)
        if kind == "k" and pre.k_mode == "prod":
            e = y - s[..., None] * cen[codes]
            proj = e @ codec.qjl.double().cpu().T
            bits = unpack(cpu["k_qjl"], 1, D).bool()
            en = e.norm(dim=-1, keepdim=True)
            wrong = (bits != (proj >= 0)) & (proj.abs() > TIE_P * en)
            if wrong.any():
                bad.append(f"k qjl: {int(wrong.sum())} signs differ from S·e away from a tie")
            rn = bf16_from_bytes(cpu["k_rnorm"]).double()
            if not _bf16_ok(rn, en[..., 0]).all():
                bad.append("k qjl residual norms are not the bf16 rounding of ‖e‖")
    return ndiff, bad
