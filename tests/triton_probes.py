"""Small Triton kernels that run one device function of the backend alone, for tests
(imported where triton is present: a jit function sees module globals, not a test's locals)."""

from __future__ import annotations

import triton
import triton.language as tl
from rebased_kernels.backends.triton.kernels import _dot_x2, _dot_x3


@triton.jit
def product_b3(A, B, C, N: tl.constexpr):
    """``C = A @ B`` [N, N] through ``_dot_x3`` of a "b3" sweep (bf16x3)."""
    i = tl.arange(0, N)
    a = tl.load(A + i[:, None] * N + i[None, :])
    b = tl.load(B + i[:, None] * N + i[None, :])
    tl.store(C + i[:, None] * N + i[None, :], _dot_x3(a, b, "b3"))


@triton.jit
def product_x2(A, B, C, N: tl.constexpr, EXACT: tl.constexpr):
    """``C = A @ B`` [N, N] through ``_dot_x2`` of an "x2" sweep, operand ``EXACT`` (1: A,
    2: B) declared exact in tf32."""
    i = tl.arange(0, N)
    a = tl.load(A + i[:, None] * N + i[None, :])
    b = tl.load(B + i[:, None] * N + i[None, :])
    tl.store(C + i[:, None] * N + i[None, :], _dot_x2(a, b, "x2", EXACT))
