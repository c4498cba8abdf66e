"""One GPU call: correctness, peer cross-check and side-by-side timings of the triton backend.

``python -m rebased_kernels.gpu_check --out DIR [--sweep] [--quick]`` on a CUDA machine:

1. oracle check: triton vs the float64 reference on fresh random inputs (fp32, bf16, fp16;
   forward, every gradient, final state) and vs fla's ``parallel_rebased`` on the shapes
   it supports (fla takes pre-normalised q', k' and computes ``(scale q'.k')^2``);
2. no NaN / Inf at T = 65536 in bf16; B=1, H=16, T=131072 forward+backward, peak memory;
3. timings (CUDA events, median) at B=4, H=16, D=16, Dv=64, bf16, causal, for
   T in {1024, 2048, 4096, 8192, 16384, 32768}: ours, fla.parallel_rebased, and SDPA
   (flash attention at head dim 64); with ``--sweep`` the tuning space is searched first.

Everything is written to ``DIR/gpu-check.json``; the last lines printed are a table.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import NamedTuple

import torch

import rebased_kernels as rk
from rebased_kernels import reference
from rebased_kernels._validate import PARAM_NAMES
from rebased_kernels.backend import get_backend
from rebased_kernels.bench import copy_tbps, median_ms, sdpa_ms, traffic_bytes
from rebased_kernels.check import check_one
from rebased_kernels.features import pre_transform
from rebased_kernels.spec import PRESETS, LinearAttention
from rebased_kernels.testing import random_inputs, rel_err

DEVICE = "cuda"
SMALL = False  # --dry-run: tiny shapes on the CPU (Triton interpreter), to test this script
T0 = time.time()


def stage(name: str, log: dict, out: str) -> None:
    """Print the elapsed time and save what is known so far (a timeout keeps it)."""
    log.setdefault("stages", []).append((name, round(time.time() - T0, 1)))
    print(f"[{time.time() - T0:7.1f} s] {name}", flush=True)
    os.makedirs(out, exist_ok=True)  # session 11 lost a profile to a missing --out folder
    with open(f"{out}/gpu-check.json", "w") as f:
        json.dump(log, f, indent=1, default=str)


def ms(fn: Callable[[], object], warmup: int = 5, repeats: int = 30) -> float:
    """``bench.median_ms`` on this run's device (one repeat in a dry run)."""
    if SMALL:
        warmup, repeats = 1, 1
    return median_ms(fn, DEVICE, warmup, repeats)


def bench_dtype() -> torch.dtype:
    return torch.float16 if SMALL else torch.bfloat16  # the interpreter has no bfloat16


def oracle_check(log: dict) -> None:
    """``rebased-kernels check``'s comparison (o and every gradient vs the float64 oracle on
    the same rounded inputs) for triton, at Dv = 64 and T in {100, 3000}."""
    dtypes = (
        (torch.float32, torch.float16) if SMALL else (torch.float32, torch.bfloat16, torch.float16)
    )
    rows = [
        check_one("triton", name, dtype, DEVICE, shape=(2, T, 3, 16, 64))
        for name in ("rebased", "based", "gamma_x2")
        for dtype in dtypes
        for T in ((37, 50) if SMALL else (100, 3000))
    ]
    log["oracle"] = [asdict(r) for r in rows]
    worst: dict = {}
    for r in rows:
        worst[r.dtype] = max(worst.get(r.dtype, 0.0), r.forward_err, r.backward_err)
    log["oracle_worst"] = worst
    print("oracle worst relative error per dtype:", worst, flush=True)


def fla_check(log: dict) -> None:
    """Our rebased vs fla's parallel_rebased on the same pre-normalised q', k'."""
    from fla.ops.rebased import parallel_rebased

    rows = []
    fm = PRESETS["rebased"]
    for T in (64, 1000, 4096):
        x = random_inputs(2, T, 4, 16, 64, torch.bfloat16, DEVICE, fm, requires_grad=False)
        qp = pre_transform(x["q"].float(), fm.pre, x["q_weight"].float(), x["q_bias"].float())
        kp = pre_transform(x["k"].float(), fm.pre, x["k_weight"].float(), x["k_bias"].float())
        theirs = parallel_rebased(qp.bfloat16(), kp.bfloat16(), x["v"], eps=1e-5)
        ours = rk.linear_attention(**x, feature_map=fm, backend="triton")
        x64 = {n: t.double() for n, t in x.items()}
        ref = reference.quadratic(
            x64["q"],
            x64["k"],
            x64["v"],
            LinearAttention(fm, 0.25),
            tuple(x64[n] for n in PARAM_NAMES),
        )[0]
        rows.append(dict(T=T, ours_vs_fla=rel_err(ours, theirs), ours_vs_ref=rel_err(ours, ref),
                         fla_vs_ref=rel_err(theirs, ref)))  # fmt: skip
    log["fla_crosscheck"] = rows
    print("fla cross-check:", rows, flush=True)


