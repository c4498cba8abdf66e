"""Problem draws for the property tests: fresh random inputs, never zeros."""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, replace

import torch
from hypothesis import strategies as st

import rebased_kernels as rk
from rebased_kernels import reference
from rebased_kernels.backend import Problem, compute_dtype, registered
from rebased_kernels.spec import PRESETS, FeatureMap, LinearAttention, PreTransform

DEVICE = os.environ.get("REBASED_KERNELS_TEST_DEVICE", "cpu")
PROFILE = os.environ.get("REBASED_KERNELS_PROFILE", "ci")

CUBIC = FeatureMap("cubic", PreTransform(True, "gamma_beta"), (0.0, 0.0, 1.0, 0.1))
"""A user-defined kernel: s^2 + s^3 / 10 on LayerNormed q, k (positive for |s| < 10)."""

FEATURE_MAPS = (*PRESETS.values(), CUBIC)

CI_EXAMPLES = {"torch_compile": 2, "reference": 3, "triton": 2, "fla": 3}
"""Per-backend example counts under the ``ci`` profile where compilation (or, for triton
and fla, the interpreter running every program in Python) dominates."""

CI_DTYPES = {
    "torch_compile": (torch.float32, torch.float64, torch.bfloat16),
    # the Triton interpreter (CPU) has no bfloat16; the GPU profile runs all three
    "triton": (torch.float32, torch.float16),
    "fla": (torch.float16,),
}
CI_SHAPES = {
    "torch_compile": dict(B=1, H=2, D=16, Dv=8),
    "triton": dict(B=1, H=2),  # the interpreter runs each program in Python
    "fla": dict(B=1, H=2),
}
"""Under ``ci``, compiled backends draw fewer dtypes and shapes: each new one compiles."""


CONFIG_FILTER = os.environ.get("REBASED_KERNELS_TEST_CONFIG")
"""A JSON object: the draws take only the test configurations holding these keys and values
(``'{"exact": "bf16x3"}'``), for a GPU run aimed at one change; unset, all of them."""


def test_configs(be) -> list[dict]:
    """The configurations a backend's draws take: ``be.test_configs()`` (``[{}]`` if it has
    none), narrowed by ``CONFIG_FILTER``, which must leave at least one."""
    configs = be.test_configs() or [{}]
    if CONFIG_FILTER:
        want = json.loads(CONFIG_FILTER)
        configs = [c for c in configs if all(c.get(k) == v for k, v in want.items())]
        if not configs:
            raise ValueError(f"no {be.name} test configuration holds {want}")
    return configs


def backends_under_test() -> list[str]:
    """Every registered backend that runs here, on the test device."""
    names = []
    for name, be in sorted(registered().items()):
        if be.unavailable_reason() is None and DEVICE.split(":")[0] in be.device_types:
            names.append(name)
    return names


@functools.cache
def build_tilelang_kernels() -> dict:
    """On a GPU, every TileLang kernel the draws need (each map x normalize x state in each
    dtype under test, in its test configurations; B, T, H, D and the coefficients are read at
    launch), built once per process on every core (``build.precompile_problems``) before
    its first property test; a lazy build per draw would compile one at a time. Run the
    TileLang suite in one process (``PROPS_N=0``): the builds live in its memory, and a
    pytest-xdist worker raises ``RuntimeError`` saying so. Returns the failures of its report."""
    from rebased_kernels.backends.tilelang import build

    if os.environ.get("PYTEST_XDIST_WORKER"):  # session 18: 4 workers, no test in 243 s
        raise RuntimeError(
            "run the TileLang GPU property suite in one process (pytest -n 0, PROPS_N=0): "
            "each pytest-xdist worker would build every TileLang kernel itself"
        )
    be = registered()["tilelang"]
    problems = [Problem(LinearAttention(fm, 0.25, normalize), 16, 16, dtype, "cuda")
                for dtype in dtypes_under_test("tilelang") for fm in FEATURE_MAPS
                for normalize in (False, True)]  # fmt: skip
    problems = [p for p in problems if be.unsupported_reason(p) is None]
    report = build.precompile_problems(problems, be.test_configs())
    print(f"tilelang: {report}", flush=True)
    return report["failed"]


GPU_EXAMPLES = 200
"""Examples per property, backend and dtype under the ``gpu`` profile."""


def examples(backend: str, default: int) -> int:
    if PROFILE == "ci":
        return CI_EXAMPLES.get(backend, default)
    if PROFILE == "gpu":
        return GPU_EXAMPLES
    return default


@dataclass(frozen=True)
class Case:
    backend: str
    B: int
    T: int
    H: int
    D: int
    Dv: int
    dtype: torch.dtype
    fm: FeatureMap
    normalize: bool
    params: bool
    param_shape: str  # "HD" or "D"
    state: bool
    config: tuple
    seed: int

    @property
    def attn(self) -> LinearAttention:
        return LinearAttention(self.fm, self.D**-0.5, self.normalize)


