"""A faithful torch re-implementation of vLLM's own TurboQuant KV cache (vLLM 0.26, `--kv-cache-dtype turboquant_*`).

Read from vLLM 0.26.0's code (`vllm/model_executor/layers/quantization/turboquant/{config,centroids}.py`,
`vllm/v1/attention/backends/turboquant_attn.py`, `vllm/v1/attention/ops/triton_turboquant_{store,decode}.py`):

* Keys ("MSE" modes, 3 or 4 bits): `n = ‖k‖` (float32), `u = k / (n + 1e-8)`, `y = u · H` with H the Sylvester
  Walsh–Hadamard matrix / √D (no random signs, the same matrix in every layer), indices = number of Lloyd–Max
  midpoints ≤ y (binary search with `y >= mid`), the codebook being Lloyd–Max for a Gaussian N(0, 1/D) solved by
  200-point trapezoid integration on ±3.5σ (reproduced exactly below). Stored: packed indices + `n` as fp16.
  Decode: `c = centroids[idx]`; with norm correction ("_nc" presets) `c ← c / sqrt(‖c‖² + 1e-16)`;
  `k̂_rot = fp16(n) · c`; scores are `(q·H)·k̂_rot`, i.e. `k̂ = k̂_rot · H`.
* Keys, fp8 mode (k8v4): `k` cast to float8 e4m3 (e4nv on Hopper), no scale, no rotation.
* Values: per token, not rotated, uniform min/max: `scale = max((max-min)/(2^b-1), 1e-8)`,
  `q = clamp(int((v-min)/scale + 0.5), 0, 2^b-1)`; stored `q`, fp16(scale), fp16(min); decode `q·scale + min`
  with the fp16-rounded scale and min.
* Every token is quantized when it is written (before attention reads it): in decode every query attends to the
  quantized K/V of all tokens up to and including itself.
* Bytes per token per KV head (`slot_size_aligned`): key `ceil(D·b/8) + 2` (fp8: D) + value `ceil(D·bv/8) + 4`,
  rounded up to even: D=128: k8v4 196, 4bit_nc 134, k3v4_nc 118, 3bit_nc 102; D=64: 100, 70, 62, 54.
* Boundary layers: `vllm/engine/arg_utils.py` adds `TurboQuantConfig.get_boundary_skip_layers()` (the first 2 and
  last 2 layers of a dense model, at most half of them) to `kv_cache_dtype_skip_layers`: those layers keep bf16.
"""
from __future__ import annotations

import functools
import math

import torch

RECIPES: dict[str, dict] = {
    "k8v4": {"key_quant_bits": 8, "value_quant_bits": 4, "norm_correction": False},
    "4bit_nc": {"key_quant_bits": 4, "value_quant_bits": 4, "norm_correction": True},
    "k3v4_nc": {"key_quant_bits": 3, "value_quant_bits": 4, "norm_correction": True},
    "3bit_nc": {"key_quant_bits": 3, "value_quant_bits": 3, "norm_correction": True},
}
FP8_MAX = 448.0  # float8 e4m3 (e4nv) largest finite value


def recipe_name(name: str) -> str:
    n = name.removeprefix("turboquant_").removeprefix("vllm:")
    if n not in RECIPES:
        raise ValueError(f"unknown vLLM TurboQuant recipe {name!r}; known: {', '.join(RECIPES)}")
    return n


@functools.lru_cache(maxsize=None)
def vllm_lloyd_max(d: int, bits: int, max_iter: int = 200, tol: float = 1e-10) -> tuple[tuple, tuple]:
    """vLLM's `solve_lloyd_max` verbatim (pure python, Gaussian N(0, 1/d), trapezoid rule with n=200)."""
    n_levels = 2**bits
    sigma2 = 1.0 / d
    sigma = math.sqrt(sigma2)

    def pdf(x):
        return (1.0 / math.sqrt(2 * math.pi * sigma2)) * math.exp(-x * x / (2 * sigma2))

    def trapz(f, a, b, n=200):
        h = (b - a) / n
        r = 0.5 * (f(a) + f(b))
        for i in range(1, n):
            r += f(a + i * h)
        return r * h

    lo, hi = -3.5 * sigma, 3.5 * sigma
    c = [lo + (hi - lo) * (i + 0.5) / n_levels for i in range(n_levels)]
    for _ in range(max_iter):
        bnd = [(c[i] + c[i + 1]) / 2.0 for i in range(n_levels - 1)]
        edges = [lo * 3] + bnd + [hi * 3]
        new = []
        for i in range(n_levels):
            a, b = edges[i], edges[i + 1]
            num = trapz(lambda x: x * pdf(x), a, b)
            den = trapz(pdf, a, b)
            new.append(num / den if den > 1e-15 else c[i])
        if max(abs(new[i] - c[i]) for i in range(n_levels)) < tol:
            break
        c = new
    bnd = [(c[i] + c[i + 1]) / 2.0 for i in range(n_levels - 1)]
    return tuple(c), tuple(bnd)


