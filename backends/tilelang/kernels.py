"""TileLang kernels of the ReBased forward: one (batch, head) program walks its chunks.

Legend (``spec`` names; per (batch, head) program)
--------------------------------------------------
``BC``  chunk length (tokens per step of the walk); ``N = ceil(T / BC)`` chunks.
``DK``  16: q', k' padded to 16 columns with exact zeros (D <= 16).
``BV``  the value dim padded to a multiple of 16 (>= Dv).
``F``   256 = DK * DK quadratic features, unpacked: ``phi(x)[16 a + b] = x'_a x'_b``.
``w``   ``c2 * scale^2``: the kernel is ``sim = c2 (scale q' . k')^2 = w phi(q) . phi(k)``.
``b_``  on-chip tiles (shared memory or register fragments), as in fla.

The pre-transform ``x' = gamma * LN(x) + beta`` (``LN(x) = (x - mean) / sqrt(var + 1e-5)``
over the D columns; ``norm=False`` leaves it out) runs on each chunk's rows in fp32 as they
arrive. Then, per chunk ``n`` with rows ``Q = q'[nBC : nBC + BC]`` (likewise K, V)::

    A   = tril(w (Q K^T)^2)                             [BC, BC]  (T.gemm, fp32)
    num = A V + w phi(Q) S                              [BC, BV]  (two T.gemm)
    den = A 1 + w (Q Z Q^T)_ii                          [BC]      (fp32 throughout)
    o   = num / (den + eps)
    S  += phi(K)^T V                                    [F, BV]   (T.gemm, fp32 accumulator)
    Z  += K^T K                                         [16, 16]  (fp32, exact products)

``S = sum_j phi(k_j) v_j^T`` and ``Z = sum_j k'_j k'_j^T`` (so ``z = sum_j phi(k_j)`` is
``Z`` flattened) stay on chip for the whole walk and are written once at the end, unscaled;
``call.canonical_state`` maps them to the spec's layout. Products on the tensor cores take
operands in the input dtype (``A``, ``phi`` and the fp32 ``S`` are rounded to it for
``A V``, ``phi(Q) S`` and ``phi(K)^T V``); the normaliser never leaves fp32.

``target`` picks what differs between a GPU and TileLang's C backend (``"c"``, for tests on
a machine without one): shared tiles are ``shared.dyn`` on CUDA and static ``shared`` in C
(its pipeline plans one dynamic allocation only), and the row sum ``A 1`` is a warp
reduction (``T.reduce_sum``) on CUDA but a serial loop in C, whose reduce takes only local
buffers. The rest of the program is the same code for both.
"""

# no `from __future__ import annotations`: TileLang reads the prim_func annotations as values
from typing import Literal

import tilelang.language as T

from rebased_kernels.spec import LAYER_NORM_EPS

DK = 16
F = DK * DK
KernelTarget = Literal["cuda", "c"]


