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
GRID_LEVELS = 128  # page codebooks of <= 4 bits: Lloyd–Max centroids rounded to delta * (u - 63.5), u in [0, 127]
GRID_MID = (GRID_LEVELS - 1) / 2
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
    return _cell_mse(dim, _codebook_np(dim, bits))


# -- the page codebooks ----------------------------------------------------------------------------------------
# K and V codes of <= 4 bits use the Lloyd–Max centroids rounded to a symmetric 128-level grid: c = delta·(u − 63.5)
# with an integer u in [0, 127]. The decode kernels then turn a code into fp16 with byte permutes alone: the fp16 with
# high byte 0x64 and low byte u is exactly 1024 + u, and the offset and delta are applied once per dot product
# (kernels/lut.py). Rounding moves a centroid by at most delta/2 (1/127 of the widest one); the mean squared error
# grows by about 1 % at 4 bits (tests/test_quant.py bounds it).


@functools.lru_cache(maxsize=None)
def _moments(dim: int):
    """t, F, G and the cumulative second moment K(t) of f_dim (same normalisation as F)."""
    t, F, G, _ = _tables(dim)
    tm = 0.5 * (t[1:] + t[:-1])
    K = np.concatenate([[0.0], np.cumsum(tm * tm * np.diff(F))])
    return t, F, G, K


def _cell_mse(dim: int, c: np.ndarray) -> float:
    """E(t − c(t))² · dim for sorted centroids c with midpoint cells (cumulative moment tables, O(len(c)))."""
    t, F, G, K = _moments(dim)
    e = np.concatenate([[-1.0], 0.5 * (c[1:] + c[:-1]), [1.0]])
    m0, m1, m2 = (np.diff(np.interp(e, t, T)) for T in (F, G, K))
    return float(np.sum(m2 - 2 * c * m1 + c * c * m0) * dim)


@functools.lru_cache(maxsize=None)
def _grid_np(dim: int, bits: int) -> tuple[np.ndarray, float, np.ndarray]:
    """Grid centroids, delta and u: the delta (>= widest centroid / 63.5) and the integer u of the upper half that
    minimise the mean squared error (rounded Lloyd–Max, then coordinate descent by ±1 steps), mirrored below."""
    c = _codebook_np(dim, bits)
    n = len(c)

    def full(delta, uh):
        u = np.concatenate([(GRID_LEVELS - 1) - uh[::-1], uh])
        return delta * (u - GRID_MID), u

    best = None
    for f in np.linspace(1.0, 1.15, 61):
        delta = float(c[-1]) / GRID_MID * f
        uh = np.minimum(np.rint(c[n // 2:] / delta + GRID_MID), GRID_LEVELS - 1).astype(np.int64)
        m = _cell_mse(dim, full(delta, uh)[0])
        improved = True
        while improved:
            improved = False
            for i in range(len(uh)):
                for step in (-1, 1):
                    v = uh.copy()
                    v[i] += step
                    if not GRID_MID < v[i] <= GRID_LEVELS - 1 or np.any(np.diff(v) <= 0):
                        continue
                    mv = _cell_mse(dim, full(delta, v)[0])
                    if mv < m - 1e-15:
                        m, uh, improved = mv, v, True
        if best is None or m < best[0] - 1e-15:
            best = (m, delta, uh)
    cg, u = full(best[1], best[2])
    return cg, best[1], u


def grid_codebook(dim: int, bits: int) -> torch.Tensor:
    """Page centroids `[2**bits]` float32 for `bits` <= 4: the Lloyd–Max centroids on the 128-level grid."""
    if bits > 4:
        raise ValueError(f"grid codebooks exist for <= 4 bits, not {bits}")
    return torch.from_numpy(_grid_np(dim, bits)[0].astype(np.float32))


def grid_boundaries(dim: int, bits: int) -> torch.Tensor:
    """Decision thresholds of `grid_codebook` (midpoints), float32."""
    c = _grid_np(dim, bits)[0]
    return torch.from_numpy((0.5 * (c[1:] + c[:-1])).astype(np.float32))


def grid_of(centroids) -> tuple[float, list[int]] | None:
    """`(delta, u)` when sorted, symmetric `centroids` lie on the 128-level grid (c = delta·(u − 63.5)), else None.
    The widest centroid sits at u = 64 + k for the largest k that makes every u an integer."""
    c = np.asarray([float(x) for x in centroids], dtype=np.float64)
    if len(c) < 2 or c[-1] <= 0:
        return None
    for top in range(GRID_LEVELS - 1, int(GRID_MID), -1):
        delta = c[-1] / (top - GRID_MID)
        u = c / delta + GRID_MID
        ui = np.rint(u)
        if np.max(np.abs(u - ui)) < 1e-3 and ui.min() >= 0:
            return float(delta), [int(x) for x in ui]
    return None


def page_codebook(dim: int, bits: int, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(centroids, boundaries) of a page field: K/V codes of <= 4 bits on the grid, everything else Lloyd–Max."""
    if kind in ("k", "v") and bits <= 4:
        return grid_codebook(dim, bits), grid_boundaries(dim, bits)
    return codebook(dim, bits), boundaries(dim, bits)
