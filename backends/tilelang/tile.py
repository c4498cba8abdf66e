"""The tile forward: one program per chunk, no walk (triton's ``tiles`` design in TileLang).

Every other TileLang kernel walks its chunks in order, one program per (batch, head) or
segment: per 64-token chunk a program runs the scores, ``A V``, the 256-feature map, the
state product and the state update one after the other (~7.8 us a chunk on an H100,
session 19), and no split into segments took the forward under 2.2 ms at issue 4's shape.
Here the sequence is cut into segments of ``L`` tokens (a multiple of BC); ``call`` sums
each segment's own state (``kernels.state_kernel``, one product a chunk), a torch scan gives
each segment its start ``S_seg = S_0 + sum_{s' < seg} S_own[s']``, and chunk ``c`` of segment
``seg = c BC // L`` is one independent program (``tile_forward_kernel``)::

    num = sum_p Q^(p) (w_p S_seg,p) + sum_{j = lo}^{c} A_cj V_j      [BC, BV]
    den = sum_p w_p Q^(p) z_seg,p   + sum_{j = lo}^{c} A_cj 1        [BC]
    o   = num / (den + eps)

with ``lo = seg L / BC`` the segment's first chunk, ``A_cj = sim(Q K_j^T)`` whole for
``j < c`` and causal on the diagonal ``j = c``: a chunk takes at most ``L / BC`` key chunks
quadratically (``T.Pipelined``) and the state once, with no state update and no chain from
chunk to chunk. The pieces are ``tiles.walk``'s (``pre_transform``, ``scores``,
``similarities``, ``state_out``, ``inter_den``), so the numerics are the walk's.
"""

# no `from __future__ import annotations`: TileLang reads the prim_func annotations as values
import tilelang.language as T

from .kernels import exact_state
from .layout import DK
from .options import DEFAULT_OPTIONS, KernelOptions, Scalars
from .tiles import ACC, F, walk


