"""Where the second layer looks: ground-truth retrieval positions and IoU (paper, Sec. 5.5).

At a query position ``p`` holding key ``k_i`` the model must copy the value ``v_i``, which
sits right after ``k_i`` in the context (position ``2 i + 1``). ``retrieval_targets`` marks
those ``(p, 2 i + 1)`` cells; ``iou`` compares them with the attention cells at or above a
threshold, over the query rows only::

    IoU = |{A >= tau} & G| / |{A >= tau} | G|      (rows p with a query)

A perfectly focused attention matrix (one-hot on the value) has IoU 1.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .mqar import IGNORE_INDEX


def retrieval_targets(
    inputs: torch.Tensor, labels: torch.Tensor, num_kv_pairs: int
) -> torch.Tensor:
    """``G [N, L, L]`` bool: ``G[n, p, j]`` when query ``p`` must retrieve position ``j``.

    inputs, labels: ``[N, L]`` from ``mqar.generate``.
    """
    N, L = inputs.shape
    keys = inputs[:, 0 : 2 * num_kv_pairs : 2]  # [N, kv], the context keys
    query = labels != IGNORE_INDEX  # [N, L]
    match = inputs[:, :, None] == keys[:, None, :]  # [N, L, kv]
    pair = match.to(torch.int64).argmax(-1)  # [N, L], index i of the queried key
    G = torch.zeros(N, L, L, dtype=torch.bool, device=inputs.device)
    n, p = query.nonzero(as_tuple=True)
    G[n, p, 2 * pair[n, p] + 1] = True
    return G


def iou(attn: torch.Tensor, targets: torch.Tensor, threshold: float = 0.5) -> float:
    """IoU of ``attn >= threshold`` with ``targets`` over query rows.

    attn: ``[N, L, L]`` or ``[N, H, L, L]`` (heads averaged) normalised attention;
    targets: ``[N, L, L]`` bool from ``retrieval_targets``.
    """
    if attn.dim() == 4:
        attn = attn.mean(1)
    rows = targets.any(-1, keepdim=True)  # [N, L, 1], query rows
    predicted = (attn >= threshold) & rows
    union = (predicted | targets).sum().item()
    return (predicted & targets).sum().item() / union if union else 1.0


def analyze(
    model_path: str | Path,
    examples: int = 1000,
    seed: int = 12345,
    heatmap: str | Path | None = None,
    threshold: float = 0.5,
) -> dict:
    """IoU and accuracy of a trained MQAR model (``out_dir/model.pt``) on fresh examples.

    Optionally writes a heat map of the first example's second-layer attention (head mean)
    beside the ground truth.
    """
    from .model import ModelConfig, MQARModel
    from .mqar import MQARConfig, generate

    saved = torch.load(model_path, map_location="cpu", weights_only=False)
    model = MQARModel(ModelConfig(**saved["model_config"]))
    model.load_state_dict(saved["state_dict"])
    model.eval()
    data_cfg = MQARConfig(**{**saved["data_config"], "num_examples": examples})
    inputs, labels = generate(data_cfg, seed=seed)
    targets = retrieval_targets(inputs, labels, data_cfg.num_kv_pairs)
    with torch.no_grad():
        attn = model.attention_matrix(inputs)  # [N, H, L, L]
        logits = model(inputs)
    query = labels != IGNORE_INDEX
    accuracy = (logits.argmax(-1)[query] == labels[query]).double().mean().item()
    score = iou(attn, targets, threshold)
    # the paper leaves the binarisation open: the head mean (``iou``) and the head max, at a
    # few thresholds (a recall head among 12 is diluted 12x in the mean)
    by_threshold = {f"{how}@{t:g}": iou(a, targets, t)
                    for how, a in (("mean", attn.mean(1)), ("max", attn.amax(1)))
                    for t in (0.1, 0.25, 0.5)}  # fmt: skip
    if heatmap is not None:
        from .plots import attention_heatmap

        attention_heatmap(attn[0].mean(0), targets[0], heatmap, title=model.cfg.mixer)
    return dict(iou=score, accuracy=accuracy, examples=examples, threshold=threshold,
                by_threshold=by_threshold)  # fmt: skip
