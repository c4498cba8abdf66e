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


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """Fail unless ``rel_err(out, ref) <= TOLERANCE[dtype]``."""
    err = rel_err(out, ref)
    tol = TOLERANCE[dtype]
    if not err <= tol:
        raise AssertionError(f"{what}: relative error {err:.3e} > {tol:.0e} ({dtype})")
