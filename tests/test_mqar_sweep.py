"""The MQAR sweep: grid expansion, best-lr-per-cell selection, the written tables."""

from __future__ import annotations

import json

import pytest

from rebased_kernels.cli import main
from rebased_kernels.train.sweep import load_sweep, summarise, sweep

SPEC = """
mixer: [rebased, based]
d_model: [16]
seq_len: [32]
kv_pairs: 4
lr: [0.001, 0.01]
seed: [0, 1]
vocab: 64
"""


def test_best_lr_per_cell_and_mean_std(tmp_path) -> None:
    (tmp_path / "s.yaml").write_text(SPEC)
    # a fake trainer: rebased likes lr 0.01, based likes 0.001; seeds add 0.1
    table = {("rebased", 0.01): 0.8, ("rebased", 0.001): 0.5, ("based", 0.001): 0.6}

    def fake(point, fixed):
        assert fixed["vocab"] == 64
        return table.get((point["mixer"], point["lr"]), 0.1) + 0.1 * point["seed"]

    rows = sweep(tmp_path / "s.yaml", tmp_path / "out", run=fake, progress=False)
    by_mixer = {r["mixer"]: r for r in rows}
    assert by_mixer["rebased"]["best_lr"] == 0.01 and by_mixer["based"]["best_lr"] == 0.001
    assert by_mixer["rebased"]["mean"] == pytest.approx(0.85)
    assert by_mixer["rebased"]["std"] == pytest.approx(0.05)
    runs = (tmp_path / "out" / "runs.jsonl").read_text().splitlines()
    assert len(runs) == 2 * 2 * 2  # mixers x lrs x seeds
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["rows"] == rows
    assert (
        "| rebased | 16 | 32 | 4 | 0.01 | 0.850 +- 0.050 | 2 |"
        in (tmp_path / "out" / "results.md").read_text()
    )


def test_summarise_keeps_cells_apart() -> None:
    runs = [
        dict(mixer="rebased", d_model=d, seq_len=32, kv_pairs=4, lr=lr, seed=0, test_acc=acc)
        for d, lr, acc in [(16, 0.1, 0.2), (16, 0.2, 0.3), (32, 0.1, 0.9), (32, 0.2, 0.4)]
    ]
    best = {r["d_model"]: r["best_lr"] for r in summarise(runs)}
    assert best == {16: 0.2, 32: 0.1}


def test_bad_sweep_files_say_what_is_wrong(tmp_path) -> None:
    (tmp_path / "a.yaml").write_text(SPEC + "learning_rate: 3\n")
    with pytest.raises(ValueError, match="unknown keys"):
        load_sweep(tmp_path / "a.yaml")
    (tmp_path / "b.yaml").write_text("mixer: [rebased]\n")
    with pytest.raises(ValueError, match="give values for"):
        load_sweep(tmp_path / "b.yaml")


def test_sweep_command_trains_for_real(tmp_path, capsys) -> None:
    spec = SPEC.replace("[rebased, based]", "[rebased]").replace("[0, 1]", "[0]")
    spec += "examples: 256\ntest_examples: 64\nsteps: 10\nheads: 2\neval_every: 10\n"
    (tmp_path / "s.yaml").write_text(spec)
    assert main(["sweep", "mqar", str(tmp_path / "s.yaml"), "--out", str(tmp_path / "o")]) == 0
    assert "| rebased | 16 | 32 | 4 |" in capsys.readouterr().out
    assert len((tmp_path / "o" / "runs.jsonl").read_text().splitlines()) == 2


def test_sweep_resumes_where_a_time_limit_stopped_it(tmp_path) -> None:
    """A sweep cut by ``max_seconds`` keeps what it ran; the next call trains only the rest
    (the Table 1 grid spreads over several GPU calls this way)."""
    (tmp_path / "s.yaml").write_text(SPEC)
    trained: list[tuple] = []

    def fake(point, fixed):
        trained.append((point["mixer"], point["lr"], point["seed"]))
        return 0.5 + 0.1 * point["seed"]

    sweep(tmp_path / "s.yaml", tmp_path / "out", run=fake, progress=False, max_seconds=0.0)
    first = list(trained)
    assert len(first) == 1  # the first job always runs; none starts after the limit
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert (
        saved["missing"] == 7
        and "7 of 8 points not run yet" in (tmp_path / "out" / "results.md").read_text()
    )
    rows = sweep(tmp_path / "s.yaml", tmp_path / "out", run=fake, progress=False)
    assert len(trained) == 8 and set(trained[1:]).isdisjoint(first)  # nothing retrained
    assert len((tmp_path / "out" / "runs.jsonl").read_text().splitlines()) == 8
    assert json.loads((tmp_path / "out" / "results.json").read_text())["missing"] == 0
    assert {r["mixer"] for r in rows} == {"rebased", "based"}
    sweep(tmp_path / "s.yaml", tmp_path / "out", run=fake, progress=False, resume=False)
    assert len(trained) == 16  # --fresh retrains every point


def test_cells_in_parallel_processes_match_one_process(tmp_path) -> None:
    """``workers=2``: each cell trains in its own process, with the same accuracies as the
    cells trained in this process one after another (seeded, CPU)."""
    spec = SPEC.replace("[0, 1]", "[0]")
    spec += "examples: 128\ntest_examples: 32\nsteps: 6\nheads: 2\neval_every: 6\n"
    (tmp_path / "s.yaml").write_text(spec)
    sweep(tmp_path / "s.yaml", tmp_path / "one", progress=False)
    sweep(tmp_path / "s.yaml", tmp_path / "two", progress=False, workers=2)

    def accs(d: str) -> dict:
        lines = (tmp_path / d / "runs.jsonl").read_text().splitlines()
        return {(r["mixer"], r["lr"]): r["test_acc"] for r in map(json.loads, lines)}

    assert len(accs("two")) == 4 and accs("two") == accs("one")
    walls = (tmp_path / "two" / "walls.jsonl").read_text().splitlines()
    assert json.loads(walls[0])["workers"] == 2
    assert "of wall time" in (tmp_path / "two" / "results.md").read_text()
