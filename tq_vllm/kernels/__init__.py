"""Paged TurboQuant kernels: store, attention (decode + prefill), staging write, and the per-layer step.

Public functions take plain tensors (shapes below) and a `StepPlan` (tq_vllm/quant/plan.py). Each dispatches to
Triton on CUDA tensors and to the torch reference (`tq_vllm.quant.reference`) elsewhere. Override with
`force="triton" | "torch"` or the environment variable `TQ_VLLM_KERNELS=triton|torch|auto`; Triton on CPU tensors
needs `TRITON_INTERPRET=1` (the tests do that, at small shapes).

Shapes: T tokens of the step, Hq query heads, H KV heads, D head_dim, B block_size, R rows (requests).
    query [T, Hq, D]; key, value [T, H, D] (fp16/bf16); kv_cache uint8 [num_blocks, H, B, C];
    staging [num_slots, 2, B, H, D] (model dtype); out [T, Hq, D].

CUDA graphs: no host sync and no data-dependent host control flow once a `KernelMeta` is given (see `prepare`):
launch grids depend only on R, the number of decode rows, `plan.max_query_len`, `plan.max_seq_len` and the
length of `plan.qb_row` (entries < 0 are skipped, so it may be padded to a fixed size).
"""
from __future__ import annotations

import collections
import importlib
import math
import os
import sys
from dataclasses import dataclass

import torch

from tq_vllm.quant import reference as _ref
from tq_vllm.quant.codec import LayerCodec
from tq_vllm.quant.plan import SlotTable, StepPlan

from .params import (DC, NARROW_LUT4, NARROW_TILE, W2_CFG, W2_MIN_TOKENS, W2_TILE, choose_splits, layout_constexprs,
                     narrow_cfg, narrow_splits, next_pow2, num_sms, programs_per_sm, store_constexprs, tables)

__all__ = ["KernelMeta", "prepare", "store_blocks", "plan_slots", "warm_up", "write_staging", "paged_attention",
           "forward_step", "commit_sink", "sink_pending", "dequantize_blocks", "fill_workspace", "FillLists",
           "prefill_attention", "prefill_mode", "FlashAttentionError", "use_triton",
           "DECODE_TILE", "PREFILL_ROWS"]

DECODE_TILE = 0  # tokens per page tile of the decode launch; 0 = by block size (128 for B <= 32, else 64)
PREFILL_ROWS = int(os.environ.get("TQ_VLLM_PREFILL_ROWS", "64"))  # score columns per prefill program (QT*GP)
PREFILL_TILE = int(os.environ.get("TQ_VLLM_PREFILL_TILE", "64"))  # tokens per page tile (prefill)
# token rows per store program (several blocks when B < 32, sub-tiles when B > 32). With K and V in separate programs
# and codes by boundary counting, a decode step's store (a few blocks per step: latency-bound) went from 57 to 15 us
# and a 16K-token chunk from 837 to 290 us (H200, benchmarks/bench_store.py, 2026-11-26)
STORE_ROWS = 32
# head-dim chunk of the store's rotation product (TQ_VLLM_STORE_RDC; capped at the padded head_dim): one pass of the
# whole 128-wide tile in place of four 32-column passes that each wait for their loads: 16K-token chunk 265.7 ->
# 250.7 us (tq4), 283.2 -> 228.1 (tq3); H200, 2026-11-27, store_variants.jsonl "2026-11-27t"
STORE_RDC = 128
# codebooks of at most this many bits are coded from |u| by the store (store._sym_codes; where the codebook is
# antisymmetric, as every preset's is): 3 comparisons and selects in place of 7 comparisons and a gather took the
# tq3 16K-token chunk from 227.7 to 184.4 us and a decode step completing 64 blocks from 30.3 to 26.1; at 4 bits (7
# in place of 15) it spills under the 128-register cap and was 2.5 % slower (249.3 -> 255.7 us); H200, 2026-11-27,
# store_variants.jsonl "2026-11-27t". TQ_VLLM_STORE_SYM=0 turns it off, =1 uses it up to 4 bits; with
# TQ_VLLM_STORE_CMP=3 (the default) auto covers 4 bits too, coded in asm (store._sym_count_asm), not by these selects.
STORE_SYM_MAX_BITS = 3
# TQ_VLLM_STORE_CMP's default (the interpreter counts in Triton): 5 = the code of any codebook of <= 4 bits and its
# centroid from a cell table (store.cell_table, store.cell_code_cen_asm: one fma, one conversion, two loads, one
# FSET, 8 instructions per element; 8-bit codebooks have no table and count as 4 does). With the changes beside it
# (the robust norm by powers of two, the product's columns permuted, codes packed 8 to a word, a block's fields as
# scalars) the store's SASS (sm_90, Triton 3.6, block 32) went from 5,552 to 2,744 instructions (tq4) and 5,960 to
# 2,888 (tq3), and on an H200 the 16K-token chunk from 189.9 to 111.0 us (tq4), 185.9 to 109.8 (tq3), a decode step
# completing 64 blocks from 26.6 to 16.6 us (2 blocks: 11.5 to 7.5); the same tree with STORE_CMP=3 PERM=0
# PACK8=0: 151.5 us, with CMP=3 alone 130.9, without PERM 120.0, without PACK8 111.9 (2026-11-29, store_variants.jsonl
# "2026-11-29s"). 4 = a symmetric codebook's code from |u| by FSETs summed as integers and its centroid loaded
# (store.sym_code_cen_asm; 17 per element): chunk tq4 110.1, tq3 105.5 us, 64 blocks 18.0 / 17.2. 3 = the code of a
# symmetric 4-bit codebook from |u| as one asm block (store._sym_count_asm: 7 comparisons, not 15; its centroid a
# Triton gather): 16K-token chunk tq4 199.0 -> 188.7 us, tq35 213.9 -> 209.3, a decode step completing 64 blocks tq4
# 28.1 -> 26.5 (H200, 2026-11-29, store_variants.jsonl "2026-11-29"); 2 = all 15 boundaries counted by one asm block
# (store._count15): tq4 247.0 -> 199.8 us against the comparisons in Triton (1; H200, 2026-11-27, "2026-11-27t")
STORE_CMP = "5"
# TQ_VLLM_STORE_CEN's default: under STORE_CMP=3 the centroid of a symmetric 4-bit code from the same asm block as the
# code (store.sym_cen_asm4: byte permutes of the codebook's upper half, no table gather), "0" gathers it
STORE_CEN = "0"
# TQ_VLLM_STORE_PERM's default: the store's rotation product with Π's rows loaded in the order that puts each
# thread's accumulator columns at consecutive dims (store._mma_cols), so a byte of codes packs within a thread
STORE_PERM = "1"
# TQ_VLLM_STORE_PACK8's default: the store packs 8 codes (<= 4 bits) into a word and compresses each bit plane out of
# it (store._put_codes) instead of building bytes code by code
STORE_PACK8 = "1"
DECODE_NARROW = "0"  # TQ_VLLM_DECODE_NARROW's default (prepare)
# decode rows below which the query rotation is one pass over head_dim (`_qrot_chunk`): 1 x 1K tq4 0.0164 -> 0.0148
# ms, tq3 0.0204 -> 0.0183, 1 x 32K 0.0373 -> 0.0354; at 32 x 32K tq3 2 % slower, tq4 equal (H200, 2026-11-29,
# decode_variants.jsonl "2026-11-29")
QROT_ONEPASS_ROWS = 16
# pages per dequantization program (TQ_VLLM_DEQUANT_PAGES; 0 = 128 token rows; their tokens share the rotation's
# dots): 4 pages of 32 tokens with 8 warps took a 2K-token chunk over a 32K prefix from 2.72 to 2.52 ms (H200,
# 2026-11-27, decode_variants.jsonl)
DEQUANT_PAGES = 0
# decode rows per split-reduction program (TQ_VLLM_REDUCE_ROWS; their heads share one product with Π, read once per
# program instead of once per row); 1 until measured on a GPU
REDUCE_ROWS = 1
# (decode rows x KV heads) from which the split reduction rotates back with three bf16 tensor-core products of the ±1
# matrix (the fp32 sum split in three parts: as exact as fp32) instead of an fp32 FMA product (TQ_VLLM_REDUCE_PM1=auto).
# H200, 2026-11-27 (decode_variants.jsonl "2026-11-27n" call 18), decode + reduction, ms: 64 x 8K 0.3399 vs 0.3454,
# 128 x 4K 0.3510 vs 0.3547, 32 x 32K 0.6470 vs 0.6467; below: 1 x 1K 0.0175 vs 0.0168, 8 x 8K 0.0639 vs 0.0632
REDUCE_PM1_PAIRS = 256
# decode rows from which a step's store runs beside its attention on a second stream. One layer's step in a CUDA graph
# (H200, 2026-11-27, bench_step.py, step_variants.jsonl): the fork and join cost 3.7 us at 1 row and 0.6-3.5 at 4 to
# 64 rows when no block completes, and save 17 us (1 x 32K), 23 us (16 x 8K) and 22 us (64 x 8K, 2 blocks) when
# blocks complete;
# end to end the single 32K request lost 0.36 ms a step (6.36 -> 6.72) and the 64 x 8K batch gained 0.59 (17.68 ->
# 17.09); a batch of R staggered rows completes about R/B blocks a step
STORE_OVERLAP_ROWS = 16


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)
# launch configs (num_warps, num_stages); overridable for tuning sweeps: TQ_VLLM_<NAME>_CFG="warps,stages"
# Measured on an H200 (vLLM 0.26 stack, 2026-11-26; benchmarks/results/decode_variants.jsonl): decode with 4 warps,
# 2 stages and at most 128 registers (4 programs per SM) 0.785 ms at 32 x 32K vs 0.830 (3 stages, 168 registers),
# 0.995 (uncapped, 168 used, no prefetch); prefill 4 warps with 64 score columns 14.5 ms vs 23.2 (8 warps, 128).
_CFG_DEFAULT = {"DECODE": (4, 2), "PREFILL": (4, 1), "STORE": (4, 1), "REDUCE": (4, 1), "DEQUANT": (8, 1),
                "FILL": (4, 1)}
