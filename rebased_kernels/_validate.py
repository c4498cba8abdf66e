"""Input validation, once for every backend: errors that say what is wrong and what to do."""

from __future__ import annotations

import math
import os

import numpy as np
import torch

from .spec import FeatureMap

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
PARAM_NAMES = ("q_weight", "q_bias", "k_weight", "k_bias")


def _shape(t: torch.Tensor) -> list[int]:
    return list(t.shape)


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ndim: int) -> None:
    """q, k ``[B, T, H, D]`` (ndim 4) or ``[B, H, D]`` (ndim 3, decode); v likewise with Dv."""
    layout = "[B, T, H, D]" if ndim == 4 else "[B, H, D]"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != ndim:
            raise ValueError(f"{name} has shape {_shape(t)} but must be {ndim}-D, {layout}")
    if q.shape != k.shape:
        raise ValueError(
            f"q has shape {_shape(q)} but k has {_shape(k)}: q and k must match in every dim"
        )
    if v.shape[:-1] != q.shape[:-1]:
        raise ValueError(
            f"v has shape {_shape(v)} but q has {_shape(q)}: v must match q in all dims "
            "but the last (Dv may differ from D)"
        )
    if q.dtype not in FLOAT_DTYPES:
        raise ValueError(f"q has dtype {q.dtype}; supported dtypes are {FLOAT_DTYPES}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(
            f"q, k, v have dtypes {q.dtype}, {k.dtype}, {v.dtype}: cast them to one dtype"
        )
    if not (q.device == k.device == v.device):
        raise ValueError(
            f"q, k, v are on {q.device}, {k.device}, {v.device}: move them to one device"
        )
    if q.shape[-1] == 0 or v.shape[-1] == 0:
        raise ValueError(f"D and Dv must be >= 1, got D={q.shape[-1]}, Dv={v.shape[-1]}")


def check_params(fm: FeatureMap, q: torch.Tensor, params: tuple) -> None:
    """Each parameter is ``[H, D]`` or ``[D]`` and used by the feature map."""
    H, D = q.shape[-2], q.shape[-1]
    uses = (fm.pre.uses_gamma, fm.pre.uses_beta) * 2
    for name, p, used in zip(PARAM_NAMES, params, uses):
        if p is None:
            continue
        if not used:
            raise ValueError(
                f"{name} was given but feature map {fm.name!r} (affine={fm.pre.affine!r}) "
                "does not use it: drop it or pick a feature map with that parameter"
            )
        if not isinstance(p, torch.Tensor) or p.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name} must be a floating-point tensor")
        if list(p.shape) not in ([H, D], [D]):
            raise ValueError(f"{name} has shape {_shape(p)} but must be [H, D] = [{H}, {D}] or [D]")
        if p.device != q.device:
            raise ValueError(f"{name} is on {p.device} but q is on {q.device}")


def check_state(
    state: tuple, N: int, H: int, F: int, Dv: int, device: torch.device, what: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``state = (S [N, H, F, Dv], z [N, H, F])``, float32 or float64, on q's device."""
    if not isinstance(state, (tuple, list)) or len(state) != 2:
        raise ValueError(f"{what} must be a pair (S, z), e.g. the state a previous call returned")
    S, z = state
    for name, t, shape in (("S", S, [N, H, F, Dv]), ("z", z, [N, H, F])):
        if not isinstance(t, torch.Tensor) or list(t.shape) != shape:
            got = _shape(t) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(
                f"{what}.{name} is {got} but must be {shape} "
                f"({'[N, H, F, Dv]' if name == 'S' else '[N, H, F]'}, "
                f"F = {F} features for this feature map and D)"
            )
        if t.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"{what}.{name} has dtype {t.dtype}; states are float32 or float64")
        if t.device != device:
            raise ValueError(f"{what}.{name} is on {t.device} but q is on {device}")
    return S, z


def check_cu_seqlens(cu_seqlens: torch.Tensor, B: int, T: int, device: torch.device) -> int:
    """Validate FlashAttention-style packing offsets; returns N, the number of sequences."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype not in (
        torch.int32,
        torch.int64,
    ):
        raise ValueError("cu_seqlens must be an int32 or int64 tensor [N + 1]")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(
            f"cu_seqlens has shape {_shape(cu_seqlens)} but must be [N + 1] with N >= 1"
        )
    if B != 1:
        raise ValueError(
            f"with cu_seqlens the batch must be 1 (sequences packed along T), got B={B}"
        )
    if cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but q is on {device}")
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != T or any(b > a for a, b in zip(bounds[1:], bounds[:-1])):
        raise ValueError(
            f"cu_seqlens must start at 0, never decrease and end at T={T}; got {bounds[:8]}"
            f"{'...' if len(bounds) > 8 else ''}"
        )
    return len(bounds) - 1


def check_scalars(scale: float, eps: float) -> None:
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be finite and > 0, got {scale}")
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be finite and >= 0, got {eps}")


def is_finite(t: torch.Tensor) -> bool:
    """Whether every element is finite (numpy on CPU: no thread-pool start-up)."""
    if t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64):
        return bool(np.isfinite(t.detach().numpy()).all())
    return bool(torch.isfinite(t).all())


def check_finite(named: dict[str, torch.Tensor | None], fast: bool | None = None) -> None:
    """Raise on NaN/Inf inputs; ``REBASED_KERNELS_CHECK_FINITE=0`` skips it.

    On a GPU each tensor is summed once in fp32 on the device (a NaN or Inf anywhere makes
    the sum non-finite) and the sums are read back together: one pass over the inputs and
    one sync per call. Only a non-finite sum (a bad element, or finite values whose sum
    overflows) runs the exact per-tensor pass, which names the culprit.
    """
    if os.environ.get("REBASED_KERNELS_CHECK_FINITE", "1") == "0":
        return
    present = {n: t for n, t in named.items() if t is not None and t.numel()}
    if not present:
        return
    if fast if fast is not None else next(iter(present.values())).device.type != "cpu":
        sums = torch.stack([t.sum(dtype=torch.float32) for t in present.values()])
        if bool(torch.isfinite(sums).all()):
            return
    for name, t in present.items():
        if not is_finite(t):
            raise ValueError(
                f"{name} contains NaN or Inf: the kernels would return garbage; "
                "fix the input (set REBASED_KERNELS_CHECK_FINITE=0 to skip this check)"
            )
