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
    _below,
    _dot,
    _dot_A,
    _dot_exact,
    _dot_tf32,
    _dot_x2,
    _keep,
    _pair_grad,
    _pre_stats,
    _rows_done,
    _sim,
    _store_dx,
    _walk_rows,
    _weights_of,
)

RS = tl.constexpr(161)  # state rows: S0 | S1 (16) | SA (128) | SB (16)
RZ = tl.constexpr(273)  # normaliser numbers: z0 | z1 (16) | Z2 (256)
FB_ROWS = 32
"""Rows of block A one product takes (``FB``): the state kernel's programs each sum FB rows
(``config["state_rows"]``), a tile program reads the state FB rows at a time
(``config["tile_rows"]``); 32 keeps the tiles small, 128 takes block A in one product."""
FB_CHOICES = (32, 64, 128)


@triton.jit
def _selectors(blk, NF: tl.constexpr):
    """Rows ``f = blk * NF .. + NF`` of block A: ``(E1, E2 [16, NF], w [NF])``, one-hot
    columns picking ``x'_a`` and ``x'_{(a+d) mod 16}`` for feature ``f = 16 d + a``."""
    f = blk * NF + tl.arange(0, NF)
    d = tl.arange(0, 16)
    a = f % 16
    E1 = (d[:, None] == a[None, :]).to(tl.float32)
    E2 = (d[:, None] == ((a + f // 16) % 16)[None, :]).to(tl.float32)
    return E1, E2, _pair_weights(blk, NF)


@triton.jit
def _pair_weights(blk, NF: tl.constexpr):
    """``w [NF]`` of block A's rows ``blk * NF .. + NF``: 1 for the squares (d = 0), else
    sqrt 2 (each pair appears once)."""
    f = blk * NF + tl.arange(0, NF)
    return tl.where(f < 16, 1.0, 1.4142135623730951)


@triton.jit
def _p8():
    """``P8 [16, 16]``: the one-hot columns picking ``x'_{(e+8) mod 16}`` (block B)."""
    d = tl.arange(0, 16)
    return (d[:, None] == ((d + 8) % 16)[None, :]).to(tl.float32)


@triton.jit
def _gathered(ptr, g_ptr, b_ptr, rows, rmask, cols, mean, rstd, D, row_stride, NORM,
              TRANS: tl.constexpr):  # fmt: skip
    """``x'[rows, cols]`` straight from memory: ``[BC, NF]`` (``[NF, BC]`` when ``TRANS``),
    the raw x with the rows' LayerNorm statistics (``mean``, ``rstd`` [BC]) and gamma, beta
    at ``cols`` [NF] (columns >= D, and rows past T, give exact zeros)."""
    cmask = cols < D
    g = tl.load(g_ptr + cols, mask=cmask, other=0.0).to(tl.float32)  # [NF]
    b = tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)  # [NF]
    if TRANS:
        r2, c2, rm, cm = rows[None, :], cols[:, None], rmask[None, :], cmask[:, None]
        mu, rs, g2, b2 = mean[None, :], rstd[None, :], g[:, None], b[:, None]
    else:
        r2, c2, rm, cm = rows[:, None], cols[None, :], rmask[:, None], cmask[None, :]
        mu, rs, g2, b2 = mean[:, None], rstd[:, None], g[None, :], b[None, :]
    m = rm & cm
    x = tl.load(ptr + r2 * row_stride + c2, mask=m, other=0.0).to(tl.float32)
    if NORM:
        x = (x - mu) * rs
    return tl.where(m, x * g2 + b2, 0.0)


@triton.jit
def _pairs(x, ptr, g_ptr, b_ptr, rows, rmask, mean, rstd, D, row_stride, NORM, blk,
           NF: tl.constexpr, SP: tl.constexpr, GATHER: tl.constexpr,
           TRANS: tl.constexpr):  # fmt: skip
    """``(X1, X2)``: ``x'_a`` and ``x'_{(a+d) mod 16}`` for the features ``f = 16 d + a`` of
    rows ``blk * NF .. + NF`` of block A, ``[BC, NF]`` (``[NF, BC]`` when ``TRANS``): gathered
    from memory (``GATHER``: the pre-transform applied elementwise, no products), or as
    one-hot products of the tile x' [BC, 16] on the tensor cores."""
    if GATHER:
        f = blk * NF + tl.arange(0, NF)
        a = f % 16
        X1 = _gathered(ptr, g_ptr, b_ptr, rows, rmask, a, mean, rstd, D, row_stride, NORM, TRANS)
        X2 = _gathered(ptr, g_ptr, b_ptr, rows, rmask, (a + f // 16) % 16, mean, rstd, D,
                       row_stride, NORM, TRANS)  # fmt: skip
    else:
        E1, E2, _ = _selectors(blk, NF)
        if TRANS:
            xT = tl.trans(x)  # [16, BC]
            X1 = _dot(tl.trans(E1), xT, SP)
            X2 = _dot(tl.trans(E2), xT, SP)
        else:
            X1 = _dot(x, E1, SP)
            X2 = _dot(x, E2, SP)
    return X1, X2


@triton.jit
def _quad_out(X1, X2, w, SAb, SP: tl.constexpr):
    """``phi_A(x) . SA`` over one block of rows: ``(X1 * X2 * w) SA_b`` [BC, BV]."""
    return _dot(X1 * X2 * w[None, :], SAb, SP)


@triton.jit
def _quad_grad(Ut, X1, X2, SAb, E1, E2, w, SP: tl.constexpr):
    """One block's part of ``d/dx' [phi_A(x) . SA U]`` [BC, 16]: with ``M = w U SA_b^T``,
    ``M X2`` goes to column a and ``M X1`` to column ``(a+d) mod 16`` (the transposed
    one-hot products)."""
    M = _dot(Ut, tl.trans(SAb), SP) * w[None, :]  # [BC, NF]
    return _dot_tf32(M * X2, tl.trans(E1), SP) + _dot_tf32(M * X1, tl.trans(E2), SP)


@triton.jit
def _quad_update(X1t, X2t, w, Wt, SP: tl.constexpr):
    """One block's ``phi_A(y)^T W`` [NF, BV] from the transposed pairs ``[NF, BC]``."""
    return _dot(X1t * X2t * w[:, None], Wt, SP)


@triton.jit
def _rest_out(x, S0, S1, SB, z0, z1, Z2, P8, sc, C0, C1, C2, SP: tl.constexpr,
              HAS_LIN: tl.constexpr, HAS_C2: tl.constexpr):  # fmt: skip
    """Everything of ``(phi(x) . S [BC, BV], phi(x) . z [BC])`` but block A's numerator."""
    c2 = C2 * sc * sc
    xz = tl.dot(x, Z2, input_precision="ieee")  # [BC, 16]
    out = c2 * _dot(x * _dot(x, P8, SP), SB, SP)  # [BC, BV]
    den = c2 * tl.sum(x * xz, 1)  # [BC]
    if not HAS_C2:
        out, den = out * 0.0, den * 0.0
    if HAS_LIN:
        out += C0 * S0[None, :] + (C1 * sc) * _dot(x, S1, SP)
        den += C0 * z0 + (C1 * sc) * tl.sum(x * z1[None, :], 1)
    return out, den


@triton.jit
def _rest_grad(Ut, u, x, S1, SB, z1, Z2, P8, sc, C1, C2, SP: tl.constexpr,
               HAS_LIN: tl.constexpr, HAS_C2: tl.constexpr):  # fmt: skip
    """Everything of ``d/dx' [phi(x) . (S U_i + z u_i)]`` [BC, 16] but block A's numerator
    (block B as ``_quad_grad`` with ``P8``; Z2 is symmetric: ``2 u x' Z2``)."""
    dxp = x * 0.0
    if HAS_C2:
        MB = _dot(Ut, tl.trans(SB), SP)  # [BC, 16]
        dB = MB * _dot(x, P8, SP) + _dot_tf32(MB * x, tl.trans(P8), SP)
        dxp = (C2 * sc * sc) * (dB + 2.0 * u[:, None] * tl.dot(x, Z2, input_precision="ieee"))
    if HAS_LIN:
        dxp += (C1 * sc) * (_dot(Ut, tl.trans(S1), SP) + u[:, None] * z1[None, :])
    return dxp


@triton.jit
def _rest_update(y, Wt, wc, S0, S1, SB, z0, z1, Z2, P8, SP: tl.constexpr,
                 HAS_LIN: tl.constexpr, HAS_C2: tl.constexpr):  # fmt: skip
    """Add one chunk of columns ``(y' [BC, 16], W [BC, BV], w [BC])`` to all but SA."""
    if HAS_C2:
        yT = tl.trans(y)  # [16, BC]
        SB += _dot(_dot(tl.trans(P8), yT, SP) * yT, Wt, SP)
        Z2 += tl.dot(tl.trans(y * wc[:, None]), y, input_precision="ieee")
    if HAS_LIN:
        S0 += tl.sum(Wt, 0)
        S1 += _dot(tl.trans(y), Wt, SP)
        z0 += tl.sum(wc, 0)
        z1 += tl.sum(y * wc[:, None], 0)
    return S0, S1, SB, z0, z1, Z2


@triton.jit
def _rows_of(Sst, base, first, R: tl.constexpr, offs_v, vmask, Dv):
    """``[R, BV]`` pointers and mask of rows ``first .. first + R`` of the state at ``base``."""
    r = first + tl.arange(0, R)
    return Sst + (base * RS + r[:, None]) * Dv + offs_v[None, :], vmask[None, :]


@triton.jit
def _load_rest(Sst, Zst, base, offs_v, vmask, Dv):
    """``(S0 [BV], S1 [16, BV], SB [16, BV], z0, z1 [16], Z2 [16, 16])`` of a stored state;
    rows: S0 | S1 (1..16) | SA (17..144) | SB (145..160); z0 | z1 | Z2 (row-major)."""
    d = tl.arange(0, 16)
    z = Zst + base * RZ
    p1, m = _rows_of(Sst, base, 1, 16, offs_v, vmask, Dv)
    pB, _ = _rows_of(Sst, base, 145, 16, offs_v, vmask, Dv)
    S0 = tl.load(Sst + base * RS * Dv + offs_v, mask=vmask, other=0.0).to(tl.float32)
    return (S0, tl.load(p1, mask=m, other=0.0).to(tl.float32),
            tl.load(pB, mask=m, other=0.0).to(tl.float32), tl.load(z), tl.load(z + 1 + d),
            tl.load(z + 17 + d[:, None] * 16 + d[None, :]))  # fmt: skip


@triton.jit
def _zero_rest(BV: tl.constexpr):
    """``_load_rest``'s tiles of a zero state: ``(S0, S1, SB, z0, z1, Z2)``."""
    S0 = tl.zeros([BV], tl.float32)
    S1 = tl.zeros([16, BV], tl.float32)
    Z2 = tl.zeros([16, 16], tl.float32)
    return S0, S1, S1 * 0.0, tl.sum(S0, 0) * 0.0, tl.zeros([16], tl.float32), Z2


@triton.jit
def _store_rest(Sst, Zst, base, offs_v, vmask, Dv, S0, S1, SB, z0, z1, Z2):
    d = tl.arange(0, 16)
    z = Zst + base * RZ
    p1, m = _rows_of(Sst, base, 1, 16, offs_v, vmask, Dv)
    pB, _ = _rows_of(Sst, base, 145, 16, offs_v, vmask, Dv)
    tl.store(Sst + base * RS * Dv + offs_v, S0, mask=vmask)
    tl.store(p1, S1, mask=m)
    tl.store(pB, SB, mask=m)
    tl.store(z, z0)
    tl.store(z + 1 + d, z1)
    tl.store(z + 17 + d[:, None] * 16 + d[None, :], Z2)


@triton.jit
def _columns(Y, YG, YB, W, WS, Wsc, tok, h, rows, rmask, offs_d, offs_v, vmask, T, H, D, Dv,
             pgy_stride, NORM, HAS_WS: tl.constexpr, HAS_WSC: tl.constexpr,
             EVEN: tl.constexpr = False):  # fmt: skip
    """The column side of chunk rows: ``(y' [BC, 16], W [BC, BV] fp32, w [BC], mean, rstd)``
    (the rows' LayerNorm statistics, for ``_pairs``); W is scaled per row by WS
    (``g = dO / (den + eps)``) when ``HAS_WS``."""
    y, _, rstd, mean = _pre_stats(Y + tok * D, YG + h * pgy_stride, YB + h * pgy_stride, rows,
                                  rmask, offs_d, D, H * D, NORM, EVEN)  # fmt: skip
    Wt = tl.load(W + (tok + rows[:, None] * H) * Dv + offs_v[None, :],
                 mask=rmask[:, None] & vmask[None, :], other=0.0).to(tl.float32)  # fmt: skip
    if HAS_WS:
        Wt = Wt * tl.load(WS + tok + rows * H, mask=rmask, other=0.0)[:, None]
    if HAS_WSC:
        wc = tl.load(Wsc + tok + rows * H, mask=rmask, other=0.0)
    else:
        wc = rmask.to(tl.float32)
    return y, Wt, wc, mean, rstd


@triton.jit(do_not_specialize=[a for a in RUNTIME if a not in ("NORMALIZE", "pgx_stride")])
def packed_state_kernel(
    Y, YG, YB, W, WS, Wsc, Sst, Zst,
    T, H, D, Dv, pgy_stride, NSEG, NCS, NORM,
    BC: tl.constexpr, BV: tl.constexpr, HAS_WS: tl.constexpr, HAS_WSC: tl.constexpr,
    HAS_LIN: tl.constexpr, HAS_C2: tl.constexpr, SP: tl.constexpr, GATHER: tl.constexpr,
    FB: tl.constexpr, EVEN: tl.constexpr = False, FUSED: tl.constexpr = False,
):  # fmt: skip
    """Grid ``(NSEG, B*H, 128 / FB + 1)``: each segment's own state sum (no prefix), stored.
    Program ``blk < 128 / FB`` sums FB rows of SA, the last one the rest (SB, S1, S0, z):
    small accumulators, many programs. ``FUSED`` (FB = 128; grid ``(NSEG, B*H, 1)``): one
    program sums all of it from one load of each chunk. ``EVEN``: whole segments, D = 16,
    Dv = BV (no masks)."""
    seg, bh, blk = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    h = bh % H
    tok = (bh // H) * T * H + h
    offs_c, offs_d, offs_v = tl.arange(0, BC), tl.arange(0, 16), tl.arange(0, BV)
    vmask = _below(offs_v, Dv, EVEN)
    base = bh * NSEG + seg
    P8 = _p8()
    if blk < 128 // FB:
        w = _pair_weights(blk, FB)
        acc = tl.zeros([FB, BV], tl.float32)
        S0, S1, SB, z0, z1, Z2 = _zero_rest(BV)
        for i in range(NCS):
            rows = (seg * NCS + i) * BC + offs_c
            rmask = _below(rows, T, EVEN)
            y, Wt, wc, mu, rs = _columns(Y, YG, YB, W, WS, Wsc, tok, h, rows, rmask, offs_d,
                                        offs_v, vmask, T, H, D, Dv, pgy_stride, NORM, HAS_WS,
                                        HAS_WSC and FUSED, EVEN)  # fmt: skip
            X1t, X2t = _pairs(y, Y + tok * D, YG + h * pgy_stride, YB + h * pgy_stride, rows,
                              rmask, mu, rs, D, H * D, NORM, blk, FB, SP, GATHER, True)  # fmt: skip
            acc += _quad_update(X1t, X2t, w, Wt, SP)
            if FUSED:
                S0, S1, SB, z0, z1, Z2 = _rest_update(y, Wt, wc, S0, S1, SB, z0, z1, Z2, P8, SP,
                                                      HAS_LIN, HAS_C2)  # fmt: skip
        ptrs, m = _rows_of(Sst, base, 17 + blk * FB, FB, offs_v, vmask, Dv)
        tl.store(ptrs, acc, mask=m)
        if FUSED:
            _store_rest(Sst, Zst, base, offs_v, vmask, Dv, S0, S1, SB, z0, z1, Z2)
    else:
        S0, S1, SB, z0, z1, Z2 = _zero_rest(BV)
        for i in range(NCS):
            rows = (seg * NCS + i) * BC + offs_c
            rmask = _below(rows, T, EVEN)
            y, Wt, wc, mu, rs = _columns(Y, YG, YB, W, WS, Wsc, tok, h, rows, rmask, offs_d, offs_v,
                                       vmask, T, H, D, Dv, pgy_stride, NORM, HAS_WS,
                                       HAS_WSC, EVEN)  # fmt: skip
            S0, S1, SB, z0, z1, Z2 = _rest_update(y, Wt, wc, S0, S1, SB, z0, z1, Z2, P8, SP,
                                                  HAS_LIN, HAS_C2)  # fmt: skip
        _store_rest(Sst, Zst, base, offs_v, vmask, Dv, S0, S1, SB, z0, z1, Z2)


@triton.jit(do_not_specialize=RUNTIME)
def packed_sweep_kernel(
    X, XG, XB, Y, YG, YB, W, WS, Wsc, U, DO, Sst, Zst,
    OUT, INV, ROUT, DX, DG, DB,
    T, H, D, Dv, pgx_stride, pgy_stride, NSEG, NCS, NORM, NORMALIZE, sc, C0, C1, C2, eps,
    BC: tl.constexpr, BV: tl.constexpr, MODE: tl.constexpr, HAS_WS: tl.constexpr,
    HAS_WSC: tl.constexpr, HAS_LIN: tl.constexpr, HAS_C2: tl.constexpr, DOT: tl.constexpr,
    SP: tl.constexpr, GATHER: tl.constexpr, PREFIX: tl.constexpr,
):  # fmt: skip
    """Grid ``(NSEG, B*H)``: walk one segment's chunks from its prefix (suffix) state, or
    from zero without ``PREFIX`` (one segment, no caller's state: ``Sst``, ``Zst`` unread).

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
    E1, E2, wA = _selectors(0, 128)
    P8 = _p8()
    base = bh * NSEG + seg
    if PREFIX:
        S0, S1, SB, z0, z1, Z2 = _load_rest(Sst, Zst, base, offs_v, vmask, Dv)
        pA, mA = _rows_of(Sst, base, 17, 128, offs_v, vmask, Dv)
        SA = tl.load(pA, mask=mA, other=0.0)  # [128, BV]
    else:
        S0, S1, SB, z0, z1, Z2 = _zero_rest(BV)
        SA = tl.zeros([128, BV], tl.float32)
    dg_acc = tl.zeros([16], tl.float32)
    db_acc = tl.zeros([16], tl.float32)
    for i in range(NCS):
        c, rows, rmask, tv_mask = _walk_rows(seg, i, NCS, BC, offs_c, T, vmask, MODE == 2)
        o_ptrs = (tok + rows[:, None] * H) * Dv + offs_v[None, :]  # [BC, BV]
        x, xh, rstd, mean = _pre_stats(X + tok * D, XG + h * pgx_stride, XB + h * pgx_stride,
                                       rows, rmask, offs_d, D, H * D, NORM)  # [BC, 16]  # fmt: skip
        y, Wt, wc, mu, rs = _columns(Y, YG, YB, W, WS, Wsc, tok, h, rows, rmask, offs_d, offs_v,
                                     vmask, T, H, D, Dv, pgy_stride, NORM, HAS_WS,
                                     HAS_WSC)  # fmt: skip
        keep = _keep(c, c, rmask, offs_c, MODE == 2)  # the diagonal chunk
        s, A = _sim(x, y, keep, sc, C0, C1, C2, DOT)  # [BC, BC]
        out, den = _rest_out(x, S0, S1, SB, z0, z1, Z2, P8, sc, C0, C1, C2, SP, HAS_LIN, HAS_C2)
        if HAS_C2:
            X1, X2 = _pairs(x, X + tok * D, XG + h * pgx_stride, XB + h * pgx_stride, rows, rmask,
                            mean, rstd, D, H * D, NORM, 0, 128, SP, GATHER, False)  # fmt: skip
            out += (C2 * sc * sc) * _quad_out(X1, X2, wA, SA, SP)
        out += _dot_A(A, Wt, DOT, MODE)
        den += tl.sum(A * wc[None, :], 1)
        Ut, u = _rows_done(out, den, OUT, DO, U, INV, INV, ROUT, o_ptrs, tv_mask, tok, rows,
                           rmask, H, eps, NORMALIZE, MODE, False)  # fmt: skip
        if MODE != 0:
            dxp = _pair_grad(Ut, u, Wt, wc, s, keep, y, sc, C1, C2, DOT, MODE)
            dxp += _rest_grad(Ut, u, x, S1, SB, z1, Z2, P8, sc, C1, C2, SP, HAS_LIN, HAS_C2)
            if HAS_C2:
                dxp += (C2 * sc * sc) * _quad_grad(Ut, X1, X2, SA, E1, E2, wA, SP)
            dg, db = _store_dx(dxp, xh, rstd, rmask, DX, XG + h * pgx_stride, tok, rows, offs_d,
                               H, D, NORM)  # fmt: skip
            dg_acc += dg
            db_acc += db
        if HAS_C2:
            Y1t, Y2t = _pairs(y, Y + tok * D, YG + h * pgy_stride, YB + h * pgy_stride, rows,
                              rmask, mu, rs, D, H * D, NORM, 0, 128, SP, GATHER, True)  # fmt: skip
            SA += _quad_update(Y1t, Y2t, wA, Wt, SP)
        S0, S1, SB, z0, z1, Z2 = _rest_update(y, Wt, wc, S0, S1, SB, z0, z1, Z2, P8, SP, HAS_LIN,
                                              HAS_C2)  # fmt: skip
    if MODE != 0:
        tl.store(DG + (bh * NSEG + seg) * 16 + offs_d, dg_acc)
        tl.store(DB + (bh * NSEG + seg) * 16 + offs_d, db_acc)


@triton.jit
def _state_out_at(x, X, XG, XB, rows, rmask, mean, rstd, D, row_stride, NORM, Sst, Zst, base,
                  offs_v, vmask, Dv, P8, sc, C0, C1, C2, SP: tl.constexpr,
                  HAS_LIN: tl.constexpr, HAS_C2: tl.constexpr, GATHER: tl.constexpr,
                  FB: tl.constexpr):  # fmt: skip
    """``(phi(x) . S, phi(x) . z)`` of the stored state at ``base``, block A by FB rows (a
    tile program keeps no state tile live); ``X .. NORM``: where x' came from (``_pairs``)."""
    S0, S1, SB, z0, z1, Z2 = _load_rest(Sst, Zst, base, offs_v, vmask, Dv)
    out, den = _rest_out(x, S0, S1, SB, z0, z1, Z2, P8, sc, C0, C1, C2, SP, HAS_LIN, HAS_C2)
    if HAS_C2:
        for blk in range(128 // FB):
            w = _pair_weights(blk, FB)
            X1, X2 = _pairs(x, X, XG, XB, rows, rmask, mean, rstd, D, row_stride, NORM, blk, FB,
                            SP, GATHER, False)  # fmt: skip
            ptrs, m = _rows_of(Sst, base, 17 + blk * FB, FB, offs_v, vmask, Dv)
            SAb = tl.load(ptrs, mask=m, other=0.0)  # [FB, BV]
            out += (C2 * sc * sc) * _quad_out(X1, X2, w, SAb, SP)
    return out, den


@triton.jit
def _state_grad_at(Ut, u, x, X, XG, XB, rows, rmask, mean, rstd, D, row_stride, NORM, Sst, Zst,
                   base, offs_v, vmask, Dv, P8, sc, C1, C2, SP: tl.constexpr,
                   HAS_LIN: tl.constexpr, HAS_C2: tl.constexpr, GATHER: tl.constexpr,
                   FB: tl.constexpr):  # fmt: skip
    """``d/dx' [phi(x) . (S U_i + z u_i)]`` [BC, 16] of the stored state, block by block."""
    _, S1, SB, _, z1, Z2 = _load_rest(Sst, Zst, base, offs_v, vmask, Dv)
    dxp = _rest_grad(Ut, u, x, S1, SB, z1, Z2, P8, sc, C1, C2, SP, HAS_LIN, HAS_C2)
    if HAS_C2:
        for blk in range(128 // FB):
            E1, E2, w = _selectors(blk, FB)
            X1, X2 = _pairs(x, X, XG, XB, rows, rmask, mean, rstd, D, row_stride, NORM, blk, FB,
                            SP, GATHER, False)  # fmt: skip
            ptrs, m = _rows_of(Sst, base, 17 + blk * FB, FB, offs_v, vmask, Dv)
            SAb = tl.load(ptrs, mask=m, other=0.0)  # [FB, BV]
            dxp += (C2 * sc * sc) * _quad_grad(Ut, X1, X2, SAb, E1, E2, w, SP)
    return dxp


@triton.jit
def _pair_tiles(x, j, c, Y, YG, YB, W, WS, Wsc, tok, h, offs_c, offs_d, offs_v, vmask, T, H, D,
                Dv, pgy_stride, NORM, sc, C0, C1, C2, BC: tl.constexpr, HAS_WS: tl.constexpr,
                HAS_WSC: tl.constexpr, DOT: tl.constexpr, EVEN: tl.constexpr,
                DIAG: tl.constexpr, REVERSE: tl.constexpr):  # fmt: skip
    """Column chunk j against row chunk c: ``(y' [BC, 16], W [BC, BV], w [BC], s, A [BC, BC],
    keep [BC, BC])``. ``DIAG``: j = c, the causal triangle; else every pair of an earlier chunk
    (whole: no mask) or, ``REVERSE``, of a later one (only the last chunk may be partial)."""
    cols = j * BC + offs_c
    cmask = _below(cols, T, EVEN or not (DIAG or REVERSE))
    y, Wt, wc, _mu, _rs = _columns(Y, YG, YB, W, WS, Wsc, tok, h, cols, cmask, offs_d, offs_v,
                                   vmask, T, H, D, Dv, pgy_stride, NORM, HAS_WS, HAS_WSC,
                                   EVEN)  # fmt: skip
    if DIAG:
        keep = _keep(j, c, cmask, offs_c, REVERSE)
    else:
        keep = tl.broadcast_to(cmask[None, :], (BC, BC))
    s, A = _sim(x, y, keep, sc, C0, C1, C2, DOT)
    return y, Wt, wc, s, A, keep


@triton.jit
def _dq_pairs(den, dOo, acc_g, acc_r, dO, x, j, c, Y, YG, YB, W, WS, Wsc, tok, h, offs_c,
              offs_d, offs_v, vmask, T, H, D, Dv, pgy_stride, NORM, sc, C0, C1, C2,
              BC: tl.constexpr, HAS_WS: tl.constexpr, HAS_WSC: tl.constexpr, DOT: tl.constexpr,
              EVEN: tl.constexpr, DIAG: tl.constexpr):  # fmt: skip
    """``_dq_one_pass``'s sums ``(den, dO . out, acc_g, acc_r)`` with key chunk j added
    (``DIAG``: j = c, the causal triangle)."""
    y, Wt, wc, s, A, keep = _pair_tiles(x, j, c, Y, YG, YB, W, WS, Wsc, tok, h, offs_c, offs_d,
                                        offs_v, vmask, T, H, D, Dv, pgy_stride, NORM, sc, C0,
                                        C1, C2, BC, HAS_WS, HAS_WSC, DOT, EVEN, DIAG,
                                        False)  # fmt: skip
    P0 = _dot_x2(dO, tl.trans(Wt), DOT, 3)  # [BC, BC] dO . v_j: half values, exact in tf32
    d = tl.where(keep, C1 + 2.0 * C2 * s, 0.0)  # [BC, BC] sim' on the kept pairs
    acc_g += _dot_exact(P0 * d, y, DOT)
    acc_r += _dot_exact(d * wc[None, :], y, DOT)
    return den + tl.sum(A, 1), dOo + tl.sum(A * P0, 1), acc_g, acc_r


@triton.jit
def _dq_one_pass(out, den, x, c, lo, Y, YG, YB, W, WS, Wsc, DO, INV, ROUT, tok, h, rows, rmask,
                 o_ptrs, tv_mask, offs_c, offs_d, offs_v, vmask, T, H, D, Dv, pgy_stride, NORM,
                 NORMALIZE, sc, C0, C1, C2, eps, BC: tl.constexpr, HAS_WS: tl.constexpr,
                 HAS_WSC: tl.constexpr, DOT: tl.constexpr, EVEN: tl.constexpr):  # fmt: skip
    """A dq tile program's pairs in one pass over its key chunks (the diagonal last), from
    the state's ``out`` [BC, BV] and ``den`` [BC]: ``(U = g, u = r, dx' of the pairs)``, with
    r and ``1 / (den + eps)`` stored. dq is linear in (g, r), so with ``P0 = dO v^T`` (~fp32,
    as ``_pair_grad``'s P) and ``sim'`` on the kept pairs::

        den  = sum_j A_ij + den_state           dO . out = sum_j A_ij P0_ij + dO . out_state
        dx'  = sc (inv sum_j P0_ij sim'_ij y'_j + r sum_j w_j sim'_ij y'_j)

    which drops the two-pass form's ``A W`` product and its second scores."""
    dO = tl.load(DO + o_ptrs, mask=tv_mask, other=0.0).to(tl.float32)  # [BC, BV]
    dOo = tl.sum(dO * out, 1)  # [BC] dO . out of the state's part
    acc_g = x * 0.0  # [BC, 16] sum_j P0 sim' y'
    acc_r = x * 0.0  # [BC, 16] sum_j w sim' y'
    for j in range(lo, c):
        den, dOo, acc_g, acc_r = _dq_pairs(den, dOo, acc_g, acc_r, dO, x, j, c, Y, YG, YB, W,
                                           WS, Wsc, tok, h, offs_c, offs_d, offs_v, vmask, T,
                                           H, D, Dv, pgy_stride, NORM, sc, C0, C1, C2, BC,
                                           HAS_WS, HAS_WSC, DOT, EVEN, False)  # fmt: skip
    den, dOo, acc_g, acc_r = _dq_pairs(den, dOo, acc_g, acc_r, dO, x, c, c, Y, YG, YB, W, WS,
                                       Wsc, tok, h, offs_c, offs_d, offs_v, vmask, T, H, D, Dv,
                                       pgy_stride, NORM, sc, C0, C1, C2, BC, HAS_WS, HAS_WSC,
                                       DOT, EVEN, True)  # fmt: skip
    Ut, u, inv = _weights_of(dO, dOo, den, ROUT, tok, rows, rmask, H, eps, NORMALIZE)
    tl.store(INV + tok + rows * H, inv, mask=rmask)
    return Ut, u, sc * (acc_g * inv[:, None] + u[:, None] * acc_r)  # (unnormalised: 1, 0)


@triton.jit(do_not_specialize=RUNTIME)
def packed_tile_kernel(
    X, XG, XB, Y, YG, YB, W, WS, Wsc, U, DO, Sst, Zst,
    OUT, INV, ROUT, DX, DG, DB,
    T, H, D, Dv, pgx_stride, pgy_stride, NSEG, NCS, NORM, NORMALIZE, sc, C0, C1, C2, eps,
    BC: tl.constexpr, BV: tl.constexpr, MODE: tl.constexpr, HAS_WS: tl.constexpr,
    HAS_WSC: tl.constexpr, HAS_LIN: tl.constexpr, HAS_C2: tl.constexpr, DOT: tl.constexpr,
    SP: tl.constexpr, HAS_INIT: tl.constexpr, GATHER: tl.constexpr, STATE: tl.constexpr,
    FB: tl.constexpr, EVEN: tl.constexpr = False, ONEPASS: tl.constexpr = False,
):  # fmt: skip
    """Grid ``(cdiv(T, BC), B*H)``: the ``tiles`` variant, one chunk per program, no walk.

    Chunk c of segment ``c // NCS`` takes the segment's stored prefix (suffix in MODE 2)
    state and adds the segment's other chunks quadratically, ``A_ij = sim(sc x'_i . y'_j)``
    from the raw 16-dim q', k': every program is independent, as in flash attention. MODE 0
    (forward) and 1 (dq) take the key chunks up to the diagonal: out and den (first pass),
    then in MODE 1 ``U = g``, ``u = r`` and dq from the same chunks (second pass). MODE 2
    (x = k, y = q, ``W = dO * INV``, ``w = r``, U = v) takes the query chunks from the
    diagonal on; ``out`` is dv. ``DG``/``DB`` get per-chunk sums. Without ``HAS_INIT`` (no
    caller's state) the first segment's prefix (the last one's suffix) is zero and its
    programs skip the state's part: a sequence of one segment is the quadratic form alone.
    Without ``STATE`` (one segment, no caller's state: no program reads a state) the state's
    code is not compiled at all, which frees its registers for the pairs. ``ONEPASS`` (MODE
    1 only; the host sets it so): one pass over the key chunks (``_dq_one_pass``) instead of
    two."""
    c, bh = tl.program_id(0), tl.program_id(1)
    h = bh % H
    tok = (bh // H) * T * H + h
    offs_c, offs_d, offs_v = tl.arange(0, BC), tl.arange(0, 16), tl.arange(0, BV)
    vmask = _below(offs_v, Dv, EVEN)
    NCH = tl.cdiv(T, BC)
    seg = c // NCS
    P8 = _p8()
    base = bh * NSEG + seg
    rows = c * BC + offs_c
    rmask = _below(rows, T, EVEN)
    tv_mask = rmask[:, None] & vmask[None, :]  # [BC, BV]
    o_ptrs = (tok + rows[:, None] * H) * Dv + offs_v[None, :]  # [BC, BV]
    xsrc, xg, xb = X + tok * D, XG + h * pgx_stride, XB + h * pgx_stride
    x, xh, rstd, mean = _pre_stats(xsrc, xg, xb, rows, rmask, offs_d, D, H * D, NORM,
                                   EVEN)  # [BC, 16]  # fmt: skip
    if MODE == 2:
        has_state = seg < NSEG - 1
    else:
        has_state = seg > 0
    if HAS_INIT:
        has_state = seg >= 0
    out = tl.zeros([BC, BV], tl.float32)
    den = tl.zeros([BC], tl.float32)
    if STATE and has_state:
        out, den = _state_out_at(x, xsrc, xg, xb, rows, rmask, mean, rstd, D, H * D, NORM, Sst,
                                 Zst, base, offs_v, vmask, Dv, P8, sc, C0, C1, C2, SP, HAS_LIN,
                                 HAS_C2, GATHER, FB)  # fmt: skip
    if MODE == 2:
        lo, hi = c, tl.minimum(seg * NCS + NCS, NCH)  # query chunks from the diagonal on
    else:
        lo, hi = seg * NCS, c + 1  # key chunks of the segment up to the diagonal
    if ONEPASS:  # dq linear in (g, r): one pass, then combined
        Ut, u, dxp = _dq_one_pass(out, den, x, c, lo, Y, YG, YB, W, WS, Wsc, DO, INV, ROUT, tok,
                                  h, rows, rmask, o_ptrs, tv_mask, offs_c, offs_d, offs_v,
                                  vmask, T, H, D, Dv, pgy_stride, NORM, NORMALIZE, sc, C0, C1,
                                  C2, eps, BC, HAS_WS, HAS_WSC, DOT, EVEN)  # fmt: skip
    elif MODE != 2:  # first pass: out and den of the whole row, the diagonal chunk last
        for j in range(lo, c):
            y, Wt, wc, s, A, keep = _pair_tiles(x, j, c, Y, YG, YB, W, WS, Wsc, tok, h, offs_c,
                                                offs_d, offs_v, vmask, T, H, D, Dv, pgy_stride,
                                                NORM, sc, C0, C1, C2, BC, HAS_WS, HAS_WSC, DOT,
                                                EVEN, False, False)  # fmt: skip
            out += _dot_A(A, Wt, DOT, MODE)
            den += tl.sum(A, 1)
        y, Wt, wc, s, A, keep = _pair_tiles(x, c, c, Y, YG, YB, W, WS, Wsc, tok, h, offs_c,
                                            offs_d, offs_v, vmask, T, H, D, Dv, pgy_stride, NORM,
                                            sc, C0, C1, C2, BC, HAS_WS, HAS_WSC, DOT, EVEN, True,
                                            False)  # fmt: skip
        out += _dot_A(A, Wt, DOT, MODE)
        den += tl.sum(A, 1)
    if MODE == 2:  # out accumulates dv over the pair loop below
        Ut = tl.load(U + o_ptrs, mask=tv_mask, other=0.0).to(tl.float32)  # [BC, BV]
        u = rmask.to(tl.float32)
    elif not ONEPASS:  # (one pass: g, r and the pairs' part of dx' are in)
        Ut, u = _rows_done(out, den, OUT, DO, U, INV, INV, ROUT, o_ptrs, tv_mask, tok, rows,
                           rmask, H, eps, NORMALIZE, MODE, False)  # fmt: skip
    if MODE != 0:
        if not ONEPASS:  # (one pass: dxp has the pairs' part already)
            dxp = x * 0.0
            if MODE == 2:  # the pairs' part of dx' (and dv in MODE 2), the diagonal chunk last
                first, last = c + 1, hi
            else:
                first, last = lo, c
            for j in range(first, last):
                y, Wt, wc, s, A, keep = _pair_tiles(x, j, c, Y, YG, YB, W, WS, Wsc, tok, h,
                                                    offs_c, offs_d, offs_v, vmask, T, H, D, Dv,
                                                    pgy_stride, NORM, sc, C0, C1, C2, BC, HAS_WS,
                                                    HAS_WSC, DOT, EVEN, False,
                                                    MODE == 2)  # fmt: skip
                if MODE == 2:
                    out += _dot(A, Wt, DOT)
                dxp += _pair_grad(Ut, u, Wt, wc, s, keep, y, sc, C1, C2, DOT, MODE)
            y, Wt, wc, s, A, keep = _pair_tiles(x, c, c, Y, YG, YB, W, WS, Wsc, tok, h, offs_c,
                                                offs_d, offs_v, vmask, T, H, D, Dv, pgy_stride,
                                                NORM, sc, C0, C1, C2, BC, HAS_WS, HAS_WSC, DOT,
                                                EVEN, True, MODE == 2)  # fmt: skip
            if MODE == 2:
                out += _dot(A, Wt, DOT)
            dxp += _pair_grad(Ut, u, Wt, wc, s, keep, y, sc, C1, C2, DOT, MODE)
            if MODE == 2:
                tl.store(OUT + o_ptrs, out.to(OUT.dtype.element_ty), mask=tv_mask)
        if STATE and has_state:
            dxp += _state_grad_at(Ut, u, x, xsrc, xg, xb, rows, rmask, mean, rstd, D, H * D, NORM,
                                  Sst, Zst, base, offs_v, vmask, Dv, P8, sc, C1, C2, SP, HAS_LIN,
                                  HAS_C2, GATHER, FB)  # [BC, 16]  # fmt: skip
        dg, db = _store_dx(dxp, xh, rstd, rmask, DX, XG + h * pgx_stride, tok, rows, offs_d, H,
                           D, NORM, EVEN)  # fmt: skip
        tl.store(DG + (bh * NCH + c) * 16 + offs_d, dg)
        tl.store(DB + (bh * NCH + c) * 16 + offs_d, db)
