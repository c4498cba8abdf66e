"""One GPU call for the MQAR harness's H100 lines (issue 7): reach, speed, Table 1, IoU.

``python -m rebased_kernels.gpu_mqar --out DIR --stages reach,speed,table1,iou``:

- ``reach``: d_model 64, L 256, 16 kv pairs, ``rebased`` on ``--backend`` (default auto):
  the lrs {1e-3, 3e-3, 1e-2} side by side until one reaches 0.99 test accuracy;
- ``speed``: training steps per second of that model at L = 2048 with the mixer kernel on
  ``triton`` and on ``fla``, in this process (steps 10..60 of a run, evaluation excluded);
- ``table1``: the paper's Table 1 at L 256 (32 kv pairs, d_model 16/24/32/48, ReBased and
  Based, lrs {1e-3, 3e-3, 1e-2}, 3 seeds) through ``sweep`` (one ensemble per cell);
- ``iou``: the Table 3 setting (L 128, 32 kv pairs): attention, based and rebased trained,
  then ``analyze``'s IoU and a heat map each.

Everything goes to ``DIR/gpu-mqar.json`` (rewritten after each stage) and files beside it.
``--dry-run`` runs every stage on the CPU at toy sizes, to test this script.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from .train.ensemble import train_ensemble
from .train.loop import TrainConfig, save_model, train
from .train.model import ModelConfig
from .train.mqar import MQARConfig

LRS = (1e-3, 3e-3, 1e-2)
SMALL = False
T0 = time.time()


def _cfg(mixer: str, d: int, L: int, kv: int, lr: float, seed: int, backend: str,
         **kw) -> TrainConfig:  # fmt: skip
    V = 64 if SMALL else 8192
    n = kw.pop("examples", 512 if SMALL else 100_000)
    device = "cpu" if SMALL else "cuda"
    return TrainConfig(
        model=ModelConfig(vocab_size=V, d_model=d, seq_len=L, mixer=mixer, backend=backend),
        data=MQARConfig(vocab_size=V, seq_len=L, num_kv_pairs=kv, num_examples=n),
        lr=lr, seed=seed, device=device, **{"test_examples": 64 if SMALL else 2000, **kw},
    )  # fmt: skip


def reach(log: dict, backend: str) -> None:
    L, kv = (32, 4) if SMALL else (256, 16)
    kw = dict(batch_size=64 if SMALL else 256, epochs=1 if SMALL else 16, eval_every=50 if
              SMALL else 200)  # fmt: skip
    t = time.perf_counter()
    runs = train_ensemble([_cfg("rebased", 64, L, kv, lr, 0, backend, **kw) for lr in LRS],
                          progress=False)  # fmt: skip
    log["reach"] = dict(
        seconds=time.perf_counter() - t, backend=backend, d_model=64, seq_len=L, kv_pairs=kv,
        runs=[dict(lr=lr, test_acc=r["test_acc"], steps=r["steps"]) for lr, r in zip(LRS, runs)],
        best=max(r["test_acc"] for r in runs),
    )  # fmt: skip


def speed(log: dict) -> None:
    """Steps/s of one model, triton vs fla kernels (same data, same process): one run per
    backend, evaluated every 10 steps on one batch; the rate is taken between steps 10 and
    60, after every first-call compile (a run's first steps include them)."""
    L, kv, B = (16, 4, 2) if SMALL else (2048, 16, 64)
    first, last = (1, 3) if SMALL else (10, 60)
    ours, peer = "triton", "torch" if SMALL else "fla"  # fla takes half inputs (autocast)
    rows = {}
    for backend in (ours, peer):
        cfg = _cfg("rebased", 64, L, kv, 1e-3, 0, backend, examples=B * last, batch_size=B,
                   max_steps=last, eval_every=first, test_examples=B)  # fmt: skip
        at = {h["step"]: h["elapsed_s"] for h in train(cfg, progress=False)["history"]}
        rows[backend] = (last - first) / (at[last] - at[first])
    log["speed"] = dict(seq_len=L, batch_size=B, d_model=64, steps_per_s=rows,
                        ratio=rows[ours] / rows[peer])  # fmt: skip


def probe_case(mixer: str, d: int, backend: str) -> dict:
    """Steps/s of one Table 1 cell's 9-model ensemble (3 lrs x 3 seeds, L 256, 32 kv pairs,
    batch 256) between steps 10 and 60."""
    L, kv, B = (32, 4, 8) if SMALL else (256, 32, 256)
    first, last = (1, 3) if SMALL else (10, 60)
    cfgs = [_cfg(mixer, d, L, kv, lr, seed, "torch" if SMALL else backend,
                 examples=B * last, batch_size=B, max_steps=last, eval_every=first,
                 test_examples=B) for lr in LRS for seed in range(3)]  # fmt: skip
    hist = train_ensemble(cfgs, progress=False)[0]["history"]
    at = {h["step"]: h["elapsed_s"] for h in hist}
    rate = (last - first) / (at[last] - at[first])
    return dict(mixer=mixer, d_model=d, backend=backend, steps_per_s=rate,
                cell_s_8_epochs=3125 / rate)  # fmt: skip


def probe(log: dict) -> None:
    """What a Table 1 cell costs, per mixer, d_model and backend (``probe_case``)."""
    rows = []
    cases = [("rebased", 16, "triton"), ("rebased", 48, "triton"), ("rebased", 48, "torch"),
             ("based", 48, "triton"), ("based", 48, "torch")]  # fmt: skip
    for case in cases:
        rows.append(probe_case(*case))
        print("probe:", rows[-1], flush=True)
    log["probe"] = rows


def profile(log: dict, mixer: str = "rebased", d: int = 48, steps: int = 20) -> None:
    """Where a Table 1 cell's step goes: ``gpu_profile.kernel_table`` (device time per kernel,
    largest first; it runs once to compile first) of ``steps`` steps of the 9-model
    ensemble, per step, and the steps/s of the same configuration (``probe_case``)."""
    from .gpu_profile import kernel_table

    L, kv, B = (32, 4, 8) if SMALL else (256, 32, 256)
    backend = "torch" if SMALL else "triton"
    cfgs = [_cfg(mixer, d, L, kv, lr, seed, backend, examples=B * steps, batch_size=B,
                 max_steps=steps, eval_every=steps, test_examples=B)
            for lr in LRS for seed in range(3)]  # fmt: skip
    rows = kernel_table(lambda: train_ensemble(cfgs, progress=False), "cpu" if SMALL else "cuda",
                        calls=1, top=25)  # fmt: skip
    log["profile"] = dict(
        mixer=mixer,
        d_model=d,
        steps=steps,
        kernels=[(name, round(us / steps, 1), round(n / steps, 2)) for name, us, n in rows],
        probe=probe_case(mixer, d, backend),
    )


def parallel(log: dict, n: int) -> None:
    """Whether Table 1 cells gain from running side by side on one GPU: ``n`` processes
    run ``probe_case("rebased", 48, "triton")`` at once; their steps/s and the sum."""
    import subprocess
    import sys
    from concurrent.futures import ThreadPoolExecutor

    code = (f"import json; from rebased_kernels import gpu_mqar as g; g.SMALL = {SMALL}; "
            "print(json.dumps(g.probe_case('rebased', 48, 'triton')))")  # fmt: skip

    def one(_: int) -> dict:
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        if p.returncode:
            raise RuntimeError(p.stderr[-1500:])
        return json.loads(p.stdout.strip().splitlines()[-1])

    with ThreadPoolExecutor(n) as pool:
        rows = list(pool.map(one, range(n)))
    total = sum(r["steps_per_s"] for r in rows)
    log["parallel"] = dict(processes=n, rows=rows, total_steps_per_s=total,
                           table1_s_8_cells=8 * 3125 / total)  # fmt: skip


TABLE1_DONE = Path(__file__).resolve().parents[1] / "docs/results/h100-mqar/table1"
"""Where the Table 1 runs of earlier calls are committed; a call continues from them."""


def table1(log: dict, out: Path, max_seconds: float | None = None, workers: int = 1) -> None:
    """``docs/sweeps/mqar-table1-L256.yaml`` through ``sweep`` (a toy grid in a dry run),
    continuing from the runs committed in ``TABLE1_DONE`` and starting no new cell after
    ``max_seconds``: the grid spreads over several GPU calls."""
    import shutil

    from .train.sweep import sweep

    path = Path(__file__).resolve().parents[1] / "docs/sweeps/mqar-table1-L256.yaml"
    if SMALL:
        path = out / "table1.yaml"
        path.write_text(json.dumps(dict(  # JSON is YAML
            mixer=["rebased", "based"], d_model=[16], seq_len=[32], kv_pairs=[4], lr=list(LRS),
            seed=[0], vocab=64, examples=256, test_examples=64, epochs=1, batch_size=32,
            eval_every=4, device="cpu", backend="torch")))  # fmt: skip
    (out / "table1").mkdir(parents=True, exist_ok=True)
    if not SMALL and (TABLE1_DONE / "runs.jsonl").exists():
        shutil.copy(TABLE1_DONE / "runs.jsonl", out / "table1" / "runs.jsonl")
    t = time.perf_counter()
    if not SMALL and (TABLE1_DONE / "walls.jsonl").exists():
        shutil.copy(TABLE1_DONE / "walls.jsonl", out / "table1" / "walls.jsonl")
    rows = sweep(path, out / "table1", progress=False, max_seconds=max_seconds, workers=workers)
    done = json.loads((out / "table1" / "results.json").read_text())
    log["table1"] = dict(seconds=time.perf_counter() - t, rows=rows, sweep=str(path),
                         missing=done["missing"], points=done["points"])  # fmt: skip


def iou(log: dict, out: Path, backend: str,
        mixers: tuple[str, ...] = ("attention", "based", "rebased")) -> None:  # fmt: skip
    """Each mixer in its own process, all at once (~140 s each alone on an H100; the small
    models leave the GPU idle between launches); rows from their ``iou-MIXER.json``."""
    import subprocess
    import sys
    from concurrent.futures import ThreadPoolExecutor

    def one(mixer: str) -> str | None:
        code = (f"from rebased_kernels import gpu_mqar as g; g.SMALL = {SMALL}; "
                f"g.iou_one({mixer!r}, {str(out)!r}, {backend!r})")  # fmt: skip
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        return None if p.returncode == 0 else f"{mixer}: {p.stderr[-1500:]}"

    with ThreadPoolExecutor(len(mixers)) as pool:
        failed = [f for f in pool.map(one, mixers) if f]
    log["iou"] = [json.loads((out / f"iou-{m}.json").read_text()) for m in mixers
                  if (out / f"iou-{m}.json").exists()]  # fmt: skip
    if failed:
        log["iou_failed"] = failed


def iou_one(mixer: str, out: str, backend: str) -> None:
    """Train ``mixer`` at the Table 3 setting (three lrs side by side), keep the best, and
    write its IoU row to ``OUT/iou-MIXER.json`` (model and heat map beside it)."""
    from .train.analysis import analyze

    out_dir = Path(out)
    L, kv = (32, 4) if SMALL else (128, 32)
    # 8 epochs of 100k examples: attention and rebased stop early at 0.99 (64 s and 294 s
    # on an H100 beside other work); based ran past 16 epochs' 400 s limit
    kw = dict(batch_size=32 if SMALL else 256, epochs=1 if SMALL else 8, eval_every=8 if
              SMALL else 200)  # fmt: skip
    t = time.perf_counter()
    cfgs = [_cfg(mixer, 64, L, kv, lr, 0, backend, **kw) for lr in LRS]
    best = max(train_ensemble(cfgs, progress=False), key=lambda r: r["test_acc"])
    model = best["model"].cpu()
    model.cfg = dataclasses.replace(model.cfg, backend="torch")  # analyze runs on the CPU
    path = out_dir / f"iou-{mixer}.pt"
    save_model(path, model, cfgs[0].data)
    r = analyze(path, examples=64 if SMALL else 500, heatmap=out_dir / f"iou-{mixer}.png")
    row = dict(mixer=mixer, test_acc=best["test_acc"], seconds=time.perf_counter() - t, **r)
    (out_dir / f"iou-{mixer}.json").write_text(json.dumps(row, default=str))


def main(argv: list[str] | None = None) -> int:
    global SMALL
    ap = argparse.ArgumentParser(prog="python -m rebased_kernels.gpu_mqar", description=__doc__)
    ap.add_argument("--out", required=True)
    ap.add_argument("--stages", default="reach,speed,table1,iou")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--iou-mixers", default="attention,based,rebased",
                    help="the iou stage's mixers (~140 s each on an H100)")  # fmt: skip
    ap.add_argument(
        "--table1-seconds",
        type=float,
        default=None,
        help="start no new Table 1 cell after this many seconds (resume next call)",
    )
    ap.add_argument("--table1-workers", type=int, default=1,
                    help="Table 1 cells trained at once, each in its own process (on one "
                    "H100 four at once ran 0.91x one's steps/s in total: GPU-bound)")  # fmt: skip
    ap.add_argument("--parallel", type=int, default=4,
                    help="processes of the parallel stage (Table 1 cells at once)")  # fmt: skip
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args(argv)
    SMALL = args.dry_run
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log: dict = dict(device=torch.cuda.get_device_name() if not SMALL else "cpu", stages=[])
    for name in args.stages.split(","):
        try:
            run_stage(name, log, out, args.backend, args.table1_seconds,
                      tuple(args.iou_mixers.split(",")), args.table1_workers,
                      args.parallel)  # fmt: skip
        except Exception as exc:  # record it and go on: one call runs every stage
            log[name] = dict(error=f"{type(exc).__name__}: {exc}"[:2000])
        log["stages"].append((name, round(time.time() - T0, 1)))
        (out / "gpu-mqar.json").write_text(json.dumps(log, indent=1, default=str))
        print(f"[{time.time() - T0:7.1f} s] {name}: {json.dumps(log.get(name), default=str)[:600]}",
              flush=True)  # fmt: skip
    return 0


def run_stage(name: str, log: dict, out: Path, backend: str,
              table1_seconds: float | None = None,
              iou_mixers: tuple[str, ...] = ("attention", "based", "rebased"),
              table1_workers: int = 1, parallel_n: int = 4) -> None:  # fmt: skip
    backend = "torch" if SMALL else backend
    stages = dict(reach=lambda: reach(log, backend), speed=lambda: speed(log),
                  probe=lambda: probe(log), profile=lambda: profile(log),
                  parallel=lambda: parallel(log, parallel_n),
                  table1=lambda: table1(log, out, table1_seconds, table1_workers),
                  iou=lambda: iou(log, out, backend, iou_mixers))  # fmt: skip
    if name not in stages:
        raise ValueError(f"unknown stage {name!r}: one of {sorted(stages)}")
    stages[name]()


if __name__ == "__main__":
    raise SystemExit(main())
