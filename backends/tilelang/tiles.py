"""The chunk walk's pieces, shared by the forward (``kernels``) and backward (``backward``).

``walk(...)`` checks one kernel's compile-time constants and returns them with the
``T.macro`` pieces every program of a chunk walk is made of (names as in ``kernels``'
legend; ``x`` is the side whose rows a chunk outputs, ``y`` the side it attends to)::

    pre_transform   x' = gamma * LN(x) + beta on a chunk's rows, fp32 statistics
    scores          s = X' Y'^T                                   [BC, BC] (T.gemm)
    similarities    A = sim(s) on the causal pairs (j <= i, or j >= i when reverse),
                    den = A 1 (optional); A also rounded into a T.gemm operand
    attend          out = A W + sum_p X^(p) (w_p S_p)             [BC, BV]
    inter_den       den += sum_p w_p X^(p) z_p
    update          S_p += Y^(p)T W, z_p += Y^(p)T w (w = 1 when None) [ROWS[p], BV]

The forward runs them with x = q, y = k, W = v; the backward's dq sweep the same, and its
dk/dv sweep with x = k, y = q, W = g = dO / (den + eps), w = r, walking chunks in reverse.
A state is a dict ``{p: Block}`` over the powers present, in ``layout``'s stacked
unscaled layout (``load``: read from S, z; otherwise zero). Which powers are present is
compile-time; their weights ``w_p``, ``eps`` and the feature dim D are the kernel's scalar
arguments (``sc[p]``, ``sc.eps``, ``sc.D`` of an ``options.Scalars``), which the macros
that need them take as ``sc``.
"""

# no `from __future__ import annotations`: TileLang reads the macro annotations as values
from types import SimpleNamespace
from typing import Any, NamedTuple

import tilelang.language as T

from rebased_kernels.spec import LAYER_NORM_EPS

from .layout import DK, ROWS, block_offsets
from .options import KernelOptions

F = ROWS[2]
ACC = "float32"


class Block(NamedTuple):
    """One power p of a state on chip."""

    S: Any  # [ROWS[p], BV] fp32 S_p (a register fragment for p = 2, else shared memory)
    z: Any  # [ROWS[p]] fp32 z_p, shared
    op: Any  # [ROWS[p], BV] dtype w_p S_p as a T.gemm operand (None for p = 0)


STATE_READ_ROWS = 64
"""Rows of a stored state the tile kernels read at a time (``walk.read_block``): 16 KB of
fp32 at BV = 64, which the bf16 tile forward's lowering places where its loop's tiles go
later (99,328 bytes of shared memory either way)."""


