"""Train M MQAR models of one architecture at once (a sweep cell's learning rates x seeds).

A model of the paper's MQAR size (d_model 16-64, two blocks) leaves a GPU idle: each step is a
few dozen tiny kernels. ``train_ensemble`` runs M such models in the same kernels: every
parameter is stacked along a leading model axis (``[M, ...]``), linear maps become batched
``einsum``s, the depthwise convolution gets ``M * d`` groups, and the linear-attention call
folds the models into its heads (``q [B, T, M*H, D]``, gamma/beta ``[M*H, D]``), so the
kernel sees one problem with M times the heads. Softmax attention folds them into the batch.

Each model m is still its own run ``cfgs[m]``: initialised under ``torch.manual_seed(seed)``
like ``loop.train``, its own train/test split and batch order (``seed``), its own AdamW
parameter groups and learning rate with the same warm-up + cosine schedule, and its own early
stop (a finished model's learning rate is set to 0, so it no longer changes; the loop ends
when every model has finished). The loss of model m is its mean cross-entropy over its query
positions; the models' losses are summed, so each model's gradient is its own.
The per-model modules (``result["models"]``) are ordinary ``MQARModel``s (the stacked
forward reads their parameters), so ``analyze`` and checkpoints work as for single runs.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from .._validate import PARAM_NAMES
from ..layer import ReBasedAttention
from ..ops import linear_attention
from ..spec import LAYER_NORM_EPS
from .loop import TrainConfig, _autocast, _epoch_order, _param_groups, lr_factor
from .model import MQARModel, SoftmaxAttention
from .mqar import IGNORE_INDEX, train_test

__all__ = ["StackedMQAR", "query_positions", "train_ensemble"]


def _ln(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """LayerNorm over the last dim with per-model affine ``w, b [M, d]``; x ``[M, B, T, d]``."""
    y = F.layer_norm(x, x.shape[-1:], eps=LAYER_NORM_EPS)
    return y * w[:, None, None] + b[:, None, None]


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """``x [M, B, T, i] @ w[m]^T`` with ``w [M, o, i]`` (nn.Linear's layout), plus ``b [M, o]``."""
    y = torch.einsum("mbti,moi->mbto", x, w)
    return y if b is None else y + b[:, None, None]


class StackedMQAR(nn.Module):
    """The forward of M ``MQARModel``s of one config on inputs ``[M, B, T]``.

    ``forward(inputs [M, B, T], pos [M, B, K]) -> logits [M, B, K, vocab]``: the tied head
    at the K positions ``pos`` of each example only (MQAR's query positions; full logits
    would be ``M B T vocab``).
    """

    def __init__(self, models: list[MQARModel]) -> None:
        super().__init__()
        cfgs = {dataclasses.astuple(m.cfg) for m in models}
        if len(cfgs) != 1:
            raise ValueError("an ensemble needs models of one ModelConfig")
        self.models = nn.ModuleList(models)
        self.M, self.cfg = len(models), models[0].cfg
        self.mixer = models[0].blocks[1].mixer

    def _p(self, name: str) -> torch.Tensor | None:
        """Parameter ``name`` of every model, stacked ``[M, ...]`` (differentiable); None
        where the models have none (a feature map without gamma or beta)."""
        ps = [functools.reduce(getattr, name.split("."), m) for m in self.models]
        return None if ps[0] is None else torch.stack(ps)

    def forward(self, inputs: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        M, _, T = inputs.shape
        if M != self.M or T > self.cfg.seq_len:
            raise ValueError(f"inputs {tuple(inputs.shape)}: expected [{self.M}, B, T <= "
                             f"{self.cfg.seq_len}]")  # fmt: skip
        p = self._p
        emb = p("tok_emb.weight")  # [M, V, d], also the tied head
        rows = torch.arange(M, device=inputs.device)[:, None, None]
        x = emb[rows, inputs] + p("pos_emb.weight")[:, None, :T]
        x = x + self._base_conv(_ln(x, p("blocks.0.norm.weight"), p("blocks.0.norm.bias")))
        u = _ln(x, p("blocks.1.norm.weight"), p("blocks.1.norm.bias"))
        if isinstance(self.mixer, SoftmaxAttention):
            x = x + self._softmax(u)
        else:
            x = x + self._rebased(u)
        h = _ln(x, p("norm_f.weight"), p("norm_f.bias"))  # [M, B, T, d]
        h = h.gather(2, pos[..., None].expand(-1, -1, -1, h.shape[-1]))  # [M, B, K, d]
        return torch.einsum("mbkd,mvd->mbkv", h, emb)

    def _base_conv(self, u: torch.Tensor) -> torch.Tensor:
        """``Linear(u) * causal_depthwise_conv1d(u)`` per model; the conv has M*d groups."""
        p, (M, B, T, d) = self._p, u.shape
        pre = "blocks.0.mixer."
        w = p(pre + "conv.weight")  # [M, d, 1, K]
        K = w.shape[-1]
        c = u.permute(1, 0, 3, 2).reshape(B, M * d, T)
        c = F.conv1d(c, w.reshape(M * d, 1, K), p(pre + "conv.bias").reshape(M * d),
                     padding=K - 1, groups=M * d)[..., :T]  # fmt: skip
        c = c.reshape(B, M, d, T).permute(1, 0, 3, 2)  # [M, B, T, d]
        return _linear(u, p(pre + "projection.weight"), p(pre + "projection.bias")) * c

    def _rebased(self, u: torch.Tensor) -> torch.Tensor:
        """``ReBasedAttention`` of every model in one kernel call, models folded into heads."""
        a: ReBasedAttention = self.mixer
        p, (M, B, T, _) = self._p, u.shape
        pre = "blocks.1.mixer."
        q = _linear(u, p(pre + "q_proj.weight")).view(M, B, T, a.H, a.D)
        k = _linear(u, p(pre + "k_proj.weight")).view(M, B, T, a.H, a.D)
        v = _linear(u, p(pre + "v_proj.weight")).view(M, B, T, a.H, a.Dv).to(q.dtype)
        if a.joint_norm:  # over all heads of a model, before folding
            q = F.layer_norm(q.flatten(-2), (a.H * a.D,), eps=LAYER_NORM_EPS).view_as(q)
            k = F.layer_norm(k.flatten(-2), (a.H * a.D,), eps=LAYER_NORM_EPS).view_as(k)

        def fold(t: torch.Tensor) -> torch.Tensor:  # [M, B, T, H, E] -> [B, T, M*H, E]
            return t.permute(1, 2, 0, 3, 4).reshape(B, T, M * a.H, t.shape[-1])

        params = {n: p(pre + n) for n in PARAM_NAMES}
        params = {n: t.reshape(M * a.H, a.D) for n, t in params.items() if t is not None}
        # no finite check: a diverged member (NaN weights) must not stop the others
        o = linear_attention(fold(q), fold(k), fold(v), a.feature_map, **params,
                             normalize=a.normalize, eps=a.eps, backend=a.backend,
                             check_finite=False)  # fmt: skip
        o = o.view(B, T, M, a.H * a.Dv).permute(2, 0, 1, 3)  # [M, B, T, H*Dv]
        return _linear(o, p(pre + "o_proj.weight"))

    def _softmax(self, u: torch.Tensor) -> torch.Tensor:
        """Causal softmax attention of every model, models folded into the batch."""
        a: SoftmaxAttention = self.mixer
        p, (M, B, T, _) = self._p, u.shape
        qkv = _linear(u, p("blocks.1.mixer.qkv.weight")).view(M * B, T, 3, a.H, a.Dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [M*B, H, T, Dh]
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        o = o.transpose(1, 2).reshape(M, B, T, a.H * a.Dh)
        return _linear(o, p("blocks.1.mixer.o_proj.weight"))


def query_positions(labels: torch.Tensor, K: int) -> torch.Tensor:
    """``[..., T] -> [..., K]``: the positions of the K labels per example, ascending (MQAR
    queries every key once, so each example has exactly K = num_kv_pairs); no host sync."""
    T = labels.shape[-1]
    first = torch.arange(T, 0, -1, device=labels.device)  # earlier positions score higher
    return ((labels != IGNORE_INDEX) * first).topk(K, dim=-1).indices


def _losses(net: StackedMQAR, x: torch.Tensor, y: torch.Tensor, K: int, count: bool = True):
    """``(per-model mean cross-entropy [M], correct predictions [M])`` on a batch; without
    ``count`` (a training step) the second is None: the argmax over ``[M, B, K, V]`` logits
    cost 1.3 ms of a 78 ms Table 1 step on an H200."""
    pos = query_positions(y, K)
    with _autocast(x.device):
        logits = net(x, pos).float()  # [M, B, K, V]
    target = y.gather(-1, pos)  # [M, B, K]
    ce = F.cross_entropy(logits.flatten(0, 2), target.flatten(), reduction="none")
    correct = (logits.argmax(-1) == target).flatten(1).sum(1) if count else None
    return ce.view(net.M, -1).mean(1), correct


def _check(cfgs: list[TrainConfig]) -> None:
    """One model and data config, one schedule; lr and seed may differ."""

    def shared(c: TrainConfig) -> tuple:
        return (c.model, c.data, c.test_examples, c.batch_size, c.epochs, c.max_steps,
                c.warmup_steps, c.eval_every, c.device, c.weight_decay,
                c.early_stop_acc)  # fmt: skip

    if not cfgs:
        raise ValueError("train_ensemble needs at least one TrainConfig")
    if any(shared(c) != shared(cfgs[0]) for c in cfgs):
        raise ValueError("an ensemble's runs may differ in lr and seed only")
    if any(c.out_dir is not None or c.checkpoint_every for c in cfgs):
        raise ValueError("train_ensemble writes no files: leave out_dir/checkpoint_every unset")


@torch.no_grad()
def _evaluate(net: StackedMQAR, x: torch.Tensor, y: torch.Tensor, K: int, batch_size: int):
    """Per-query-token accuracy of each model on its own test split ``x, y [M, N, T]``."""
    net.eval()
    correct = torch.zeros(net.M, dtype=torch.int64, device=x.device)
    for lo in range(0, x.shape[1], batch_size):
        correct += _losses(net, x[:, lo : lo + batch_size], y[:, lo : lo + batch_size], K)[1]
    net.train()
    return (correct / (x.shape[1] * K)).tolist()


def train_ensemble(cfgs: list[TrainConfig], progress: bool = True) -> list[dict]:
    """Train the runs ``cfgs`` (same model/data/schedule; any lr and seed) side by side.

    Returns one ``{"test_acc", "steps", "history", "model"}`` per run, as ``loop.train``:
    ``steps`` counts the steps the run trained before its early stop.
    """
    _check(cfgs)
    c0 = cfgs[0]
    device = torch.device(c0.device)
    test_cfg = dataclasses.replace(c0.data, num_examples=c0.test_examples)
    splits = [train_test(c0.data, test_cfg, c.seed) for c in cfgs]
    # [M, N, T] each: model m's own train and test split
    train_x, train_y = (torch.stack([tr[i] for tr, _ in splits]).to(device) for i in (0, 1))
    test_x, test_y = (torch.stack([te[i] for _, te in splits]).to(device) for i in (0, 1))
    K = c0.data.num_kv_pairs
    models = []
    for c in cfgs:
        torch.manual_seed(c.seed)
        models.append(MQARModel(c.model).to(device))
    net = StackedMQAR(models)
    groups = []
    for m, (c, model) in enumerate(zip(cfgs, models)):
        groups += [dict(g, lr=c.lr, base_lr=c.lr, model=m)
                   for g in _param_groups(model, c.weight_decay)]  # fmt: skip
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.95))
    total, spe, n = c0.total_steps(), c0.steps_per_epoch(), train_x.shape[1]
    M = len(cfgs)
    rows = torch.arange(M, device=device)[:, None]
    histories: list[list[dict]] = [[] for _ in cfgs]
    done = [False] * M
    steps = [0] * M
    loss_sum = torch.zeros(M, device=device)
    loss_count = 0
    start = time.perf_counter()
    bar = tqdm(total=total, disable=not progress, desc=f"train x{M}", leave=False)
    order_epoch, orders = -1, None
    step = 0
    while step < total and not all(done):
        epoch, b = divmod(step, spe)
        if epoch != order_epoch:
            order_epoch = epoch
            orders = torch.stack([_epoch_order(c.seed, epoch, n) for c in cfgs]).to(device)
        idx = orders[:, b * c0.batch_size : (b + 1) * c0.batch_size]  # [M, B]
        x, y = train_x[rows, idx], train_y[rows, idx]  # [M, B, T]
        factor = lr_factor(step, total, c0.warmup_steps)
        for g in optimizer.param_groups:
            g["lr"] = 0.0 if done[g["model"]] else g["base_lr"] * factor
        loss = _losses(net, x, y, K, count=False)[0]
        optimizer.zero_grad(set_to_none=True)
        loss.sum().backward()
        optimizer.step()
        step += 1
        loss_sum += loss.detach()
        loss_count += 1
        for m in range(M):
            steps[m] += not done[m]
        bar.update(1)
        if step % c0.eval_every == 0 or step == total:
            accs = _evaluate(net, test_x, test_y, K, c0.eval_batch_size)
            mean_loss = (loss_sum / loss_count).tolist()
            for m in range(M):
                if done[m]:
                    continue
                histories[m].append(dict(step=step, epoch=step / spe, train_loss=mean_loss[m],
                                         test_acc=accs[m], lr=cfgs[m].lr * factor,
                                         elapsed_s=time.perf_counter() - start))  # fmt: skip
                done[m] = accs[m] >= c0.early_stop_acc
            loss_sum.zero_()
            loss_count = 0
            bar.set_postfix(best=f"{max(accs):.3f}", done=f"{sum(done)}/{M}")
    bar.close()
    nan = float("nan")
    return [
        dict(test_acc=hist[-1]["test_acc"] if hist else nan, steps=s, history=hist, model=model)
        for hist, s, model in zip(histories, steps, models)
    ]
