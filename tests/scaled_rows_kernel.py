"""A test kernel around store._scaled_rows (a module of its own so the tests can re-import it in the interpreter's
mode, as tq_vllm.kernels._kmod does for the package's kernels)."""
import triton
import triton.language as tl

from tq_vllm.kernels.store import _scaled_rows


@triton.jit
def scaled_rows_kernel(Y, YN, S, IP, ysc, T: tl.constexpr, DP: tl.constexpr):
    """y [T, DP] fp32 -> yn [T, DP], S [T], ip [T] of _scaled_rows(y, ysc)."""
    t = tl.arange(0, T)
    r = t[:, None] * DP + tl.arange(0, DP)[None, :]
    yn, s, ip = _scaled_rows(tl.load(Y + r), ysc)
    tl.store(YN + r, yn)
    tl.store(S + t, s)
    tl.store(IP + t, ip)
