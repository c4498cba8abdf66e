"""One GPU call for the LM harness's H100 line: ReBased vs Based language models, and speed.

``python -m rebased_kernels.gpu_lm --out DIR [--stages data,train,speed] [--tokens N]``:

- ``data``: the machine's Python standard library sources (``lm_data.stdlib_corpus()``),
  byte-level, through ``lm_data.prepare`` into ``--corpus`` (outside DIR: the token files do
  not come back from the GPU machine);
- ``train``: the ``lm-30m`` model (12 layers, d_model 512, 8 heads of 64, feature dim 16)
  with the ``rebased`` mixer, then with ``based``: seq 2048, batch 16, seed 0, the same
  ``--tokens`` (12M by default), our ``triton`` kernel, bf16 autocast; each evaluated on 64
  seeded held-out batches (perplexity overall / AR / non-AR) and timed from step 10 on
  (compiles excluded), evaluation steps excluded;
- ``speed``: tokens/s of the ReBased model with its mixer kernel on ``triton`` and on
  ``fla`` (fla's ``parallel_rebased``), steps 10..30 of one run each, in this process.

DIR gets ``gpu-lm.json`` (rewritten after each model and stage, so a cut call keeps what
finished), ``lm-table.md`` and ``curves-MIXER.png``. A failed stage (or model) is recorded
and the next one runs. ``--dry-run`` runs every stage on the CPU at toy sizes (``tiny``
preset, seq 64, 40 stdlib files, the ``torch`` backend), to test this script.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

from .train import lm_data
from .train.lm_loop import LMTrainConfig, _plot, evaluate, load_splits, train_lm

MIXERS = {"rebased": "ReBased", "based": "Based"}
"""The two models of the train stage, in training order, with their names in the table."""


@dataclasses.dataclass(frozen=True)
class Plan:
    """The sizes of one call: ``GPU`` for the real one, ``DRY`` for the CPU dry run."""

    device: str
    preset: str
    seq_len: int
    batch_size: int
    tokens: int  # per model; rounded up to whole steps
    lr: float
    warmup_steps: int
    eval_every: int
    eval_batches: int  # per evaluation during training
    final_eval_batches: int  # the table's perplexities
    skip_steps: int  # first steps left out of tokens/s (compiles)
    backend: str  # our kernel
    peer: str  # the speed stage's other kernel
    speed_steps: int
    corpus_files: int | None  # None: the whole standard library

    @property
    def steps(self) -> int:
        return max(1, math.ceil(self.tokens / (self.batch_size * self.seq_len)))

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len


GPU = Plan(device="cuda", preset="lm-30m", seq_len=2048, batch_size=16, tokens=12_000_000,
           lr=2e-3, warmup_steps=40, eval_every=128, eval_batches=8, final_eval_batches=64,
           skip_steps=10, backend="triton", peer="fla", speed_steps=30,
           corpus_files=None)  # fmt: skip
DRY = Plan(device="cpu", preset="tiny", seq_len=64, batch_size=8, tokens=6 * 8 * 64, lr=3e-3,
           warmup_steps=2, eval_every=3, eval_batches=1, final_eval_batches=2, skip_steps=1,
           backend="torch", peer="torch", speed_steps=4, corpus_files=40)  # fmt: skip


class Run:
    """The call's log (``data`` goes to ``DIR/gpu-lm.json``), its clock and its files."""

    def __init__(self, out: Path, data: dict) -> None:
        self.out, self.data, self.t0 = out, data, time.perf_counter()

    def say(self, msg: str) -> None:
        print(f"[{time.perf_counter() - self.t0:7.1f} s] {msg}", flush=True)

    def save(self) -> None:
        """Rewrite ``gpu-lm.json`` and ``lm-table.md`` from what has finished."""
        (self.out / "gpu-lm.json").write_text(json.dumps(self.data, indent=1, default=str))
        (self.out / "lm-table.md").write_text(table(self.data))


