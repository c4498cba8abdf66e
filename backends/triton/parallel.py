"""The ``parallel`` variant's forward: quadratic in T, no state, for short sequences.

Row block c of a (batch, head) is one program: ``out_i = sum_{j <= i} A_ij v_j`` and
``den_i = sum_{j <= i} A_ij`` with ``A_ij = sim(sc q'_i . k'_j)`` over the column blocks
0..c, as the chunked sweeps' diagonal chunk (``kernels.py``, the same helpers) but over
every earlier block instead of through the state; ``o = out / (den + eps)``. No state is
formed, read or stored, so only a forward with no state in or out runs here (``uses_pairs``;
any other call, and every backward, runs the chunked kernels); any D <= 64.

Session 17 (``docs/results/h100-s17/``, H100, B = 4, H = 16, D = 16, Dv = 64, bf16, graph
replay): 0.048 ms at T = 1024 against tiles 64 x 4's 0.063, 0.157 at 2048 against 0.122. A
quadratic backward (the pairs' gradients, ~fp32 as the chunked kernels form the diagonal
chunk's) passed its GPU tests but took 4.4 ms at 2048 against tiles' ~0.8, and was removed.
After that run the loop applies its masks on the diagonal block only (a uniform branch;
SASS of the loop, triton 3.6, sm_90a, 64 rows, 4 warps, bf16: 480 to ~356 instructions on an
off-diagonal block, 185 to 148 registers), and the row blocks run last-first (program 0 takes
the last row block, which walks every column block), so the shortest programs fill the last
wave. Session 18 (``docs/results/h100-s18/``, same shape): 0.046 ms at 1024 (tiles 0.061),
0.128 at 2048 (tiles 0.122); its GPU tests passed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rebased_kernels.backend import Inputs, Outputs
from rebased_kernels.spec import LinearAttention

from .kernels import _columns, _dot_A, _keep, _pre, _program, _rows_done, _sim
from .launch import call_warps, dot_precision, params, stages, triton_cdiv, triton_next_pow2
from .walk import padded_dim

NUM_WARPS = 4


@triton.jit(do_not_specialize=["T", "NORM", "NORMALIZE", "pgq_stride", "pgk_stride"])
def pairs_kernel(
    Q, QG, QB, K, KG, KB, V, O,
    T, H, D, Dv, pgq_stride, pgk_stride, NORM, NORMALIZE, sc, C0, C1, C2, eps,
    BC: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr, DOT: tl.constexpr,
):  # fmt: skip
    """Grid ``(cdiv(T, BC), B*H, cdiv(Dv, BV))``: row block c against column blocks 0..c,
    ``o`` stored for its rows and value columns."""
    c, _bh, h, tok, offs_c, offs_d, _f, offs_v, vmask = _program(T, H, Dv, BC, BD, BV)
    c = tl.num_programs(0) - 1 - c  # the longest rows (c + 1 column blocks) launch first
    rows = c * BC + offs_c  # [BC]
    rmask = rows < T
    tv_mask = rmask[:, None] & vmask[None, :]  # [BC, BV]
    o_ptrs = (tok + rows[:, None] * H) * Dv + offs_v[None, :]  # [BC, BV]
    x, _xh, _rstd = _pre(Q + tok * D, QG + h * pgq_stride, QB + h * pgq_stride, rows, rmask,
                         offs_d, D, H * D, NORM)  # [BC, BD]  # fmt: skip
    kg, kb = KG + h * pgk_stride, KB + h * pgk_stride
    out = tl.zeros([BC, BV], tl.float32)
    den = tl.zeros([BC], tl.float32)
    for j in range(0, c + 1):
        y, Wt, _wc, cmask = _columns(K, kg, kb, V, V, j, tok, offs_c, offs_d, offs_v, vmask, T,
                                     H, D, Dv, NORM, BC, False)  # [BC, BD], [BC, BV]  # fmt: skip
        _s, A = _sim(x, y, True, sc, C0, C1, C2, DOT)  # [BC, BC]
        if j == c:  # only the diagonal block has pairs to drop: later and invalid columns
            A = tl.where(_keep(j, c, cmask, offs_c, False), A, 0.0)
        out += _dot_A(A, Wt, DOT, 0)  # [BC, BV]
        den += tl.sum(A, 1)
    _rows_done(out, den, O, O, O, O, O, O, o_ptrs, tv_mask, tok, rows, rmask, H, eps,
               NORMALIZE, 0, False)  # fmt: skip


def uses_pairs(x: Inputs, final_state: bool) -> bool:
    """Whether a forward runs here: no initial state and no final state asked for."""
    return x.S0 is None and x.z0 is None and not final_state


def forward(x: Inputs, attn: LinearAttention, config: dict) -> Outputs:
    """``Outputs(o, None, None)``: o ``[B, T, H, Dv]`` from the pairs alone, in blocks of
    ``config["chunk_size"]`` rows."""
    fm = attn.feature_map
    B, T, H, D = x.q.shape
    Dv = x.v.shape[3]
    BC = int(config.get("chunk_size") or 64)
    BV = min(64, max(16, triton_next_pow2(Dv)))
    q, k, v = x.q.contiguous(), x.k.contiguous(), x.v.contiguous()
    qg, qb, qs = params(x.q_weight, x.q_bias, fm.pre, H, D, q.device)
    kg, kb, ks = params(x.k_weight, x.k_bias, fm.pre, H, D, q.device)
    o = torch.empty_like(v)
    pairs_kernel[(triton_cdiv(T, BC), B * H, triton_cdiv(Dv, BV))](
        q, qg, qb, k, kg, kb, v, o, T, H, D, Dv, qs, ks, int(fm.pre.norm), int(attn.normalize),
        float(attn.scale), *fm.quadratic_coeffs, float(attn.eps),
        BC=BC, BD=padded_dim(D), BV=BV, DOT=dot_precision(v.dtype, False),
        num_warps=call_warps(config, NUM_WARPS, "parallel", v.dtype, False),
        **stages(config, "num_stages"),
    )  # fmt: skip
    return Outputs(o, None, None)