# store at most 128 registers (4 programs per SM instead of 3 at its 154; 144 B spilled instead of 136): 16K-token
# chunk 289 -> 265 us (tq4), 350 -> 284 (tq3); a decode step completing 64 blocks 42.5 -> 35.7 us (H200, 2026-11-27,
# bench_store.py, store_variants.jsonl "2026-11-27n"; 144 registers: no change); for codes of <= 4 bits without QJL
# only (`_store_cfg`)
_MAXNREG_DEFAULT = {"DECODE": 128, "STORE": 128}
# the 4-warp decode launch where all its programs fit in one wave at this cap (`_one_wave_cfg`)
ONEWAVE_MAXNREG = 168
# the split reduction as a programmatic dependent of the decode launch (`_pdl`): 4-warp one-wave launches of at most
# this many (row, KV head) pairs. H200, ms, with / without it: tq4 1 x 1K 0.0115 / 0.0123, 2 x 1K 0.0117 / 0.0122,
# 4 x 1K 0.0129 / 0.0135, but 8 x 1K (64 pairs) 0.0229 / 0.0160; the two-warp launch (tq3) mixed: 2 x 1K 0.0195 /
# 0.0181, 4 x 1K 0.0185 / 0.0190, 8 x 1K 0.0254 / 0.0211 (benchmarks.md "2026-11-29 (fifth session)")
PDL_MAX_PAIRS = 32
# PF: the attention loop issues each page tile's scales and mean codes one tile ahead (no dependent global load
# inside a tile); TQ_VLLM_<NAME>_PF=0 loads them in the tile that uses them
_PF_DEFAULT = {"DECODE": 1, "PREFILL": 1}
LAST_KERNELS: dict = {}  # name -> last CompiledKernel launched (for inspection: n_regs, n_spills, shared, asm)
LAST_DECODE_LAUNCH: dict = {}  # the last decode launch's splits, tile, warps, 4-bit asm form (benchmarks, tests)


_FALLBACK_USED: dict = {}
LAUNCH_COUNTS: collections.Counter = collections.Counter()  # launches per kernel name (tests clear and read it)


def _launch(name, kernel, grid, args, kwargs, fallbacks=()):
    """Launch `kernel`; if its first compilation for this configuration fails on this GPU/Triton (out of shared
    memory, a lowering error), retry with each dict of kwarg overrides in `fallbacks` and remember the one that
    worked. Compilation happens on the first (warm-up) call, never inside a CUDA-graph capture."""
    LAUNCH_COUNTS[name] += 1
    key = (name, tuple(sorted((k, v) for k, v in kwargs.items() if isinstance(v, (int, bool)))))
    over = _FALLBACK_USED.get(key)
    if over is not None:
        kwargs = {**kwargs, **over}
        LAST_KERNELS[name] = kernel[grid](*args, **kwargs)
        return
    try:
        LAST_KERNELS[name] = kernel[grid](*args, **kwargs)
        return
    except Exception as err:  # noqa: BLE001 - any compile/launch-resource error: try the safer configurations
        first = err
    for over in fallbacks:
        try:
            LAST_KERNELS[name] = kernel[grid](*args, **{**kwargs, **over})
        except Exception:  # noqa: BLE001
            continue
        import warnings
        warnings.warn(f"tq_vllm.kernels: {name} config failed ({type(first).__name__}: {str(first)[:200]}); "
                      f"using {over}")
        _FALLBACK_USED[key] = over
        return
    raise first


def _lz(name: str, kw: dict) -> int:
    """LZ of the attention kernel (attention.py: the page loop's column sums kept per row, the value-scale maximum
    merged into the score maximum; fewer cross-warp reductions per tile). Decode: on for 4-bit grid values, where it
    also removes the per-tile grid-offset sum: 0.3816 -> 0.3631 ms at 64 x 8K, 0.7193 -> 0.6838 at 32 x 32K (tq4);
    tq3 1 % slower with it (H200, 2026-11-27, decode_variants.jsonl). Fused prefill: off (its 64 score columns
    would keep two [128, 64] fp32 row sums per program in a kernel that already spills; not timed).
    TQ_VLLM_<NAME>_LZ=0/1 overrides."""
    v = os.environ.get(f"TQ_VLLM_{name}_LZ")
    if v:
        return int(v)
    return int(name == "DECODE" and kw.get("VMODE") == 1)


def _narrow_ok(kw: dict, D: int, B: int) -> bool:
    """The layers the narrow decode launch was measured for: 4-bit grid values (the tq4 family), no QJL keys,
    head_dim <= 128, blocks <= 32 tokens; the others keep the 4-warp launch."""
    return kw.get("VMODE") == 1 and not kw["PROD"] and D <= 128 and B <= 32


def _w2_ok(kw: dict, D: int, B: int) -> bool:
    """The layers the two-warp decode launch is for: 4 value lattices (2- and 3-bit values), no QJL keys, head_dim
    64 or 128, blocks <= 32 tokens. Offline (benchmarks/kernel_regs.py, tq3) its 168 registers hold those with at most
    48 B spilled; head_dim 96 (padded) spills 400 B, blocks of 64 / 128 tokens 392 / 1,592 B (the 4-warp launch: 112
    / 656), so they keep the 4-warp launch."""
    return kw.get("RV") == 4 and not kw["PROD"] and D in (64, 128) and B <= 32


def _split_major(w2: bool) -> bool:
    """The split decode's grid order: split-major (z = s·H + h, every page program dispatched before the short
    exact-key programs) or head-major (z = h·(S+1) + s). TQ_VLLM_DECODE_SPLIT_MAJOR=auto (default: split-major for
    the two-warp launch) | 0 | 1. Same run, H200, 2026-11-29 (decode_variants.jsonl, docs/benchmarks.md), split-major
    against head-major, ms: tq3 (two-warp) 8 x 8K 0.0789 vs 0.0846 / 0.0838, 64 x 8K 0.4803 vs 0.4885 / 0.4891,
    32 x 32K 0.9162 vs 0.9228 / 0.9217, 1 x 32K 0.0469 vs 0.0479; tq35 and tq25 likewise from 8 rows (tq25 64 x 8K
    0.4265 vs 0.4463), at one row within 2 %; tq4 (4-warp) mixed, from 3 % faster (8 x 8K) to 1.7 % slower (1 x 32K)."""
    mode = os.environ.get("TQ_VLLM_DECODE_SPLIT_MAJOR", "auto")
    if mode not in ("auto", "0", "1"):
        raise ValueError(f"TQ_VLLM_DECODE_SPLIT_MAJOR={mode!r}: choose auto, 0 or 1")
    return mode == "1" or (mode == "auto" and w2)


def _programs_per_sm(name: str) -> int:
    """Programs of launch `name` resident per SM (`params.programs_per_sm`): the wave size the split count plans
    for. 4 for the decode default (4 warps at 128 registers)."""
    return programs_per_sm(_maxnreg(name), _cfg(name)["num_warps"])


def _maxnreg(name: str) -> int:
    return int(os.environ.get(f"TQ_VLLM_{name}_MAXNREG", _MAXNREG_DEFAULT.get(name, 0)))


def _cfg(name: str):
    v = os.environ.get(f"TQ_VLLM_{name}_CFG")
    w, st = (int(x) for x in v.split(",")) if v else _CFG_DEFAULT[name]
    cfg = dict(num_warps=w, num_stages=st)
    nreg = _maxnreg(name)
    if nreg and not _interp():
        cfg["maxnreg"] = nreg  # caps registers per thread (more programs per SM, maybe spills)
    if name in _PF_DEFAULT:
        cfg["PF"] = int(os.environ.get(f"TQ_VLLM_{name}_PF", _PF_DEFAULT[name]))
        # H1J: 3-bit codes' 1-bit plane read once per byte and split in registers (0: one byte load per column)
        cfg["H1J"] = int(os.environ.get(f"TQ_VLLM_{name}_H1J", "1"))
    return cfg


# ------------------------------------------------------------------------------------------------------------
# dispatch
# ------------------------------------------------------------------------------------------------------------
def use_triton(t: torch.Tensor, force: str | None = None) -> bool:
    mode = force or os.environ.get("TQ_VLLM_KERNELS", "auto")
    if mode not in ("auto", "triton", "torch"):
        raise ValueError(f"kernel mode {mode!r}: choose triton, torch or auto")
    if mode == "auto":
        return t.is_cuda
    if mode == "triton" and not t.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("Triton kernels on CPU tensors need TRITON_INTERPRET=1")
    return mode == "triton"


_MODS = {}


def _interp() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


_KDEPS = {"attention": ("hadamard", "store"), "dequant": ("hadamard", "store", "attention")}  # @jit helper imports
_KGEN: dict = {}  # name -> how many times it was (re)imported


def _kmod(name: str):
    """The Triton kernel module `name`, (re)imported so that its @triton.jit (and those of the modules it imports
    helpers from, `_KDEPS`) match TRITON_INTERPRET now."""
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    deps = _KDEPS.get(name, ())
    for d in deps:
        _kmod(d)
    gens = tuple(_KGEN.get(d, 0) for d in deps)
    full = f"{__name__}.{name}"
    mod, was, was_gens = _MODS.get(name, (None, None, None))
    if mod is None or was != interp or was_gens != gens:
        mod = importlib.reload(sys.modules[full]) if full in sys.modules else importlib.import_module(full)
        _KGEN[name] = _KGEN.get(name, 0) + 1
        _MODS[name] = (mod, interp, gens)
    return mod


