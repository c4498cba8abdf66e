"""A grid of MQAR runs, the paper's way: best learning rate per cell, mean +- std over seeds.

A sweep file (YAML) lists values for ``mixer``, ``d_model``, ``seq_len``, ``kv_pairs``, ``lr``
and ``seed`` and fixes the rest (``vocab``, ``examples``, ``test_examples``, ``steps``,
``batch_size``, ``heads``, ``backend``, ``eval_every``, ``ensemble``)::

    mixer: [rebased, based]
    d_model: [16, 24, 32, 48]
    seq_len: [256]
    kv_pairs: [32]
    lr: [1.0e-3, 3.0e-3, 1.0e-2]
    seed: [0, 1, 2]
    vocab: 8192
    steps: 2000

A cell is (mixer, d_model, seq_len, kv_pairs). For each cell the learning rate with the best
mean test accuracy over seeds is kept (as in the paper's appendix A), and the table reports
that mean +- the standard deviation over seeds. With ``ensemble: true`` (the default) a
cell's runs train side by side in one process (``ensemble.train_ensemble``): same results as
separate runs, a fraction of the GPU time for the paper's small models.
"""

from __future__ import annotations

import itertools
import json
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

GRID_KEYS = ("mixer", "d_model", "seq_len", "kv_pairs", "lr", "seed")
FIXED_DEFAULTS = dict(
    vocab=8192, examples=100_000, test_examples=3000, steps=None, epochs=1, batch_size=64,
    heads=12, backend="auto", eval_every=100, device=None, ensemble=True,
)  # fmt: skip


def load_sweep(path: str | Path) -> dict:
    """Read and validate a sweep file; every grid key becomes a list."""
    import yaml

    spec = yaml.safe_load(Path(path).read_text()) or {}
    unknown = set(spec) - set(GRID_KEYS) - set(FIXED_DEFAULTS)
    if unknown:
        raise ValueError(
            f"{path}: unknown keys {sorted(unknown)}; grid keys are {list(GRID_KEYS)}, "
            f"fixed keys {sorted(FIXED_DEFAULTS)}"
        )
    missing = [k for k in GRID_KEYS if k not in spec]
    if missing:
        raise ValueError(f"{path}: give values for {missing}")
    grid = {k: spec[k] if isinstance(spec[k], list) else [spec[k]] for k in GRID_KEYS}
    fixed = {k: spec.get(k, v) for k, v in FIXED_DEFAULTS.items()}
    return dict(grid=grid, fixed=fixed)


def _train_config(point: dict, fixed: dict):
    """The ``TrainConfig`` of one grid point."""
    import torch

    from .loop import TrainConfig
    from .model import ModelConfig
    from .mqar import MQARConfig

    data = MQARConfig(
        vocab_size=fixed["vocab"], seq_len=point["seq_len"], num_kv_pairs=point["kv_pairs"],
        num_examples=fixed["examples"],
    )  # fmt: skip
    model = ModelConfig(
        vocab_size=fixed["vocab"], d_model=point["d_model"], seq_len=point["seq_len"],
        mixer=point["mixer"], num_heads=fixed["heads"], backend=fixed["backend"],
    )  # fmt: skip
    device = fixed["device"] or ("cuda" if torch.cuda.is_available() else "cpu")
    return TrainConfig(
        model=model, data=data, test_examples=fixed["test_examples"], lr=point["lr"],
        batch_size=fixed["batch_size"], epochs=fixed["epochs"], max_steps=fixed["steps"],
        seed=point["seed"], eval_every=fixed["eval_every"], device=device,
    )  # fmt: skip


def run_one(point: dict, fixed: dict) -> float:
    """Train one grid point; returns its final test accuracy."""
    from .loop import train

    return float(train(_train_config(point, fixed), progress=False)["test_acc"])


def run_cell(points: list[dict], fixed: dict) -> list[float]:
    """Train a cell's points (its lrs x seeds) side by side (``ensemble``); accuracies."""
    from .ensemble import train_ensemble

    runs = train_ensemble([_train_config(p, fixed) for p in points], progress=False)
    return [float(r["test_acc"]) for r in runs]


def _cell_in_process(points: list[dict], fixed: dict) -> list[float]:
    """``run_cell`` in a fresh Python process (``sweep``'s ``workers``): its accuracies."""
    import subprocess
    import sys

    code = (
        "import json, sys; from rebased_kernels.train.sweep import run_cell; "
        "print(json.dumps(run_cell(json.loads(sys.argv[1]), json.loads(sys.argv[2]))))"
    )
    p = subprocess.run([sys.executable, "-c", code, json.dumps(points), json.dumps(fixed)],
                       capture_output=True, text=True)  # fmt: skip
    if p.returncode != 0:
        raise RuntimeError(f"cell {points[0]} failed:\n{p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def summarise(runs: list[dict]) -> list[dict]:
    """Per cell: the lr with the best mean accuracy over seeds, with its mean and std."""
    cells: dict[tuple, dict[float, list[float]]] = {}
    for r in runs:
        key = (r["mixer"], r["d_model"], r["seq_len"], r["kv_pairs"])
        cells.setdefault(key, {}).setdefault(r["lr"], []).append(r["test_acc"])
    rows = []
    for (mixer, d_model, seq_len, kv), by_lr in cells.items():
        best_lr = max(by_lr, key=lambda lr: statistics.fmean(by_lr[lr]))
        accs = by_lr[best_lr]
        rows.append(
            dict(mixer=mixer, d_model=d_model, seq_len=seq_len, kv_pairs=kv, best_lr=best_lr,
                 mean=statistics.fmean(accs), std=statistics.pstdev(accs), seeds=len(accs))
        )  # fmt: skip
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| mixer | d_model | seq_len | kv_pairs | best lr | test accuracy (mean +- std) | seeds |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['mixer']} | {r['d_model']} | {r['seq_len']} | {r['kv_pairs']} | "
            f"{r['best_lr']:g} | {r['mean']:.3f} +- {r['std']:.3f} | {r['seeds']} |"
        )
    return "\n".join(lines) + "\n"


