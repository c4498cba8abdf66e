"""TileLang kernels of the ReBased backward: two chunk walks, one (batch, head) per program.

Legend: ``kernels``' (``BC, DK, BV``, a power ``p``, ``w_p = c_p scale^p``, eps and D: the
kernel's scalar arguments ``sc``, the unscaled features ``x^(p)``, the state ``S_p, z_p``),
and per token i::

    g_i   = dO_i / (den_i + eps)             [BV]   (dO_i without normalize)
    r_i   = -(dO_i . num_i) / (den_i + eps)^2       (dL / d den_i; 0 without normalize)
    P_ij  = g_i . v_j + r_i                         (dL / dA_ij)
    sim'  = w_1 + 2 w_2 (q' . k')                   (d sim / d (q' . k'))

**dq sweep** (``dq_kernel``: chunks in order from the initial state, the forward's walk
recomputed with ``tiles.walk``'s macros). Per chunk, rows Q', K', V, dO::

    A, num, den   as the forward;  1 / (den + eps) and r stored per token (fp32)
    P      = G V^T + r 1^T                                   [BC, BC]  (T.gemm)
    dQ'    = (P o sim'(Q' K'^T)) K'                          [BC, 16]  (T.gemm, causal pairs)
           + sum_p w_p dQ^(p)/dQ' . (S_p G_i + z_p r_i)      (the state part, below)
    dq, d gamma_q, d beta_q   the LayerNorm + affine backward of dQ'
    S_p += K^(p)T V,  z_p += K^(p)T 1                        (as the forward)

**dk/dv sweep** (``dkv_kernel``: chunks in reverse). Its state is that of the later tokens,
``Sg_p = dS_p / w_p + sum_{later i} q_i^(p) g_i^T`` and ``zr_p = dz_p / w_p + sum q_i^(p) r_i``
(dS_p, dz_p: the cotangent of the final kernel state); it is the forward's walk with
x = k, y = q, W = g, w = r and the causal pairs transposed. Per chunk::

    dV     = A^T G + sum_p K^(p) (w_p Sg_p),  A^T_ji = sim(k'_j . q'_i) for i >= j
    P^T    = V G^T + 1 r^T
    dK'    = (P^T o sim'(K' Q'^T)) Q' + sum_p w_p dK^(p)/dK' . (Sg_p v_j + zr_p)
    dk, d gamma_k, d beta_k
    Sg_p += Q^(p)T G,  zr_p += Q^(p)T r

and at the end ``(Sg_p, zr_p)`` (all tokens, the cotangent included) is the gradient of the
initial state in the same convention (``call`` maps both ends to the canonical layout).

The state part of power 2: with ``U = G (w_2 S_2)^T + r (w_2 z_2)^T`` ([BC, 256], a T.gemm),
``dx'_a = 2 sum_b U[16 a + b] x'_b`` (S_2 and z_2 are symmetric in a, b), formed as the
T.gemm ``(2 U o x'_b) E`` with the one-hot ``E [256, 16]``, ``E[16 a + b, a] = 1``; power 1
adds ``G (w_1 S_1)^T + w_1 r z_1^T``. The per-program sums of d gamma, d beta are written
to ``[B, H, 16]`` and reduced over B on the host. Operands of the T.gemm are in the input
dtype (g, P o sim', U o x' rounded to it); the accumulators, statistics, 1 / (den + eps)
and r are fp32. The backend runs these sweeps in fp32 for every input dtype
(``build.SWEEP_DTYPE``: tf32 products); there the scores are fp32 FMAs and, normalised,
the products whose sum ``P = g . v + r`` cancels (the dq sweep's ``A V`` and ``G V^T``, the
dk/dv sweep's ``V G^T``) are tf32x3 (``split``). ``target="c"`` as for the forward.
"""

# no `from __future__ import annotations`: TileLang reads the prim_func annotations as values
from types import SimpleNamespace
from typing import Any, NamedTuple

import tilelang.language as T

from .kernels import exact_state as forward_exact_state
from .layout import DK
from .options import DEFAULT_OPTIONS, KernelOptions, Scalars
from .tiles import ACC, Block, F, walk


