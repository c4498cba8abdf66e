"""``reference``: the float64 oracle (quadratic form) behind the backend protocol.

Computes in float64 whatever the input dtype and returns o in v's dtype and the state in
the state dtype, so the oracle itself can be called through ``rk.linear_attention``.
"""

from __future__ import annotations

from rebased_kernels import reference
from rebased_kernels.backend import Backend, Inputs, Outputs, compute_dtype, register
from rebased_kernels.spec import LinearAttention


class ReferenceBackend(Backend):
    name = "reference"

    def forward_dense(self, x: Inputs, attn: LinearAttention, config: dict) -> Outputs:
        state = None if x.S0 is None else (x.S0, x.z0)
        o, S, z = reference.quadratic(x.q, x.k, x.v, attn, x.params, state)
        dt = compute_dtype(x.v.dtype)
        return Outputs(o.to(x.v.dtype), S.to(dt), z.to(dt))


register(ReferenceBackend())
