"""Hardware counters of one triton call: run it under Nsight Compute (``ncu``).

``python -m rebased_kernels.gpu_ncu run --config JSON --T 16384 --parts fwd,fwd_bwd``
compiles and warms the call, then runs each part once between ``cudaProfilerStart`` and
``cudaProfilerStop``, so that ``ncu --profile-from-start off`` (``make gpu-ncu``) profiles only
those launches. ``summarise REPORT.csv`` (``ncu --page raw --csv``) turns the report into one
row per kernel: duration, throughput against the peaks, occupancy, registers, local memory
(spills), and the three largest warp stall reasons.

Counters need a machine whose runtime exposes them (the device tool's Firecracker kinds:
``nvidia-h100-x1``); on gVisor ncu fails to initialise its profiler.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys

STALL_PREFIX = "smsp__average_warp_latency_issue_stalled_"
STALL_SUFFIX = ".ratio"
METRICS = {
    "us": "gpu__time_duration.sum",
    "sm_pct": "sm__throughput.avg.pct_of_peak_sustained_elapsed",
    "dram_pct": "gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed",
    "l2_pct": "lts__throughput.avg.pct_of_peak_sustained_elapsed",
    "l1_pct": "l1tex__throughput.avg.pct_of_peak_sustained_active",
    "occupancy_pct": "sm__warps_active.avg.pct_of_peak_sustained_active",
    "theor_occ_pct": "sm__maximum_warps_per_active_cycle_pct",
    "regs": "launch__registers_per_thread",
    "smem_B": "launch__shared_mem_per_block",
    "issue_pct": "sm__inst_issued.avg.pct_of_peak_sustained_active",
    "tensor_pct": "sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active",
    "gmma_pct": "sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active",
    "fma_pct": "sm__pipe_fma_cycles_active.avg.pct_of_peak_sustained_active",
    "alu_pct": "sm__pipe_alu_cycles_active.avg.pct_of_peak_sustained_active",
    "cpi": "smsp__average_warp_latency_per_inst_issued.ratio",
    "dram_GB": "dram__bytes.sum",
    "grid": "launch__grid_size",
    "block": "launch__block_size",
}


UNIT_SCALE = {("us", "nsecond"): 1e-3, ("us", "msecond"): 1e3, ("dram_GB", "byte"): 1e-9,
              ("dram_GB", "Kbyte"): 1e-6, ("dram_GB", "Mbyte"): 1e-3}  # fmt: skip


def run(config: dict, T: int, parts: list[str], B: int = 4, H: int = 16) -> None:
    """Warm each part (compile), then run it once inside the profiler's capture range."""
    import torch

    from rebased_kernels.gpu_check import _ours

    calls = _ours(B, T, H, config)
    for part in parts:
        getattr(calls, part)()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    for part in parts:
        getattr(calls, part)()
        torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


def probe(config: dict, T: int, part: str, unguarded: bool) -> None:
    """One part of a call, for ``compute-sanitizer``; ``unguarded`` lifts the refusal of
    ``tiles``' 8-warp backward (``launch.TILES_BWD_MAX_WARPS``) to find the bad access."""
    import torch

    from rebased_kernels.backends.triton import launch
    from rebased_kernels.gpu_check import _ours

    if unguarded:
        launch.TILES_BWD_MAX_WARPS = 64
    getattr(_ours(4, T, 16, config), part)()
    torch.cuda.synchronize()
    print("probe ok", config, T, part, flush=True)


def _number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def summarise(path: str) -> list[dict]:
    """One dict per profiled kernel from ``ncu --page raw --csv`` (first row: names, second:
    units): the ``METRICS`` that were collected and ``stalls``, the top three reasons in
    cycles per issued instruction."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    head = next(i for i, r in enumerate(rows) if "Kernel Name" in r)
    names, units, data = rows[head], rows[head + 1], rows[head + 2 :]
    col = {n: i for i, n in enumerate(names)}
    out = []
    for r in data:
        if len(r) != len(names):
            continue
        row: dict = {"kernel": r[col["Kernel Name"]][:60]}
        for key, metric in METRICS.items():
            if metric in col:
                v, unit = _number(r[col[metric]]), units[col[metric]]
                scale = UNIT_SCALE.get((key, unit), 1.0)
                row[key] = None if v is None else v * scale
        local = [n for n in col if n.startswith("l1tex__t_sectors_pipe_lsu_mem_local_op")]
        row["local_sectors"] = sum(_number(r[col[n]]) or 0.0 for n in local if n.endswith(".sum"))
        stalls = {
            n[len(STALL_PREFIX) : -len(STALL_SUFFIX)]: _number(r[col[n]]) or 0.0
            for n in col
            if n.startswith(STALL_PREFIX) and n.endswith(STALL_SUFFIX)
        }
        row["stalls"] = dict(sorted(stalls.items(), key=lambda kv: -kv[1])[:3])
        out.append(row)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rebased_kernels.gpu_ncu", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--config", default="{}", help="JSON: the triton configuration")
    r.add_argument("--T", type=int, default=16384)
    r.add_argument("--parts", default="fwd,fwd_bwd")
    p = sub.add_parser("probe")
    p.add_argument("--config", default="{}")
    p.add_argument("--T", type=int, default=2048)
    p.add_argument("--part", default="fwd_bwd")
    p.add_argument("--unguarded", action="store_true")
    s = sub.add_parser("summarise")
    s.add_argument("csv")
    s.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    if args.cmd == "run":
        run(json.loads(args.config), args.T, args.parts.split(","))
        return 0
    if args.cmd == "probe":
        probe(json.loads(args.config), args.T, args.part, args.unguarded)
        return 0
    rows = summarise(args.csv)
    for row in rows:
        print(json.dumps(row), file=sys.stdout)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
