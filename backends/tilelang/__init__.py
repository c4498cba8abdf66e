"""``tilelang``: the ReBased spec lowered to TileLang.

``kernels.forward_kernel`` returns the forward of any ``sim = c0 + c1 s + c2 s^2`` (every
preset: ``rebased`` and its ablations, ``based``) as a ``T.prim_func``: pre-transform, chunk
walk with the whole state on chip (one unscaled block per power present; an absent power
costs nothing), fp32 normaliser or none (``normalize=False``), an optional initial state;
one program per (batch, head), D <= 16, Dv <= 64 (``split`` walks a long sequence as
segments, one program each, from the states a torch scan of their sums gives them).
``backward.dq_kernel`` and
``backward.dkv_kernel`` are its backward as two more walks (dq, d gamma_q, d beta_q and the
per-token 1 / (den + eps) and r in order; dk, dv, d gamma_k, d beta_k and the initial
state's gradient in reverse, from the final state's cotangent); the pieces of a walk live
once, in ``tiles``. With ``forward="tiles"`` the same pieces run as one program per chunk
instead (``tile``: the forward from each segment's start; ``tile_backward``: the dq and dk/dv
programs from each segment's start and end), as triton's ``tiles`` variant, no walk but
the segments' sums. ``build`` compiles them (CUDA on a GPU, TileLang's C target on the
CPU) once per compile key (kind, BV = Dv rounded up to a multiple of 16, and
``options.KernelOptions``: the powers present, LayerNorm, normaliser, state, dtype,
tunables), B, T, H, D, the coefficients, scale and eps being read at launch;
``build.compile_classes`` lists the keys a set of problems needs and ``build.precompile``
builds them on threads. ``call.forward`` / ``call.backward`` launch them and map the state
and its cotangents between the kernel's layout (``layout``) and the spec's canonical one;
``hopper`` lowers them for sm_90a on any machine. Registered for CUDA, after
triton in ``backend="auto"``'s static order; the tuner times it beside triton. Its kernels with
compile-time scale, coefficients, H and D matched the float64 oracle on an H200 in bf16, fp16
(``docs/results/h200-s7/``) and fp32 (``h200-s8/``); the run-time version here has not run on
a GPU yet, nor has its GPU property suite. On the CPU the tests check its numerics through
the C target and lower it to Hopper CUDA (``tests/test_tilelang.py``).
Nothing here imports TileLang until a kernel is built.
"""

from __future__ import annotations

import importlib.util
from typing import Any, ClassVar

import torch

from rebased_kernels.backend import Backend, Inputs, Outputs, Problem, register
from rebased_kernels.spec import LinearAttention

from . import build, call


class TileLangBackend(Backend):
    name = "tilelang"
    dtypes: ClassVar[frozenset[torch.dtype]] = frozenset(build.DTYPES)
    device_types: ClassVar[frozenset[str]] = frozenset({"cuda"})
    max_degree: ClassVar[int | None] = 2
    max_D: ClassVar[int | None] = 16
    max_Dv: ClassVar[int | None] = 64
    tuning_space: ClassVar[dict[str, tuple]] = {
        "chunk_size": (32, 64),
        "num_stages": (1, 2),
        "threads": (128, 256),
        "segment": (0, 512, 2048, "auto"),
        "forward": ("walk", "tiles"),
    }
    """Compile-time, each: a configuration compiles the forward and both backward sweeps
    once per (BV, dtype, powers present, LayerNorm or not, normalize, state given or not);
    B, T, H, D, the coefficients, scale and eps are runtime values. Some do not build
    (chunk 32 at 256 threads does not lower in TileLang 0.1.15; fp32 at chunk 64 needs more
    shared memory than Hopper has): the tuner records those as failed. ``segment`` (tokens a
    program walks; 0: a whole sequence) is read at launch (``split``), and so is ``forward``
    (``build.FORWARDS``: the chunk walks, or ``tile`` / ``tile_backward``'s one program per
    chunk from its segment's start or end, segments of ``segment`` tokens, 256 by default;
    their kernels are compiled only for configurations that ask for them)."""
    runtime_tunables: ClassVar[tuple[str, ...]] = ("segment", "forward")
    default_config: ClassVar[dict[str, Any]] = {
        "chunk_size": None,
        "num_stages": None,
        "threads": None,
        "segment": None,
        "forward": None,
    }
    """None: the dtype's default (``build.DEFAULT_CONFIG``; ``build.FP32_CONFIG`` for fp32),
    ``split.DEFAULT_SEGMENT`` (no split until a GPU run has checked and timed it; the GPU
    property suite draws segments of 48 tokens, ``test_configs``) and ``build.DEFAULT_FORWARD``
    (the walks, until a GPU run has checked and timed the tile kernels)."""
    compiles: ClassVar[bool] = True
    float32_products: ClassVar[str] = "tf32"
    """TileLang's float32 ``T.gemm`` runs on Hopper's tensor cores in tf32 (wgmma has no
    float32 operands): float32 inputs keep float32 LayerNorm, sums and normaliser, and their
    products have 10-bit mantissas (o 1.1e-3, gradients up to 6.5e-3 against the float64
    oracle on an H200), as do the gradient sweeps of bf16 / fp16 inputs
    (``build.SWEEP_DTYPE``). The triton backend multiplies float32 exactly. Where a state
    carries the caller's, its products are ~fp32 (three tf32 products: the forward's
    ``kernels.exact_state``, the normalised sweeps' ``backward.exact_state``; session 19)."""
    state_cotangents_optional: ClassVar[bool] = True

    def test_configs(self) -> list[dict[str, Any]]:
        """The default configuration, it split into segments of 48 tokens (``split``: the
        property suite's T <= 160 stays within one automatic segment), and the tile kernels
        in segments of 128 (two chunks of bf16's 64, four of the fp32 sweeps' 32): every
        compiled
        configuration builds ~50 kernels per dtype for the draws (3 (powers, LayerNorm)
        classes x normalize x state x kinds), ~15 s each, a segment length none. The tuner
        checks each configuration it times against the float64 oracle first
        (``autotune.tuner.check_config``)."""
        return [dict(self.default_config), {**self.default_config, "segment": 48},
                {**self.default_config, "forward": "tiles", "segment": 128}]  # fmt: skip

    def unavailable_reason(self) -> str | None:
        if importlib.util.find_spec("tilelang") is None:
            return "tilelang is not installed (pip install 'rebased-kernels[tilelang]')"
        if not torch.cuda.is_available():
            return "no CUDA GPU (the tests run these kernels through TileLang's C target)"
        return None

    def unsupported_reason(self, problem: Problem) -> str | None:
        reason = build.unsupported_reason(problem.attention, problem.D, problem.Dv, problem.dtype)
        return reason or super().unsupported_reason(problem)

    def forward_dense(self, x: Inputs, attn: LinearAttention, config: dict) -> Outputs:
        return call.forward(x, attn, config)

    def backward_dense(
        self, x: Inputs, attn: LinearAttention, config: dict, grads: Outputs
    ) -> Inputs:
        return call.backward(x, attn, config, grads)


register(TileLangBackend())
