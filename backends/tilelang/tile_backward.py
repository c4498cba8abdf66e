"""The tile backward: the two gradient sweeps as one program per chunk, no walk (``tile``).

The backward's names are ``backward``'s (g, r, P, sim', the sweeps' states); the segments
are ``tile``'s (L tokens, chunk c of segment ``seg = c BC // L``, its first chunk ``lo``,
its last ``hi``). ``call`` gives each segment its start for the dq programs (the forward's
state of the tokens before it, summed on the sweeps' operands) and its end for the dk/dv
programs (the cotangent of the tokens after it: a reverse scan of the segments' own
cotangent sums, ``backward.cotangent_kernel``).

**dq** (``tile_dq_kernel``), query chunk c over key chunks ``j = lo .. c`` in two passes::

    num, den  = the tile forward's (state part, then A_cj V_j and A_cj 1 per key chunk)
    1 / (den + eps), r, g   stored / formed as the dq sweep's ``rows_done``
    dQ' = sum_j (P_cj o sim'_cj) K'_j + the state part (``state_grad`` of the start)

**dk/dv** (``tile_dkv_kernel``), key chunk c over query chunks ``j = c .. hi``::

    dV  = sum_j A_jc^T G_j + sum_p K^(p) (w_p Sg_end,p)
    dK' = sum_j (P_jc^T o sim') Q'_j + the state part (``state_grad`` of the end)

with g and r of each query chunk read from the dq programs' ``inv``, ``r``. Both run on the
sweeps' operands (``build.SWEEP_DTYPE``) with their numerics: exact fp32 scores, and the
cancelling pair products ``A v``, ``g v^T`` (``v g^T``) as tf32x3 when normalised
(``backward._gradient.split``); the state's products ~fp32 where it carries the caller's
(``backward.exact_state``). Each program writes its own d gamma / d beta row
(``[B ceil(T / BC), H, 16]``), summed on the host.
"""

# no `from __future__ import annotations`: TileLang reads the prim_func annotations as values
import tilelang.language as T

from .backward import Tiles, _gradient, exact_state
from .layout import DK
from .options import DEFAULT_OPTIONS, KernelOptions, Scalars
from .tiles import ACC, walk