def padded_value_dim(Dv: int) -> int:
    """``BV``: Dv rounded up to a multiple of 16 (a tensor-core N extent)."""
    return max(16, -(-Dv // 16) * 16)


def forward_kernel(
    H: int,
    D: int,
    Dv: int,
    *,
    norm: bool = True,
    scale: float | None = None,
    c2: float = 1.0,
    eps: float = 1e-5,
    dtype: str = "bfloat16",
    BC: int = 64,
    num_stages: int = 2,
    threads: int = 256,
    target: KernelTarget = "cuda",
) -> T.PrimFunc:
    """The normalised forward of ``sim = c2 (scale q' . k')^2`` with no initial state.

    Arguments of the returned ``prim_func`` (B and T are symbolic: one compile serves every
    batch size and length; the tail chunk is masked)::

        q, k:           [B, T, H, D] dtype
        qw, qb, kw, kb: [H, D] float32   gamma, beta of q and k (ones / zeros when unused)
        v:              [B, T, H, Dv] dtype
        o:              [B, T, H, Dv] dtype  o_i = sum_{j<=i} A_ij v_j / (sum_{j<=i} A_ij + eps),
                                             A_ij = c2 (scale q'_i . k'_j)^2
        S:              [B, H, 256, Dv] float32  sum_j (k'_j (x) k'_j) v_j^T (final, unscaled)
        Z:              [B, H, 16, 16] float32   sum_j k'_j k'_j^T (final, unscaled)

    with ``x' = gamma * LN(x) + beta`` (``x' = gamma * x + beta`` when not ``norm``).
    ``scale`` defaults to ``D ** -0.5``. Tunables: ``BC`` (chunk length, a multiple of 16),
    ``num_stages`` (``T.Pipelined`` stages of the chunk walk: buffers of the q, k, v loads in
    flight), ``threads`` (compute threads per program; on Hopper TileLang adds a producer
    warpgroup that issues the loads by TMA). The C target runs the walk serially and ignores
    both.
    Raises ``ValueError`` for D > 16, Dv > 64 or a chunk length that is not a multiple of 16.
    """
    if not 1 <= D <= DK:
        raise ValueError(f"D={D}: this kernel keeps phi(x) = x (x) x on chip for D <= 16 only")
    if not 1 <= Dv <= 64:
        raise ValueError(f"Dv={Dv}: this kernel supports 1 <= Dv <= 64")
    if BC % 16 or BC <= 0:
        raise ValueError(f"BC={BC}: the chunk length must be a positive multiple of 16")
    w = c2 * (D**-0.5 if scale is None else scale) ** 2
    BV = padded_value_dim(Dv)
    acc = "float32"
    smem = "shared.dyn" if target == "cuda" else "shared"
    B, Tn = T.dynamic("B, T")

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
    def features(b_x, b_phi, weight):
        """``b_phi [BC, 256] = weight * b_x (x) b_x``, formed in fp32."""
        for i, f in T.Parallel(BC, F):
            xa, xc = T.cast(b_x[i, f // DK], acc), T.cast(b_x[i, f % DK], acc)
            b_phi[i, f] = T.cast(weight * xa * xc, dtype)

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
        S: T.Tensor((B, H, F, Dv), acc),
        Z: T.Tensor((B, H, DK, DK), acc),
    ):
        with T.Kernel(H, B, threads=threads) as (i_h, i_b):
            b_qr = T.alloc_shared((BC, D), dtype, scope=smem)  # [BC, D] q rows as loaded
            b_kr = T.alloc_shared((BC, D), dtype, scope=smem)  # [BC, D] k rows as loaded
            b_vr = T.alloc_shared((BC, Dv), dtype, scope=smem)  # [BC, Dv] (Dv < BV only)
            b_q = T.alloc_shared((BC, DK), dtype, scope=smem)  # [BC, 16] q'
            b_k = T.alloc_shared((BC, DK), dtype, scope=smem)  # [BC, 16] k'
            b_v = T.alloc_shared((BC, BV), dtype, scope=smem)  # [BC, BV]
            b_A = T.alloc_shared((BC, BC), dtype, scope=smem)  # [BC, BC] A as an operand
            b_phi = T.alloc_shared((BC, F), dtype, scope=smem)  # [BC, 256] phi(q') or phi(k')
            b_S = T.alloc_shared((F, BV), dtype, scope=smem)  # [256, BV] S as an operand
            b_Z = T.alloc_shared((DK, DK), acc, scope=smem)  # [16, 16] Z, fp32
            b_s = T.alloc_fragment((BC, BC), acc)  # [BC, BC] scores, then A
            b_o = T.alloc_fragment((BC, BV), acc)  # [BC, BV] numerator
            b_den = T.alloc_fragment((BC,), acc)  # [BC] denominator
            b_mean = T.alloc_fragment((BC,), acc)  # [BC] LayerNorm mean
            b_rstd = T.alloc_fragment((BC,), acc)  # [BC] LayerNorm 1 / sqrt(var + eps)
            b_Sacc = T.alloc_fragment((F, BV), acc)  # [256, BV] S, fp32

            for f, e in T.Parallel(F, BV):
                b_Sacc[f, e] = 0.0
                b_S[f, e] = 0.0
            for a, c in T.Parallel(DK, DK):
                b_Z[a, c] = 0.0

            for n in T.Pipelined(T.ceildiv(Tn, BC), num_stages=num_stages):
                t0 = n * BC
                T.copy(q[i_b, t0 : t0 + BC, i_h, :], b_qr)
                T.copy(k[i_b, t0 : t0 + BC, i_h, :], b_kr)
                if Dv == BV:
                    T.copy(v[i_b, t0 : t0 + BC, i_h, :], b_v)
                else:
                    T.copy(v[i_b, t0 : t0 + BC, i_h, :], b_vr)
                    for i, e in T.Parallel(BC, BV):
                        b_v[i, e] = T.if_then_else(e < Dv, b_vr[i, T.min(e, Dv - 1)], 0)
                pre_transform(b_qr, qw, qb, b_q, b_mean, b_rstd, i_h, t0)
                pre_transform(b_kr, kw, kb, b_k, b_mean, b_rstd, i_h, t0)

                # intra-chunk: A = tril(w (q'k'^T)^2), den = A 1, num = A v
                for i, j in T.Parallel(BC, BC):
                    b_s[i, j] = 0.0
                T.gemm(b_q, b_k, b_s, transpose_B=True)
                for i, j in T.Parallel(BC, BC):
                    b_s[i, j] = T.if_then_else(j <= i, w * b_s[i, j] * b_s[i, j], 0.0)
                if target == "cuda":
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

                # inter-chunk: num += w phi(q') S, den += w q'^T Z q'
                features(b_q, b_phi, w)
                T.gemm(b_phi, b_S, b_o)
                for i in T.Parallel(BC):
                    for a, c in T.grid(DK, DK):
                        qa, qc = T.cast(b_q[i, a], acc), T.cast(b_q[i, c], acc)
                        b_den[i] += w * qa * b_Z[a, c] * qc

                for i, e in T.Parallel(BC, BV):
                    if (t0 + i < Tn) & (e < Dv):
                        o[i_b, t0 + i, i_h, e] = b_o[i, e] / (b_den[i] + eps)

                # state update: S += phi(k')^T v, Z += k'^T k'
                features(b_k, b_phi, 1.0)
                T.gemm(b_phi, b_v, b_Sacc, transpose_A=True)
                for a, c in T.Parallel(DK, DK):
                    for j in T.serial(BC):
                        b_Z[a, c] += T.cast(b_k[j, a], acc) * T.cast(b_k[j, c], acc)
                T.copy(b_Sacc, b_S)

            for f, e in T.Parallel(F, BV):
                if e < Dv:
                    S[i_b, i_h, f, e] = b_Sacc[f, e]
            for a, c in T.Parallel(DK, DK):
                Z[i_b, i_h, a, c] = b_Z[a, c]

    return rebased_forward
