"""How results are compared with the float64 oracle: the tolerance rule, stated once."""

from __future__ import annotations

import torch

TOLERANCE: dict[torch.dtype, float] = {
    torch.float64: 1e-10,
    torch.float32: 1e-4,
    torch.bfloat16: 1e-2,
    torch.float16: 1e-2,
}
"""Largest allowed relative error ``||out - ref|| / ||ref||`` per input dtype."""

PRODUCT_ROUNDOFF: dict[torch.dtype, float] = {
    torch.float64: 2.0**-51,
    torch.float32: 2.0**-22,  # a feature product is a few float32 roundings
    torch.bfloat16: 2.0**-11,  # half inputs: kernels may multiply with tf32 / fp16 operands
    torch.float16: 2.0**-11,
}
"""The rounding a kernel may commit per term of a feature sum, per input dtype."""


TF32_RULE = torch.bfloat16
"""The rule (``TOLERANCE``, ``PRODUCT_ROUNDOFF``) of float32 inputs on a backend whose float32
products are tf32 (``Backend.float32_products``): the half inputs', whose product roundoff
already is tf32's (2^-11): the products, not the inputs, set the gradients' error. TileLang
on an H200 measured 1.1e-3 on o (session 8) and 6.5e-3 on d gamma_q on the worst of 200
draws (session 10)."""
TF32_TOLERANCE = TOLERANCE[TF32_RULE]


def feature_form_tolerance(dtype: torch.dtype, kappa: float, products: str = "float32") -> float:
    """The tolerance where the feature (state) form meets the score form or itself split
    differently: ``max(TOLERANCE, PRODUCT_ROUNDOFF * kappa)`` with ``kappa`` from
    ``reference.condition`` (~15-20 for well-spread inputs, where this is ``TOLERANCE``;
    10^4 when q is nearly orthogonal to every k and the denominator is ~eps). ``products``
    "tf32" (float32 inputs multiplied in tf32) takes ``TF32_RULE``'s entries."""
    if products not in ("float32", "tf32"):
        raise ValueError(f"products {products!r} is not float32 or tf32")
    if dtype == torch.float32 and products == "tf32":
        dtype = TF32_RULE
    return max(TOLERANCE[dtype], PRODUCT_ROUNDOFF[dtype] * kappa)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64; inf when out has NaN/Inf or ref is zero."""
    out, ref = out.detach().to(torch.float64).cpu(), ref.detach().to(torch.float64).cpu()
    if out.shape != ref.shape:
        raise ValueError(f"shape {list(out.shape)} != reference shape {list(ref.shape)}")
    if not torch.isfinite(out).all():
        return float("inf")
    denom = ref.norm().item()
    if denom == 0.0:
        return 0.0 if out.norm().item() == 0.0 else float("inf")
    return (out - ref).norm().item() / denom


def random_inputs(
    B: int,
    T: int,
    H: int,
    D: int,
    Dv: int,
    dtype: torch.dtype,
    device: str | torch.device,
    feature_map,
    seed: int = 0,
    requires_grad: bool = True,
) -> dict[str, torch.Tensor]:
    """Fresh random ``q, k [B, T, H, D]``, ``v [B, T, H, Dv]`` and the ``[H, D]`` parameters
    the feature map uses (gamma ~ 1 +- 0.3, beta ~ +-0.3): keyword arguments for
    ``rk.linear_attention``. Never zeros."""
    from .spec import get_feature_map

    fm = get_feature_map(feature_map)
    dev = torch.device(device)
    # drawn where they are used: float64 on the CPU (the oracle's inputs), float32 on a GPU,
    # where drawing 600 M float64 values on the host cost a 32k tune bucket ~20 s
    g = torch.Generator(device=dev).manual_seed(seed)
    draw = torch.float64 if dev.type == "cpu" or dtype == torch.float64 else torch.float32

    def randn(*shape, std=1.0, mean=0.0):
        t = torch.randn(*shape, generator=g, dtype=draw, device=dev) * std + mean
        return t.to(dtype=dtype).requires_grad_(requires_grad)

    x = dict(q=randn(B, T, H, D), k=randn(B, T, H, D), v=randn(B, T, H, Dv))
    if fm.pre.uses_gamma:
        x["q_weight"], x["k_weight"] = (
            randn(H, D, mean=1.0, std=0.3),
            randn(H, D, mean=1.0, std=0.3),
        )
    if fm.pre.uses_beta:
        x["q_bias"], x["k_bias"] = randn(H, D, std=0.3), randn(H, D, std=0.3)
    return x


def floored_rel_err(out: torch.Tensor, ref: torch.Tensor, floor: float = 0.0) -> float:
    """``||out - ref|| / max(||ref||, floor)``: ``rel_err`` with ``floor`` as the scale below
    which ``ref`` counts as cancellation."""
    ref_norm = ref.detach().double().norm().item()
    err = rel_err(out, ref)
    if floor > ref_norm > 0.0 and err != float("inf"):
        err = err * ref_norm / floor
    return err


def assert_close(
    out: torch.Tensor,
    ref: torch.Tensor,
    dtype: torch.dtype,
    what: str,
    tol: float | None = None,
    floor: float = 0.0,
) -> None:
    """Fail unless ``||out - ref|| <= tol * max(||ref||, floor)`` (``tol`` defaults to
    ``TOLERANCE[dtype]``; ``floor`` is a scale below which ref counts as cancellation)."""
    tol = TOLERANCE[dtype] if tol is None else tol
    err = floored_rel_err(out, ref, floor)
    if not err <= tol:
        raise AssertionError(f"{what}: relative error {err:.3e} > {tol:.1e} ({dtype})")