def tile_dq_kernel(BV: int, opt: KernelOptions = DEFAULT_OPTIONS) -> T.PrimFunc:
    """The dq tile kernel (module docstring) as a ``prim_func`` of symbolic B, T, H::

        q, k, v, dO, qw, qb, kw, kb, w_0, w_1, w_2, eps, D   as ``backward.dq_kernel``'s
        L:              int32                    tokens per segment (a multiple of BC)
        S, z:           [BS, H, R, BV], [BS, H, R] float32  each segment's start (``tile``'s
                                                 rows: ``b ceil(T / L) + seg``)
        dq:             [B, T, H, 16]
        dqw, dqb:       [BP, H, 16] float32      each program's d gamma_q, d beta_q (row
                                                 ``b ceil(T / BC) + c``)
        inv, r:         [B, T, H] float32        written when normalising

    For sim = c0 dq, dqw and dqb are not written (they are zero)."""
    m = walk(BV, opt, exact_state(opt))
    dtype, BC, normalize = m.dtype, m.BC, opt.normalize
    bw = _gradient(m)
    B, Tn, H, R = m.B, m.T, m.H, m.R
    BS, BP = T.dynamic("BS, BP")
    exact = bw.exact

    @T.macro
    def key_chunk(sc, t, k, v, kw, kb, i_b, i_h, s0, before):
        """Key chunk at ``s0``: k'_j, v_j (split with ``exact``) and the scores' tiles."""
        if m.uses_x:
            T.copy(k[i_b, s0 : s0 + BC, i_h, :], t.yr)
        T.copy(v[i_b, s0 : s0 + BC, i_h, :], t.v)
        if m.uses_x:
            m.pre_transform(sc, t.yr, kw, kb, t.y, t.ymean, t.yrstd, i_h, s0)
        bw.scores(sc, t, False, before)
        if exact:
            bw.split(t.v, t.v_hi, t.v_lo)

    @T.prim_func
    def rebased_tile_dq(
        q: T.Tensor((B, Tn, H, DK), dtype),
        k: T.Tensor((B, Tn, H, DK), dtype),
        v: T.Tensor((B, Tn, H, BV), dtype),
        dO: T.Tensor((B, Tn, H, BV), dtype),
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
        S: T.Tensor((BS, H, R, BV), ACC),
        z: T.Tensor((BS, H, R), ACC),
        dq: T.Tensor((B, Tn, H, DK), dtype),
        dqw: T.Tensor((BP, H, DK), ACC),
        dqb: T.Tensor((BP, H, DK), ACC),
        inv: T.Tensor((B, Tn, H), ACC),
        r: T.Tensor((B, Tn, H), ACC),
    ):
        with T.Kernel(T.ceildiv(Tn, BC), H, B, threads=opt.threads) as (i_c, i_h, i_b):
            sc = Scalars(w_0, w_1, w_2, eps, D)
            t0 = i_c * BC
            lo, _, i_s = m.segment(i_b, i_c, L)  # the segment's first chunk, its start's row
            t = Tiles(*bw.tiles())  # (a macro returns a plain tuple)
            b_kr1 = T.alloc_shared((BC, DK), dtype, scope=m.smem)  # [BC, 16] k_j, first pass
            b_v1 = T.alloc_shared((BC, BV), dtype, scope=m.smem)  # [BC, BV] v_j, first pass
            b_y1 = T.alloc_shared((BC, DK), dtype, scope=m.smem)  # [BC, 16] k'_j, first pass
            st = m.read_state(sc, S, z, i_s, i_h)
            if m.uses_x:
                T.copy(q[i_b, t0 : t0 + BC, i_h, :], t.xr)
                m.pre_transform(sc, t.xr, qw, qb, t.x, t.mean, t.rstd, i_h, t0)
            T.copy(dO[i_b, t0 : t0 + BC, i_h, :], t.do)

            # first pass: num and den (the tile forward's), then 1 / (den + eps), r and g
            for i, e in T.Parallel(BC, BV):
                t.o[i, e] = 0.0
            m.state_out(sc, t.x, t.phi, st, t.o, t.xs)
            for i in T.Parallel(BC):
                t.den[i] = 0.0
            if normalize:
                m.inter_den(sc, t.den, st, t.x, t0)
            # serial, into k, k', v tiles of its own: TileLang 0.1.15 stages a pipeline's
            # tiles, which no other loop may then use (k' shared with the second pass was
            # indexed by stage in it but allocated once: its second stage lay on v's first,
            # and dq went wrong on an H100 wherever a segment held two chunks, session 21);
            # den's row sums from the shared A (a warp reduction here came out under a thread
            # condition that split its barrier: "ThreadSync: hoisting sync out of an if")
            t1 = t._replace(yr=b_kr1, v=b_v1, y=b_y1)
            for j in T.serial(i_c - lo + 1):
                key_chunk(sc, t1, k, v, kw, kb, i_b, i_h, (lo + j) * BC, lo + j < i_c)
                if normalize:
                    for i in T.Parallel(BC):
                        for jj in T.serial(BC):
                            t.den[i] += t.A[i, jj]
                if exact:  # A v as tf32x3: r and g . v cancel in P
                    bw.split(t.A, t.A, t.A_lo)
                    m.mma(t.A, t.v_hi, t.o)
                    m.mma(t.A_lo, t.v_hi, t.o)
                    m.mma(t.A, t.v_lo, t.o)
                else:
                    m.mma(t.A, t1.v, t.o)
            if normalize:
                bw.rows_done(sc, t, inv, r, i_b, i_h, t0)

            # second pass: dq' = sum_j (P o sim') K'_j + the state part; the LayerNorm's
            # backward
            if m.uses_x:
                for i, a in T.Parallel(BC, DK):
                    t.dx[i, a] = 0.0
                if exact:
                    bw.split(t.g, t.g, t.g_lo)
                for j in T.Pipelined(i_c - lo + 1, num_stages=opt.num_stages):
                    before = lo + j < i_c
                    key_chunk(sc, t, k, v, kw, kb, i_b, i_h, (lo + j) * BC, before)
                    if exact:
                        bw.pair_grad(t, t.g, t.v_hi, t.r, None, False, (t.g_lo, t.v_lo), before)
                    else:
                        bw.pair_grad(t, t.g, t.v, t.r, None, False, None, before)
                if exact and not m.exact_state:
                    bw.join(t.g, t.g_lo)  # the state part takes g whole
                bw.state_grad(sc, t, st, t.g, t.r, normalize, t.g_lo)
                bw.pre_transform_backward(sc, t, qw, dq, i_b, i_h, t0)
                bw.store_params(t, dqw, dqb, i_b * T.ceildiv(Tn, BC) + i_c, i_h)

    return rebased_tile_dq


