"""A test kernel around hadamard._fwht (a module of its own so the tests can re-import it in the interpreter's mode,
as tq_vllm.kernels._kmod does for the package's kernels)."""
import triton
import triton.language as tl

from tq_vllm.kernels.hadamard import _fwht


@triton.jit
def fwht_kernel(X, Y, M: tl.constexpr, N: tl.constexpr, LOG: tl.constexpr):
    """y = x @ H_N for x [M, N] fp32."""
    r = tl.arange(0, M)[:, None] * N + tl.arange(0, N)[None, :]
    tl.store(Y + r, _fwht(tl.load(X + r), M, N, LOG))
