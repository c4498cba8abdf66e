"""TileLang kernels of the ReBased forward: one (batch, head) program walks its chunks.

Legend (``spec`` names; per (batch, head) program)
--------------------------------------------------
``BC``    chunk length (tokens per step of the walk); ``N = ceil(T / BC)`` chunks.
``DK``    16: q, k and their gamma, beta arrive with 16 columns (the host pads D < 16 with
          zeros), so q', k' are exact zeros past the first D.
``BV``    the value columns: 16, 32, 48 or 64 in fp32, 32 or 64 in bf16 / fp16 (the host
          pads Dv to the next of them with zero columns when Dv is not one itself, and
          drops them from o and S).
``p``     a power of ``sim = sum_p c_p s^p``, ``s = scale q' . k'``, p <= 2; only the
          powers with ``c_p != 0`` are built (an absent power costs nothing).
``w_p``   ``c_p scale^p``, so ``sim = sum_p w_p (q' . k')^p``.
``x^(p)`` the unscaled power-p features of a row (``layout``): ``x^(0) = 1``,
          ``x^(1) = x'`` [16], ``x^(2)[16 a + b] = x'_a x'_b`` [F = 256], so that
          ``(q' . k')^p = q^(p) . k^(p)``; ``ROWS[p]`` is their count (1, 16, 256).
``S_p``   ``sum_j k_j^(p) v_j^T`` [ROWS[p], BV] and ``z_p = sum_j k_j^(p)`` [ROWS[p]]: the
          state, on chip for the whole walk (``S_2`` in a fp32 fragment, the rest in fp32
          shared memory).
``b_``    on-chip tiles (shared memory or register fragments), as in fla.

The pre-transform ``x' = gamma * LN(x) + beta`` (``LN(x) = (x - mean) / sqrt(var + 1e-5)``
over the first D columns; ``norm=False`` leaves it out) runs on each chunk's rows in fp32
as they arrive. Then, per chunk ``n`` with rows ``Q = q'[nBC : nBC + BC]`` (likewise K, V)::

    A    = tril(sum_p w_p (Q K^T)^p)                   [BC, BC]  (Q K^T: T.gemm, fp32; its
                                                                  operands fp32 (tf32) in
                                                                  a half kernel too)
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

Compile time and run time: a kernel is built for BV and an ``options.KernelOptions`` (the
powers present, ``norm``, ``normalize``, whether a state is read, the dtype, the tunables,
the target); B, T and H are symbolic sizes and ``w_0, w_1, w_2``, ``eps`` and D scalar
arguments (``sc``, an ``options.Scalars``), so one compile serves every batch, length, head
count, D <= 16, scale and polynomial with the same powers (``build.compile_classes``).

``target`` picks what differs between a GPU and TileLang's C backend (``"c"``, for tests on
a machine without one): shared tiles are ``shared.dyn`` on CUDA and static ``shared`` in C
(its pipeline plans one dynamic allocation only), and the row sum ``A 1`` is a warp
reduction (``T.reduce_sum``) on CUDA but a serial loop in C, whose reduce takes only local
buffers (and on CUDA too for ``sim = c0``, whose A has no ``T.gemm`` to fix its fragment
layout). The rest of the program is the same code for both. The pieces of the walk are
``tiles.walk``'s macros, which the backward (``backward``) runs too.
"""

# no `from __future__ import annotations`: TileLang reads the prim_func annotations as values
import tilelang.language as T

from .layout import DK
from .options import DEFAULT_OPTIONS, KernelOptions, Scalars
from .tiles import ACC, Block, F, walk