def stress(log: dict, config: dict) -> None:
    """Finite at T = 65536 (bf16); B=1, H=16, T=131072 forward+backward and its peak memory."""
    fm = PRESETS["rebased"]
    T1, T2 = (300, 600) if SMALL else (65536, 131072)
    x = random_inputs(1, T1, 4, 16, 64, bench_dtype(), DEVICE, fm)
    o = rk.linear_attention(**x, backend="triton", config=config)
    o.backward(torch.randn_like(o))
    finite = bool(torch.isfinite(o).all()) and all(bool(torch.isfinite(x[n].grad).all()) for n in x)
    del x, o
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    x = random_inputs(1, T2, 16, 16, 64, bench_dtype(), DEVICE, fm)
    inputs_mb = sum(t.numel() * t.element_size() for t in x.values()) / 2**20
    o = rk.linear_attention(**x, backend="triton", config=config)
    o.backward(torch.randn_like(o))
    peak = torch.cuda.max_memory_allocated() / 2**20 if DEVICE == "cuda" else float("nan")
    log["stress"] = dict(T_finite=T1, finite=finite, T_memory=T2, fwd_bwd_ok=True,
                         peak_MiB=peak, inputs_MiB=inputs_mb)  # fmt: skip
    print("stress:", log["stress"], flush=True)


class _Calls(NamedTuple):
    """``_ours``' timed closures."""

    fwd: Callable  # the dense forward, training's (no final state)
    fwd_bwd: Callable  # it and the dense backward
    api_fwd: Callable  # the public API's forward
    fwd_final_state: Callable  # the dense forward with the final state


def _ours(B: int, T: int, H: int, config: dict, Dv: int = 64) -> _Calls:
    """Timed closures on one set of inputs (``_Calls``); ``config`` completed from the
    backend's default and checked, as the public API does (``decode_config``)."""
    from rebased_kernels.backend import Inputs, Outputs, decode_config, encode_config

    fm = PRESETS["rebased"]
    x = random_inputs(B, T, H, 16, Dv, bench_dtype(), DEVICE, fm, requires_grad=False)
    be = get_backend("triton")
    config = decode_config(be, encode_config(config))
    inp = Inputs(x["q"], x["k"], x["v"], *(x[n] for n in PARAM_NAMES))
    attn = LinearAttention(fm, 0.25)
    out = be.forward_dense(inp, attn, config)
    grads = Outputs(torch.randn_like(out.o), None, None)  # training: no final state

    def fwd():
        return be.forward_dense(inp, attn, config, False)

    def fwd_bwd():
        be.forward_dense(inp, attn, config, False)
        return be.backward_dense(inp, attn, config, grads)

    def api_fwd():
        with torch.no_grad():
            return rk.linear_attention(**x, backend="triton", config=config)

    return _Calls(fwd, fwd_bwd, api_fwd, lambda: be.forward_dense(inp, attn, config))


def sweep(log: dict, T: int, configs: list[dict], B: int = 4, H: int = 16, Dv: int = 64,
          key: str | None = None) -> dict:  # fmt: skip
    """Time each configuration at (B, T, H, D=16, Dv); returns the fastest forward's. Each
    row also has ``o_vs_first``: its forward's relative error against the first one's."""
    results, first = [], None
    for cfg in configs:
        try:
            fwd, fwd_bwd, *_ = _ours(B, T, H, cfg, Dv)
            o = fwd().o.float()  # the same seeded inputs for every configuration
            first = o if first is None else first
            results.append(dict(config=cfg, fwd_ms=ms(fwd, 2, 10), fwd_bwd_ms=ms(fwd_bwd, 2, 5),
                                o_vs_first=rel_err(o, first)))  # fmt: skip
        except Exception as exc:  # a config that does not compile (registers, smem)
            results.append(dict(config=cfg, error=f"{type(exc).__name__}: {exc}"[:300]))
            if "illegal memory access" in str(exc):  # the context is lost: nothing runs after
                print("sweep", T, results[-1], flush=True)
                break
        print("sweep", T, results[-1], flush=True)
    log.setdefault("sweep", {})[key or T] = results
    ok = [r for r in results if "error" not in r]
    if not ok:
        raise RuntimeError(f"sweep at T = {T}: no configuration ran")
    best_f = min(ok, key=lambda r: r["fwd_ms"])
    best_fb = min(ok, key=lambda r: r["fwd_bwd_ms"])
    print("best fwd", best_f, "best fwd+bwd", best_fb, flush=True)
    return best_f["config"]