def dtypes_under_test(backend: str) -> list[torch.dtype]:
    """The dtypes a backend is tested in here (fewer for compiled backends under ``ci``)."""
    be = registered()[backend]
    all_dtypes = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
    dtypes = [d for d in all_dtypes if d in be.dtypes]
    if PROFILE == "ci":
        dtypes = [d for d in dtypes if d in CI_DTYPES.get(backend, dtypes)]
    return dtypes


@st.composite
def cases(draw, backend: str, dtype: torch.dtype, max_T: int = 160, min_T: int = 1) -> Case:
    be = registered()[backend]
    device_type = DEVICE.split(":")[0]
    fms = [
        fm
        for fm in FEATURE_MAPS
        if be.unsupported_reason(Problem(LinearAttention(fm, 1.0), 4, 4, dtype, device_type))
        is None
    ]  # the kernels it computes (degree, or fla's c2 s^2 only)
    # D >= 4: LayerNorm over D = 2 maps every vector to +-1, with gradients that are pure
    # cancellation (ill-conditioned in any float32 implementation)
    D = draw(st.sampled_from([4, 8, 16]))
    if be.max_D is not None:
        D = min(D, be.max_D)
    configs = test_configs(be)
    case = Case(
        backend=backend,
        B=draw(st.integers(1, 2)),
        T=draw(st.integers(min_T, max_T)),
        H=draw(st.integers(1, 3)),
        D=D,
        Dv=draw(st.integers(1, 16 if be.max_Dv is None else min(16, be.max_Dv))),
        dtype=dtype,
        fm=draw(st.sampled_from(fms)),
        normalize=draw(st.booleans()),
        params=draw(st.booleans()),
        param_shape=draw(st.sampled_from(["HD", "D"])),
        state=draw(st.booleans()),
        config=tuple(sorted(draw(st.sampled_from(configs)).items())),
        seed=draw(st.integers(0, 2**31 - 1)),
    )
    if PROFILE == "ci" and backend in CI_SHAPES:
        case = replace(case, **CI_SHAPES[backend])
    return case


def make_inputs(case: Case, T: int | None = None, B: int | None = None) -> dict:
    """Random q, k, v, feature-map parameters and (optionally) an initial state."""
    g = torch.Generator().manual_seed(case.seed)
    T = case.T if T is None else T
    B = case.B if B is None else B
    H, D, Dv = case.H, case.D, case.Dv

    def randn(*shape, std=1.0, mean=0.0):
        return (
            (torch.randn(*shape, generator=g, dtype=torch.float64) * std + mean)
            .to(case.dtype)
            .to(DEVICE)
        )

    kw = dict(q=randn(B, T, H, D), k=randn(B, T, H, D), v=randn(B, T, H, Dv))
    pshape = (H, D) if case.param_shape == "HD" else (D,)
    if case.params and case.fm.pre.uses_gamma:
        kw["q_weight"], kw["k_weight"] = (
            randn(*pshape, std=0.3, mean=1.0),
            randn(*pshape, std=0.3, mean=1.0),
        )
    if case.params and case.fm.pre.uses_beta:
        kw["q_bias"], kw["k_bias"] = randn(*pshape, std=0.3), randn(*pshape, std=0.3)
    if case.state:
        prefix = replace(case, state=False, seed=case.seed + 1)
        p = make_inputs(prefix, T=int(torch.randint(1, 9, (1,), generator=g)), B=B)
        _, S, z = reference.quadratic(
            p["q"], p["k"], p["v"], case.attn, tuple(p.get(n) for n in PARAM_NAMES)
        )
        dt = compute_dtype(case.dtype)
        kw["initial_state"] = (S.to(dt), z.to(dt))
    return kw


PARAM_NAMES = ("q_weight", "q_bias", "k_weight", "k_bias")


def run(case: Case, kw: dict, final_state: bool = True, **extra):
    """``rk.linear_attention`` on the case's backend, returning (o, S, z), or (o,) without
    ``final_state`` (training's call: a backend may take another path, e.g. triton's
    ``parallel`` variant or its bf16 state products)."""
    out = rk.linear_attention(
        **kw, feature_map=case.fm, normalize=case.normalize, backend=case.backend,
        config=dict(case.config), output_final_state=final_state, **extra,
    )  # fmt: skip
    return (out[0], out[1].S, out[1].z) if final_state else (out,)


def kappa(case: Case, kw: dict) -> float:
    """The feature form's rounding amplification on these inputs (``reference.condition``)."""
    params = tuple(kw.get(n) for n in PARAM_NAMES)
    return reference.condition(
        kw["q"], kw["k"], kw["v"], case.attn, params, kw.get("initial_state")
    )


def oracle(case: Case, kw: dict):
    """The float64 quadratic form on the same inputs."""
    params = tuple(kw.get(n) for n in PARAM_NAMES)
    return reference.quadratic(
        kw["q"], kw["k"], kw["v"], case.attn, params, kw.get("initial_state")
    )
