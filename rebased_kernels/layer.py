"""``ReBasedAttention``: the token-mixer layer of the paper, on any backend."""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
from torch import nn

from .ops import State, decode_step, linear_attention
from .spec import LAYER_NORM_EPS, FeatureMap, get_feature_map


class ReBasedAttention(nn.Module):
    """Projections to q, k ``[B, T, H, D]`` and v ``[B, T, H, Dv]``, the feature map, causal
    linear attention, and the output projection: ``x [B, T, d_model] -> [B, T, d_model]``.

    Args:
        d_model: model width.
        num_heads: H (default 12, the paper's MQAR setting).
        feature_dim: D, the per-head q/k feature dim (default 16).
        head_dim: Dv, the per-head value dim (default ``d_model // num_heads``).
        feature_map: a preset name or a ``FeatureMap``; its gamma/beta become learnable
            ``[H, D]`` parameters ``q_weight, q_bias, k_weight, k_bias`` (init 1 and 0).
        norm_scope: ``"head"`` normalises q and k per head over D (the spec);
            ``"all_heads"`` normalises over all H * D jointly, as the paper's released code.
        normalize, eps: the attention normaliser (see ``linear_attention``).
        backend: the backend name or ``"auto"``.
        check_finite: check the attention's inputs for NaN / Inf on every call (a device
            sync per call on a GPU; training harnesses that watch their loss turn it off).
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int = 12,
        feature_dim: int = 16,
        head_dim: int | None = None,
        feature_map: str | FeatureMap = "rebased",
        norm_scope: Literal["head", "all_heads"] = "head",
        normalize: bool = True,
        eps: float = 1e-5,
        backend: str = "auto",
        check_finite: bool = True,
    ) -> None:
        super().__init__()
        self.check_finite = check_finite
        if norm_scope not in ("head", "all_heads"):
            raise ValueError(f"norm_scope must be 'head' or 'all_heads', got {norm_scope!r}")
        head_dim = d_model // num_heads if head_dim is None else head_dim
        if head_dim < 1:
            raise ValueError(f"d_model={d_model} is too small for {num_heads} heads: pass head_dim")
        self.H, self.D, self.Dv = num_heads, feature_dim, head_dim
        self.norm_scope, self.normalize, self.eps, self.backend = (
            norm_scope,
            normalize,
            eps,
            backend,
        )
        fm = get_feature_map(feature_map)
        self.joint_norm = norm_scope == "all_heads" and fm.pre.norm
        if self.joint_norm:  # the kernel sees pre-normalised q, k
            fm = dataclasses.replace(fm, pre=dataclasses.replace(fm.pre, norm=False))
        self.feature_map = fm
        self.q_proj = nn.Linear(d_model, num_heads * feature_dim, bias=False)
        self.k_proj = nn.Linear(d_model, num_heads * feature_dim, bias=False)
        self.v_proj = nn.Linear(d_model, num_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * head_dim, d_model, bias=False)
        shape = (num_heads, feature_dim)
        gamma, beta = fm.pre.uses_gamma, fm.pre.uses_beta
        self.q_weight = nn.Parameter(torch.ones(shape)) if gamma else None
        self.k_weight = nn.Parameter(torch.ones(shape)) if gamma else None
        self.q_bias = nn.Parameter(torch.zeros(shape)) if beta else None
        self.k_bias = nn.Parameter(torch.zeros(shape)) if beta else None

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        lead = x.shape[:-1]
        q = self.q_proj(x).view(*lead, self.H, self.D)
        k = self.k_proj(x).view(*lead, self.H, self.D)
        v = self.v_proj(x).view(*lead, self.H, self.Dv)
        if self.joint_norm:
            norm = (self.H * self.D,)
            q = nn.functional.layer_norm(q.flatten(-2), norm, eps=LAYER_NORM_EPS).view_as(q)
            k = nn.functional.layer_norm(k.flatten(-2), norm, eps=LAYER_NORM_EPS).view_as(k)
        return q, k, v.to(q.dtype)

    def _kwargs(self) -> dict:
        return dict(
            q_weight=self.q_weight,
            q_bias=self.q_bias,
            k_weight=self.k_weight,
            k_bias=self.k_bias,
            normalize=self.normalize,
            eps=self.eps,
            backend=self.backend,
        )

    def forward(
        self,
        x: torch.Tensor,
        state: State | None = None,
        use_cache: bool = False,
        cu_seqlens: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, State]:
        """``x [B, T, d_model]`` -> ``[B, T, d_model]``; with ``use_cache`` also the state.

        Pass the returned state back to continue a sequence; with a state and T == 1 the
        O(1) ``decode_step`` runs.
        """
        B, T, _ = x.shape
        q, k, v = self._qkv(x)
        if state is not None and T == 1 and cu_seqlens is None:
            o, new_state = decode_step(
                q[:, 0], k[:, 0], v[:, 0], state, self.feature_map, **self._kwargs()
            )
            o = o[:, None]
        else:  # the final state only when asked for (training skips it: see ops)
            out = linear_attention(
                q, k, v, self.feature_map, initial_state=state, output_final_state=use_cache,
                cu_seqlens=cu_seqlens, check_finite=self.check_finite, **self._kwargs(),
            )  # fmt: skip
            o, new_state = out if use_cache else (out, None)
        y = self.o_proj(o.reshape(B, T, self.H * self.Dv))
        return (y, new_state) if use_cache else y
