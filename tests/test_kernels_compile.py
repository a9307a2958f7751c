"""The Triton kernels compile for the GPU (sm_90, H100/H200) on this machine without one.

The CPU tests run the kernels in Triton's interpreter, which executes the Python of a `@triton.jit` function as
written and never lowers it: a branch the interpreter takes happily (say an early `return` under a constexpr `if`
followed by code of another dtype) can still fail to compile for a GPU, and then only the lent GPU finds it
(2026-11-28). `benchmarks/kernel_regs.py` compiles every launch with Triton's own compiler and the `ptxas` bundled
with the triton wheel; here it runs for the launch shapes the kernels have (4-bit grid asm, two-warp 3-bit launch,
QJL keys, the narrow launch, the split reduction's two product forms, small head_dim and large blocks), and each
must compile and report its registers."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _offline_compiler() -> bool:
    try:
        from triton.backends.nvidia import compiler as nv
    except Exception:  # noqa: BLE001 - a triton without the CUDA backend
        return False
    return all(os.path.exists(os.path.join(os.path.dirname(nv.__file__), "bin", t)) for t in ("ptxas", "cuobjdump"))


pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not _offline_compiler(), reason="triton without its CUDA backend / ptxas")]

CASES = [
    # (id, kernel_regs arguments, environment, kernels expected per preset)
    ("all-kernels", ["--presets", "tq4,tq3,tq4-prod", "--block", "32"], {},
     ["decode", "reduce", "prefill", "store", "dequant", "fill"]),
    ("reduce-pm1", ["--presets", "tq4,tq3", "--block", "32", "--kernels", "decode"], {"TQ_VLLM_REDUCE_PM1": "1"},
     ["decode", "reduce"]),
    ("narrow", ["--presets", "tq4", "--block", "16", "--kernels", "decode"], {"TQ_VLLM_DECODE_NARROW": "1"},
     ["decode", "reduce"]),
    ("d64-b128", ["--presets", "tq3,tq25", "--block", "128", "--head-dim", "64", "--gqa", "8", "--kernels",
                  "decode"], {}, ["decode", "reduce"]),
    ("d256-fused-prefill", ["--presets", "tq3,tq4", "--block", "64", "--head-dim", "256", "--gqa", "1", "--kernels",
                            "prefill"], {}, ["prefill"]),
]
SMEM_KB = 227  # the opt-in shared memory of one block on sm_90 (232,448 B)


# the lent GPU's Triton (scripts/setup_env.sh installs it beside the venv, off its path): Triton 3.6 refuses what
# newer ones take (2026-11-29: a helper's string constexpr with a default value), so the kernels compile with both
GPU_TRITON = os.path.join(sys.prefix, "triton-gpu")
GPU_TRITON_VERSION = "3.6.0"
GPU_CASES = [
    CASES[0],  # all-kernels
    CASES[4],  # d256-fused-prefill
    ("store-cen", ["--presets", "tq4,tq35", "--block", "32", "--kernels", "store"],
     {"TQ_VLLM_STORE_CMP": "3", "TQ_VLLM_STORE_CEN": "1"}, ["store"]),
    # the store's other code paths and layouts (the default, STORE_CMP=5 with the permuted product and codes packed 8
    # to a word, is in all-kernels)
    ("store-cmp4", ["--presets", "tq4,tq3", "--block", "32", "--kernels", "store"], {"TQ_VLLM_STORE_CMP": "4"},
     ["store"]),
    ("store-classic", ["--presets", "tq4,tq25", "--block", "16", "--kernels", "store"],
     {"TQ_VLLM_STORE_CMP": "3", "TQ_VLLM_STORE_PERM": "0", "TQ_VLLM_STORE_PACK8": "0"}, ["store"]),
]


def _table(out: str) -> dict:
    """kernel_regs.py's table: {(preset, kernel): (registers, stack bytes, shared KB)}."""
    return {(f[0], f[1]): (int(f[2]), int(f[3]), float(f[4])) for f in (line.split() for line in out.splitlines())
            if len(f) == 7 and f[2].isdigit()}


