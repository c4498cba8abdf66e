"""Where the second layer looks: ground-truth retrieval positions and IoU (paper, Sec. 5.5).

At a query position ``p`` holding key ``k_i`` the model must copy the value ``v_i``, which
sits right after ``k_i`` in the context (position ``2 i + 1``). ``retrieval_targets`` marks
those ``(p, 2 i + 1)`` cells; ``iou`` compares them with the attention cells at or above a
threshold, over the query rows only::

    IoU = |{A >= tau} & G| / |{A >= tau} | G|      (rows p with a query)

A perfectly focused attention matrix (one-hot on the value) has IoU 1.
"""

from __future__ import annotations

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
