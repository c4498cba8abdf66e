"""``rebased-kernels check``: every available backend against the float64 oracle, here."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import reference
from .backend import get_backend, registered
from .ops import linear_attention
from .spec import LinearAttention, get_feature_map
from .testing import TOLERANCE, random_inputs, rel_err


@dataclass
class CheckRow:
    backend: str
    feature_map: str
    dtype: str
    forward_err: float
    backward_err: float
    tolerance: float
    skipped: str | None = None

    @property
    def passed(self) -> bool:
        return self.skipped is None and max(self.forward_err, self.backward_err) <= self.tolerance


def check_one(
    backend: str,
    feature_map: str,
    dtype: torch.dtype,
    device: str,
    shape=(2, 100, 2, 16, 16),
    seed=0,
    config: dict | None = None,
) -> CheckRow:
    """Forward and gradient errors (worst relative norm error) of one backend/map/dtype."""
    fm = get_feature_map(feature_map)
    B, T, H, D, Dv = shape
    be = get_backend(backend)
    from .backend import Problem

    reason = be.unsupported_reason(
        Problem(LinearAttention(fm, D**-0.5), D, Dv, dtype, torch.device(device).type)
    )
    row = CheckRow(
        backend,
        fm.name,
        str(dtype).replace("torch.", ""),
        float("nan"),
        float("nan"),
        TOLERANCE[dtype],
        reason,
    )
    if reason:
        return row
    x = random_inputs(B, T, H, D, Dv, dtype, device, fm, seed)
    o = linear_attention(**x, feature_map=fm, backend=backend, config=config)
    params = tuple(x.get(n) for n in ("q_weight", "q_bias", "k_weight", "k_bias"))
    ref = reference.quadratic(x["q"], x["k"], x["v"], LinearAttention(fm, D**-0.5), params)[0]
    cot = torch.randn(
        o.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64
    ).to(device)
    leaves = list(x.values())
    ours = torch.autograd.grad((o.double() * cot).sum(), leaves)
    theirs = torch.autograd.grad((ref * cot).sum(), leaves)
    row.forward_err = rel_err(o, ref)
    row.backward_err = max(rel_err(a, b) for a, b in zip(ours, theirs))
    return row


def check_all(
    device: str,
    feature_maps: list[str],
    dtypes: list[torch.dtype],
    backends: list[str] | None = None,
    progress: bool = True,
) -> list[CheckRow]:
    """``check_one`` for every available backend (or the named ones), map and dtype."""
    from tqdm import tqdm

    names = backends or [
        n
        for n, be in sorted(registered().items())
        if n != "reference" and be.unavailable_reason() is None
    ]
    jobs = [(b, f, d) for b in names for f in feature_maps for d in dtypes]
    rows = []
    for b, f, d in tqdm(jobs, desc="check", disable=not progress, unit="case"):
        rows.append(check_one(b, f, d, device))
    return rows


def format_table(rows: list[CheckRow]) -> str:
    head = (
        f"{'backend':<15}{'feature map':<17}{'dtype':<10}"
        f"{'fwd rel err':>12}{'bwd rel err':>13}{'tol':>8}  result"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        result = f"skip: {r.skipped}" if r.skipped else ("pass" if r.passed else "FAIL")
        lines.append(
            f"{r.backend:<15}{r.feature_map:<17}{r.dtype:<10}{r.forward_err:>12.2e}"
            f"{r.backward_err:>13.2e}{r.tolerance:>8.0e}  {result}"
        )
    return "\n".join(lines)