def _key(point: dict) -> tuple:
    return tuple(point[k] for k in GRID_KEYS)


def sweep(
    path: str | Path,
    out_dir: str | Path,
    run: Callable[[dict, dict], float] | None = None,
    progress: bool = True,
    resume: bool = True,
    max_seconds: float | None = None,
    workers: int = 1,
) -> list[dict]:
    """Run every grid point of the sweep file; write runs.jsonl, results.json, results.md.

    ``run(point, fixed) -> accuracy`` trains one point; by default (``ensemble: true`` in the
    file, the default) each cell's points train together (``run_cell``), else one by one.
    With ``resume`` the points already in ``out_dir/runs.jsonl`` are kept and not trained
    again; with ``max_seconds`` no job after the first starts after that much time (a sweep
    spread over several GPU calls). ``workers > 1`` trains that many cells at once, each in
    its own process (the paper's small models leave a GPU idle between kernel launches; this
    process alone writes the log). The tables cover the points done so far; ``walls.jsonl``
    keeps each invocation's wall time (the GPU time of a parallel sweep)."""
    from tqdm import tqdm

    spec = load_sweep(path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    points = [dict(zip(GRID_KEYS, v)) for v in itertools.product(*spec["grid"].values())]
    fixed = spec["fixed"]
    log_path = out / "runs.jsonl"
    if not resume:
        (out / "walls.jsonl").unlink(missing_ok=True)
    runs = []
    if resume and log_path.exists():
        wanted = {_key(p) for p in points}
        runs = [r for r in map(json.loads, log_path.read_text().splitlines())
                if _key(r) in wanted]  # fmt: skip
    done = {_key(r) for r in runs}
    todo = [p for p in points if _key(p) not in done]
    if run is None and fixed["ensemble"]:  # one job per cell: its lrs x seeds together
        cells: dict[tuple, list[dict]] = {}
        for p in todo:
            cells.setdefault(tuple(p[k] for k in GRID_KEYS[:4]), []).append(p)
        cell = run_cell if workers <= 1 else _cell_in_process
        jobs = [(ps, lambda ps=ps: cell(ps, fixed)) for ps in cells.values()]
    else:
        one = run or run_one
        jobs = [([p], lambda p=p: [one(p, fixed)]) for p in todo]
    t0 = time.perf_counter()

    def timed(i: int, job: Callable[[], list[float]]) -> tuple[list[float], float] | None:
        if (
            i >= max(1, workers)
            and max_seconds is not None
            and (time.perf_counter() - t0 > max_seconds)
        ):
            return None  # (a call always runs its first jobs: it makes progress)
        start = time.perf_counter()
        return job(), time.perf_counter() - start

    with open(log_path, "w") as log, ThreadPoolExecutor(max(1, workers)) as pool:
        for record in runs:
            log.write(json.dumps(record) + "\n")
        log.flush()
        futures = {pool.submit(timed, i, job): ps for i, (ps, job) in enumerate(jobs)}
        for future in tqdm(as_completed(futures), total=len(jobs), desc="sweep",
                           disable=not progress):  # fmt: skip
            result, job_points = future.result(), futures[future]
            if result is None:
                continue
            accs, seconds = result
            for point, acc in zip(job_points, accs):  # a job's time, its points' share each
                record = {**point, "test_acc": acc, "seconds": seconds / len(job_points)}
                runs.append(record)
                log.write(json.dumps(record) + "\n")
            log.flush()
    with open(out / "walls.jsonl", "a") as f:
        f.write(json.dumps(dict(seconds=time.perf_counter() - t0, workers=workers)) + "\n")
    rows = summarise(runs)
    total = sum(r["seconds"] for r in runs)
    wall = sum(json.loads(line)["seconds"] for line in open(out / "walls.jsonl"))
    missing = len(points) - len(runs)
    (out / "results.json").write_text(json.dumps(
        dict(rows=rows, fixed=spec["fixed"], total_seconds=total, wall_seconds=wall,
             points=len(points), missing=missing), indent=2))  # fmt: skip
    note = f", {missing} of {len(points)} points not run yet" if missing else ""
    footer = (f"\nTraining time: {total:.0f} s summed over cells; {wall:.0f} s of wall time "
              f"(the GPU time) over this folder's sweep calls{note}\n")  # fmt: skip
    (out / "results.md").write_text(markdown(rows) + footer)
    return rows
