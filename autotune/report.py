"""``rebased-kernels tune``: tune every available backend over shapes, print a leaderboard,
write a JSON record and a PNG (time vs T, log-log, one line per backend and peer)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from rebased_kernels.backend import registered
from rebased_kernels.bench import chunked_flops, copy_tbps, sdpa_ms, traffic_bytes
from rebased_kernels.spec import get_feature_map

from .cache import TuneCache
from .tuner import bucket_of, candidates, tune
from .warm import warm

SLOW_COMPILE = ("torch_compile",)
"""Backends left out of a ``--quick`` tune unless named: ``torch_compile`` compiles a static
graph per shape bucket. A full GPU tune includes it: its graphs are precompiled per tuned
shape in parallel (``warm``) and a second process loads them from Inductor's on-disk cache;
on the H100 the whole cold tune of triton, fla, torch and torch_compile (12 buckets) took
157 s (``docs/results/h100-tune-s5/``)."""


def run(
    shapes: list[tuple[int, int, int, int, int]], dtypes: list[torch.dtype], device: str,
    backends: list[str] | None, quick: bool, objective: str, budget_s: float, out: Path | None,
    force: bool = False, feature_map: str = "rebased", total_s: float | None = None,
    precompile: bool = True,
) -> dict:  # fmt: skip
    """Tune each (shape, dtype); returns (and writes) the record.

    ``budget_s`` bounds one bucket's search; ``total_s`` the whole run: each bucket gets at
    most the time left divided by the buckets left (every backend's default configuration
    is timed regardless, see ``tuner.schedule``). With ``precompile``, compiling backends are
    first compiled side by side in worker processes (``warm``) when a bucket needs tuning."""
    fm = get_feature_map(feature_map)
    if backends is None and quick:
        backends = [n for n in registered() if n not in SLOW_COMPILE]
        print(f"leaving out {', '.join(SLOW_COMPILE)} (slow to compile; name it with "
              f"--backends to tune it)")  # fmt: skip
    start = time.perf_counter()
    ceiling = copy_tbps(device)
    cache = TuneCache(torch.device(device).type)
    rows = []
    buckets = [(dtype, shape) for dtype in dtypes for shape in shapes]
    warmed = None
    todo = [
        b for b in buckets if force or bucket_of(b[1], b[0], device, fm)[2] not in cache.entries()
    ]
    if precompile and torch.device(device).type == "cuda" and todo:
        warmed = warm(backends, sorted({b[0] for b in todo}, key=str), sorted({b[1] for b in todo}),
                      device)  # fmt: skip
        print(f"precompiled {warmed['jobs']} configurations in {warmed['seconds']:.0f} s "
              f"({warmed['workers']} processes)")  # fmt: skip
    for n, (dtype, (B, T, H, D, Dv)) in enumerate(buckets):
        budget = budget_s
        if total_s is not None:
            left = total_s - (time.perf_counter() - start)
            budget = max(0.0, min(budget_s, left / (len(buckets) - n)))
        res = tune(
            B, T, H, D, Dv, dtype, device, fm, backends=backends, quick=quick,
            objective=objective, budget_s=budget, cache=cache, force=force,
        )  # fmt: skip
        rows += _rows(res, (B, T, H, D, Dv), dtype, device, fm, objective, ceiling, cache)
    record = dict(device=cache.fingerprint, copy_TBps=ceiling, objective=objective,
                  seconds=time.perf_counter() - start, rows=rows,
                  candidates=sorted({r["backend"] for r in rows}), precompile=warmed)  # fmt: skip
    print_leaderboard(record)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "tune.json").write_text(json.dumps(record, indent=1, default=str))
        plot(record, out / "tune.png")
        print(f"wrote {out / 'tune.json'} and {out / 'tune.png'}")
    return record


def _rows(res, shape, dtype, device, fm, objective, ceiling, cache) -> list[dict]:
    """Leaderboard rows of one tuned bucket: each backend's best time, rates, and peers."""
    B, T, H, D, Dv = shape
    rows = []
    per_backend: dict[str, float] = {}
    for r in res.rows:
        if "ms" in r:
            per_backend[r["backend"]] = min(per_backend.get(r["backend"], 1e30), r["ms"])
    passes = 3.0 if objective == "forward_backward" else 1.0
    byte_count = traffic_bytes(B, T, H, D, Dv, dtype, objective)
    flops = chunked_flops(B, T, H, D, Dv, fm.num_features(D), 64) * passes
    peer = (res.best or {}).get("sdpa_ms")
    if peer is None:  # measured once per bucket, kept with the tuned record
        peer = sdpa_ms(B, T, H, Dv, dtype, device, objective)
        if res.best is not None:
            res.best = {**res.best, "sdpa_ms": peer}
            cache.put(res.key, res.best)
    for name, ms in sorted(per_backend.items(), key=lambda kv: kv[1]):
        rows.append(dict(
            B=B, T=T, H=H, D=D, Dv=Dv, dtype=str(dtype)[6:], backend=name, ms=ms,
            best=res.best is not None and res.best["backend"] == name,
            config=next(r["config"] for r in res.rows if r.get("ms") == ms),
            GBps=byte_count / ms / 1e6, TFLOPs=flops / ms / 1e9,
            x_floor=ms / (byte_count / (ceiling * 1e9)), sdpa_ms=peer, x_sdpa=peer / ms,
            x_fla=per_backend["fla"] / ms if "fla" in per_backend else None,
            cached=res.cached, skipped=sum("skipped" in r for r in res.rows),
        ))  # fmt: skip
    return rows


def print_leaderboard(record: dict) -> None:
    print(f"{record['objective']} on {record['device'].get('name')}  "
          f"(copy {record['copy_TBps']:.3g} TB/s, {record['seconds']:.1f} s)")  # fmt: skip
    print(f"{'T':>6} {'dtype':>8} {'backend':<14} {'ms':>9} {'GB/s':>8} {'TFLOP/s':>8} "
          f"{'x floor':>8} {'vs SDPA':>8} {'vs fla':>7}  config")  # fmt: skip
    for r in record["rows"]:
        mark = "*" if r["best"] else " "
        print(f"{r['T']:>6} {r['dtype']:>8} {r['backend']:<13}{mark} {r['ms']:>9.3f} "
              f"{r['GBps']:>8.1f} {r['TFLOPs']:>8.3f} {r['x_floor']:>8.1f} "
              f"{r['x_sdpa']:>7.2f}x {_x(r.get('x_fla'))}  {r['config']}")  # fmt: skip


def _x(ratio: float | None) -> str:
    return f"{ratio:>6.2f}x" if ratio is not None else f"{'-':>7}"


def plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for dtype in sorted({r["dtype"] for r in record["rows"]}):
        rows = [r for r in record["rows"] if r["dtype"] == dtype]
        for name in sorted({r["backend"] for r in rows}):
            pts = sorted((r["T"], r["ms"]) for r in rows if r["backend"] == name)
            ax.plot(*zip(*pts), marker="o", label=f"{name} ({dtype})")
        sd = sorted({(r["T"], r["sdpa_ms"]) for r in rows})
        ax.plot(*zip(*sd), "k--", marker="x", label=f"SDPA ({dtype})")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("T")
    ax.set_ylabel(f"{record['objective']} time (ms)")
    ax.set_title(f"rebased-kernels tune: {record['device'].get('name')}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


__all__ = ["candidates", "run"]