class Tiles(NamedTuple):
    """The on-chip tiles of one sweep (x: the rows whose gradient it computes, y: the rows
    they attend to; None where the kernel has no use for them)."""

    xr: Any  # [BC, 16] x rows as loaded
    yr: Any  # [BC, 16] y rows as loaded
    x: Any  # [BC, 16] x'
    y: Any  # [BC, 16] y'
    yt: Any  # [16, BC] y'^T, the K-major operand of (P o sim') Y' (see pair_grad)
    mean: Any  # [BC] LayerNorm mean of x (fp32)
    rstd: Any  # [BC] LayerNorm 1 / sqrt(var + eps) of x (fp32)
    ymean: Any  # [BC] the same of y (scratch)
    yrstd: Any  # [BC]
    v: Any  # [BC, BV]
    do: Any  # [BC, BV] dO
    g: Any  # [BC, BV] g = dO / (den + eps) (dO itself without normalize)
    inv: Any  # [BC] 1 / (den + eps) (fp32)
    r: Any  # [BC] r (fp32)
    s: Any  # [BC, BC] x' y'^T, then A (fp32)
    ds: Any  # [BC, BC] sim'(x' y'^T) (fp32)
    P: Any  # [BC, BC] U W^T (fp32)
    A: Any  # [BC, BC] A, then P o sim', as operands
    o: Any  # [BC, BV] out = A W + state (fp32)
    den: Any  # [BC] den (fp32)
    red: Any  # [BC] row sums (fp32)
    dx: Any  # [BC, 16] dx' (fp32)
    dxs: Any  # [BC, 16] dx' for the LayerNorm backward (fp32)
    sum1: Any  # [BC] sum_d gamma_d dx'_d (fp32)
    sum2: Any  # [BC] sum_d gamma_d dx'_d xhat_d (fp32)
    dg: Any  # [BC, 16] per-row d gamma sums (fp32)
    db: Any  # [BC, 16] per-row d beta sums (fp32)
    dgs: Any  # [16] the program's d gamma (fp32)
    dbs: Any  # [16] the program's d beta (fp32)
    phi: Any  # [BC, 256] X^(2), Y^(2) or 2 U o x' as operands
    U: Any  # [BC, 256] U (fp32)
    E: Any  # [16, 256] the one-hot E^T (K-major, as yt)
    A_lo: Any  # [BC, BC] fp32 A - hi(A) (normalised sweeps: ``split``; else None)
    v_hi: Any  # [BC, BV] fp32 hi(v), v_lo: v - hi(v)
    v_lo: Any
    g_lo: Any  # [BC, BV] fp32 g - hi(g) (g itself holds hi(g) after the split)
    xs: Any  # [BC, 16] fp32 x' split for the power-1 state product (``exact_state``, Based)