def forward_kernel(
    BV: int, opt: KernelOptions = DEFAULT_OPTIONS, output: bool = True
) -> T.PrimFunc:
    """The forward of ``sim = c0 + c1 s + c2 s^2`` (``s = scale q' . k'``, ``c_p >= 0``);
    without ``output`` the walk's state alone (``state_kernel``: q is not read, o not
    written, only S and z).

    Arguments of the returned ``prim_func`` (B, T and H are symbolic: one compile serves
    every batch size, length and head count; the tail chunk is masked)::

        q, k:           [B, T, H, 16] dtype  (columns >= D: zeros)
        qw, qb, kw, kb: [H, 16] float32  gamma, beta of q and k (ones / zeros when unused;
                                         zeros past D)
        v:              [B, T, H, BV] dtype
        w_0, w_1, w_2:  float32          w_p = c_p scale^p (0 for an absent power)
        eps:            float32          the normaliser's eps
        D:              int32            the columns of q, k that are features (<= 16)
        o:              [B, T, H, BV] dtype  o_i = num_i / (den_i + eps), or num_i when not
                                             normalize, with A_ij = sim(q_i, k_j) and
                                             num_i = sum_{j<=i} A_ij v_j + sum_p w_p q_i^(p) S0_p,
                                             den_i = sum_{j<=i} A_ij + sum_p w_p q_i^(p) . z0_p
        S:              [B, H, R, BV] float32  S_p: sum_j k'_j^(p) v_j^T, unscaled
        z:              [B, H, R] float32      z_p: sum_j k'_j^(p), unscaled

    with ``x' = gamma * LN(x) + beta`` (``x' = gamma * x + beta`` when not ``norm``). ``S``
    and ``z`` are in ``layout``'s stacked layout (``R = block_offsets(powers)[1]``): with
    ``opt.state`` the kernel reads ``(S0_p, z0_p)`` from them before the walk, and it
    writes the final state (initial state included) over them at the end; without, the
    state starts at zero and they are written only. The rest of ``opt`` (the powers
    present, the pre-transform, the tunables): ``options.KernelOptions``.
    Raises ``ValueError`` for what ``tiles.walk`` refuses.
    """
    m = walk(BV, opt, output and exact_state(opt))
    dtype, BC, normalize = m.dtype, m.BC, opt.normalize
    B, Tn, H, R, smem = m.B, m.T, m.H, m.R, m.smem

    @T.prim_func
    def rebased_forward(
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
        o: T.Tensor((B, Tn, H, BV), dtype),
        S: T.Tensor((B, H, R, BV), ACC),
        z: T.Tensor((B, H, R), ACC),
    ):
        with T.Kernel(H, B, threads=opt.threads) as (i_h, i_b):
            sc = Scalars(w_0, w_1, w_2, eps, D)
            b_v = T.alloc_shared((BC, BV), dtype, scope=smem)  # [BC, BV]
            if output:
                b_A = T.alloc_shared((BC, BC), dtype, scope=smem)  # [BC, BC] A as an operand
                b_s = T.alloc_fragment((BC, BC), ACC)  # [BC, BC] q'k'^T, then A
                b_o = T.alloc_fragment((BC, BV), ACC)  # [BC, BV] numerator
                b_den = T.alloc_fragment((BC,), ACC)  # [BC] denominator
                # den in shared memory for the store: a half kernel's tf32 scores give b_den a
                # fragment layout that conflicts with b_o's (bf16 products) in one loop
                b_dsh = T.alloc_shared((BC,), ACC, scope=smem)  # [BC]
            b_q = T.alloc_shared((BC, DK), dtype, scope=smem)  # [BC, 16] q' (unread if c0 only)
            b_k = T.alloc_shared((BC, DK), dtype, scope=smem)  # [BC, 16] k' (unread if c0 only)
            b_phi = b_xs = None
            if m.exact_state and m.has1:  # [BC, 16] fp32 q' split (``tiles.walk.attend``)
                b_xs = T.alloc_shared((BC, DK), ACC, scope=smem)
            if m.uses_x:
                b_qr = T.alloc_shared((BC, DK), dtype, scope=smem)  # [BC, 16] q rows as loaded
                b_kr = T.alloc_shared((BC, DK), dtype, scope=smem)  # [BC, 16] k rows as loaded
                b_mean = T.alloc_fragment((BC,), ACC)  # [BC] LayerNorm mean
                b_rstd = T.alloc_fragment((BC,), ACC)  # [BC] LayerNorm 1 / sqrt(var + eps)
            b_q32 = b_k32 = None  # the scores' fp32 operands of a half kernel (else b_q, b_k)
            if output and m.uses_x and dtype != ACC:
                b_q32 = T.alloc_shared((BC, DK), ACC, scope=smem)  # [BC, 16] q' unrounded
                b_k32 = T.alloc_shared((BC, DK), ACC, scope=smem)  # [BC, 16] k' unrounded
            st = {}  # the state S_p, z_p, w_p S_p per present power (tiles.Block)
            if m.has2:
                b_phi = T.alloc_shared((BC, F), dtype, scope=smem)  # [BC, 256] Q^(2) or K^(2)
                b_S2acc, b_z2, b_S2 = m.state_block(sc, S, z, 2, i_b, i_h, opt.state)
                st[2] = Block(b_S2acc, b_z2, b_S2)  # [256, BV] fp32, [256] fp32, [256, BV]
            if m.has1:
                b_S1acc, b_z1, b_S1 = m.state_block(sc, S, z, 1, i_b, i_h, opt.state)
                st[1] = Block(b_S1acc, b_z1, b_S1)  # [16, BV] fp32, [16] fp32, [16, BV]
            if m.has0:
                b_S0acc, b_z0, _ = m.state_block(sc, S, z, 0, i_b, i_h, opt.state)
                st[0] = Block(b_S0acc, b_z0, None)  # [1, BV] fp32, [1] fp32 (tokens seen)

            for n in T.Pipelined(T.ceildiv(Tn, BC), num_stages=opt.num_stages):
                t0 = n * BC
                if m.uses_x:
                    if output:
                        T.copy(q[i_b, t0 : t0 + BC, i_h, :], b_qr)
                    T.copy(k[i_b, t0 : t0 + BC, i_h, :], b_kr)
                T.copy(v[i_b, t0 : t0 + BC, i_h, :], b_v)
                if m.uses_x:
                    if output:
                        m.pre_transform(sc, b_qr, qw, qb, b_q, b_mean, b_rstd, i_h, t0, b_q32)
                    m.pre_transform(sc, b_kr, kw, kb, b_k, b_mean, b_rstd, i_h, t0, b_k32)

                if output:  # num = A v + sum_p Q^(p) w_p S_p, den = A 1 + sum_p w_p Q^(p) z_p
                    if b_q32 is None:  # (exact_state: fp32 FMAs, as the sweeps')
                        m.scores(b_q, b_k, b_s, m.exact_state)
                    else:  # tf32 scores of the unrounded q', k': bf16 ones measured 2.8e-2 on o
                        m.scores(b_q32, b_k32, b_s)
                    m.similarities(sc, b_s, b_A, b_den if normalize else None, False)
                    m.attend(sc, b_A, b_v, b_q, b_phi, st, b_o, None, b_xs)
                    if normalize:
                        m.inter_den(sc, b_den, st, b_q, t0)
                        T.copy(b_den, b_dsh)
                    for i, e in T.Parallel(BC, BV):
                        if t0 + i < Tn:
                            if normalize:
                                o[i_b, t0 + i, i_h, e] = b_o[i, e] / (b_dsh[i] + sc.eps)
                            else:
                                o[i_b, t0 + i, i_h, e] = b_o[i, e]

                # state update: S_p += K^(p)T V, z_p += K^(p)T 1
                m.update(sc, st, b_k, b_v, None, b_phi, t0, True, output)

            m.store_state(S, z, st, i_b, i_h)

    return rebased_forward


def exact_state(opt: KernelOptions) -> bool:
    """Whether the forward multiplies by its initial state to ~fp32 (``tiles.walk``'s
    ``exact_state``): an fp32 kernel that reads a state (a caller's, in every input dtype:
    ``build.kernel_dtype``) of a map that reads q'. An arbitrary state's products cancel in
    ``phi(q) . S_0``: tf32 ones measured o errors of 3.1e-2 against a kappa-scaled rule of
    2.3e-2 on the C target with the GPU's tf32 emulated (session 19: T = 1, D = 4, Dv = 1,
    ``rebased`` unnormalised, fp32)."""
    return opt.state and opt.dtype == ACC and any(p in opt.powers for p in (1, 2))


def state_kernel(BV: int, opt: KernelOptions = DEFAULT_OPTIONS) -> T.PrimFunc:
    """``forward_kernel`` without its output: each (batch, head) program's final state
    ``S, z`` (from its initial state with ``opt.state``) and nothing else; ``q`` and ``o``
    stay in the signature, unread and unwritten. ``call`` runs it on a sequence's segments
    (one program each) for the sums it scans into their initial states."""
    return forward_kernel(BV, opt, output=False)