@functools.lru_cache(maxsize=None)
def plain_hadamard(d: int) -> torch.Tensor:
    """Sylvester Hadamard / √d (symmetric, orthonormal), as vLLM builds it."""
    if d & (d - 1):
        raise ValueError(f"vLLM's TurboQuant needs a power-of-two head_dim, got {d}")
    h = torch.tensor([[1.0]], dtype=torch.float64)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / math.sqrt(d)).to(torch.float32)


def fp16_round(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).to(torch.float32)


def fp8_round(x: torch.Tensor) -> torch.Tensor:
    """float -> float8 e4m3fn (saturating at ±448, like a satfinite conversion) -> float32."""
    return x.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).to(torch.float32)


class VllmTurboQuant:
    """Quantize-dequantize K or V vectors exactly as vLLM 0.26's TurboQuant recipe `name` does."""

    def __init__(self, name: str, head_dim: int):
        self.name = recipe_name(name)
        cfg = RECIPES[self.name]
        self.head_dim = int(head_dim)
        self.key_bits = cfg["key_quant_bits"]
        self.value_bits = cfg["value_quant_bits"]
        self.norm_correction = cfg["norm_correction"]
        self.key_fp8 = self.key_bits == 8
        if not self.key_fp8:
            c, b = vllm_lloyd_max(self.head_dim, self.key_bits)
            self.centroids = torch.tensor(c, dtype=torch.float32)
            self.midpoints = torch.tensor(b, dtype=torch.float32)
            self.H = plain_hadamard(self.head_dim)

    # -- bytes ----------------------------------------------------------------------------------------
    @property
    def key_packed_size(self) -> int:
        D = self.head_dim
        return D if self.key_fp8 else math.ceil(D * self.key_bits / 8) + 2

    @property
    def value_packed_size(self) -> int:
        return math.ceil(self.head_dim * self.value_bits / 8) + 4

    @property
    def slot_size_aligned(self) -> int:
        s = self.key_packed_size + self.value_packed_size
        return s + (s % 2)

    # -- keys -----------------------------------------------------------------------------------------
    def encode_keys(self, k: torch.Tensor):
        """`k` `[..., D]` -> (indices int64 `[..., D]`, fp16-rounded norms `[...]`) (MSE modes)."""
        kf = k.to(torch.float32)
        norms = kf.norm(dim=-1, keepdim=True)
        y = (kf / (norms + 1e-8)) @ self.H  # H is symmetric: x_hat @ PiT with PiT = H
        idx = torch.bucketize(y.contiguous(), self.midpoints, right=True)  # = #midpoints <= y
        return idx.clamp_max(len(self.centroids) - 1), fp16_round(norms.squeeze(-1))

    def decode_keys_rotated(self, idx: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
        c = self.centroids[idx]
        if self.norm_correction:
            c = c / torch.sqrt((c * c).sum(-1, keepdim=True) + 1e-16)
        return norms[..., None] * c

    def qdq_keys(self, k: torch.Tensor) -> torch.Tensor:
        if self.key_fp8:
            return fp8_round(k.to(torch.float32))
        idx, n = self.encode_keys(k)
        return self.decode_keys_rotated(idx, n) @ self.H

    # -- values ---------------------------------------------------------------------------------------
    def encode_values(self, v: torch.Tensor):
        vf = v.to(torch.float32)
        levels = (1 << self.value_bits) - 1
        vmin = vf.amin(-1, keepdim=True)
        vmax = vf.amax(-1, keepdim=True)
        scale = ((vmax - vmin) / levels).clamp_min(1e-8)
        q = ((vf - vmin) / scale + 0.5).to(torch.int32).clamp(0, levels)  # .to(int32) truncates like Triton
        return q, fp16_round(scale.squeeze(-1)), fp16_round(vmin.squeeze(-1))

    @staticmethod
    def decode_values(q, scale, zero) -> torch.Tensor:
        return q.to(torch.float32) * scale[..., None] + zero[..., None]

    def qdq_values(self, v: torch.Tensor) -> torch.Tensor:
        return self.decode_values(*self.encode_values(v))

    def qdq(self, k: torch.Tensor, v: torch.Tensor):
        return self.qdq_keys(k), self.qdq_values(v)


def boundary_skip_layers(num_layers: int, n: int = 2) -> list[int]:
    """vLLM's `TurboQuantConfig.get_boundary_skip_layers` for a dense model: the first n and last n layers."""
    if n <= 0 or num_layers <= 0:
        return []
    n = min(n, num_layers // 2)
    return sorted(set(range(n)) | set(range(num_layers - n, num_layers)))
