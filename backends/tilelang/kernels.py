"""TileLang kernels of the ReBased forward: one (batch, head) program walks its chunks.

Legend (``spec`` names; per (batch, head) program)
--------------------------------------------------
``BC``    chunk length (tokens per step of the walk); ``N = ceil(T / BC)`` chunks.
``DK``    16: q', k' padded to 16 columns with exact zeros (D <= 16).
``BV``    the value dim padded to a multiple of 16 (>= Dv).
``p``     a power of ``sim = sum_p c_p s^p``, ``s = scale q' . k'``, p <= 2; only the
          powers with ``c_p != 0`` are built (Python-level flags: an absent power costs
          nothing).
``w_p``   ``c_p scale^p``, so ``sim = sum_p w_p (q' . k')^p``.
``x^(p)`` the unscaled power-p features of a row (``layout``): ``x^(0) = 1``,
          ``x^(1) = x'`` [16], ``x^(2)[16 a + b] = x'_a x'_b`` [F = 256], so that
          ``(q' . k')^p = q^(p) . k^(p)``; ``ROWS[p]`` is their count (1, 16, 256).
``S_p``   ``sum_j k_j^(p) v_j^T`` [ROWS[p], BV] and ``z_p = sum_j k_j^(p)`` [ROWS[p]]: the
          state, on chip for the whole walk (``S_2`` in a fp32 fragment, the rest in fp32
          shared memory).
``b_``    on-chip tiles (shared memory or register fragments), as in fla.

The pre-transform ``x' = gamma * LN(x) + beta`` (``LN(x) = (x - mean) / sqrt(var + 1e-5)``
over the D columns; ``norm=False`` leaves it out) runs on each chunk's rows in fp32 as they
arrive. Then, per chunk ``n`` with rows ``Q = q'[nBC : nBC + BC]`` (likewise K, V)::

    A    = tril(sum_p w_p (Q K^T)^p)                   [BC, BC]  (Q K^T: T.gemm, fp32)
    num  = A V + sum_p Q^(p) (w_p S_p)                 [BC, BV]  (T.gemm for p = 2 and 1,
                                                                  w_0 S_0 added in fp32)
    den  = A 1 + sum_p w_p Q^(p) z_p                   [BC]      (fp32 throughout)
    o    = num / (den + eps)                           (o = num when not normalize)
    S_2 += K^(2)T V                                    [256, BV] (T.gemm, fp32 accumulator)
    S_1 += K^(1)T V,  S_0 += K^(0)T V,  z_p += K^(p)T 1  (fp32 sums on the CUDA cores)

The rows past T are zero in Q and K (so in K^(1), K^(2)) and masked in K^(0) = 1. An
initial state is loaded into the accumulators before the walk (``initial_state``) and the
final state is written once at the end, in ``layout``'s stacked unscaled layout;
``call.canonical_state`` maps it to the spec's. Products on the tensor cores take operands
in the input dtype (``A``, ``Q^(2)``, ``K^(2)`` and the fp32 ``w_p S_p`` are rounded to it);
the normaliser never leaves fp32.

``target`` picks what differs between a GPU and TileLang's C backend (``"c"``, for tests on
a machine without one): shared tiles are ``shared.dyn`` on CUDA and static ``shared`` in C
(its pipeline plans one dynamic allocation only), and the row sum ``A 1`` is a warp
reduction (``T.reduce_sum``) on CUDA but a serial loop in C, whose reduce takes only local
buffers (and on CUDA too for ``sim = c0``, whose A has no ``T.gemm`` to fix its fragment
layout). The rest of the program is the same code for both.
"""

# no `from __future__ import annotations`: TileLang reads the prim_func annotations as values
from typing import Literal

import tilelang.language as T

from rebased_kernels.spec import LAYER_NORM_EPS

from .layout import DK, ROWS, block_offsets, padded_value_dim

F = ROWS[2]
KernelTarget = Literal["cuda", "c"]


