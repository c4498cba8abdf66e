"""Where a triton call's time goes: host cost, device-only time, and per-kernel times.

``gpu_check --stages profile`` calls :func:`profile`: for each T it records

- ``host_ms``: Python + launch time per call, measured without synchronising (the GPU's
  queue never fills in 20 calls, so this is the host's share alone);
- ``event_ms``: the usual CUDA-event median (what a benchmark sees: max of host and device);
- ``graph_ms``: the same work replayed from a CUDA graph (device time only, no host);
- ``kernels``: the profiler's per-kernel device time per call, largest first.

If ``event_ms`` is near ``host_ms`` and far above ``graph_ms``, the call is host-bound.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from functools import partial

import torch
from torch.nn.functional import scaled_dot_product_attention as F_sdpa


def host_ms(fn: Callable[[], object], device: str, calls: int = 20) -> float:
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - t
    if device == "cuda":
        torch.cuda.synchronize()
    return elapsed / calls * 1e3


def graph_ms(fn: Callable[[], object], median: Callable) -> float:
    """Median replay time of ``fn`` captured in a CUDA graph (NaN if it cannot be captured)."""
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return median(graph.replay)
    except Exception as exc:  # a sync or a host read inside the call
        print(f"graph capture failed: {type(exc).__name__}: {exc}"[:300], flush=True)
        return float("nan")


def kernel_table(fn: Callable[[], object], device: str, calls: int = 5, top: int = 12) -> list:
    """``[(name, device us per call, launches per call)]``, largest first."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    fn()
    with torch_profile(activities=acts) as prof:
        for _ in range(calls):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
    rows = []
    for ev in prof.key_averages():
        cuda = device == "cuda"
        us = getattr(ev, "self_device_time_total", 0) if cuda else ev.self_cpu_time_total
        if us > 0:
            rows.append((ev.key[:90], round(us / calls, 2), round(ev.count / calls, 2)))
    rows.sort(key=lambda r: -r[1])
    return rows[:top]


def profile(log: dict, calls: dict[str, Callable[[], object]], T: int, device: str,
            median: Callable) -> dict:  # fmt: skip
    """One row per objective in ``calls`` (name -> closure) at sequence length T."""
    row: dict = dict(T=T)
    for name, fn in calls.items():
        row[name] = dict(host_ms=host_ms(fn, device), event_ms=median(fn))
        if device == "cuda" and not name.startswith("api"):  # the API syncs (finite check)
            row[name]["graph_ms"] = graph_ms(fn, median)
        row[name]["kernels"] = kernel_table(fn, device)
        print("profile", T, name, {k: v for k, v in row[name].items() if k != "kernels"},
              flush=True)  # fmt: skip
    log.setdefault("profile", []).append(row)
    return row


def _by_decode_bv(step: Callable, median: Callable, BVs: tuple[int, ...] = (4, 8, 16, 32)):
    """``step``'s graph replay (us) with each number of value columns per decode program
    (``backends.triton.DECODE_BV``, restored after)."""
    tri = importlib.import_module("rebased_kernels.backends.triton")

    kept, out = tri.DECODE_BV, {}
    try:
        for BV in BVs:
            tri.DECODE_BV = BV
            out[BV] = graph_ms(step, median) * 1e3
    finally:
        tri.DECODE_BV = kept
    return out


STEPS = 100
"""Decode steps one graph replays for ``graph_us_per_step``: a replay of a single short kernel
also times the replay's own launch (session 12 on an H100: 31.8 us for the triton step and
32.4 us for SDPA against a 2k cache, the same floor), which a graph of many steps spreads."""


def _repeated(fn: Callable[[], object], n: int) -> Callable[[], None]:
    """``fn`` called ``n`` times in a row (captured as one graph of ``n`` launches)."""

    def run() -> None:
        for _ in range(n):
            fn()

    return run


def decode(log: dict, device: str, median: Callable, dtype: torch.dtype,
           contexts: tuple[int, ...] = (2048, 16384, 65536)) -> dict:  # fmt: skip
    """One triton ``decode_step`` (state updated in place) at B=4, H=16, D=16, Dv=64, as
    event median, host time and CUDA-graph replay (also per ``DECODE_BV``, and per step of a
    graph of ``STEPS`` steps), next to SDPA decoding one query against KV caches of
    ``contexts`` tokens (head dim 64, graph replay of one and of ``STEPS`` steps)."""
    from rebased_kernels.backend import Inputs, get_backend
    from rebased_kernels.spec import PRESETS, LinearAttention

    B, H, D, Dv = 4, 16, 16, 64
    fm = PRESETS["rebased"]
    F = fm.num_features(D)
    be = get_backend("triton")
    attn = LinearAttention(fm, D**-0.5)
    q, k = (torch.randn(B, H, D, device=device, dtype=dtype) for _ in "qk")
    v = torch.randn(B, H, Dv, device=device, dtype=dtype)
    S = torch.randn(B, H, F, Dv, device=device).abs_()
    z = torch.rand(B, H, F, device=device) + 1.0
    g, b = torch.ones(H, D, device=device), torch.zeros(H, D, device=device)
    x = Inputs(q, k, v, g, b, g, b, S, z)

    def step():
        return be.decode_step(x, attn, (S, z))

    row: dict = dict(B=B, H=H, D=D, Dv=Dv, event_us=median(step) * 1e3,
                     host_us=host_ms(step, device) * 1e3)  # fmt: skip
    if device == "cuda":
        row["graph_us"] = graph_ms(step, median) * 1e3
        row["graph_us_by_BV"] = _by_decode_bv(step, median)
        row["graph_us_per_step"] = graph_ms(_repeated(step, STEPS), median) * 1e3 / STEPS
        sdpa, sdpa_step = {}, {}
        for n in contexts:
            qd = torch.randn(B, H, 1, Dv, device=device, dtype=dtype)
            kv = torch.randn(2, B, H, n, Dv, device=device, dtype=dtype)
            attend = partial(F_sdpa, qd, kv[0], kv[1])
            sdpa[n] = graph_ms(attend, median) * 1e3
            sdpa_step[n] = graph_ms(_repeated(attend, STEPS), median) * 1e3 / STEPS
        row["sdpa_graph_us"] = sdpa
        row["sdpa_graph_us_per_step"] = sdpa_step
    log["decode"] = row
    print("decode", row, flush=True)
    return row
