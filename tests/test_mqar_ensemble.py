"""``train_ensemble``: M stacked models compute what M separate models compute."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from rebased_kernels.train.ensemble import StackedMQAR, query_positions, train_ensemble
from rebased_kernels.train.loop import TrainConfig, train
from rebased_kernels.train.model import ModelConfig, MQARModel
from rebased_kernels.train.mqar import IGNORE_INDEX, MQARConfig, generate


@pytest.mark.parametrize("mixer", ["rebased", "based", "x2", "attention"])
@pytest.mark.parametrize("norm_scope", ["head", "all_heads"])
def test_stacked_forward_and_gradients_equal_separate_models(mixer, norm_scope) -> None:
    V, T = 32, 24
    cfg = ModelConfig(vocab_size=V, d_model=12, seq_len=T, mixer=mixer, num_heads=3,
                      norm_scope=norm_scope, backend="torch")  # fmt: skip
    models = []
    for seed in (3, 4, 5):
        torch.manual_seed(seed)
        m = MQARModel(cfg)
        with torch.no_grad():  # O(1) weights: every term of the forward matters
            for p in m.parameters():
                p.add_(0.3 * torch.randn_like(p))
        models.append(m)
    x, y = generate(MQARConfig(vocab_size=V, seq_len=T, num_kv_pairs=3, num_examples=6), 11)
    xs = torch.stack([x[:2], x[2:4], x[4:]])  # each model its own batch
    ys = torch.stack([y[:2], y[2:4], y[4:]])
    net = StackedMQAR(models)
    pos = query_positions(ys, 3)  # every example queries its 3 keys
    stacked = list(net(xs, pos).flatten(1, 2))  # [B * K, V] per model, positions ascending
    torch.stack([s.square().mean() for s in stacked]).sum().backward()
    got = {n: p.grad.clone() for n, p in net.named_parameters()}
    net.zero_grad()
    for m, model in enumerate(models):
        ref = model(xs[m])[ys[m] != IGNORE_INDEX]
        torch.testing.assert_close(stacked[m], ref, rtol=1e-5, atol=1e-5)
        ref.square().mean().backward()
    for n, p in net.named_parameters():
        assert p.grad.abs().max() > 0, n  # every parameter takes part
        torch.testing.assert_close(
            got[n],
            p.grad,
            rtol=1e-4,
            atol=1e-5 * p.grad.abs().max().item(),
            msg=lambda s, n=n: f"{n}: {s}",
        )


def _cfg(lr: float, seed: int) -> TrainConfig:
    data = MQARConfig(vocab_size=64, seq_len=32, num_kv_pairs=4, num_examples=512)
    model = ModelConfig(vocab_size=64, d_model=32, seq_len=32, num_heads=2, backend="torch")
    return TrainConfig(model=model, data=data, test_examples=128, lr=lr, seed=seed,
                       batch_size=32, max_steps=12, eval_every=4, warmup_steps=2)  # fmt: skip


def test_ensemble_training_matches_separate_runs() -> None:
    cfgs = [_cfg(3e-3, 0), _cfg(1e-2, 1)]
    together = train_ensemble(cfgs, progress=False)
    for cfg, got in zip(cfgs, together):
        alone = train(cfg, progress=False)
        assert got["steps"] == alone["steps"] == 12
        for a, b in zip(got["history"], alone["history"]):
            assert a["step"] == b["step"]
            assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
            assert a["test_acc"] == pytest.approx(b["test_acc"], abs=2 / 512)
        for (n, p), q in zip(got["model"].named_parameters(), alone["model"].parameters()):
            torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-5, msg=n)


def test_early_stopped_model_freezes_and_bad_ensembles_are_rejected() -> None:
    cfgs = [dataclasses.replace(_cfg(1e-2, s), early_stop_acc=0.0) for s in (0, 1)]
    out = train_ensemble(cfgs, progress=False)  # both "finish" at the first evaluation
    assert [r["steps"] for r in out] == [4, 4] and all(len(r["history"]) == 1 for r in out)
    with pytest.raises(ValueError, match="lr and seed only"):
        train_ensemble([_cfg(1e-3, 0), dataclasses.replace(_cfg(1e-3, 1), batch_size=16)])
    with pytest.raises(ValueError, match="no files"):
        train_ensemble([dataclasses.replace(_cfg(1e-3, 0), out_dir="x")])
