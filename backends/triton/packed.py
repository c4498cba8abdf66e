"""Triton kernels of the ``packed`` variant: D <= 16, the quadratic state in 144 rows.

Legend (``spec`` names; per (batch, head) program; see ``kernels`` for x, y, W, U)
----------------------------------------------------------------------------------
``BC``  chunk length; ``NCS`` chunks per segment; ``BV`` the value dim padded (>= Dv).
``x'``  the pre-transformed rows ``[BC, 16]`` (D padded to 16 with exact zeros).

The quadratic features are *cyclic pairs*: feature ``f = 16 d + a`` of block A
(``d = 0..7``, 128 rows) is ``w_d x'_a x'_{(a+d) mod 16}`` with ``w_0 = 1``,
``w_d = sqrt 2``; block B (16 rows) is ``x'_e x'_{(e+8) mod 16}``. Every unordered pair
``{a, b}`` appears once with weight 2 (twice with weight 1 at distance 8), every square once,
so ``phi_A(x) . phi_A(y) + phi_B(x) . phi_B(y) = (x' . y')^2`` with 144 rows, not 256.
The rows come out of the tensor cores: ``X1 = x' E1``, ``X2 = x' E2`` with one-hot
``E1, E2 [16, 128]`` (a gather of columns as a product, exact in the selection). Kept
unweighted by the polynomial, the state is::

    S0 = sum W [BV]; S1 = sum y' W^T [16, BV]; SA = sum phi_A(y) W^T [128, BV];
    SB = sum phi_B(y) W^T [16, BV]; z0 = sum w; z1 = sum y' w [16]; Z2 = sum w y' y'^T [16, 16]

and ``phi(x) . S = C0 S0 + C1 sc x'.S1 + C2 sc^2 (phi_A(x) . SA + phi_B(x) . SB)``,
``phi(x) . z = C0 z0 + C1 sc x'.z1 + C2 sc^2 x'^T Z2 x'``. Stored per segment as
``RS = 161`` rows of Dv (S0, S1, SA, SB) and ``RZ = 273`` numbers (z0, z1, Z2); the host
maps them to and from the canonical layout (``_packed_maps``).

``SP``: the operands of the state products: "bf16" (fast; a state built from the call's own
tokens), "tf32" (a caller's state, or gradients), "ieee" (fp32 inputs); "fp16" stands in for
"bf16" under the interpreter, which has no bfloat16.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .kernels import (
    RUNTIME,
    _dot,
    _dot_A,
    _dot_tf32,
    _gradient_scale,
    _keep,
    _pair_grad,
    _pre,
    _sim,
    _store_dx,
)

RS = tl.constexpr(161)  # state rows: S0 | S1 (16) | SA (128) | SB (16)
RZ = tl.constexpr(273)  # normaliser numbers: z0 | z1 (16) | Z2 (256)


@triton.jit
def _selectors():
    """``E1, E2 [16, 128]``: one-hot columns picking ``x'_a`` and ``x'_{(a+d) mod 16}`` for
    feature ``16 d + a``; ``P8 [16, 16]`` picks ``x'_{(e+8) mod 16}``; ``wA [128]``."""
    f = tl.arange(0, 128)
    d = tl.arange(0, 16)
    a = f % 16
    E1 = (d[:, None] == a[None, :]).to(tl.float32)
    E2 = (d[:, None] == ((a + f // 16) % 16)[None, :]).to(tl.float32)
    P8 = (d[:, None] == ((d + 8) % 16)[None, :]).to(tl.float32)
    wA = tl.where(f < 16, 1.0, 1.4142135623730951)
    return E1, E2, P8, wA


@triton.jit
def _phi(x, E1, E2, P8, wA, SP: tl.constexpr):
    """``(phi_A [BC, 128], phi_B [BC, 16], X1, X2 [BC, 128], X8 [BC, 16])`` of rows x'."""
    X1 = _dot(x, E1, SP)  # x'_a
    X2 = _dot(x, E2, SP)  # x'_{(a+d) mod 16}
    X8 = _dot(x, P8, SP)  # x'_{(e+8) mod 16}
    return X1 * X2 * wA[None, :], x * X8, X1, X2, X8


@triton.jit
def _lin_part(x, S0, S1, z0, z1, sc, C0, C1, SP: tl.constexpr):
    """The powers 0 and 1 of ``(phi(x) . S [BC, BV], phi(x) . z [BC])``."""
    out = C0 * S0[None, :] + (C1 * sc) * _dot(x, S1, SP)
    return out, C0 * z0 + (C1 * sc) * tl.sum(x * z1[None, :], 1)


@triton.jit
def _state_part(x, phA, phB, S0, S1, SA, SB, z0, z1, Z2, sc, C0, C1, C2, SP: tl.constexpr,
                HAS_LIN: tl.constexpr, HAS_C2: tl.constexpr):  # fmt: skip
    """``(phi(x) . S [BC, BV], phi(x) . z [BC], x' Z2 [BC, 16])`` of the state so far."""
    xz = tl.dot(x, Z2, input_precision="ieee")  # [BC, 16]
    if HAS_C2:
        c2 = C2 * sc * sc
        out = c2 * (_dot(phA, SA, SP) + _dot(phB, SB, SP))  # [BC, BV]
        den = c2 * tl.sum(x * xz, 1)  # [BC]
        if HAS_LIN:
            lin, lin_den = _lin_part(x, S0, S1, z0, z1, sc, C0, C1, SP)
            out += lin
            den += lin_den
    else:
        out, den = _lin_part(x, S0, S1, z0, z1, sc, C0, C1, SP)
    return out, den, xz


@triton.jit
def _state_grad(Ut, u, x, X1, X2, X8, xz, S1, SA, SB, z1, E1, E2, P8, wA, sc, C1, C2,
                SP: tl.constexpr, HAS_LIN: tl.constexpr, HAS_C2: tl.constexpr):  # fmt: skip
    """The state's part of ``dx'`` [BC, 16]: ``d/dx' [phi(x) . (S U_i + z u_i)]``.

    With ``M = U S^T`` per block, ``d phi_A / dx'`` sends ``M w X2`` to column a and
    ``M w X1`` to column ``(a+d) mod 16``: the transposed one-hot products ``. E1^T``,
    ``. E2^T``; block B likewise with ``P8``; ``Z2`` is symmetric: ``2 u x' Z2``."""
    dxp = x * 0.0
    if HAS_C2:
        MA = _dot(Ut, tl.trans(SA), SP) * wA[None, :]  # [BC, 128]
        MB = _dot(Ut, tl.trans(SB), SP)  # [BC, 16]
        dA = _dot_tf32(MA * X2, tl.trans(E1), SP) + _dot_tf32(MA * X1, tl.trans(E2), SP)
        dB = MB * X8 + _dot_tf32(MB * x, tl.trans(P8), SP)
        dxp = (C2 * sc * sc) * (dA + dB + 2.0 * u[:, None] * xz)
    if HAS_LIN:
        dxp += (C1 * sc) * (_dot(Ut, tl.trans(S1), SP) + u[:, None] * z1[None, :])
    return dxp


@triton.jit
def _update(y, Wt, wc, S0, S1, SA, SB, z0, z1, Z2, E1, E2, P8, wA, SP: tl.constexpr,
            HAS_LIN: tl.constexpr, HAS_C2: tl.constexpr):  # fmt: skip
    """Add one chunk of columns ``(y' [BC, 16], W [BC, BV], w [BC])`` to the state."""
    if HAS_C2:
        phA, phB, _, _, _ = _phi(y, E1, E2, P8, wA, SP)
        SA += _dot(tl.trans(phA), Wt, SP)
        SB += _dot(tl.trans(phB), Wt, SP)
        Z2 += tl.dot(tl.trans(y * wc[:, None]), y, input_precision="ieee")
    if HAS_LIN:
        S0 += tl.sum(Wt, 0)
        S1 += _dot(tl.trans(y), Wt, SP)
        z0 += tl.sum(wc, 0)
        z1 += tl.sum(y * wc[:, None], 0)
    return S0, S1, SA, SB, z0, z1, Z2


@triton.jit
def _state_ptrs(Sst, Zst, base, offs_v, Dv):
    """Pointers to one stored state (``base``: its index in ``[B*H, NSEG]``): S0 [BV],
    S1 [16, BV], SA [128, BV], SB [16, BV], z0, z1 [16], Z2 [16, 16]."""
    d = tl.arange(0, 16)
    f = tl.arange(0, 128)
    S = Sst + base * RS * Dv
    row = S + offs_v[None, :]
    z = Zst + base * RZ
    z2 = z + 17 + d[:, None] * 16 + d[None, :]
    return (S + offs_v, row + (1 + d[:, None]) * Dv, row + (17 + f[:, None]) * Dv,
            row + (145 + d[:, None]) * Dv, z, z + 1 + d, z2)  # fmt: skip


@triton.jit
def _load_state(Sst, Zst, base, offs_v, vmask, Dv):
    p0, p1, pA, pB, q0, q1, q2 = _state_ptrs(Sst, Zst, base, offs_v, Dv)
    m = vmask[None, :]
    return (tl.load(p0, mask=vmask, other=0.0), tl.load(p1, mask=m, other=0.0),
            tl.load(pA, mask=m, other=0.0), tl.load(pB, mask=m, other=0.0), tl.load(q0),
            tl.load(q1), tl.load(q2))  # fmt: skip


@triton.jit
def _columns(Y, YG, YB, W, WS, Wsc, tok, h, rows, rmask, offs_d, offs_v, vmask, T, H, D, Dv,
             pgy_stride, NORM, HAS_WS: tl.constexpr, HAS_WSC: tl.constexpr):  # fmt: skip
    """The column side of chunk rows: ``(y' [BC, 16], W [BC, BV] fp32, w [BC])``; W is
    scaled per row by WS (``g = dO / (den + eps)``) when ``HAS_WS``."""
    y, _, _ = _pre(Y + tok * D, YG + h * pgy_stride, YB + h * pgy_stride, rows, rmask, offs_d,
                   D, H * D, NORM)  # fmt: skip
    Wt = tl.load(W + (tok + rows[:, None] * H) * Dv + offs_v[None, :],
                 mask=rmask[:, None] & vmask[None, :], other=0.0).to(tl.float32)  # fmt: skip
    if HAS_WS:
        Wt = Wt * tl.load(WS + tok + rows * H, mask=rmask, other=0.0)[:, None]
    if HAS_WSC:
        wc = tl.load(Wsc + tok + rows * H, mask=rmask, other=0.0)
    else:
        wc = rmask.to(tl.float32)
    return y, Wt, wc


@triton.jit(do_not_specialize=[a for a in RUNTIME if a not in ("NORMALIZE", "pgx_stride")])
def packed_state_kernel(
    Y, YG, YB, W, WS, Wsc, Sst, Zst,
    T, H, D, Dv, pgy_stride, NSEG, NCS, NORM,
    BC: tl.constexpr, BV: tl.constexpr, HAS_WS: tl.constexpr, HAS_WSC: tl.constexpr,
    HAS_LIN: tl.constexpr, HAS_C2: tl.constexpr, SP: tl.constexpr,
):  # fmt: skip
    """Grid ``(NSEG, B*H)``: each segment's own state sum (no prefix), stored."""
    seg, bh = tl.program_id(0), tl.program_id(1)
    h = bh % H
    tok = (bh // H) * T * H + h
    offs_c, offs_d, offs_v = tl.arange(0, BC), tl.arange(0, 16), tl.arange(0, BV)
    vmask = offs_v < Dv
    E1, E2, P8, wA = _selectors()
    S0 = tl.zeros([BV], tl.float32)
    S1 = tl.zeros([16, BV], tl.float32)
    SA = tl.zeros([128, BV], tl.float32)
    SB = tl.zeros([16, BV], tl.float32)
    z0 = tl.sum(S0, 0) * 0.0
    z1 = tl.zeros([16], tl.float32)
    Z2 = tl.zeros([16, 16], tl.float32)
    for i in range(NCS):
        rows = (seg * NCS + i) * BC + offs_c
        rmask = rows < T
        y, Wt, wc = _columns(Y, YG, YB, W, WS, Wsc, tok, h, rows, rmask, offs_d, offs_v, vmask,
                             T, H, D, Dv, pgy_stride, NORM, HAS_WS, HAS_WSC)  # fmt: skip
        S0, S1, SA, SB, z0, z1, Z2 = _update(y, Wt, wc, S0, S1, SA, SB, z0, z1, Z2, E1, E2, P8,
                                             wA, SP, HAS_LIN, HAS_C2)  # fmt: skip
    p0, p1, pA, pB, q0, q1, q2 = _state_ptrs(Sst, Zst, bh * NSEG + seg, offs_v, Dv)
    m = vmask[None, :]
    tl.store(p0, S0, mask=vmask)
    tl.store(p1, S1, mask=m)
    tl.store(pA, SA, mask=m)
    tl.store(pB, SB, mask=m)
    tl.store(q0, z0)
    tl.store(q1, z1)
    tl.store(q2, Z2)


@triton.jit(do_not_specialize=RUNTIME)
def packed_sweep_kernel(
    X, XG, XB, Y, YG, YB, W, WS, Wsc, U, DO, Sst, Zst,
    OUT, INV, ROUT, DX, DG, DB,
    T, H, D, Dv, pgx_stride, pgy_stride, NSEG, NCS, NORM, NORMALIZE, sc, C0, C1, C2, eps,
    BC: tl.constexpr, BV: tl.constexpr, MODE: tl.constexpr, HAS_WS: tl.constexpr,
    HAS_WSC: tl.constexpr, HAS_LIN: tl.constexpr, HAS_C2: tl.constexpr, DOT: tl.constexpr,
    SP: tl.constexpr,
):  # fmt: skip
    """Grid ``(NSEG, B*H)``: walk one segment's chunks from its prefix (suffix) state.

    The modes are ``kernels.sweep_kernel``'s: 0 forward (x = q, y = k, W = v, w = 1); 1 the
    gradient of q, storing ``INV = 1 / (den + eps)`` (1 without normalising) and
    ``ROUT = r = -(dO . out) / (den + eps)^2`` per row; 2 (reverse) the gradients of k and v
    with x = k, y = q, ``W = dO * INV`` (``HAS_WS``), ``w = r``, U = v, u = 1, where
    ``out`` is dv. ``DG``/``DB`` get per-segment d gamma / d beta sums. BV >= Dv."""
    seg, bh = tl.program_id(0), tl.program_id(1)
    h = bh % H
    tok = (bh // H) * T * H + h
    offs_c, offs_d, offs_v = tl.arange(0, BC), tl.arange(0, 16), tl.arange(0, BV)
    vmask = offs_v < Dv
    E1, E2, P8, wA = _selectors()
    S0, S1, SA, SB, z0, z1, Z2 = _load_state(Sst, Zst, bh * NSEG + seg, offs_v, vmask, Dv)
    dg_acc = tl.zeros([16], tl.float32)
    db_acc = tl.zeros([16], tl.float32)
    for i in range(NCS):
        if MODE == 2:
            c = seg * NCS + NCS - 1 - i
        else:
            c = seg * NCS + i
        rows = c * BC + offs_c
        rmask = rows < T
        tv_mask = rmask[:, None] & vmask[None, :]  # [BC, BV]
        o_ptrs = (tok + rows[:, None] * H) * Dv + offs_v[None, :]  # [BC, BV]
        x, xh, rstd = _pre(X + tok * D, XG + h * pgx_stride, XB + h * pgx_stride, rows, rmask,
                           offs_d, D, H * D, NORM)  # [BC, 16]  # fmt: skip
        y, Wt, wc = _columns(Y, YG, YB, W, WS, Wsc, tok, h, rows, rmask, offs_d, offs_v, vmask,
                             T, H, D, Dv, pgy_stride, NORM, HAS_WS, HAS_WSC)  # fmt: skip
        keep = _keep(c, c, rmask, offs_c, MODE == 2)  # the diagonal chunk
        s, A = _sim(x, y, keep, sc, C0, C1, C2, DOT)  # [BC, BC]
        phA, phB, X1, X2, X8 = _phi(x, E1, E2, P8, wA, SP)
        out, den, xz = _state_part(x, phA, phB, S0, S1, SA, SB, z0, z1, Z2, sc, C0, C1, C2, SP,
                                   HAS_LIN, HAS_C2)  # fmt: skip
        out += _dot_A(A, Wt, DOT, MODE)
        den += tl.sum(A * wc[None, :], 1)
        if MODE == 0:
            if NORMALIZE:
                out = out / (den + eps)[:, None]
            tl.store(OUT + o_ptrs, out.to(OUT.dtype.element_ty), mask=tv_mask)
        else:
            if MODE == 1:
                Ut, u = _gradient_scale(out, den, DO, o_ptrs, tv_mask, INV, ROUT, tok, rows,
                                        rmask, H, eps, NORMALIZE)  # fmt: skip
            else:
                tl.store(OUT + o_ptrs, out.to(OUT.dtype.element_ty), mask=tv_mask)
                Ut = tl.load(U + o_ptrs, mask=tv_mask, other=0.0).to(tl.float32)
                u = rmask.to(tl.float32)
            dxp = _pair_grad(Ut, u, Wt, wc, s, keep, y, sc, C1, C2, DOT)
            dxp += _state_grad(Ut, u, x, X1, X2, X8, xz, S1, SA, SB, z1, E1, E2, P8, wA, sc, C1,
                               C2, SP, HAS_LIN, HAS_C2)  # fmt: skip
            dg, db = _store_dx(dxp, xh, rstd, rmask, DX, XG + h * pgx_stride, tok, rows, offs_d,
                               H, D, NORM)  # fmt: skip
            dg_acc += dg
            db_acc += db
        S0, S1, SA, SB, z0, z1, Z2 = _update(y, Wt, wc, S0, S1, SA, SB, z0, z1, Z2, E1, E2, P8,
                                             wA, SP, HAS_LIN, HAS_C2)  # fmt: skip
    if MODE != 0:
        tl.store(DG + (bh * NSEG + seg) * 16 + offs_d, dg_acc)
        tl.store(DB + (bh * NSEG + seg) * 16 + offs_d, db_acc)
