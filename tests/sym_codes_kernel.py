"""A test kernel around store._sym_codes (a module of its own so the tests can re-import it in the interpreter's
mode, as tq_vllm.kernels._kmod does for the package's kernels)."""
import triton
import triton.language as tl

from tq_vllm.kernels.store import _sym_codes


@triton.jit
def sym_codes_kernel(U, BND, CEN, CODE, C, T: tl.constexpr, DP: tl.constexpr, BITS: tl.constexpr):
    """u [T, DP] fp32 -> code [T, DP] int32, c [T, DP] fp32."""
    r = tl.arange(0, T)[:, None] * DP + tl.arange(0, DP)[None, :]
    code, c = _sym_codes(tl.load(U + r), tl.arange(0, DP) < DP, BND, CEN, BITS)
    tl.store(CODE + r, code)
    tl.store(C + r, c)
