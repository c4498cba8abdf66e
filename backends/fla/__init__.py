"""``fla``: the peer, flash-linear-attention's ``parallel_rebased``, run through the spec.

Registered only when ``fla`` is installed (``pip install 'rebased-kernels[fla]'``), so the
tuner, ``tune``'s leaderboard and asv put the peer next to ours on the user's own GPU.
Honest about what it computes: fla's kernel is ``(q.k)^2`` on given q, k, quadratic in T,
without a state. The pre-transform (LayerNorm, gamma, beta) runs in PyTorch; ``c2`` and
``scale`` are folded into q'; an initial state, the final state and the normaliser's state
term go through the explicit features (``rebased_kernels.features``) in float32. Supports
kernels ``c2 s^2`` only (c0 = c1 = 0), D <= 128, float16 / bfloat16 (fla multiplies float32
in tf32, outside our float32 tolerance). On CPU it runs under ``TRITON_INTERPRET=1``, in
float16 only (the interpreter has no bfloat16: ``triton.launch.interpreter_dtype_reason``).
"""

from __future__ import annotations

import importlib.util
import os
from types import SimpleNamespace
from typing import ClassVar

import torch

from rebased_kernels.backend import Backend, Inputs, Outputs, Problem, register
from rebased_kernels.features import phi, pre_transform
from rebased_kernels.spec import LinearAttention

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


class FlaBackend(Backend):
    name = "fla"
    dtypes: ClassVar[frozenset[torch.dtype]] = frozenset({torch.float16, torch.bfloat16})
    device_types: ClassVar[frozenset[str]] = frozenset({"cuda", "cpu"} if INTERPRET else {"cuda"})
    max_degree: ClassVar[int | None] = 2
    max_D: ClassVar[int | None] = 128
    compiles: ClassVar[bool] = True
    tolerance_factor: ClassVar[float] = 4.0
    """fla takes q', k' rounded back to the half input type after the pre-transform (a
    rounding the oracle's inputs never see) and squares scores formed from them: on an H100
    (gpu profile) it measured 2.8e-2 against the 1e-2 bf16 rule (o, T=1, D=4) and 2.4e-2
    against 1.1e-2 in fp16 (dq), where ours meets the rule. Not enough for T = 1 with the
    normaliser, where the true dq is ~0 (o = v up to eps) and everything left is rounding:
    0.52 (bf16) and 8.2e-2 (fp16) against 4e-2 on an H100 (``docs/results/h100-check-s5/``);
    those two property draws fail for this peer, and only for it."""

    def unavailable_reason(self) -> str | None:
        if not INTERPRET and not torch.cuda.is_available():
            return "no CUDA GPU (set TRITON_INTERPRET=1 to run fla's kernels on the CPU, slowly)"
        return None

    def unsupported_reason(self, problem: Problem) -> str | None:
        from ..triton.launch import interpreter_dtype_reason

        if reason := interpreter_dtype_reason(problem.dtype):
            return reason
        if problem.attention.feature_map.powers != (2,):
            return "computes only c2 (scale q'.k')^2 (fla's parallel_rebased): c0 = c1 = 0"
        return super().unsupported_reason(problem)

    def forward_dense(self, x: Inputs, attn: LinearAttention, config: dict) -> Outputs:
        from fla.ops.rebased import parallel_rebased

        qs, ks, qp, kp = _stage_pre(x, attn)
        num, den = parallel_rebased(qs, ks, x.v, use_scale=False, return_both=True)
        return Outputs(*_stage_post(num, den, qp, kp, x.v, x.S0, x.z0, attn))

    def backward_dense(
        self, x: Inputs, attn: LinearAttention, config: dict, grads: Outputs
    ) -> Inputs:
        """Three vector-Jacobian products: torch.func through the PyTorch stages around
        fla's kernel, fla's own backward for the kernel (its autograd.Function predates
        torch.func, and a custom op's backward runs below the autograd dispatch)."""
        from fla.ops.rebased.parallel import ParallelBasedFunction

        pre_in = [i for i in (0, 1, 3, 4, 5, 6) if x[i] is not None]  # q, k and parameters

        def pre(*ts):
            full = list(x)
            for i, t in zip(pre_in, ts):
                full[i] = t
            return _stage_pre(Inputs(*full), attn)

        (qs, ks, qp, kp), pre_vjp = torch.func.vjp(pre, *(x[i] for i in pre_in))
        num, den = ParallelBasedFunction.apply(
            *(t.transpose(1, 2) for t in (qs, ks, x.v)), 1.0
        )  # [B, H, T, Dv], [B, H, T]
        state = [t for t in (x.S0, x.z0) if t is not None]

        def post(num, den, qp, kp, v, *st):
            S0, z0 = st if st else (None, None)
            return _stage_post(num, den, qp, kp, v, S0, z0, attn)

        _, post_vjp = torch.func.vjp(post, num, den, qp, kp, x.v, *state)
        dnum, dden, dqp, dkp, dv, *dstate = post_vjp(tuple(grads))
        ctx = SimpleNamespace(saved_tensors=tuple(t.transpose(1, 2).contiguous()
                                                  for t in (qs, ks, x.v)),
                              scale=1.0, _fwd_used_autocast=False, _dtype=None)  # fmt: skip
        dqs, dks, dv_fla, _ = ParallelBasedFunction.backward(
            ctx, dnum.to(num.dtype).contiguous(), dden.to(den.dtype).contiguous()
        )
        d_pre = pre_vjp((dqs.transpose(1, 2).to(qs.dtype), dks.transpose(1, 2).to(ks.dtype),
                         dqp, dkp))  # fmt: skip
        result: list[torch.Tensor | None] = [None] * len(x)
        for i, g in zip(pre_in, d_pre):
            result[i] = g
        result[2] = (dv + dv_fla.transpose(1, 2).to(dv.dtype)).to(x.v.dtype)
        if state:
            result[7], result[8] = dstate
        return Inputs(*result)


