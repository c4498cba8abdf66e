"""``torch_compile``: the ``torch`` backend's chunked algorithm through ``torch.compile``.

Shapes are static for the compiler, and T is padded up to a bucket (the next power of two,
at least one chunk) with the padding masked out of the state, so a new sequence length
recompiles only when it enters a new bucket: log2(T) graphs, not one per length. The
backward is the ``torch`` backend's hand-written chunked backward, compiled the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, ClassVar

import torch
import torch.nn.functional as F_

from rebased_kernels.backend import Backend, Inputs, Outputs, register
from rebased_kernels.spec import LinearAttention

from ..torch.chunked import chunk_layout, chunked_backward, chunked_forward


def bucket(T: int, C: int) -> int:
    """The padded length: the next power of two >= T, and at least C."""
    return max(C, 1 << (T - 1).bit_length())


def _pad_T(t: torch.Tensor, T_pad: int) -> torch.Tensor:
    """Zero-pad dim 1 up to ``T_pad`` (no copy when T already fills the bucket)."""
    return t if t.shape[1] == T_pad else F_.pad(t, (0, 0, 0, 0, 0, T_pad - t.shape[1]))


class TorchCompileBackend(Backend):
    name = "torch_compile"
    tuning_space: ClassVar[dict[str, tuple]] = {"chunk_size": (16, 32, 64, 128)}
    default_config: ClassVar[dict[str, Any]] = {"chunk_size": 64}
    compiles: ClassVar[bool] = True
    compiles_per_shape: ClassVar[bool] = True

    def __init__(self) -> None:
        self._compiled: dict[tuple, Callable] = {}

    def _fn(self, direction: str, attn: LinearAttention, C: int) -> Callable:
        key = (direction, attn, C)
        if key not in self._compiled:
            # each (shape bucket, dtype) is its own static graph of one code object
            limit = torch._dynamo.config.recompile_limit
            torch._dynamo.config.recompile_limit = max(limit, 256)
            impl = chunked_forward if direction == "fwd" else chunked_backward
            self._compiled[key] = torch.compile(
                partial(impl, attn=attn, chunk_size=C), dynamic=False, fullgraph=True
            )
        return self._compiled[key]

    def _padded(self, x: Inputs, C: int) -> tuple[Inputs, torch.Tensor]:
        T = x.q.shape[1]
        T_pad = bucket(T, C)
        valid = (torch.arange(T_pad, device=x.q.device) < T).to(x.v.dtype)  # [T_pad]
        return x._replace(q=_pad_T(x.q, T_pad), k=_pad_T(x.k, T_pad), v=_pad_T(x.v, T_pad)), valid

    def forward_dense(self, x: Inputs, attn: LinearAttention, config: dict) -> Outputs:
        C, T = config["chunk_size"], x.q.shape[1]
        xp, valid = self._padded(x, C)
        o, S, z = self._fn("fwd", attn, C)(xp, chunk_layout(x, attn), valid)
        return Outputs(o[:, :T], S, z)

    def backward_dense(
        self, x: Inputs, attn: LinearAttention, config: dict, grads: Outputs
    ) -> Inputs:
        C, T = config["chunk_size"], x.q.shape[1]
        xp, valid = self._padded(x, C)
        gp = grads._replace(o=_pad_T(grads.o, xp.q.shape[1]))
        g = self._fn("bwd", attn, C)(xp, chunk_layout(x, attn), valid, gp)
        return g._replace(q=g.q[:, :T], k=g.k[:, :T], v=g.v[:, :T])


register(TorchCompileBackend())
