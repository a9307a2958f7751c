"""The math of one coded vector (rotated domain) and of one compressed head page.

Everything here is plain torch and runs on any device; it is the oracle for the Triton kernels.
Shapes: D = head_dim, B = block_size, H = KV heads, N = blocks.
"""
from __future__ import annotations

import math

import torch

from .codebook import page_codebook
from .layout import PageLayout
from .packing import pack, unpack
from .presets import Preset, get_preset
from .rotation import layer_seed, qjl_matrix, rotation


def robust_norm(y: torch.Tensor) -> torch.Tensor:
    """‖y‖ over the last dim without overflow for huge values (float32 in, float32 out)."""
    m = y.abs().amax(-1, keepdim=True)
    safe = torch.where(m > 0, m, torch.ones_like(m))
    return (y / safe).pow(2).sum(-1).sqrt() * m.squeeze(-1)


def bf16_round(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16).to(torch.float32)


def encode_dir(y: torch.Tensor, centroids: torch.Tensor, bounds: torch.Tensor, scale_mode: str = "ls"):
    """Codes and bf16-rounded scale of rotated vectors `y` `[..., D]` (float32).

    Returns `(codes int64 [..., D], scale float32 [...])`. Zero vector -> scale 0; any NaN/Inf -> scale NaN.
    """
    norm = robust_norm(y)
    finite = torch.isfinite(y).all(-1) & torch.isfinite(norm)
    pos = finite & (norm > 0)
    u = y / torch.where(pos, norm, torch.ones_like(norm))[..., None]
    u = torch.where(pos[..., None], u, torch.zeros_like(u))
    codes = torch.bucketize(u.contiguous(), bounds)
    if scale_mode == "norm":
        s = norm
    else:
        c = centroids[codes]
        s = (y * c).sum(-1) / (c * c).sum(-1)
    s = torch.where(pos, s, torch.zeros_like(s))
    s = torch.where(finite, s, torch.full_like(s, float("nan")))
    return codes, bf16_round(s)


def qjl_encode(e: torch.Tensor, S: torch.Tensor):
    """1-bit QJL of residuals `e` `[..., D]`: sign bits of S·e (1 = non-negative) and bf16 ‖e‖."""
    bits = (e @ S.T >= 0).to(torch.int64)
    rn = robust_norm(e)
    rn = torch.where(torch.isfinite(e).all(-1), rn, torch.full_like(rn, float("nan")))
    return bits, bf16_round(rn)


