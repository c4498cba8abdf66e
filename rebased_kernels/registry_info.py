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


def backends() -> list[BackendInfo]:
    """Every registered backend with its availability on this machine and why not."""
    out = []
    for name, be in sorted(registered().items()):
        reason = be.unavailable_reason()
        out.append(BackendInfo(name, reason is None, reason, dict(be.tuning_space)))
    return out
