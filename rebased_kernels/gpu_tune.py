"""``gpu_check``'s tuning stages: ``tune`` (the CLI twice: cold, then from the cache),
``auto`` (``backend="auto"`` against the tuned winner named explicitly) and ``asv`` (the asv
suite with results under a given commit hash).

Each runs on the machine it is given (CUDA in the GPU call; ``--dry-run`` exercises the
code on the CPU with small shapes) and adds its numbers to the run's log.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

import rebased_kernels as rk
from rebased_kernels.bench import interleaved_ms
from rebased_kernels.testing import random_inputs

ROOT = Path(__file__).resolve().parents[1]  # the checkout (an editable install)
CLI = [sys.executable, "-c", "import sys; from rebased_kernels.cli import main; sys.exit(main())"]


def _cli(args: list[str], env: dict) -> float:
    """Run ``rebased-kernels ARGS``; its wall time in s (the output goes to this log)."""
    t0 = time.perf_counter()
    subprocess.run([*CLI, *args], env=env, check=True)
    return time.perf_counter() - t0


def tune(log: dict, out: str, shapes: str | None, dtypes: str | None, device: str,
         backends: str | None = None, total_s: float | None = None) -> Path:  # fmt: skip
    """``rebased-kernels tune`` into a fresh cache, then again (every bucket cached)."""
    env = dict(os.environ, REBASED_KERNELS_CACHE_DIR=f"{out}/tune-cache")
    args = ["tune", "--device", device] + (["--shapes", shapes] if shapes else [])
    args += ["--dtype", dtypes] if dtypes else []
    args += ["--backends", backends] if backends else []
    args += ["--total-budget", str(total_s)] if total_s else []
    first = _cli([*args, "--out", f"{out}/tune"], env)
    second = _cli([*args, "--out", f"{out}/tune-cached"], env)
    if second > 5.0:  # where a slow cached run's time goes: Python's own import timer
        with open(f"{out}/importtime.txt", "w") as f:
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-X", "importtime", *CLI[1:], *args, "--out",
                            f"{out}/tune-cached-3"], env=env, check=True, stderr=f)  # fmt: skip
            log["tune_third_wall_s"] = time.perf_counter() - t0
    records = [
        json.loads(Path(f"{out}/{d}/tune.json").read_text()) for d in ("tune", "tune-cached")
    ]
    log["tune"] = dict(
        first_wall_s=first, first_tuning_s=records[0]["seconds"],
        second_wall_s=second, second_tuning_s=records[1]["seconds"],
        all_cached_second=all(r["cached"] for r in records[1]["rows"]),
        candidates=records[0]["candidates"],
    )  # fmt: skip
    print("tune:", log["tune"], flush=True)
    return Path(f"{out}/tune/tune.json")


def auto(log: dict, out: str, record_path: Path, device: str) -> None:
    """Per tuned bucket: forward+backward through the public API with ``backend="auto"`` vs
    the winner named with its configuration, timed call by call in turn (medians)."""
    os.environ["REBASED_KERNELS_CACHE_DIR"] = f"{out}/tune-cache"
    from rebased_kernels import autotune

    autotune._CACHES.clear()
    record = json.loads(record_path.read_text())
    rows = []
    for r in (r for r in record["rows"] if r["best"]):
        dt = getattr(torch, r["dtype"])
        x = random_inputs(r["B"], r["T"], r["H"], r["D"], r["Dv"], dt, device, "rebased")
        why = rk.explain(x["q"], x["k"], x["v"])
        g = torch.randn(r["B"], r["T"], r["H"], r["Dv"], dtype=dt, device=device)

        named = dict(backend=r["backend"], config=r["config"])
        t_auto, t_named = interleaved_ms([_call(x, g, dict(backend="auto")), _call(x, g, named)],
                                         device, 3, 100 if r["T"] <= 4096 else 30)  # fmt: skip
        rows.append(dict(T=r["T"], dtype=r["dtype"], best=r["backend"], config=r["config"],
                         auto_uses=why.backend, auto_config=why.config, auto_ms=t_auto,
                         named_ms=t_named, ratio=t_auto / t_named))  # fmt: skip
        print("auto:", rows[-1], flush=True)
    log["auto"] = rows
    log["auto_worst_ratio"] = max((r["ratio"] for r in rows), default=None)


def _call(x: dict, g: torch.Tensor, kw: dict):
    """One public forward+backward with the keyword arguments ``kw`` (no finite check: its
    sync per call made short-T timings swing by 10% between identical calls)."""
    return lambda: rk.linear_attention(**x, **kw, check_finite=False).backward(g)


def asv(log: dict, out: str, machine: str, backends: str, bench: str) -> None:
    """The asv suite in this environment, results saved under the bundled commit's hash.

    The device copy of the checkout has no ``.git``: ``.asvgit/repo.bundle`` (``git bundle
    create .asvgit/repo.bundle HEAD main``, carried) gives asv the commit to file results under."""
    repo = Path("/tmp/rk-asv-repo")
    if repo.exists():  # an earlier run's clone would file results under its own commit
        shutil.rmtree(repo)
    bundle = str(ROOT / ".asvgit/repo.bundle")
    subprocess.run(["git", "clone", "-q", "-b", "main", bundle, str(repo)], check=True)
    commit = subprocess.check_output(["git", "-C", str(repo), "rev-parse", "HEAD"], text=True)
    conf = json.loads((ROOT / "asv_bench/asv.conf.json").read_text())
    conf.update(repo=str(repo), benchmark_dir=str(ROOT / "asv_bench/benchmarks"),
                results_dir=f"{out}/asv-results", html_dir=f"{out}/asv-html")  # fmt: skip
    path = Path(out) / "asv.conf.json"
    path.write_text(json.dumps(conf))
    # asv drops PYTHONPATH from the benchmark processes unless it comes as ASV_PYTHONPATH:
    # without it the peers installed beside the image (fla) vanished from the registry there
    env = dict(os.environ, REBASED_KERNELS_ASV_BACKENDS=backends,
               ASV_PYTHONPATH=os.environ.get("PYTHONPATH", ""))  # fmt: skip
    asv_cmd = [sys.executable, "-m", "asv"]
    subprocess.run([*asv_cmd, "machine", "--config", str(path), "--machine", machine, "--yes"],
                   env=env, check=True)  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.run(
        [*asv_cmd, "run", "--config", str(path), "-E", f"existing:{sys.executable}",
         "--set-commit-hash", commit.strip(), "--machine", machine, "--bench", bench,
         "--show-stderr", "-a", "rounds=1"],
        env=env,
    )  # fmt: skip
    log["asv"] = dict(commit=commit.strip(), machine=machine, backends=backends, bench=bench,
                      rc=proc.returncode, seconds=time.perf_counter() - t0)  # fmt: skip
    # one file back from the device (its nested result folders did not come back)
    subprocess.run(["tar", "czf", f"{out}/asv-results.tgz", "-C", out, "asv-results"], check=True)
    print("asv:", log["asv"], flush=True)