def variant_configs(be) -> list[dict]:
    """The sweep's configurations: ``packed`` (walk) at 16 chunks of 32 per segment, 4 and 8
    warps; ``tiles`` over chunk {32, 64} x segment {2, 4, 8} chunks at 4 warps; the best of
    each with the gathered feature rows (``features``) and with tf32x3 products in the
    gradient sweeps (``exact``); the ``walk`` variant's best of session 5; ``parallel``'s
    quadratic forward at blocks of 64 (session 17: 0.048 ms at T = 1024 on an H100, against
    tiles 64 x 4's 0.063)."""
    packed = [
        {"variant": "packed", "chunk_size": 32, "chunks_per_segment": 16, "num_warps": w}
        for w in (4, 8)
    ]
    tiles = [
        {"chunk_size": c, "chunks_per_segment": n, "num_warps": 4, "variant": "tiles"}
        for c in (32, 64)
        for n in (2, 4, 8)
    ]
    gather = [{**packed[0], "features": "gather"}, {**tiles[4], "features": "gather"}]
    x3 = [{**packed[0], "exact": "x3"}, {**tiles[4], "exact": "x3"}]
    walk = {"chunk_size": 32, "chunks_per_segment": 32, "variant": "walk", "num_warps": 8}
    parallel = {"variant": "parallel", "chunk_size": 64, "exact": "x3"}
    return packed + tiles + gather + x3 + [walk, parallel]


def state_configs() -> list[dict]:
    """The ``sweep-state`` stage's configurations: the default ``packed`` and session 9's
    fastest ``tiles`` (64 x 2 forward, 64 x 4 x3 forward+backward) with the state kernel's
    rows per program and chunk (``state_rows``, ``state_chunk``) and a tile program's rows
    per product (``tile_rows``) widened."""
    packed = {"variant": "packed", "chunk_size": 32, "chunks_per_segment": 16}
    rows = [packed] + [{**packed, "state_rows": r, "state_chunk": c, "state_warps": w}
                       for r, c, w in ((128, None, 4), (128, 128, 8), (128, 64, 8), (64, 64, 4),
                                       (32, 128, 4))]  # fmt: skip
    from rebased_kernels.backends.triton.packed_call import TILES_STATE as wide

    for base in (
        {"variant": "tiles", "chunk_size": 64, "chunks_per_segment": 2},
        {"variant": "tiles", "chunk_size": 64, "chunks_per_segment": 4, "exact": "x3"},
    ):
        rows += [base] + [{**base, **wide, "tile_rows": t} for t in (32, 64, 128)]  # fmt: skip
    rows.append({"variant": "tiles", "chunk_size": 32, "chunks_per_segment": 4, **wide,
                 "tile_rows": 128})  # fmt: skip
    return rows


PROBE_CODE = """
import json, sys, torch
from rebased_kernels import gpu_check
cfg, T, part, small = json.loads(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4] == "1"
if small:
    gpu_check.DEVICE, gpu_check.SMALL = "cpu", True
calls = gpu_check._ours(1 if small else 4, T, 2 if small else 16, cfg)
getattr(calls, part)()
if not small:
    torch.cuda.synchronize()
"""
"""One part of one configuration (argv: config JSON, T, part, "1" for a dry run's tiny
shapes on the CPU), in a process of its own (``probe``)."""


