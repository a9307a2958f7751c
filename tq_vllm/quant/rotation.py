"""Seeded random orthogonal rotations. To the kernels each is just a dense `[dim, dim]` matrix Π (y = Π x).

* "hadamard" (default): Π = H_d · diag(s) / √d with random signs s ∈ {±1}^d and the Sylvester Walsh–Hadamard
  matrix H_d. Needs a power-of-two d; for other head sizes (e.g. 96) there is no Sylvester matrix, so
  "hadamard" falls back to "qr" and says so in `rotation_kind()`.
* "qr": the paper's variant, Q of the QR decomposition of a Gaussian matrix with the signs of diag(R) folded in
  (Haar-distributed).
"""
from __future__ import annotations

import functools

import torch

KINDS = ("hadamard", "qr")


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def rotation_kind(dim: int, kind: str) -> str:
    """The kind actually used for `dim` (hadamard needs a power of two, otherwise qr)."""
    if kind not in KINDS:
        raise ValueError(f"unknown rotation {kind!r}; choose one of {KINDS}")
    return kind if kind == "qr" or _is_pow2(dim) else "qr"


def _sylvester(dim: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < dim:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


@functools.lru_cache(maxsize=256)
def _rotation(dim: int, seed: int, kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(int(seed) & 0x7FFF_FFFF_FFFF_FFFF)
    if rotation_kind(dim, kind) == "hadamard":
        signs = torch.randint(0, 2, (dim,), generator=g, dtype=torch.int64).to(torch.float64) * 2 - 1
        rot = _sylvester(dim) * signs[None, :] / dim**0.5
    else:
        a = torch.randn(dim, dim, generator=g, dtype=torch.float64)
        q, r = torch.linalg.qr(a)
        rot = q * torch.sign(torch.diagonal(r))[None, :]
    return rot.to(torch.float32).contiguous()


def rotation(dim: int, seed: int, kind: str = "hadamard") -> torch.Tensor:
    """Orthogonal `[dim, dim]` float32 Π for (dim, seed, kind); deterministic. Apply as `x @ Π.T`."""
    return _rotation(int(dim), int(seed), kind).clone()


@functools.lru_cache(maxsize=64)
def _gaussian(dim: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed((int(seed) * 0x9E3779B1 + 0x5151) & 0x7FFF_FFFF_FFFF_FFFF)
    return torch.randn(dim, dim, generator=g, dtype=torch.float32)


def qjl_matrix(dim: int, seed: int) -> torch.Tensor:
    """The QJL projection S `[dim, dim]` with i.i.d. N(0, 1) entries (seeded, independent of Π)."""
    return _gaussian(int(dim), int(seed)).clone()


def layer_seed(base_seed: int, layer_index: int) -> int:
    """Seed of one layer's rotation: distinct per layer, stable across processes and versions."""
    return (int(base_seed) * 1_000_003 + 7919 * (int(layer_index) + 1)) & 0x7FFF_FFFF
