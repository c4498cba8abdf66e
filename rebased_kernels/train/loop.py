"""A small, deterministic MQAR training loop with exact checkpoint/resume.

``train(cfg)`` trains an ``MQARModel`` with AdamW, a cosine learning-rate schedule (with an
optional linear warm-up), cross-entropy on the query positions only (``ignore_index=-100``)
and bf16 autocast on CUDA. Every ``eval_every`` steps (and at the end) it measures the
per-query-token accuracy on a held-out test split, appends a metrics line
(``step, epoch, train_loss, test_acc, lr, elapsed_s``) to ``out_dir/metrics.jsonl`` and stops
early once ``test_acc >= early_stop_acc``.

Determinism: the model init follows ``torch.manual_seed(seed)``; the train and test splits
come from disjoint seed streams (``mqar.train_test``); the order of epoch ``e`` is a
permutation drawn from a ``torch.Generator`` seeded by ``(seed, e)``, so step ``s`` always
sees the same batch. A checkpoint stores the model, optimiser, scheduler, step, running
loss, history and RNG states, so ``train(cfg, resume_from=path)`` continues bit-identically
to an uninterrupted run (same device, same config).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from .model import ModelConfig, MQARModel
from .mqar import IGNORE_INDEX, MQARConfig, train_test

__all__ = ["TrainConfig", "evaluate", "load_checkpoint", "save_checkpoint", "save_model", "train"]

CHECKPOINT_NAME = "checkpoint.pt"
MODEL_NAME = "model.pt"  # the trained model and its configs, for `analyze`
METRICS_NAME = "metrics.jsonl"


@dataclass
class TrainConfig:
    """One training run.

    Attributes:
        model: the model config (its ``vocab_size`` and ``seq_len`` must fit ``data``).
        data: the training split; the test split is ``data`` with ``test_examples`` examples.
        test_examples: size of the test split.
        lr, weight_decay: AdamW settings (no decay on biases, norms, embeddings, gamma/beta).
        batch_size: examples per step; an epoch is ``ceil(N / batch_size)`` steps.
        epochs: number of epochs, used when ``max_steps`` is None.
        max_steps: total optimiser steps (overrides ``epochs``).
        warmup_steps: linear warm-up steps before the cosine decay (to 0 at the last step).
        seed: seeds the model init, the data and the batch order.
        early_stop_acc: stop once the test accuracy reaches this.
        eval_every: steps between evaluations (also evaluated at the last step).
        checkpoint_every: steps between checkpoints to ``out_dir/checkpoint.pt`` (needs
            ``out_dir``); None saves none.
        out_dir: where ``metrics.jsonl`` and checkpoints go; None writes nothing.
        device: torch device.
        eval_batch_size: examples per evaluation batch.
    """

    model: ModelConfig
    data: MQARConfig
    test_examples: int = 1000
    lr: float = 1e-3
    weight_decay: float = 0.1
    batch_size: int = 64
    epochs: int = 1
    max_steps: int | None = None
    warmup_steps: int = 0
    seed: int = 0
    early_stop_acc: float = 0.99
    eval_every: int = 100
    checkpoint_every: int | None = None
    out_dir: str | None = None
    device: str = "cpu"
    eval_batch_size: int = 256

    def steps_per_epoch(self) -> int:
        return -(-self.data.num_examples // self.batch_size)

    def total_steps(self) -> int:
        return (
            self.max_steps if self.max_steps is not None else self.epochs * self.steps_per_epoch()
        )


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Multiplier of the base lr at optimiser step ``step`` (0-based): warm-up, then cosine."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay the weights of Linear and Conv1d layers only."""
    decay_ids = {id(m.weight) for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d))}
    decay_ids -= {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():  # tied weights appear once
        (decay if id(p) in decay_ids else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _epoch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The example order of ``epoch``: a permutation from a generator seeded by (seed, epoch)."""
    state = np.random.SeedSequence([seed, epoch]).generate_state(1, dtype=np.uint64)[0]
    gen = torch.Generator().manual_seed(int(state) & ((1 << 63) - 1))
    return torch.randperm(n, generator=gen)


def _autocast(device: torch.device):
    return torch.autocast(
        device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"
    )


@torch.no_grad()
def evaluate(
    model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int = 256
) -> float:
    """Accuracy per query token: ``argmax == label`` over positions with ``label != -100``."""
    was_training = model.training
    model.eval()
    correct = total = 0
    for lo in range(0, inputs.shape[0], batch_size):
        x, y = inputs[lo : lo + batch_size], labels[lo : lo + batch_size]
        mask = y != IGNORE_INDEX
        with _autocast(x.device):
            logits = model(x, mask)  # [N, V]: the query positions only
        correct += int((logits.argmax(-1) == y[mask]).sum())
        total += int(mask.sum())
    model.train(was_training)
    return correct / max(1, total)


def _rng_states() -> dict:
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    step: int,
    rng_states: dict | None = None,
    **extra,
) -> None:
    """Save everything needed to resume at ``step`` (written atomically via a temp file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "step": step,
        "rng": _rng_states() if rng_states is None else rng_states,
        **extra,
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def save_model(path: str | Path, model: MQARModel, data: MQARConfig) -> None:
    """A trained model with its model and data configs, as ``analyze`` reads it."""
    torch.save(dict(model_config=asdict(model.cfg), data_config=asdict(data),
                    state_dict=model.state_dict()), path)  # fmt: skip


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint written by ``save_checkpoint``."""
    return torch.load(path, map_location=map_location, weights_only=False)


def _write_metrics(path: Path, history: list[dict], mode: str) -> None:
    with path.open(mode) as f:
        for row in history:
            f.write(json.dumps(row) + "\n")


def train(
    cfg: TrainConfig,
    progress: bool = True,
    resume_from: str | Path | None = None,
    stop_after: int | None = None,
    data: tuple | None = None,
) -> dict:
    """Train an ``MQARModel`` as ``cfg`` says; see the module docstring.

    Args:
        cfg: the run.
        progress: show a tqdm progress bar.
        resume_from: a checkpoint of this run to continue from.
        stop_after: stop (without a final evaluation) after this many total steps, as an
            interrupted run would; used to test resuming.
        data: optional pre-generated ``((train_x, train_y), (test_x, test_y))``.

    Returns:
        ``{"test_acc", "steps", "history", "model"}``: the last evaluated test accuracy, the
        number of optimiser steps taken in total, the metric rows and the trained model.
    """
    device = torch.device(cfg.device)
    mc, dc = cfg.model, cfg.data
    if mc.vocab_size < dc.vocab_size or mc.seq_len < dc.seq_len:
        raise ValueError("model vocab_size/seq_len must cover the data's")
    if data is None:
        test_cfg = dataclasses.replace(dc, num_examples=cfg.test_examples)
        data = train_test(dc, test_cfg, cfg.seed)
    (train_x, train_y), (test_x, test_y) = data
    train_x, train_y = train_x.to(device), train_y.to(device)
    test_x, test_y = test_x.to(device), test_y.to(device)

    torch.manual_seed(cfg.seed)
    model = MQARModel(mc).to(device)
    optimizer = torch.optim.AdamW(
        _param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95)
    )
    total = cfg.total_steps()
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total, cfg.warmup_steps)
    )

    out_dir = Path(cfg.out_dir) if cfg.out_dir is not None else None
    metrics_path = out_dir / METRICS_NAME if out_dir is not None else None
    step, loss_sum, loss_count, elapsed0 = 0, 0.0, 0, 0.0
    history: list[dict] = []
    if resume_from is not None:
        ckpt = load_checkpoint(resume_from, map_location=device)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        step, loss_sum, loss_count = ckpt["step"], ckpt["loss_sum"], ckpt["loss_count"]
        history, elapsed0 = list(ckpt["history"]), ckpt["elapsed_s"]
        _set_rng_states(ckpt["rng"])
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        _write_metrics(metrics_path, history, "w")  # drop rows written after the checkpoint

    n, spe = train_x.shape[0], cfg.steps_per_epoch()
    start = time.perf_counter()
    order_epoch, order = -1, None
    done = bool(history) and history[-1]["test_acc"] >= cfg.early_stop_acc
    bar = tqdm(total=total, initial=step, disable=not progress, desc="train", leave=False)
    model.train()
    loss_acc = torch.tensor(loss_sum, dtype=torch.float64, device=device)  # no sync per step
    while step < total and not done:
        epoch, b = divmod(step, spe)
        if epoch != order_epoch:
            order_epoch, order = epoch, _epoch_order(cfg.seed, epoch, n).to(device)
        idx = order[b * cfg.batch_size : (b + 1) * cfg.batch_size]
        x, y = train_x[idx], train_y[idx]
        lr = optimizer.param_groups[0]["lr"]
        mask = y != IGNORE_INDEX
        with _autocast(device):
            logits = model(x, mask)  # [N, V]: the query positions only
        loss = F.cross_entropy(logits.float(), y[mask])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        step += 1
        loss_acc += loss.detach()
        loss_count += 1
        bar.update(1)

        if step % cfg.eval_every == 0 or step == total:
            loss_sum = float(loss_acc)
            if not math.isfinite(loss_sum):
                raise FloatingPointError(
                    f"the training loss became {loss_sum} before step {step}: lower the lr "
                    "or check the data (inputs to the attention are not checked per step)"
                )
            acc = evaluate(model, test_x, test_y, cfg.eval_batch_size)
            row = {
                "step": step,
                "epoch": step / spe,
                "train_loss": loss_sum / loss_count,
                "test_acc": acc,
                "lr": lr,
                "elapsed_s": elapsed0 + time.perf_counter() - start,
            }
            history.append(row)
            loss_count = 0
            loss_acc.zero_()
            bar.set_postfix(loss=f"{row['train_loss']:.3f}", acc=f"{acc:.3f}")
            if metrics_path is not None:
                _write_metrics(metrics_path, [row], "a")
            done = acc >= cfg.early_stop_acc
        if out_dir is not None and cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
            save_checkpoint(
                out_dir / CHECKPOINT_NAME, model, optimizer, scheduler, step,
                loss_sum=float(loss_acc), loss_count=loss_count, history=history,
                elapsed_s=elapsed0 + time.perf_counter() - start,
            )  # fmt: skip
        if stop_after is not None and step >= stop_after:
            break
    bar.close()
    if out_dir is not None:
        from .plots import accuracy_curve

        save_model(out_dir / MODEL_NAME, model, cfg.data)
        if history:
            accuracy_curve(history, out_dir / "accuracy.png", title=cfg.model.mixer)
    return {
        "test_acc": history[-1]["test_acc"] if history else float("nan"),
        "steps": step,
        "history": history,
        "model": model,
    }