def walk(BV: int, opt: KernelOptions, exact_state: bool = False) -> SimpleNamespace:
    """The constants and macros of one kernel's chunk walk (see the module docstring).

    Constants: ``BV, BC, R, dtype, norm, normalize, target, smem`` (the shared scope),
    ``powers``, ``offsets`` (each block's first row in the stacked state), ``has0, has1,
    has2``, ``uses_x`` (q', k' enter: c1 or c2 != 0), ``exact_state`` and the symbolic sizes
    ``B, T, H``. With ``exact_state`` (a float32 gradient sweep whose state carries the
    caller's: ``backward``) the state's operands ``st[p].op`` hold ``tf32_hi(w_p S_p)`` and
    ``attend`` multiplies by the state in three tf32 products (``tf32_hi``), ~fp32.
    Raises ``ValueError`` for value columns BV other than 16, 32, 48, 64 in fp32 and 32, 64 in
    bf16 / fp16 (``call`` pads v to them: ``layout.padded_value_dim``), a chunk length that is
    not a multiple of 16, or powers that are not a sorted non-empty subset of (0, 1, 2).
    """
    norm, powers, normalize = opt.norm, opt.powers, opt.normalize
    dtype, BC, target = opt.dtype, opt.BC, opt.target
    if BV not in (16, 32, 48, 64) or (dtype != "float32" and BV % 32):
        raise ValueError(f"BV={BV}: the value columns must be 16, 32, 48 or 64 in float32, "
                         f"32 or 64 in {dtype} (Dv padded: layout.padded_value_dim)")  # fmt: skip
    if BC % 16 or BC <= 0:
        raise ValueError(f"BC={BC}: the chunk length must be a positive multiple of 16")
    if not powers or tuple(sorted(set(powers) & {0, 1, 2})) != tuple(powers):
        raise ValueError(f"powers={powers}: this kernel takes a sorted non-empty subset of "
                         "(0, 1, 2), the p with c_p != 0")  # fmt: skip
    has0, has1, has2 = (p in powers for p in range(3))
    offsets, R = block_offsets(powers)
    smem = "shared.dyn" if target == "cuda" else "shared"
    op_part = "hi" if exact_state else None  # what ``operand`` keeps of w_p S_p
    emulate = opt.tf32 and target == "c"  # tf32 products on the CPU (``mma``)
    B, Tn, H = T.dynamic("B, T, H")

    def feature(p, b_x, j, r, t0):
        """``x^(p)_r`` of chunk row j in fp32 (x' is zero past T; ``x^(0)`` is masked)."""
        if p == 0:
            return T.if_then_else(t0 + j < Tn, T.float32(1.0), T.float32(0.0))
        if p == 1:
            return T.cast(b_x[j, r], ACC)
        return T.cast(b_x[j, r // DK], ACC) * T.cast(b_x[j, r % DK], ACC)

    def total(terms):
        """The terms' sum as one expression (a sum over a chunk's rows into shared memory, 16
        rows ``16 n .. 16 n + 15`` at a time, takes 1/16 of a serial loop's read-modify-writes)."""
        return sum(terms[1:], terms[0])

    def similarity(sc, g):
        """``sim = sum_p w_p g^p`` for ``g = x' . y'`` (absent powers left out)."""
        terms = [sc[0]] if has0 else []
        if has1:
            terms.append(sc[1] * g)
        if has2:
            terms.append(sc[2] * g * g)
        return total(terms)

    def derivative(sc, g):
        """``d sim / dg = w_1 + 2 w_2 g`` (absent powers left out)."""
        if has1 and has2:
            return sc[1] + 2.0 * sc[2] * g
        return sc[1] if has1 else 2.0 * sc[2] * g

    def tf32_hi(v):
        """fp32 ``v`` with its 13 low mantissa bits cleared: what a tf32 product reads of it,
        exactly; ``v - tf32_hi(v)`` is the rest, so ``a b ~ hi(a) hi(b) + hi(a) lo(b) +
        lo(a) hi(b)`` in three tf32 products loses ~2^-22, not 2^-11."""
        return T.reinterpret(T.reinterpret(v, "uint32") & T.uint32(0xFFFFE000), ACC)

    def part(v, which):
        """``v`` whole (``which`` None), ``tf32_hi(v)`` ("hi") or ``v - tf32_hi(v)`` ("lo");
        "op": what ``operand`` keeps (hi with ``exact_state``, else whole)."""
        if which == "op":
            which = op_part
        if which is None:
            return v
        return tf32_hi(v) if which == "hi" else v - tf32_hi(v)

    @T.macro
    def mma(b_A, b_B, b_C, transpose_A=False, transpose_B=False):
        """``T.gemm(b_A, b_B, b_C, ...)``; with ``opt.tf32`` on the C target, fp32 operands
        read through tf32-truncated copies (``tf32_hi``), as a GPU's tensor cores read them."""
        if emulate and b_A.dtype == ACC:
            a_rows, a_cols = b_A.shape
            b_rows, b_cols = b_B.shape
            a_tf32 = T.alloc_shared((a_rows, a_cols), ACC, scope=smem)
            b_tf32 = T.alloc_shared((b_rows, b_cols), ACC, scope=smem)
            for i, j in T.Parallel(a_rows, a_cols):
                a_tf32[i, j] = tf32_hi(b_A[i, j])
            for i, j in T.Parallel(b_rows, b_cols):
                b_tf32[i, j] = tf32_hi(b_B[i, j])
            T.gemm(a_tf32, b_tf32, b_C, transpose_A=transpose_A, transpose_B=transpose_B)
        else:
            T.gemm(b_A, b_B, b_C, transpose_A=transpose_A, transpose_B=transpose_B)

    def causal(i, j, reverse):
        """Whether column j of chunk row i is a causal pair (``j >= i`` in a reverse walk)."""
        return j >= i if reverse else j <= i

    @T.macro
    def row_sum(b_src, b_dst, dim, warp):
        """``b_dst = b_src.sum(dim)`` for a 2-D fp32 tile: a warp reduction (``warp`` on CUDA,
        where b_src is a fragment whose layout a T.gemm fixed) or a serial loop."""
        if target == "cuda" and warp:
            T.reduce_sum(b_src, b_dst, dim=dim)
        else:
            rows, cols = b_src.shape
            if dim == 0:
                for a in T.Parallel(cols):
                    b_dst[a] = 0.0
                    for b in T.serial(rows):
                        b_dst[a] += b_src[b, a]
            else:
                for a in T.Parallel(rows):
                    b_dst[a] = 0.0
                    for b in T.serial(cols):
                        b_dst[a] += b_src[a, b]

    @T.macro
    def pre_transform(sc, b_xr, gamma, beta, b_x, b_mean, b_rstd, i_h, t0, b_x32=None):
        """``b_x [BC, 16] = gamma * LN(b_xr) + beta`` from the raw rows ``b_xr [BC, 16]``,
        the statistics over their first ``sc.D`` columns; ``b_mean, b_rstd [BC]`` keep them
        (0 and 1 without ``norm``). x' is 0 past T (masked) and in the columns >= D, where
        x, gamma and beta are zero (the host pads them so; a mask on the runtime D there
        doubles TileLang's lowering time). ``b_x32`` (unless None) gets x' unrounded, fp32:
        the scores' operands in a half kernel."""
        for i in T.Parallel(BC):
            b_mean[i] = 0.0
            b_rstd[i] = 0.0
            if norm:  # (one division a sum, not one a term)
                for d in T.serial(sc.D):
                    b_mean[i] += T.cast(b_xr[i, d], ACC)
                b_mean[i] = b_mean[i] / T.cast(sc.D, ACC)
                for d in T.serial(sc.D):
                    centred = T.cast(b_xr[i, d], ACC) - b_mean[i]
                    b_rstd[i] += centred * centred
                b_rstd[i] = T.rsqrt(b_rstd[i] / T.cast(sc.D, ACC) + LAYER_NORM_EPS)
            else:
                b_rstd[i] = 1.0
        for i, d in T.Parallel(BC, DK):
            xn = (T.cast(b_xr[i, d], ACC) - b_mean[i]) * b_rstd[i]
            xp = gamma[i_h, d] * xn + beta[i_h, d]
            b_x[i, d] = T.if_then_else(t0 + i < Tn, T.cast(xp, dtype), 0)
            if b_x32 is not None:
                b_x32[i, d] = T.if_then_else(t0 + i < Tn, T.cast(xp, ACC), 0.0)

    @T.macro
    def features(b_x, b_phi, which=None):
        """``b_phi [BC, 256] = x^(2)`` of the rows ``b_x``, formed in fp32 (``part`` of it)."""
        for i, f in T.Parallel(BC, F):
            b_phi[i, f] = T.cast(part(feature(2, b_x, i, f, 0), which), dtype)

    @T.macro
    def operand(sc, b_Sp, b_Sop, p, which="op"):
        """``b_Sop = w_p S_p`` rounded to dtype: the state as a ``T.gemm`` operand; with
        ``exact_state`` its tf32 part, or ``which`` ("hi" / "lo") of it (``part``)."""
        for r, e in T.Parallel(ROWS[p], BV):
            b_Sop[r, e] = T.cast(part(sc[p] * b_Sp[r, e], which), dtype)

    @T.macro
    def x_part(b_x, b_X, p, which):
        """``b_X = part(x^(p))`` of the rows ``b_x``: the features (p = 2) or x' (p = 1)."""
        if p == 2:
            features(b_x, b_X, which)
        else:
            for i, a in T.Parallel(BC, DK):
                b_X[i, a] = part(b_x[i, a], which)

    @T.macro
    def state_product(sc, st, p, b_X, b_out, transpose_B, b_X_lo=None, b_x=None):
        """``b_out += X (w_p S_p)`` (``transpose_B``: ``X (w_p S_p)^T``) from the operand
        ``st[p].op``: one product, or with ``exact_state`` three tf32 ones, ``hi(X) hi(S)``,
        ``hi(X) lo(S)`` (the operand turned to its lo part and back) and ``lo(X) hi(S)``:
        ``lo(X)`` is ``b_X_lo``, or (``b_x`` given: the rows whose power-p features X are,
        ``x_part``) ``b_X`` rewritten to it in place."""
        mma(b_X, st[p].op, b_out, transpose_B=transpose_B)
        if exact_state:
            operand(sc, st[p].S, st[p].op, p, "lo")
            mma(b_X, st[p].op, b_out, transpose_B=transpose_B)
            operand(sc, st[p].S, st[p].op, p, "hi")
            if b_x is None:
                mma(b_X_lo, st[p].op, b_out, transpose_B=transpose_B)
            else:
                x_part(b_x, b_X, p, "lo")
                mma(b_X, st[p].op, b_out, transpose_B=transpose_B)

    @T.macro
    def state_block(sc, S, z, p, i_b, i_h, load):
        """Allocate block p of a state (``Block``'s tiles) and fill it from ``S [B, H, R, BV]``,
        ``z [B, H, R]`` (``load``) or with zeros; returns ``(S_p, z_p, w_p S_p operand)``."""
        if p == 2:
            b_Sp = T.alloc_fragment((F, BV), ACC)  # [256, BV]
        else:
            b_Sp = T.alloc_shared((ROWS[p], BV), ACC, scope=smem)  # [ROWS[p], BV]
        b_zp = T.alloc_shared((ROWS[p],), ACC, scope=smem)  # [ROWS[p]]
        for r, e in T.Parallel(ROWS[p], BV):
            if load:
                b_Sp[r, e] = S[i_b, i_h, offsets[p] + r, e]
            else:
                b_Sp[r, e] = 0.0
        for r in T.Parallel(ROWS[p]):
            if load:
                b_zp[r] = z[i_b, i_h, offsets[p] + r]
            else:
                b_zp[r] = 0.0
        b_Sop = None
        if p != 0:
            b_Sop = T.alloc_shared((ROWS[p], BV), dtype, scope=smem)  # [ROWS[p], BV]
            operand(sc, b_Sp, b_Sop, p)
        return b_Sp, b_zp, b_Sop

    @T.macro
    def read_block(sc, S, z, p, i_b, i_h):
        """Block p of a stored state read for products only (the tile kernels': they never
        update it): ``state_block``'s tiles, without the fp32 ``S_p`` on chip unless
        ``exact_state`` splits its operand or p = 0 (added, not multiplied). ``w_p S_p`` comes
        through an fp32 tile of ``STATE_READ_ROWS`` rows at a time, one TMA load each on
        Hopper (the C target ignores the hint; read element by element, each load sat in its
        own guarded branch with its use: 43 serial round trips a thread in the bf16 tile
        forward, session 21; as a plain ``T.copy`` of 64 rows, 11)."""
        if p == 0 or exact_state:
            return state_block(sc, S, z, p, i_b, i_h, True)
        b_zp = T.alloc_shared((ROWS[p],), ACC, scope=smem)  # [ROWS[p]]
        b_Sop = T.alloc_shared((ROWS[p], BV), dtype, scope=smem)  # [ROWS[p], BV] w_p S_p
        n = min(ROWS[p], STATE_READ_ROWS)
        b_st = T.alloc_shared((n, BV), ACC, scope=smem)  # [n, BV] fp32 rows in flight
        for rb in T.serial(ROWS[p] // n):
            T.copy(
                S[i_b, i_h, offsets[p] + rb * n : offsets[p] + rb * n + n, :],
                b_st,
                annotations={"prefer_instruction": "tma"},
            )
            for r, e in T.Parallel(n, BV):
                b_Sop[rb * n + r, e] = T.cast(sc[p] * b_st[r, e], dtype)
        for r in T.Parallel(ROWS[p]):
            b_zp[r] = z[i_b, i_h, offsets[p] + r]
        return None, b_zp, b_Sop

    @T.macro
    def segment(i_b, i_c, L):
        """Chunk ``i_c``'s segment of L tokens (a multiple of BC; the tile kernels') as
        per-program scalars computed once: its first chunk ``lo``, its last ``hi`` (the
        sequence's last for the last segment) and its row ``i_s = i_b ceil(T / L) + seg`` of
        the stored starts. (As plain expressions TileLang inlined them into every index: the
        tile forward's PTX held 88 int64 divisions by L, its state read one per element.)"""
        seg = T.alloc_var("int32", init=i_c * BC // L)
        lo = T.alloc_var("int32", init=seg * (L // BC))
        hi = T.alloc_var("int32", init=T.min(lo + L // BC, T.ceildiv(Tn, BC)) - 1)
        i_s = T.alloc_var("int32", init=i_b * T.ceildiv(Tn, L) + seg)
        return lo, hi, i_s

    def read_state(sc, S, z, i_b, i_h):
        """``{p: Block}`` of the stored state at ``S[i_b, i_h]``, ``z[i_b, i_h]`` over the
        powers present (``read_block``)."""
        return {p: Block(*read_block(sc, S, z, p, i_b, i_h)) for p in powers}

    @T.macro
    def store_state(S, z, st, i_b, i_h):
        """Every block of the state ``st`` into ``S [B, H, R, BV]``, ``z [B, H, R]``."""
        for p in st:
            for r, e in T.Parallel(ROWS[p], BV):
                S[i_b, i_h, offsets[p] + r, e] = st[p].S[r, e]
            for r in T.Parallel(ROWS[p]):
                z[i_b, i_h, offsets[p] + r] = st[p].z[r]

    @T.macro
    def scores(b_x, b_y, b_s, exact=False):
        """``b_s [BC, BC] = X' Y'^T`` in fp32 (left alone for sim = c0: x' never enters):
        a ``T.gemm`` (tf32 for fp32 tiles), or with ``exact`` 16 fp32 FMAs per pair on the
        CUDA cores (the gradient sweeps: dq ~ sim'(s) carries s's cancellation, which tf32
        scores measured at 4.3e-2 on an fp16 T = 1 draw, H200 session 11)."""
        if has1 or has2:
            for i, j in T.Parallel(BC, BC):
                b_s[i, j] = 0.0
            if exact:
                for i, j in T.Parallel(BC, BC):
                    for d in T.serial(DK):
                        b_s[i, j] += T.cast(b_x[i, d], ACC) * T.cast(b_y[j, d], ACC)
            else:
                mma(b_x, b_y, b_s, transpose_B=True)

    @T.macro
    def similarities(sc, b_s, b_A, b_den, reverse, before=None):
        """``b_s = A`` in place (``sim`` on the causal pairs, 0 elsewhere), ``b_den = A 1``
        (unless None) and ``b_A = A`` rounded to dtype, a ``T.gemm`` operand. ``before``
        (a runtime condition, the tile forward's): the key chunk precedes the query chunk,
        so every pair is causal."""
        for i, j in T.Parallel(BC, BC):
            keep = causal(i, j, reverse) if before is None else T.Or(before, causal(i, j, reverse))
            b_s[i, j] = T.if_then_else(keep, similarity(sc, b_s[i, j]), 0.0)
        if b_den is not None:
            row_sum(b_s, b_den, 1, has1 or has2)
        T.copy(b_s, b_A)

    @T.macro
    def state_out(sc, b_x, b_phi, st, b_o, b_xs=None):
        """``b_o [BC, BV] += sum_p X^(p) (w_p S_p)``: the state's part of ``attend`` (the tile
        forward's whole state part, ``tile``); ~fp32 with ``exact_state`` (``attend``)."""
        if has2:  # (exact_state: phi's tf32 part, then its rest, ``state_product``)
            x_part(b_x, b_phi, 2, "hi" if exact_state else None)
            state_product(sc, st, 2, b_phi, b_o, False, None, b_x)
        if has1 and exact_state:  # (x' split into b_xs: b_x stays whole)
            x_part(b_x, b_xs, 1, "hi")
            state_product(sc, st, 1, b_xs, b_o, False, None, b_x)
        elif has1:
            state_product(sc, st, 1, b_x, b_o, False)
        if has0:
            for i, e in T.Parallel(BC, BV):
                b_o[i, e] += sc[0] * st[0].S[0, e]

    @T.macro
    def attend(sc, b_A, b_W, b_x, b_phi, st, b_o, lo=None, b_xs=None):
        """``b_o [BC, BV] = A W + sum_p X^(p) (w_p S_p)`` (the forward's numerator); with
        ``lo = (A_lo, W_lo)`` (a sweep's split tiles: b_A, b_W their hi parts) ``A W`` is
        three products, ~fp32 exact; so is the state's part with ``exact_state``, where
        ``b_xs [BC, 16]`` (fp32) takes x' hi then lo for the power-1 block."""
        for i, e in T.Parallel(BC, BV):
            b_o[i, e] = 0.0
        mma(b_A, b_W, b_o)
        if lo is not None:
            mma(lo[0], b_W, b_o)
            mma(b_A, lo[1], b_o)
        state_out(sc, b_x, b_phi, st, b_o, b_xs)

    @T.macro
    def inter_den(sc, b_den, st, b_x, t0):
        """``b_den += sum_p w_p X^(p) z_p`` in fp32. For p = 2 as ``x'^T Z x'`` with
        ``Z [16, 16] = z_2``: ``u_a = x'_a sum_b Z_ab x'_b`` on every (row, a) at once, then
        ``sum_a u_a`` per row (two 16-term loops a thread; one 256-term loop per row,
        repeated on the 4 lanes that share b_den's rows, measured the forward's longest
        serial chain in the sm_90a source)."""
        for p in st:
            if p == 2:
                b_u = T.alloc_shared((DK, BC), ACC, scope=smem)  # [16, BC] u^T
                # one expression (no sum in shared memory); a outermost: a thread's elements
                # take different rows of Z, used one after the other (rows outermost, they
                # share one row, which nvcc kept in 16 registers: a Based forward spilled)
                for a, i in T.Parallel(DK, BC):
                    Zx = [st[2].z[DK * a + b] * T.cast(b_x[i, b], ACC) for b in range(DK)]
                    b_u[a, i] = total(Zx) * T.cast(b_x[i, a], ACC)
                for i in T.Parallel(BC):
                    for a in T.serial(DK):
                        b_den[i] += sc[2] * b_u[a, i]
            else:
                for i in T.Parallel(BC):
                    for r in T.serial(ROWS[p]):
                        b_den[i] += sc[p] * feature(p, b_x, i, r, t0) * st[p].z[r]

    @T.macro
    def accumulate(b_Sp, b_zp, p, b_y, b_W, b_w, t0):
        """``S_p += Y^(p)T W`` (unless ``b_Sp`` is None: S_2 is a T.gemm) and
        ``z_p += Y^(p)T w`` (w = 1 when ``b_w`` is None; z left alone when ``b_zp`` is),
        in fp32."""
        if b_Sp is not None:
            for r, e in T.Parallel(ROWS[p], BV):
                for n in T.serial(BC // 16):
                    rows = [16 * n + u for u in range(16)]
                    b_Sp[r, e] += total([feature(p, b_y, j, r, t0) * T.cast(b_W[j, e], ACC)
                                         for j in rows])  # fmt: skip
        if b_zp is not None:
            for r in T.Parallel(ROWS[p]):
                for n in T.serial(BC // 16):
                    rows = [16 * n + u for u in range(16)]
                    if b_w is None:
                        b_zp[r] += total([feature(p, b_y, j, r, t0) for j in rows])
                    else:
                        b_zp[r] += total([feature(p, b_y, j, r, t0) * b_w[j] for j in rows])

    @T.macro
    def update(sc, st, b_y, b_W, b_w, b_phi, t0, with_z, operands=True):
        """The state after this chunk: ``S_p += Y^(p)T W`` (``S_2`` on the tensor cores),
        ``z_p += Y^(p)T w`` when ``with_z``, and the operands ``w_p S_p`` refreshed (unless
        not ``operands``: a walk that never multiplies by its state)."""
        for p in st:  # (binding a tile to a new name inside a macro would rename it)
            if p == 2:
                features(b_y, b_phi)
                mma(b_phi, b_W, st[2].S, transpose_A=True)
                accumulate(None, st[2].z if with_z else None, 2, b_y, b_W, b_w, t0)
            else:
                accumulate(st[p].S, st[p].z if with_z else None, p, b_y, b_W, b_w, t0)
            if p != 0 and operands:
                operand(sc, st[p].S, st[p].op, p)

    return SimpleNamespace(
        BV=BV, BC=BC, R=R, dtype=dtype, norm=norm, normalize=normalize,
        target=target, smem=smem, powers=powers, offsets=offsets, has0=has0, has1=has1,
        exact_state=exact_state, tf32_hi=tf32_hi, part=part, state_product=state_product,
        has2=has2, uses_x=has1 or has2, B=B, T=Tn, H=H, feature=feature, similarity=similarity,
        derivative=derivative, causal=causal, mma=mma, row_sum=row_sum, pre_transform=pre_transform,
        features=features, operand=operand, state_block=state_block, read_state=read_state,
        store_state=store_state, scores=scores, similarities=similarities, attend=attend,
        state_out=state_out, segment=segment,
        inter_den=inter_den, update=update,
    )  # fmt: skip