def probe(log: dict, configs: list[dict], Ts: tuple[int, ...]) -> None:
    """Run each configuration's forward and its forward+backward, each in a process of its
    own, all at once (an illegal memory access poisons the CUDA context of every later call:
    session 11 lost a sweep to one), and record ``ok`` or the error's last line per
    (config, T, part)."""
    import subprocess
    import sys

    def spawn(cfg: dict, T: int, part: str) -> subprocess.Popen:
        argv = [sys.executable, "-c", PROBE_CODE, json.dumps(cfg), str(T), part, str(int(SMALL))]
        return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    # every configuration at once, each in its own process
    jobs = [(cfg, T, part, spawn(cfg, T, part))
            for cfg in configs for T in Ts for part in ("fwd", "fwd_bwd")]  # fmt: skip
    rows = []
    for cfg, T, part, proc in jobs:
        try:
            _, err = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        tail = (err.strip().splitlines() or [""])[-1][:300]
        rows.append(dict(config=cfg, T=T, part=part, ok=proc.returncode == 0,
                         error=None if proc.returncode == 0 else tail))  # fmt: skip
        print("probe", rows[-1], flush=True)
    log["probe"] = rows


def warp_probe_configs() -> list[dict]:
    """``tiles`` at 8 warps (an illegal memory access on the H200, session 11) beside its
    4-warp twin and ``packed`` at 8, to find which variant, chunk and part fails."""
    tiles = {"variant": "tiles", "chunk_size": 64, "chunks_per_segment": 4}
    return [
        {**tiles, "num_warps": 4},
        {**tiles, "num_warps": 8},
        {**tiles, "chunk_size": 32, "num_warps": 8},
        {"variant": "packed", "chunk_size": 32, "chunks_per_segment": 16, "num_warps": 8},
    ]


def mqar_configs() -> list[dict]:
    """The MQAR sweep's configurations at T = 256 (Table 1's cells): each variant with the
    sequence split into segments of 64 or 128 tokens or kept whole (one ``tiles`` segment is
    the quadratic form alone), chunks of 32 and 64, 4 and 8 warps where it differs."""
    rows = [{"variant": "walk", "chunk_size": c, "chunks_per_segment": n, "num_warps": 8}
            for c, n in ((32, 2), (32, 4), (64, 2), (64, 4))]  # fmt: skip
    rows += [{"variant": "packed", "chunk_size": c, "chunks_per_segment": n, "num_warps": 4}
             for c, n in ((32, 4), (32, 8), (64, 4))]  # fmt: skip
    rows += [{"variant": "tiles", "chunk_size": c, "chunks_per_segment": n, "num_warps": w}
             for c, n in ((32, 4), (32, 8), (64, 2), (64, 4)) for w in (4, 8)]  # fmt: skip
    # the gradient sweeps' ~fp32 products on the tensor cores (tf32x3) instead of FMAs
    rows += [{**r, "exact": "x3"} for r in rows if r["variant"] != "walk" and
             r["num_warps"] == 4]  # fmt: skip
    return rows


def precision(log: dict, config: dict) -> None:
    """The ``packed`` and ``tiles`` variants' gradient sweeps with tf32 and with bf16 state
    products: the oracle errors (check's comparison) and forward+backward at T = 16384."""
    from rebased_kernels.backends.triton import packed_call

    rows = []
    for variant in ("packed", "tiles"):
        cfg = {**config, "variant": variant}
        for sp in ("tf32", packed_call.HALF_SP):
            packed_call.BWD_SP = sp
            errs = [
                check_one(
                    "triton", name, dtype, DEVICE, shape=(2, T, 3, 16, 64), seed=7, config=cfg
                )
                for name in ("rebased", "based")
                for dtype in ((torch.float16,) if SMALL else (torch.bfloat16, torch.float16))
                for T in ((37,) if SMALL else (100, 3000))
            ]
            fwd_bwd = _ours(*((1, 200, 2) if SMALL else (4, 16384, 16)), cfg).fwd_bwd
            rows.append(dict(config=cfg, bwd_sp=sp, fwd_bwd_ms=ms(fwd_bwd, 2, 10),
                             worst_forward=max(r.forward_err for r in errs),
                             worst_backward=max(r.backward_err for r in errs),
                             rows=[asdict(r) for r in errs]))  # fmt: skip
            print("precision", {k: v for k, v in rows[-1].items() if k != "rows"}, flush=True)
    packed_call.BWD_SP = packed_call.HALF_SP
    log["precision"] = rows


