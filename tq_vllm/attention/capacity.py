"""Exact KV capacity arithmetic: what vLLM's allocator is told, and how many tokens it can therefore hold.

Per layer l with H_l KV heads (per rank) and page format f_l, one token costs H_l * C_l bytes, with
C_l = PageLayout(f_l, head_dim, B).bytes_per_token (or 2 * head_dim * itemsize for exact boundary layers). vLLM
makes blocks of B tokens over all layers, so with `available` bytes it holds

    num_blocks = available // (B * sum_l H_l * C_l),      tokens = num_blocks * B.
"""
from __future__ import annotations

from dataclasses import dataclass

from tq_vllm.quant.layout import page_layout
from tq_vllm.quant.presets import Preset


def bytes_per_token(preset: Preset | None, head_dim: int, block_size: int, dtype_itemsize: int = 2) -> int:
    """Bytes per token per KV head of one layer's pages; `preset=None` means exact pages (K and V in the model
    dtype, i.e. bf16: 4 * head_dim)."""
    if preset is None:
        return 2 * int(head_dim) * int(dtype_itemsize)
    if preset.name in _named():
        return page_layout(preset.name, int(head_dim), int(block_size)).bytes_per_token
    from tq_vllm.quant.layout import PageLayout
    return PageLayout(preset, int(head_dim), int(block_size)).bytes_per_token


def _named():
    from tq_vllm.quant.presets import PRESETS
    return PRESETS


@dataclass(frozen=True)
class LayerCost:
    name: str
    format: str  # preset name or "bf16"
    num_kv_heads: int
    head_dim: int
    bytes_per_token_per_head: int

    @property
    def bytes_per_token(self) -> int:
        return self.num_kv_heads * self.bytes_per_token_per_head

    @property
    def bf16_bytes_per_token(self) -> int:
        return self.num_kv_heads * 4 * self.head_dim


@dataclass(frozen=True)
class Capacity:
    layers: tuple[LayerCost, ...]
    block_size: int
    num_blocks: int | None = None

    @property
    def bytes_per_token(self) -> int:
        """All layers, all KV heads of this rank."""
        return sum(c.bytes_per_token for c in self.layers)

    @property
    def bf16_bytes_per_token(self) -> int:
        return sum(c.bf16_bytes_per_token for c in self.layers)

    @property
    def ratio_vs_bf16(self) -> float:
        return self.bf16_bytes_per_token / max(1, self.bytes_per_token)

    @property
    def tokens(self) -> int | None:
        return None if self.num_blocks is None else self.num_blocks * self.block_size

    def expected_blocks(self, available_bytes: int) -> int:
        return int(available_bytes) // (self.block_size * self.bytes_per_token)

    def expected_tokens(self, available_bytes: int) -> int:
        return self.expected_blocks(available_bytes) * self.block_size

    def summary(self) -> str:
        fmts: dict[str, list[LayerCost]] = {}
        for c in self.layers:
            fmts.setdefault(c.format, []).append(c)
        parts = [f"{len(v)} layers {k} ({v[0].bytes_per_token_per_head} B/token/KV head)" for k, v in fmts.items()]
        s = (f"{', '.join(parts)}; {self.bytes_per_token} bytes/token over all layers and KV heads "
             f"(bf16: {self.bf16_bytes_per_token}, {self.ratio_vs_bf16:.2f}x smaller)")
        if self.tokens is not None:
            bf16_tokens = self.num_blocks * self.block_size * self.bytes_per_token // max(1, self.bf16_bytes_per_token)
            s += (f"; KV capacity {self.tokens:,} tokens ({self.num_blocks:,} blocks x {self.block_size}) "
                  f"vs ~{bf16_tokens:,} tokens with bf16 pages")
        return s
