"""The GPU-call scripts' CPU dry runs: arguments reach their stages and the log records the
stage, not an error (they run unattended on a lent machine, where a typo costs a call)."""

from __future__ import annotations

import json
import math

import pytest

from rebased_kernels import gpu_lm, gpu_mqar

PPL = ("ppl_all", "ppl_ar", "ppl_non_ar")


def test_gpu_mqar_iou_subset_and_table1_resume_dry_run(tmp_path) -> None:
    argv = ["--dry-run", "--out", str(tmp_path), "--stages", "iou,table1,probe,parallel",
            "--iou-mixers", "attention", "--table1-seconds", "0", "--table1-workers", "1",
            "--parallel", "2"]  # fmt: skip
    assert gpu_mqar.main(argv) == 0
    log = json.loads((tmp_path / "gpu-mqar.json").read_text())
    assert [r["mixer"] for r in log["iou"]] == ["attention"]
    assert 0.0 <= log["iou"][0]["iou"] <= 1.0
    t1 = log["table1"]
    assert "error" not in t1 and t1["points"] == 6 and 0 < t1["missing"] < 6  # one cell ran
    assert [stage for stage, _ in log["stages"]] == ["iou", "table1", "probe", "parallel"]
    assert log["parallel"]["processes"] == 2 and log["parallel"]["total_steps_per_s"] > 0
    assert len(log["probe"]) == 5 and all(r["steps_per_s"] > 0 for r in log["probe"])


def test_gpu_lm_dry_run_trains_both_models_and_times_both_kernels(tmp_path, monkeypatch) -> None:
    out, corpus = tmp_path / "out", tmp_path / "corpus"
    assert gpu_lm.main(["--dry-run", "--out", str(out), "--corpus", str(corpus)]) == 0
    log = json.loads((out / "gpu-lm.json").read_text())
    assert [stage for stage, _ in log["stages"]] == ["data", "train", "speed"]
    assert log["data"]["corpus"].endswith("standard library sources, byte-level")
    assert log["data"]["train_tokens"] > 0 and log["data"]["val_tokens"] > 0
    rows = log["train"]
    assert list(rows) == ["rebased", "based"] and all("error" not in r for r in rows.values())
    assert rows["rebased"]["tokens"] == rows["based"]["tokens"] == gpu_lm.DRY.tokens
    assert abs(rows["rebased"]["params"] - rows["based"]["params"]) < 0.01 * rows["based"]["params"]
    for r in rows.values():
        assert all(math.isfinite(r["eval"][k]) and r["eval"][k] > 1 for k in PPL), r["eval"]
        assert r["tokens_per_s"] > 0
    assert log["speed"]["ours"]["tokens_per_s"] > 0 and log["speed"]["ratio"] > 0
    table = (out / "lm-table.md").read_text()
    assert "| ReBased |" in table and "| Based |" in table and "ratio" in table
    assert sorted(p.name for p in out.iterdir()) == [
        "curves-based.png", "curves-rebased.png", "gpu-lm.json", "lm-table.md"]  # fmt: skip

    def broken(*_) -> None:
        raise RuntimeError("no GPU here")

    monkeypatch.setitem(gpu_lm.STAGES, "train", broken)  # a failed stage: the next one runs
    assert gpu_lm.main(["--dry-run", "--out", str(out), "--corpus", str(corpus),
                        "--stages", "train,speed"]) == 0  # fmt: skip
    log = json.loads((out / "gpu-lm.json").read_text())
    assert log["train"]["error"] == "RuntimeError: no GPU here" and "data" not in log
    assert log["speed"]["peer"]["tokens_per_s"] > 0
    assert "ratio" in (out / "lm-table.md").read_text()
    with pytest.raises(SystemExit):  # a typo is refused before any work
        gpu_lm.main(["--dry-run", "--out", str(out), "--stages", "data,trian"])


def test_gpu_check_tilelang_stage_dry_run(tmp_path) -> None:
    """The TileLang stage (its first GPU check) on the CPU: TileLang's C target, float32; its
    kernels precompiled first (rebased and based, each kind with and without a state: 8 keys
    each in float32, ``build.compile_classes``, and the tile kernels': forward, dq, dk/dv with
    and without a caller's state, 6 each); each length
    timed in every configuration of ``gpu_tilelang.CONFIGS`` (the walk at segment lengths, the
    tile forward), each matching the unsplit walk, with per-kernel tables at the longest."""
    pytest.importorskip("tilelang")
    from rebased_kernels import gpu_check, gpu_tilelang

    assert gpu_check.main(["--dry-run", "--out", str(tmp_path), "--stages", "tilelang"]) == 0
    log = json.loads((tmp_path / "gpu-check.json").read_text())
    assert log["tilelang"]["precompile"]["keys"] == 28
    assert log["tilelang"]["precompile"]["failed"] == {}
    rows = log["tilelang"]["oracle"]
    assert len(rows) == 4 and all("error" not in r for r in rows)
    assert all(max(r["err_o"], r["err_S"], r["err_z"]) < 1e-4 for r in rows)
    assert all(
        r["tilelang_fwd"] > 0 and r["tilelang_fwd_bwd"] > 0 for r in log["tilelang"]["timings"]
    )
    for r in log["tilelang"]["timings"]:
        assert list(r["by_config"]) == list(gpu_tilelang.CONFIGS)
        assert r["best_fwd"] in r["by_config"] and r["best_fwd_bwd"] in r["by_config"]
        assert max(r["split_vs_whole"].values()) < 1e-4, r["split_vs_whole"]  # (float32)
    tables = log["tilelang"]["timings"][-1]["kernels"]  # per kernel, unsplit, auto, tiles
    assert set(tables) == set(gpu_tilelang.KERNEL_TABLES)
    assert all(t["fwd"] and t["fwd_bwd"] for t in tables.values())


def test_gpu_check_probe_stage_dry_run(tmp_path, monkeypatch) -> None:
    """The probe stage runs each configuration's forward and forward+backward in a process of
    its own, all at once, and records which ran: here a tiles configuration (runs) and one
    whose backward refuses its key (a row with the error, the other processes unharmed)."""
    from rebased_kernels import gpu_check

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    good = {"variant": "tiles", "chunk_size": 32, "chunks_per_segment": 2}
    bad = {**good, "num_stages": 7}
    argv = ["--dry-run", "--out", str(tmp_path), "--stages", "probe", "--config",
            json.dumps([good, bad])]  # fmt: skip
    assert gpu_check.main(argv) == 0
    rows = json.loads((tmp_path / "gpu-check.json").read_text())["probe"]
    assert [(r["config"], r["part"], r["ok"]) for r in rows] == [
        (good, "fwd", True), (good, "fwd_bwd", True), (bad, "fwd", False), (bad, "fwd_bwd", False)
    ]  # fmt: skip
    assert all("num_stages" in r["error"] for r in rows if not r["ok"])
