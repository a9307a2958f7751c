"""Bit-plane packing of b-bit codes into bytes.

A b-bit code is split into planes of widths 8, 4, 2, 1 (the binary digits of b, low bits first): 3 bits = a 2-bit
plane (bits 0-1) + a 1-bit plane (bit 2). In a plane of width w, element i of a vector sits in byte i // (8/w) at
bit (i % (8/w))·w. Every plane element thus lies inside one byte at a shift known from i alone, which is what a
kernel wants (contiguous loads, static shifts, no straddling).
"""
from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def plane_widths(bits: int) -> tuple[int, ...]:
    """Widths of the planes of a `bits`-bit code, low bits first (e.g. 3 -> (2, 1), 7 -> (4, 2, 1))."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    if bits == 8:
        return (8,)
    widths, rest = [], bits
    for w in (4, 2, 1):
        if rest >= w:
            widths.append(w)
            rest -= w
    # low bits first: the widest plane holds the low bits
    return tuple(widths)


def plane_shifts(bits: int) -> tuple[int, ...]:
    """Bit position in the code of each plane's lowest bit."""
    out, s = [], 0
    for w in plane_widths(bits):
        out.append(s)
        s += w
    return tuple(out)


def packed_bytes(dim: int, bits: int) -> int:
    """Bytes of one packed vector of `dim` codes (all planes)."""
    total = 0
    for w in plane_widths(bits):
        if (dim * w) % 8:
            raise ValueError(f"dim {dim} is not a multiple of {8 // w} (needed by a {w}-bit plane)")
        total += dim * w // 8
    return total


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """`codes` uint8/int `[..., dim]` in [0, 2**bits) -> uint8 `[..., packed_bytes(dim, bits)]` (planes concatenated)."""
    codes = codes.to(torch.int32)
    dim = codes.shape[-1]
    out = []
    for w, s in zip(plane_widths(bits), plane_shifts(bits)):
        per = 8 // w
        v = (codes >> s) & ((1 << w) - 1)
        v = v.reshape(*codes.shape[:-1], dim // per, per)
        sh = torch.arange(per, dtype=torch.int32, device=codes.device) * w
        out.append((v << sh).sum(-1).to(torch.uint8))
    return torch.cat(out, dim=-1)


def unpack(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Inverse of `pack`: uint8 `[..., packed_bytes]` -> int64 codes `[..., dim]`."""
    p = packed.to(torch.int32)
    codes = torch.zeros(*p.shape[:-1], dim, dtype=torch.int32, device=p.device)
    off = 0
    for w, s in zip(plane_widths(bits), plane_shifts(bits)):
        per = 8 // w
        nb = dim * w // 8
        plane = p[..., off:off + nb]
        sh = torch.arange(per, dtype=torch.int32, device=p.device) * w
        v = (plane[..., :, None] >> sh) & ((1 << w) - 1)
        codes |= v.reshape(*p.shape[:-1], dim) << s
        off += nb
    return codes.to(torch.int64)