def timings(log: dict, config: dict, Ts: tuple[int, ...]) -> None:
    """Ours vs fla.parallel_rebased vs SDPA (head dim 64) at B=4, H=16, D=16, Dv=64."""
    rows = []
    B, H = (1, 2) if SMALL else (4, 16)
    dt = bench_dtype()
    for T in Ts:
        calls = _ours(B, T, H, config)
        row = dict(T=T, ours_fwd=ms(calls.fwd), ours_fwd_bwd=ms(calls.fwd_bwd),
                   ours_api_fwd=ms(calls.api_fwd),
                   ours_fwd_final_state=ms(calls.fwd_final_state))  # fmt: skip
        if not SMALL and T <= 16384:
            from fla.ops.rebased import parallel_rebased

            q, k = (torch.randn(B, T, H, 16, device=DEVICE, dtype=dt) for _ in "qk")
            v = torch.randn(B, T, H, 64, device=DEVICE, dtype=dt)
            qf, kf, vf = (t.requires_grad_() for t in (q, k, v))
            row["fla_fwd"] = ms(lambda: parallel_rebased(qf, kf, vf), 2, 10)
            row["fla_fwd_bwd"] = ms(
                lambda: parallel_rebased(qf, kf, vf).backward(torch.ones_like(vf)), 2, 5
            )
        for key, objective in (("fwd", "forward"), ("fwd_bwd", "forward_backward")):
            row[f"sdpa_{key}"] = sdpa_ms(B, T, H, 64, dt, DEVICE, objective)
            floor = traffic_bytes(B, T, H, 16, 64, dt, objective) / (log["copy_TBps"] * 1e9)
            row[f"floor_{key}"] = floor
        rows.append(row)
        print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
    log["timings"] = rows


