"""IoU of attention with the ground-truth retrieval positions."""

from __future__ import annotations

import torch

from rebased_kernels.train.analysis import iou, retrieval_targets
from rebased_kernels.train.mqar import IGNORE_INDEX, MQARConfig, generate

CFG = MQARConfig(vocab_size=64, seq_len=32, num_kv_pairs=4, num_examples=50)


def test_targets_point_at_the_value_of_the_queried_key() -> None:
    inputs, labels = generate(CFG, seed=3)
    G = retrieval_targets(inputs, labels, CFG.num_kv_pairs)
    n, p, j = G.nonzero(as_tuple=True)
    assert len(n) == CFG.num_examples * CFG.num_kv_pairs  # one target per query
    assert torch.equal(inputs[n, j - 1], inputs[n, p])  # the key just before the target
    assert torch.equal(inputs[n, j], labels[n, p])  # the target holds the answer
    assert (j < p).all()


def test_perfect_attention_has_iou_one_and_diffuse_attention_does_not() -> None:
    inputs, labels = generate(CFG, seed=4)
    G = retrieval_targets(inputs, labels, CFG.num_kv_pairs)
    L = CFG.seq_len
    perfect = G.double()
    rows = ~G.any(-1)  # non-query rows attend anywhere causal: they do not count
    perfect[rows] = torch.ones(L, L, dtype=torch.float64).tril()[None].expand_as(perfect)[rows]
    assert iou(perfect, G) == 1.0
    assert iou(perfect[:, None].expand(-1, 3, -1, -1), G) == 1.0
    uniform = torch.ones(L, L, dtype=torch.float64).tril()
    uniform = (uniform / uniform.sum(-1, keepdim=True)).expand(CFG.num_examples, L, L)
    assert iou(uniform, G) < 0.05
    half = 0.5 * perfect + 0.5 * uniform  # half the mass on the target still passes 0.5
    assert iou(half, G) == 1.0
    assert labels[G.any(-1)].ne(IGNORE_INDEX).all()


def test_train_mqar_command_runs_and_writes_metrics(tmp_path, capsys) -> None:
    import json

    from rebased_kernels.cli import main

    argv = "train mqar --vocab 64 --seq-len 32 --kv-pairs 4 --d-model 32 --heads 2 --lr 1e-2"
    argv += f" --examples 512 --test-examples 64 --steps 30 --eval-every 10 --out {tmp_path}"
    assert main(argv.split()) == 0
    assert "test accuracy" in capsys.readouterr().out
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [10, 20, 30]
    assert all(0.0 <= r["test_acc"] <= 1.0 for r in rows)
    assert (tmp_path / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    png = tmp_path / "heat.png"
    argv = ["analyze", "mqar", str(tmp_path / "model.pt"), "--examples", "20"]
    assert main([*argv, "--heatmap", str(png)]) == 0
    out = capsys.readouterr().out
    iou_value = float(out.split("IoU ")[1].split()[0])
    assert 0.0 <= iou_value <= 1.0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
