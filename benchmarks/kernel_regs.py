"""Compile tq_vllm's Triton kernels for a GPU target on a machine without a GPU and print registers, spills and
shared memory per kernel (the first thing to look at when a kernel is slow; the lent GPU time is scarce).

    python benchmarks/kernel_regs.py                    # sm_90 (H100/H200), tq4 + tq3, every kernel
    python benchmarks/kernel_regs.py --presets tq4 --arch 90 --block 16 --ptx DIR   # also dump PTX/SASS
    python benchmarks/kernel_regs.py --presets tq3 --kernels decode --mix   # + SASS instruction mix, layout moves

Uses Triton's own compiler and the ptxas bundled with the `triton` wheel; nothing is launched. The numbers match
what the GPU's Triton reports when the Triton versions match (the lent GPU runs 3.6.0; this machine may differ).
Environment knobs of the launchers (TQ_VLLM_DECODE_CFG, TQ_VLLM_DECODE_TILE, ...) apply as usual.
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402


class _OfflineDriver:
    """Just enough of a Triton driver for `kernel.warmup`: a fixed CUDA target, no device."""

    def __init__(self, arch: int):
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        return torch.device("cpu")

    def is_active(self):
        return True


class _FakeCudaDevice:
    type = "cuda"
    index = 0


def install(arch: int):
    """Route tq_vllm's launches to compile-only warmups for `arch`; returns the dict that collects the results."""
    from tq_vllm import kernels as K

    driver.set_active(_OfflineDriver(arch))
    compiled = {}

    def launch(name, kernel, grid, args, kwargs, fallbacks=()):
        compiled[name] = kernel.warmup(*args, grid=grid, **kwargs)

    real_lut = K._lut_modes
    K._launch = launch
    K.use_triton = lambda t, force=None: True
    K._lut_modes = lambda codec, device, RK, RV, *a: real_lut(codec, _FakeCudaDevice(), RK, RV, *a)
    return compiled


def stats(ck):
    """Registers and spill bytes from the cubin's resource usage (cuobjdump of the triton wheel)."""
    import re

    md = ck.metadata
    txt = _cuobjdump(ck, "--dump-resource-usage")
    reg = re.search(r"REG:(\d+)", txt)
    spill = re.search(r"STACK:(\d+)", txt)
    return dict(regs=int(reg.group(1)) if reg else -1, spills=int(spill.group(1)) if spill else -1,
                shared_kb=round(md.shared / 1024, 1), warps=md.num_warps, stages=md.num_stages)


MIX_OPS = ("BAR", "STS", "LDS", "LDSM", "LDG", "LDGSTS", "STL", "LDL", "SHFL", "HMMA", "IMMA", "PRMT")


def _cuobjdump(ck, *args) -> str:
    import subprocess
    import tempfile

    from triton.backends.nvidia import compiler as nv
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(ck.asm["cubin"])
        f.flush()
        tool = os.path.join(os.path.dirname(nv.__file__), "bin", "cuobjdump")
        return subprocess.run([tool, *args, f.name], capture_output=True, text=True).stdout


