"""Language-model training and evaluation (one process or DDP).

``train_lm(cfg)`` trains a ``LanguageModel`` with AdamW (weight decay on matrices only),
linear warm-up + cosine decay, gradient clipping (max norm ``clip``), gradient accumulation,
bf16 autocast on CUDA; logs ``metrics.jsonl`` (loss, lr, tokens/s, held-out perplexity),
draws ``curves.png``, checkpoints with exact resume. Batches come from ``lm_data.batches``
(window starts seeded by (seed, step)), so step s sees the same global batch whatever the
number of processes: under ``torchrun`` (DDP; NCCL on GPU, gloo on CPU) rank r takes its
rows of it, and the averaged gradient equals the one-process gradient.

``evaluate`` reports perplexity overall, on AR tokens and on non-AR tokens: target x_i is
AR when the bigram (x_{i-1}, x_i) occurred earlier in the same window (Zoology's rule).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn import functional as F
from tqdm.auto import tqdm

from . import lm_data
from .lm_model import LanguageModel, LMConfig, lm_config
from .loop import _autocast, _param_groups, _rng_states, _set_rng_states, lr_factor

CHECKPOINT = "checkpoint.pt"


@dataclass
class LMTrainConfig:
    """One run. ``data``: a directory with ``train.bin`` / ``val.bin`` (from ``data prepare``),
    or one token file / indexed dataset whose last ``val_fraction`` is held out."""

    data: str
    preset: str = "tiny"
    mixer: str = "rebased"
    model: dict = field(default_factory=dict)
    seq_len: int = 256
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 3e-3
    weight_decay: float = 0.1
    warmup_steps: int = 20
    max_steps: int = 200
    clip: float = 1.0
    seed: int = 0
    eval_every: int = 50
    eval_batches: int = 4
    val_fraction: float = 0.05
    checkpoint_every: int | None = None
    stop_at: int | None = None  # leave after this step (checkpointed), as a time-sliced job
    out_dir: str | None = None
    device: str = "cpu"
    backend: str = "auto"


def load_splits(cfg: LMTrainConfig):
    root = Path(cfg.data)
    if root.is_dir():
        meta = json.loads((root / "meta.json").read_text())
        return lm_data.load_tokens(root / "train.bin"), lm_data.load_tokens(root / "val.bin"), meta
    tokens = lm_data.load_tokens(root)
    train, val = lm_data.split(tokens, cfg.val_fraction)
    return train, val, dict(vocab_size=int(tokens.max()) + 1)


def ar_mask(windows: torch.Tensor) -> torch.Tensor:
    """``[B, L] -> [B, L - 1]`` bool: target t (token t + 1) is AR when the bigram
    ``(w[t], w[t + 1])`` occurred at an earlier position of the same row."""
    pairs = windows[:, :-1] * (int(windows.max()) + 1) + windows[:, 1:]  # [B, L-1]
    out = torch.zeros_like(pairs, dtype=torch.bool)
    pos = torch.arange(pairs.shape[1], device=pairs.device)
    for b in range(pairs.shape[0]):
        _, inverse = torch.unique(pairs[b], return_inverse=True)
        first = torch.full((int(inverse.max()) + 1,), pairs.shape[1], device=pairs.device)
        first = first.scatter_reduce(0, inverse, pos, reduce="amin")
        out[b] = first[inverse] < pos
    return out


@torch.no_grad()
def evaluate(model, tokens, cfg: LMTrainConfig, device: torch.device) -> dict:
    """Held-out perplexity: overall, on AR and on non-AR targets (fixed seeded windows)."""
    was_training = model.training
    model.eval()
    nll = {"all": [0.0, 0], "ar": [0.0, 0], "non_ar": [0.0, 0]}
    for i in range(cfg.eval_batches):
        x, y = lm_data.batches(tokens, cfg.seq_len, cfg.batch_size, cfg.seed + 10**6, i)
        x, y = x.to(device), y.to(device)
        with _autocast(device):
            logits = model(x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none")
        ar = ar_mask(torch.cat([x[:, :1], y], 1)).flatten()
        for name, m in (("all", torch.ones_like(ar)), ("ar", ar), ("non_ar", ~ar)):
            nll[name][0] += float(loss[m].sum())
            nll[name][1] += int(m.sum())
    model.train(was_training)
    out = {f"ppl_{k}": math.exp(s / n) if n else float("nan") for k, (s, n) in nll.items()}
    out["ar_fraction"] = nll["ar"][1] / max(1, nll["all"][1])
    return out


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def build(cfg: LMTrainConfig, vocab_size: int, device: torch.device):
    torch.manual_seed(cfg.seed)
    mcfg: LMConfig = lm_config(cfg.preset, vocab_size, mixer=cfg.mixer, backend=cfg.backend,
                               **cfg.model)  # fmt: skip
    model = LanguageModel(mcfg).to(device)
    opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95))
    return model, opt


def train_lm(cfg: LMTrainConfig, resume_from: str | Path | None = None,
             progress: bool = True) -> dict:  # fmt: skip
    """Train; returns ``{"history": [...], "model": LanguageModel, "final": eval dict}``."""
    rank, world = _world()
    device = torch.device(cfg.device)
    if cfg.batch_size % (world * cfg.grad_accum):
        raise ValueError(f"batch_size {cfg.batch_size} must divide by processes x grad_accum "
                         f"= {world} x {cfg.grad_accum}")  # fmt: skip
    train_tokens, val_tokens, meta = load_splits(cfg)
    model, opt = build(cfg, int(meta["vocab_size"]), device)
    step, history = 0, []
    if resume_from is not None:
        ck = torch.load(resume_from, map_location=device, weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        step, history = ck["step"], ck["history"]
        _set_rng_states(ck["rng"])
    ddp = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else None
    net = ddp if ddp is not None else model
    out = Path(cfg.out_dir) if cfg.out_dir else None
    if out is not None and rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    rows = cfg.batch_size // world
    micro = rows // cfg.grad_accum
    t0, tokens_seen = time.perf_counter(), 0
    bar = tqdm(total=cfg.max_steps, initial=step, desc=f"lm {cfg.mixer}",
               disable=not progress or rank != 0)  # fmt: skip
    while step < (cfg.max_steps if cfg.stop_at is None else min(cfg.stop_at, cfg.max_steps)):
        for g in opt.param_groups:
            g["lr"] = cfg.lr * lr_factor(step, cfg.max_steps, cfg.warmup_steps)
        x, y = lm_data.batches(train_tokens, cfg.seq_len, cfg.batch_size, cfg.seed, step)
        x, y = x[rank * rows : (rank + 1) * rows].to(device), y[rank * rows : (rank + 1) * rows]
        y = y.to(device)
        opt.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for m in range(cfg.grad_accum):
            xs, ys = x[m * micro : (m + 1) * micro], y[m * micro : (m + 1) * micro]
            sync = ddp is None or m == cfg.grad_accum - 1
            ctx = ddp.no_sync() if not sync else contextlib.nullcontext()
            with ctx, _autocast(device):
                logits = net(xs)
                loss = F.cross_entropy(logits.float().flatten(0, 1), ys.flatten())
                (loss / cfg.grad_accum).backward()
            loss_sum += float(loss.detach()) / cfg.grad_accum
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip))
        opt.step()
        step += 1
        tokens_seen += cfg.batch_size * cfg.seq_len
        if world > 1:
            t = torch.tensor([loss_sum], device=device)
            dist.all_reduce(t)
            loss_sum = float(t) / world
        row = dict(step=step, loss=loss_sum, grad_norm=grad_norm, lr=opt.param_groups[0]["lr"],
                   tokens_per_s=tokens_seen / (time.perf_counter() - t0))  # fmt: skip
        if step % cfg.eval_every == 0 or step == cfg.max_steps:
            row.update(evaluate(model, val_tokens, cfg, device))
        history.append(row)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_sum:.3f}")
        if out is not None and rank == 0:
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                save(out / CHECKPOINT, model, opt, step, history, cfg)
    bar.close()
    if out is not None and rank == 0:
        save(out / CHECKPOINT, model, opt, step, history, cfg)
        _plot(history, out / "curves.png")
    return dict(history=history, model=model, final=history[-1] if history else {})


def save(path: Path, model, opt, step: int, history: list, cfg: LMTrainConfig) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(dict(model=model.state_dict(), optimizer=opt.state_dict(), step=step,
                    history=history, rng=_rng_states(), config=asdict(cfg),
                    model_config=model.config_dict()), tmp)  # fmt: skip
    tmp.replace(path)


def eval_checkpoint(path: str | Path, data: str | None = None, batches: int = 8) -> dict:
    """``rebased-kernels eval lm CHECKPOINT``: held-out perplexity (overall, AR, non-AR)."""
    ck = torch.load(path, map_location="cpu", weights_only=False)
    cfg = LMTrainConfig(**{**ck["config"], **({"data": data} if data else {}),
                           "eval_batches": batches})  # fmt: skip
    device = torch.device(cfg.device if torch.cuda.is_available() or cfg.device == "cpu" else "cpu")
    model = LanguageModel(LMConfig(**ck["model_config"])).to(device)
    model.load_state_dict(ck["model"])
    _, val, _ = load_splits(cfg)
    return evaluate(model, val, cfg, device)


def _plot(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([h["step"] for h in history], [h["loss"] for h in history], label="train loss")
    ev = [h for h in history if "ppl_all" in h]
    if ev:
        for k in ("ppl_all", "ppl_ar", "ppl_non_ar"):
            ax.plot([h["step"] for h in ev], [math.log(h[k]) for h in ev], "o-", label=f"log {k}")
    ax.set_xlabel("step")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
