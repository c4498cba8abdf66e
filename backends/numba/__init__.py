"""``numba``: the chunked algorithm as numba CPU kernels, parallel over (batch, head).

The pre-transform (LayerNorm + affine) and its backward run in torch on the host
(``rebased_kernels.features``); the kernels in ``kernels.py`` take q', k' and compute the
same function and gradients as ``backends/torch/chunked.py`` for kernels of degree <= 2.
numba is imported lazily, so this package imports (and reports itself unavailable)
without it.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, ClassVar

import numpy as np
import torch

from rebased_kernels.backend import Backend, Inputs, Outputs, compute_dtype, register
from rebased_kernels.features import pre_transform, pre_transform_backward
from rebased_kernels.spec import (
    LAYER_NORM_EPS,
    FeatureMap,
    LinearAttention,
    feature_layout,
    feature_weights,
)


@lru_cache(maxsize=64)
def _layout(fm: FeatureMap, D: int, scale: float, eps: float, dtype: torch.dtype) -> tuple:
    """``(i0 [F], i1 [F], w [F], P [7])`` for the kernels (see the legend of ``kernels.py``)."""
    np_dt = np.float64 if dtype == torch.float64 else np.float32
    pairs = [tuple(idx) + (D,) * (2 - len(idx)) for idx, _ in feature_layout(D, fm.powers)]
    i0 = np.array([p[0] for p in pairs], dtype=np.int64)
    i1 = np.array([p[1] for p in pairs], dtype=np.int64)
    w = np.array(feature_weights(fm, D, scale), dtype=np_dt)
    c0, c1, c2 = fm.quadratic_coeffs
    P = np.array([scale, eps, c0, c1, c2, 0.0, 2 * c2], dtype=np_dt)
    for a in (i0, i1, w, P):
        a.setflags(write=False)
    return i0, i1, w, P


@lru_cache(maxsize=1)
def _decode_kernel():
    from .decode import decode_kernel  # imports numba

    return decode_kernel


@lru_cache(maxsize=16)
def _identity_affine(H: int, D: int, dtype: torch.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Read-only ``(ones [H, D], zeros [H, D])`` standing in for absent gamma and beta."""
    np_dt = np.float64 if dtype == torch.float64 else np.float32
    ones, zeros = np.ones((H, D), dtype=np_dt), np.zeros((H, D), dtype=np_dt)
    ones.setflags(write=False)
    zeros.setflags(write=False)
    return ones, zeros


def _np(t: torch.Tensor, dt: torch.dtype) -> np.ndarray:
    """A C-contiguous numpy view of ``t`` in dtype ``dt`` (copies only when needed)."""
    if t.dtype == dt and t.is_contiguous():
        return (t.detach() if t.requires_grad else t).numpy()
    return t.detach().to(dt).contiguous().numpy()


def _prepare(x: Inputs, attn: LinearAttention) -> tuple:
    """The kernel arguments shared by forward and backward, in the compute dtype."""
    dt = compute_dtype(x.v.dtype)
    fm = attn.feature_map
    H, D = x.q.shape[2], x.q.shape[3]
    F, Dv = fm.num_features(D), x.v.shape[3]
    qp = pre_transform(x.q.detach().to(dt), fm.pre, x.q_weight, x.q_bias)  # [B, T, H, D]
    kp = pre_transform(x.k.detach().to(dt), fm.pre, x.k_weight, x.k_bias)  # [B, T, H, D]
    if x.S0 is None:
        S0 = torch.empty(0, H, F, Dv, dtype=dt)
        z0 = torch.empty(0, H, F, dtype=dt)
    else:
        S0, z0 = x.S0, x.z0
    return (
        _np(qp, dt),
        _np(kp, dt),
        _np(x.v, dt),
        _np(S0, dt),
        _np(z0, dt),
        *_layout(fm, D, float(attn.scale), float(attn.eps), dt),
    )


