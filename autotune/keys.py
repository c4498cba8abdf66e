"""Bucket keys: which tuned record a call uses."""

from __future__ import annotations

from rebased_kernels.backend import Problem


def bucket(n: int, lowest: int = 16) -> int:
    """The power of two at or above n (at least ``lowest``): T and B*H buckets."""
    return max(lowest, 1 << max(0, n - 1).bit_length())


def bucket_key(problem: Problem, T: int, BH: int) -> str:
    """One record per feature map, D, Dv, dtype, normalisation, T bucket and B*H bucket."""
    fm = problem.attention.feature_map
    pre = f"{int(fm.pre.norm)}{fm.pre.affine}"
    coeffs = ",".join(f"{c:g}" for c in fm.coeffs)
    return (
        f"{pre}|{coeffs}|D{problem.D}|Dv{problem.Dv}|{str(problem.dtype)[6:]}"
        f"|n{int(problem.attention.normalize)}|varlen{int(problem.varlen)}"
        f"|T{bucket(T)}|BH{bucket(BH, 1)}"
    )
