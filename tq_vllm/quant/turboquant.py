"""`TurboQuant`: the paper's vector quantizer with a byte-level API (one record per vector).

Record of one vector (bytes): code planes of the Lloyd–Max codes | scale (bf16)
                              | (prod) QJL sign bits [D/8] | residual norm (bf16)
"""
from __future__ import annotations

import torch

from .codebook import boundaries, codebook
from .codec import bf16_bytes, bf16_from_bytes, encode_dir, qjl_decode, qjl_encode
from .packing import pack, packed_bytes, unpack
from .rotation import qjl_matrix, rotation


class TurboQuant:
    """TurboQuant_mse / TurboQuant_prod (Zandieh et al., 2025) on vectors of `dim` values.

    mode="mse": Lloyd–Max codes at `bits` of the rotated unit vector + one scale.
    mode="prod": `bits-1` bits of mse codes + 1-bit QJL of the residual (unbiased inner products); for bits=1
    it is pure QJL.
    scale="norm" is the paper's ‖x‖; scale="ls" the least-squares ⟨y, c⟩/‖c‖² (smaller error for the same codes).
    """

    def __init__(self, dim: int, bits: int, mode: str = "mse", seed: int = 0, *, scale: str = "norm",
                 rotation_kind: str = "hadamard", device: torch.device | str = "cpu"):
        if mode not in ("mse", "prod"):
            raise ValueError(f"mode must be 'mse' or 'prod', got {mode!r}")
        if scale not in ("norm", "ls"):
            raise ValueError(f"scale must be 'norm' or 'ls', got {scale!r}")
        if not 1 <= bits <= 8:
            raise ValueError(f"bits must be in 1..8, got {bits}")
        self.dim, self.bits, self.mode, self.seed, self.scale = int(dim), int(bits), mode, int(seed), scale
        self.device = torch.device(device)
        self.code_bits = bits - 1 if mode == "prod" else bits
        self.rot = rotation(dim, seed, rotation_kind).to(self.device)
        if self.code_bits:
            self.centroids = codebook(dim, self.code_bits).to(self.device)
            self.bounds = boundaries(dim, self.code_bits).to(self.device)
        self.S = qjl_matrix(dim, seed).to(self.device) if mode == "prod" else None
        self._code_bytes = packed_bytes(dim, self.code_bits) if self.code_bits else 0
        self.bytes_per_vector = self._code_bytes + 2 + ((dim // 8 + 2) if mode == "prod" else 0)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """`x` `[..., dim]` float16/bfloat16/float32 -> uint8 `[..., bytes_per_vector]`."""
        if x.shape[-1] != self.dim:
            raise ValueError(f"last dim {x.shape[-1]} != {self.dim}")
        y = x.to(self.device, torch.float32) @ self.rot.T
        parts = []
        if self.code_bits:
            codes, s = encode_dir(y, self.centroids, self.bounds, self.scale)
            parts += [pack(codes, self.code_bits), bf16_bytes(s)]
            yhat = s[..., None] * self.centroids[codes]
        else:  # pure QJL: the "scale" slot carries nothing (0)
            parts.append(bf16_bytes(torch.zeros(y.shape[:-1], device=y.device)))
            yhat = torch.zeros_like(y)
            bad = ~torch.isfinite(y).all(-1)
            yhat[bad] = float("nan")
        if self.mode == "prod":
            bits, rn = qjl_encode(y - yhat, self.S)
            parts += [pack(bits, 1), bf16_bytes(rn)]
        return torch.cat(parts, -1)

    def dequantize(self, packed: torch.Tensor) -> torch.Tensor:
        """uint8 `[..., bytes_per_vector]` -> float32 `[..., dim]`."""
        if packed.shape[-1] != self.bytes_per_vector:
            raise ValueError(f"last dim {packed.shape[-1]} != bytes_per_vector {self.bytes_per_vector}")
        p = packed.to(self.device)
        cb = self._code_bytes
        s = bf16_from_bytes(p[..., cb:cb + 2])
        if self.code_bits:
            y = s[..., None] * self.centroids[unpack(p[..., :cb], self.code_bits, self.dim)]
        else:
            y = torch.zeros(*p.shape[:-1], self.dim, device=p.device)
        if self.mode == "prod":
            o = cb + 2
            bits = unpack(p[..., o:o + self.dim // 8], 1, self.dim)
            rn = bf16_from_bytes(p[..., o + self.dim // 8:o + self.dim // 8 + 2])
            y = y + qjl_decode(bits, rn, self.S)
        return y @ self.rot

    def __repr__(self) -> str:
        return (f"TurboQuant(dim={self.dim}, bits={self.bits}, mode={self.mode!r}, scale={self.scale!r}, "
                f"bytes_per_vector={self.bytes_per_vector})")
