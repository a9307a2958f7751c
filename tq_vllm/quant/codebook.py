"""Lloyd–Max codebooks for the coordinates of a uniformly rotated unit vector.

A coordinate t of a uniformly random unit vector in R^d has the density
    f_d(t) ∝ (1 - t²)^((d-3)/2),  t ∈ [-1, 1]
(≈ N(0, 1/d) for large d). The b-bit Lloyd–Max quantizer of f_d minimizes E(t - c(t))²; it is found by
Lloyd's iteration (centroid = conditional mean of its cell, boundary = midpoint of neighbouring centroids) with
the cell integrals taken from cumulative tables on a fine grid (double precision, converged to 1e-12).
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch

SUPPORTED_BITS = (1, 2, 3, 4, 5, 6, 7, 8)
_GRID = 1 << 20  # points of the integration grid on [-1, 1]
_TOL = 1e-12  # largest centroid move in units of the coordinate std 1/sqrt(d)


@functools.lru_cache(maxsize=None)
def _tables(dim: int):
    """Grid t, cumulative mass F(t), first moment G(t) of f_dim (F(1) = 1), and the cumulative mass H(t) of
    f^(1/3) (the asymptotically optimal point density, used to start Lloyd's iteration)."""
    if dim < 3:
        raise ValueError(f"head_dim {dim} too small: the coordinate law needs d >= 3")
    t = np.linspace(-1.0, 1.0, _GRID + 1)
    # log density, finite inside (-1, 1); the end points carry zero mass for d > 3
    with np.errstate(divide="ignore"):
        logf = 0.5 * (dim - 3) * np.log1p(-t * t)
    logf -= logf[np.isfinite(logf)].max()
    f = np.where(np.isfinite(logf), np.exp(logf), 0.0)
    dt = t[1] - t[0]
    # trapezoid cumulative integrals
    F = np.concatenate([[0.0], np.cumsum(0.5 * (f[1:] + f[:-1]) * dt)])
    tf = t * f
    G = np.concatenate([[0.0], np.cumsum(0.5 * (tf[1:] + tf[:-1]) * dt)])
    G /= F[-1]
    F /= F[-1]
    f3 = np.cbrt(f)
    H = np.concatenate([[0.0], np.cumsum(0.5 * (f3[1:] + f3[:-1]) * dt)])
    H /= H[-1]
    return t, F, G, H


def _lloyd(dim: int, bits: int, max_iter: int = 200000) -> tuple[np.ndarray, float, int]:
    t, F, G, H = _tables(dim)
    n = 1 << bits
    sigma = 1.0 / math.sqrt(dim)
    # start from the companding points (quantiles of f^(1/3)): near-optimal, so Lloyd converges fast
    q = np.interp((np.arange(n) + 0.5) / n, H, t)
    c = np.clip(q, -1 + 1e-9, 1 - 1e-9)
    it = 0
    for it in range(1, max_iter + 1):
        edges = np.concatenate([[-1.0], 0.5 * (c[1:] + c[:-1]), [1.0]])
        Fe = np.interp(edges, t, F)
        Ge = np.interp(edges, t, G)
        mass = np.diff(Fe)
        new = np.where(mass > 1e-300, np.diff(Ge) / np.maximum(mass, 1e-300), c)
        # symmetry of f_d: enforce it exactly against round-off drift
        new = 0.5 * (new - new[::-1])
        delta = np.max(np.abs(new - c)) / sigma
        c = new
        if delta < _TOL:
            break
    return c, float(delta), it


@functools.lru_cache(maxsize=None)
def _codebook_np(dim: int, bits: int) -> np.ndarray:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits} not supported; choose one of {SUPPORTED_BITS}")
    c, delta, _ = _lloyd(dim, bits)
    if delta >= _TOL:
        raise RuntimeError(f"Lloyd–Max did not converge for d={dim}, b={bits} (last step {delta:g})")
    return c


def codebook(dim: int, bits: int) -> torch.Tensor:
    """Sorted, symmetric float32 centroids `[2**bits]` for unit-vector coordinates at dimension `dim`."""
    return torch.from_numpy(_codebook_np(dim, bits).astype(np.float32))


def boundaries(dim: int, bits: int) -> torch.Tensor:
    """Decision thresholds `[2**bits - 1]` (midpoints of neighbouring centroids), float32."""
    c = _codebook_np(dim, bits)
    return torch.from_numpy((0.5 * (c[1:] + c[:-1])).astype(np.float32))


def expected_mse(dim: int, bits: int) -> float:
    """E(t - c(t))² per coordinate under f_dim, times dim = D_mse of a unit vector (paper's table)."""
    t, F, _, _ = _tables(dim)
    c = _codebook_np(dim, bits)
    edges = np.concatenate([[-1.0], 0.5 * (c[1:] + c[:-1]), [1.0]])
    # second moment table on demand (only used for reporting)
    f = np.diff(F, prepend=0.0)
    idx = np.clip(np.searchsorted(edges, t, side="right") - 1, 0, len(c) - 1)
    return float(np.sum(f * (t - c[idx]) ** 2) * dim)
