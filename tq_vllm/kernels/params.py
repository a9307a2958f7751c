"""Host-side constants of the Triton kernels: layout offsets as constexprs, device tables, launch choices.

Nothing here touches device memory after the first call per (codec, device): the tables are cached on the codec.
"""
from __future__ import annotations

import functools
import math
import os

import torch

from tq_vllm.quant.codec import LayerCodec
from tq_vllm.quant.packing import plane_widths

DC = 32  # head-dim chunk of the in-kernel fp32 matrix products (every supported head_dim is a multiple of 32)


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def floor_pow2(n: int) -> int:
    return 1 << (max(1, int(n)).bit_length() - 1)


def _planes(layout, kind, prefix):
    """(offset, width) of up to 3 planes of `kind`, as constexpr kwargs `{prefix}O{j}`, `{prefix}W{j}`."""
    fs = layout.planes(kind)
    ws = plane_widths(layout.bits_of(kind))
    assert len(fs) == len(ws) <= 3, (kind, fs, ws)
    out = {}
    for j in range(3):
        out[f"{prefix}O{j}"] = fs[j].offset if j < len(fs) else 0
        out[f"{prefix}W{j}"] = ws[j] if j < len(ws) else 0
    return out


def lattice(D: int, widest: list[int]) -> int:
    """Sub-lattice count R: coordinate i = R*t + r is decoded as column t of lattice r, so that the codes of one
    lattice come from contiguous bytes of the widest plane. R divides 8/w for every plane read with it and keeps
    D/R >= 16 (the K dim of tl.dot)."""
    R = min([8 // w for w in widest] + [max(1, D // 16)])
    return floor_pow2(R)


@functools.lru_cache(maxsize=None)
def _layout_constexprs(preset_key, layout):
    p = layout.preset
    D = layout.head_dim
    kw = {}
    kw.update(_planes(layout, "k", "K"))
    kw.update(_planes(layout, "v", "V"))
    kw["KSO"] = layout.offset("k_scale")
    kw["VSO"] = layout.offset("v_scale")
    kw["KC"] = bool(p.k_center)
    kw["VC"] = bool(p.v_center)
    if p.k_center:
        kw.update(_planes(layout, "k_mean", "KM"))
        kw["KMSO"] = layout.offset("k_mean_scale")
    else:
        kw.update({f"KM{a}{j}": 0 for a in "OW" for j in range(3)})
        kw["KMSO"] = 0
    if p.v_center:
        kw.update(_planes(layout, "v_mean", "VM"))
        kw["VMSO"] = layout.offset("v_mean_scale")
    else:
        kw.update({f"VM{a}{j}": 0 for a in "OW" for j in range(3)})
        kw["VMSO"] = 0
    kw["PROD"] = p.k_mode == "prod"
    kw["QJO"] = layout.offset("k_qjl") if kw["PROD"] else 0
    kw["RNO"] = layout.offset("k_rnorm") if kw["PROD"] else 0
    kw["SINK"] = bool(getattr(p, "sink", False)) and "sink_tag" in layout.fields
    kw["SINKO"] = layout.offset("sink_tag") if kw["SINK"] else 0
    kw["PAGE"] = layout.page_bytes
    kw["D"] = D
    kw["B"] = layout.block_size
    # lattices used by attention
    kwid = [kw["KW0"]] + ([kw["KMW0"]] if p.k_center else []) + ([1] if kw["PROD"] else [])
    vwid = [kw["VW0"]] + ([kw["VMW0"]] if p.v_center else [])
    RK, RV = lattice(D, kwid), lattice(D, vwid)
    kw["RK"], kw["RV"] = RK, RV
    kw["XK"], kw["XV"] = next_pow2(D // RK), next_pow2(D // RV)
    return kw


def layout_constexprs(layout) -> dict:
    """Constexpr kwargs shared by the attention kernels (offsets, widths, lattices) of a PageLayout."""
    return dict(_layout_constexprs(layout.preset, layout))


def store_constexprs(layout) -> dict:
    kw = layout_constexprs(layout)
    p = layout.preset
    for k in ("RK", "RV", "XK", "XV"):
        kw.pop(k)
    kw["KBITS"] = layout.k_bits
    kw["VBITS"] = layout.v_bits
    kw["MBITS"] = p.mean_bits
    kw["NORM"] = p.scale == "norm"
    kw["USED"] = layout.used_bytes
    kw["PADP"] = next_pow2(max(1, layout.page_bytes - layout.used_bytes))
    return kw


class DeviceTables:
    """Per-layer device constants the kernels read: Π (fp32), S·Π for prod keys, codebooks and boundaries."""

    def __init__(self, codec: LayerCodec, device: torch.device):
        f32 = dict(device=device, dtype=torch.float32)
        self.rot = codec.rot.to(**f32).contiguous()  # Π, y = x @ Π.T
        # randomized Hadamard: sqrt(D)*Π is exactly ±1, so 16-bit tensor-core products with fp32 accumulation are as
        # exact as an fp32 product; keep it in both 16-bit dtypes (None for dense QR rotations)
        D = codec.head_dim
        pm = codec.rot.double() * math.sqrt(D)
        self.pm1 = bool(torch.all((pm.abs() - 1).abs() < 1e-6))
        self.rsd = 1.0 / math.sqrt(D) if self.pm1 else 1.0
        # Π = H_D·diag(s)/√D exactly (the "hadamard" rotation): the decode and its split reduction rotate with a
        # Walsh-Hadamard transform and the signs s (row 0 of √D·Π) instead of a product with the matrix
        self.had = False
        if self.pm1 and D & (D - 1) == 0:
            from tq_vllm.quant.rotation import _sylvester
            pr = pm.round()
            self.had = bool(torch.equal(pr, _sylvester(D).to(pr.device) * pr[0][None, :]))
        self.rot16 = {}
        if self.pm1:
            for dt in (torch.bfloat16, torch.float16):
                self.rot16[dt] = pm.round().to(device=device, dtype=dt).contiguous()
        if codec.qjl is not None:
            self.qjl = codec.qjl.to(**f32).contiguous()  # S
            self.qjl_rot = (codec.qjl.double() @ codec.rot.double()).to(**f32).contiguous()  # S·Π: u = q @ (SΠ).T
        else:
            self.qjl = self.qjl_rot = torch.zeros(1, **f32)
        from tq_vllm.quant.codec import _sink_coeffs
        self.sink_coef = _sink_coeffs(2 * D, device).contiguous()  # [4, 2D] int64, as codec.sink_tags
        self.c32, self.c16, self.bnd = {}, {}, {}
        from .lut import grid_values
        for kind in ("k", "v", "k_mean", "v_mean"):
            c = codec.centroids[kind].to(**f32).contiguous()
            self.c32[kind] = c
            # fp16 centroids; for grid codebooks followed by the 4-bit asm's decoded values, offset form at 16, signed
            # form at 32 (TQ_VLLM_LUT=emulate gathers them in place of the asm)
            tail = []
            if kind in ("k", "v") and len(c) == 16:
                # (a codebook off the grid has neither; the signed values exist only for symmetric grid codebooks)
                tail = [t.to(device) for t in (grid_values(c.tolist(), False), grid_values(c.tolist(), True))
                        if t is not None]
            self.c16[kind] = torch.cat([c.to(torch.float16)] + tail).contiguous()
            self.bnd[kind] = codec.bounds[kind].to(**f32).contiguous()
        # which codebooks the store may code from |u| (store._encode SYM), decided on the fp32 tables it reads
        self.sym = {kind: symmetric_codebook(codec.bounds[kind], codec.centroids[kind]) for kind in self.bnd}


    def rot_for(self, dtype):
        """(matrix, PM1, scale) for rotating `dtype` vectors: the exact ±1 matrix in that dtype, else fp32 Π."""
        m = self.rot16.get(dtype)
        if m is None:
            return self.rot, False, 1.0
        return m, True, self.rsd


def symmetric_codebook(bounds: torch.Tensor, centroids: torch.Tensor) -> bool:
    """True when the fp32 boundaries (2^b - 1, ascending) have an exact 0 in the middle and mirror about it, and the
    centroids mirror too (c[MID - j] = -c[MID + 1 + j]): then the count of boundaries below u is decided by |u| and
    the upper half alone, with identical results."""
    b = bounds.detach().to("cpu", torch.float32)
    c = centroids.detach().to("cpu", torch.float32)
    n = b.numel()
    if n < 1 or c.numel() != n + 1 or n & (n + 1):
        return False
    mid = n // 2
    return bool(b[mid] == 0 and torch.equal(b[mid + 1:], -b[:mid].flip(0))
                and torch.equal(c[mid + 1:], -c[:mid + 1].flip(0)) and bool((b[1:] > b[:-1]).all()))


def tables(codec: LayerCodec, device) -> DeviceTables:
    device = torch.device(device)
    cache = codec.__dict__.setdefault("_tq_kernel_tables", {})
    key = (device.type, device.index)
    t = cache.get(key)
    if t is None:
        t = cache[key] = DeviceTables(codec, device)
    return t


@functools.lru_cache(maxsize=None)
def num_sms(device_index: int) -> int:
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(device_index).multi_processor_count
    return 8


def choose_splits(num_rows: int, num_kv_heads: int, max_seq_len: int, tile_tokens: int, sms: int,
                  factor: float | None = None, per_sm: int = 4, waves: int = 3, min_tiles: int = 8) -> int:
    """Split-K count of the decode launch (host ints only: CUDA-graph safe), the larger of
    * small batches: `factor` programs per SM (default `per_sm`: every resident slot of the launch once), at least
      2 tiles a split;
    * large batches: up to `waves` full waves of `per_sm` programs per SM (the decode kernel's occupancy at its
      128-register cap), at least `min_tiles` tiles a split.
    Measured on an H200 (tq4, B=32, 2026-11-27, decode_variants.jsonl): at 64 x 8K 1/2/3/4 splits took
    0.3818/0.3784/0.3769/0.3828 ms, at 32 x 32K 2/3/4/6/8 took 0.7197/0.7447/0.7111/0.7060/0.7067 (a part-filled
    wave costs: 3 splits = 1.45 waves), at 8 x 8K 5/8/12/16 took 0.076/0.0646/0.0783/0.0704. The small-batch rule
    filled the GPU twice (factor 2) until 2026-11-28: a program's page tiles are a chain of dependent latencies, so
    at 2 programs per SM the SMs idled; every slot once took tq4 1 x 32K from 0.0439 to 0.0358 ms and 4 x 8K from
    0.0451 to 0.0368 (bf16 FlashAttention 3: 0.0417 / 0.0410), tq3 1 x 8K 0.0308 -> 0.0252 (decode_variants.jsonl
    "2026-11-28c")."""
    if factor is None or factor <= 0:
        factor = per_sm
    if num_rows <= 0:
        return 1
    pairs = max(1, num_rows * num_kv_heads)
    tiles = max(1, math.ceil(max_seq_len / tile_tokens))
    small = min(math.ceil(factor * sms / pairs), math.ceil(tiles / 2))
    large = min((waves * per_sm * sms) // pairs, tiles // min_tiles)
    return int(max(1, min(max(small, large), 64)))


# The narrow decode launch: one warp per program over 32-token tiles at up to 168 registers (12 programs per SM), for
# large decode batches. Its reductions over a tile's tokens stay inside one warp (no barrier rounds between warps; the
# 4-warp program meets at 19 per tile). Measured on an H200 (tq4, B = 32, 2026-11-27, decode_variants.jsonl
# "2026-11-27n"), against the 4-warp launch at its split count: 32 x 32K 0.609 vs 0.673 ms, 64 x 8K 0.343 vs 0.361 (8
# splits; 9 took 0.361); below the thresholds (4-warp launch kept): 16 x 32K 0.347 vs 0.353-0.363 and 8 x 8K 0.062 vs
# 0.064 only at the best of several split counts (24 splits; 16, 20, 28 and 32 took 0.067-0.081), slower at 64 x 4K
# (0.210 vs 0.202), 4 x 32K (0.117 vs 0.111) and 1 x 32K (0.079 vs 0.047).
NARROW_CFG = dict(num_warps=1, num_stages=2, maxnreg=168)
NARROW_TILE = 32
NARROW_MIN_PAIRS = 256  # (decode rows x KV heads) from which the narrow launch is used ...
NARROW_MIN_TOKENS = 512 * 1024  # ... when rows x max_seq_len reaches this too
# The 4-bit grid asm's form in the narrow launch (lut.py): "offset". The signed form (the default elsewhere: 8 x 8K
# 0.0586 vs 0.0634 ms, 1 x 1K 0.0163 vs 0.0167 in the 4-warp launch) spills 32 registers per tile at the narrow
# launch's 168 and took 64 x 8K 0.3501 vs 0.3396 ms, 32 x 32K 0.6706 vs 0.6466 (H200, 2026-11-27, decode_variants.jsonl
# "2026-11-27s"; at 200 registers, 10 programs per SM, 0.3910 and 0.7034).
NARROW_LUT4 = "offset"
NARROW_WAVES = 2.9  # its split count keeps the page programs just under 3 waves (64 x 8 pairs: 8 splits, 32 x 8: 17)


# The two-warp decode launch for layers with 4 value lattices (2- and 3-bit values: tq3, tq35, tq25): programs of 2
# warps over 64-token tiles at up to 168 registers (6 programs per SM), 3 pipeline stages. In the 4-warp program a
# value lattice is a [32, tokens] A operand, half the rows of 4 warps' MMA layout (Triton gives chained dots one warp
# layout, and the score dot's puts the warps along the tokens), so two warps repeat the other two's value dots. Two
# warps cover the 32 rows once. (3-bit values are still decoded in a blocked layout and moved to the operand layout
# through shared memory: their high-bit nibbles are interleaved across rows.) Measured on an H200 (B = 32, 2026-11-28,
# decode_variants.jsonl "2026-11-28a"), against the 4-warp launch in the same call: tq3 32 x 32K 0.916 vs 1.102 ms,
# 64 x 8K 0.488 vs 0.570, 8 x 8K 0.089 vs 0.095, 1 x 1K 0.0202 vs 0.0209; tq25 32 x 32K 0.832 vs 1.077; tq35 0.993 vs
# 1.270. Not for 4-bit values (two lattices of 64 rows already fill 4 warps): tq4 32 x 32K 0.670 vs 0.622.
W2_CFG = dict(num_warps=2, num_stages=3, maxnreg=168)
W2_TILE = 64
# Decode tokens (rows x max_seq_len) from which the two-warp launch is used: below, at one row of 1K tokens, the
# 4-warp launch over 128-token tiles is faster (fewer splits to merge; the row's 8 tiles spread over 4 warps). H200,
# 2026-11-29 (decode_variants.jsonl "fourth session call 3"), two-warp vs 4-warp, ms: tq3 1 x 1K 0.0180 vs 0.0164,
# 4 x 1K 0.0190 vs 0.0192, 1 x 2K 0.0184 vs 0.0202, 8 x 1K 0.0211 vs 0.0233, 1 x 8K 0.0223 vs 0.0282; tq25 1 x 1K
# 0.0179 vs 0.0172, 4 x 1K 0.0189 vs 0.0193, 1 x 2K 0.0185 vs 0.0211.
W2_MIN_TOKENS = 2048


def narrow_cfg() -> dict:
    """NARROW_CFG, its register cap overridden by TQ_VLLM_NARROW_MAXNREG (the split count follows the cap)."""
    cfg = dict(NARROW_CFG)
    if os.environ.get("TQ_VLLM_NARROW_MAXNREG"):
        cfg["maxnreg"] = int(os.environ["TQ_VLLM_NARROW_MAXNREG"])
    return cfg


def programs_per_sm(maxnreg: int, num_warps: int) -> int:
    """Programs resident per SM when registers bind (64K registers per SM on sm_80/sm_90; 0 = uncapped, 255)."""
    return max(1, min(32, 65536 // ((maxnreg or 255) * 32 * num_warps)))


def narrow_splits(num_rows: int, num_kv_heads: int, max_seq_len: int, sms: int) -> int:
    """Split count of the narrow decode launch for this batch (host ints only: CUDA-graph safe), 0 where the batch
    is too small for it (the 4-warp launch is as fast or faster there)."""
    pairs = num_rows * num_kv_heads
    if pairs < NARROW_MIN_PAIRS or num_rows * max_seq_len < NARROW_MIN_TOKENS:
        return 0
    cfg = narrow_cfg()
    per_sm = programs_per_sm(cfg["maxnreg"], cfg["num_warps"])
    tiles = max(1, math.ceil(max_seq_len / NARROW_TILE))
    return int(max(1, min(math.floor(NARROW_WAVES * per_sm * sms / pairs), tiles // 8, 64)))
