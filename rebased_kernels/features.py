"""The spec's pre-transform and explicit features in vectorised PyTorch, with their backwards.

Shared by the PyTorch-level backends and the default decode step. The float64 oracle in
``rebased_kernels.reference`` is written separately, on purpose, as plainly as possible.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .spec import LAYER_NORM_EPS, FeatureMap, PreTransform, feature_layout, feature_weights


def _layer_norm(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(LN(x), 1 / sqrt(var + eps))`` over the last dim (biased variance, no affine)."""
    centred = x - x.mean(-1, keepdim=True)
    rstd = torch.rsqrt(centred.square().mean(-1, keepdim=True) + LAYER_NORM_EPS)
    return centred * rstd, rstd


def pre_transform(
    x: torch.Tensor,
    pre: PreTransform,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """``x' = weight * LN(x) + bias`` over the last dim, as ``pre`` says.

    x: ``[..., H, D]``; weight, bias: ``[H, D]`` or ``[D]`` (None means 1 and 0).
    Computed in x's dtype; callers upcast first.
    """
    if pre.norm:
        x = _layer_norm(x)[0]
    if pre.uses_gamma and weight is not None:
        x = x * weight.to(x.dtype)
    if pre.uses_beta and bias is not None:
        x = x + bias.to(x.dtype)
    return x


def _reduce_to(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Sum ``t [..., H, D]`` over its leading dims down to ``like``'s shape, in like's dtype."""
    return t.reshape(-1, *like.shape).sum(0).to(like.dtype)


def pre_transform_backward(
    x: torch.Tensor,
    pre: PreTransform,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    dxp: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``(dx, dweight, dbias)`` of ``pre_transform`` given ``dxp = dL/dx'`` (x in compute dtype)."""
    n, rstd = _layer_norm(x) if pre.norm else (x, None)
    dweight = dbias = None
    if pre.uses_beta and bias is not None:
        dbias = _reduce_to(dxp, bias)
    if pre.uses_gamma and weight is not None:
        dweight = _reduce_to(dxp * n, weight)
        dxp = dxp * weight.to(x.dtype)
    if pre.norm:
        dxp = rstd * (dxp - dxp.mean(-1, keepdim=True) - n * (dxp * n).mean(-1, keepdim=True))
    return dxp, dweight, dbias


class Layout(NamedTuple):
    """The canonical feature layout as tensors (see ``spec``): per-feature weights
    ``[F]``, one index table ``[F_p, p]`` per power, the coefficients ``c_p`` and the
    coefficients of the derivative ``p * c_p``."""

    weights: torch.Tensor
    indices: tuple[torch.Tensor, ...]
    coeffs: tuple[float, ...]
    dcoeffs: tuple[float, ...]


_LAYOUT_CACHE: dict[tuple, Layout] = {}


def layout(
    fm: FeatureMap, D: int, scale: float, device: torch.device, dtype: torch.dtype
) -> Layout:
    """The layout tensors for ``fm`` at feature dim D (cached per device and dtype)."""
    key = (fm.powers, fm.coeffs, D, scale, str(device), dtype)
    if key not in _LAYOUT_CACHE:
        entries = feature_layout(D, fm.powers)
        weights = torch.tensor(feature_weights(fm, D, scale), dtype=dtype, device=device)
        indices = tuple(
            torch.tensor(
                [i for i, _ in entries if len(i) == p], dtype=torch.long, device=device
            ).reshape(math.comb(D + p - 1, p), p)
            for p in fm.powers
        )
        dcoeffs = tuple(p * c for p, c in enumerate(fm.coeffs))[1:] or (0.0,)
        _LAYOUT_CACHE[key] = Layout(weights, indices, fm.coeffs, dcoeffs)
    return _LAYOUT_CACHE[key]


def polynomial(s: torch.Tensor, coeffs: tuple[float, ...]) -> torch.Tensor:
    """``sum_p coeffs[p] * s^p`` elementwise (Horner's rule)."""
    out = torch.full_like(s, coeffs[-1])
    for c in reversed(coeffs[:-1]):
        out = out * s + c
    return out


def similarity(s: torch.Tensor, fm: FeatureMap) -> torch.Tensor:
    """``sim = sum_p c_p s^p`` elementwise."""
    return polynomial(s, fm.coeffs)


def _monomials(x: torch.Tensor, idx: torch.Tensor, skip: int | None = None) -> torch.Tensor:
    """``prod_r x[..., idx[:, r]]`` over r != skip: ``[..., D] -> [..., F_p]``."""
    out = None
    for r in range(idx.shape[1]):
        if r != skip:
            term = x[..., idx[:, r]]
            out = term if out is None else out * term
    return x.new_ones(*x.shape[:-1], idx.shape[0]) if out is None else out


def phi_with(x: torch.Tensor, lt: Layout) -> torch.Tensor:
    """Explicit features ``[..., D] -> [..., F]`` from precomputed layout tensors."""
    return torch.cat([_monomials(x, idx) for idx in lt.indices], dim=-1) * lt.weights


def phi(x: torch.Tensor, fm: FeatureMap, scale: float) -> torch.Tensor:
    """Explicit features in the canonical layout: ``[..., D] -> [..., F]``.

    ``phi(q) . phi(k) = sum_p c_p (scale * q . k)^p`` (see ``rebased_kernels.spec``).
    """
    return phi_with(x, layout(fm, x.shape[-1], scale, x.device, x.dtype))


def phi_backward(x: torch.Tensor, dphi: torch.Tensor, lt: Layout) -> torch.Tensor:
    """``dx = dphi . dphi/dx``: ``x [..., D]``, ``dphi [..., F]`` -> ``[..., D]``."""
    dx = torch.zeros_like(x)
    g = dphi * lt.weights
    start = 0
    for idx in lt.indices:  # idx: [F_p, p]
        g_p = g[..., start : start + idx.shape[0]]
        start += idx.shape[0]
        for r in range(idx.shape[1]):
            # scatter-add over the index column as a product with its one-hot [F_p, D]:
            # index_add here was miscompiled by inductor's vectorised CPU code (torch 2.13:
            # out-of-bounds writes, wrong dq/dk in torch_compile), and a matmul is faster
            one_hot = torch.nn.functional.one_hot(idx[:, r], x.shape[-1]).to(x.dtype)
            dx = dx + (g_p * _monomials(x, idx, skip=r)) @ one_hot
    return dx