def properties(log: dict, out: str) -> None:
    """Counts and failures of the property run's ``properties.xml`` (junit), if there is one."""
    import xml.etree.ElementTree as ET
    from pathlib import Path

    path = Path(out) / "properties.xml"
    if not path.exists():
        log["properties"] = dict(error=f"{path} not written (the run was killed?)")
        return
    cases = ET.parse(path).getroot().iter("testcase")
    summary: dict = dict(passed=0, failed=[], skipped=0)
    for case in cases:
        name = f"{case.get('classname')}::{case.get('name')}"
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        if bad is not None:
            summary["failed"].append(dict(test=name, message=(bad.get("message") or "")[:300]))
        elif case.find("skipped") is not None:
            summary["skipped"] += 1
        else:
            summary["passed"] += 1
    log["properties"] = summary
    print(f"properties: {summary['passed']} passed, {len(summary['failed'])} failed, "
          f"{summary['skipped']} skipped", flush=True)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    global DEVICE, SMALL
    ap = argparse.ArgumentParser(prog="python -m rebased_kernels.gpu_check", description=__doc__)
    ap.add_argument("--out", required=True)
    ap.add_argument("--stages", default="oracle,fla,timings,stress",
                    help="comma-separated, run in order: properties (OUT/properties.xml "
                    "counted), oracle, fla, sweep, sweep-config (the --config list), "
                    "sweep-state, probe-warps, probe (the --config list), "
                    "sweep-mqar, precision, tilelang, timings, stress, profile, tune, "
                    "asv")  # fmt: skip
    ap.add_argument("--Ts", default="1024,2048,4096,8192,16384,32768")
    ap.add_argument("--profile-Ts", default="2048,16384", help="the profile stage's lengths")
    ap.add_argument(
        "--tilelang-dtypes",
        default=None,
        help="the tilelang stage's oracle dtypes, e.g. float32 (default: all; none: timings only)",
    )
    ap.add_argument(
        "--tilelang-no-timings",
        action="store_true",
        help="the tilelang stage without its timings (the oracle rows only)",
    )
    ap.add_argument("--config", default=None,
                    help="JSON: the triton configuration of the later stages (default: the "
                    "backend's, or the sweep's fastest forward); a list profiles each")  # fmt: skip
    ap.add_argument("--tune-backends", default=None, help="default: every available one")
    ap.add_argument("--tune-total", type=float, default=None, help="seconds (tune --total-budget)")
    ap.add_argument("--asv-machine", default="h100")
    ap.add_argument("--asv-backends", default="triton,fla")
    ap.add_argument("--asv-bench", default="LinearAttention.track_ms|DecodeStep")
    ap.add_argument("--dry-run", action="store_true",
                    help="tiny shapes on the CPU (TRITON_INTERPRET=1)")  # fmt: skip
    args = ap.parse_args(argv)
    if args.dry_run:
        DEVICE, SMALL = "cpu", True
    stages = args.stages.split(",")
    log: dict = dict(device=torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu",
                     torch=torch.__version__, argv=argv)  # fmt: skip
    import triton

    log["triton"] = triton.__version__
    log["copy_TBps"] = copy_tbps(DEVICE, 2**20 if SMALL else 2**28)
    stage(f"start {log}", log, args.out)
    be = get_backend("triton")
    configs = json.loads(args.config) if args.config else [dict(be.default_config)]
    configs = configs if isinstance(configs, list) else [configs]
    profile_Ts = tuple(int(t) for t in args.profile_Ts.split(","))  # profile and probe
    config = log["config"] = {**be.default_config, **configs[0]}
    for name in stages:  # in the order given
        if name == "properties":
            properties(log, args.out)
        elif name == "oracle":
            oracle_check(log)
        elif name == "fla" and not SMALL:
            fla_check(log)
        elif name == "sweep":
            configs = variant_configs(be)
            sweep(log, 128 if SMALL else 2048, configs)
            config = log["config"] = sweep(log, 256 if SMALL else 16384, configs)
        elif name == "sweep-config":  # the --config list, at 2048 and 16384
            for T in (128, 256) if SMALL else (2048, 16384):
                sweep(log, T, configs, key=f"config-{T}")
        elif name == "probe-warps":
            probe(log, warp_probe_configs(), (256,) if SMALL else (2048,))
        elif name == "probe":  # the --config list, forward and forward+backward, at once
            probe(log, configs, (256,) if SMALL else profile_Ts)
        elif name == "sweep-state":
            for T in (128, 256) if SMALL else (2048, 16384):
                sweep(log, T, state_configs(), key=f"state-{T}")
        elif name == "sweep-mqar":  # a Table 1 cell's mixer call: 9 models x 12 heads, Dv 4
            B, T, H = (4, 64, 12) if SMALL else (256, 256, 108)
            sweep(log, T, mqar_configs(), B, H, 4, key="mqar")
        elif name == "precision":
            precision(log, config)
        elif name == "tilelang":
            from rebased_kernels.gpu_tilelang import check_and_time

            names = args.tilelang_dtypes
            dts = (
                None
                if names is None
                else tuple(getattr(torch, d) for d in names.split(",") if d != "none")
            )
            check_and_time(log, DEVICE, SMALL, ms, dts, config, not args.tilelang_no_timings)
        elif name == "timings":
            Ts = (64, 200) if SMALL else tuple(int(t) for t in args.Ts.split(","))
            timings(log, config, Ts)
        elif name == "stress":
            stress(log, config)
        elif name == "profile":
            from rebased_kernels.gpu_profile import decode, profile

            for cfg in configs:
                for T in (64, 200) if SMALL else profile_Ts:
                    fwd, fwd_bwd, api_fwd, _ = _ours(*((1, T, 2) if SMALL else (4, T, 16)), cfg)
                    row = profile(log, dict(fwd=fwd, fwd_bwd=fwd_bwd, api_fwd=api_fwd), T,
                                  DEVICE, ms)  # fmt: skip
                    row["config"] = cfg
                    stage(f"profile T={T} {cfg}", log, args.out)  # a later crash keeps it
            decode(log, DEVICE, lambda fn: ms(fn, 20, 200), bench_dtype())
        elif name == "tune":
            from rebased_kernels import gpu_tune

            shapes = "1,128,2,16,16;1,256,2,16,16" if SMALL else None
            record = gpu_tune.tune(log, args.out, shapes, "float16" if SMALL else None, DEVICE,
                                   args.tune_backends, args.tune_total)  # fmt: skip
            gpu_tune.auto(log, args.out, record, DEVICE)
        elif name == "asv":
            from rebased_kernels import gpu_tune

            gpu_tune.asv(log, args.out, args.asv_machine, args.asv_backends, args.asv_bench)
        stage(name, log, args.out)
    print(f"{'T':>6} {'ours f':>8} {'f+b':>8} {'api f':>8} {'fla f':>8} {'f+b':>8} "
          f"{'sdpa f':>8} {'f+b':>8} {'floor f':>8} {'f+b':>8}")  # fmt: skip
    nan = float("nan")
    for r in log.get("timings", []):
        print(
            f"{r['T']:>6} {r['ours_fwd']:>8.3f} {r['ours_fwd_bwd']:>8.3f} {r['ours_api_fwd']:>8.3f}"
            f" {r.get('fla_fwd', nan):>8.3f} {r.get('fla_fwd_bwd', nan):>8.3f}"
            f" {r['sdpa_fwd']:>8.3f} {r['sdpa_fwd_bwd']:>8.3f}"
            f" {r['floor_fwd']:>8.3f} {r['floor_fwd_bwd']:>8.3f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
