"""Hypothesis profiles and the backends under test.

``REBASED_KERNELS_PROFILE`` picks the profile: ``ci`` (default; bounded, derandomised, fits
the CI budget), ``gpu`` (>= 200 examples per backend and dtype, for the device machine)
or ``dev`` (random, a few examples, for a quick local loop).
"""

from __future__ import annotations

import os

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
