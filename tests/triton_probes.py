"""Small Triton kernels that run one device function of the backend alone, for tests
(imported where triton is present: a jit function sees module globals, not a test's locals)."""

from __future__ import annotations

import triton
import triton.language as tl
from rebased_kernels.backends.triton.kernels import _dot_x3


@triton.jit
def product_b3(A, B, C, N: tl.constexpr):
    """``C = A @ B`` [N, N] through ``_dot_x3`` of a "b3" sweep (bf16x3)."""
    i = tl.arange(0, N)
    a = tl.load(A + i[:, None] * N + i[None, :])
    b = tl.load(B + i[:, None] * N + i[None, :])
    tl.store(C + i[:, None] * N + i[None, :], _dot_x3(a, b, "b3"))
