"""``rk.backends()``: what is registered, what runs here, and why not."""

from __future__ import annotations

from dataclasses import dataclass

from .backend import registered


@dataclass(frozen=True)
class BackendInfo:
    name: str
    available: bool
    reason: str | None
    tuning_space: dict


def first_call_seconds(name: str, device: str = "cpu") -> tuple[float, float]:
    """Seconds of a backend's first and second float32 forward+backward on a tiny problem.

    The first includes compilation (or loading compiled code from the disk cache).
    """
    import time

    import torch

    from .ops import linear_attention

    g = torch.Generator().manual_seed(0)
    shapes = ((1, 80, 2, 16), (1, 80, 2, 16), (1, 80, 2, 16))
    x = [torch.randn(*s, generator=g).to(device).requires_grad_(True) for s in shapes]
    times = []
    for _ in range(2):
        start = time.perf_counter()
        linear_attention(*x, "rebased", backend=name).sum().backward()
        times.append(time.perf_counter() - start)
    return times[0], times[1]


def backends() -> list[BackendInfo]:
    """Every registered backend with its availability on this machine and why not."""
    out = []
    for name, be in sorted(registered().items()):
        reason = be.unavailable_reason()
        out.append(BackendInfo(name, reason is None, reason, dict(be.tuning_space)))
    return out
