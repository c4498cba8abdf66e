"""The regression gate fails on a planted slowdown and passes otherwise."""

from __future__ import annotations

import json
import math
from pathlib import Path

from rebased_kernels.benchgate import load, main, regressions

COLUMNS = ["result", "params", "version", "started_at", "duration"]


def _write(path: Path, times: list[float], mem: list[float]) -> str:
    params = [["'numba'", "'torch'"], ["1024", "4096"]]
    data = {
        "commit_hash": "0" * 40,
        "result_columns": COLUMNS,
        "results": {
            "attention.LinearAttention.track_ms": [times, params, "v", 0, 1.0],
            "attention.LinearAttention.peakmem_call": [mem, params, "v", 0, 1.0],
        },
        "version": 2,
    }
    path.write_text(json.dumps(data))
    return str(path)


def test_cells_are_read_in_parameter_order(tmp_path) -> None:
    cells = load(_write(tmp_path / "a.json", [1.0, 2.0, 3.0, 4.0], [10, 20, 30, 40]))
    assert cells[("attention.LinearAttention.track_ms", ("'torch'", "1024"))] == 3.0
    assert cells[("attention.LinearAttention.peakmem_call", ("'numba'", "4096"))] == 20


def test_planted_slowdown_fails_the_gate(tmp_path, capsys) -> None:
    base = _write(tmp_path / "base.json", [1.0, 2.0, 3.0, 4.0], [10, 20, 30, 40])
    slow = _write(tmp_path / "slow.json", [1.0, 2.0, 3.5, 4.0], [10, 20, 30, 40])
    assert main([base, slow, "--factor", "1.10"]) == 1
    assert "SLOWER x1.17" in capsys.readouterr().out
    assert main([base, slow, "--factor", "1.20"]) == 0


def test_equal_or_faster_passes_and_memory_counts(tmp_path) -> None:
    base = _write(tmp_path / "base.json", [1.0, 2.0, 3.0, 4.0], [10, 20, 30, 40])
    fast = _write(tmp_path / "fast.json", [0.5, 2.0, 3.0, 4.05], [10, 20, 30, 40])
    assert main([base, fast]) == 0
    fat = _write(tmp_path / "fat.json", [1.0, 2.0, 3.0, 4.0], [10, 20, 30, 80])
    assert main([base, fat]) == 1


def test_skipped_cells_are_reported_not_failed(tmp_path) -> None:
    base = load(_write(tmp_path / "base.json", [math.nan, 2.0, 3.0, 4.0], [10, 20, 30, 40]))
    head = load(_write(tmp_path / "head.json", [math.nan, math.nan, 3.0, 4.0], [10, 20, 30, 40]))
    slower, incomparable = regressions(base, head, 1.1)
    assert slower == []
    assert [key for key, _, _ in incomparable] == [
        ("attention.LinearAttention.track_ms", ("'numba'", "4096"))
    ]


def test_real_results_file_parses() -> None:
    root = Path(__file__).resolve().parents[1] / "asv_bench" / "results"
    files = [p for p in root.glob("*/*.json") if p.name not in ("machine.json", "benchmarks.json")]
    assert files, "no committed asv results"
    cells = load(files[0])
    assert any(name.endswith("track_ms") for name, _ in cells)
    assert main([str(files[0]), str(files[0])]) == 0


def test_interleaved_timing_alternates_calls_and_separates_costs() -> None:
    """``bench.interleaved_ms`` times its functions call by call in turn (after a warm-up of
    each), and the medians tell a 2 ms call from a 6 ms one."""
    import time

    from rebased_kernels.bench import interleaved_ms

    order: list[str] = []

    def fast() -> None:
        order.append("f")
        time.sleep(0.002)

    def slow() -> None:
        order.append("s")
        time.sleep(0.006)

    f_ms, s_ms = interleaved_ms([fast, slow], "cpu", warmup=1, repeats=5)
    assert order == ["f", "s"] * 6
    assert 1.5 < f_ms < s_ms and s_ms > 5.0 and s_ms / f_ms > 2