def _error(exc: BaseException) -> dict:
    return dict(error=f"{type(exc).__name__}: {exc}"[:1000], trace=traceback.format_exc()[-1500:])


def corpus_name() -> str:
    """What the data stage tokenises, e.g. ``CPython 3.11.7 standard library sources``."""
    impl, version = platform.python_implementation(), platform.python_version()
    return f"{impl} {version} standard library sources, byte-level"


def data_stage(run: Run, plan: Plan, corpus: Path) -> None:
    """Tokenise the standard library into ``corpus``; log its name and token counts."""
    t = time.perf_counter()
    files = lm_data.stdlib_corpus(limit=plan.corpus_files)
    meta = lm_data.prepare(files, corpus, "byte", progress=False)
    run.data["data"] = dict(
        corpus=corpus_name(), path=str(corpus), files=meta["files"],
        train_tokens=meta["train_tokens"], val_tokens=meta["val_tokens"],
        total_tokens=meta["train_tokens"] + meta["val_tokens"], vocab_size=meta["vocab_size"],
        seconds=time.perf_counter() - t,
    )  # fmt: skip


def _ensure_corpus(run: Run, plan: Plan, corpus: Path) -> None:
    """Stages after ``data`` need its corpus: prepare it when this call has none yet."""
    if not (corpus / "meta.json").exists():
        run.say(f"no corpus at {corpus}: running the data stage first")
        data_stage(run, plan, corpus)


def _config(plan: Plan, corpus: Path, mixer: str, backend: str, steps: int,
            **kw) -> LMTrainConfig:  # fmt: skip
    return LMTrainConfig(
        data=str(corpus), preset=plan.preset, mixer=mixer, seq_len=plan.seq_len,
        batch_size=plan.batch_size, lr=plan.lr, max_steps=steps, seed=0, device=plan.device,
        backend=backend, **{"warmup_steps": plan.warmup_steps, "eval_every": plan.eval_every,
                            "eval_batches": plan.eval_batches, **kw},
    )  # fmt: skip


def steady_rate(history: list[dict], tokens_per_step: int, skip: int) -> float:
    """Tokens/s over the steps after ``skip``, leaving out each step that follows an
    evaluation. The trainer logs the running ``tokens_per_s`` since its start, so step s
    ended ``s * tokens_per_step / tokens_per_s`` seconds in."""
    ended = {h["step"]: h["step"] * tokens_per_step / h["tokens_per_s"] for h in history}
    evaluated = {h["step"] for h in history if "ppl_all" in h}
    steps = [s for s in ended if s > skip and s - 1 in ended and s - 1 not in evaluated]
    if not steps:
        raise ValueError(f"no step after the first {skip} to time: train for more steps")
    return len(steps) * tokens_per_step / sum(ended[s] - ended[s - 1] for s in steps)


def _n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # tied weights counted once


