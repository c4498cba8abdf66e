"""The float64 oracle: the spec computed as plainly as possible, in two independent forms.

* ``quadratic``: the masked ``T x T`` matrix ``A_ij = sim(q_i, k_j)`` from the polynomial of
  ``s = scale * q'_i . k'_j``; never forms features (except for an initial state).
* ``recurrent``: a loop over tokens that carries ``S = sum phi(k_j) v_j^T`` and
  ``z = sum phi(k_j)`` in the canonical feature layout.

Both take ``q, k [B, T, H, D]``, ``v [B, T, H, Dv]`` and return float64
``(o [B, T, H, Dv], S [B, H, F, Dv], z [B, H, F])``. They are differentiable (autograd).
"""

from __future__ import annotations

import math

import torch

from rebased_kernels.spec import (
    LAYER_NORM_EPS,
    FeatureMap,
    LinearAttention,
    PreTransform,
    feature_layout,
)

__all__ = ["features", "pre_transform", "quadratic", "recurrent", "similarity_matrix"]

f64 = torch.float64


def pre_transform(
    x: torch.Tensor, pre: PreTransform, weight: torch.Tensor | None, bias: torch.Tensor | None
) -> torch.Tensor:
    """``x' = weight * LN(x) + bias`` in float64 (LN over D with the biased variance)."""
    x = x.to(f64)
    if pre.norm:
        centred = x - x.mean(dim=-1, keepdim=True)
        x = centred / torch.sqrt((centred**2).mean(dim=-1, keepdim=True) + LAYER_NORM_EPS)
    if pre.uses_gamma and weight is not None:
        x = x * weight.to(f64)
    if pre.uses_beta and bias is not None:
        x = x + bias.to(f64)
    return x


def features(x: torch.Tensor, fm: FeatureMap, scale: float) -> torch.Tensor:
    """``phi(x)``, ``[..., D] -> [..., F]``, one feature at a time from the layout."""
    columns = []
    for idx, multinomial in feature_layout(x.shape[-1], fm.powers):
        p = len(idx)
        value = torch.full_like(x[..., 0], math.sqrt(fm.coeffs[p] * scale**p * multinomial))
        for i in idx:
            value = value * x[..., i]
        columns.append(value)
    return torch.stack(columns, dim=-1)


def _transformed(q, k, attn, params):
    q_weight, q_bias, k_weight, k_bias = params
    pre = attn.feature_map.pre
    return pre_transform(q, pre, q_weight, q_bias), pre_transform(k, pre, k_weight, k_bias)


def _initial(B, H, F, Dv, initial_state, device):
    if initial_state is None:
        return torch.zeros(B, H, F, Dv, dtype=f64, device=device), torch.zeros(
            B, H, F, dtype=f64, device=device
        )
    S0, z0 = initial_state
    return S0.to(f64), z0.to(f64)


def _masked_similarity(qp: torch.Tensor, kp: torch.Tensor, attn: LinearAttention) -> torch.Tensor:
    T = qp.shape[1]
    s = attn.scale * torch.einsum("bihd,bjhd->bhij", qp, kp)
    A = sum(c * s**p for p, c in enumerate(attn.feature_map.coeffs))
    return A * torch.ones(T, T, dtype=torch.bool, device=qp.device).tril()


def similarity_matrix(
    q: torch.Tensor, k: torch.Tensor, attn: LinearAttention, params: tuple = (None,) * 4
) -> torch.Tensor:
    """``A [B, H, T, T]``: ``sim(q_i, k_j)`` for ``j <= i``, 0 above the diagonal (float64)."""
    return _masked_similarity(*_transformed(q, k, attn, params), attn)