# ------------------------------------------------------------------------------------------------------------
# host-side plan additions
# ------------------------------------------------------------------------------------------------------------
@dataclass
class KernelMeta:
    """Host ints the launches need, on top of StepPlan. Rows [0, num_decode_rows) have exactly one query token
    (vLLM orders decodes first); the other rows go through the prefill path."""

    num_decode_rows: int
    num_splits: int
    decode_tile: int
    prefill_qt: int
    # split count of the narrow decode launch (params.NARROW_CFG) where the batch is large enough, else 0; the launch
    # takes it when the layer's codes allow (`_narrow_ok`)
    narrow_splits: int = 0
    # split count of the two-warp decode launch (params.W2_CFG) for layers with 4 value lattices (`_w2_ok`), else 0
    w2_splits: int = 0
    # host (query_start_loc [R+1], seq_lens [R], ctx_lens [R]) of the step, for the prefill plan (None: read the
    # plan's tensors when first needed)
    host_rows: tuple | None = None
    _prefill: dict | None = None  # workspace blocks -> PrefillPlan (on the device), built once per step

    def prefill_plan(self, plan: StepPlan, ws_blocks: int, device):
        """The FlashAttention prefill passes of rows [num_decode_rows, R) for a workspace of `ws_blocks` blocks."""
        from .prefill import plan_prefill
        if self._prefill is None:
            self._prefill = {}
        key = (int(ws_blocks), str(device))
        if key not in self._prefill:
            if self.host_rows is None:
                self.host_rows = tuple(t.detach().to("cpu", torch.int64)
                                       for t in (plan.query_start_loc, plan.seq_lens, plan.ctx_lens))
            qsl, seq, ctx = (torch.as_tensor(x).numpy() for x in self.host_rows)
            pp = plan_prefill(qsl, seq, ctx, range(self.num_decode_rows, plan.num_rows), plan.block_size,
                              ws_blocks)
            self._prefill[key] = pp.to_device(device)
        return self._prefill[key]