def train_one(plan: Plan, corpus: Path, mixer: str, out: Path) -> dict:
    """Train one model of the comparison; its row of the log (``curves-MIXER.png`` beside)."""
    cfg = _config(plan, corpus, mixer, plan.backend, plan.steps)
    t = time.perf_counter()
    result = train_lm(cfg, progress=False)
    seconds = time.perf_counter() - t
    history, model = result["history"], result["model"]
    final_cfg = dataclasses.replace(cfg, eval_batches=plan.final_eval_batches)
    final = evaluate(model, load_splits(cfg)[1], final_cfg, torch.device(plan.device))
    every = max(1, plan.steps // 50)
    row = dict(
        mixer=mixer, preset=plan.preset, backend=plan.backend, params=_n_params(model),
        model=model.config_dict(), steps=plan.steps, batch_size=plan.batch_size,
        seq_len=plan.seq_len, tokens=plan.steps * plan.tokens_per_step, lr=plan.lr, seed=0,
        seconds=seconds, final_loss=history[-1]["loss"],
        tokens_per_s=steady_rate(history, plan.tokens_per_step, plan.skip_steps),
        tokens_per_s_with_compile=history[-1]["tokens_per_s"],
        eval=dict(final, batches=plan.final_eval_batches,
                  tokens=plan.final_eval_batches * plan.tokens_per_step),
        evals=[{k: v for k, v in h.items() if k != "lr"} for h in history if "ppl_all" in h],
        loss_curve=[(h["step"], round(h["loss"], 4)) for h in history[::every]],
    )  # fmt: skip
    try:  # the figure is a convenience: its failure keeps the numbers
        _plot(history, out / f"curves-{mixer}.png")
    except Exception as exc:
        row["curves_error"] = f"{type(exc).__name__}: {exc}"
    return row


def train_stage(run: Run, plan: Plan, corpus: Path) -> None:
    """ReBased, then Based, on the same config and tokens; one model's failure is logged."""
    _ensure_corpus(run, plan, corpus)
    rows = run.data["train"] = {}
    for mixer in MIXERS:
        run.say(f"train {mixer}: {plan.steps} steps x {plan.tokens_per_step} tokens")
        try:
            rows[mixer] = train_one(plan, corpus, mixer, run.out)
        except Exception as exc:  # record it and train the other model
            rows[mixer] = _error(exc)
        run.say(f"train {mixer}: {_summary(rows[mixer])}")
        run.save()
        if plan.device == "cuda":
            torch.cuda.empty_cache()


def _summary(row: dict) -> str:
    if "error" in row:
        return row["error"]
    ev = row["eval"]
    return (f"{row['params']:,} params, ppl {ev['ppl_all']:.3f} (AR {ev['ppl_ar']:.3f}, "
            f"non-AR {ev['ppl_non_ar']:.3f}), {row['tokens_per_s']:,.0f} tokens/s, "
            f"{row['seconds']:.0f} s")  # fmt: skip


def speed_run(plan: Plan, corpus: Path, backend: str) -> dict:
    """A short ReBased run with the mixer kernel on ``backend``: tokens/s after the first
    ``skip_steps`` (every first-call compile), one small evaluation at the end only."""
    cfg = _config(plan, corpus, "rebased", backend, plan.speed_steps, warmup_steps=1,
                  eval_every=plan.speed_steps + 1, eval_batches=1)  # fmt: skip
    history = train_lm(cfg, progress=False)["history"]
    return dict(backend=backend, tokens_per_s=steady_rate(history, plan.tokens_per_step,
                plan.skip_steps), final_loss=history[-1]["loss"])  # fmt: skip


def speed_stage(run: Run, plan: Plan, corpus: Path) -> None:
    """Tokens/s of the same ReBased model on our kernel and on the peer's, one process."""
    _ensure_corpus(run, plan, corpus)
    ours, peer = speed_run(plan, corpus, plan.backend), speed_run(plan, corpus, plan.peer)
    run.data["speed"] = dict(
        preset=plan.preset, mixer="rebased", seq_len=plan.seq_len, batch_size=plan.batch_size,
        steps=plan.speed_steps, timed_from_step=plan.skip_steps + 1, ours=ours, peer=peer,
        ratio=ours["tokens_per_s"] / peer["tokens_per_s"],
    )  # fmt: skip


STAGES: dict[str, Callable[[Run, Plan, Path], None]] = dict(
    data=data_stage, train=train_stage, speed=speed_stage
)


def table(log: dict) -> str:
    """``lm-table.md``: the comparison's rows and the speed lines, from what has finished."""
    data = log.get("data", {})
    lines = ["# ReBased vs Based language models (`python -m rebased_kernels.gpu_lm`)", ""]
    if "train_tokens" in data:
        lines += [f"Corpus: {data['corpus']}, {data['train_tokens']:,} train and "
                  f"{data['val_tokens']:,} held-out tokens. Device: {log['device']}.",
                  ""]  # fmt: skip
    rows = {m: r for m, r in log.get("train", {}).items() if m in MIXERS}  # not a stage error
    return "\n".join(lines + _train_lines(rows) + _speed_lines(log.get("speed", {}))) + "\n"


def _train_lines(rows: dict[str, dict]) -> list[str]:
    done = [r for r in rows.values() if "error" not in r]
    lines = []
    if done:
        r = done[0]
        lines += [f"`{r['preset']}` model, seq {r['seq_len']}, batch {r['batch_size']}, lr "
                  f"{r['lr']}, seed {r['seed']}, kernel `{r['backend']}`; perplexity on "
                  f"{r['eval']['batches']} seeded held-out batches ({r['eval']['tokens']:,} "
                  "target positions); tokens/s after the first steps, evaluations excluded.",
                  ""]  # fmt: skip
    if rows:
        lines += ["| model | params | tokens | ppl all | ppl AR | ppl non-AR | tokens/s |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
    for mixer, r in rows.items():
        if "error" in r:
            lines.append(f"| {MIXERS[mixer]} | failed: {r['error'][:200]} | | | | | |")
            continue
        ev = r["eval"]
        lines.append(f"| {MIXERS[mixer]} | {r['params']:,} | {r['tokens']:,} | "
                     f"{ev['ppl_all']:.3f} | {ev['ppl_ar']:.3f} | {ev['ppl_non_ar']:.3f} | "
                     f"{r['tokens_per_s']:,.0f} |")  # fmt: skip
    return lines


def _speed_lines(speed: dict) -> list[str]:
    if "ratio" not in speed:
        return []
    ours, peer = speed["ours"], speed["peer"]
    return ["", f"Training tokens/s of the ReBased model (seq {speed['seq_len']}, batch "
            f"{speed['batch_size']}, steps {speed['timed_from_step']}..{speed['steps']}) by "
            "mixer kernel:", "", "| kernel | tokens/s |", "|---|---|",
            f"| ours (`{ours['backend']}`) | {ours['tokens_per_s']:,.0f} |",
            f"| `{peer['backend']}` | {peer['tokens_per_s']:,.0f} |",
            f"| ratio | {speed['ratio']:.2f}x |"]  # fmt: skip


def _stages(text: str) -> list[str]:
    names = text.split(",")
    unknown = [n for n in names if n not in STAGES]
    if unknown:  # refused before any work: a typo would cost a GPU call
        raise argparse.ArgumentTypeError(f"unknown stage(s) {unknown}: one of {list(STAGES)}")
    return names


def _positive(text: str) -> int:
    if int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, not {text}")
    return int(text)


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m rebased_kernels.gpu_lm", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--out", required=True, help="gpu-lm.json, lm-table.md, curves-*.png")
    ap.add_argument("--stages", type=_stages, default=list(STAGES))
    ap.add_argument("--tokens", type=_positive, default=None,
                    help=f"training tokens per model (default {GPU.tokens:,})")  # fmt: skip
    ap.add_argument("--lr", type=float, default=None, help=f"peak lr (default {GPU.lr})")
    ap.add_argument("--corpus", default=str(Path(tempfile.gettempdir()) / "gpu-lm-corpus"),
                    help="where the data stage writes the token files")  # fmt: skip
    ap.add_argument("--dry-run", action="store_true", help="every stage on the CPU, toy sizes")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    plan = DRY if args.dry_run else GPU
    overrides = dict(tokens=args.tokens, lr=args.lr)
    plan = dataclasses.replace(plan, **{k: v for k, v in overrides.items() if v is not None})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name() if plan.device == "cuda" else "cpu"
    run = Run(out, dict(device=device, torch=torch.__version__, plan=dataclasses.asdict(plan),
                        stages=[]))  # fmt: skip
    for name in args.stages:
        run.say(f"{name}: start")
        try:
            STAGES[name](run, plan, Path(args.corpus))
        except Exception as exc:  # record it and go on: one call runs every stage
            run.data[name] = _error(exc)
        run.data["stages"].append((name, round(time.perf_counter() - run.t0, 1)))
        run.save()
        run.say(f"{name}: {json.dumps(run.data.get(name), default=str)[:600]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
