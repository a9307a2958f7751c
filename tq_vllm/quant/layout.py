"""The one source of truth for the bytes of a compressed vLLM page.

vLLM hands each layer a uint8 tensor `[num_blocks, num_kv_heads, block_size, C]`. The `block_size × C` bytes of
one (block, KV head) form a *head page*; `PageLayout` says where each field of it lives (see docs/design.md):

    k code planes [B × D·w/8 each] | v code planes | k scales [B bf16] | v scales [B bf16] | (sink) tag [int64]
    | (prod) k QJL signs [B × D/8] | k residual norms [B bf16] | (centered) k mean planes | k mean scale | v mean ...

Token-major inside every plane, so the codes of a tile of tokens are one contiguous range.
`C = bytes_per_token = ceil(page_bytes / B)`; the tail of the head page is zero padding.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from .packing import plane_widths
from .presets import Preset, get_preset

LAYOUT_VERSION = 2  # 2: K/V codebooks of <= 4 bits on the 128-level grid (codebook.page_codebook)
SUPPORTED_HEAD_DIMS = (64, 96, 128, 256)
BF16 = 2


@dataclass(frozen=True)
class Field:
    """One field of a head page: `count` items of `item_bytes` each, starting at byte `offset`."""

    name: str
    offset: int
    item_bytes: int
    count: int  # block_size for per-token fields, 1 for per-block fields

    @property
    def nbytes(self) -> int:
        return self.item_bytes * self.count

    @property
    def end(self) -> int:
        return self.offset + self.nbytes


class PageLayout:
    """Byte layout of one head page for (preset, head_dim, block_size).

    Field names: `k_codes{j}` / `v_codes{j}` (plane j, token-major), `k_scale`, `v_scale` (bf16),
    `sink_tag` (int64, first block of a sequence only; 0 elsewhere), `k_qjl`, `k_rnorm` (prod),
    `k_mean{j}`, `k_mean_scale`, `v_mean{j}`, `v_mean_scale` (centered).
    """

    def __init__(self, preset: Preset | str, head_dim: int, block_size: int):
        self.preset = get_preset(preset)
        self.head_dim = int(head_dim)
        self.block_size = int(block_size)
        if self.head_dim not in SUPPORTED_HEAD_DIMS:
            raise ValueError(f"head_dim {self.head_dim} is not supported by tq_vllm; supported: "
                             f"{SUPPORTED_HEAD_DIMS}")
        if self.block_size < 1 or self.block_size % 16:
            raise ValueError(f"block_size {self.block_size} must be a positive multiple of 16")
        p, D, B = self.preset, self.head_dim, self.block_size
        self.k_bits, self.v_bits = p.k_code_bits, p.v_bits
        fields: list[Field] = []
        off = 0

        def add(name, item_bytes, count, align=1):
            nonlocal off
            off = -(-off // align) * align
            fields.append(Field(name, off, item_bytes, count))
            off += item_bytes * count

        for kv, bits in (("k", self.k_bits), ("v", self.v_bits)):
            for j, w in enumerate(plane_widths(bits)):
                add(f"{kv}_codes{j}", D * w // 8, B)
        add("k_scale", BF16, B, align=2)
        add("v_scale", BF16, B, align=2)
        if p.sink:
            add("sink_tag", 8, 1, align=8)
        if p.k_mode == "prod":
            add("k_qjl", D // 8, B)
            add("k_rnorm", BF16, B, align=2)
        for kv, on in (("k", p.k_center), ("v", p.v_center)):
            if on:
                for j, w in enumerate(plane_widths(p.mean_bits)):
                    add(f"{kv}_mean{j}", D * w // 8, 1)
                add(f"{kv}_mean_scale", BF16, 1, align=2)
        self.fields: dict[str, Field] = {f.name: f for f in fields}
        self.used_bytes = off
        self.bytes_per_token = math.ceil(off / B)
        self.page_bytes = self.bytes_per_token * B  # per (block, KV head)

    # -- accessors used by the kernels, the backend and the connector ------------------------------------
    def offset(self, name: str) -> int:
        return self.fields[name].offset

    def planes(self, kind: str) -> list[Field]:
        """Code planes of "k", "v", "k_mean" or "v_mean", low bits first."""
        key = {"k": "k_codes", "v": "v_codes", "k_mean": "k_mean", "v_mean": "v_mean"}[kind]
        return [f for n, f in self.fields.items() if n.startswith(key) and n[len(key):].isdigit()]

    def bits_of(self, kind: str) -> int:
        return {"k": self.k_bits, "v": self.v_bits, "k_mean": self.preset.mean_bits,
                "v_mean": self.preset.mean_bits}[kind]

    def compression_vs_bf16(self) -> float:
        return 4 * self.head_dim / self.bytes_per_token

    def fingerprint(self) -> str:
        """Identifies the byte format (used by the connector so a block is never read under another format)."""
        p = self.preset
        return (f"tqv{LAYOUT_VERSION}:{p.k_bits}{p.k_mode}{int(p.k_center)}:{p.v_bits}{int(p.v_center)}:s{int(p.sink)}:"
                f"m{p.mean_bits}:{p.scale}:{p.rotation}:d{self.head_dim}:b{self.block_size}")

    def describe(self) -> str:
        lines = [f"PageLayout v{LAYOUT_VERSION} preset={self.preset.name} head_dim={self.head_dim} "
                 f"block_size={self.block_size}: {self.page_bytes} bytes per (block, KV head) = "
                 f"{self.bytes_per_token} bytes per token per KV head ({self.compression_vs_bf16():.2f}x vs bf16)"]
        for f in self.fields.values():
            lines.append(f"  [{f.offset:6d}, {f.end:6d})  {f.name:14s} {f.count} x {f.item_bytes} B")
        pad = self.page_bytes - self.used_bytes
        lines.append(f"  [{self.used_bytes:6d}, {self.page_bytes:6d})  padding        {pad} B")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"PageLayout({self.preset.name!r}, head_dim={self.head_dim}, block_size={self.block_size}, "
                f"bytes_per_token={self.bytes_per_token})")


@functools.lru_cache(maxsize=256)
def page_layout(preset_name: str, head_dim: int, block_size: int) -> PageLayout:
    """Cached layout of a *named* preset."""
    return PageLayout(preset_name, head_dim, block_size)


