"""The spec and the oracle: layout, presets, two independent forms, a user-defined kernel."""

from __future__ import annotations

import math

import pytest
import torch
from strategies import CUBIC

import rebased_kernels as rk
from rebased_kernels import reference
from rebased_kernels.features import phi
from rebased_kernels.spec import PRESETS, FeatureMap, LinearAttention, PreTransform
from rebased_kernels.testing import assert_close, rel_err

f64 = torch.float64


def test_feature_counts_match_the_documented_layout() -> None:
    assert PRESETS["rebased"].num_features(16) == 136
    assert PRESETS["based"].num_features(16) == 153
    assert CUBIC.num_features(16) == 136 + 816


@pytest.mark.parametrize("fm", [*PRESETS.values(), CUBIC], ids=lambda f: f.name)
def test_features_reproduce_the_polynomial(fm: FeatureMap) -> None:
    """phi(q) . phi(k) = sum_p c_p (scale q.k)^p, for the oracle's and the torch features."""
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(50, 8, generator=g, dtype=f64), torch.randn(50, 8, generator=g, dtype=f64)
    scale = 0.3
    s = scale * (q * k).sum(-1)
    want = sum(c * s**p for p, c in enumerate(fm.coeffs))
    for features in (reference.features, phi):
        got = (features(q, fm, scale) * features(k, fm, scale)).sum(-1)
        assert rel_err(got, want) < 1e-13


@pytest.mark.parametrize("fm", [*PRESETS.values(), CUBIC], ids=lambda f: f.name)
@pytest.mark.parametrize("normalize", [True, False])
def test_quadratic_and_recurrent_forms_agree(fm: FeatureMap, normalize: bool) -> None:
    g = torch.Generator().manual_seed(2)
    B, T, H, D, Dv = 2, 33, 3, 6, 5
    q, k = (torch.randn(B, T, H, D, generator=g, dtype=f64) for _ in range(2))
    v = torch.randn(B, T, H, Dv, generator=g, dtype=f64)
    params = (
        1 + 0.2 * torch.randn(H, D, generator=g, dtype=f64),
        0.2 * torch.randn(H, D, generator=g, dtype=f64),
    ) * 2
    F = fm.num_features(D)
    state = (
        torch.randn(B, H, F, Dv, generator=g, dtype=f64),
        torch.rand(B, H, F, generator=g, dtype=f64),
    )
    attn = LinearAttention(fm, D**-0.5, normalize)
    for a, b in zip(
        reference.quadratic(q, k, v, attn, params, state),
        reference.recurrent(q, k, v, attn, params, state),
    ):
        assert rel_err(a, b) < 1e-12


def test_rebased_with_identity_affine_is_norm_x2() -> None:
    g = torch.Generator().manual_seed(3)
    B, T, H, D = 1, 40, 2, 16
    q, k, v = (torch.randn(B, T, H, D, generator=g) for _ in range(3))
    ones, zeros = torch.ones(H, D), torch.zeros(H, D)
    for backend in ("reference", "torch"):
        a = rk.linear_attention(
            q,
            k,
            v,
            "rebased",
            q_weight=ones,
            q_bias=zeros,
            k_weight=ones,
            k_bias=zeros,
            backend=backend,
        )
        b = rk.linear_attention(q, k, v, "norm_x2", backend=backend)
        assert rel_err(a, b) < 1e-6


def test_user_defined_cubic_runs_end_to_end_on_torch() -> None:
    """A new kernel (s^2 + s^3/10) is data: forward and gradients match the oracle."""
    g = torch.Generator().manual_seed(4)
    B, T, H, D, Dv = 2, 70, 2, 8, 4
    q, k = (torch.randn(B, T, H, D, generator=g, dtype=f64, requires_grad=True) for _ in range(2))
    v = torch.randn(B, T, H, Dv, generator=g, dtype=f64, requires_grad=True)
    w = (1 + 0.1 * torch.randn(H, D, generator=g, dtype=f64)).requires_grad_(True)
    o, state = rk.linear_attention(
        q, k, v, CUBIC, q_weight=w, k_weight=w, backend="torch", output_final_state=True
    )
    assert state.S.shape == (B, H, CUBIC.num_features(D), Dv)
    ref = reference.quadratic(q, k, v, LinearAttention(CUBIC, D**-0.5), (w, None, w, None))
    assert_close(o, ref[0], f64, "o")
    assert_close(state.S, ref[1], f64, "S")
    cot = torch.randn(o.shape, generator=g, dtype=f64)
    ours = torch.autograd.grad((o * cot).sum(), (q, k, v, w))
    theirs = torch.autograd.grad((ref[0] * cot).sum(), (q, k, v, w))
    for a, b, n in zip(ours, theirs, "qkvw"):
        assert_close(a, b, f64, f"d{n}")


def test_similarity_helper_and_degree() -> None:
    based = PRESETS["based"]
    assert based.degree == 2 and based.powers == (0, 1, 2)
    assert math.isclose(based.similarity(-1.0), 0.5)
    assert PRESETS["rebased"].powers == (2,)


@pytest.mark.parametrize(
    "coeffs, match",
    [
        ((), "non-zero"),
        ((0.0, 0.0), "non-zero"),
        ((1.0, -1.0), ">= 0"),
        ((float("nan"),), "finite"),
    ],
)
def test_bad_feature_maps_are_rejected(coeffs, match) -> None:
    with pytest.raises(ValueError, match=match):
        FeatureMap("bad", PreTransform(), coeffs)


def test_bad_affine_and_unknown_preset() -> None:
    with pytest.raises(ValueError, match="affine"):
        PreTransform(True, "beta")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown feature map"):
        rk.get_feature_map("rebase")


def test_quadratic_coeffs_pad_absent_powers_and_refuse_higher_degrees() -> None:
    """The fused kernels' ``(c_0, c_1, c_2)``: Based's Taylor terms, ReBased's square alone, a
    linear map's zeros above it; a cubic has no such triple."""
    assert PRESETS["based"].quadratic_coeffs == (1.0, 1.0, 0.5)
    assert PRESETS["rebased"].quadratic_coeffs == (0.0, 0.0, 1.0)
    linear = FeatureMap("lin", PRESETS["rebased"].pre, (0.0, 1.0))
    assert linear.quadratic_coeffs == (0.0, 1.0, 0.0)
    with pytest.raises(ValueError, match="degree 3 > 2"):
        _ = CUBIC.quadratic_coeffs
