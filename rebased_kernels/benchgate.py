"""The benchmark regression gate: compare two asv result files, fail on a slowdown.

``asv compare`` prints regressions but exits 0; this reads asv's result JSON directly and
exits 1 when any cell (``track_*`` time or ``peakmem_*`` bytes, lower is better) of HEAD is
more than ``factor`` times BASE. Cells missing or NaN on either side are reported, not
failed. ``make bench-compare BASE=<rev>`` finds the two files for a machine and runs this.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from pathlib import Path


def load(path: str | Path) -> dict[tuple[str, tuple], float]:
    """``{(benchmark, parameter cell): value}`` from one asv result file (format v2)."""
    data = json.loads(Path(path).read_text())
    columns = data["result_columns"]
    cells = {}
    for name, row in data["results"].items():
        entry = dict(zip(columns, row))
        values, params = entry["result"], entry["params"]
        combos = list(itertools.product(*params)) if params else [()]
        for combo, value in zip(combos, values or []):
            cells[(name, combo)] = float("nan") if value is None else float(value)
    return cells


def regressions(base: dict, head: dict, factor: float) -> tuple[list, list]:
    """``(slower, incomparable)``: cells over ``factor`` and cells missing or NaN."""
    slower, incomparable = [], []
    for key in sorted(set(base) | set(head)):
        b, h = base.get(key, math.nan), head.get(key, math.nan)
        if math.isnan(b) or math.isnan(h) or b <= 0:
            if not (math.isnan(b) and math.isnan(h)):  # a cell skipped on both sides is fine
                incomparable.append((key, b, h))
        elif h / b > factor:
            slower.append((key, b, h, h / b))
    return slower, incomparable


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rebased_kernels.benchgate", description=__doc__)
    ap.add_argument("base", help="asv result JSON of the base commit")
    ap.add_argument("head", help="asv result JSON of the new commit")
    ap.add_argument("--factor", type=float, default=1.10, help="allowed slowdown (default 1.10)")
    args = ap.parse_args(argv)
    slower, incomparable = regressions(load(args.base), load(args.head), args.factor)
    for (name, combo), b, h in incomparable:
        print(f"not compared  {name}{list(combo)}: base {b:.4g}, head {h:.4g}")
    for (name, combo), b, h, ratio in slower:
        print(f"SLOWER x{ratio:.2f}  {name}{list(combo)}: base {b:.4g} -> head {h:.4g}")
    verdict = "FAIL" if slower else "ok"
    print(f"{verdict}: {len(slower)} cell(s) slower than x{args.factor:.2f}")
    return 1 if slower else 0


if __name__ == "__main__":
    sys.exit(main())
