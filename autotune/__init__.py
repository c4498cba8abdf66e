"""Autotuning and ``backend="auto"``: measured selection per device and problem bucket.

``tune(...)`` searches every available backend's tuning space for one bucket (see
``tuner``) and stores the fastest (backend, configuration) in the persistent cache
(``cache``). A call with ``backend="auto"`` then uses the cached winner for its bucket; an
untuned bucket falls back to the static order ``rebased_kernels.backend.AUTO_ORDER``
(never tuning inside the call unless ``REBASED_KERNELS_AUTOTUNE=1``).
``rebased_kernels.explain`` says which backend and configuration a call uses and why.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from rebased_kernels.backend import AUTO_ORDER, Problem, registered, resolve

from .cache import TuneCache, cache_dir, device_fingerprint
from .keys import bucket, bucket_key
from .tuner import TuneResult, tune

__all__ = [
    "Choice",
    "TuneCache",
    "TuneResult",
    "bucket",
    "bucket_key",
    "cache_dir",
    "choose",
    "device_fingerprint",
    "tune",
]

_CACHES: dict[str, TuneCache] = {}


@dataclass(frozen=True)
class Choice:
    """What a call runs on and why."""

    backend: str
    config: dict
    reason: str


def _cache(device_type: str) -> TuneCache:
    if device_type not in _CACHES:
        _CACHES[device_type] = TuneCache(device_type)
    return _CACHES[device_type]


def choose(name: str, problem: Problem, T: int, BH: int, config: dict | None) -> Choice:
    """The selection rule. A named backend runs as asked; ``"auto"`` takes the tuned winner
    of the call's bucket when it is available here and supports the call, else (after tuning
    the bucket when ``REBASED_KERNELS_AUTOTUNE=1``) the first of the static order."""
    if name != "auto":
        be = resolve(name, problem)
        return Choice(be.name, {**be.default_config, **(config or {})}, "named by the call")
    key = bucket_key(problem, T, BH)
    record = _cache(problem.device_type).get(key)
    if record is None and os.environ.get("REBASED_KERNELS_AUTOTUNE") == "1":
        a = problem.attention
        B, H = BH, 1
        record = tune(B, T, H, problem.D, problem.Dv, problem.dtype, problem.device_type,
                      a.feature_map, a.normalize, quick=True, budget_s=30.0,
                      cache=_cache(problem.device_type), progress=False).best  # fmt: skip
    if record is not None:  # a stale record (backend gone, or not for this call) is skipped
        be = registered().get(record.get("backend"))
        if be and be.unavailable_reason() is None and be.unsupported_reason(problem) is None:
            cfg = {**be.default_config, **record["config"], **(config or {})}
            return Choice(be.name, cfg, f"tuned for bucket {key}: {record['ms']:.3g} ms "
                          f"({record['objective']}) at shape {record['shape']}")  # fmt: skip
    be = resolve("auto", problem)
    order = ", ".join(AUTO_ORDER.get(problem.device_type, ("torch",)))
    return Choice(be.name, {**be.default_config, **(config or {})},
                  f"bucket {key} is not tuned on this device: first available of the static "
                  f"order ({order}); `rebased-kernels tune` measures it")  # fmt: skip