def _gradient(m: SimpleNamespace) -> SimpleNamespace:
    """The backward's macros on top of ``tiles.walk``'s (``m``)."""
    BC, BV, dtype, smem, Tn = m.BC, m.BV, m.dtype, m.smem, m.T
    exact = m.normalize and m.uses_x and dtype == ACC  # the fp32 sweeps split (``split``)

    def one(b, i):
        """``b[i]``, or 1 for ``b = None``."""
        return 1.0 if b is None else b[i]

    @T.macro
    def tiles():
        """Allocate the ``Tiles`` of a sweep (shapes and roles: ``Tiles``) and fill E."""
        b_xr = b_yr = b_yt = b_mean = b_rstd = b_ymean = b_yrstd = None
        b_dx = b_dxs = b_sum1 = b_sum2 = b_dg = b_db = b_dgs = b_dbs = None
        b_phi = b_U = b_E = None
        b_x = T.alloc_shared((BC, DK), dtype, scope=smem)
        b_y = T.alloc_shared((BC, DK), dtype, scope=smem)
        if m.uses_x:
            b_xr = T.alloc_shared((BC, DK), dtype, scope=smem)
            b_yr = T.alloc_shared((BC, DK), dtype, scope=smem)
            b_yt = T.alloc_shared((DK, BC), dtype, scope=smem)
            b_mean = T.alloc_fragment((BC,), ACC)
            b_rstd = T.alloc_fragment((BC,), ACC)
            b_ymean = T.alloc_fragment((BC,), ACC)
            b_yrstd = T.alloc_fragment((BC,), ACC)
            b_dx = T.alloc_fragment((BC, DK), ACC)
            b_dxs = T.alloc_shared((BC, DK), ACC, scope=smem)
            b_sum1 = T.alloc_fragment((BC,), ACC)
            b_sum2 = T.alloc_fragment((BC,), ACC)
            b_dg = T.alloc_shared((BC, DK), ACC, scope=smem)
            b_db = T.alloc_shared((BC, DK), ACC, scope=smem)
            b_dgs = T.alloc_fragment((DK,), ACC)
            b_dbs = T.alloc_fragment((DK,), ACC)
            for i, d in T.Parallel(BC, DK):
                b_dg[i, d] = 0.0
                b_db[i, d] = 0.0
        b_v = T.alloc_shared((BC, BV), dtype, scope=smem)
        b_do = T.alloc_shared((BC, BV), dtype, scope=smem)
        b_g = T.alloc_shared((BC, BV), dtype, scope=smem) if m.normalize else None
        b_inv = T.alloc_shared((BC,), ACC, scope=smem)
        b_r = T.alloc_shared((BC,), ACC, scope=smem)
        b_s = T.alloc_fragment((BC, BC), ACC)
        b_ds = T.alloc_fragment((BC, BC), ACC)
        b_P = T.alloc_fragment((BC, BC), ACC)
        b_A = T.alloc_shared((BC, BC), dtype, scope=smem)
        b_o = T.alloc_fragment((BC, BV), ACC)
        b_den = T.alloc_fragment((BC,), ACC)
        b_red = T.alloc_fragment((BC,), ACC)
        b_lo = (None, None, None, None)
        b_xs = None
        if m.exact_state and m.has1:
            b_xs = T.alloc_shared((BC, DK), ACC, scope=smem)
        if exact:  # the cancelling pair products' split tiles (``split``)
            b_lo = (T.alloc_shared((BC, BC), ACC, scope=smem),  # [BC, BC] A_lo
                    T.alloc_shared((BC, BV), ACC, scope=smem),  # [BC, BV] v_hi
                    T.alloc_shared((BC, BV), ACC, scope=smem),  # [BC, BV] v_lo
                    T.alloc_shared((BC, BV), ACC, scope=smem))  # [BC, BV] g_lo  # fmt: skip
        if m.has2:
            b_phi = T.alloc_shared((BC, F), dtype, scope=smem)
            b_U = T.alloc_fragment((BC, F), ACC)
            b_E = T.alloc_shared((DK, F), dtype, scope=smem)
            for a, f in T.Parallel(DK, F):
                b_E[a, f] = T.if_then_else(f // DK == a, T.cast(1.0, dtype), T.cast(0.0, dtype))
        return Tiles(
            b_xr, b_yr, b_x, b_y, b_yt, b_mean, b_rstd, b_ymean, b_yrstd, b_v, b_do,
            b_g if m.normalize else b_do, b_inv, b_r, b_s, b_ds, b_P, b_A, b_o, b_den, b_red,
            b_dx, b_dxs, b_sum1, b_sum2, b_dg, b_db, b_dgs, b_dbs, b_phi, b_U, b_E, *b_lo, b_xs,
        )  # fmt: skip

    @T.macro
    def scores(sc, t, reverse, before=None):
        """``t.ds = sim'(x' y'^T)``, then ``t.s = A`` and its operand ``t.A`` (causal pairs
        ``j <= i``, or ``j >= i`` when ``reverse``); ``t.den = A 1`` in the forward order.
        ``before`` (the tile sweeps', ``tile_backward``): every pair of this y chunk is causal
        when it holds, and no row sums are taken (the caller sums ``t.A``)."""
        m.scores(t.x, t.y, t.s, True)  # exact fp32 scores (tiles.scores)
        if m.uses_x:
            for i, j in T.Parallel(BC, BC):
                t.ds[i, j] = m.derivative(sc, t.s[i, j])
        rows = t.den if before is None and not reverse and m.normalize else None
        m.similarities(sc, t.s, t.A, rows, reverse, before)

    @T.macro
    def scale_rows(t):
        """``t.g = dO * (1 / (den + eps))`` row by row, rounded to dtype."""
        for i, e in T.Parallel(BC, BV):
            t.g[i, e] = T.cast(T.cast(t.do[i, e], ACC) * t.inv[i], dtype)

    @T.macro
    def rows_done(sc, t, inv, r, i_b, i_h, t0):
        """From ``t.o = num`` and ``t.den``: ``1 / (den + eps)`` and
        ``r = -(dO . num) / (den + eps)^2`` into ``t.inv, t.r`` and ``inv, r [B, T, H]``;
        then ``t.g``."""
        for i, e in T.Parallel(BC, BV):
            t.o[i, e] = t.o[i, e] * T.cast(t.do[i, e], ACC)
        m.row_sum(t.o, t.red, 1, True)
        for i in T.Parallel(BC):  # (reads registers only: no shared-memory hazard inside)
            inv_i = 1.0 / (t.den[i] + sc.eps)
            t.inv[i] = inv_i
            t.r[i] = -t.red[i] * inv_i * inv_i
            if t0 + i < Tn:
                inv[i_b, t0 + i, i_h] = inv_i
                r[i_b, t0 + i, i_h] = -t.red[i] * inv_i * inv_i
        scale_rows(t)

    @T.macro
    def load_scalars(t, inv, r, i_b, i_h, t0):
        """``t.inv, t.r``: the dq sweep's per-token values of this chunk (0 past T), staged in
        registers (``t.den``, ``t.red``): on Hopper a global -> shared copy goes to the producer
        warpgroup, which then gets as many threads as the consumers (512 in all, 128 registers
        a thread: spills)."""
        for i in T.Parallel(BC):
            row = T.min(t0 + i, Tn - 1)
            t.den[i] = T.if_then_else(t0 + i < Tn, inv[i_b, row, i_h], 0.0)
            t.red[i] = T.if_then_else(t0 + i < Tn, r[i_b, row, i_h], 0.0)
        for i in T.Parallel(BC):
            t.inv[i] = t.den[i]
            t.r[i] = t.red[i]

    @T.macro
    def split(b_src, b_hi, b_lo):
        """``b_src = b_hi + b_lo`` exactly (2-D fp32 shared tiles; ``b_hi`` may be
        ``b_src``): ``b_hi`` keeps the 11 leading significant bits tf32 multiplies with (the
        low 13 cleared), ``b_lo`` the rest, so that ``a b ~ a_hi b_hi + a_lo b_hi + a_hi b_lo``
        in three tf32 ``T.gemm`` loses ~2^-22, not 2^-11: in a normalised sweep the pair
        gradient ``g . v + r`` cancels to O(eps) where one key dominates a small denominator
        (tf32 products measured dq errors of 3e-2 to 0.18 at T = 1 on an H200, session 11)."""
        rows, cols = b_src.shape
        for i, j in T.Parallel(rows, cols):
            bits = T.reinterpret(b_src[i, j], "uint32") & T.uint32(0xFFFFE000)
            b_lo[i, j] = b_src[i, j] - T.reinterpret(bits, ACC)
        for i, j in T.Parallel(rows, cols):
            b_hi[i, j] = b_src[i, j] - b_lo[i, j]

    @T.macro
    def join(b_hi, b_lo):
        """``b_hi += b_lo``: a split tile whole again (exact), for its later exact uses."""
        rows, cols = b_hi.shape
        for i, j in T.Parallel(rows, cols):
            b_hi[i, j] = b_hi[i, j] + b_lo[i, j]

    @T.macro
    def pair_grad(t, b_U, b_W, b_u, b_w, reverse, lo=None, before=None):
        """``t.dx = sum_j (U_i . W_j + u_i w_j) sim'(s_ij) y'_j`` over the causal pairs
        (``u_i w_j`` only when normalising; a None vector is 1). Y' is read from ``t.yt``, its
        transpose: as the N-major B of this product, a 16-column tile has no layout that
        Hopper's wgmma descriptors take (TileLang 0.1.15 asserts), K-major it has. With
        ``lo = (U_lo, W_lo)`` (``split``: b_U, b_W hold the hi parts) ``U W^T`` is three
        products. ``before`` (the tile sweeps'): every pair is causal when it holds, and
        ``t.dx`` accumulates over the y chunks (the caller zeroes it)."""
        for d, j in T.Parallel(DK, BC):
            t.yt[d, j] = t.y[j, d]
        for i, j in T.Parallel(BC, BC):
            t.P[i, j] = 0.0
        m.mma(b_U, b_W, t.P, transpose_B=True)
        if lo is not None:
            m.mma(lo[0], b_W, t.P, transpose_B=True)
            m.mma(b_U, lo[1], t.P, transpose_B=True)
        for i, j in T.Parallel(BC, BC):
            dA = t.P[i, j] + one(b_u, i) * one(b_w, j) if m.normalize else t.P[i, j]
            keep = m.causal(i, j, reverse)
            if before is not None:
                keep = T.Or(before, keep)
            t.A[i, j] = T.if_then_else(keep, T.cast(dA * t.ds[i, j], dtype), T.cast(0, dtype))
        if before is None:
            for i, a in T.Parallel(BC, DK):
                t.dx[i, a] = 0.0
        m.mma(t.A, t.yt, t.dx, transpose_B=True)

    def quad_grad(sc, t, st, b_u, with_z, i, f):
        """``2 (U + u (w_2 z_2))[i, f] x'[i, f % 16]``: row i's term f of the power-2 state
        part of dx' (fp32; ``z_2 u`` only ``with_z``)."""
        Uz = t.U[i, f] + one(b_u, i) * sc[2] * st[2].z[f] if with_z else t.U[i, f]
        return 2.0 * Uz * T.cast(t.x[i, f % DK], ACC)

    @T.macro
    def state_grad(sc, t, st, b_U, b_u, with_z, b_U_lo=None):
        """``t.dx += sum_p w_p d x^(p)/dx' . (S_p U_i + z_p u_i)`` for the rows ``b_U``
        (``z_p u_i`` only ``with_z``; u = None is 1). With ``m.exact_state`` (b_U, b_U_lo:
        the hi and lo parts of U) ~fp32: ``U S^T`` in three tf32 products
        (``walk.state_product``) and the sum over E of both parts of ``2 (U + u z) x'``."""
        if m.has2:
            for i, f in T.Parallel(BC, F):
                t.U[i, f] = 0.0
            m.state_product(sc, st, 2, b_U, t.U, True, b_U_lo)
            if m.exact_state:  # E is one-hot, exact: hi and lo each summed as they are
                for i, f in T.Parallel(BC, F):
                    t.phi[i, f] = m.tf32_hi(quad_grad(sc, t, st, b_u, with_z, i, f))
                m.mma(t.phi, t.E, t.dx, transpose_B=True)
                for i, f in T.Parallel(BC, F):
                    t.phi[i, f] = m.part(quad_grad(sc, t, st, b_u, with_z, i, f), "lo")
            else:
                for i, f in T.Parallel(BC, F):
                    t.phi[i, f] = T.cast(quad_grad(sc, t, st, b_u, with_z, i, f), dtype)
            m.mma(t.phi, t.E, t.dx, transpose_B=True)
        if m.has1:
            m.state_product(sc, st, 1, b_U, t.dx, True, b_U_lo)
            if with_z:
                for i, a in T.Parallel(BC, DK):
                    t.dx[i, a] += one(b_u, i) * sc[1] * st[1].z[a]

    @T.macro
    def pre_transform_backward(sc, t, gamma, dx, i_b, i_h, t0):
        """``dx [B, T, H, 16]`` (this chunk's rows; its first ``sc.D`` columns are used) from
        ``dx' = t.dx`` through ``x' = gamma * xhat + beta``, ``xhat = LN(x)`` (x itself
        without ``norm``), the means over the first D columns::

            dxhat = gamma dx',  dx = rstd (dxhat - mean_d(dxhat) - xhat mean_d(dxhat xhat))

        and the per-row sums ``t.dg += dx' xhat``, ``t.db += dx'`` (valid rows only; dx' is
        exactly zero in the columns >= D, where x' is, and so are these sums)."""
        T.copy(t.dx, t.dxs)
        for i in T.Parallel(BC):
            t.sum1[i] = 0.0
            t.sum2[i] = 0.0
            if m.norm:
                for d in T.serial(sc.D):
                    dxhat = gamma[i_h, d] * t.dxs[i, d]
                    t.sum1[i] += dxhat
                    t.sum2[i] += dxhat * (T.cast(t.xr[i, d], ACC) - t.mean[i]) * t.rstd[i]
        for i, d in T.Parallel(BC, DK):
            keep = t0 + i < Tn
            xhat = (T.cast(t.xr[i, d], ACC) - t.mean[i]) * t.rstd[i]
            dxp = T.if_then_else(keep, t.dxs[i, d], 0.0)
            t.dg[i, d] += dxp * xhat
            t.db[i, d] += dxp
            if keep:
                dxhat = gamma[i_h, d] * dxp
                if m.norm:
                    total = dxhat - (t.sum1[i] + xhat * t.sum2[i]) / T.cast(sc.D, ACC)
                    dx[i_b, t0 + i, i_h, d] = T.cast(t.rstd[i] * total, dtype)
                else:
                    dx[i_b, t0 + i, i_h, d] = T.cast(dxhat, dtype)

    @T.macro
    def store_params(t, dgamma, dbeta, i_b, i_h):
        """The program's d gamma, d beta ``[B, H, 16]``: the per-row sums summed (zero in
        the columns >= D)."""
        m.row_sum(t.dg, t.dgs, 0, False)
        m.row_sum(t.db, t.dbs, 0, False)
        for d in T.Parallel(DK):
            dgamma[i_b, i_h, d] = t.dgs[d]
            dbeta[i_b, i_h, d] = t.dbs[d]

    return SimpleNamespace(
        exact=exact, tiles=tiles, scores=scores, scale_rows=scale_rows, rows_done=rows_done,
        split=split, join=join,
        load_scalars=load_scalars, pair_grad=pair_grad, state_grad=state_grad,
        pre_transform_backward=pre_transform_backward, store_params=store_params,
    )  # fmt: skip


def exact_state(opt: KernelOptions) -> bool:
    """Whether a gradient sweep multiplies by its state to ~fp32 (``walk``'s
    ``exact_state``): where the state carries the caller's (``opt.state``: the dq sweep's
    initial state, the dk/dv sweep's final-state cotangent) in a normalised fp32 sweep of a
    map that reads q', k'. There the state's part of P (``g . S q^(p)``) meets r's (``r z``)
    and they cancel: tf32 state products measured d gamma_q errors of 1.2e-2 (fp32) and
    2.3e-2 (bf16, fp16) against the float64 oracle on an H100 (session 19; T = 11, D = 4,
    gamma_x2), as triton's did in session 18 (``packed_call.CARRIED_GRAD_SP``)."""
    return forward_exact_state(opt) and opt.normalize  # (the forward's rule, normalised)


def _state(m: SimpleNamespace, sc, S, z, i_b, i_h, load: bool) -> dict:
    """The ``{p: Block}`` state of a sweep, loaded from S, z (``load``) or zero."""
    st = {}
    for p in sorted(m.powers, reverse=True):
        st[p] = Block(*m.state_block(sc, S, z, p, i_b, i_h, load))
    return st


def dq_kernel(BV: int, opt: KernelOptions = DEFAULT_OPTIONS) -> T.PrimFunc:
    """The dq sweep (module docstring) as a ``prim_func`` of symbolic B, T, H::

        q, k:           [B, T, H, 16] dtype       (columns >= D: zeros)
        v, dO:          [B, T, H, BV] dtype       dO = dL/do
        qw, qb, kw, kb: [H, 16] float32           gamma, beta of q and k (zeros past D)
        w_0, w_1, w_2, eps: float32, D: int32     ``options.Scalars``: w_p, eps, D
        S, z:           [B, H, R, BV], [B, H, R] float32  the initial state (kernel layout;
                                                  read only with ``opt.state``)
        dq:             [B, T, H, 16] dtype       dL/dq (columns >= D: not used)
        dqw, dqb:       [B, H, 16] float32        this program's dL/d gamma_q, dL/d beta_q
        inv, r:         [B, T, H] float32         1 / (den + eps) and r (written only when
                                                  ``normalize``: the dk/dv sweep reads them)

    Arguments as ``kernels.forward_kernel``'s. For sim = c0 (q', k' never enter) dq, dqw
    and dqb are not written (they are zero).
    """
    m = walk(BV, opt, exact_state(opt))
    dtype, BC, normalize = m.dtype, m.BC, opt.normalize
    bw = _gradient(m)
    B, Tn, H, R = m.B, m.T, m.H, m.R
    exact = bw.exact  # A v, g v^T split (``split``)

    @T.prim_func
    def rebased_dq(
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
        S: T.Tensor((B, H, R, BV), ACC),
        z: T.Tensor((B, H, R), ACC),
        dq: T.Tensor((B, Tn, H, DK), dtype),
        dqw: T.Tensor((B, H, DK), ACC),
        dqb: T.Tensor((B, H, DK), ACC),
        inv: T.Tensor((B, Tn, H), ACC),
        r: T.Tensor((B, Tn, H), ACC),
    ):
        with T.Kernel(H, B, threads=opt.threads) as (i_h, i_b):
            sc = Scalars(w_0, w_1, w_2, eps, D)
            t = Tiles(*bw.tiles())  # (a macro returns a plain tuple)
            st = _state(m, sc, S, z, i_b, i_h, opt.state)
            for n in T.Pipelined(T.ceildiv(Tn, BC), num_stages=opt.num_stages):
                t0 = n * BC
                if m.uses_x:
                    T.copy(q[i_b, t0 : t0 + BC, i_h, :], t.xr)
                    T.copy(k[i_b, t0 : t0 + BC, i_h, :], t.yr)
                T.copy(v[i_b, t0 : t0 + BC, i_h, :], t.v)
                T.copy(dO[i_b, t0 : t0 + BC, i_h, :], t.do)
                if m.uses_x:
                    m.pre_transform(sc, t.xr, qw, qb, t.x, t.mean, t.rstd, i_h, t0)
                    m.pre_transform(sc, t.yr, kw, kb, t.y, t.ymean, t.yrstd, i_h, t0)

                # the forward's num and den, then 1 / (den + eps), r and g; normalised, A v
                # and g v^T as tf32x3 (``split``: r and g . v cancel in P)
                bw.scores(sc, t, False)
                if exact:
                    bw.split(t.A, t.A, t.A_lo)
                    bw.split(t.v, t.v_hi, t.v_lo)
                    m.attend(sc, t.A, t.v_hi, t.x, t.phi, st, t.o, (t.A_lo, t.v_lo), t.xs)
                else:
                    m.attend(sc, t.A, t.v, t.x, t.phi, st, t.o)
                if normalize:
                    m.inter_den(sc, t.den, st, t.x, t0)
                    bw.rows_done(sc, t, inv, r, i_b, i_h, t0)

                # dq' = (P o sim') K' + the state part; then the pre-transform's backward
                if exact:
                    bw.split(t.g, t.g, t.g_lo)
                    bw.pair_grad(t, t.g, t.v_hi, t.r, None, False, (t.g_lo, t.v_lo))
                    if not m.exact_state:
                        bw.join(t.g, t.g_lo)  # the state part takes g whole
                elif m.uses_x:
                    bw.pair_grad(t, t.g, t.v, t.r, None, False)
                if m.uses_x:  # (exact_state: g split, the last use of this chunk's g)
                    bw.state_grad(sc, t, st, t.g, t.r, normalize, t.g_lo)
                    bw.pre_transform_backward(sc, t, qw, dq, i_b, i_h, t0)

                m.update(sc, st, t.y, t.v, None, t.phi, t0, normalize)

            if m.uses_x:
                bw.store_params(t, dqw, dqb, i_b, i_h)

    return rebased_dq


def dkv_kernel(BV: int, opt: KernelOptions = DEFAULT_OPTIONS, output: bool = True) -> T.PrimFunc:
    """The dk/dv sweep (module docstring) as a ``prim_func`` of symbolic B, T, H (without
    ``output``: its state walk alone, ``cotangent_kernel``)::

        q, k, v, dO, qw, qb, kw, kb, w_0, w_1, w_2, eps, D   as ``dq_kernel``'s
        inv, r:         [B, T, H] float32         the dq sweep's (read only when normalize)
        S, z:           [B, H, R, BV], [B, H, R] float32  in: ``(dS_p / w_p, dz_p / w_p)``, the
                                                  final state's cotangent (read only with
                                                  ``opt.state``, else zero); out: ``(Sg_p,
                                                  zr_p)`` over every token, the initial
                                                  state's gradient in the same convention
        dk:             [B, T, H, 16] dtype       dL/dk (columns >= D: not used)
        dv:             [B, T, H, BV] dtype       dL/dv
        dkw, dkb:       [B, H, 16] float32        this program's dL/d gamma_k, dL/d beta_k

    Arguments as ``kernels.forward_kernel``'s. For sim = c0 dk, dkw and dkb are not written.
    """
    m = walk(BV, opt, output and exact_state(opt))
    dtype, BC, normalize = m.dtype, m.BC, opt.normalize
    bw = _gradient(m)
    B, Tn, H, R = m.B, m.T, m.H, m.R
    with_z = normalize or opt.state  # whether zr is ever non-zero
    exact = bw.exact  # v g^T split (``split``)

    @T.macro
    def rows(sc, t, st, dv, dk, kw, i_b, i_h, t0):
        """This chunk's dv and dk (the sweep's outputs; the state is left to the walk)."""
        # dv = A^T g + sum_p K^(p) (w_p Sg_p)
        bw.scores(sc, t, True)
        m.attend(sc, t.A, t.g, t.x, t.phi, st, t.o, None, t.xs)
        for i, e in T.Parallel(BC, BV):
            if t0 + i < Tn:
                dv[i_b, t0 + i, i_h, e] = t.o[i, e]

        # dk' = (P^T o sim') Q' + the state part (normalised: v g^T as tf32x3, as the dq
        # sweep's g v^T); then the pre-transform's backward
        if exact:
            bw.split(t.v, t.v_hi, t.v_lo)
            bw.split(t.g, t.g, t.g_lo)
            bw.pair_grad(t, t.v_hi, t.g, None, t.r, True, (t.v_lo, t.g_lo))
            bw.join(t.g, t.g_lo)  # the state update takes g whole
        elif m.uses_x:
            bw.pair_grad(t, t.v, t.g, None, t.r, True)
        if m.uses_x:  # (exact_state: v's split parts)
            if m.exact_state:
                bw.state_grad(sc, t, st, t.v_hi, None, with_z, t.v_lo)
            else:
                bw.state_grad(sc, t, st, t.v, None, with_z)
            bw.pre_transform_backward(sc, t, kw, dk, i_b, i_h, t0)

    @T.prim_func
    def rebased_dkv(
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
        inv: T.Tensor((B, Tn, H), ACC),
        r: T.Tensor((B, Tn, H), ACC),
        S: T.Tensor((B, H, R, BV), ACC),
        z: T.Tensor((B, H, R), ACC),
        dk: T.Tensor((B, Tn, H, DK), dtype),
        dv: T.Tensor((B, Tn, H, BV), dtype),
        dkw: T.Tensor((B, H, DK), ACC),
        dkb: T.Tensor((B, H, DK), ACC),
    ):
        with T.Kernel(H, B, threads=opt.threads) as (i_h, i_b):
            sc = Scalars(w_0, w_1, w_2, eps, D)
            t = Tiles(*bw.tiles())  # (a macro returns a plain tuple)
            st = _state(m, sc, S, z, i_b, i_h, opt.state)
            for n in T.Pipelined(T.ceildiv(Tn, BC), num_stages=opt.num_stages):
                t0 = (T.ceildiv(Tn, BC) - 1 - n) * BC  # the last chunk first
                if m.uses_x:
                    if output:
                        T.copy(k[i_b, t0 : t0 + BC, i_h, :], t.xr)
                    T.copy(q[i_b, t0 : t0 + BC, i_h, :], t.yr)
                if output:
                    T.copy(v[i_b, t0 : t0 + BC, i_h, :], t.v)
                T.copy(dO[i_b, t0 : t0 + BC, i_h, :], t.do)
                if normalize:
                    bw.load_scalars(t, inv, r, i_b, i_h, t0)
                    bw.scale_rows(t)
                if m.uses_x:
                    if output:
                        m.pre_transform(sc, t.xr, kw, kb, t.x, t.mean, t.rstd, i_h, t0)
                    m.pre_transform(sc, t.yr, qw, qb, t.y, t.ymean, t.yrstd, i_h, t0)
                if output:
                    rows(sc, t, st, dv, dk, kw, i_b, i_h, t0)
                m.update(sc, st, t.y, t.g, t.r if normalize else None, t.phi, t0, normalize,
                         output)  # fmt: skip

            m.store_state(S, z, st, i_b, i_h)
            if m.uses_x and output:
                bw.store_params(t, dkw, dkb, i_b, i_h)

    return rebased_dkv


def cotangent_kernel(BV: int, opt: KernelOptions = DEFAULT_OPTIONS) -> T.PrimFunc:
    """``dkv_kernel`` without its outputs: each (batch, head) program's ``(Sg_p, zr_p)`` from
    its final-state cotangent (zero without ``opt.state``) over its tokens, nothing else (k
    and v are not read; dk, dv, dkw, dkb stay in the signature, unwritten). ``call`` runs it
    on a split sequence's segments for the sums it scans into their end cotangents."""
    return dkv_kernel(BV, opt, output=False)
