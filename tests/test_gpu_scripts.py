"""The GPU-call scripts' CPU dry runs: arguments reach their stages and the log records the
stage, not an error (they run unattended on a lent machine, where a typo costs a call)."""

from __future__ import annotations

import json

from rebased_kernels import gpu_mqar


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
