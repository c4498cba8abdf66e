"""``torch``: the chunked algorithm in eager PyTorch, any device, any kernel degree."""

from __future__ import annotations

from typing import Any, ClassVar

from rebased_kernels.backend import Backend, Inputs, Outputs, register
from rebased_kernels.spec import LinearAttention

from .chunked import chunk_layout, chunked_backward, chunked_forward


class TorchBackend(Backend):
    name = "torch"
    tuning_space: ClassVar[dict[str, tuple]] = {"chunk_size": (16, 32, 64, 128)}
    default_config: ClassVar[dict[str, Any]] = {"chunk_size": 64}

    def forward_dense(self, x: Inputs, attn: LinearAttention, config: dict) -> Outputs:
        return chunked_forward(x, chunk_layout(x, attn), None, attn, config["chunk_size"])

    def backward_dense(
        self, x: Inputs, attn: LinearAttention, config: dict, grads: Outputs
    ) -> Inputs:
        return chunked_backward(x, chunk_layout(x, attn), None, grads, attn, config["chunk_size"])


register(TorchBackend())
