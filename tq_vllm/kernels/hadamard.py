"""The Walsh-Hadamard transform in registers: the rotation by a randomized-Hadamard Π = H·diag(s)/√D (every preset's
at head_dim 64/128/256, `params.DeviceTables.had`) without reading the D × D matrix."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _fwht(x, M: tl.constexpr, N: tl.constexpr, LOG: tl.constexpr):
    """x @ H_N for x [M, N] fp32 (H_N the unnormalised Sylvester Walsh-Hadamard matrix, N = 2^LOG): LOG butterfly
    stages over pairs (j, j + 2^i), no matrix read (a randomized-Hadamard Π = H·diag(s)/√N needs only its signs)."""
    for i in tl.static_range(LOG):
        x4 = tl.permute(tl.reshape(x, [M, N // (2 << i), 2, 1 << i]), [0, 1, 3, 2])
        a, b = tl.split(x4)
        x = tl.reshape(tl.permute(tl.join(a + b, a - b), [0, 1, 3, 2]), [M, N])
    return x
