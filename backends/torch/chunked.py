"""The chunked algorithm in PyTorch: exact, vectorised over chunks, fp32 accumulation.

Legend: B batch, T tokens, H heads, D q/k feature dim, Dv value dim, C chunk size,
N = ceil(T / C) chunks, F features (``spec``). Within a chunk the scores come from the
polynomial of ``s = scale * q' . k'`` on the raw D-dim q', k'; across chunks through the
states ``S_n = S0 + sum_{m<n} phi(K_m)^T V_m`` in the canonical feature layout.
The backward recomputes the forward's chunk terms (``_attend``) and applies the chain rule
by hand, so it compiles as plain tensor code.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F_

from rebased_kernels.backend import Inputs, Outputs, compute_dtype
from rebased_kernels.features import (
    Layout,
    layout,
    phi_backward,
    phi_with,
    polynomial,
    pre_transform,
    pre_transform_backward,
)
from rebased_kernels.spec import LinearAttention


def _chunks(t: torch.Tensor, C: int) -> torch.Tensor:
    """``[B, T, H, E] -> [B, H, N, C, E]``, zero-padding T up to a multiple of C."""
    B, T, H, E = t.shape
    t = F_.pad(t, (0, 0, 0, 0, 0, (-T) % C))
    return t.reshape(B, -1, C, H, E).permute(0, 3, 1, 2, 4)


def _unchunk(t: torch.Tensor, T: int) -> torch.Tensor:
    """``[B, H, N, C, E] -> [B, T, H, E]``, dropping the padding."""
    B, H, N, C, E = t.shape
    return t.permute(0, 2, 3, 1, 4).reshape(B, N * C, H, E)[:, :T]


class _Terms(NamedTuple):
    q_c: torch.Tensor  # [B, H, N, C, D]
    k_c: torch.Tensor  # [B, H, N, C, D]
    v_c: torch.Tensor  # [B, H, N, C, Dv]
    valid: torch.Tensor  # [B, H, N, C, 1], 0 on padding
    s: torch.Tensor  # [B, H, N, C, C]
    A: torch.Tensor  # [B, H, N, C, C], causal within the chunk
    phi_q: torch.Tensor  # [B, H, N, C, F]
    phi_k: torch.Tensor  # [B, H, N, C, F], 0 on padding
    S_before: torch.Tensor  # [B, H, N, F, Dv]
    z_before: torch.Tensor  # [B, H, N, F]
    den: torch.Tensor | None  # [B, H, N, C], with eps; None without normalize
    out: torch.Tensor  # [B, H, N, C, Dv]
    S: torch.Tensor  # [B, H, F, Dv]
    z: torch.Tensor  # [B, H, F]


def chunk_layout(x: Inputs, attn: LinearAttention) -> Layout:
    """The feature layout tensors a call needs (built outside compiled regions)."""
    dt = compute_dtype(x.v.dtype)
    return layout(attn.feature_map, x.q.shape[-1], attn.scale, x.q.device, dt)


def _prepare(x: Inputs, attn: LinearAttention) -> tuple[torch.Tensor, torch.Tensor]:
    dt = compute_dtype(x.v.dtype)
    fm = attn.feature_map
    qp = pre_transform(x.q.to(dt), fm.pre, x.q_weight, x.q_bias)  # [B, T, H, D]
    kp = pre_transform(x.k.to(dt), fm.pre, x.k_weight, x.k_bias)  # [B, T, H, D]
    return qp, kp


def _attend(
    qp: torch.Tensor,
    kp: torch.Tensor,
    x: Inputs,
    attn: LinearAttention,
    lt: Layout,
    C: int,
    valid: torch.Tensor | None,
) -> _Terms:
    dt = qp.dtype
    q_c, k_c, v_c = _chunks(qp, C), _chunks(kp, C), _chunks(x.v.to(dt), C)
    mask = torch.ones_like(x.v[..., :1], dtype=dt)  # [B, T, H, 1]
    if valid is not None:
        mask = mask * valid.to(dt)[None, :, None, None]
    valid = _chunks(mask, C)
    s = attn.scale * q_c @ k_c.transpose(-1, -2)
    A = polynomial(s, lt.coeffs).tril()
    phi_q = phi_with(q_c, lt)
    phi_k = phi_with(k_c, lt) * valid
    dS = phi_k.transpose(-1, -2) @ v_c  # [B, H, N, F, Dv]
    dz = phi_k.sum(-2)  # [B, H, N, F]
    S_before = torch.cumsum(dS, dim=2) - dS  # exclusive prefix over chunks
    z_before = torch.cumsum(dz, dim=2) - dz
    S, z = dS.sum(2), dz.sum(2)
    if x.S0 is not None:
        S0, z0 = x.S0.to(dt), x.z0.to(dt)
        S_before, S = S_before + S0[:, :, None], S + S0
        z_before, z = z_before + z0[:, :, None], z + z0
    out = phi_q @ S_before + A @ v_c  # [B, H, N, C, Dv]
    den = None
    if attn.normalize:
        den = (phi_q @ z_before[..., None]).squeeze(-1) + A.sum(-1) + attn.eps
        out = out / den[..., None]
    return _Terms(q_c, k_c, v_c, valid, s, A, phi_q, phi_k, S_before, z_before, den, out, S, z)


def chunked_forward(
    x: Inputs,
    lt: Layout,
    valid: torch.Tensor | None,
    attn: LinearAttention,
    chunk_size: int,
) -> Outputs:
    """Causal linear attention for T >= 1, exact in exact arithmetic for any chunk size.

    ``valid [T]`` (optional, 1 or 0) marks padding tokens whose keys must not enter the
    final state; padding sits at the end, so no real token attends to it.
    """
    qp, kp = _prepare(x, attn)
    t = _attend(qp, kp, x, attn, lt, chunk_size, valid)
    return Outputs(_unchunk(t.out, x.q.shape[1]).to(x.v.dtype), t.S, t.z)


def _exclusive_suffix_sum(t: torch.Tensor, dim: int) -> torch.Tensor:
    """``out_m = sum_{n > m} t_n`` along dim (total minus the inclusive prefix)."""
    return t.sum(dim, keepdim=True) - torch.cumsum(t, dim)


def chunked_backward(
    x: Inputs,
    lt: Layout,
    valid: torch.Tensor | None,
    grads: Outputs,
    attn: LinearAttention,
    chunk_size: int,
) -> Inputs:
    """Gradients of ``chunked_forward`` for every present input (None for absent ones)."""
    qp, kp = _prepare(x, attn)
    t = _attend(qp, kp, x, attn, lt, chunk_size, valid)
    dt, T, fm = qp.dtype, x.q.shape[1], attn.feature_map
    do = _chunks(grads.o.to(dt), chunk_size)  # [B, H, N, C, Dv]
    dS_final, dz_final = grads.S.to(dt), grads.z.to(dt)

    if t.den is not None:
        dnum = do / t.den[..., None]  # [B, H, N, C, Dv]
        dden = -(do * t.out).sum(-1) / t.den  # [B, H, N, C]
        dA = dnum @ t.v_c.transpose(-1, -2) + dden[..., None]  # [B, H, N, C, C]
        dphi_q = dnum @ t.S_before.transpose(-1, -2) + dden[..., None] * t.z_before[..., None, :]
        dz_b = (t.phi_q * dden[..., None]).sum(-2)  # [B, H, N, F]
    else:
        dnum = do
        dA = dnum @ t.v_c.transpose(-1, -2)
        dphi_q = dnum @ t.S_before.transpose(-1, -2)  # [B, H, N, C, F]
        dz_b = torch.zeros_like(t.z_before)
    dA = dA.tril()
    ds = dA * polynomial(t.s, lt.dcoeffs)  # [B, H, N, C, C]
    dv_c = t.A.transpose(-1, -2) @ dnum  # [B, H, N, C, Dv]
    dS_b = t.phi_q.transpose(-1, -2) @ dnum  # [B, H, N, F, Dv]

    G = _exclusive_suffix_sum(dS_b, 2) + dS_final[:, :, None]  # [B, H, N, F, Dv]
    Gz = _exclusive_suffix_sum(dz_b, 2) + dz_final[:, :, None]  # [B, H, N, F]
    dphi_k = (t.v_c @ G.transpose(-1, -2) + Gz[..., None, :]) * t.valid  # [B, H, N, C, F]
    dv_c = dv_c + t.phi_k @ G

    dq_c = attn.scale * ds @ t.k_c + phi_backward(t.q_c, dphi_q, lt)  # [B, H, N, C, D]
    dk_c = attn.scale * ds.transpose(-1, -2) @ t.q_c + phi_backward(t.k_c, dphi_k, lt)

    dq, dqw, dqb = pre_transform_backward(
        x.q.to(dt), fm.pre, x.q_weight, x.q_bias, _unchunk(dq_c, T)
    )
    dk, dkw, dkb = pre_transform_backward(
        x.k.to(dt), fm.pre, x.k_weight, x.k_bias, _unchunk(dk_c, T)
    )
    dS0 = dz0 = None
    if x.S0 is not None:
        dS0 = (dS_final + dS_b.sum(2)).to(x.S0.dtype)
        dz0 = (dz_final + dz_b.sum(2)).to(x.z0.dtype)
    dv = _unchunk(dv_c, T)
    return Inputs(
        dq.to(x.q.dtype), dk.to(x.k.dtype), dv.to(x.v.dtype), dqw, dqb, dkw, dkb, dS0, dz0
    )