def tile_dkv_kernel(BV: int, opt: KernelOptions = DEFAULT_OPTIONS) -> T.PrimFunc:
    """The dk/dv tile kernel (module docstring) as a ``prim_func`` of symbolic B, T, H::

        q, k, v, dO, qw, qb, kw, kb, w_0, w_1, w_2, eps, D   as ``backward.dkv_kernel``'s
        L:              int32                    tokens per segment (a multiple of BC)
        inv, r:         [B, T, H] float32        the dq programs' (read when normalising)
        S, z:           [BS, H, R, BV], [BS, H, R] float32  each segment's end cotangent
                                                 ``(Sg_p, zr_p)`` (rows as ``tile``'s)
        dk:             [B, T, H, 16]
        dv:             [B, T, H, BV]
        dkw, dkb:       [BP, H, 16] float32      each program's d gamma_k, d beta_k

    For sim = c0 dk, dkw and dkb are not written."""
    m = walk(BV, opt, exact_state(opt))
    dtype, BC, normalize = m.dtype, m.BC, opt.normalize
    bw = _gradient(m)
    B, Tn, H, R = m.B, m.T, m.H, m.R
    BS, BP = T.dynamic("BS, BP")
    with_z = normalize or opt.state  # whether zr is ever non-zero
    exact = bw.exact

    @T.prim_func
    def rebased_tile_dkv(
        q: T.Tensor((B, Tn, H, DK), dtype),
        k: T.Tensor((B, Tn, H, DK), dtype),
        v: T.Tensor((B, Tn, H, BV), dtype),
        dO: T.Tensor((B, Tn, H, BV), dtype),
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
        inv: T.Tensor((B, Tn, H), ACC),
        r: T.Tensor((B, Tn, H), ACC),
        S: T.Tensor((BS, H, R, BV), ACC),
        z: T.Tensor((BS, H, R), ACC),
        dk: T.Tensor((B, Tn, H, DK), dtype),
        dv: T.Tensor((B, Tn, H, BV), dtype),
        dkw: T.Tensor((BP, H, DK), ACC),
        dkb: T.Tensor((BP, H, DK), ACC),
    ):
        with T.Kernel(T.ceildiv(Tn, BC), H, B, threads=opt.threads) as (i_c, i_h, i_b):
            sc = Scalars(w_0, w_1, w_2, eps, D)
            t0 = i_c * BC
            _, hi, i_s = m.segment(i_b, i_c, L)  # the segment's last chunk, its end's row
            t = Tiles(*bw.tiles())  # (a macro returns a plain tuple)
            st = m.read_state(sc, S, z, i_s, i_h)
            if m.uses_x:
                T.copy(k[i_b, t0 : t0 + BC, i_h, :], t.xr)
                m.pre_transform(sc, t.xr, kw, kb, t.x, t.mean, t.rstd, i_h, t0)
            T.copy(v[i_b, t0 : t0 + BC, i_h, :], t.v)
            if exact:
                bw.split(t.v, t.v_hi, t.v_lo)

            # dv = sum_j A_jc^T g_j + the state part; dk' = sum_j (P^T o sim') Q'_j + ...
            for i, e in T.Parallel(BC, BV):
                t.o[i, e] = 0.0
            m.state_out(sc, t.x, t.phi, st, t.o, t.xs)
            if m.uses_x:
                for i, a in T.Parallel(BC, DK):
                    t.dx[i, a] = 0.0
            for j in T.Pipelined(hi - i_c + 1, num_stages=opt.num_stages):
                s0 = (i_c + j) * BC  # query chunk i_c + j, the diagonal first
                after = j > 0  # every pair of a later query chunk is causal
                if m.uses_x:
                    T.copy(q[i_b, s0 : s0 + BC, i_h, :], t.yr)
                T.copy(dO[i_b, s0 : s0 + BC, i_h, :], t.do)
                if normalize:
                    bw.load_scalars(t, inv, r, i_b, i_h, s0)
                    bw.scale_rows(t)
                if m.uses_x:
                    m.pre_transform(sc, t.yr, qw, qb, t.y, t.ymean, t.yrstd, i_h, s0)
                bw.scores(sc, t, True, after)
                m.mma(t.A, t.g, t.o)
                if exact:  # v g^T as tf32x3, as the dk/dv sweep's
                    bw.split(t.g, t.g, t.g_lo)
                    bw.pair_grad(t, t.v_hi, t.g, None, t.r, True, (t.v_lo, t.g_lo), after)
                elif m.uses_x:
                    bw.pair_grad(t, t.v, t.g, None, t.r, True, None, after)
            for i, e in T.Parallel(BC, BV):
                if t0 + i < Tn:
                    dv[i_b, t0 + i, i_h, e] = t.o[i, e]
            if m.uses_x:
                if m.exact_state:  # (v's split parts; t.v itself is whole)
                    bw.state_grad(sc, t, st, t.v_hi, None, with_z, t.v_lo)
                else:
                    bw.state_grad(sc, t, st, t.v, None, with_z)
                bw.pre_transform_backward(sc, t, kw, dk, i_b, i_h, t0)
                bw.store_params(t, dkw, dkb, i_b * T.ceildiv(Tn, BC) + i_c, i_h)

    return rebased_tile_dkv
