"""The ``parallel`` variant: quadratic in T, no state, for short sequences.

Row block c of a (batch, head) is one program: ``out_i = sum_{j <= i} A_ij W_j`` and
``den_i = sum_{j <= i} A_ij w_j`` with ``A_ij = sim(sc x'_i . y'_j)`` summed over the column
blocks 0..c (c..end when reversed), as the chunked sweeps' diagonal chunk (``kernels.py``)
but over every earlier block instead of through the state. No state is formed, read or
stored, so a call with an initial state or for the final state runs the chunked variants
(``uses_pairs``); D up to 64 runs here (the state's size does not limit it).

Forward: MODE 0. Backward: MODE 1 (dq) sums each row's ``out`` and ``den`` again, stores
``g = dO / (den + eps)`` and ``r = -(dO . out) / (den + eps)^2`` and walks the blocks a second
time for ``dq'``; MODE 2 (dk, dv; reversed, x = k, y = q, W = g, w = r) walks them once.
Work is ~T^2 / 2 pairs per (batch, head): it wins where a segment's state costs more than
its pairs (the tuner decides per shape).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rebased_kernels.backend import Inputs, Outputs
from rebased_kernels.spec import LinearAttention

from .kernels import (
    _columns,
    _dot_A,
    _keep,
    _pair_grad,
    _pre,
    _program,
    _rows_done,
    _sim,
    _store_dx,
)
from .launch import call_warps, dot_precision, params, stages, triton_cdiv, triton_next_pow2
from .walk import padded_dim

NUM_WARPS = 4
BWD_CHUNK = 32
"""The backward's blocks take at most 32 rows: at 64 both gradient kernels spill 100-600
bytes a thread (ptxas, triton 3.6, sm_90a, D = 16, Dv = 64, 4 or 8 warps); at 32 only the
dk/dv kernel of ``exact`` "x3" or "fma" does (~170-220 bytes)."""


@triton.jit(do_not_specialize=["T", "NORM", "NORMALIZE", "pgx_stride", "pgy_stride"])
def pairs_kernel(
    X, XG, XB, Y, YG, YB, W, Wsc, U, DO, OUT, GOUT, ROUT, DX, DG, DB,
    T, H, D, Dv, pgx_stride, pgy_stride, NORM, NORMALIZE, sc, C0, C1, C2, eps,
    BC: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr, MODE: tl.constexpr,
    HAS_WSC: tl.constexpr, DOT: tl.constexpr,
):  # fmt: skip
    """Grid ``(cdiv(T, BC), B*H, cdiv(Dv, BV))``: row block c against its column blocks.

    MODE 0 stores ``o = out / (den + eps)``; MODE 1 stores g, r (``GOUT``, ``ROUT``) and
    ``dq``; MODE 2 (reversed) stores ``dv = out`` and ``dk``; modes 1 and 2 store the block's
    ``(d gamma, d beta)`` sums at ``DG``, ``DB`` ``[B*H, cdiv(T, BC), BD]`` and need
    ``BV >= Dv``."""
    c, bh, h, tok, offs_c, offs_d, _f, offs_v, vmask = _program(T, H, Dv, BC, BD, BV)
    rows = c * BC + offs_c  # [BC]
    rmask = rows < T
    tv_mask = rmask[:, None] & vmask[None, :]  # [BC, BV]
    o_ptrs = (tok + rows[:, None] * H) * Dv + offs_v[None, :]  # [BC, BV]
    x, xh, rstd = _pre(X + tok * D, XG + h * pgx_stride, XB + h * pgx_stride, rows, rmask,
                       offs_d, D, H * D, NORM)  # [BC, BD] x 2, [BC]  # fmt: skip
    REVERSE: tl.constexpr = MODE == 2
    if REVERSE:
        lo, hi = c, tl.cdiv(T, BC)
    else:
        lo, hi = 0, c + 1
    yg, yb = YG + h * pgy_stride, YB + h * pgy_stride
    out = tl.zeros([BC, BV], tl.float32)
    den = tl.zeros([BC], tl.float32)
    if MODE == 2:  # U = v, u = 1 of the rows (k's side): known before the walk
        Ut = tl.load(U + o_ptrs, mask=tv_mask, other=0.0).to(tl.float32)  # [BC, BV]
        u = rmask.to(tl.float32)
    else:  # the rows' out and den: o, or (MODE 1) the weights g and r
        for j in range(lo, hi):
            y, Wt, wc, cmask = _columns(Y, yg, yb, W, Wsc, j, tok, offs_c, offs_d, offs_v,
                                        vmask, T, H, D, Dv, NORM, BC, HAS_WSC)  # fmt: skip
            _s, A = _sim(x, y, _keep(j, c, cmask, offs_c, REVERSE), sc, C0, C1, C2, DOT)
            out += _dot_A(A, Wt, DOT, MODE)  # [BC, BV]
            den += tl.sum(A * wc[None, :], 1)
        Ut, u = _rows_done(out, den, OUT, DO, U, GOUT, GOUT, ROUT, o_ptrs, tv_mask, tok, rows,
                           rmask, H, eps, NORMALIZE, MODE, True)  # fmt: skip
    if MODE != 0:
        dxp = tl.zeros([BC, BD], tl.float32)
        for j in range(lo, hi):
            y, Wt, wc, cmask = _columns(Y, yg, yb, W, Wsc, j, tok, offs_c, offs_d, offs_v,
                                        vmask, T, H, D, Dv, NORM, BC, HAS_WSC)  # fmt: skip
            keep = _keep(j, c, cmask, offs_c, REVERSE)  # [BC, BC]
            s, A = _sim(x, y, keep, sc, C0, C1, C2, DOT)
            if MODE == 2:
                out += _dot_A(A, Wt, DOT, MODE)  # dv
            dxp += _pair_grad(Ut, u, Wt, wc, s, keep, y, sc, C1, C2, DOT, MODE)
        if MODE == 2:
            tl.store(OUT + o_ptrs, out.to(OUT.dtype.element_ty), mask=tv_mask)
        dg, db = _store_dx(dxp, xh, rstd, rmask, DX, XG + h * pgx_stride, tok, rows, offs_d,
                           H, D, NORM)  # fmt: skip
        tl.store(DG + (bh * tl.num_programs(0) + c) * BD + offs_d, dg)
        tl.store(DB + (bh * tl.num_programs(0) + c) * BD + offs_d, db)


def uses_pairs(x: Inputs, final_state: bool, grads: Outputs | None = None) -> bool:
    """Whether a call runs here: no initial state, no final state asked for, and (backward)
    no cotangent of one."""
    if x.S0 is not None or x.z0 is not None or final_state:
        return False
    return grads is None or (grads.S is None and grads.z is None)


class _Call:
    """Launch arguments shared by the forward and both backward kernels of one call."""

    def __init__(self, x: Inputs, attn: LinearAttention, config: dict, backward: bool) -> None:
        fm = attn.feature_map
        self.B, self.T, self.H, self.D = x.q.shape
        self.Dv = x.v.shape[3]
        self.BD = padded_dim(self.D)
        self.BC = int(config.get("chunk_size") or 64)
        if backward:
            self.BC = min(self.BC, BWD_CHUNK)
        self.NB = triton_cdiv(self.T, self.BC)
        self.num_warps = call_warps(config, NUM_WARPS, "parallel", x.v.dtype, False)
        self.stages = stages(config, "num_stages")
        self.attn, self.fm = attn, fm
        self.C = (*fm.coeffs, 0.0, 0.0, 0.0)[:3]
        self.dot = dot_precision(x.v.dtype, backward, config.get("exact", "fma"), x.q.is_cuda)
        self.q, self.k, self.v = x.q.contiguous(), x.k.contiguous(), x.v.contiguous()
        H, D = self.H, self.D
        self.qg, self.qb, self.qg_stride = params(x.q_weight, x.q_bias, fm.pre, H, D, x.q.device)
        self.kg, self.kb, self.kg_stride = params(x.k_weight, x.k_bias, fm.pre, H, D, x.q.device)

    def launch(self, mode: int, BV: int, **t) -> None:
        """``pairs_kernel`` in ``mode``; ``t``: the tensors by kernel argument name."""
        fm, attn = self.fm, self.attn
        q, k = (self.qg, self.qb, self.qg_stride), (self.kg, self.kb, self.kg_stride)
        (xg, xb, xs), (yg, yb, ys) = (k, q) if mode == 2 else (q, k)  # rows, columns
        dummy = self.v
        pairs_kernel[(self.NB, self.B * self.H, triton_cdiv(self.Dv, BV))](
            t["X"], xg, xb, t["Y"], yg, yb, t["W"], t.get("Wsc", dummy), t.get("U", dummy),
            t.get("DO", dummy), t.get("OUT", dummy), t.get("GOUT", dummy),
            t.get("ROUT", dummy), t.get("DX", dummy), t.get("DG", dummy), t.get("DB", dummy),
            self.T, self.H, self.D, self.Dv, xs, ys, int(fm.pre.norm), int(attn.normalize),
            float(attn.scale), *self.C, float(attn.eps),
            BC=self.BC, BD=self.BD, BV=BV, MODE=mode, HAS_WSC="Wsc" in t, DOT=self.dot,
            num_warps=self.num_warps, **self.stages,
        )  # fmt: skip

    def param_grad(self, partial: torch.Tensor, p: torch.Tensor | None, used: bool):
        """Sum the kernels' per-block ``[B*H, NB, BD]`` sums into p's shape."""
        if not used or p is None:
            return None
        g = partial.reshape(self.B, self.H, -1, self.BD)[..., : self.D].sum((0, 2))
        return (g if p.dim() == 2 else g.sum(0)).to(p.dtype)


def forward(x: Inputs, attn: LinearAttention, config: dict) -> Outputs:
    """``Outputs(o, None, None)``: o ``[B, T, H, Dv]`` from the pairs alone."""
    call = _Call(x, attn, config, backward=False)
    o = torch.empty_like(call.v)
    call.launch(0, min(64, max(16, triton_next_pow2(call.Dv))), X=call.q, Y=call.k, W=call.v,
                OUT=o)  # fmt: skip
    return Outputs(o, None, None)


def backward(x: Inputs, attn: LinearAttention, config: dict, grads: Outputs) -> Inputs:
    """``(dq, dk, dv, d gamma_Q, d beta_Q, d gamma_K, d beta_K)`` of a stateless call."""
    call = _Call(x, attn, config, backward=True)
    B, T, H, Dv, dev = call.B, call.T, call.H, call.Dv, call.q.device
    BV = max(16, triton_next_pow2(Dv))
    g = torch.empty(B, T, H, Dv, device=dev, dtype=torch.float32)
    r = torch.empty(B, T, H, device=dev, dtype=torch.float32)
    dq, dk, dv = torch.empty_like(call.q), torch.empty_like(call.k), torch.empty_like(call.v)
    dgq, dbq, dgk, dbk = (torch.empty(B * H, call.NB, call.BD, device=dev, dtype=torch.float32)
                          for _ in range(4))  # fmt: skip
    call.launch(1, BV, X=call.q, Y=call.k, W=call.v, DO=grads.o.contiguous(), GOUT=g, ROUT=r,
                DX=dq, DG=dgq, DB=dbq)  # fmt: skip
    call.launch(2, BV, X=call.k, Y=call.q, W=g, Wsc=r, U=call.v, OUT=dv, DX=dk, DG=dgk, DB=dbk)
    pre = attn.feature_map.pre
    return Inputs(
        dq,
        dk,
        dv,
        call.param_grad(dgq, x.q_weight, pre.uses_gamma),
        call.param_grad(dbq, x.q_bias, pre.uses_beta),
        call.param_grad(dgk, x.k_weight, pre.uses_gamma),
        call.param_grad(dbk, x.k_bias, pre.uses_beta),
        None,
        None,
    )
