"""Hypothesis profiles and the backends under test.

``REBASED_KERNELS_PROFILE`` picks the profile: ``ci`` (default; bounded, derandomised, fits
the CI budget), ``gpu`` (>= 200 examples per backend and dtype, for the device machine)
or ``dev`` (random, a few examples, for a quick local loop).
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

_common = dict(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.register_profile("ci", max_examples=25, derandomize=True, **_common)
settings.register_profile("gpu", max_examples=200, **_common)
settings.register_profile("dev", max_examples=8, **_common)
settings.load_profile(os.environ.get("REBASED_KERNELS_PROFILE", "ci"))


@pytest.fixture(scope="session", autouse=True)
def _tilelang_kernels_built_once():
    """On the GPU, build every TileLang kernel the property draws need before the first test,
    on all cores (``build.precompile``); a lazy build per draw would compile one at a time.
    Run the TileLang suite in one process (``PROPS_N=0``): the builds live in its memory."""
    from strategies import DEVICE, FEATURE_MAPS, backends_under_test, dtypes_under_test

    if not DEVICE.startswith("cuda") or "tilelang" not in backends_under_test():
        yield None
        return
    from rebased_kernels.backends.tilelang import build

    from rebased_kernels.backend import Problem, registered
    from rebased_kernels.spec import LinearAttention

    be = registered()["tilelang"]
    problems = [Problem(LinearAttention(fm, 0.25, normalize), 16, 16, dtype, "cuda")
                for dtype in dtypes_under_test("tilelang") for fm in FEATURE_MAPS
                for normalize in (False, True)]  # fmt: skip
    problems = [p for p in problems if be.unsupported_reason(p) is None]
    keys = build.compile_classes(problems, be.test_configs())
    failed = build.precompile(keys)
    print(f"tilelang: {len(keys)} kernels built, {len(failed)} failed", flush=True)
    yield failed