def forward_kernel(
    H: int,
    D: int,
    Dv: int,
    *,
    norm: bool = True,
    scale: float | None = None,
    coeffs: tuple[float, ...] = (0.0, 0.0, 1.0),
    normalize: bool = True,
    initial_state: bool = False,
    eps: float = 1e-5,
    dtype: str = "bfloat16",
    BC: int = 64,
    num_stages: int = 2,
    threads: int = 256,
    target: KernelTarget = "cuda",
) -> T.PrimFunc:
    """The forward of ``sim = c0 + c1 s + c2 s^2`` (``s = scale q' . k'``, ``c_p >= 0``).

    Arguments of the returned ``prim_func`` (B and T are symbolic: one compile serves every
    batch size and length; the tail chunk is masked)::

        q, k:           [B, T, H, D] dtype
        qw, qb, kw, kb: [H, D] float32   gamma, beta of q and k (ones / zeros when unused)
        v:              [B, T, H, Dv] dtype
        o:              [B, T, H, Dv] dtype  o_i = num_i / (den_i + eps), or num_i when not
                                             normalize, with A_ij = sim(q_i, k_j) and
                                             num_i = sum_{j<=i} A_ij v_j + sum_p w_p q_i^(p) S0_p,
                                             den_i = sum_{j<=i} A_ij + sum_p w_p q_i^(p) . z0_p
        S:              [B, H, R, Dv] float32  S_p: sum_j k'_j^(p) v_j^T, unscaled
        z:              [B, H, R] float32      z_p: sum_j k'_j^(p), unscaled

    with ``x' = gamma * LN(x) + beta`` (``x' = gamma * x + beta`` when not ``norm``). ``S``
    and ``z`` are in ``layout``'s stacked layout (``R = block_offsets(powers)[1]``): with
    ``initial_state`` the kernel reads ``(S0_p, z0_p)`` from them before the walk, and it
    writes the final state (initial state included) over them at the end; without, the
    state starts at zero and they are written only. ``scale`` defaults to ``D ** -0.5``.
    Tunables: ``BC`` (chunk length, a multiple of 16), ``num_stages`` (``T.Pipelined``
    stages of the chunk walk: buffers of the q, k, v loads in flight), ``threads`` (compute
    threads per program; on Hopper TileLang adds a producer warpgroup that issues the loads
    by TMA). The C target runs the walk serially and ignores both.
    Raises ``ValueError`` for D > 16, Dv > 64, a chunk length that is not a multiple of 16,
    or coefficients that are not ``c0, c1, c2 >= 0`` with one of them non-zero.
    """
    if not 1 <= D <= DK:
        raise ValueError(f"D={D}: this kernel keeps phi(x) = x (x) x on chip for D <= 16 only")
    if not 1 <= Dv <= 64:
        raise ValueError(f"Dv={Dv}: this kernel supports 1 <= Dv <= 64")
    if BC % 16 or BC <= 0:
        raise ValueError(f"BC={BC}: the chunk length must be a positive multiple of 16")
    if len(coeffs) > 3 or not any(coeffs) or min(coeffs) < 0.0:
        raise ValueError(f"coeffs={coeffs}: this kernel takes c0, c1, c2 >= 0, not all zero")
    scale = D**-0.5 if scale is None else scale
    w = {p: c * scale**p for p, c in enumerate(coeffs) if c != 0.0}  # w_p, present powers
    has0, has1, has2 = (p in w for p in range(3))
    uses_x = has1 or has2  # whether q', k' enter at all (not for sim = c0)
    offsets, R = block_offsets(tuple(w))
    BV = padded_value_dim(Dv)
    acc = "float32"
    smem = "shared.dyn" if target == "cuda" else "shared"
    B, Tn = T.dynamic("B, T")

    def feature(p, b_x, j, r, t0):
        """``x^(p)_r`` of chunk row j in fp32 (q', k' are zero past T; ``x^(0)`` is masked)."""
        if p == 0:
            return T.if_then_else(t0 + j < Tn, T.float32(1.0), T.float32(0.0))
        if p == 1:
            return T.cast(b_x[j, r], acc)
        return T.cast(b_x[j, r // DK], acc) * T.cast(b_x[j, r % DK], acc)

    def similarity(g):
        """``sum_p w_p g^p`` for ``g = q' . k'`` (absent powers left out)."""
        terms = [w[0]] if has0 else []
        if has1:
            terms.append(w[1] * g)
        if has2:
            terms.append(w[2] * g * g)
        return sum(terms[1:], terms[0])

    @T.macro
    def pre_transform(b_xr, gamma, beta, b_x, b_mean, b_rstd, i_h, t0):
        """``b_x [BC, 16] = gamma * LN(b_xr) + beta`` from the raw rows ``b_xr [BC, D]``
        (0 past T and in the padding columns)."""
        for i in T.Parallel(BC):
            b_mean[i] = 0.0
            b_rstd[i] = 0.0
            if norm:
                for d in T.serial(D):
                    b_mean[i] += T.cast(b_xr[i, d], acc) / D
                for d in T.serial(D):
                    centred = T.cast(b_xr[i, d], acc) - b_mean[i]
                    b_rstd[i] += centred * centred / D
            b_rstd[i] = T.rsqrt(b_rstd[i] + LAYER_NORM_EPS) if norm else 1.0
        for i, d in T.Parallel(BC, DK):
            dc = T.min(d, D - 1)
            xn = (T.cast(b_xr[i, dc], acc) - b_mean[i]) * b_rstd[i]
            xp = T.cast(gamma[i_h, dc] * xn + beta[i_h, dc], dtype)
            b_x[i, d] = T.if_then_else((t0 + i < Tn) & (d < D), xp, 0)

    @T.macro
    def features(b_x, b_phi):
        """``b_phi [BC, 256] = x^(2)`` of the rows ``b_x``, formed in fp32."""
        for i, f in T.Parallel(BC, F):
            b_phi[i, f] = T.cast(feature(2, b_x, i, f, 0), dtype)

    @T.macro
    def load_block(S, z, b_Sp, b_zp, p, i_b, i_h):
        """``b_Sp [ROWS[p], BV], b_zp [ROWS[p]]``: block p of the initial state (or 0)."""
        for r, e in T.Parallel(ROWS[p], BV):
            if initial_state:
                value = S[i_b, i_h, offsets[p] + r, T.min(e, Dv - 1)]
                b_Sp[r, e] = T.if_then_else(e < Dv, value, 0.0)
            else:
                b_Sp[r, e] = 0.0
        for r in T.Parallel(ROWS[p]):
            if initial_state:
                b_zp[r] = z[i_b, i_h, offsets[p] + r]
            else:
                b_zp[r] = 0.0

    @T.macro
    def store_block(S, z, b_Sp, b_zp, p, i_b, i_h):
        """Block p of the final state from ``b_Sp, b_zp``."""
        for r, e in T.Parallel(ROWS[p], BV):
            if e < Dv:
                S[i_b, i_h, offsets[p] + r, e] = b_Sp[r, e]
        for r in T.Parallel(ROWS[p]):
            z[i_b, i_h, offsets[p] + r] = b_zp[r]

    @T.macro
    def operand(b_Sp, b_Sop, p):
        """``b_Sop = w_p S_p`` rounded to dtype: the state as a ``T.gemm`` operand."""
        for r, e in T.Parallel(ROWS[p], BV):
            b_Sop[r, e] = T.cast(w[p] * b_Sp[r, e], dtype)

    @T.macro
    def accumulate(b_Sp, b_zp, p, b_k, b_v, t0):
        """``S_p += K^(p)T V`` (unless ``b_Sp`` is None: S_2 is a T.gemm) and
        ``z_p += K^(p)T 1``, in fp32."""
        if b_Sp is not None:
            for r, e in T.Parallel(ROWS[p], BV):
                for j in T.serial(BC):
                    b_Sp[r, e] += feature(p, b_k, j, r, t0) * T.cast(b_v[j, e], acc)
        for r in T.Parallel(ROWS[p]):
            for j in T.serial(BC):
                b_zp[r] += feature(p, b_k, j, r, t0)

    @T.macro
    def inter_den(b_den, b_zp, p, b_q, t0):
        """``b_den += w_p Q^(p) z_p`` in fp32."""
        for i in T.Parallel(BC):
            for r in T.serial(ROWS[p]):
                b_den[i] += w[p] * feature(p, b_q, i, r, t0) * b_zp[r]

    @T.prim_func
    def rebased_forward(
        q: T.Tensor((B, Tn, H, D), dtype),
        k: T.Tensor((B, Tn, H, D), dtype),
        v: T.Tensor((B, Tn, H, Dv), dtype),
        qw: T.Tensor((H, D), acc),
        qb: T.Tensor((H, D), acc),
        kw: T.Tensor((H, D), acc),
        kb: T.Tensor((H, D), acc),
        o: T.Tensor((B, Tn, H, Dv), dtype),
        S: T.Tensor((B, H, R, Dv), acc),
        z: T.Tensor((B, H, R), acc),
    ):
        with T.Kernel(H, B, threads=threads) as (i_h, i_b):
            b_vr = T.alloc_shared((BC, Dv), dtype, scope=smem)  # [BC, Dv] (Dv < BV only)
            b_v = T.alloc_shared((BC, BV), dtype, scope=smem)  # [BC, BV]
            b_A = T.alloc_shared((BC, BC), dtype, scope=smem)  # [BC, BC] A as an operand
            b_s = T.alloc_fragment((BC, BC), acc)  # [BC, BC] q'k'^T, then A
            b_o = T.alloc_fragment((BC, BV), acc)  # [BC, BV] numerator
            b_den = T.alloc_fragment((BC,), acc)  # [BC] denominator
            b_q = T.alloc_shared((BC, DK), dtype, scope=smem)  # [BC, 16] q' (unread if c0 only)
            b_k = T.alloc_shared((BC, DK), dtype, scope=smem)  # [BC, 16] k' (unread if c0 only)
            if uses_x:
                b_qr = T.alloc_shared((BC, D), dtype, scope=smem)  # [BC, D] q rows as loaded
                b_kr = T.alloc_shared((BC, D), dtype, scope=smem)  # [BC, D] k rows as loaded
                b_mean = T.alloc_fragment((BC,), acc)  # [BC] LayerNorm mean
                b_rstd = T.alloc_fragment((BC,), acc)  # [BC] LayerNorm 1 / sqrt(var + eps)
            if has2:
                b_phi = T.alloc_shared((BC, F), dtype, scope=smem)  # [BC, 256] Q^(2) or K^(2)
                b_S2 = T.alloc_shared((F, BV), dtype, scope=smem)  # [256, BV] w_2 S_2 operand
                b_S2acc = T.alloc_fragment((F, BV), acc)  # [256, BV] S_2, fp32
                b_z2 = T.alloc_shared((F,), acc, scope=smem)  # [256] z_2 (Z flattened), fp32
                load_block(S, z, b_S2acc, b_z2, 2, i_b, i_h)
                operand(b_S2acc, b_S2, 2)
            if has1:
                b_S1 = T.alloc_shared((DK, BV), dtype, scope=smem)  # [16, BV] w_1 S_1 operand
                b_S1acc = T.alloc_shared((DK, BV), acc, scope=smem)  # [16, BV] S_1, fp32
                b_z1 = T.alloc_shared((DK,), acc, scope=smem)  # [16] z_1, fp32
                load_block(S, z, b_S1acc, b_z1, 1, i_b, i_h)
                operand(b_S1acc, b_S1, 1)
            if has0:
                b_S0acc = T.alloc_shared((1, BV), acc, scope=smem)  # [1, BV] S_0, fp32
                b_z0 = T.alloc_shared((1,), acc, scope=smem)  # [1] z_0 (tokens seen), fp32
                load_block(S, z, b_S0acc, b_z0, 0, i_b, i_h)

            for n in T.Pipelined(T.ceildiv(Tn, BC), num_stages=num_stages):
                t0 = n * BC
                if uses_x:
                    T.copy(q[i_b, t0 : t0 + BC, i_h, :], b_qr)
                    T.copy(k[i_b, t0 : t0 + BC, i_h, :], b_kr)
                if Dv == BV:
                    T.copy(v[i_b, t0 : t0 + BC, i_h, :], b_v)
                else:
                    T.copy(v[i_b, t0 : t0 + BC, i_h, :], b_vr)
                    for i, e in T.Parallel(BC, BV):
                        b_v[i, e] = T.if_then_else(e < Dv, b_vr[i, T.min(e, Dv - 1)], 0)
                if uses_x:
                    pre_transform(b_qr, qw, qb, b_q, b_mean, b_rstd, i_h, t0)
                    pre_transform(b_kr, kw, kb, b_k, b_mean, b_rstd, i_h, t0)

                # intra-chunk: A = tril(sim(q'k'^T)), den = A 1, num = A v
                if uses_x:
                    for i, j in T.Parallel(BC, BC):
                        b_s[i, j] = 0.0
                    T.gemm(b_q, b_k, b_s, transpose_B=True)
                for i, j in T.Parallel(BC, BC):
                    b_s[i, j] = T.if_then_else(j <= i, similarity(b_s[i, j]), 0.0)
                if normalize:
                    if target == "cuda" and uses_x:
                        T.reduce_sum(b_s, b_den, dim=1)
                    else:
                        for i in T.Parallel(BC):
                            b_den[i] = 0.0
                            for j in T.serial(BC):
                                b_den[i] += b_s[i, j]
                T.copy(b_s, b_A)
                for i, e in T.Parallel(BC, BV):
                    b_o[i, e] = 0.0
                T.gemm(b_A, b_v, b_o)

                # inter-chunk: num += sum_p Q^(p) w_p S_p, den += sum_p w_p Q^(p) z_p
                if has2:
                    features(b_q, b_phi)
                    T.gemm(b_phi, b_S2, b_o)
                if has1:
                    T.gemm(b_q, b_S1, b_o)
                if has0:
                    for i, e in T.Parallel(BC, BV):
                        b_o[i, e] += w[0] * b_S0acc[0, e]
                if normalize:
                    if has2:
                        inter_den(b_den, b_z2, 2, b_q, t0)
                    if has1:
                        inter_den(b_den, b_z1, 1, b_q, t0)
                    if has0:
                        inter_den(b_den, b_z0, 0, b_q, t0)

                for i, e in T.Parallel(BC, BV):
                    if (t0 + i < Tn) & (e < Dv):
                        if normalize:
                            o[i_b, t0 + i, i_h, e] = b_o[i, e] / (b_den[i] + eps)
                        else:
                            o[i_b, t0 + i, i_h, e] = b_o[i, e]

                # state update: S_p += K^(p)T V, z_p += K^(p)T 1
                if has2:
                    features(b_k, b_phi)
                    T.gemm(b_phi, b_v, b_S2acc, transpose_A=True)
                    accumulate(None, b_z2, 2, b_k, b_v, t0)
                    operand(b_S2acc, b_S2, 2)
                if has1:
                    accumulate(b_S1acc, b_z1, 1, b_k, b_v, t0)
                    operand(b_S1acc, b_S1, 1)
                if has0:
                    accumulate(b_S0acc, b_z0, 0, b_k, b_v, t0)

            if has2:
                store_block(S, z, b_S2acc, b_z2, 2, i_b, i_h)
            if has1:
                store_block(S, z, b_S1acc, b_z1, 1, i_b, i_h)
            if has0:
                store_block(S, z, b_S0acc, b_z0, 0, i_b, i_h)

    return rebased_forward
