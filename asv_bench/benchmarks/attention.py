"""``rk.linear_attention`` forward / forward+backward and ``rk.decode_step``, per backend.

Times are medians from ``rebased_kernels.bench.median_ms`` (CUDA events on a GPU, a
monotonic clock on the CPU) after a warm-up that includes compilation. Shapes: the
project's main GPU shape (B=4, H=16, D=16, Dv=64) on CUDA, B=1, H=8 on the CPU.
"""

from __future__ import annotations

import os

import torch

import rebased_kernels as rk
from rebased_kernels.backend import Problem, get_backend
from rebased_kernels.bench import budget_ms, median_ms
from rebased_kernels.spec import LinearAttention as Spec
from rebased_kernels.testing import random_inputs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = (
    os.environ.get("REBASED_KERNELS_ASV_BACKENDS", "").split(",")
    if os.environ.get("REBASED_KERNELS_ASV_BACKENDS")
    else [b.name for b in rk.backends() if b.name != "reference"]
)
"""Every registered backend but the oracle; ``REBASED_KERNELS_ASV_BACKENDS=a,b`` narrows a
run (a GPU run of every cell spends minutes on backends nobody tracks there)."""
B, H, D, Dv = (4, 16, 16, 64) if DEVICE == "cuda" else (1, 8, 16, 64)
LENGTHS = (
    [int(t) for t in os.environ["REBASED_KERNELS_ASV_LENGTHS"].split(",")]
    if os.environ.get("REBASED_KERNELS_ASV_LENGTHS")
    else [1024, 2048, 4096, 8192, 16384, 32768]
    if DEVICE == "cuda"
    else [1024, 4096]
)
"""``REBASED_KERNELS_ASV_LENGTHS=2048,16384`` narrows the sequence lengths likewise."""
DTYPES = ["bfloat16", "float16"] if DEVICE == "cuda" else ["float32", "bfloat16"]


def _runnable(backend: str, dtype: torch.dtype) -> None:
    """Raise NotImplementedError (asv: skip the cell) when the backend cannot run here."""
    be = get_backend(backend)
    fm = rk.get_feature_map("rebased")
    reason = be.unavailable_reason() or be.unsupported_reason(
        Problem(Spec(fm, D**-0.5), D, Dv, dtype, DEVICE)
    )
    if reason:
        raise NotImplementedError(reason)


def _inputs(T: int, dtype: torch.dtype, grad: bool) -> dict:
    return random_inputs(B, T, H, D, Dv, dtype, DEVICE, "rebased", requires_grad=grad)


class LinearAttention:
    params = (BACKENDS, LENGTHS, DTYPES, ["forward", "forward_backward"])
    param_names = ["backend", "T", "dtype", "mode"]
    timeout = 600

    def setup(self, backend: str, T: int, dtype: str, mode: str) -> None:
        dt = getattr(torch, dtype)
        _runnable(backend, dt)
        x = _inputs(T, dt, grad=mode == "forward_backward")
        if mode == "forward":

            def fn():
                with torch.no_grad():
                    return rk.linear_attention(**x, backend=backend)
        else:

            def fn():
                o = rk.linear_attention(**x, backend=backend)
                o.backward(torch.ones_like(o))

        self.fn = fn
        fn()  # compile / load compiled code outside the timing

    def track_ms(self, backend: str, T: int, dtype: str, mode: str) -> float:
        # 50 repeats on a GPU, fewer for a slow call (a peer's 200 ms): ~2 s per cell
        return budget_ms(self.fn, DEVICE, 2000.0, 5, 7 if DEVICE == "cpu" else 50)

    track_ms.unit = "ms"

    def peakmem_call(self, backend: str, T: int, dtype: str, mode: str) -> None:
        self.fn()


class DecodeStep:
    params = (BACKENDS, DTYPES, [False, True])
    param_names = ["backend", "dtype", "inplace"]

    def setup(self, backend: str, dtype: str, inplace: bool) -> None:
        dt = getattr(torch, dtype)
        _runnable(backend, dt)
        x = _inputs(64, dt, grad=False)
        _, state = rk.linear_attention(**x, backend=backend, output_final_state=True)
        step = [x[n][:, -1].contiguous() for n in ("q", "k", "v")]
        params = {n: x[n] for n in ("q_weight", "q_bias", "k_weight", "k_bias")}
        self.fn = lambda: rk.decode_step(*step, state, **params, backend=backend, inplace=inplace)
        self.fn()

    def track_us(self, backend: str, dtype: str, inplace: bool) -> float:
        return median_ms(self.fn, DEVICE, warmup=20, repeats=500) * 1e3

    track_us.unit = "us"
