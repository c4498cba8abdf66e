"""Language-model training and evaluation (one process or DDP).

``train_lm(cfg)`` trains a ``LanguageModel`` with AdamW (weight decay on matrices only),
linear warm-up + cosine decay, gradient clipping (max norm ``clip``), gradient accumulation,
bf16 autocast on CUDA; logs ``metrics.jsonl`` (loss, lr, tokens/s, held-out perplexity),
draws ``curves.png``, checkpoints with exact resume. Batches come from ``lm_data.batches``
(window starts seeded by (seed, step)), so step s sees the same global batch whatever the
number of processes: under ``torchrun`` (DDP; NCCL on GPU, gloo on CPU) rank r takes its
rows of it, and the averaged gradient equals the one-process gradient. ``fsdp=True`` shards
parameters, gradients and optimizer state instead (FSDP2's ``fully_shard`` on every layer and
the root; for presets too large to replicate); its checkpoints hold the full, unsharded
state, so they resume under any number of processes and ``eval lm`` reads them alike.

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
    fsdp: bool = False  # shard with FSDP2 instead of DDP (needs torchrun, > 1 process)


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


def build(cfg: LMTrainConfig, vocab_size: int, device: torch.device) -> LanguageModel:
    """The config's model, initialised under ``cfg.seed``."""
    torch.manual_seed(cfg.seed)
    mcfg: LMConfig = lm_config(cfg.preset, vocab_size, mixer=cfg.mixer, backend=cfg.backend,
                               **cfg.model)  # fmt: skip
    return LanguageModel(mcfg).to(device)


def train_lm(cfg: LMTrainConfig, resume_from: str | Path | None = None,
             progress: bool = True) -> dict:  # fmt: skip
    """Train; returns ``{"history": [...], "model": LanguageModel, "final": eval dict}``."""
    rank, world = _world()
    device = torch.device(cfg.device)
    if cfg.batch_size % (world * cfg.grad_accum):
        raise ValueError(f"batch_size {cfg.batch_size} must divide by processes x grad_accum "
                         f"= {world} x {cfg.grad_accum}")  # fmt: skip
    if cfg.fsdp and world == 1:
        raise ValueError("fsdp=True shards over processes: start it under torchrun with "
                         "--nproc_per_node >= 2 (one process trains unsharded)")  # fmt: skip
    train_tokens, val_tokens, meta = load_splits(cfg)
    model = build(cfg, int(meta["vocab_size"]), device)
    step, history = 0, []
    ck = None
    if resume_from is not None:
        ck = torch.load(resume_from, map_location=device, weights_only=False)
        model.load_state_dict(ck["model"])
        step, history = ck["step"], ck["history"]
        _set_rng_states(ck["rng"])
    if cfg.fsdp:
        _shard(model)
    # over the sharded parameters under FSDP
    opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95))
    if ck is not None:
        _load_optimizer(model, opt, ck["optimizer"])
    ddp = torch.nn.parallel.DistributedDataParallel(model) if world > 1 and not cfg.fsdp else None
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
            sync = m == cfg.grad_accum - 1
            if cfg.fsdp:
                model.set_requires_gradient_sync(sync)
            ctx = ddp.no_sync() if ddp is not None and not sync else contextlib.nullcontext()
            with ctx, _autocast(device):
                logits = net(xs)
                loss = F.cross_entropy(logits.float().flatten(0, 1), ys.flatten())
                (loss / cfg.grad_accum).backward()
            loss_sum += float(loss.detach()) / cfg.grad_accum
        grad_norm = _full(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip))
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
        if out is not None and cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
            save(out / CHECKPOINT, model, opt, step, history, cfg)
    bar.close()
    if out is not None:
        save(out / CHECKPOINT, model, opt, step, history, cfg)
        if rank == 0:
            _plot(history, out / "curves.png")
    return dict(history=history, model=model, final=history[-1] if history else {})


def _full(x) -> float:
    """A float from a tensor that may be a sharded DTensor (FSDP's gradient norm)."""
    return float(x.full_tensor() if hasattr(x, "full_tensor") else x)


def _shard(model: LanguageModel) -> None:
    """FSDP2, in place: ``fully_shard`` each layer, then the root (embedding, final norm,
    tied head)."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.layers:
        fully_shard(layer)
    fully_shard(model)


def _load_optimizer(model, opt, state: dict) -> None:
    """A checkpoint's full, name-keyed optimizer state into ``opt`` (sharded or not)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, opt, state, options=StateDictOptions(full_state_dict=True))


def _full_state(model, opt) -> tuple[dict, dict]:
    """The model's and optimizer's full state, optimizer keyed by parameter name (the same
    format sharded or not; gathered from every process under FSDP: a collective)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return (get_model_state_dict(model, options=opts),
            get_optimizer_state_dict(model, opt, options=opts))  # fmt: skip


def save(path: Path, model, opt, step: int, history: list, cfg: LMTrainConfig) -> None:
    """Checkpoint (call it on every process: under FSDP the state is gathered first; rank 0
    writes)."""
    model_state, opt_state = _full_state(model, opt)
    if _world()[0] != 0:
        return
    tmp = path.with_suffix(".tmp")
    torch.save(dict(model=model_state, optimizer=opt_state, step=step,
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