def prepare(plan: StepPlan, num_kv_heads: int, num_q_heads: int | None = None, num_decode_rows: int | None = None,
            device=None, host_rows: tuple | None = None) -> KernelMeta:
    """Host part of a step's launch configuration. `num_decode_rows=None` reads `plan.query_start_loc` (a host
    sync; pass it from the builder's host data in the CUDA-graph path). `host_rows` = host (query_start_loc,
    seq_lens, ctx_lens) lets the prefill plan be made without reading device tensors."""
    R = plan.num_rows
    if num_decode_rows is None:
        qsl = plan.query_start_loc.detach().to("cpu", torch.int64)
        ql = (qsl[1:] - qsl[:-1]).tolist()
        nd = 0
        while nd < R and ql[nd] == 1:
            nd += 1
        num_decode_rows = nd
    dev = torch.device(device) if device is not None else plan.seq_lens.device
    sms = num_sms(dev.index or 0) if dev.type == "cuda" else 8
    tile = int(os.environ.get("TQ_VLLM_DECODE_TILE", DECODE_TILE)) or (128 if next_pow2(plan.block_size) <= 32 else 64)
    factor = float(os.environ.get("TQ_VLLM_SPLIT_FACTOR", "0"))  # 0: each launch's programs per SM
    S = choose_splits(num_decode_rows, num_kv_heads, plan.max_seq_len, tile, sms, factor,
                      per_sm=_programs_per_sm("DECODE"))
    narrow = 0
    # the narrow launch is opt-in (auto: large batches, 1: every eligible layer): with the signed 4-bit asm, which
    # only the 4-warp launch can hold without spilling, the 4-warp launch is faster at every measured batch (64 x 8K
    # 0.3301 vs 0.3395 ms, 32 x 32K 0.6241 vs 0.6453, 128 x 4K 0.3382 vs 0.3530; 64 x 8K TPOT 15.99 ms vs fp8 17.01;
    # H200, 2026-11-27, decode_variants.jsonl / e2e.jsonl "2026-11-27s")
    mode = os.environ.get("TQ_VLLM_DECODE_NARROW", DECODE_NARROW)
    if mode not in ("auto", "0", "1"):
        raise ValueError(f"TQ_VLLM_DECODE_NARROW={mode!r}: choose auto, 0 or 1")
    explicit = any(f"TQ_VLLM_DECODE_{k}" in os.environ for k in ("CFG", "TILE", "MAXNREG", "SPLITS"))
    if mode != "0" and not explicit:
        # (an explicit launch configuration from the environment, for sweeps, holds for every batch)
        narrow = narrow_splits(num_decode_rows, num_kv_heads, plan.max_seq_len, sms)
        if mode == "1" and num_decode_rows > 0:
            narrow = narrow or choose_splits(num_decode_rows, num_kv_heads, plan.max_seq_len, NARROW_TILE, sms, factor)
    w2 = 0
    w2_mode = os.environ.get("TQ_VLLM_DECODE_W2", "auto")
    if w2_mode not in ("auto", "0", "1"):
        raise ValueError(f"TQ_VLLM_DECODE_W2={w2_mode!r}: choose auto, 0 or 1")
    # auto: from W2_MIN_TOKENS decode tokens (rows x max_seq_len); below it the 4-warp launch is faster; 1: always
    if not explicit and (w2_mode == "1" or (w2_mode == "auto"
                                            and num_decode_rows * plan.max_seq_len >= W2_MIN_TOKENS)):
        w2 = choose_splits(num_decode_rows, num_kv_heads, plan.max_seq_len, W2_TILE, sms, factor,
                           per_sm=programs_per_sm(W2_CFG["maxnreg"], W2_CFG["num_warps"]))
    S = int(os.environ.get("TQ_VLLM_DECODE_SPLITS", "0")) or S  # fixed split count (benchmark sweeps)
    G = (num_q_heads // num_kv_heads) if num_q_heads else 1
    GP = max(next_pow2(G), int(os.environ.get("TQ_VLLM_MIN_GP", "1")))
    qt = max(1, int(os.environ.get("TQ_VLLM_PREFILL_ROWS", PREFILL_ROWS)) // GP)
    return KernelMeta(num_decode_rows=int(num_decode_rows), num_splits=S, decode_tile=tile, prefill_qt=qt,
                      host_rows=host_rows, narrow_splits=int(narrow), w2_splits=int(w2))


def _meta(plan, H, Hq, meta):
    if meta is not None:
        return meta
    cached = getattr(plan, "_tq_kernel_meta", None)
    if cached is not None and cached[0] == (H, Hq):
        return cached[1]
    m = prepare(plan, H, Hq)
    try:
        plan._tq_kernel_meta = ((H, Hq), m)
    except Exception:  # pragma: no cover
        pass
    return m


# ------------------------------------------------------------------------------------------------------------
# store
# ------------------------------------------------------------------------------------------------------------
_DUMMIES: dict = {}


def _sink_args(sink, device, dtype):
    """(kv, tags, n, strides, given) of a sink table `(kv [N, 2, H, D], tags [N, H] int64)`, or cached dummies."""
    if sink is None:
        key = (str(device), dtype)
        if key not in _DUMMIES:
            _DUMMIES[key] = (torch.zeros(1, dtype=dtype, device=device),
                             torch.zeros(1, dtype=torch.int64, device=device))
        z, zt = _DUMMIES[key]
        return z, zt, 1, (0, 0, 0), False
    kv, tags = sink
    assert kv.stride(-1) == 1 and tags.is_contiguous()
    return kv, tags, tags.shape[0], (kv.stride(0), kv.stride(1), kv.stride(2)), True


_PENDING: dict = {}


def sink_pending(device, dtype, rows: int, num_kv_heads: int, head_dim: int):
    """Pending sink entries (kv [N, 2, H, D], tags [N, H] int64), N >= rows, one per row of a step: the store
    writes the entry of a row completing its first block, `commit_sink` (or the staging write) moves it into the
    table. One per device and shape, shared by the layers (each layer's commit runs before the next layer's store
    in stream order). Call it before CUDA-graph capture with the largest row count (it grows by re-allocating)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = (str(device), dtype, int(num_kv_heads), int(head_dim))
    cur = _PENDING.get(key)
    if cur is None or cur[1].shape[0] < rows:
        n = max(64, next_pow2(int(rows)))
        cur = (torch.zeros(n, 2, num_kv_heads, head_dim, dtype=dtype, device=device),
               torch.zeros(n, num_kv_heads, dtype=torch.int64, device=device))
        _PENDING[key] = cur
    return cur


def _pending_args(sink, plan: StepPlan):
    """(pending kv, pending tags, table kv, table tags, n_sink, pending strides, table strides) of a sink table."""
    kv, tags = sink
    pkv, ptag = sink_pending(kv.device, kv.dtype, plan.num_rows, kv.shape[2], kv.shape[3])
    assert kv.stride(-1) == 1 and tags.is_contiguous() and kv.dtype == pkv.dtype
    return (pkv, ptag, kv, tags, tags.shape[0], (pkv.stride(0), pkv.stride(1), pkv.stride(2)),
            (kv.stride(0), kv.stride(1), kv.stride(2)))


def commit_sink(sink, plan: StepPlan, key: torch.Tensor, force: str | None = None) -> None:
    """Move the pending sink entries of the first blocks completed in this step (`store_blocks(defer_sink=True)`)
    into the table `sink` = (kv [N, 2, H, D], tags [N, H]); the last of several sharing a table entry wins."""
    Mb = plan.qb_row.numel()
    if sink is None or Mb == 0 or not use_triton(key, force):
        return
    pkv, ptag, kv, tags, n, ps, ks = _pending_args(sink, plan)
    H, D = kv.shape[2], kv.shape[3]
    _launch("sink_commit", _kmod("store")._tq_sink_commit_kernel, (min(Mb, 64), H), (
        plan.qb_row, plan.qb_idx, Mb, pkv, ptag, kv, tags, n, *ps, *ks), dict(
        H=H, D=D, DP=next_pow2(D), CH=16, num_warps=1))


def _fwht_args(tb, D: int) -> dict:
    """HAD / LOGD of the decode and its split reduction: a Walsh-Hadamard transform in place of the products with Π
    where Π is a randomized Hadamard matrix (`DeviceTables.had`; TQ_VLLM_FWHT=0: the products).
    H200, 2026-11-29 (decode_variants.jsonl "2026-11-29"), against the products: tq4 1 x 1K 0.0147 -> 0.0129 ms,
    4 x 1K 0.0163 -> 0.0142, 64 x 8K 0.3270 -> 0.3198; tq3 1 x 1K, 8 x 8K 3 % faster, but the two-warp launch 2 %
    slower at 32 x 32K (32 B spilled at its 168 registers), so that launch keeps the query's product from
    QROT_ONEPASS_ROWS rows."""
    on = os.environ.get("TQ_VLLM_FWHT", "1")
    if on not in ("0", "1"):
        raise ValueError(f"TQ_VLLM_FWHT={on!r}: choose 0 or 1")
    had = tb.had and on == "1"
    return dict(HAD=had, LOGD=D.bit_length() - 1 if had else 0)


def _qrot_chunk(D: int, rows: int) -> int:
    """Head-dim chunk of the decode's query rotation (TQ_VLLM_DECODE_QDC): below QROT_ONEPASS_ROWS decode rows the
    whole head_dim where it is 64 or 128 (one pass: its loads of Π do not wait behind one dot each), else DC."""
    env = os.environ.get("TQ_VLLM_DECODE_QDC")
    if env:
        c = int(env)
        if c not in (32, 64, 128) or D % c:
            raise ValueError(f"TQ_VLLM_DECODE_QDC={c}: choose 32, 64 or 128, dividing head_dim {D}")
        return c
    return D if D in (64, 128) and rows < QROT_ONEPASS_ROWS else DC


def _store_cfg(kw: dict) -> dict:
    """The store's launch configuration. The 128-register cap (`_MAXNREG_DEFAULT`) holds for codes of at most 4 bits
    without QJL (measured: tq4, tq3); 8-bit codes and prod keys would spill 384 B / 4 KB under it (offline, sm_90) and
    keep the uncapped kernel unless TQ_VLLM_STORE_MAXNREG says otherwise."""
    cfg = _cfg("STORE")
    if (kw["PROD"] or max(kw["KBITS"], kw["VBITS"]) > 4) and "TQ_VLLM_STORE_MAXNREG" not in os.environ:
        cfg.pop("maxnreg", None)
    return cfg


def _cen_asm(codec: LayerCodec, kind: str) -> str:
    """store.sym_cen_asm4 for the symmetric 4-bit codebook `kind` of `codec` (its upper 8 centroids), cached."""
    cache = codec.__dict__.setdefault("_tq_cen_asm", {})
    if kind not in cache:
        from .store import sym_cen_asm4
        cache[kind] = sym_cen_asm4(codec.centroids[kind].detach().to("cpu", torch.float32)[8:].tolist())
    return cache[kind]


def _pack8_ok(kw: dict, DP: int) -> bool:
    """store._put_codes' PACK8 is possible: whole groups of 8 dims, and each code plane of codes of <= 4 bits (width W
    bits: W-byte elements of 8 codes) and every head page aligned to them (the page base pointer is 16-byte aligned).
    kw: store_constexprs."""
    if DP % 8 or kw["D"] % 8 or kw["PAGE"] % 4:
        return False
    bits = {"K": kw["KBITS"], "V": kw["VBITS"], "KM": kw["MBITS"], "VM": kw["MBITS"]}
    return all(kw[f"{p}O{i}"] % kw[f"{p}W{i}"] == 0 and kw[f"{p}W{i}"] in (1, 2, 4)
               for p in bits if bits[p] <= 4 for i in range(3) if kw[f"{p}W{i}"] > 0)


def _cell_tables(codec: LayerCodec, device) -> dict:
    """store.cell_table of each codebook of `codec` that has one (int32 on `device`), cached per device."""
    cache = codec.__dict__.setdefault("_tq_cell_tables", {})
    key = (torch.device(device).type, torch.device(device).index)
    if key not in cache:
        from .store import cell_table
        out = {}
        for kind, b in codec.bounds.items():
            words = cell_table(b.detach().to("cpu", torch.float32).tolist())
            if words is not None:
                out[kind] = torch.tensor(words, dtype=torch.int64).to(torch.int32).to(device)
        cache[key] = out
    return cache[key]


def store_blocks(codec: LayerCodec, kv_cache: torch.Tensor, staging: torch.Tensor, key: torch.Tensor,
                 value: torch.Tensor, plan: StepPlan, sink=None, force: str | None = None,
                 defer_sink: bool = False) -> None:
    """Quantize the blocks completed in this step (`plan.qb_row/qb_idx`, rows < 0 skipped) into their pages; first
    blocks of a sequence get the sink tag and (if `sink` = (kv [N, 2, H, D], tags [N, H]) is given) record their
    exact token 0 in the sink table: at once, or with `defer_sink` (Triton path) only in the pending entries, for
    `commit_sink` / `write_staging(commit_sink=...)` to write once no reader of the table runs."""
    if not use_triton(kv_cache, force):
        if plan.qb_row.numel() and bool((plan.qb_row < 0).any()):
            keep = plan.qb_row >= 0
            plan = _subplan_blocks(plan, keep)
        return _ref.store_full_blocks(codec, kv_cache, staging, key, value, plan, sink)
    Mb = plan.qb_row.numel()
    if Mb == 0:
        return
    lay = codec.layout
    D, B = lay.head_dim, lay.block_size
    nb, H, Bc, C = kv_cache.shape
    codec.page_view(kv_cache)  # validates shape/dtype
    tb = tables(codec, kv_cache.device)
    kw = store_constexprs(lay)
    DP = next_pow2(D)
    BP = next_pow2(B)
    rows = int(os.environ.get("TQ_VLLM_STORE_ROWS", STORE_ROWS))
    TS = min(BP, rows)
    NSUB = math.ceil(B / TS)
    NBLK = max(1, rows // BP)
    kvsplit = os.environ.get("TQ_VLLM_STORE_KVSPLIT", "1") == "1"  # K and V coded by two programs
    # codes of <= 4 bits by counting boundaries (1; 2: the 4-bit count as one asm block; 3, 4: from |u| in asm; 5: a
    # cell table; 2-5 GPU only), 0: binary search
    cmp_codes = int(os.environ.get("TQ_VLLM_STORE_CMP", STORE_CMP))
    if cmp_codes not in (0, 1, 2, 3, 4, 5):
        raise ValueError(f"TQ_VLLM_STORE_CMP={cmp_codes}: choose 0, 1, 2, 3, 4 or 5")
    if cmp_codes >= 2 and _interp():
        cmp_codes = 1  # (inline PTX does not run in the interpreter; the tests model the asm instead)
    par = os.environ.get("TQ_VLLM_STORE_PAR", "0") == "1" and NSUB > 1  # a block's sub-tiles in parallel programs
    rdc = min(DP, int(os.environ.get("TQ_VLLM_STORE_RDC", STORE_RDC)))  # head-dim chunk of the rotation product
    smode = os.environ.get("TQ_VLLM_STORE_SYM", "auto")  # codes from |u| (store._sym_codes): auto, 0 or 1
    if smode not in ("auto", "0", "1"):
        raise ValueError(f"TQ_VLLM_STORE_SYM={smode!r}: choose auto, 0 or 1")
    smax = {"auto": 4 if cmp_codes >= 3 else STORE_SYM_MAX_BITS, "0": 0, "1": 4}[smode] if cmp_codes else 0
    sym = dict(KSY=tb.sym["k"] and kw["KBITS"] <= smax, VSY=tb.sym["v"] and kw["VBITS"] <= smax,
               KMSY=tb.sym["k_mean"] and kw["MBITS"] <= smax, VMSY=tb.sym["v_mean"] and kw["MBITS"] <= smax)
    cen = os.environ.get("TQ_VLLM_STORE_CEN", STORE_CEN)
    if cen not in ("0", "1"):
        raise ValueError(f"TQ_VLLM_STORE_CEN={cen!r}: choose 0 or 1")
    perm = os.environ.get("TQ_VLLM_STORE_PERM", STORE_PERM)  # the product's columns permuted (store._mma_cols)
    if perm not in ("0", "1"):
        raise ValueError(f"TQ_VLLM_STORE_PERM={perm!r}: choose 0 or 1")
    sym["PERM"] = perm == "1" and DP >= 32
    pack = os.environ.get("TQ_VLLM_STORE_PACK8", STORE_PACK8)  # codes packed 8 to a word (store._put_codes)
    if pack not in ("0", "1"):
        raise ValueError(f"TQ_VLLM_STORE_PACK8={pack!r}: choose 0 or 1")
    sym["PACK8"] = pack == "1" and _pack8_ok(kw, DP)
    cells = _cell_tables(codec, kv_cache.device) if cmp_codes == 5 else {}  # (a kind without one: CMP 4's code)
    for kind, K_ in (("k", "K"), ("v", "V"), ("k_mean", "KM"), ("v_mean", "VM")):
        sym[f"{K_}CL"] = kind in cells
    none = tb.bnd["k"]  # (a pointer the kernel does not read)
    for kind, K_ in (("k", "K"), ("v", "V")):  # the centroid asm of a symmetric 4-bit codebook, "-" for none
        on = cen == "1" and cmp_codes == 3 and sym[f"{K_}SY"] and kw[f"{K_}BITS"] == 4
        sym[f"{K_}CA"] = _cen_asm(codec, kind) if on else "-"
    mod = _kmod("store")
    for t in (key, value):
        assert t.stride(-1) == 1
    assert staging.stride(-1) == 1
    bt = plan.block_table
    pi16, pm1, rsd = tb.rot_for(key.dtype)
    has_sink = sink is not None and kw["SINK"]
    if has_sink:
        skv, stag, _, _, _, sst, _ = _pending_args(sink, plan)
    else:
        skv, stag, _, sst, _ = _sink_args(None, key.device, key.dtype)
    _launch("store", mod._tq_store_kernel, (triton_cdiv(Mb, NBLK) * (NSUB if par else 1), H, 2 if kvsplit else 1), (
        key, value, staging, kv_cache, bt, plan.query_start_loc, plan.seq_lens, plan.ctx_slot, plan.qb_row,
        plan.qb_idx, tb.rot, pi16, tb.qjl, tb.bnd["k"], tb.bnd["v"], tb.bnd["k_mean"], tb.bnd["v_mean"], tb.c32["k"],
        tb.c32["v"], tb.c32["k_mean"], tb.c32["v_mean"], *(cells.get(k, none) for k in ("k", "v", "k_mean", "v_mean")),
        skv, stag, tb.sink_coef,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        staging.stride(0), staging.stride(1), staging.stride(2), staging.stride(3), bt.stride(0), Mb, rsd,
        *sst), dict(PM1=pm1, INTERP=_interp(), SINKT=has_sink, KVSPLIT=kvsplit, CMP=cmp_codes, PAR=par, RDC=rdc, **sym,
        H=H, DP=DP, DC=DC, TS=TS, NSUB=NSUB, NBLK=NBLK, NR=NBLK * TS, PADR=max(1, next_pow2(-(-kw["PADP"] // TS))),
        **_store_cfg(kw), **kw), fallbacks=({"num_warps": 8, "num_stages": 1}, {"PM1": False}))
    if has_sink and not defer_sink:
        commit_sink(sink, plan, key, force=force)


# ------------------------------------------------------------------------------------------------------------
# staging-slot planning (device side of the step plan)
# ------------------------------------------------------------------------------------------------------------
def plan_slots(table, query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_table: torch.Tensor,
               block_size: int, capture: bool = False, force: str | None = None):
    """`SlotTable.plan` (quant/plan.py) as one Triton program on CUDA: (ctx_slot [R], open_slot [R]) int32 for
    query_start_loc [R+1], seq_lens [R], block_table [R, max_blocks]; no host sync."""
    R = seq_lens.shape[0]
    # rows < max_num_seqs < num_slots <= SP: one compile per table (a batch-size-dependent width compiled new
    # variants while serving: +3 s in the 64 x 8K run); a wider batch (not seen from vLLM) takes the torch planner
    if not use_triton(table.slot_block, force) or R > max(16, table.scratch[0].shape[0]):
        return table.plan(query_start_loc, seq_lens, block_table, block_size, capture)
    table.step += 1
    dev = table.slot_block.device
    cs = torch.empty(R, dtype=torch.int32, device=dev)
    os_ = torch.empty(R, dtype=torch.int32, device=dev)
    if R == 0:
        return cs, os_
    bt = block_table[:R]
    if bt.shape[1] == 0:
        bt = torch.zeros(R, 1, dtype=torch.int32, device=dev)
    touch, keys, order = table.scratch
    SP = touch.shape[0]
    _launch("slots", _kmod("slots")._tq_plan_slots_kernel, (1,), (
        query_start_loc, seq_lens, bt, bt.stride(0), bt.shape[1], table.slot_block, table.slot_stamp,
        table.block_slot, table.err, touch, keys, order, cs, os_, R, table.stamp_base), dict(
        S=table.num_slots, NB=table.num_blocks, B=block_size, RP=max(16, SP), SP=SP, CH=min(16, SP),
        CAPTURE=bool(capture), STAMP_BITS=SlotTable.STAMP_BITS, SLOT_BITS=SlotTable.SLOT_BITS, num_warps=4))
    return cs, os_


def _subplan_blocks(plan, keep):
    import dataclasses
    return dataclasses.replace(plan, qb_row=plan.qb_row[keep], qb_idx=plan.qb_idx[keep])


def write_staging(staging: torch.Tensor, key: torch.Tensor, value: torch.Tensor, plan: StepPlan,
                  force: str | None = None, commit_sink=None) -> None:
    """Copy the exact K/V of every row's open block (positions max(ctx, seq//B*B) .. seq-1) to its slot.
    `commit_sink` = a sink table: also `commit_sink` it in the same launch (after `store_blocks(defer_sink=True)`)."""
    if not use_triton(staging, force):
        return _ref.write_staging(staging, key, value, plan)
    R = plan.num_rows
    if R == 0:
        return
    S_, two, B, H, D = staging.shape
    sargs, cargs, skw = _staging_args(staging, key, value, plan, commit_sink)
    _launch("staging", _kmod("store")._tq_staging_kernel, (R, H), (
        key, value, staging, plan.query_start_loc, plan.seq_lens, plan.open_slot, *sargs, *cargs),
        dict(**skw, H=H, num_warps=4))


def _staging_args(staging, key, value, plan: StepPlan, commit_sink=None):
    """(strides, sink-commit args, constexprs) of `store._stage_row` / `store._sink_commit` in a launch."""
    S_, two, B, H, D = staging.shape
    Mb = plan.qb_row.numel()
    if commit_sink is not None and Mb:
        pkv, ptag, kv, tags, n, ps, ks = _pending_args(commit_sink, plan)
        cargs, commit = (plan.qb_row, plan.qb_idx, Mb, pkv, ptag, kv, tags, n, *ps, *ks), True
    else:
        z = plan.open_slot
        cargs, commit = (z, z, 0, staging, z, staging, z, 1, 0, 0, 0, 0, 0, 0), False
    sargs = (key.stride(0), key.stride(1), value.stride(0), value.stride(1),
             staging.stride(0), staging.stride(1), staging.stride(2), staging.stride(3))
    return sargs, cargs, dict(D=D, DP=next_pow2(D), B=B, BP=next_pow2(B), COMMIT=commit)


# ------------------------------------------------------------------------------------------------------------
# attention
# ------------------------------------------------------------------------------------------------------------
POISON_PARTIALS = False  # tests: NaN in the split partials before the decode launch (an unwritten one read shows)


def _reduce_used() -> bool:
    """`TQ_VLLM_REDUCE_USED` (default 1): the split reduction reads only the page partials a row's context reaches, and
    the decode launch writes no others. In CUDA graphs the split count comes from max_model_len, so at short contexts
    most are empty: 4 x 1K at 32 splits 0.0214 -> 0.0202 ms (tq4), 0.0291 -> 0.0262 (tq3); TPOT 4 x 1K 5.47 -> 5.44
    ms (tq4), 5.98 -> 5.85 (tq3); H200, 2026-11-28 fourth session, docs/benchmarks.md. 0: read every split."""
    mode = os.environ.get("TQ_VLLM_REDUCE_USED", "1")
    if mode not in ("0", "1"):
        raise ValueError(f"TQ_VLLM_REDUCE_USED={mode!r}: choose 0 or 1")
    return mode == "1"


def _tile_cfg(B: int, tile: int):
    BP = next_pow2(B)
    BPS = min(BP, tile)
    TP = max(1, tile // BP)
    SUBT = BP // BPS
    return BP, BPS, TP, SUBT


def paged_attention(codec: LayerCodec, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    kv_cache: torch.Tensor, staging: torch.Tensor, plan: StepPlan, scale: float,
                    out: torch.Tensor | None = None, meta: KernelMeta | None = None,
                    force: str | None = None, sink=None, workspace=None, stage: bool = False,
                    commit_sink=None) -> torch.Tensor:
    """Causal attention of the step's queries with decode semantics (earlier blocks from pages, own block exact;
    token 0 of a first block exact from the sink table `sink` when its tag matches).
    Returns `out` [T, Hq, D] (query dtype unless `out` is given). Call after `store_blocks` and before
    `write_staging` of the same step. Decode rows run the split-K Triton kernel; prefill/chunk rows run
    FlashAttention over dequantized pages (`prefill_mode`, `workspace`: a `prefill.PrefillWorkspace`, default the
    shared one of this device) or the fused Triton kernel.
    `stage=True` (steps where every row decodes one token, on the Triton path): the split reduction also does
    `write_staging(..., commit_sink=commit_sink)`'s work, so the caller must not call it (`forward_step`)."""
    T, Hq, D = query.shape
    if out is None:
        out = torch.empty(T, Hq, D, dtype=query.dtype if query.dtype != torch.float32 else torch.float32,
                          device=query.device)
    if not use_triton(query, force):
        o = _ref.attention(codec, query, key, value, kv_cache, staging, plan, scale, sink=sink)
        out.copy_(o.to(out.dtype))
        return out
    H = key.shape[1]
    G = Hq // H
    GP = max(next_pow2(G), int(os.environ.get("TQ_VLLM_MIN_GP", "1")))
    R = plan.num_rows
    if R == 0 or T == 0:
        return out
    meta = _meta(plan, H, Hq, meta)
    if stage and meta.num_decode_rows != R:
        raise ValueError("paged_attention(stage=True) needs a step where every row decodes one token")
    lay = codec.layout
    B = lay.block_size
    kw = layout_constexprs(lay)
    kw.pop("D"), kw.pop("B")
    tb = tables(codec, query.device)
    mod = _kmod("attention")
    DP = next_pow2(D)
    for t in (query, key, value, staging, out):
        assert t.stride(-1) == 1, "last dim must be contiguous"
    bt = plan.block_table
    piq, pm1, rsd = tb.rot_for(query.dtype)
    skv, stag, nsink, sst, has_sink = _sink_args(sink, query.device, query.dtype)
    kw["SINK"] = kw["SINK"] and has_sink
    common = (query, key, value, staging, kv_cache, bt, plan.query_start_loc, plan.seq_lens, plan.ctx_slot,
              tb.rot, piq, tb.qjl_rot, tb.c16["k"], tb.c16["v"], tb.c16["k_mean"], tb.c16["v_mean"])
    strides = (query.stride(0), query.stride(1), key.stride(0), key.stride(1), value.stride(0), value.stride(1),
               staging.stride(0), staging.stride(1), staging.stride(2), staging.stride(3), bt.stride(0),
               out.stride(0), out.stride(1))
    sm_log2 = float(scale) * mod.LOG2E
    kw.update(_lut_modes(codec, query.device, kw["RK"], kw["RV"]))
    nd = meta.num_decode_rows
    if nd > 0:
        S, tile, cfg = meta.num_splits, meta.decode_tile, _cfg("DECODE")
        w2 = narrow = False
        kwd = kw
        if meta.narrow_splits and _narrow_ok(kw, D, B):
            narrow = True
            S, tile = meta.narrow_splits, NARROW_TILE
            cfg.update(narrow_cfg())
            kwd = {**kw, **_lut_modes(codec, query.device, kw["RK"], kw["RV"], NARROW_LUT4)}
        elif meta.w2_splits and _w2_ok(kw, D, B):
            S, tile = meta.w2_splits, W2_TILE
            cfg.update(W2_CFG)
            w2 = True
        nprog = nd * H * (S + 1)
        one_wave = query.is_cuda and nprog <= num_sms(query.device.index or 0) * programs_per_sm(
            cfg.get("maxnreg", 0), cfg["num_warps"])
        if one_wave and not (w2 or narrow):
            cfg.update(_one_wave_cfg(nprog, query.device))
        pdl = _pdl(query, one_wave and not w2 and nd * H <= PDL_MAX_PAIRS, mod)
        if _interp():
            cfg.pop("maxnreg", None)  # (the register cap of a launch shape; _cfg leaves it out there already)
        split_major = _split_major(w2)
        LAST_DECODE_LAUNCH.update(splits=S, tile=tile, num_warps=cfg["num_warps"], split_major=split_major,
                                  maxnreg=cfg.get("maxnreg", 0), pdl=pdl,
                                  lut4=("signed" if kwd.get("KSG") or kwd.get("VSG") else "offset")
                                  if 1 in (kwd["KMODE"], kwd["VMODE"]) else None)
        BP, BPS, TP, SUBT = _tile_cfg(B, tile)
        used = _reduce_used()
        had = _fwht_args(tb, D)
        kwd = {**kwd, **_k8_modes(codec, kwd)}
        # the query's rotation: the transform, except in the two-warp launch from QROT_ONEPASS_ROWS rows (_fwht_args),
        # with a constant QDC (one compiled variant for every batch size); else the product. A Triton that cannot
        # lower the transform's reshapes falls back to the product (the partials are the same either way)
        product = dict(HAD=False, LOGD=0, QDC=_qrot_chunk(D, nd))
        qrot = dict(had, QDC=DC) if had["HAD"] and (not w2 or nd < QROT_ONEPASS_ROWS) else product
        no_fwht = (product,) if qrot["HAD"] else ()
        LAST_DECODE_LAUNCH["ki8"] = bool(kwd["KI8"] and qrot["HAD"])  # (the kernel's K8 also needs the transform)
        po = torch.empty(nd, H, S + 1, GP, D, dtype=torch.float32, device=query.device)
        pml = torch.empty(nd, H, S + 1, 2, GP, dtype=torch.float32, device=query.device)
        if POISON_PARTIALS:
            po.fill_(float("nan")), pml.fill_(float("nan"))
        _launch("decode", mod._tq_attn_kernel, (nd, 1, H * (S + 1)), (
            *common, po, pml, out, skv, stag, 0, sm_log2, rsd, nsink, S, *sst, *strides), dict(
            H=H, G=G, GP=GP, QT=1, D=D, DP=DP, B=B, BPS=BPS, TP=TP, SUBT=SUBT, NE=BP, FUSED=False,
            DC=DC, M=GP, NR=TP * BPS, INTERP=_interp(), PM1=pm1, LZ=_lz("DECODE", kwd), USED=used,
            SPLIT_MAJOR=split_major, PDLT=pdl,
            **qrot, **cfg, **kwd),
            fallbacks=(*no_fwht, {"num_stages": 1}, {"num_stages": 1, "KMODE": 0, "VMODE": 0},
                       {"num_warps": 8, "num_stages": 1}))
        rb = next_pow2(max(1, min(int(os.environ.get("TQ_VLLM_REDUCE_ROWS", REDUCE_ROWS)), nd)))
        rot, rpm1, rrsd = tb.rot_for(torch.bfloat16)
        mode = os.environ.get("TQ_VLLM_REDUCE_PM1", "auto")
        if mode == "0" or (mode == "auto" and nd * H < REDUCE_PM1_PAIRS):
            rot, rpm1, rrsd = tb.rot, False, 1.0
        if had["HAD"]:
            rrsd = 1.0 / math.sqrt(D)  # (the transform's scale; only the signs of Π's row 0 are read)
        if stage:
            sargs, cargs, skw = _staging_args(staging, key, value, plan, commit_sink)
            stage_args, skw = (key, value, staging, plan.seq_lens, plan.open_slot, *sargs, *cargs), dict(
                COMMIT=skw["COMMIT"])
        else:
            z = plan.seq_lens  # (SEQ: the seq_lens, which `USED` reads)
            stage_args, skw = (z, z, z, z, z, 0, 0, 0, 0, 0, 0, 0, 0, z, z, 0, z, z, z, z, 1, 0, 0, 0, 0, 0, 0), {}
        _launch("reduce", mod._tq_reduce_kernel, (triton_cdiv(nd, rb), H), (
            po, pml, rot, plan.query_start_loc, out, 0, nd, out.stride(0), out.stride(1), S + 1, rrsd,
            *stage_args), dict(
            H=H, G=G, GP=GP, D=D, DP=DP, S1P=next_pow2(S + 1), DC=DC, RB=rb, PM1=rpm1, INTERP=_interp(), **had,
            SC=max(1, next_pow2(S + 1) * DC // DP),
            STAGE=stage, B=B, BP=next_pow2(B), USED=used, TPG=TP, SUBT=SUBT, **skw, **_cfg("REDUCE"),
            **(dict(PDLW=True, launch_pdl=True) if pdl else {})),
            fallbacks=({"HAD": False, "LOGD": 0},) if had["HAD"] else ())
    if nd < R and prefill_mode(codec, query) == "fa":
        from .prefill import flash_attn_fn
        try:
            prefill_attention(codec, query, key, value, kv_cache, staging, plan, scale, out, meta,
                              attn_fn=flash_attn_fn(), sink=sink, force=force, workspace=workspace)
            return out
        except FlashAttentionError as err:  # a FlashAttention build that refuses these inputs (our bugs raise)
            if os.environ.get("TQ_VLLM_PREFILL", "auto") == "fa":
                raise
            _FA_FAILED.append(err)
            import warnings
            warnings.warn(f"tq_vllm.kernels: FlashAttention prefill failed ({type(err).__name__}: {str(err)[:200]}); "
                          f"using the fused Triton prefill kernel from now on")
    if nd < R:
        QT = meta.prefill_qt
        BP, BPS, TP, SUBT = _tile_cfg(B, int(os.environ.get("TQ_VLLM_PREFILL_TILE", PREFILL_TILE)))
        nqt = max(1, math.ceil(plan.max_query_len / QT))
        _launch("prefill", mod._tq_attn_kernel, (R - nd, nqt, H), (
            *common, out, out, out, skv, stag, nd, sm_log2, rsd, nsink, 1, *sst, *strides), dict(
            H=H, G=G, GP=GP, QT=QT, D=D, DP=DP, B=B, BPS=BPS, TP=TP, SUBT=SUBT, NE=64, FUSED=True,
            DC=DC, M=QT * GP, NR=TP * BPS, INTERP=_interp(), PM1=pm1, LZ=_lz("PREFILL", kw), **_cfg("PREFILL"),
            **kw),
            fallbacks=({"num_warps": 4, "num_stages": 1}, {"num_stages": 1, "KMODE": 0, "VMODE": 0}))
    return out


_FA_FAILED: list = []  # errors of the FlashAttention prefill path (auto mode falls back to the fused kernel for good)


class FlashAttentionError(RuntimeError):
    """vLLM's FlashAttention raised on a prefill pass (an unsupported GPU, head size or build)."""


def prefill_mode(codec: LayerCodec, query: torch.Tensor) -> str:
    """"fa" (vLLM's FlashAttention over dequantized pages) or "triton" (the fused kernel over pages) for prefill
    rows: TQ_VLLM_PREFILL=auto|fa|triton; auto picks fa where vLLM's FlashAttention runs this head size/dtype."""
    mode = os.environ.get("TQ_VLLM_PREFILL", "auto")
    if mode not in ("auto", "fa", "triton"):
        raise ValueError(f"TQ_VLLM_PREFILL={mode!r}: choose auto, fa or triton")
    if mode == "triton" or not query.is_cuda or (mode == "auto" and _FA_FAILED):
        return "triton"
    from .prefill import flash_attn_fn
    ok = (flash_attn_fn() is not None and query.dtype in (torch.float16, torch.bfloat16)
          and codec.head_dim in (64, 96, 128, 256) and codec.block_size % 16 == 0)
    if mode == "fa" and not ok:
        raise RuntimeError("TQ_VLLM_PREFILL=fa: vLLM's FlashAttention is not available for this device, dtype, "
                           f"head size {codec.head_dim} or block size {codec.block_size}; use auto")
    return "fa" if ok else "triton"


def dequantize_blocks(codec: LayerCodec, kv_cache: torch.Tensor, block_ids: torch.Tensor, first: torch.Tensor,
                      ws_k: torch.Tensor, ws_v: torch.Tensor, dst: torch.Tensor, sink=None,
                      force: str | None = None) -> None:
    """ws_k[dst[i]], ws_v[dst[i]] ([B, H, D] each, original domain, workspace dtype) <- page `block_ids[i]`
    dequantized; where `first[i]` != 0 and the sink table holds the page's token 0, that token is exact.
    block_ids, first, dst: [N] int; ws_k, ws_v: [blocks, B, H, D]."""
    N = block_ids.numel()
    if N == 0:
        return
    if not use_triton(kv_cache, force):
        k, v = codec.dequantize_pages(kv_cache, block_ids)  # [N, B, H, D] float32
        if sink is not None and codec.preset.sink:
            f = first.to(torch.bool)
            if bool(f.any()):
                valid, k0, v0 = _ref.sink_lookup(codec, kv_cache, block_ids[f], sink)
                k[f, 0] = torch.where(valid[..., None], k0, k[f, 0])
                v[f, 0] = torch.where(valid[..., None], v0, v[f, 0])
        ws_k[dst.long()] = k.to(ws_k.dtype)
        ws_v[dst.long()] = v.to(ws_v.dtype)
        return
    lay = codec.layout
    D, B = lay.head_dim, lay.block_size
    H = kv_cache.shape[1]
    codec.page_view(kv_cache)
    assert ws_k.stride() == ws_v.stride() and ws_k.stride(-1) == 1
    tb = tables(codec, kv_cache.device)
    kw = layout_constexprs(lay)
    for k in ("RK", "RV", "XK", "XV"):
        kw.pop(k)
    kw.pop("B"), kw.pop("D")
    pi16 = tb.rot16.get(torch.bfloat16)
    skv, stag, nsink, sst, has_sink = _sink_args(sink, kv_cache.device, ws_k.dtype)
    kw["SINK"] = kw["SINK"] and has_sink
    mod = _kmod("dequant")
    rows = 128 // next_pow2(B)  # pages of 128 token rows in all (1 for B = 128)
    npg = int(os.environ.get("TQ_VLLM_DEQUANT_PAGES", DEQUANT_PAGES)) or rows
    npg = next_pow2(max(1, min(npg, rows)))
    _launch("dequant", mod._tq_dequant_kernel, (triton_cdiv(N, npg), H), (
        kv_cache, block_ids, dst, first, ws_k, ws_v, tb.rot, pi16 if pi16 is not None else tb.rot, tb.qjl,
        tb.c32["k"], tb.c32["v"], tb.c32["k_mean"], tb.c32["v_mean"], skv, stag, tb.rsd, nsink, N,
        ws_k.stride(0), ws_k.stride(1), ws_k.stride(2), *sst), dict(
        H=H, D=D, DP=next_pow2(D), B=B, BP=next_pow2(B), PM1=pi16 is not None, DC=DC, INTERP=_interp(), NPG=npg,
        **_cfg("DEQUANT"), **kw))


def fill_workspace(key, value, staging, ctx_slot, ps, wk, wv, force: str | None = None) -> None:
    """The exact tokens of a prefill pass into the workspace: wk/wv [blocks*B, H, D] rows ps.in_dst <- key/value
    [T, H, D] rows ps.in_src (zeros where ps.in_src < 0), and rows ps.st_dst <- staging [slots, 2, B, H, D] of slot
    ctx_slot[ps.st_row] at offset ps.st_off (`ps`: a PrefillPass or FillLists). One Triton launch per list on CUDA
    (torch indexing elsewhere)."""
    if not use_triton(wk, force):
        if ps.in_dst.numel():
            src = ps.in_src.long()
            zero = (src < 0)[:, None, None]  # zeros after a pass's last exact key
            wk[ps.in_dst.long()] = key[src.clamp_min(0)].to(wk.dtype).masked_fill(zero, 0)
            wv[ps.in_dst.long()] = value[src.clamp_min(0)].to(wv.dtype).masked_fill(zero, 0)
        if ps.st_dst.numel():
            slots = ctx_slot[ps.st_row.long()].long()
            off = ps.st_off.long()
            wk[ps.st_dst.long()] = staging[slots, 0, off].to(wk.dtype)
            wv[ps.st_dst.long()] = staging[slots, 1, off].to(wv.dtype)
        return
    _, H, D = wk.shape
    assert wk.stride() == wv.stride() and wk.stride(-1) == 1 and key.stride(-1) == 1 and value.stride(-1) == 1
    HD = next_pow2(H * D)
    TT = max(1, 4096 // HD)
    mod = _kmod("dequant")
    st = staging.stride()
    for n, src, dst, rows, from_stg in ((ps.in_dst.numel(), ps.in_src, ps.in_dst, ps.in_dst, False),
                                        (ps.st_dst.numel(), ps.st_off, ps.st_dst, ps.st_row, True)):
        if n:
            _launch("fill", mod._tq_ws_fill_kernel, (triton_cdiv(n, TT),), (
                key, value, staging, src, dst, rows, ctx_slot, wk, wv, n, key.stride(0), key.stride(1),
                value.stride(0), value.stride(1), st[0], st[1], st[2], st[3], wk.stride(0), wk.stride(1)), dict(
                H=H, D=D, HD=HD, TT=TT, FROM_STG=from_stg, **_cfg("FILL")))


def warm_up(codec: LayerCodec, kv_cache: torch.Tensor, sink=None, workspace=None, force: str | None = None,
            staging: torch.Tensor | None = None) -> None:
    """Compile what vLLM's own warm-up does not reach, with the arguments real steps pass (so the same
    specializations): the page dequantization and the workspace fill of the prefill path, which otherwise compile at
    the first request that completes a block (~3 s on an H200). Writes workspace block 0 (scratch) only: page 0
    (vLLM's null block) dequantized, then token 0 from token 1 and from staging slot 0."""
    if workspace is None or not use_triton(kv_cache, force):
        return
    one = torch.zeros(4, dtype=torch.int32, device=kv_cache.device)[:1]  # 16-byte aligned, like the plan's arrays
    dequantize_blocks(codec, kv_cache, one, one.clone(), workspace.k, workspace.v, one.clone(), sink=sink, force=force)
    if staging is not None:
        _, B, H, D = workspace.k.shape
        wk, wv = workspace.k.view(-1, H, D), workspace.v.view(-1, H, D)
        idx = torch.zeros(8, dtype=torch.int32, device=kv_cache.device)
        ps = FillLists(in_src=idx[4:5] + 1, in_dst=idx[:1], st_row=idx[:1].clone(), st_off=idx[:1].clone(),
                       st_dst=idx[:1].clone())
        fill_workspace(wk, wv, staging, idx[:1].clone(), ps, wk, wv, force)  # row 1 -> row 0, slot 0 -> row 0
    if sink is not None:  # the sink commit of prefill steps (an empty list: entry -1)
        import types
        none = torch.full((4,), -1, dtype=torch.int32, device=kv_cache.device)[:1]
        commit_sink(sink, types.SimpleNamespace(qb_row=none, qb_idx=none.clone(), num_rows=1), kv_cache, force)


@dataclass
class FillLists:
    """The exact-token lists `fill_workspace` reads (a PrefillPass has them too); int32 device tensors."""
    in_src: torch.Tensor
    in_dst: torch.Tensor
    st_row: torch.Tensor
    st_off: torch.Tensor
    st_dst: torch.Tensor


def prefill_attention(codec: LayerCodec, query, key, value, kv_cache, staging, plan: StepPlan, scale: float,
                      out: torch.Tensor, meta: KernelMeta, attn_fn, sink=None, force: str | None = None,
                      workspace=None) -> torch.Tensor:
    """Rows [meta.num_decode_rows, R) of the step through `attn_fn` (vLLM's FlashAttention, or
    `prefill.varlen_paged_ref` in tests) over dequantized pages; see prefill.py. Writes out [T, Hq, D]."""
    from .prefill import merge_into, workspace_for
    T, Hq, D = query.shape
    H = key.shape[1]
    B = plan.block_size
    ws = workspace or workspace_for(query.device, query.dtype, B, H, D)
    if ws.k.dtype != query.dtype or tuple(ws.k.shape[1:]) != (B, H, D):
        raise ValueError(f"prefill workspace {tuple(ws.k.shape)} {ws.k.dtype} does not match [*, {B}, {H}, {D}] "
                         f"{query.dtype}")
    pp = meta.prefill_plan(plan, ws.blocks, query.device)
    wk, wv = ws.k.view(-1, H, D), ws.v.view(-1, H, D)
    lse_g = [None] * pp.num_groups
    for ps in pp.passes:
        fill_workspace(key, value, staging, plan.ctx_slot, ps, wk, wv, force)
        if ps.deq_dst.numel():
            if ps.deq_ids is None:  # the same for every layer of the step: gathered once
                ps.deq_ids = plan.block_table[ps.deq_row.long(), ps.deq_blk.long()].to(torch.int32)
            dequantize_blocks(codec, kv_cache, ps.deq_ids, ps.deq_first, ws.k, ws.v, ps.deq_dst, sink=sink,
                              force=force)
        q = query[ps.q0:ps.q1]
        o = out[ps.q0:ps.q1]
        args = (ws.k, ws.v, ps.cu_q, ps.max_q, ps.seqused_k, ps.max_k, ps.block_table, scale, ps.causal)
        first = ps.group < 0 or ps.first_of_group
        direct = first and o.is_contiguous() and o.dtype == q.dtype
        try:
            res, lse = attn_fn(q, *args, out=o if direct else None)
        except Exception as err:  # noqa: BLE001
            raise FlashAttentionError(f"{type(err).__name__}: {err}") from err
        if first:
            if not direct:
                o.copy_(res)
            if ps.group >= 0:
                lse_g[ps.group] = lse.float()
        else:
            g0 = pp.group_q[ps.group][0]
            a = ps.q0 - g0
            merge_into(o, lse_g[ps.group][:, a:a + (ps.q1 - ps.q0)], res, lse)
    return out


def _pdl(query: torch.Tensor, small: bool, mod) -> bool:
    """Whether the split reduction is launched as a programmatic dependent of the decode launch (CUDA's programmatic
    stream serialization), which triggers it at its start (`gdc_launch_dependents`): the reduction's programs are
    resident when the decode ends and wait at `gdc_wait` for the decode grid and its writes before any global
    access. `small`: the caller's rule (4-warp launches of one wave and at most PDL_MAX_PAIRS (row, head) pairs): in
    larger launches the waiting programs take slots the decode's later programs need (4 x 1K at 32 splits, 1,056
    programs: 0.0201 -> 0.0251 ms), at 64 pairs of one wave it was slower too (8 x 1K 0.0160 -> 0.0229), and without
    the early trigger the dependent launch alone was 1.5 % slower (H200, benchmarks.md "2026-11-29 (fifth session)").
    TQ_VLLM_PDL=auto (CUDA, Hopper and newer, `small`) | 0 | 1 (at any launch size and without the device checks:
    tests, offline compiles). `mod`: the attention kernels' module (`_kmod`), whose import found grid dependency
    control or not."""
    mode = os.environ.get("TQ_VLLM_PDL", "auto")
    if mode not in ("auto", "0", "1"):
        raise ValueError(f"TQ_VLLM_PDL={mode!r}: choose auto, 0 or 1")
    if mode == "0" or _interp() or mod.gdc_wait is None:
        return False
    if mode == "1":
        return True
    return small and query.is_cuda and torch.cuda.get_device_capability(query.device)[0] >= 9


def _one_wave_cfg(nprog: int, device) -> dict:
    """The 4-warp decode launch's register cap where its programs fit in one wave even at the higher cap (occupancy
    does not matter there, spills do): TQ_VLLM_DECODE_ONEWAVE_MAXNREG (default ONEWAVE_MAXNREG; 0 keeps the cap).
    An explicit TQ_VLLM_DECODE_MAXNREG wins."""
    nreg = int(os.environ.get("TQ_VLLM_DECODE_ONEWAVE_MAXNREG", ONEWAVE_MAXNREG))
    if not nreg or "TQ_VLLM_DECODE_MAXNREG" in os.environ:
        return {}
    if nprog > num_sms(device.index or 0) * programs_per_sm(nreg, 4):
        return {}
    return dict(maxnreg=nreg)


def _k8_modes(codec, kw: dict) -> dict:
    """The integer-MMA key path of the decode (TQ_VLLM_DECODE_KI8=1, opt-in): 4-bit grid keys (a 4-bit asm mode, two
    lattices, no QJL) scored as int8 u codes against the rotated query rounded to int8, with the randomized-Hadamard
    rotation (the kernel checks that at compile time and otherwise keeps the fp16 path). On an H200 3-4 % faster from
    64K decode tokens and 5 % slower at 1 x 1K; the int8 query costs no perplexity on SmolLM2
    (benchmarks/research_int8_query.py) but moves the attention output further from the reference than the fp16
    path (about 20x on random queries in tests/test_kernels.py, 2-3x on synthetic heads), hence opt-in."""
    mode = os.environ.get("TQ_VLLM_DECODE_KI8", "0")
    if mode not in ("0", "1"):
        raise ValueError(f"TQ_VLLM_DECODE_KI8={mode!r}: choose 0 or 1")
    if mode == "0" or kw["KMODE"] != 1 or kw["RK"] != 2 or kw["PROD"]:
        return dict(KI8=False, K8ASM="", K8DEL=1.0)
    # cached per codec: the centroids live on the device, and reading them back inside a CUDA-graph capture fails
    cache = codec.__dict__.setdefault("_tq_k8_modes", {})
    key = bool(kw["KASM"])
    if key not in cache:
        from tq_vllm.quant.codebook import grid_of

        from .lut import asm_4bit_i8
        delta, u = grid_of(codec.centroids["k"].tolist())
        # (KASM "" is TQ_VLLM_LUT=emulate: the kernel gathers the same values)
        cache[key] = dict(KI8=True, K8ASM=asm_4bit_i8(tuple(u)) if key else "", K8DEL=float(delta))
    return cache[key]


def _lut_modes(codec, device, RK, RV, form: str = "signed"):
    """Decode path of K and V codes: prmt look-ups in inline PTX on CUDA (TQ_VLLM_LUT=gather turns them off;
    TQ_VLLM_LUT=emulate runs the 4-bit asm's path with its values gathered from a table, also in the interpreter).
    `form`: the 4-bit grid asm's form (lut.py), "signed" (±a · 2^-24: no offset terms in the kernel) or "offset"
    (1024 + u); the launch picks it (NARROW_LUT4 for the narrow decode launch), TQ_VLLM_LUT4 overrides."""
    lut = os.environ.get("TQ_VLLM_LUT", "asm")
    if lut not in ("asm", "gather", "emulate"):
        raise ValueError(f"TQ_VLLM_LUT={lut!r}: choose asm, gather or emulate")
    # emulate (tests, the CPU interpreter): grid codes take the asm's path with a table gather in place of the asm
    if lut == "gather" or (lut == "asm" and (device.type != "cuda" or _interp())):
        return dict(KMODE=0, KASM="", VMODE=0, VASM="")
    form = os.environ.get("TQ_VLLM_LUT4", form)
    cache = codec.__dict__.setdefault("_tq_lut_modes", {})
    key = (RK, RV, lut, form)
    if key not in cache:
        from .lut import asm_for
        km, ka, kd, ks = asm_for(codec.layout.k_bits, RK, codec.centroids["k"], form)
        vm, va, vd, vs = asm_for(codec.layout.v_bits, RV, codec.centroids["v"], form)
        if lut == "emulate":
            km, ka, vm, va = (km if km == 1 else 0), "", (vm if vm == 1 else 0), ""
        cache[key] = dict(KMODE=km, KASM=ka, VMODE=vm, VASM=va, KDEL=kd, VDEL=vd, KSG=ks and km == 1,
                          VSG=vs and vm == 1)
    return cache[key]


def forward_step(codec: LayerCodec, query, key, value, kv_cache, staging, plan: StepPlan, scale: float,
                 out: torch.Tensor | None = None, meta: KernelMeta | None = None, force: str | None = None,
                 sink=None, workspace=None):
    """One layer's step: store the completed blocks, attend, then stage the open blocks. Returns out [T, Hq, D].
    `sink` = (kv [N, 2, H, D], tags [N, H]) from `codec.new_sink_table` (None: token 0 stays coded).
    In a step where every row decodes one token no query reads a block completed in it (its own block is exact):
    the store's sink-table entries wait for the staging copy after the attention (no commit launch of their own),
    and from STORE_OVERLAP_ROWS rows on CUDA the store runs beside the attention on a second stream. Below that the
    staging copy and the commit run in the split reduction's launch (TQ_VLLM_STAGE_FOLD=0: a launch of their own)."""
    tri = use_triton(query, force)
    if tri:
        meta = _meta(plan, key.shape[1], query.shape[1], meta)
    decode_only = tri and meta.num_decode_rows == plan.num_rows
    side = _side_stream(query.device) if tri and query.is_cuda and _store_beside(query, plan, meta) else None
    if side is not None:
        if sink is not None:  # any (re-)allocation of the pending entries on this stream, before the fork
            _pending_args(sink, plan)
        side.wait_stream(torch.cuda.current_stream(query.device))
        with torch.cuda.stream(side):
            store_blocks(codec, kv_cache, staging, key, value, plan, sink=sink, force=force, defer_sink=True)
    else:
        store_blocks(codec, kv_cache, staging, key, value, plan, sink=sink, force=force, defer_sink=decode_only)
    # decode-only steps without a side stream: the staging copy (and sink commit) in the split reduction's launch
    fold = decode_only and side is None and plan.num_rows > 0 and os.environ.get("TQ_VLLM_STAGE_FOLD", "1") != "0"
    out = paged_attention(codec, query, key, value, kv_cache, staging, plan, scale, out=out, meta=meta, force=force,
                          sink=sink, workspace=workspace, stage=fold, commit_sink=sink if fold else None)
    if side is not None:
        torch.cuda.current_stream(query.device).wait_stream(side)
    if not fold:
        write_staging(staging, key, value, plan, force=force, commit_sink=sink if decode_only else None)
    return out


_SIDE: dict = {}


def _side_stream(device):
    dev = torch.device(device)
    if dev not in _SIDE:
        _SIDE[dev] = torch.cuda.Stream(dev)
    return _SIDE[dev]


def _store_beside(query: torch.Tensor, plan: StepPlan, meta: KernelMeta) -> bool:
    """Whether this step's store runs beside its attention: steps where every row decodes one token and the
    completed-block list is not empty. TQ_VLLM_STORE_OVERLAP=auto: from STORE_OVERLAP_ROWS rows
    (TQ_VLLM_STORE_OVERLAP_ROWS); 1: at any row count; 0: never. Only on CUDA (elsewhere the same order of effects
    runs in sequence)."""
    mode = os.environ.get("TQ_VLLM_STORE_OVERLAP", "auto")
    if mode not in ("auto", "0", "1"):
        raise ValueError(f"TQ_VLLM_STORE_OVERLAP={mode!r}: choose auto, 0 or 1")
    if mode == "0" or plan.qb_row.numel() == 0 or meta.num_decode_rows != plan.num_rows:
        return False
    rows = int(os.environ.get("TQ_VLLM_STORE_OVERLAP_ROWS", STORE_OVERLAP_ROWS))
    return query.is_cuda and not _interp() and (mode == "1" or meta.num_decode_rows >= rows)