def _operands(q, k, v, attn: LinearAttention, params, initial_state):
    """``(q', k', v, phi(q'), phi(k'), S0, z0)`` in float64."""
    qp, kp = _transformed(q, k, attn, params)
    fm = attn.feature_map
    phi_q, phi_k = features(qp, fm, attn.scale), features(kp, fm, attn.scale)
    B, _, H, F = phi_q.shape
    S0, z0 = _initial(B, H, F, v.shape[-1], initial_state, q.device)
    return qp, kp, v.to(f64), phi_q, phi_k, S0, z0


def _sums(A, v, phi_q, S0, z0) -> tuple[torch.Tensor, torch.Tensor]:
    """``num = A v + phi(q) S0`` ``[B, T, H, Dv]`` and ``den = A 1 + phi(q) . z0`` ``[B, T, H]``
    for a masked ``A [B, H, T, T]``."""
    num = torch.einsum("bhij,bjhe->bihe", A, v) + torch.einsum("bthf,bhfe->bthe", phi_q, S0)
    den = A.sum(-1).transpose(1, 2) + torch.einsum("bthf,bhf->bth", phi_q, z0)
    return num, den


def quadratic(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn: LinearAttention,
    params: tuple = (None, None, None, None),
    initial_state: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The masked-matrix form. ``params = (q_weight, q_bias, k_weight, k_bias)``."""
    qp, kp, v, phi_q, phi_k, S0, z0 = _operands(q, k, v, attn, params, initial_state)
    num, den = _sums(_masked_similarity(qp, kp, attn), v, phi_q, S0, z0)
    o = num / (den + attn.eps)[..., None] if attn.normalize else num
    S = S0 + torch.einsum("bthf,bthe->bhfe", phi_k, v)
    z = z0 + phi_k.sum(1).to(f64)
    return o, S, z


def recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn: LinearAttention,
    params: tuple = (None, None, None, None),
    initial_state: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The token-by-token form through explicit features and the state."""
    _, _, v, phi_q, phi_k, S, z = _operands(q, k, v, attn, params, initial_state)
    B, T, H, _ = phi_q.shape
    outputs = []
    for t in range(T):
        S = S + phi_k[:, t, :, :, None] * v[:, t, :, None, :]
        z = z + phi_k[:, t]
        num = torch.einsum("bhf,bhfe->bhe", phi_q[:, t], S)
        den = torch.einsum("bhf,bhf->bh", phi_q[:, t], z)
        outputs.append(num / (den + attn.eps)[..., None] if attn.normalize else num)
    o = torch.stack(outputs, dim=1) if outputs else v.new_zeros(B, 0, H, v.shape[-1])
    return o, S, z


def condition(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn: LinearAttention,
    params: tuple = (None, None, None, None),
    initial_state: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> float:
    """``kappa``: how much the feature (state) form of ``o`` amplifies rounding.

    Computing ``o`` through features sums ``phi(q_i)_f phi(k_j)_f v_j`` term by term, so its
    first-order error is ``u`` (the arithmetic's unit roundoff) times the same sums over
    absolute values. ``kappa = ||err_bound|| / (u ||o||)``: about 1 for well-spread inputs,
    large when q is nearly orthogonal to every k (sim ~ 0 while the features do not vanish)
    or, normalised, when the denominator is small. Tests scale their tolerance with it when
    they compare the feature form with the score form or with itself split differently.
    """
    qp, kp, v, phi_q, phi_k, S0, z0 = _operands(q, k, v, attn, params, initial_state)
    num, den = _sums(_masked_similarity(qp, kp, attn), v, phi_q, S0, z0)
    T = qp.shape[1]
    mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    M = torch.einsum("bihf,bjhf->bhij", phi_q.abs(), phi_k.abs()) * mask  # [B, H, T, T]
    num_abs, den_abs = _sums(M, v.abs(), phi_q.abs(), S0.abs(), z0.abs())
    if attn.normalize:
        den = (den + attn.eps).abs()[..., None]
        o = num / den
        bound = num_abs / den + o.abs() * den_abs[..., None] / den
    else:
        o, bound = num, num_abs
    return float(bound.norm() / o.norm().clamp_min(1e-300))
