"""The compile-time options of the TileLang kernels (no TileLang import: the host and the
compile cache key on them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

KernelTarget = Literal["cuda", "c"]


@dataclass(frozen=True)
class KernelOptions:
    """What a kernel builder (``kernels.forward_kernel``, ``backward.dq_kernel``,
    ``backward.dkv_kernel``) compiles in besides H, D, Dv; hashable, the compile cache's key.

    ``sim = sum_p coeffs[p] (scale q' . k')^p`` (``scale`` None: ``D ** -0.5``) with the
    pre-transform's LayerNorm when ``norm``; ``normalize``, ``eps`` as in ``spec``;
    ``state``: the forward and the dq sweep read an initial state, the dk/dv sweep a
    final-state cotangent. Tunables: ``BC`` (chunk length, a multiple of 16),
    ``num_stages`` (``T.Pipelined`` stages: buffers of the chunk loads in flight),
    ``threads`` (compute threads per program; on Hopper TileLang adds a producer warpgroup
    that issues the loads by TMA). ``target``: ``"cuda"`` or TileLang's C backend (``"c"``,
    which runs the walk serially and ignores ``num_stages`` and ``threads``)."""

    norm: bool = True
    scale: float | None = None
    coeffs: tuple[float, ...] = (0.0, 0.0, 1.0)
    normalize: bool = True
    state: bool = False
    eps: float = 1e-5
    dtype: str = "bfloat16"
    BC: int = 64
    num_stages: int = 2
    threads: int = 256
    target: KernelTarget = "cuda"


DEFAULT_OPTIONS = KernelOptions()
"""``rebased``'s kernel (``c2 s^2``, LayerNorm), normalised, no state, bf16, CUDA."""