def _stage_pre(x: Inputs, attn: LinearAttention):
    """``(q'' [B, T, H, D], k' in the input dtype; q', k' in float32)``, with
    ``(q'' . k')^2 = c2 (scale q' . k')^2``."""
    fm = attn.feature_map
    qp = pre_transform(x.q.to(torch.float32), fm.pre, x.q_weight, x.q_bias)  # [B, T, H, D]
    kp = pre_transform(x.k.to(torch.float32), fm.pre, x.k_weight, x.k_bias)  # [B, T, H, D]
    fold = attn.scale * fm.coeffs[2] ** 0.5
    return (qp * fold).to(x.v.dtype), kp.to(x.v.dtype), qp, kp


def _stage_post(num, den, qp, kp, v, S0, z0, attn: LinearAttention):
    """fla's ``(num [B, H, T, Dv], den [B, H, T])`` plus the state terms -> (o, S, z)."""
    fm, f32 = attn.feature_map, torch.float32
    num, den = num.transpose(1, 2).to(f32), den.transpose(1, 2).to(f32)
    phi_k = phi(kp, fm, attn.scale)  # [B, T, H, F]
    S = torch.einsum("bthf,bthe->bhfe", phi_k, v.to(f32))
    z = phi_k.sum(1)
    if S0 is not None:
        phi_q = phi(qp, fm, attn.scale)  # [B, T, H, F]
        num = num + torch.einsum("bthf,bhfe->bthe", phi_q, S0.to(f32))
        den = den + torch.einsum("bthf,bhf->bth", phi_q, z0.to(f32))
        S, z = S + S0.to(f32), z + z0.to(f32)
    o = num / (den + attn.eps)[..., None] if attn.normalize else num
    return o.to(v.dtype), S, z


if importlib.util.find_spec("fla") is not None:
    register(FlaBackend())
