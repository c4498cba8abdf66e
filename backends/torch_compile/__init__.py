"""``torch_compile``: the ``torch`` backend's chunked algorithm through ``torch.compile``.

Compiled once per (kernel, chunk size, direction) with dynamic shapes, so a new sequence
length or batch size does not recompile. The backward is the ``torch`` backend's
hand-written chunked backward, compiled the same way.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, ClassVar

import torch

from rebased_kernels.backend import Backend, Inputs, Outputs, register
from rebased_kernels.spec import LinearAttention

from ..torch.chunked import chunked_backward, chunked_forward


class TorchCompileBackend(Backend):
    name = "torch_compile"
    tuning_space: ClassVar[dict[str, tuple]] = {"chunk_size": (16, 32, 64, 128)}
    default_config: ClassVar[dict[str, Any]] = {"chunk_size": 64}

    def __init__(self) -> None:
        self._compiled: dict[tuple, Callable] = {}

    def unavailable_reason(self) -> str | None:
        if not hasattr(torch, "compile"):
            return "this torch has no torch.compile"
        return None

    def _compiled_fn(self, key: tuple, make: Callable[[], Callable]) -> Callable:
        if key not in self._compiled:
            self._compiled[key] = torch.compile(make(), dynamic=True, fullgraph=True)
        return self._compiled[key]

    def forward_dense(self, x: Inputs, attn: LinearAttention, config: dict) -> Outputs:
        C = config["chunk_size"]
        fn = self._compiled_fn(
            ("fwd", attn, C), lambda: partial(chunked_forward, attn=attn, chunk_size=C)
        )
        return Outputs(*fn(x))

    def backward_dense(
        self, x: Inputs, attn: LinearAttention, config: dict, grads: Outputs
    ) -> Inputs:
        C = config["chunk_size"]
        fn = self._compiled_fn(
            ("bwd", attn, C), lambda: partial(chunked_backward, attn=attn, chunk_size=C)
        )
        return Inputs(*fn(x, grads=grads))


register(TorchCompileBackend())
