"""The ``rebased-kernels`` command: info, check, tune, train, sweep, analyze."""

from __future__ import annotations

import argparse
import platform
import sys

import torch

DTYPES = {
    "float64": torch.float64,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def _info(args: argparse.Namespace) -> int:
    import rebased_kernels as rk

    print(
        f"rebased-kernels {rk.__version__}  python {platform.python_version()}  "
        f"torch {torch.__version__}"
    )
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            print(
                f"cuda:{i}  {p.name}  sm_{p.major}{p.minor}  "
                f"{p.total_memory / 2**30:.0f} GiB  ({p.multi_processor_count} SMs)"
            )
    else:
        print(
            f"no CUDA device; cpu: {platform.processor() or platform.machine()}, "
            f"{torch.get_num_threads()} threads"
        )
    print()
    from .backend import get_backend
    from .registry_info import first_call_seconds

    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(
        f"{'backend':<15}{'available':<11}{'first call':>12}{'next call':>11}  "
        "tuning space / why not"
    )
    for b in rk.backends():
        first = nxt = "-"
        if b.available and get_backend(b.name).compiles:
            t0, t1 = first_call_seconds(b.name, device)
            first, nxt = f"{t0:.2f} s", f"{t1 * 1e3:.1f} ms"
        detail = b.reason if not b.available else (b.tuning_space or "-")
        print(f"{b.name:<15}{'yes' if b.available else 'no':<11}{first:>12}{nxt:>11}  {detail}")
    print(
        "\nfirst call: a tiny float32 forward+backward including compilation, or loading the "
        "compiled code from the disk cache"
    )
    return 0


def _check(args: argparse.Namespace) -> int:
    from .check import check_all, format_table

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtypes = [DTYPES[d] for d in args.dtypes.split(",")]
    rows = check_all(
        device,
        args.feature_maps.split(","),
        dtypes,
        args.backends.split(",") if args.backends else None,
    )
    print(format_table(rows))
    failed = [r for r in rows if r.skipped is None and not r.passed]
    print(
        f"\n{len(rows) - len(failed)} of {len(rows)} cases passed or were skipped as "
        f"unsupported; {len(failed)} failed (device {device})"
    )
    return 1 if failed else 0


def _train_mqar(args: argparse.Namespace) -> int:
    from .train.loop import TrainConfig, train
    from .train.model import ModelConfig
    from .train.mqar import MQARConfig

    data = MQARConfig(
        vocab_size=args.vocab, seq_len=args.seq_len, num_kv_pairs=args.kv_pairs,
        num_examples=args.examples,
    )  # fmt: skip
    model = ModelConfig(
        vocab_size=args.vocab, d_model=args.d_model, seq_len=args.seq_len, mixer=args.mixer,
        num_heads=args.heads, backend=args.backend,
    )  # fmt: skip
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg = TrainConfig(
        model=model, data=data, test_examples=args.test_examples, lr=args.lr,
        batch_size=args.batch_size, epochs=args.epochs, max_steps=args.steps, seed=args.seed,
        eval_every=args.eval_every, out_dir=args.out, device=device,
    )  # fmt: skip
    result = train(cfg)
    print(f"test accuracy {result['test_acc']:.4f} after {result['steps']} steps")
    if args.out:
        print(f"written: {args.out}/metrics.jsonl, accuracy.png, model.pt")
    return 0


def _sweep_mqar(args: argparse.Namespace) -> int:
    from .train.sweep import markdown, sweep

    rows = sweep(args.config, args.out, resume=not args.fresh, max_seconds=args.max_seconds,
                 workers=args.workers)  # fmt: skip
    print(markdown(rows))
    print(f"written: {args.out}/results.md, results.json, runs.jsonl")
    return 0


def _analyze_mqar(args: argparse.Namespace) -> int:
    from .train.analysis import analyze

    r = analyze(args.model, examples=args.examples, heatmap=args.heatmap)
    print(f"IoU {r['iou']:.3f}  accuracy {r['accuracy']:.3f}  ({r['examples']} examples)")
    if args.heatmap:
        print(f"heat map: {args.heatmap}")
    return 0


def _tune(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rebased_kernels.autotune.report import run

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.shapes:
        shapes = [tuple(int(x) for x in s.split(",")) for s in args.shapes.split(";")]
    elif args.quick:
        shapes = [(1, T, 4, 16, 32) for T in (256, 1024)] if device == "cpu" else [
            (4, T, 16, 16, 64) for T in (1024, 4096)
        ]  # fmt: skip
    else:
        shapes = [(4, T, 16, 16, 64) for T in (1024, 2048, 4096, 8192, 16384, 32768)]
    dtypes = [DTYPES[d] for d in (args.dtype or ("float32" if device == "cpu" else
                                                 "float16,bfloat16")).split(",")]  # fmt: skip
    names = args.backends.split(",") if args.backends else None
    out = Path(args.out) if args.out else None
    run(shapes, dtypes, device, names, args.quick, args.objective, args.budget, out, args.force,
        total_s=args.total_budget, precompile=not args.no_precompile)  # fmt: skip
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rebased-kernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="devices, backends, and why a backend is unavailable").set_defaults(
        fn=_info
    )
    check = sub.add_parser("check", help="every available backend against the float64 oracle")
    check.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    check.add_argument("--dtypes", default="float64,float32,bfloat16")
    check.add_argument("--feature-maps", default="rebased,based,gamma_x2")
    check.add_argument(
        "--backends", default=None, help="comma-separated names (default: all available)"
    )
    check.set_defaults(fn=_check)
    tune = sub.add_parser("tune", help="tune every available backend here; leaderboard + plot")
    tune.add_argument("--quick", action="store_true", help="small shapes, few configurations")
    tune.add_argument("--shapes", default=None, help="'B,T,H,D,Dv;B,T,H,D,Dv;...'")
    tune.add_argument("--dtype", default=None, help="comma-separated (default: float32 on CPU)")
    tune.add_argument("--backends", default=None, help="comma-separated names")
    tune.add_argument("--device", default=None)
    tune.add_argument("--objective", default="forward_backward",
                      choices=("forward", "forward_backward"))  # fmt: skip
    tune.add_argument("--budget", type=float, default=60.0, help="seconds per shape and dtype")
    tune.add_argument("--total-budget", type=float, default=150.0,
                      help="seconds for the whole run, shared out over the buckets left "
                      "(every backend's default configuration is timed regardless)")  # fmt: skip
    tune.add_argument("--force", action="store_true", help="re-tune cached buckets")
    tune.add_argument("--no-precompile", action="store_true",
                      help="on a GPU, do not compile every configuration in parallel processes "
                      "before tuning")  # fmt: skip
    tune.add_argument("--out", default=None, help="directory for tune.json and tune.png")
    tune.set_defaults(fn=_tune)
    train = sub.add_parser("train", help="train a model with the kernels (MQAR, LM)")
    tasks = train.add_subparsers(dest="task", required=True)
    mqar = tasks.add_parser(
        "mqar", help="multi-query associative recall (the paper's Sec. 5.1-5.3)"
    )
    mqar.add_argument("--mixer", default="rebased", help="a feature-map preset or 'attention'")
    mqar.add_argument("--d-model", type=int, default=64)
    mqar.add_argument("--heads", type=int, default=12)
    mqar.add_argument("--seq-len", type=int, default=256)
    mqar.add_argument("--kv-pairs", type=int, default=16)
    mqar.add_argument("--vocab", type=int, default=8192)
    mqar.add_argument("--examples", type=int, default=100_000, help="training examples")
    mqar.add_argument("--test-examples", type=int, default=3000)
    mqar.add_argument("--lr", type=float, default=1e-3)
    mqar.add_argument("--batch-size", type=int, default=64)
    mqar.add_argument("--epochs", type=int, default=1)
    mqar.add_argument("--steps", type=int, default=None, help="overrides --epochs")
    mqar.add_argument("--eval-every", type=int, default=100)
    mqar.add_argument("--seed", type=int, default=0)
    mqar.add_argument("--backend", default="auto")
    mqar.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    mqar.add_argument("--out", default=None, help="folder for metrics.jsonl")
    mqar.set_defaults(fn=_train_mqar)
    from .lm_cli import add_lm_commands

    add_lm_commands(sub, tasks)
    sweep = sub.add_parser("sweep", help="a grid of training runs (MQAR)")
    sweep_mqar = sweep.add_subparsers(dest="task", required=True).add_parser(
        "mqar", help="mixers x d_model x L x kv x lr x seeds; best lr per cell"
    )
    sweep_mqar.add_argument("config", help="the sweep file (YAML, see rebased_kernels.train.sweep)")
    sweep_mqar.add_argument("--out", default="sweep-out", help="folder for the results")
    sweep_mqar.add_argument(
        "--fresh",
        action="store_true",
        help="retrain every point (default: keep the points in OUT/runs.jsonl)",
    )
    sweep_mqar.add_argument(
        "--max-seconds",
        type=float,
        default=None,
        help="start no new cell after this many seconds (resume later)",
    )
    sweep_mqar.add_argument(
        "--workers",
        type=int,
        default=1,
        help="cells trained at once, each in its own process (small models leave a GPU idle)",
    )
    sweep_mqar.set_defaults(fn=_sweep_mqar)
    analyze = sub.add_parser("analyze", help="where a trained model attends (MQAR)")
    analyze_mqar = analyze.add_subparsers(dest="task", required=True).add_parser(
        "mqar", help="IoU of the second layer's attention with the retrieval positions"
    )
    analyze_mqar.add_argument("model", help="model.pt written by 'train mqar --out DIR'")
    analyze_mqar.add_argument("--examples", type=int, default=1000)
    analyze_mqar.add_argument("--heatmap", default=None, help="write a PNG of one example")
    analyze_mqar.set_defaults(fn=_analyze_mqar)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