def mix(ck) -> dict:
    """The SASS instruction mix of a compiled kernel (cuobjdump of the triton wheel; Triton's own `asm["sass"]` stops
    at 4,096 instructions, its offset pattern has 4 hex digits): the total and the counts of MIX_OPS, plus `cvt`:
    register tensors moved through shared memory (`ttg.local_alloc` of a value in the TTGIR, which is how Triton
    changes a tensor's layout; the pipeline's own buffers are allocated empty and not counted). What to compare
    between two builds of a kernel before spending GPU time on them."""
    import collections
    import re

    ops = collections.Counter()
    for m in re.finditer(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", _cuobjdump(ck, "-sass")):
        ops[m.group(1)] += 1
    out = {"instr": sum(ops.values()), **{k: ops[k] for k in MIX_OPS}}
    out["cvt"] = len(re.findall(r"ttg\.local_alloc %", ck.asm["ttgir"]))
    return out


def _dequant_case(preset, B, D, H=8):
    """One launch of the prefill path's page dequantization (CPU tensors: only shapes and dtypes matter)."""
    from tq_vllm import kernels as K
    from tq_vllm.quant.codec import LayerCodec
    codec = LayerCodec(preset, D, B)
    cache = torch.zeros(8, H, B, codec.layout.bytes_per_token, dtype=torch.uint8)
    ids = torch.arange(4, dtype=torch.int32)
    ws = torch.empty(8, B, H, D, dtype=torch.bfloat16)
    K.dequantize_blocks(codec, cache, ids, torch.zeros_like(ids), ws, torch.empty_like(ws), ids)


def _fill_case(B, D, H=8, T=512):
    """One launch per list of the prefill path's workspace fill (exact tokens from the step's K/V and staging)."""
    from tq_vllm import kernels as K
    qkv = torch.empty(T, 6 * H * D, dtype=torch.bfloat16)
    key, value = qkv[:, 4 * H * D:5 * H * D].view(T, H, D), qkv[:, 5 * H * D:].view(T, H, D)
    staging = torch.empty(4, 2, B, H, D, dtype=torch.bfloat16)
    ws = torch.empty(64 * B, H, D, dtype=torch.bfloat16)
    i = torch.zeros(16, dtype=torch.int32)
    K.fill_workspace(key, value, staging, i, K.FillLists(i, i, i, i, i), ws, torch.empty_like(ws))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--presets", default="tq4,tq3")
    ap.add_argument("--block", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--gqa", type=int, default=4)
    ap.add_argument("--kernels", default="decode,prefill,store,dequant,fill")
    ap.add_argument("--ptx", default=None, help="directory to write .ptx/.sass per kernel")
    ap.add_argument("--mix", action="store_true", help="also the SASS instruction mix per kernel (`mix`)")
    a = ap.parse_args()
    compiled = install(a.arch)
    import benchmarks.bench_decode as bd
    # Model shapes of bench_decode, on CPU tensors (only their dtypes, strides and alignment matter here)
    bd.DEV = "cpu"
    bd.D = a.head_dim
    bd.HQ = bd.HK * a.gqa
    print(f"triton {triton.__version__}, target sm_{a.arch}, head_dim {a.head_dim}, GQA {a.gqa}, block {a.block}")
    print(f"{'preset':8} {'kernel':8} {'regs':>5} {'stack B':>7} {'shared KB':>9} {'warps':>5} {'stages':>6}")
    for preset in a.presets.split(","):
        cases = {"decode": lambda: bd.tq_decode_case(preset, 4, 1000, a.block)[0](),
                 "prefill": lambda: bd.tq_prefill_case(preset, 256, 64, a.block)(),
                 "store": lambda: bd.store_case(preset, 8 * a.block, a.block)[0](),
                 "dequant": lambda: _dequant_case(preset, a.block, a.head_dim),
                 "fill": lambda: _fill_case(a.block, a.head_dim)}
        for name in a.kernels.split(","):
            compiled.clear()
            cases[name]()
            for kname, ck in compiled.items():
                if kname in ("reduce", "staging") and name != "decode":
                    continue
                s = stats(ck)
                print(f"{preset:8} {kname:8} {s['regs']:>5} {s['spills']:>7} {s['shared_kb']:>9} {s['warps']:>5} "
                      f"{s['stages']:>6}")
                if a.mix:
                    print("    " + "  ".join(f"{k} {v}" for k, v in mix(ck).items()))
                if a.ptx:
                    os.makedirs(a.ptx, exist_ok=True)
                    for ext in ("ptx", "sass", "ttgir", "cubin"):
                        try:
                            txt = ck.asm[ext]
                        except Exception:  # noqa: BLE001 - sass needs nvdisasm
                            continue
                        with open(os.path.join(a.ptx, f"{preset}_{kname}.{ext}"), "wb" if ext == "cubin" else "w") as f:
                            f.write(txt)


if __name__ == "__main__":
    main()