def tile_forward_kernel(BV: int, opt: KernelOptions = DEFAULT_OPTIONS) -> T.PrimFunc:
    """The tile forward of ``sim = c0 + c1 s + c2 s^2`` (``s = scale q' . k'``).

    Arguments of the returned ``prim_func`` (B, T, H and the segments' count BS symbolic)::

        q, k:            [B, T, H, 16] dtype   (columns >= D: zeros)
        v:               [B, T, H, BV] dtype
        qw, qb, kw, kb:  [H, 16] float32        gamma, beta (as ``kernels.forward_kernel``)
        w_0, w_1, w_2, eps: float32; D: int32   ``options.Scalars``
        L:               int32                  tokens per segment, a multiple of BC
        o:               [B, T, H, BV] dtype    o_i = num_i / (den_i + eps) (num_i without
                                                normalize), num and den as the module says
        S:               [BS, H, R, BV] float32 each segment's start S_seg (``layout``'s
                                                stacked unscaled blocks), BS = B ceil(T / L),
                                                segment ``seg`` of batch b at ``b ceil(T / L)
                                                + seg``
        z:               [BS, H, R] float32     each segment's start z_seg

    The starts are read, never written (``call`` forms the final state from the sums);
    ``opt.state`` says whether they carry the caller's initial state, and then the state's
    products are ``kernels.exact_state``'s (~fp32 in the fp32 kernel such a call runs),
    else the input dtype's (tf32 in fp32), as the walk's own state's. Raises ``ValueError``
    for what ``tiles.walk`` refuses."""
    m = walk(BV, opt, exact_state(opt))
    dtype, BC, normalize = m.dtype, m.BC, opt.normalize
    B, Tn, H, R, smem = m.B, m.T, m.H, m.R, m.smem
    BS = T.dynamic("BS")

    @T.prim_func
    def rebased_tile_forward(
        q: T.Tensor((B, Tn, H, DK), dtype),
        k: T.Tensor((B, Tn, H, DK), dtype),
        v: T.Tensor((B, Tn, H, BV), dtype),
        qw: T.Tensor((H, DK), ACC),
        qb: T.Tensor((H, DK), ACC),
        kw: T.Tensor((H, DK), ACC),
        kb: T.Tensor((H, DK), ACC),
        w_0: T.float32,
        w_1: T.float32,
        w_2: T.float32,
        eps: T.float32,
        D: T.int32,
        L: T.int32,
        o: T.Tensor((B, Tn, H, BV), dtype),
        S: T.Tensor((BS, H, R, BV), ACC),
        z: T.Tensor((BS, H, R), ACC),
    ):
        with T.Kernel(T.ceildiv(Tn, BC), H, B, threads=opt.threads) as (i_c, i_h, i_b):
            sc = Scalars(w_0, w_1, w_2, eps, D)
            t0 = i_c * BC
            lo, _, i_s = m.segment(i_b, i_c, L)  # the segment's first chunk, its start's row
            b_v = T.alloc_shared((BC, BV), dtype, scope=smem)  # [BC, BV] V_j
            b_A = T.alloc_shared((BC, BC), dtype, scope=smem)  # [BC, BC] A_cj as an operand
            b_s = T.alloc_fragment((BC, BC), ACC)  # [BC, BC] Q K_j^T, then A_cj
            b_o = T.alloc_fragment((BC, BV), ACC)  # [BC, BV] numerator
            b_den = T.alloc_fragment((BC,), ACC)  # [BC] denominator
            b_dj = T.alloc_fragment((BC,), ACC)  # [BC] A_cj 1
            b_dsh = T.alloc_shared((BC,), ACC, scope=smem)  # [BC] den for the store
            b_q = T.alloc_shared((BC, DK), dtype, scope=smem)  # [BC, 16] q'
            b_k = T.alloc_shared((BC, DK), dtype, scope=smem)  # [BC, 16] k'_j
            b_phi = b_xs = b_q32 = b_k32 = None
            if m.exact_state and m.has1:  # [BC, 16] fp32 q' split (``tiles.walk.state_out``)
                b_xs = T.alloc_shared((BC, DK), ACC, scope=smem)
            if m.uses_x:
                b_qr = T.alloc_shared((BC, DK), dtype, scope=smem)  # [BC, 16] q as loaded
                b_kr = T.alloc_shared((BC, DK), dtype, scope=smem)  # [BC, 16] k_j as loaded
                b_mean = T.alloc_fragment((BC,), ACC)  # [BC] LayerNorm mean
                b_rstd = T.alloc_fragment((BC,), ACC)  # [BC] LayerNorm 1 / sqrt(var + eps)
                if dtype != ACC:  # the scores' fp32 operands of a half kernel (as the walk's)
                    b_q32 = T.alloc_shared((BC, DK), ACC, scope=smem)  # [BC, 16] q' unrounded
                    b_k32 = T.alloc_shared((BC, DK), ACC, scope=smem)  # [BC, 16] k' unrounded
            if m.has2:
                b_phi = T.alloc_shared((BC, F), dtype, scope=smem)  # [BC, 256] Q^(2)
            st = m.read_state(sc, S, z, i_s, i_h)  # the segment's start (tiles.Block)

            if m.uses_x:
                T.copy(q[i_b, t0 : t0 + BC, i_h, :], b_qr)
                m.pre_transform(sc, b_qr, qw, qb, b_q, b_mean, b_rstd, i_h, t0, b_q32)
            for i, e in T.Parallel(BC, BV):
                b_o[i, e] = 0.0
            m.state_out(sc, b_q, b_phi, st, b_o, b_xs)  # sum_p Q^(p) (w_p S_seg,p)
            for i in T.Parallel(BC):
                b_den[i] = 0.0
            if normalize:
                m.inter_den(sc, b_den, st, b_q, t0)

            for j in T.Pipelined(i_c - lo + 1, num_stages=opt.num_stages):
                s0 = (lo + j) * BC  # key chunk lo + j, the diagonal last
                if m.uses_x:
                    T.copy(k[i_b, s0 : s0 + BC, i_h, :], b_kr)
                T.copy(v[i_b, s0 : s0 + BC, i_h, :], b_v)
                if m.uses_x:
                    m.pre_transform(sc, b_kr, kw, kb, b_k, b_mean, b_rstd, i_h, s0, b_k32)
                if b_q32 is None:
                    m.scores(b_q, b_k, b_s, m.exact_state)
                else:
                    m.scores(b_q32, b_k32, b_s)
                m.similarities(sc, b_s, b_A, b_dj if normalize else None, False, lo + j < i_c)
                if normalize:
                    for i in T.Parallel(BC):
                        b_den[i] += b_dj[i]
                m.mma(b_A, b_v, b_o)

            if normalize:
                T.copy(b_den, b_dsh)
            for i, e in T.Parallel(BC, BV):
                if t0 + i < Tn:
                    if normalize:
                        o[i_b, t0 + i, i_h, e] = b_o[i, e] / (b_dsh[i] + sc.eps)
                    else:
                        o[i_b, t0 + i, i_h, e] = b_o[i, e]

    return rebased_tile_forward