def qjl_decode(bits: torch.Tensor, rnorm: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
    D = S.shape[0]
    z = bits.to(torch.float32) * 2 - 1
    return (math.sqrt(math.pi / 2) / D) * rnorm[..., None] * (z @ S)


SINK_P = 2**31 - 1


def _sink_coeffs(n: int, device) -> torch.Tensor:
    g = torch.Generator().manual_seed(0x51AC)
    return torch.randint(1, SINK_P, (4, n), generator=g, dtype=torch.int64).to(device)


def sink_tags(k0: torch.Tensor, v0: torch.Tensor) -> torch.Tensor:
    """Content tag (int64 in [1, 2^62)) of exact first-token vectors `k0`, `v0` `[..., H, D]`: two
    independent sums of the 16-bit halves of their float32 bit patterns times fixed coefficients, mod 2^31 - 1.
    Equal values give equal tags; the kernels compute the same function."""
    x = torch.cat([k0, v0], -1).to(torch.float32).contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    hi, lo = x >> 16, x & 0xFFFF
    c = _sink_coeffs(x.shape[-1], x.device)
    h1 = (hi * c[0] + lo * c[1]).sum(-1) % SINK_P
    h2 = (hi * c[2] + lo * c[3]).sum(-1) % SINK_P
    tag = h1 * (1 << 31) + h2
    return torch.where(tag == 0, torch.ones_like(tag), tag)


def new_sink_table(num_entries: int, num_kv_heads: int, head_dim: int, dtype, device):
    """Per-layer table of exact first-token K/V: (`kv` [N, 2, H, D] model dtype, `tags` [N, H] int64, 0 = empty).
    Entry of a tag: tag % N. Content-addressed, so it needs no lifetime management: a page whose tag does not
    match its entry (overwritten, or loaded from another instance) falls back to its own codes."""
    return (torch.zeros(num_entries, 2, num_kv_heads, head_dim, dtype=dtype, device=device),
            torch.zeros(num_entries, num_kv_heads, dtype=torch.int64, device=device))


def bf16_bytes(x: torch.Tensor) -> torch.Tensor:
    """float `[...]` -> uint8 `[..., 2]` (little-endian bf16)."""
    return x.to(torch.bfloat16).contiguous().view(torch.uint8).reshape(*x.shape, 2)


def bf16_from_bytes(b: torch.Tensor) -> torch.Tensor:
    """uint8 `[..., 2]` -> float32 `[...]`."""
    return b.contiguous().view(torch.bfloat16).squeeze(-1).to(torch.float32)


class LayerCodec:
    """Constants of one layer (layout, rotation Π, QJL matrix S, codebooks) and the page encode/decode oracle."""

    def __init__(self, preset: Preset | str, head_dim: int, block_size: int, *, layer_index: int = 0,
                 seed: int = 0, device: torch.device | str = "cpu"):
        self.preset = get_preset(preset)
        self.layout = PageLayout(self.preset, head_dim, block_size)
        self.head_dim, self.block_size = int(head_dim), int(block_size)
        self.seed = layer_seed(seed, layer_index)
        self.device = torch.device(device)
        D = self.head_dim
        self.rot = rotation(D, self.seed, self.preset.rotation).to(self.device)  # Π: y = x @ Π.T
        self.qjl = qjl_matrix(D, self.seed).to(self.device) if self.preset.k_mode == "prod" else None
        self.centroids, self.bounds = {}, {}
        for kind in ("k", "v", "k_mean", "v_mean"):
            c, bnd = page_codebook(D, self.layout.bits_of(kind), kind)
            self.centroids[kind], self.bounds[kind] = c.to(self.device), bnd.to(self.device)

    # -- rotation -----------------------------------------------------------------------------------------
    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(torch.float32) @ self.rot.T

    def unrotate(self, y: torch.Tensor) -> torch.Tensor:
        return y.to(torch.float32) @ self.rot

    # -- one block of vectors -----------------------------------------------------------------------------
    def encode_blocks(self, k: torch.Tensor, v: torch.Tensor, first: torch.Tensor | None = None
                      ) -> dict[str, torch.Tensor]:
        """Code full blocks. `k`, `v`: `[N, B, H, D]` (any float dtype, original domain); `first` `[N]` bool marks
        blocks that start a sequence (their pages get the sink tag of token 0).
        Returns the page fields as uint8 tensors `[N, H, count, item_bytes]`."""
        out = {}
        if self.preset.sink:
            N, _, H, _ = k.shape
            tags = torch.zeros(N, H, dtype=torch.int64, device=k.device)
            if first is not None and bool(first.any()):
                f = first.to(device=k.device, dtype=torch.bool)
                tags[f] = sink_tags(k[f, 0], v[f, 0])
            out["sink_tag"] = tags.contiguous().view(torch.uint8).reshape(N, H, 1, 8)
        for kind, x in (("k", k), ("v", v)):
            y = self.rotate(x).permute(0, 2, 1, 3)  # [N, H, B, D]
            center = self.preset.k_center if kind == "k" else self.preset.v_center
            if center:
                mean = y.mean(dim=2)  # rotation commutes with the mean
                mc, ms = encode_dir(mean, self.centroids[f"{kind}_mean"], self.bounds[f"{kind}_mean"], "ls")
                mhat = ms[..., None] * self.centroids[f"{kind}_mean"][mc]
                y = y - mhat[:, :, None, :]
                self._put_codes(out, f"{kind}_mean", mc[:, :, None, :])
                out[f"{kind}_mean_scale"] = bf16_bytes(ms)[:, :, None, :]
            codes, s = encode_dir(y, self.centroids[kind], self.bounds[kind], self.preset.scale)
            self._put_codes(out, kind, codes)
            out[f"{kind}_scale"] = bf16_bytes(s)
            if kind == "k" and self.preset.k_mode == "prod":
                e = y - s[..., None] * self.centroids["k"][codes]
                bits, rn = qjl_encode(e, self.qjl)
                out["k_qjl"] = pack(bits, 1)
                out["k_rnorm"] = bf16_bytes(rn)
        return out

    def _put_codes(self, out, kind, codes):
        lay = self.layout
        packed = pack(codes, lay.bits_of(kind))
        prefix = {"k": "k_codes", "v": "v_codes", "k_mean": "k_mean", "v_mean": "v_mean"}[kind]
        off = 0
        for j, f in enumerate(lay.planes(kind)):
            out[f"{prefix}{j}"] = packed[..., off:off + f.item_bytes]
            off += f.item_bytes

    def _get_codes(self, fields, kind) -> torch.Tensor:
        prefix = {"k": "k_codes", "v": "v_codes", "k_mean": "k_mean", "v_mean": "v_mean"}[kind]
        planes = [fields[f"{prefix}{j}"] for j in range(len(self.layout.planes(kind)))]
        return unpack(torch.cat(planes, -1), self.layout.bits_of(kind), self.head_dim)

    def decode_fields(self, fields: dict[str, torch.Tensor], kind: str) -> torch.Tensor:
        """Dequantized vectors in the *rotated* domain, `[N, H, B, D]` float32 (mean and QJL terms included)."""
        codes = self._get_codes(fields, kind)
        s = bf16_from_bytes(fields[f"{kind}_scale"])
        y = s[..., None] * self.centroids[kind][codes]
        if kind == "k" and self.preset.k_mode == "prod":
            bits = unpack(fields["k_qjl"], 1, self.head_dim)
            y = y + qjl_decode(bits, bf16_from_bytes(fields["k_rnorm"]), self.qjl)
        if (self.preset.k_center if kind == "k" else self.preset.v_center):
            mc = self._get_codes(fields, f"{kind}_mean")
            ms = bf16_from_bytes(fields[f"{kind}_mean_scale"])
            y = y + ms[..., None] * self.centroids[f"{kind}_mean"][mc]
        return y

    # -- pages --------------------------------------------------------------------------------------------
    def page_view(self, kv_cache: torch.Tensor) -> torch.Tensor:
        """`[num_blocks, H, B, C]` uint8 cache -> `[num_blocks, H, B*C]` byte view of the head pages."""
        nb, H, B, C = kv_cache.shape
        if B != self.block_size or C != self.layout.bytes_per_token or kv_cache.dtype != torch.uint8:
            raise ValueError(f"kv_cache {tuple(kv_cache.shape)} {kv_cache.dtype} does not match {self.layout}")
        return kv_cache.view(nb, H, B * C)

    def write_pages(self, kv_cache: torch.Tensor, block_ids: torch.Tensor, fields: dict[str, torch.Tensor]):
        pages = self.page_view(kv_cache)
        N, H = block_ids.shape[0], pages.shape[1]
        buf = torch.zeros(N, H, self.layout.page_bytes, dtype=torch.uint8, device=pages.device)
        for name, f in self.layout.fields.items():
            buf[:, :, f.offset:f.end] = fields[name].reshape(N, H, f.nbytes)
        pages[block_ids.long()] = buf

    def read_fields(self, kv_cache: torch.Tensor, block_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        pages = self.page_view(kv_cache)[block_ids.long()]  # [N, H, P]
        N, H = pages.shape[:2]
        return {name: pages[:, :, f.offset:f.end].reshape(N, H, f.count, f.item_bytes)
                for name, f in self.layout.fields.items()}

    def read_sink_tags(self, kv_cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
        """int64 `[N, H]` sink tags of the pages of `block_ids` (0 where none)."""
        f = self.layout.fields["sink_tag"]
        raw = self.page_view(kv_cache)[block_ids.long()][:, :, f.offset:f.end]
        return raw.contiguous().view(torch.int64).squeeze(-1)

    def dequantize_pages(self, kv_cache: torch.Tensor, block_ids: torch.Tensor, rotated: bool = False):
        """K, V of whole blocks `[N, B, H, D]` float32 (rotated domain if `rotated`)."""
        fields = self.read_fields(kv_cache, block_ids)
        out = []
        for kind in ("k", "v"):
            y = self.decode_fields(fields, kind).permute(0, 2, 1, 3)
            out.append(y if rotated else self.unrotate(y))
        return out[0], out[1]
