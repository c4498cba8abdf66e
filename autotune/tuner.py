"""Search every backend's tuning space for one problem bucket; keep the fastest.

Each (backend, configuration) is first checked on a small problem against the float64
oracle (a configuration that computes the wrong function is dropped), then timed on the
bucket's shape: CUDA events on a GPU, a monotonic clock on CPU, median after warm-up, inputs
rotated over three sets. A time budget bounds the search; a progress bar shows it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from rebased_kernels import reference
from rebased_kernels._validate import PARAM_NAMES
from rebased_kernels.backend import Inputs, Outputs, Problem, registered
from rebased_kernels.bench import budget_ms, median_ms
from rebased_kernels.spec import LinearAttention, get_feature_map
from rebased_kernels.testing import feature_form_tolerance, random_inputs, rel_err

from .cache import TuneCache
from .keys import bucket_key

OBJECTIVES = ("forward", "forward_backward")


@dataclass
class TuneResult:
    key: str
    best: dict | None
    rows: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    cached: bool = False


def candidates(problem: Problem, names: list[str] | None = None) -> list:
    """Available backends (not the oracle) that can run ``problem``, in registry order."""
    out = []
    for name, be in sorted(registered().items()):
        if name == "reference" or (names is not None and name not in names):
            continue
        if be.unavailable_reason() is None and be.unsupported_reason(problem) is None:
            out.append(be)
    return out


def bucket_of(shape: tuple, dtype: torch.dtype, device: str, fm, normalize: bool = True):
    """``(attention, problem, cache key)`` of a ``(B, T, H, D, Dv)`` problem."""
    B, T, H, D, Dv = shape
    attn = LinearAttention(fm, D**-0.5, normalize)
    problem = Problem(attn, D, Dv, dtype, torch.device(device).type)
    return attn, problem, bucket_key(problem, T, B * H)


def random_grads(out: Outputs, state: bool = False) -> Outputs:
    """Random cotangents of a forward's outputs: of o only, as in training (no final state
    is returned there), or of the final state too with ``state`` (a backend may take a
    slower, more exact path for those: triton's ``X3``)."""
    if state:
        return Outputs(*(torch.randn_like(t) for t in out))
    return Outputs(torch.randn_like(out.o), None, None)


def _inputs(B, T, H, D, Dv, dtype, device, fm, seed) -> tuple[Inputs, dict]:
    x = random_inputs(B, T, H, D, Dv, dtype, device, fm, seed=seed, requires_grad=False)
    return Inputs(x["q"], x["k"], x["v"], *(x.get(n) for n in PARAM_NAMES)), x


def check_config(be, attn: LinearAttention, D: int, Dv: int, dtype, device, config) -> float:
    """Relative error of o against the oracle on a small problem, in units of the tolerance."""
    inp, x = _inputs(1, 67, 2, D, Dv, dtype, device, attn.feature_map, seed=12345)
    o = be.forward(inp, attn, config, None).o
    x64 = {n: t.double() for n, t in x.items()}
    params = tuple(x64.get(n) for n in PARAM_NAMES)
    ref = reference.quadratic(x64["q"], x64["k"], x64["v"], attn, params)[0]
    kappa = reference.condition(x64["q"], x64["k"], x64["v"], attn, params)
    return rel_err(o, ref) / feature_form_tolerance(dtype, kappa)


def tune(
    B: int, T: int, H: int, D: int, Dv: int, dtype: torch.dtype, device: str,
    feature_map="rebased", normalize: bool = True, backends: list[str] | None = None,
    objective: str = "forward_backward", budget_s: float = 60.0, quick: bool = False,
    cache: TuneCache | None = None, force: bool = False, progress: bool = True,
) -> TuneResult:  # fmt: skip
    """Tune one bucket and store the winner in the cache (reused unless ``force``)."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, not {objective!r}")
    fm = get_feature_map(feature_map)
    attn, problem, key = bucket_of((B, T, H, D, Dv), dtype, device, fm, normalize)
    cache = cache or TuneCache(problem.device_type)
    hit = cache.get(key)
    if hit is not None and not force and (backends is None or hit["backend"] in backends):
        return TuneResult(key, hit, hit.get("rows", []), 0.0, cached=True)
    start = time.perf_counter()
    sets = [_inputs(B, T, H, D, Dv, dtype, device, fm, seed=s)[0] for s in range(3)]
    names = candidates(problem, backends)
    jobs = schedule(names, quick)
    rows: list[dict] = []
    bar = tqdm(jobs, desc=f"tune T={T} {str(dtype)[6:]}", disable=not progress, leave=False)
    for n, (be, config) in enumerate(bar):
        row: dict[str, Any] = dict(backend=be.name, config=config)
        rows.append(row)
        # the first round (every backend's default) always runs: each backend gets a time
        if n >= len(names):
            why = _not_searched(be, rows[: len(names)], budget_s - (time.perf_counter() - start))
            if why:
                row["skipped"] = why
                continue
        t_row = time.perf_counter()
        try:
            err = check_config(be, attn, D, Dv, dtype, device, config)
            if not err <= 1.0:
                row["rejected"] = f"error {err:.1f}x the tolerance against the oracle"
                continue
            row["ms"] = _time(be, attn, config, sets, objective, device)
        except Exception as exc:  # a configuration that does not compile or run here
            row["error"] = f"{type(exc).__name__}: {exc}"[:200]
        row["seconds"] = time.perf_counter() - t_row  # check + timing (+ a first compile)
        bar.set_postfix_str(f"{be.name} {row.get('ms', float('nan')):.3g} ms")
    timed = [r for r in rows if "ms" in r]
    best = min(timed, key=lambda r: r["ms"]) if timed else None
    seconds = time.perf_counter() - start
    if best is not None:
        record = dict(backend=best["backend"], config=best["config"], ms=best["ms"],
                      objective=objective, shape=[B, T, H, D, Dv], rows=rows,
                      tuned_at=time.time(), seconds=seconds)  # fmt: skip
        cache.put(key, record)
        best = record
    return TuneResult(key, best, rows, seconds)


PRUNE = 1.5
"""A backend whose default configuration is this much slower than the best default is not
searched further: on the H100 triton's chunk and segment lengths spanned at most 1.45x
(forward, T = 16384; 1.26x forward+backward; ``docs/results/h100-check-s5/``)."""
STATIC_COMPILE_S = 60.0
"""A budget below which a per-shape compiling backend's other configurations are not tried:
each compiles a static graph for the shape (``torch_compile``: ~30-60 s on the H100)."""


def _not_searched(be, defaults: list[dict], left_s: float) -> str | None:
    """Why a non-default configuration of ``be`` is skipped (None: time it)."""
    if left_s <= 0:
        return "time budget"
    timed = {r["backend"]: r["ms"] for r in defaults if "ms" in r}
    mine = timed.get(be.name)
    if mine is None:
        return "its default did not run"
    if mine > PRUNE * min(timed.values()):
        return f"its default is {mine / min(timed.values()):.1f}x the best default"
    if be.compiles_per_shape and left_s < STATIC_COMPILE_S:
        return "a static compile per configuration does not fit the budget left"
    return None


def _configs(be, quick: bool) -> list[dict]:
    """The backend's default configuration first, then the rest of its space (two with
    ``quick``)."""
    default = dict(be.default_config)  # may name settings outside the searched space
    rest = [c for c in (be.configs() or [{}]) if {**default, **c} != default]
    return [default, *(rest[:2] if quick else rest)]


def schedule(backends: list, quick: bool) -> list[tuple[Any, dict]]:
    """Jobs in round-robin order: every backend's default first, then one more configuration
    of each in turn, so a time budget cuts configurations, never a whole backend (backends
    that compile go last in each round)."""
    order = sorted(backends, key=lambda b: b.compiles)
    lists = [_configs(be, quick) for be in order]
    jobs = []
    for i in range(max((len(c) for c in lists), default=0)):
        jobs += [(be, cfgs[i]) for be, cfgs in zip(order, lists) if i < len(cfgs)]
    return jobs


def _time(be, attn, config, sets, objective: str, device: str) -> float:
    """Median ms of one call, rotating over the input sets: training's call (no final state)
    for ``forward_backward``, a prefill's (with it) for ``forward``."""
    state = {"i": 0}
    final = objective == "forward"
    grads = []
    for x in sets:
        grads.append(random_grads(be.forward(x, attn, config, None, final)))

    def call():
        i = state["i"] = (state["i"] + 1) % len(sets)
        out = be.forward(sets[i], attn, config, None, final)
        if objective == "forward_backward":
            be.backward(sets[i], attn, config, None, grads[i])
        return out

    dev = torch.device(device).type
    if dev == "cpu":
        return median_ms(call, dev, warmup=2, repeats=5)
    # fewer repeats for a slow call: a peer's 200 ms call timed 22 times took 5 s of a
    # bucket's budget
    call()
    return budget_ms(call, dev, 250.0, 5, 20)
