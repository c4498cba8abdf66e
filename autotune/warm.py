"""Compile ahead, in parallel: one process per (compiling backend, dtype, configuration).

A cold tune spends most of its time compiling (Triton kernels, ``torch.compile`` graphs),
one configuration after another. The compilers keep their results on disk (Triton's cache,
Inductor's FX-graph cache), so processes that each run one small forward+backward fill
those caches side by side, and the tune that follows loads instead of compiling.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from rebased_kernels.backend import registered
from rebased_kernels.spec import get_feature_map

from .tuner import _inputs, bucket_of, candidates, random_grads


def jobs(names: list[str] | None, dtypes: list[torch.dtype], shapes: list[tuple],
         device: str, feature_map: str = "rebased") -> list[tuple]:  # fmt: skip
    """``(backend, dtype, config, D, Dv, shape)`` of every compile the tuner would trigger:
    each configuration of a compiling backend per (dtype, D, Dv) (``shape`` None: one small
    call compiles it for every length), and for a backend that compiles per shape
    (``compiles_per_shape``: ``torch_compile``'s static graphs) its default configuration at
    each tuned ``(B, T, H)``, the configuration the tuner times first."""
    fm = get_feature_map(feature_map)
    out = []
    for dtype in dtypes:
        for D, Dv in sorted({(s[3], s[4]) for s in shapes}):
            problem = bucket_of((1, 1, 1, D, Dv), dtype, device, fm)[1]
            for be in candidates(problem, names):
                if not be.compiles:
                    continue
                if be.compiles_per_shape:
                    out += [(be.name, str(dtype)[6:], {}, D, Dv, list(s[:3])) for s in shapes
                            if (s[3], s[4]) == (D, Dv)]  # fmt: skip
                else:
                    out += [(be.name, str(dtype)[6:], c, D, Dv, None) for c in _compiles(be)]
    return out


def _compiles(be) -> list[dict]:
    """One configuration per distinct compile (run-time tunables do not recompile)."""
    seen, out = set(), []
    for c in be.configs() or [{}]:
        key = tuple(sorted((k, v) for k, v in c.items() if k not in be.runtime_tunables))
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out


def warm(names: list[str] | None, dtypes: list[torch.dtype], shapes: list[tuple],
         device: str, workers: int | None = None) -> dict:  # fmt: skip
    """Run every job of ``jobs`` in its own process, ``workers`` at a time; wall seconds and
    the failures (a configuration that fails here is the tuner's to report, not ours)."""
    # the per-shape compiles (torch.compile graphs) are the longest: first, so none is last
    todo = sorted(jobs(names, dtypes, shapes, device), key=lambda j: j[5] is None)
    workers = workers or max(1, min(len(todo), (os.cpu_count() or 2) - 1))
    start = time.perf_counter()
    # the jobs already fill the cores: one Inductor compile thread each, not a pool per job
    # (compile_threads is not part of Inductor's cache key)
    env = {"TORCHINDUCTOR_COMPILE_THREADS": "1", **os.environ}

    def run(job) -> str | None:
        code = f"from rebased_kernels.autotune.warm import one; one(*{job!r})"
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
        return None if p.returncode == 0 else f"{job}: {p.stderr.strip()[-300:]}"

    with ThreadPoolExecutor(workers) as pool:
        failed = [f for f in pool.map(run, todo) if f]
    return dict(jobs=len(todo), workers=workers, seconds=time.perf_counter() - start,
                failed=failed)  # fmt: skip


def one(name: str, dtype: str, config: dict, D: int, Dv: int, shape: list | None = None) -> None:
    """One forward + backward: what compiles for this (backend, dtype, configuration), at
    ``shape = (B, T, H)`` for a backend that compiles per shape, else a small one."""
    be = registered()[name]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    fm = get_feature_map("rebased")
    # B, H > 1: size-1 dims are specialised by torch.compile, the tune's shapes are not
    B, T, H = shape or (2, 256, 2)
    inp, _ = _inputs(B, T, H, D, Dv, getattr(torch, dtype), device, fm, seed=0)
    attn = bucket_of((B, T, H, D, Dv), inp.q.dtype, device, fm)[0]
    config = {**be.default_config, **config}
    be.backward(inp, attn, config, None, random_grads(be.forward(inp, attn, config, None)))
