"""The math, stated once: feature maps, causal linear attention and the state layout.

Every backend is a lowering of what this file says; none redefines it.

Legend (the paper's names)
--------------------------
``q, k``   queries and keys, ``[B, T, H, D]``; ``v`` values, ``[B, T, H, Dv]``.
``q', k'`` the pre-transformed queries and keys (``PreTransform``).
``s``      the scaled dot product ``s = scale * (q' . k')``, ``scale`` defaults to ``D ** -0.5``.
``sim``    the kernel, a polynomial ``sim(q, k) = sum_p c_p s^p`` with ``c_p >= 0``.
``phi``    its explicit features: ``phi(q) . phi(k) = sim(q, k)``.
``S, z``   the recurrent state ``S = sum_j phi(k_j) v_j^T`` (``[F, Dv]``) and
           normaliser ``z = sum_j phi(k_j)`` (``[F]``), ``F = num_features(D)``.

Causal linear attention (``LinearAttention``)::

    o_i = sum_{j<=i} sim(q_i, k_j) v_j / (sum_{j<=i} sim(q_i, k_j) + eps)   (normalize=True)
    o_i = sum_{j<=i} sim(q_i, k_j) v_j                                       (normalize=False)

With an initial state ``(S0, z0)`` the sums gain ``phi(q_i) S0`` and ``phi(q_i) . z0``.

Canonical state layout
----------------------
``phi(x)`` concatenates one block per power ``p`` with ``c_p != 0``, in increasing ``p``.
Block ``p`` holds one entry per multiset ``i_1 <= i_2 <= ... <= i_p`` of feature indices
(lexicographic order, as ``itertools.combinations_with_replacement(range(D), p)``)::

    phi_p(x)[i_1..i_p] = sqrt(c_p * scale^p * m(i_1..i_p)) * x_{i_1} * ... * x_{i_p}

where ``m`` is the multinomial coefficient ``p! / prod(count_i!)`` (2 for an off-diagonal
pair, 1 on the diagonal). So ``rebased`` at D=16 has 136 features and ``based`` 153
(1 + 16 + 136). ``S`` and ``z`` are float32 (float64 for float64 inputs) in this layout, so
a state written by one backend continues on any other.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from functools import cache
from typing import Literal

Affine = Literal["none", "gamma", "gamma_beta"]

LAYER_NORM_EPS = 1e-5
"""The LayerNorm epsilon of every pre-transform (the paper's released code uses 1e-5)."""


@dataclass(frozen=True)
class PreTransform:
    """What is applied to q and k (with separate parameters) before the kernel.

    ``x' = gamma * LN(x) + beta`` where ``LN(x) = (x - mean(x)) / sqrt(var(x) + 1e-5)`` over
    the last dimension D (per head, no affine of its own) when ``norm``; ``gamma`` and
    ``beta`` ([H, D] or [D]) are used as ``affine`` says: ``"none"`` neither, ``"gamma"``
    only gamma, ``"gamma_beta"`` both.
    """

    norm: bool = True
    affine: Affine = "gamma_beta"

    def __post_init__(self) -> None:
        if self.affine not in ("none", "gamma", "gamma_beta"):
            raise ValueError(f"affine={self.affine!r} is not one of 'none', 'gamma', 'gamma_beta'")

    @property
    def uses_gamma(self) -> bool:
        return self.affine in ("gamma", "gamma_beta")

    @property
    def uses_beta(self) -> bool:
        return self.affine == "gamma_beta"


@dataclass(frozen=True)
class FeatureMap:
    """A kernel as data: a pre-transform and polynomial coefficients ``c_0 .. c_P``.

    ``sim(q, k) = sum_p coeffs[p] * s^p`` with ``s = scale * (q' . k')``. Coefficients
    must be finite and non-negative (so the explicit features are real); note that an odd
    power can still make ``sim`` negative for negative ``s``.
    """

    name: str
    pre: PreTransform
    coeffs: tuple[float, ...]

    def __post_init__(self) -> None:
        coeffs = tuple(float(c) for c in self.coeffs)
        object.__setattr__(self, "coeffs", coeffs)
        if not coeffs or all(c == 0.0 for c in coeffs):
            raise ValueError(f"feature map {self.name!r}: coeffs must have a non-zero entry")
        if any(not math.isfinite(c) or c < 0.0 for c in coeffs):
            raise ValueError(f"feature map {self.name!r}: coeffs {coeffs} must be finite and >= 0")
        # hashed once: a feature map keys the per-token caches of the decode path
        object.__setattr__(self, "_hash", hash((self.name, self.pre, coeffs)))

    def __hash__(self) -> int:
        return self._hash  # type: ignore[attr-defined]

    @property
    def degree(self) -> int:
        """The highest power P with ``c_P != 0``."""
        return max(p for p, c in enumerate(self.coeffs) if c != 0.0)

    @property
    def powers(self) -> tuple[int, ...]:
        """The powers p with ``c_p != 0``: the blocks of the feature layout, in order."""
        return tuple(p for p, c in enumerate(self.coeffs) if c != 0.0)

    @property
    def quadratic_coeffs(self) -> tuple[float, float, float]:
        """``(c_0, c_1, c_2)``, zeros for absent powers: the polynomial of a degree <= 2 kernel
        as the fused kernels take it; ValueError above degree 2."""
        if self.degree > 2:
            raise ValueError(f"feature map {self.name!r} has degree {self.degree} > 2")
        return (*self.coeffs, 0.0, 0.0, 0.0)[:3]

    def num_features(self, D: int) -> int:
        """F, the length of ``phi(x)`` for feature dim D: ``sum_p C(D + p - 1, p)``."""
        return sum(math.comb(D + p - 1, p) for p in self.powers)

    def similarity(self, s: float) -> float:
        """``sum_p c_p s^p`` for a scalar s (documentation and tests)."""
        return sum(c * s**p for p, c in enumerate(self.coeffs))


PRESETS: dict[str, FeatureMap] = {
    fm.name: fm
    for fm in (
        FeatureMap("rebased", PreTransform(True, "gamma_beta"), (0.0, 0.0, 1.0)),
        FeatureMap("x2", PreTransform(False, "none"), (0.0, 0.0, 1.0)),
        FeatureMap("norm_x2", PreTransform(True, "none"), (0.0, 0.0, 1.0)),
        FeatureMap("gamma_x2", PreTransform(False, "gamma"), (0.0, 0.0, 1.0)),
        FeatureMap("gamma_x_beta_x2", PreTransform(False, "gamma_beta"), (0.0, 0.0, 1.0)),
        FeatureMap("based", PreTransform(False, "none"), (1.0, 1.0, 0.5)),
    )
}
"""The paper's kernels: ReBased, its ablations (Table 1) and the Based Taylor kernel."""


def get_feature_map(feature_map: str | FeatureMap) -> FeatureMap:
    """Return a preset by name, or the given ``FeatureMap`` unchanged."""
    if isinstance(feature_map, FeatureMap):
        return feature_map
    try:
        return PRESETS[feature_map]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown feature map {feature_map!r}: use one of {sorted(PRESETS)} "
            "or pass a rebased_kernels.FeatureMap"
        ) from None


@dataclass(frozen=True)
class LinearAttention:
    """Causal linear attention with a feature map (see the module docstring)."""

    feature_map: FeatureMap
    scale: float
    normalize: bool = True
    eps: float = 1e-5


@cache
def feature_layout(D: int, powers: tuple[int, ...]) -> tuple[tuple[tuple[int, ...], int], ...]:
    """The canonical layout: ``(index multiset, multinomial)`` per feature, in order."""
    layout = []
    for p in powers:
        for idx in itertools.combinations_with_replacement(range(D), p):
            counts = [idx.count(i) for i in set(idx)]
            multinomial = math.factorial(p) // math.prod(math.factorial(n) for n in counts)
            layout.append((idx, multinomial))
    return tuple(layout)


def feature_weights(fm: FeatureMap, D: int, scale: float) -> list[float]:
    """``sqrt(c_p * scale^p * multinomial)`` per feature of the canonical layout."""
    return [
        math.sqrt(fm.coeffs[len(idx)] * scale ** len(idx) * m)
        for idx, m in feature_layout(D, fm.powers)
    ]
