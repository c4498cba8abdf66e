"""PNG figures for the training harness (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import torch


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def accuracy_curve(history: list[dict], path: str | Path, title: str = "") -> None:
    """Test accuracy and train loss against the step, from a run's metric rows."""
    plt = _pyplot()
    steps = [r["step"] for r in history]
    fig, acc_ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    acc_ax.plot(steps, [r["test_acc"] for r in history], "o-", color="tab:blue", ms=3)
    acc_ax.set(xlabel="step", ylabel="test accuracy", ylim=(0, 1.02), title=title)
    loss_ax = acc_ax.twinx()
    loss_ax.plot(steps, [r["train_loss"] for r in history], color="tab:orange", alpha=0.6)
    loss_ax.set_ylabel("train loss", color="tab:orange")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def attention_heatmap(
    attn: torch.Tensor, targets: torch.Tensor, path: str | Path, title: str = ""
) -> None:
    """The attention matrix ``[T, T]`` beside the ground-truth retrieval positions."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(8, 4), dpi=120)
    for ax, data, name in zip(axes, (attn, targets.double()), ("attention", "ground truth")):
        ax.imshow(data.cpu().numpy(), cmap="viridis", interpolation="nearest")
        ax.set(title=f"{title} {name}".strip(), xlabel="key position", ylabel="query position")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
