"""A grid of MQAR runs, the paper's way: best learning rate per cell, mean +- std over seeds.

A sweep file (YAML) lists values for ``mixer``, ``d_model``, ``seq_len``, ``kv_pairs``, ``lr``
and ``seed`` and fixes the rest (``vocab``, ``examples``, ``test_examples``, ``steps``,
``batch_size``, ``heads``, ``backend``, ``eval_every``)::

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
that mean +- the standard deviation over seeds.
"""

from __future__ import annotations

import itertools
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

GRID_KEYS = ("mixer", "d_model", "seq_len", "kv_pairs", "lr", "seed")
FIXED_DEFAULTS = dict(
    vocab=8192, examples=100_000, test_examples=3000, steps=None, epochs=1, batch_size=64,
    heads=12, backend="auto", eval_every=100, device=None,
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


def run_one(point: dict, fixed: dict) -> float:
    """Train one grid point; returns its final test accuracy."""
    import torch

    from .loop import TrainConfig, train
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
    cfg = TrainConfig(
        model=model, data=data, test_examples=fixed["test_examples"], lr=point["lr"],
        batch_size=fixed["batch_size"], epochs=fixed["epochs"], max_steps=fixed["steps"],
        seed=point["seed"], eval_every=fixed["eval_every"], device=device,
    )  # fmt: skip
    return float(train(cfg, progress=False)["test_acc"])


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


def sweep(
    path: str | Path,
    out_dir: str | Path,
    run: Callable[[dict, dict], float] = run_one,
    progress: bool = True,
) -> list[dict]:
    """Run every grid point of the sweep file; write runs.jsonl, results.json, results.md."""
    from tqdm import tqdm

    spec = load_sweep(path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    points = [dict(zip(GRID_KEYS, v)) for v in itertools.product(*spec["grid"].values())]
    runs = []
    with open(out / "runs.jsonl", "w") as log:
        for point in tqdm(points, desc="sweep", disable=not progress):
            start = time.perf_counter()
            acc = run(point, spec["fixed"])
            record = {**point, "test_acc": acc, "seconds": time.perf_counter() - start}
            runs.append(record)
            log.write(json.dumps(record) + "\n")
            log.flush()
    rows = summarise(runs)
    total = sum(r["seconds"] for r in runs)
    (out / "results.json").write_text(
        json.dumps(dict(rows=rows, fixed=spec["fixed"], total_seconds=total), indent=2)
    )
    (out / "results.md").write_text(markdown(rows) + f"\nTotal training time: {total:.0f} s\n")
    return rows
