"""Hypothesis profiles and the backends under test.

``REBASED_KERNELS_PROFILE`` picks the profile: ``ci`` (default; bounded, derandomised, fits
the CI budget), ``gpu`` (>= 200 examples per backend and dtype, for the device machine)
or ``dev`` (random, a few examples, for a quick local loop).
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

# Under pytest-xdist (``make test`` runs one worker per core) each worker gets its share of
# the cores: torch's and numba's default pools of one thread per core, in every worker,
# oversubscribed CI's two cores (a 13 s MQAR run took 154 s).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _THREADS = str(max(1, (os.cpu_count() or 1) // _WORKERS))
    for _name in ("OMP_NUM_THREADS", "NUMBA_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[_name] = _THREADS  # before torch / numba start their pools
    import torch

    torch.set_num_threads(int(_THREADS))

_common = dict(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.register_profile("ci", max_examples=25, derandomize=True, **_common)
settings.register_profile("gpu", max_examples=200, **_common)
settings.register_profile("dev", max_examples=8, **_common)
settings.load_profile(os.environ.get("REBASED_KERNELS_PROFILE", "ci"))

if os.environ.get("REBASED_KERNELS_TILELANG_ON_CPU") == "1":
    # ``make tilelang-cpu-props``: the TileLang backend under test on the CPU, through
    # TileLang's C target with its fp32 products rounded to tf32 as a GPU's tensor cores round
    # them (``build.TF32_ON_C``): the GPU's numerics without a GPU (session 19: the H100's
    # errors reproduced to four digits). Half-precision forwards do not build for the C target
    # (TileLang 0.1.15), so the target runs the float32 draws.
    from rebased_kernels.backends.tilelang import TileLangBackend, build

    TileLangBackend.device_types = frozenset({"cuda", "cpu"})
    TileLangBackend.unavailable_reason = lambda self: None
    build.TF32_ON_C = True