class NumbaBackend(Backend):
    name = "numba"
    dtypes: ClassVar[frozenset[torch.dtype]] = frozenset({torch.float32, torch.float64})
    device_types: ClassVar[frozenset[str]] = frozenset({"cpu"})
    max_degree: ClassVar[int | None] = 2
    tuning_space: ClassVar[dict[str, tuple]] = {"chunk_size": (16, 32, 64, 128)}
    default_config: ClassVar[dict[str, Any]] = {"chunk_size": 64}
    compiles: ClassVar[bool] = True

    def unavailable_reason(self) -> str | None:
        try:
            from . import kernels  # noqa: F401  (imports numba)
        except ImportError as exc:
            return f"numba cannot be imported ({exc}); pip install 'rebased-kernels[numba]'"
        return None

    def forward_dense(self, x: Inputs, attn: LinearAttention, config: dict) -> Outputs:
        from .kernels import forward_kernel

        B, T, H, _ = x.q.shape
        Dv = x.v.shape[3]
        dt = compute_dtype(x.v.dtype)
        F = attn.feature_map.num_features(x.q.shape[3])
        o = torch.empty(B, T, H, Dv, dtype=dt)
        S = torch.empty(B, H, F, Dv, dtype=dt)
        z = torch.empty(B, H, F, dtype=dt)
        forward_kernel(
            *_prepare(x, attn), int(config["chunk_size"]), bool(attn.normalize),
            o.numpy(), S.numpy(), z.numpy(),
        )  # fmt: skip
        return Outputs(o.to(x.v.dtype), S, z)

    def backward_dense(
        self, x: Inputs, attn: LinearAttention, config: dict, grads: Outputs
    ) -> Inputs:
        from .kernels import backward_kernel

        B, T, H, D = x.q.shape
        Dv = x.v.shape[3]
        dt = compute_dtype(x.v.dtype)
        fm = attn.feature_map
        F = fm.num_features(D)
        q, k, v, S0, z0, i0, i1, w, P = _prepare(x, attn)
        dqp = torch.empty(B, T, H, D, dtype=dt)
        dkp = torch.empty(B, T, H, D, dtype=dt)
        dv = torch.empty(B, T, H, Dv, dtype=dt)
        dS0 = torch.empty(B, H, F, Dv, dtype=dt)
        dz0 = torch.empty(B, H, F, dtype=dt)
        backward_kernel(
            q, k, v, S0, z0, _np(grads.o, dt), _np(grads.S, dt), _np(grads.z, dt),
            i0, i1, w, P, int(config["chunk_size"]), bool(attn.normalize),
            dqp.numpy(), dkp.numpy(), dv.numpy(), dS0.numpy(), dz0.numpy(),
        )  # fmt: skip
        dq, dqw, dqb = pre_transform_backward(
            x.q.detach().to(dt), fm.pre, x.q_weight, x.q_bias, dqp
        )
        dk, dkw, dkb = pre_transform_backward(
            x.k.detach().to(dt), fm.pre, x.k_weight, x.k_bias, dkp
        )
        has_state = x.S0 is not None
        return Inputs(
            dq.to(x.q.dtype),
            dk.to(x.k.dtype),
            dv.to(x.v.dtype),
            dqw,
            dqb,
            dkw,
            dkb,
            dS0.to(x.S0.dtype) if has_state else None,
            dz0.to(x.z0.dtype) if has_state else None,
        )

    def decode_step(
        self, x: Inputs, attn: LinearAttention, out: tuple[torch.Tensor, torch.Tensor] | None
    ) -> Outputs:
        # per-token path: host overhead matters as much as the kernel (~12 us at B=1, H=8)
        dt = x.S0.dtype
        fm = attn.feature_map
        B, H, D = x.q.shape
        Dv = x.v.shape[-1]
        ones, zeros = _identity_affine(H, D, dt)

        def param(p: torch.Tensor | None, used: bool, default: np.ndarray) -> np.ndarray:
            if not used or p is None:
                return default
            return _np(p if p.dim() == 2 else p.expand(H, D), dt)

        S0, z0 = _np(x.S0, dt), _np(x.z0, dt)
        inplace = out is not None and out[0].data_ptr() == x.S0.data_ptr()
        if inplace:  # the kernel reads S[b, h, f, e] just before writing it
            S_out, z_out = S0, z0
        elif out is not None:
            S_out, z_out = _np(out[0], dt), _np(out[1], dt)
        else:
            S_out, z_out = np.empty_like(S0), np.empty_like(z0)
        o = np.empty((B, H, Dv), dtype=S0.dtype)
        i0, i1, w, P = _layout(fm, D, float(attn.scale), float(attn.eps), dt)
        _decode_kernel()(
            _np(x.q, dt), _np(x.k, dt), _np(x.v, dt), S0, z0,
            param(x.q_weight, fm.pre.uses_gamma, ones), param(x.q_bias, fm.pre.uses_beta, zeros),
            param(x.k_weight, fm.pre.uses_gamma, ones), param(x.k_bias, fm.pre.uses_beta, zeros),
            fm.pre.norm, LAYER_NORM_EPS, i0, i1, w, P, bool(attn.normalize), inplace,
            o, S_out, z_out,
        )  # fmt: skip
        if out is not None:
            S, z = out
        else:
            S, z = torch.from_numpy(S_out), torch.from_numpy(z_out)
        o_t = torch.from_numpy(o)
        return Outputs(o_t if o_t.dtype == x.v.dtype else o_t.to(x.v.dtype), S, z)


register(NumbaBackend())