def _compile(args, env, kernels, tmp_path, pythonpath=None):
    run_env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET" and not k.startswith("TQ_VLLM_")}
    run_env.update(env, TRITON_CACHE_DIR=str(tmp_path / "triton"))  # a fresh cache: really compile
    if pythonpath:
        run_env["PYTHONPATH"] = os.pathsep.join([pythonpath, ROOT])
    p = subprocess.run([sys.executable, "benchmarks/kernel_regs.py", *args], cwd=ROOT, env=run_env,
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    table = _table(p.stdout)
    rows = {k: v[0] for k, v in table.items()}
    shared = {k: v[2] for k, v in table.items()}
    presets = args[args.index("--presets") + 1].split(",")
    want = {(p_, k) for p_ in presets for k in kernels}
    assert want <= set(rows), (sorted(want - set(rows)), p.stdout[-2000:])
    assert all(0 < rows[k] <= 255 for k in want), rows
    # every kernel must fit the shared memory of one H100/H200 block (227 KB): above it the launch fails on the GPU
    # while the interpreter runs it happily (the fused prefill at head_dim 256, 2026-11-29)
    assert all(v <= SMEM_KB for v in shared.values()), {k: v for k, v in shared.items() if v > SMEM_KB}
    return p.stdout


@pytest.mark.parametrize("args,env,kernels", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_kernels_compile_for_sm90(args, env, kernels, tmp_path):
    _compile(args, env, kernels, tmp_path)


@pytest.mark.skipif(not os.path.exists(os.path.join(GPU_TRITON, "triton", "__init__.py")),
                    reason=f"no {GPU_TRITON} (scripts/setup_env.sh installs the GPU's Triton there on x86_64)")
@pytest.mark.parametrize("args,env,kernels", [c[1:] for c in GPU_CASES], ids=[c[0] for c in GPU_CASES])
def test_kernels_compile_with_the_gpu_triton(args, env, kernels, tmp_path):
    """The same with Triton 3.6, the lent GPU's (vLLM 0.26 / torch 2.11)."""
    out = _compile(args, env, kernels, tmp_path, pythonpath=GPU_TRITON)
    assert out.startswith(f"triton {GPU_TRITON_VERSION},"), out[:200]


@pytest.mark.parametrize("pythonpath", [None, GPU_TRITON])
@pytest.mark.parametrize("D", [96, 128])
def test_dequant_rotation_products_do_not_spill(D, pythonpath, tmp_path):
    """The page dequantization's fp32 products (Π where it is not ±1, as at head_dim 96, and the QJL matrix of prod
    keys) run on tensor cores as tf32x3. As ieee products they unrolled into ~12,000 FMAs per thread, which ptxas
    held in 32 registers with 8.9-12 KB of spills at head_dim 96 (2.5-3 KB for tq4-prod at 128; 2026-11-29)."""
    if pythonpath and not os.path.exists(os.path.join(pythonpath, "triton", "__init__.py")):
        pytest.skip("the GPU's Triton is not installed beside the venv")
    out = _compile(["--presets", "tq4,tq35,tq4-prod", "--block", "32", "--head-dim", str(D), "--kernels",
                    "dequant"], {}, ["dequant"], tmp_path, pythonpath)
    stack = {preset: v[1] for (preset, kernel), v in _table(out).items() if kernel == "dequant"}
    assert set(stack) == {"tq4", "tq35", "tq4-prod"} and max(stack.values()) <= 1024, stack


def test_kernel_regs_instruction_mix(tmp_path):
    """`kernel_regs.py --mix`: the whole kernel's SASS instruction mix from cuobjdump, past the 4,096 instructions
    where Triton's own listing stops (the store kernel with QJL keys has more: ~9,800; tq4's has ~3,700 since
    2026-11-29), each count a number, the keys `mix` promises."""
    out = _compile(["--presets", "tq4-prod", "--block", "32", "--kernels", "store", "--mix"], {}, ["store"],
                   tmp_path)
    lines = [line.split() for line in out.splitlines() if line.startswith("    instr ")]
    assert len(lines) == 1, out[-2000:]
    mix = dict(zip(lines[0][::2], (int(x) for x in lines[0][1::2])))
    ops = list(mix)[1:-1]  # (kernel_regs.MIX_OPS; importing kernel_regs here would drop TRITON_INTERPRET)
    assert list(mix)[0] == "instr" and list(mix)[-1] == "cvt" and {"BAR", "STS", "LDG", "HMMA", "STL"} <= set(ops)
    assert mix["instr"] > 4096 and mix["HMMA"] > 0 and mix["BAR"] > 0 and mix["LDG"] > 0
    assert mix["instr"] > sum(mix[k] for k in ops)


@pytest.mark.parametrize("pythonpath", [None, GPU_TRITON])
def test_ki8_decode_compiles_to_integer_mma(pythonpath, tmp_path):
    """TQ_VLLM_DECODE_KI8=1: the tq4 decode scores the key codes with integer MMAs (IMMA in place of half the HMMA),
    with the venv's Triton and the GPU's (3.6), and with the GPU's spills nothing."""
    if pythonpath and not os.path.exists(os.path.join(pythonpath, "triton", "__init__.py")):
        pytest.skip("the GPU's Triton is not installed beside the venv")
    args = ["--presets", "tq4", "--block", "32", "--kernels", "decode", "--mix"]
    mixes = {}
    for ki8 in ("0", "1"):
        out = _compile(args, {"TQ_VLLM_DECODE_KI8": ki8}, ["decode"], tmp_path / ki8, pythonpath)
        row = [line.split() for line in out.splitlines() if line.startswith("tq4") and " decode " in line][0]
        line = [x.split() for x in out.splitlines() if x.startswith("    instr ")][0]
        mixes[ki8] = dict(zip(line[::2], (int(x) for x in line[1::2])), stack=int(row[3]))
    assert mixes["0"]["IMMA"] == 0 < mixes["1"]["IMMA"], mixes
    assert mixes["1"]["HMMA"] < mixes["0"]["HMMA"], mixes
    if pythonpath:  # (the GPU's Triton; the venv's newer one spills 144 B under the 128-register cap, not timed)
        assert mixes["1"]["stack"] == 0, mixes


@pytest.mark.parametrize("pythonpath", [None, GPU_TRITON])
def test_pdl_launch_compiles_with_grid_dependency_control(pythonpath, tmp_path):
    """TQ_VLLM_PDL=1: the decode kernel triggers its dependents (griddepcontrol.launch_dependents) and the split
    reduction waits for the decode grid (griddepcontrol.wait) before anything else; with 0 neither is there. Both
    Tritons, the 4-warp (tq4) and the two-warp (tq3) launch."""
    if pythonpath and not os.path.exists(os.path.join(pythonpath, "triton", "__init__.py")):
        pytest.skip("the GPU's Triton is not installed beside the venv")
    for pdl in ("0", "1"):
        ptx = tmp_path / f"ptx{pdl}"
        _compile(["--presets", "tq4,tq3", "--block", "32", "--kernels", "decode", "--ptx", str(ptx)],
                 {"TQ_VLLM_PDL": pdl}, ["decode", "reduce"], tmp_path / pdl, pythonpath)
        for preset in ("tq4", "tq3"):
            dec = (ptx / f"{preset}_decode.ptx").read_text()
            red = (ptx / f"{preset}_reduce.ptx").read_text()
            assert ("griddepcontrol.launch_dependents" in dec) == (pdl == "1"), (preset, pdl)
            assert ("griddepcontrol.wait" in red) == (pdl == "1"), (preset, pdl)
            assert "griddepcontrol.wait" not in dec and "griddepcontrol.launch_dependents" not in red
            if pdl == "1":  # the wait comes before the reduction's first global access
                body = red[red.index("griddepcontrol.wait"):]
                assert "ld.global" not in red[:red.index("griddepcontrol.wait")] and "ld.global" in body


def _probe_model(cache, programs, n_tiles):
    """What `_probe_kernel` computes, element by element in torch: its byte addresses, the nibble of each lattice
    column, the asm's look-up as `lut.emulate` (held to the asm's PTX by test_kernels_lut.py), fp32 sums."""
    from gluon_probe import TILE_BYTES, TOK, XV
    i = torch.arange(programs * n_tiles)[:, None, None]
    t = torch.arange(XV)[None, :, None]
    k = torch.arange(TOK)[None, None, :]
    cache = cache.to(torch.int64)
    p0 = cache[i * TILE_BYTES + k * XV + t]
    hh = (cache[i * TILE_BYTES + TOK * XV + k * (XV // 2) + t // 2] >> ((t % 2) * 4)) & 15
    return p0, hh  # [tiles, XV, TOK]


def test_gluon_probe_addressing_matches_torch():
    """The Gluon probe's plane addressing and nibble selection, modelled in torch with the asm's model, give the
    probe's torch reference (so a GPU run of `gluon_probe.py --run` checks the layouts, not the arithmetic)."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from gluon_probe import N, XV, inputs

    from tq_vllm.kernels.lut import emulate
    from tq_vllm.quant.codebook import page_codebook
    programs, n_tiles = 2, 3
    cache, p, _, ref = inputs(programs, n_tiles, "cpu", seed=7)
    p0, hh = _probe_model(cache, programs, n_tiles)
    c = page_codebook(128, 3, "v")[0]

    def result(nibbles):  # the 4 lattices' sums over tiles, [programs, 4, XV, N]
        lat = emulate(2, c, p0, nibbles)  # 4 x [tiles, XV, TOK] fp16
        acc = torch.stack([torch.einsum("itk,ikn->itn", lat[r].float(), p.float()) for r in range(4)], 1)
        return acc.reshape(programs, n_tiles, 4, XV, N).sum(1)

    assert torch.allclose(result(hh), ref, rtol=1e-5, atol=1e-4)
    # a nibble taken from the wrong half of the 1-bit byte changes the result
    assert not torch.allclose(result(hh ^ 1), ref, rtol=1e-3, atol=1e-2)


def test_gluon_probe_pipelined_addressing_matches_torch():
    """The pipelined probe (NSTAGE >= 2), modelled in torch: the cp.async view of a ring slot (NAT0, NAT1) and the
    A-operand read views (RD0, RD1: rows permuted by sigma, one 1-bit byte for rows m and m + 8) address the same
    bytes, the nibble follows m bit 3, and storing row m as column sigma(m) gives the torch reference."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from gluon_probe import NAT0, NAT1, N, RD0, RD1, TILE_BYTES, TOK, XV, inputs, sigma

    from tq_vllm.kernels.lut import emulate
    from tq_vllm.quant.codebook import page_codebook

    def offsets(bases, shape):  # logical index -> byte offset of a SharedLinearLayout (offset bit -> index, XOR)
        off = torch.arange(1 << len(bases))
        idx = torch.zeros(len(off), len(shape), dtype=torch.int64)
        for b, v in enumerate(bases):
            idx ^= ((off >> b) & 1)[:, None] * torch.tensor(v)
        inv = torch.full(shape, -1, dtype=torch.int64)
        inv[tuple(idx.T)] = off
        assert (inv >= 0).all() and len(set(inv.flatten().tolist())) == len(off)  # a bijection
        return inv

    programs, n_tiles = 2, 3
    cache, p, _, ref = inputs(programs, n_tiles, "cpu", seed=7)
    tiles = cache.to(torch.int64).reshape(-1, TILE_BYTES)
    pl0, pl1 = tiles[:, :TOK * XV].reshape(-1, TOK, XV), tiles[:, TOK * XV:].reshape(-1, TOK, XV // 2)
    s0 = torch.zeros(len(tiles), TOK * XV, dtype=torch.int64)  # the ring slots after the copies
    s1 = torch.zeros(len(tiles), TOK * XV // 2, dtype=torch.int64)
    s0[:, offsets(NAT0, [TOK, XV]).flatten()] = pl0.reshape(len(tiles), -1)
    s1[:, offsets(NAT1, [TOK, XV // 2]).flatten()] = pl1.reshape(len(tiles), -1)
    # the copies keep 16 B chunks whole (16 B cp.async) and rows m, m + 8 adjacent (16-bit reads)
    for bases in (NAT0, NAT1):
        assert [bases[b] for b in range(4)] == [[0, 1], [0, 2], [0, 4], [0, 8]]
    assert RD0[0] == [8, 0]
    m = torch.arange(XV)[:, None]
    p0 = s0[:, offsets(RD0, [XV, TOK])]  # [tiles, m, k]
    h = s1[:, offsets(RD1, [2, XV // 4, TOK])]  # [tiles, m bit 4, m bits 0..2, k]
    p1 = h[:, m[:, 0] >> 4, m[:, 0] & 7]  # the broadcast over m bit 3
    hh = (p1 >> (((m >> 3) & 1) * 4)) & 15
    p0_ref, hh_ref = _probe_model(cache, programs, n_tiles)  # [tiles, t, k]
    assert torch.equal(p0, p0_ref[:, sigma(m[:, 0])]) and torch.equal(hh, hh_ref[:, sigma(m[:, 0])])
    c = page_codebook(128, 3, "v")[0]
    lat = emulate(2, c, p0, hh)
    acc = torch.stack([torch.einsum("imk,ikn->imn", lat[r].float(), p.float()) for r in range(4)], 1)
    out = torch.empty_like(acc)
    out[:, :, sigma(m[:, 0])] = acc  # row m stored as column sigma(m)
    assert torch.allclose(out.reshape(programs, n_tiles, 4, XV, N).sum(1), ref, rtol=1e-5, atol=1e-4)


def test_gluon_probe_compiles_without_shared_memory(tmp_path):
    """`benchmarks/gluon_probe.py`: in Gluon the 3-bit value tile decodes in the MMA operand layout (no layout move
    through shared memory, nothing spilled), with the venv's Triton and with the GPU's (3.6); the direct variant
    (NSTAGE 0) without shared memory or barrier, the pipelined ones (NSTAGE 2..4) with 16 B cp.async only (no
    global loads) and half as many shared reads as bytes read (the sigma row permutation; 64 would be byte reads)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET" and not k.startswith("TQ_VLLM_")}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton")
    paths = [None] + ([GPU_TRITON] if os.path.exists(os.path.join(GPU_TRITON, "triton", "__init__.py")) else [])
    for extra in paths:
        run_env = dict(env, PYTHONPATH=os.pathsep.join([extra, ROOT])) if extra else env
        p = subprocess.run([sys.executable, "benchmarks/gluon_probe.py", "--stages", "0,2,3,4"], cwd=ROOT,
                           env=run_env, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
        out = p.stdout.splitlines()
        heads = [x for x in out if x.startswith("gluon probe NSTAGE=")]
        lines = [x for x in out if x.startswith("    instr ")]
        assert len(heads) == len(lines) == 4, p.stdout
        for head, line in zip(heads, lines):
            f = line.split()
            mix = dict(zip(f[::2], (int(x) for x in f[1::2])))
            assert " 0 B spilled" in head, head
            assert mix["HMMA"] > 0 and mix["PRMT"] > 0, (head, mix)
            assert mix["STS"] == mix["STL"] == mix["cvt"] == 0, (head, mix)
            if head.startswith("gluon probe NSTAGE=0,"):
                assert mix["BAR"] == mix["LDS"] == mix["LDGSTS"] == 0 and " 0.0 KB shared" in head, mix
            else:  # (LDS counts a few never-executed `@!PT LDS RZ, [RZ]` of ptxas; 32 reads + 2 ldmatrix real)
                assert mix["LDG"] == 0 and mix["LDGSTS"] > 0 and mix["LDSM"] > 0 and 32 <= mix["LDS"] < 48, mix


@pytest.mark.gpu
def test_gpu_gluon_probe_runs():
    """On a GPU: the probe kernel against torch (`gluon_probe.py --run`)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    p = subprocess.run([sys.executable, "benchmarks/gluon_probe.py", "--run", "--stages", "0,2,3,4"], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, (p.stdout[-2000:], p.stderr[-3000:])
