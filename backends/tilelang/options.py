"""The compile-time options of the TileLang kernels and the runtime scalars beside them (no
TileLang import: the host and the compile cache key on them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

KernelTarget = Literal["cuda", "c"]


class Scalars(NamedTuple):
    """The runtime scalars of every kernel: its arguments ``w_0, w_1, w_2, eps`` (float32) and
    ``D`` (int32), in this order, after the tensors it reads. ``w_p = c_p scale^p``
    (``sc[p]``; 0 for an absent power), the normaliser's ``eps`` and the feature dim
    ``D <= 16``: q and k come padded to 16 columns, of which the pre-transform reads the
    first D. Python numbers on the host (``call.scalars``), the kernel's scalar arguments
    inside it."""

    w_0: Any
    w_1: Any
    w_2: Any
    eps: Any
    D: Any


@dataclass(frozen=True)
class KernelOptions:
    """What a kernel builder (``kernels.forward_kernel``, ``backward.dq_kernel``,
    ``backward.dkv_kernel``) compiles in besides BV (the value columns); hashable, the
    compile cache's key with it.

    ``sim = sum_p w_p (q' . k')^p`` over ``powers``, the p with ``c_p != 0`` (a sorted,
    non-empty subset of (0, 1, 2): which state blocks exist); the values ``w_p``, ``eps``
    and D are runtime scalars (``Scalars``), so every D <= 16, every scale and every
    polynomial with the same powers share a compile. ``norm``: the pre-transform's
    LayerNorm; ``normalize`` as in ``spec``; ``state``: the forward and the dq sweep read an
    initial state, the dk/dv sweep a final-state cotangent. Tunables: ``BC`` (chunk length,
    a multiple of 16), ``num_stages`` (``T.Pipelined`` stages: buffers of the chunk loads in
    flight), ``threads`` (compute threads per program; on Hopper TileLang adds a producer
    warpgroup that issues the loads by TMA). ``target``: ``"cuda"`` or TileLang's C backend
    (``"c"``, which runs the walk serially and ignores ``num_stages`` and ``threads``).
    ``tf32``: on the C target, every fp32 ``T.gemm`` reads its operands rounded to tf32
    (truncated, as Hopper's tensor cores read fp32 tiles; ``tiles.walk``'s ``mma``), so the
    CPU computes what a GPU does; off, the C target multiplies fp32 exactly (tests set it
    through ``build.TF32_ON_C``)."""

    norm: bool = True
    powers: tuple[int, ...] = (2,)
    normalize: bool = True
    state: bool = False
    dtype: str = "bfloat16"
    BC: int = 64
    num_stages: int = 2
    threads: int = 256
    target: KernelTarget = "cuda"
    tf32: bool = False


DEFAULT_OPTIONS = KernelOptions()
"""``rebased``'s kernel (``c2 s^2``, LayerNorm), normalised, no state, bf16, CUDA."""
