"""Triton kernels of the chunked algorithm for kernels of degree <= 2 (see ``__init__``).

Legend (``spec`` names; per (batch, head) program)
--------------------------------------------------
``BC``  chunk length; ``NCS`` chunks per segment (one program walks one segment).
``BD``  feature dim D padded to 16; padded dims of x' are exactly zero.
``BV``  value block (>= 16); ``RF = 1 + BD + BD * BD`` rows of the *full* state.
``x``   the row side (queries in the forward), ``y`` the column side (keys).
``W, w`` per-column values ``[BC, BV]`` and scalars ``[BC]``: (v, 1) in the forward.
``U, u`` per-row values and scalars of the gradient sweeps (see ``sweep_kernel``).

The state is kept *unweighted* in the full layout: ``S_0 = sum W``, ``S_1 = sum y W^T``,
``S_2 = sum (y (x) y) W^T`` (and ``z_p`` with ``w`` for ``W``), so that
``phi(x) . S = C0 S_0 + C1 sc x.S_1 + C2 sc^2 (x (x) x).S_2`` with ``sim(s) = sum_p C_p s^p``
and ``s = sc * x'.y'``. The host converts it to and from the canonical packed layout.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .launch import INTERPRET as _INTERPRET

LN_EPS = tl.constexpr(1e-5)  # spec.LAYER_NORM_EPS
INTERPRET = tl.constexpr(_INTERPRET)  # no bfloat16 there: ``_bf16_part`` emulates it


@triton.jit
def _below(i, n, EVEN: tl.constexpr):
    """``i < n``, or a constant true when ``EVEN``: the host has checked that every index is
    in range (T a multiple of the chunks, D = 16, Dv = BV), so the compiler drops the masks,
    their selects and the predicated loads (ncu, session 12: the tile kernel is
    instruction-bound, its compares and selects the largest share)."""
    if EVEN:
        return tl.full(i.shape, 1, tl.int1)
    else:
        return i < n


@triton.jit
def _pre_stats(ptr, g_ptr, b_ptr, rows, rmask, offs_d, D, row_stride, NORM,
               EVEN: tl.constexpr = False):  # fmt: skip
    """``x' = gamma * LN(x) + beta`` of one tile: ``(x' [BC, BD], xhat [BC, BD], rstd [BC],
    mean [BC])`` (rstd 1 and mean 0 without LayerNorm); ``EVEN``: D = 16 (``_below``)."""
    dmask = _below(offs_d, D, EVEN)
    m = rmask[:, None] & dmask[None, :]
    x = tl.load(ptr + rows[:, None] * row_stride + offs_d[None, :], mask=m, other=0.0)
    x = x.to(tl.float32)  # [BC, BD]
    rstd = tl.sum(x, 1) * 0.0 + 1.0  # [BC]
    mean = rstd * 0.0
    xh = x
    if NORM:
        mean = tl.sum(x, 1) / D
        xc = tl.where(m, x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, 1) / D + LN_EPS)
        xh = xc * rstd[:, None]
    gamma = tl.load(g_ptr + offs_d, mask=dmask, other=0.0).to(tl.float32)  # [BD]
    beta = tl.load(b_ptr + offs_d, mask=dmask, other=0.0).to(tl.float32)  # [BD]
    return tl.where(m, xh * gamma[None, :] + beta[None, :], 0.0), xh, rstd, mean


@triton.jit
def _pre(ptr, g_ptr, b_ptr, rows, rmask, offs_d, D, row_stride, NORM):
    """``x' = gamma * LN(x) + beta`` of one tile: ``(x' [BC, BD], xhat [BC, BD], rstd [BC])``."""
    xp, xh, rstd, _ = _pre_stats(ptr, g_ptr, b_ptr, rows, rmask, offs_d, D, row_stride, NORM)
    return xp, xh, rstd


@triton.jit
def _pre_backward(dxp, xh, rstd, g_ptr, offs_d, D, NORM, EVEN: tl.constexpr = False):
    """d x from d x' (rows of padding carry dxp = 0); also ``(d gamma, d beta)`` sums [BD]."""
    dmask = _below(offs_d, D, EVEN)
    dxh = dxp * tl.load(g_ptr + offs_d, mask=dmask, other=0.0).to(tl.float32)[None, :]
    dg = tl.sum(dxp * xh, 0)  # [BD]
    db = tl.sum(dxp, 0)  # [BD]
    dx = dxh
    if NORM:
        a = tl.sum(dxh, 1) / D  # [BC]
        b = tl.sum(dxh * xh, 1) / D  # [BC]
        dx = rstd[:, None] * (dxh - a[:, None] - xh * b[:, None])
        dx = tl.where(dmask[None, :], dx, 0.0)
    return dx, dg, db


@triton.jit
def _columns(Y, yg, yb, W, Wsc, j, tok, offs_c, offs_d, offs_v, vmask, T, H, D, Dv, NORM,
             BC: tl.constexpr, HAS_WSC: tl.constexpr):  # fmt: skip
    """Column chunk j of a (b, h): ``(y' [BC, BD], W [BC, BV] fp32, w [BC], valid [BC])``
    (``w`` 1 on valid columns without ``Wsc``); ``yg``, ``yb``: this head's gamma, beta."""
    cols = j * BC + offs_c  # [BC]
    cmask = cols < T
    y, _, _ = _pre(Y + tok * D, yg, yb, cols, cmask, offs_d, D, H * D, NORM)
    Wt = tl.load(W + (tok + cols[:, None] * H) * Dv + offs_v[None, :],
                 mask=cmask[:, None] & vmask[None, :], other=0.0).to(tl.float32)  # fmt: skip
    if HAS_WSC:
        wc = tl.load(Wsc + tok + cols * H, mask=cmask, other=0.0)  # [BC]
    else:
        wc = cmask.to(tl.float32)
    return y, Wt, wc, cmask


@triton.jit
def _outer(x, BC: tl.constexpr, BD: tl.constexpr):
    """``x (x) x`` row by row: ``[BC, BD] -> [BC, BD * BD]`` (index ``a * BD + b``)."""
    return tl.reshape(x[:, :, None] * x[:, None, :], (BC, BD * BD))


@triton.jit
def _pick(a0, BA: tl.constexpr, BD: tl.constexpr):
    """``[BA, BD]`` one-hot rows selecting columns ``a0 .. a0 + BA``."""
    return (tl.arange(0, BD)[None, :] == (a0 + tl.arange(0, BA))[:, None]).to(tl.float32)


@triton.jit
def _outer_block(x, a0, BC: tl.constexpr, BA: tl.constexpr, BD: tl.constexpr):
    """Rows ``a0 * BD .. (a0 + BA) * BD`` of ``x (x) x``: ``[BC, BA * BD]``."""
    xa = tl.sum(x[:, None, :] * _pick(a0, BA, BD)[None, :, :], 2)  # [BC, BA]
    return tl.reshape(xa[:, :, None] * x[:, None, :], (BC, BA * BD))


@triton.jit
def _block_ptrs(Sst, base, a0, offs_v, Dv, BA: tl.constexpr, BD: tl.constexpr):
    """``[BA * BD, BV]`` pointers to the S_2 rows of block ``a0`` of a full state."""
    rows = base + 1 + BD + a0 * BD + tl.arange(0, BA * BD)
    return Sst + rows[:, None] * Dv + offs_v[None, :]


@triton.jit
def _cast(x, DOT: tl.constexpr):
    """A dot operand in the precision ``DOT``: "bf16", "fp16", else fp32.

    ``DOT`` names a sweep's precision: "ieee" for fp32 inputs, "bf16" / "fp16" for the
    forward of half inputs, one of ``launch.SWEEP_DOT``'s for their gradient sweeps, which
    differ in the products that need ~fp32 (``_dot_exact``): CUDA-core fp32 FMAs ("tf32"),
    three tf32 passes on the tensor cores ("x3"), two where one operand is exact ("x2"), or
    three bf16 passes of split operands ("b3")."""
    if DOT == "bf16":
        return x.to(tl.bfloat16)
    elif DOT == "fp16":
        return x.to(tl.float16)
    else:
        return x.to(tl.float32)


@triton.jit
def _dot(a, b, DOT: tl.constexpr):
    """``a @ b`` with fp32 accumulation and operands in the precision ``DOT``."""
    if DOT == "ieee":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif DOT == "bf16" or DOT == "fp16":
        return tl.dot(_cast(a, DOT), _cast(b, DOT))
    else:  # a gradient sweep: tf32 whatever its ~fp32 products (``_dot_exact``) are, or
        return _dot_tf32(a, b, DOT)  # "tf32x3" (~fp32: a state carried in a gradient sweep)


@triton.jit
def _dot_scores(a, b, DOT: tl.constexpr):
    """``s = q' k'^T``: tf32 in the forward for half inputs, exact fp32 in the backward
    (DOT "tf32"), where dq ~ s (x) k' carries s's cancellation: tf32 scores measured dq
    errors of 1.6e-2 on an H100 (bf16, x2, T = 1)."""
    if DOT == "bf16" or DOT == "fp16":
        return _dot_tf32_of(a, b, None, INTERPRET)
    else:
        return _dot_exact(a, b, DOT)


@triton.jit
def _dot_exact(a, b, DOT: tl.constexpr):
    """``a @ b`` of fp32 tiles to ~fp32 accuracy: fp32 FMAs, or ``_dot_x3``'s three
    tensor-core passes in an "x3", "x2" or "b3" sweep."""
    if DOT == "x3" or DOT == "x2" or DOT == "b3":
        return _dot_x3(a, b, DOT)
    else:
        return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _dot_x3(a, b, DOT: tl.constexpr):
    """``a @ b`` to ~fp32 accuracy: exact for fp32 inputs, three bf16 passes (``_dot_b3``)
    in a "b3" sweep, three tf32 passes otherwise."""
    if DOT == "ieee":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif DOT == "b3":
        return _dot_b3(a, b, INTERPRET)
    else:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="tf32x3")


@triton.jit
def _tf32_trunc(x):
    """x with the low 13 bits of its mantissa cleared: tf32's leading bits."""
    return (x.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(tl.float32, bitcast=True)


@triton.jit
def _tf32_split(x):
    """``(hi, lo)`` with ``hi + lo = x`` exactly: ``hi`` keeps tf32's leading bits
    (``_tf32_trunc``), ``lo`` the rest (itself rounded to tf32 by a product: ~2^-22 of x)."""
    hi = _tf32_trunc(x)
    return hi, x - hi


@triton.jit
def _dot_tf32_of(a, b, acc, EMULATE: tl.constexpr):
    """``acc + a @ b`` (``a @ b`` for acc None) with tf32 operands; ``EMULATE`` (the
    interpreter, whose tf32 product is exact fp32) truncates them to tf32 first, as the
    tensor cores read them."""
    if EMULATE:
        a = _tf32_trunc(a)
        b = _tf32_trunc(b)
    return tl.dot(a, b, acc, input_precision="tf32")


@triton.jit
def _dot_x2(a, b, DOT: tl.constexpr, EXACT: tl.constexpr):
    """``_dot_x3`` where operand ``EXACT`` (1: a, 2: b; 3: both; 0: neither) is a half
    input's value, exact in tf32 (10 mantissa bits hold bf16's 7 and fp16's 10): in an "x2"
    sweep only the other operand is split and two tf32 products suffice, the third of tf32x3
    being zero (``exact`` "x2"); the exact operand needs no second copy in registers. Both
    exact (half inputs' ``dO v^T``): one tf32 product is exact in any sweep of half inputs."""
    a = a.to(tl.float32)
    b = b.to(tl.float32)
    if EXACT == 3 and DOT != "ieee":
        return _dot_tf32_of(a, b, None, INTERPRET)
    elif DOT == "x2" and EXACT == 1:
        hi, lo = _tf32_split(b)
        acc = _dot_tf32_of(a, lo, None, INTERPRET)
        return _dot_tf32_of(a, hi, acc, INTERPRET)
    elif DOT == "x2" and EXACT == 2:
        hi, lo = _tf32_split(a)
        acc = _dot_tf32_of(lo, b, None, INTERPRET)
        return _dot_tf32_of(hi, b, acc, INTERPRET)
    else:
        return _dot_x3(a, b, DOT)


@triton.jit
def _bf16_part(x, EMULATE: tl.constexpr):
    """``x`` rounded to the nearest bfloat16 (ties to even), as an fp32 tile (``EMULATE``:
    by its bits, for the interpreter, which has no bfloat16) and as the bf16 dot operand
    (fp32 under ``EMULATE``): ``(value, operand)``."""
    if EMULATE:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        hi = bits.to(tl.float32, bitcast=True)
        return hi, hi
    else:
        hi = x.to(tl.bfloat16)
        return hi.to(tl.float32), hi


@triton.jit
def _dot_b3(a, b, EMULATE: tl.constexpr):
    """``a @ b`` to ~2^-16 relative: each operand split into bfloat16 ``hi + lo`` and three
    bf16 tensor-core products (``lo lo`` dropped), the small ones first. Half the operand
    registers and twice the tensor-core rate of tf32x3 (``exact`` "bf16x3")."""
    a = a.to(tl.float32)
    b = b.to(tl.float32)
    ah_v, ah = _bf16_part(a, EMULATE)
    bh_v, bh = _bf16_part(b, EMULATE)
    _, al = _bf16_part(a - ah_v, EMULATE)
    _, bl = _bf16_part(b - bh_v, EMULATE)
    acc = tl.dot(al, bh, input_precision="ieee" if EMULATE else None)
    acc = tl.dot(ah, bl, acc, input_precision="ieee" if EMULATE else None)
    return tl.dot(ah, bh, acc, input_precision="ieee" if EMULATE else None)


@triton.jit
def _dot_state(a, b, DOT: tl.constexpr, X3: tl.constexpr):
    """Products with the state: tf32 (``_dot_tf32``), or ~fp32 (``_dot_x3``) with ``X3``: a
    gradient sweep whose state carries the caller's cotangent of the final state (or an
    initial state) sums random-sign terms that cancel; tf32 there measured dv errors of
    1.5e-2 (fp16, T=1, H100). ``X3`` is off without a carried state: it doubles the sweeps'
    register spills (ptxas, sm_90a) and measured 4x slower gradient sweeps."""
    if X3:
        return _dot_x3(a, b, DOT)
    else:
        return _dot_tf32(a, b, DOT)


@triton.jit
def _dot_tf32(a, b, DOT: tl.constexpr):
    """Never below tf32: ``q' k'^T`` (s is squared) and ``phi(q) . S`` (a long state's
    entries outgrow a chunk's, so half operands there lose the chunk; measured 1.9e-2
    on an H100 when a bf16 run continued from a carried state)."""
    if DOT == "ieee":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif DOT == "tf32x3":  # ~fp32: a gradient sweep's products with a carried state
        return _dot_x3(a, b, "x3")
    else:
        return _dot_tf32_of(a.to(tl.float32), b.to(tl.float32), None, INTERPRET)


@triton.jit
def _load_state(Sst, Zst, base, offs_d, offs_f, offs_v, vmask, Dv, BD: tl.constexpr,
                MEM: tl.constexpr):  # fmt: skip
    """Rows ``[0 | 1..BD | 1+BD..]`` of one full state at row ``base`` (S_2 stays in memory
    when ``MEM``: a [16, BV] placeholder is returned for it)."""
    S0 = tl.load(Sst + base * Dv + offs_v, mask=vmask, other=0.0)  # [BV]
    S1 = tl.load(Sst + (base + 1 + offs_d[:, None]) * Dv + offs_v[None, :],
                 mask=vmask[None, :], other=0.0)  # [BD, BV]  # fmt: skip
    if MEM:
        S2 = tl.zeros([16, offs_v.shape[0]], tl.float32)
    else:
        S2 = tl.load(Sst + (base + 1 + BD + offs_f[:, None]) * Dv + offs_v[None, :],
                     mask=vmask[None, :], other=0.0)  # [BD*BD, BV]  # fmt: skip
    z0 = tl.load(Zst + base)  # []
    z1 = tl.load(Zst + base + 1 + offs_d)  # [BD]
    z2 = tl.load(Zst + base + 1 + BD + offs_d[:, None] * BD + offs_d[None, :])  # [BD, BD]
    return S0, S1, S2, z0, z1, z2


@triton.jit
def _update(S0, S1, S2, z0, z1, z2, y, Wt, wc, Sst, base, offs_v, vmask, Dv,
            DOT: tl.constexpr, BC: tl.constexpr, BD: tl.constexpr, BA: tl.constexpr,
            HAS_C2: tl.constexpr):  # fmt: skip
    """Add one chunk of columns: ``S_p += phi_p(y)^T W``, ``z_p += phi_p(y)^T w``.

    ``z_2`` is kept as the ``[BD, BD]`` matrix ``sum_j w_j y_j y_j^T``. When ``BA < BD``
    (D > 16) S_2 lives in the program's own rows of ``Sst`` at ``base``, updated block by
    block of ``BA`` rows of a, with barriers around (the next chunk re-reads it)."""
    S0 += tl.sum(Wt, 0)
    z0 += tl.sum(wc, 0)
    S1 += _dot(tl.trans(y), Wt, DOT)
    z1 += tl.sum(y * wc[:, None], 0)
    if HAS_C2:
        z2 += tl.dot(tl.trans(y * wc[:, None]), y, input_precision="ieee")  # [BD, BD]
        if BA == BD:
            y2 = _outer(_cast(y, DOT), BC, BD)  # [BC, BD*BD]
            S2 += _dot(tl.trans(y2), Wt, DOT)
        else:
            tl.debug_barrier()
            for a0 in range(0, BD, BA):
                ptrs = _block_ptrs(Sst, base, a0, offs_v, Dv, BA, BD)  # [BA*BD, BV]
                y2 = _outer_block(y, a0, BC, BA, BD)
                blk = tl.load(ptrs, mask=vmask[None, :], other=0.0)
                tl.store(ptrs, blk + _dot(tl.trans(y2), Wt, DOT), mask=vmask[None, :])
            tl.debug_barrier()
    return S0, S1, S2, z0, z1, z2


@triton.jit
def _phi_state(x, S0, S1, S2, z0, z1, z2, Sst, base, offs_v, vmask, Dv, sc, C0, C1, C2,
               DOT: tl.constexpr, X3: tl.constexpr, BC: tl.constexpr, BD: tl.constexpr,
               BA: tl.constexpr, HAS_C2: tl.constexpr):  # fmt: skip
    """The state's part of a chunk: ``(phi(x) . S [BC, BV], phi(x) . z [BC], x z_2 [BC, BD])``
    with ``phi(x) . S = C0 S_0 + C1 sc x.S_1 + C2 sc^2 (x (x) x).S_2`` (S_2 streamed from
    ``Sst`` in blocks of BA rows of a when ``BA < BD``)."""
    x1 = (C1 * sc) * x  # [BC, BD]
    out = C0 * S0[None, :] + _dot_state(x1, S1, DOT, X3)  # [BC, BV]
    den = C0 * z0 + tl.sum(x1 * z1[None, :], 1)  # [BC]
    xz = x * 0.0
    if HAS_C2:
        xz = tl.dot(x, z2, input_precision="ieee")  # [BC, BD]
        if BA == BD:
            out += (C2 * sc * sc) * _dot_state(_outer(x, BC, BD), S2, DOT, X3)
        else:
            for a0 in range(0, BD, BA):
                blk = tl.load(_block_ptrs(Sst, base, a0, offs_v, Dv, BA, BD),
                              mask=vmask[None, :], other=0.0)  # [BA*BD, BV]  # fmt: skip
                xb = _outer_block(x, a0, BC, BA, BD)  # [BC, BA*BD]
                out += (C2 * sc * sc) * _dot_state(xb, blk, DOT, X3)
        den += (C2 * sc * sc) * tl.sum(x * xz, 1)
    return out, den, xz


@triton.jit
def _phi_state_grad(Ut, u, x, xz, S1, S2, z1, Sst, base, offs_d, offs_v, vmask, Dv, sc, C1,
                    C2, DOT: tl.constexpr, X3: tl.constexpr, BC: tl.constexpr,
                    BD: tl.constexpr, BA: tl.constexpr, HAS_C2: tl.constexpr):  # fmt: skip
    """The state's part of ``dx'`` [BC, BD]: ``d phi(x_i)/dx' . (S U_i + z u_i)`` (S_2 and
    z_2 are symmetric)."""
    dphi1 = _dot_state(Ut, tl.trans(S1), DOT, X3) + u[:, None] * z1[None, :]  # [BC, BD]
    dxp = (C1 * sc) * dphi1
    if HAS_C2:
        if BA == BD:
            dphi2 = tl.reshape(_dot_state(Ut, tl.trans(S2), DOT, X3), (BC, BD, BD))
            dx2 = tl.sum(dphi2 * x[:, None, :], 2)  # [BC, BD]
        else:
            dx2 = xz * 0.0
            # dx2[c, a] += sum_b (U S_2[a, b])[c] x[c, b] over this block's rows a,
            # with 0/1 matrices (exact fp32 products) instead of a 3-D reshape
            j = tl.arange(0, BA * BD)  # block row a0 + j // BD, column j % BD
            rep = (offs_d[:, None] == (j % BD)[None, :]).to(tl.float32)  # [BD, BA*BD]
            xrep = tl.dot(x, rep, input_precision="ieee")  # [BC, BA*BD]: x[c, j % BD]
            for a0 in range(0, BD, BA):
                blk = tl.load(_block_ptrs(Sst, base, a0, offs_v, Dv, BA, BD),
                              mask=vmask[None, :], other=0.0)  # [BA*BD, BV]  # fmt: skip
                sel = ((a0 + j // BD)[:, None] == offs_d[None, :]).to(tl.float32)
                dphi2 = _dot_state(Ut, tl.trans(blk), DOT, X3)  # [BC, BA*BD]
                dx2 += tl.dot(dphi2 * xrep, sel, input_precision="ieee")  # [BC, BD]
        dxp += (2.0 * C2 * sc * sc) * (dx2 + u[:, None] * xz)
    return dxp


@triton.jit
def _pair_grad(Ut, u, Wt, wc, s, keep, y, sc, C1, C2, DOT: tl.constexpr,
               MODE: tl.constexpr = 0):  # fmt: skip
    """The chunk pairs' part of ``dx'`` [BC, BD]: ``sc sum_j P_ij sim'(s_ij) y'_j`` with
    ``P_ij = U_i . W_j + u_i w_j`` over the kept pairs.

    P in ~fp32 (3 tf32 passes): ``P = (dO . v_j - dO . o_i) / den`` cancels when v_j ~ o_i
    (T = 1 normalised: entirely); tf32 P measured dq errors of 4.3e-2 (fp16, H100). G y' in
    exact fp32: LayerNorm's backward projects dx' onto the complement of (1, xhat), which can
    keep 1/100 of its norm; tf32 y' measured dq errors of 4e-2 (bf16, T=1)."""
    # the value side is exact in tf32 (``_dot_x2``): W = v in the dq sweep, U = v in dk/dv's
    P = _dot_x2(Ut, tl.trans(Wt), DOT, 2 if MODE == 1 else (1 if MODE == 2 else 0))
    P += u[:, None] * wc[None, :]  # [BC, BC]
    G = tl.where(keep, P * (C1 + 2.0 * C2 * s), 0.0)  # d out / d s
    return sc * _dot_exact(G, y, DOT)


@triton.jit
def _store_dx(dxp, xh, rstd, rmask, DX, XG, tok, rows, offs_d, H, D, NORM,
              EVEN: tl.constexpr = False):  # fmt: skip
    """d x from the chunk's ``dx'`` through the pre-transform, stored; ``(d gamma, d beta)``
    sums of the chunk [BD] are returned."""
    dxp = tl.where(rmask[:, None], dxp, 0.0)
    dx, dg, db = _pre_backward(dxp, xh, rstd, XG, offs_d, D, NORM, EVEN)
    dmask = rmask[:, None] & _below(offs_d, D, EVEN)[None, :]
    tl.store(DX + (tok + rows[:, None] * H) * D + offs_d[None, :], dx.to(DX.dtype.element_ty),
             mask=dmask)  # fmt: skip
    return dg, db


@triton.jit
def _weights(out, den, DO, o_ptrs, tv_mask, ROUT, tok, rows, rmask, H, eps, NORMALIZE):
    """The dq sweep's per-row weights ``(U = g = dO / (den + eps), u = r, inv)`` with
    ``r = -(dO . out) / (den + eps)^2`` stored (``dO``, 0 and 1 without normalising)."""
    dO = tl.load(DO + o_ptrs, mask=tv_mask, other=0.0).to(tl.float32)  # [BC, BV]
    return _weights_of(dO, tl.sum(dO * out, 1), den, ROUT, tok, rows, rmask, H, eps, NORMALIZE)


@triton.jit
def _weights_of(dO, dOo, den, ROUT, tok, rows, rmask, H, eps, NORMALIZE):
    """``_weights`` from ``dO`` [BC, BV] and ``dO . out`` [BC]."""
    inv = 1.0 / (den + eps)
    if NORMALIZE:
        Ut = dO * inv[:, None]
        u = -dOo * inv * inv
    else:
        Ut = dO
        u = inv * 0.0
        inv = u + 1.0
    tl.store(ROUT + tok + rows * H, u, mask=rmask)
    return Ut, u, inv


@triton.jit
def _gradient_weights(out, den, DO, o_ptrs, tv_mask, GOUT, ROUT, tok, rows, rmask, H, eps,
                      NORMALIZE):  # fmt: skip
    """``_weights``, with g stored for the dk/dv sweep: ``(U, u)``."""
    Ut, u, _ = _weights(out, den, DO, o_ptrs, tv_mask, ROUT, tok, rows, rmask, H, eps, NORMALIZE)
    tl.store(GOUT + o_ptrs, Ut, mask=tv_mask)
    return Ut, u


@triton.jit
def _gradient_scale(out, den, DO, o_ptrs, tv_mask, INV, ROUT, tok, rows, rmask, H, eps,
                    NORMALIZE):  # fmt: skip
    """``_weights``, with ``1 / (den + eps)`` stored per row (the dk/dv sweep forms g from dO
    again: a number per token instead of a [Dv] row in fp32): ``(U, u)``."""
    Ut, u, inv = _weights(out, den, DO, o_ptrs, tv_mask, ROUT, tok, rows, rmask, H, eps,
                          NORMALIZE)  # fmt: skip
    tl.store(INV + tok + rows * H, inv, mask=rmask)
    return Ut, u


@triton.jit
def _rows_done(out, den, OUT, DO, U, GOUT, INV, ROUT, o_ptrs, tv_mask, tok, rows, rmask, H,
               eps, NORMALIZE, MODE: tl.constexpr, KEEP_G: tl.constexpr):  # fmt: skip
    """A chunk's rows once ``out`` and ``den`` are summed: MODE 0 stores
    ``o = out / (den + eps)`` (``out`` without normalising); MODE 1 returns ``(U = g, u = r)``
    and stores r with g (``KEEP_G``) or ``1 / (den + eps)``; MODE 2 stores ``out`` (dv) and
    returns ``(U = v, u = 1)``."""
    Ut, u = out, den
    if MODE == 0:
        if NORMALIZE:
            out = out / (den + eps)[:, None]
        tl.store(OUT + o_ptrs, out.to(OUT.dtype.element_ty), mask=tv_mask)
    elif MODE == 1:
        if KEEP_G:
            Ut, u = _gradient_weights(out, den, DO, o_ptrs, tv_mask, GOUT, ROUT, tok, rows,
                                      rmask, H, eps, NORMALIZE)  # fmt: skip
        else:
            Ut, u = _gradient_scale(out, den, DO, o_ptrs, tv_mask, INV, ROUT, tok, rows, rmask,
                                    H, eps, NORMALIZE)  # fmt: skip
    else:
        tl.store(OUT + o_ptrs, out.to(OUT.dtype.element_ty), mask=tv_mask)
        Ut = tl.load(U + o_ptrs, mask=tv_mask, other=0.0).to(tl.float32)
        u = rmask.to(tl.float32)
    return Ut, u


@triton.jit
def _walk_rows(seg, i, NCS, BC: tl.constexpr, offs_c, T, vmask, REVERSE: tl.constexpr):
    """Step i of a segment's walk (backwards when ``REVERSE``): ``(chunk c, rows [BC],
    row mask [BC], row x value mask [BC, BV])``."""
    if REVERSE:
        c = seg * NCS + NCS - 1 - i
    else:
        c = seg * NCS + i
    rows = c * BC + offs_c
    rmask = rows < T
    return c, rows, rmask, rmask[:, None] & vmask[None, :]


@triton.jit
def _sim(x, y, keep, sc, C0, C1, C2, DOT: tl.constexpr):
    """``(s, A)`` of a chunk pair: ``s = sc x' y'^T`` and ``A = sim(s)`` on the kept pairs,
    by Horner in ``t = x' y'^T`` with sc folded into the coefficients (two FMAs a pair; s is
    formed only where a gradient reads it)."""
    t = _dot_scores(x, tl.trans(y), DOT)  # [BC, BC]
    A = C0 + t * ((C1 * sc) + (C2 * sc * sc) * t)
    return sc * t, tl.where(keep, A, 0.0)


@triton.jit
def _keep(j, c, cmask, offs_c, REVERSE: tl.constexpr):
    """The causal pairs of row chunk c and column chunk j: all of an earlier (later when
    ``REVERSE``) chunk, the lower (upper) triangle of the diagonal one; valid columns only."""
    if REVERSE:
        inside = (j > c) | (offs_c[None, :] >= offs_c[:, None])
    else:
        inside = (j < c) | (offs_c[None, :] <= offs_c[:, None])
    return cmask[None, :] & inside  # [BC, BC]


@triton.jit
def _dot_A(A, Wt, DOT: tl.constexpr, MODE: tl.constexpr):
    """``A W``: to ~fp32 in the dq sweep, where r = -(dO . out) / den^2 meets U . W in P
    (``_pair_grad``), else in the sweep's precision."""
    if MODE == 1:
        return _dot_x2(A, Wt, DOT, 2)  # W = v: exact in tf32
    else:
        return _dot(A, Wt, DOT)


@triton.jit
def _program(T, H, Dv, BC: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr):
    """A ``(segment, batch*head, value block)`` program's indices: ``(seg, bh, h, tok,
    offs_c [BC], offs_d [BD], offs_f [BD*BD], offs_v [BV], vmask [BV])``; ``tok`` is token
    0 of this (b, h) in rows of ``[B, T, H, .]``."""
    seg, bh, vb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = bh // H, bh % H
    offs_v = vb * BV + tl.arange(0, BV)
    return (seg, bh, h, b * T * H + h, tl.arange(0, BC), tl.arange(0, BD),
            tl.arange(0, BD * BD), offs_v, offs_v < Dv)  # fmt: skip


RUNTIME = ["T", "NSEG", "NCS", "NORM", "NORMALIZE", "pgx_stride", "pgy_stride"]
"""Integer arguments Triton must not specialise on (value 1, divisibility by 16): one
compiled kernel serves every sequence length, flag and segment length of a dtype and tile
config. H, D and Dv are specialised (``SPECIALISED``): knowing that the row strides H * D
and H * Dv are multiples of 16 lets Triton load rows in 16-byte vectors; without it every
element was its own 4-byte access, with its own address (sm_90a, triton 3.6: the tile
kernel's pair loop fell from 623 to 285 instructions, ``resources --sass``)."""
SPECIALISED = ("H", "D", "Dv")


@triton.jit(do_not_specialize=[a for a in RUNTIME if a not in ("NORMALIZE", "pgx_stride")])
def segment_state_kernel(
    Y, YG, YB, W, Wsc, Sst, Zst,
    T, H, D, Dv, pgy_stride, NSEG, NCS, NORM,
    BC: tl.constexpr, BD: tl.constexpr, BA: tl.constexpr, BV: tl.constexpr,
    RF: tl.constexpr, HAS_WSC: tl.constexpr, HAS_C2: tl.constexpr, DOT: tl.constexpr,
):  # fmt: skip
    """Grid ``(NSEG, B*H, cdiv(Dv, BV))``: each segment's own state sum (no prefix).
    With ``BA < BD`` S_2 accumulates in place in ``Sst`` (zeroed by the host)."""
    seg, bh, h, tok, offs_c, offs_d, offs_f, offs_v, vmask = _program(T, H, Dv, BC, BD, BV)
    S0 = tl.zeros([BV], tl.float32)
    S1 = tl.zeros([BD, BV], tl.float32)
    if BA == BD:
        S2 = tl.zeros([BD * BD, BV], tl.float32)
    else:
        S2 = tl.zeros([16, BV], tl.float32)  # S_2 is in Sst
    z0 = tl.sum(S0, 0) * 0.0
    z1 = tl.zeros([BD], tl.float32)
    z2 = tl.zeros([BD, BD], tl.float32)
    base = (bh * NSEG + seg) * RF
    for i in range(NCS):
        y, Wt, wc, _ = _columns(Y, YG + h * pgy_stride, YB + h * pgy_stride, W, Wsc,
                                seg * NCS + i, tok, offs_c, offs_d, offs_v, vmask, T, H, D,
                                Dv, NORM, BC, HAS_WSC)  # fmt: skip
        S0, S1, S2, z0, z1, z2 = _update(S0, S1, S2, z0, z1, z2, y, Wt, wc, Sst, base, offs_v,
                                         vmask, Dv, DOT, BC, BD, BA, HAS_C2)  # fmt: skip
    tl.store(Sst + base * Dv + offs_v, S0, mask=vmask)
    tl.store(Sst + (base + 1 + offs_d[:, None]) * Dv + offs_v[None, :], S1, mask=vmask[None, :])
    if BA == BD:
        tl.store(Sst + (base + 1 + BD + offs_f[:, None]) * Dv + offs_v[None, :], S2,
                 mask=vmask[None, :])  # fmt: skip
    if tl.program_id(2) == 0:  # one value block writes z
        tl.store(Zst + base, z0)
        tl.store(Zst + base + 1 + offs_d, z1)
        tl.store(Zst + base + 1 + BD + offs_d[:, None] * BD + offs_d[None, :], z2)


@triton.jit(do_not_specialize=RUNTIME)
def sweep_kernel(
    X, XG, XB, Y, YG, YB, W, Wsc, U, DO, Sst, Zst,
    OUT, GOUT, ROUT, DX, DG, DB,
    T, H, D, Dv, pgx_stride, pgy_stride, NSEG, NCS, NORM, NORMALIZE, sc, C0, C1, C2, eps,
    BC: tl.constexpr, BD: tl.constexpr, BA: tl.constexpr, BV: tl.constexpr,
    RF: tl.constexpr, MODE: tl.constexpr, REVERSE: tl.constexpr, HAS_WSC: tl.constexpr,
    HAS_C2: tl.constexpr, DOT: tl.constexpr, X3: tl.constexpr,
):  # fmt: skip
    """Grid ``(NSEG, B*H, cdiv(Dv, BV))``: walk one segment's chunks from its prefix state.

    Row i of a chunk gets ``out_i = sum_j A_ij W_j + phi(x_i) . S`` and
    ``den_i = sum_j A_ij w_j + phi(x_i) . z`` with ``A_ij = sim(sc * x'_i . y'_j)`` over the
    columns j <= i (j >= i when ``REVERSE``) of the chunk, and (S, z) the state of all
    earlier chunks; then the chunk's columns are added to the state.

    MODE 0 (forward; x = q, y = k, W = v, w = 1): ``o = out / (den + eps)``.
    MODE 1 (gradient of q; same sides): ``U = g = dO / (den + eps)`` and
    ``u = r = -(dO . out) / (den + eps)^2`` are stored, and with
    ``P_ij = U_i . W_j + u_i w_j`` the chain rule gives
    ``dx'_i = sc sum_j P_ij sim'(s_ij) y'_j + d phi(x_i)/dx' . (S U_i + z u_i)``.
    MODE 2 (gradient of k and v; REVERSE, x = k, y = q, W = g, w = r, U = v, u = 1):
    ``out`` is dv and the same ``dx'`` is dk'. Modes 1, 2 need ``BV >= Dv``.

    With ``BA < BD`` (D > 16) S_2 does not fit on chip: the program updates its own prefix
    rows of ``Sst`` in place, block by block (``_update``), and reads them back per chunk.
    """
    seg, bh, h, tok, offs_c, offs_d, offs_f, offs_v, vmask = _program(T, H, Dv, BC, BD, BV)
    base = (bh * NSEG + seg) * RF
    S0, S1, S2, z0, z1, z2 = _load_state(Sst, Zst, base, offs_d, offs_f, offs_v, vmask, Dv, BD,
                                         BA < BD)  # fmt: skip
    dg_acc = tl.zeros([BD], tl.float32)
    db_acc = tl.zeros([BD], tl.float32)
    for i in range(NCS):
        c, rows, rmask, tv_mask = _walk_rows(seg, i, NCS, BC, offs_c, T, vmask, REVERSE)
        x, xh, rstd = _pre(X + tok * D, XG + h * pgx_stride, XB + h * pgx_stride, rows, rmask,
                           offs_d, D, H * D, NORM)  # fmt: skip
        y, Wt, wc, _ = _columns(Y, YG + h * pgy_stride, YB + h * pgy_stride, W, Wsc, c, tok,
                                offs_c, offs_d, offs_v, vmask, T, H, D, Dv, NORM, BC,
                                HAS_WSC)  # [BC, BD], [BC, BV], [BC]  # fmt: skip
        mask = _keep(c, c, rmask, offs_c, REVERSE)  # the diagonal chunk
        s, A = _sim(x, y, mask, sc, C0, C1, C2, DOT)  # [BC, BC]
        out, den, xz = _phi_state(x, S0, S1, S2, z0, z1, z2, Sst, base, offs_v, vmask, Dv, sc,
                                  C0, C1, C2, DOT, X3, BC, BD, BA, HAS_C2)  # fmt: skip
        out += _dot_A(A, Wt, DOT, MODE)
        den += tl.sum(A * wc[None, :], 1)
        o_ptrs = (tok + rows[:, None] * H) * Dv + offs_v[None, :]  # [BC, BV]
        Ut, u = _rows_done(out, den, OUT, DO, U, GOUT, GOUT, ROUT, o_ptrs, tv_mask, tok, rows,
                           rmask, H, eps, NORMALIZE, MODE, True)  # fmt: skip
        if MODE != 0:
            dxp = _pair_grad(Ut, u, Wt, wc, s, mask, y, sc, C1, C2, DOT, MODE)
            dxp += _phi_state_grad(Ut, u, x, xz, S1, S2, z1, Sst, base, offs_d, offs_v, vmask,
                                   Dv, sc, C1, C2, DOT, X3, BC, BD, BA, HAS_C2)  # fmt: skip
            dg, db = _store_dx(dxp, xh, rstd, rmask, DX, XG + h * pgx_stride, tok, rows, offs_d,
                               H, D, NORM)  # fmt: skip
            dg_acc += dg
            db_acc += db
        S0, S1, S2, z0, z1, z2 = _update(S0, S1, S2, z0, z1, z2, y, Wt, wc, Sst, base, offs_v,
                                         vmask, Dv, DOT, BC, BD, BA, HAS_C2)  # fmt: skip
    if MODE != 0:
        tl.store(DG + (bh * NSEG + seg) * BD + offs_d, dg_acc)
        tl.store(DB + (bh * NSEG + seg) * BD + offs_d, db_acc)


@triton.jit(do_not_specialize=["NSEG", "N"])
def prefix_kernel(SEG, INIT, TOTAL, PRE, NSEG, N, HAS_INIT: tl.constexpr,
                  REVERSE: tl.constexpr, BS: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    """Grid ``(B*H, cdiv(N, BLOCK))``: per-segment sums ``SEG [B*H, NSEG, N]`` (fp32, or half)
    become, in place, the exclusive prefix over segments (suffix when ``REVERSE``) starting from
    ``INIT [B*H, N]`` (zero without ``HAS_INIT``), written to ``PRE`` (``SEG`` itself, or a
    half-precision copy: the store rounds); ``TOTAL [B*H, N]`` gets the full sum.

    One ``[BS, BLOCK]`` tile (BS >= NSEG) per program, scanned along the segments at once:
    the exclusive prefix is the inclusive scan of the tile shifted by one segment (a second
    read of the same rows), so no value is formed as a difference."""
    bh, blk = tl.program_id(0), tl.program_id(1)
    offs = blk * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    m = offs < N
    i = tl.arange(0, BS)  # [BS]: position in the walk order
    if REVERSE:
        seg, prev = NSEG - 1 - i, NSEG - i
    else:
        seg, prev = i, i - 1
    row = SEG + bh * NSEG * N + offs[None, :]  # [1, BLOCK]
    here = (i < NSEG)[:, None] & m[None, :]  # [BS, BLOCK]
    x = tl.load(row + seg[:, None] * N, mask=here, other=0.0).to(tl.float32)  # [BS, BLOCK]
    before = tl.load(row + prev[:, None] * N, mask=here & (i >= 1)[:, None], other=0.0)
    before = before.to(tl.float32)  # SEG may be half (``segment_half``): fp32 sums
    if HAS_INIT:
        init = tl.load(INIT + bh * N + offs, mask=m, other=0.0)  # [BLOCK]
    else:
        init = tl.zeros([BLOCK], tl.float32)
    pre = PRE + bh * NSEG * N + offs[None, :] + seg[:, None] * N
    tl.store(pre, tl.cumsum(before, 0) + init[None, :], mask=here)
    tl.store(TOTAL + bh * N + offs, tl.sum(x, 0) + init, mask=m)


@triton.jit
def _phi_packed(ptr, g_ptr, b_ptr, i0, i1, wf, D, NORM, BD: tl.constexpr):
    """Canonical features of one vector: ``wf * x'[i0] * x'[i1]`` (index D stands for 1)."""
    one = tl.arange(0, 1)
    offs_d = tl.arange(0, BD)
    xp, _, _ = _pre(ptr, g_ptr, b_ptr, one, one < 1, offs_d, D, 0, NORM)  # [1, BD]
    # gather x'[i] for every feature as a one-hot product: [BF, BD] x [1, BD] -> [BF]
    a = tl.sum(tl.where(i0[:, None] == offs_d[None, :], xp, 0.0), 1)
    c = tl.sum(tl.where(i1[:, None] == offs_d[None, :], xp, 0.0), 1)
    return wf * tl.where(i0 == D, 1.0, a) * tl.where(i1 == D, 1.0, c)


@triton.jit(do_not_specialize=["H", "D", "Dv", "F", "pg_stride", "NORM", "NORMALIZE"])
def decode_kernel(
    Q, K, V, QG, QB, KG, KB, S, Z, I0, I1, WF, O, S_OUT, Z_OUT, READS,
    H, D, Dv, F, pg_stride, NORM, NORMALIZE, eps,
    BD: tl.constexpr, BF: tl.constexpr, BV: tl.constexpr,
):  # fmt: skip
    """Grid ``(B*H, cdiv(Dv, BV))``: one token on the canonical packed state ``S [F, Dv]``,
    ``z [F]``; program ``(bh, vb)`` owns the value columns ``vb * BV ..`` of S and o.

    ``phi(x)[f] = WF[f] * x'[I0[f]] * x'[I1[f]]`` (index D stands for 1);
    ``S' = S + phi(k) v^T``, ``z' = z + phi(k)``, ``o = phi(q) S' / (phi(q) . z' + eps)``.
    Each program reads and writes its own columns of S, so ``S_OUT`` may be ``S``. Every
    program reads all of z; the last of a (b, h)'s programs to have read it writes z'
    (``READS [B*H]`` int32 counts the readers and that program resets it to 0), so ``Z_OUT``
    may be ``Z`` too.
    """
    bh, vb = tl.program_id(0), tl.program_id(1)
    h = bh % H
    offs_f = tl.arange(0, BF)
    fmask = offs_f < F
    i0 = tl.load(I0 + offs_f, mask=fmask, other=0)
    i1 = tl.load(I1 + offs_f, mask=fmask, other=0)
    wf = tl.load(WF + offs_f, mask=fmask, other=0.0)
    phi_q = _phi_packed(Q + bh * D, QG + h * pg_stride, QB + h * pg_stride, i0, i1, wf, D,
                        NORM, BD)  # [BF]  # fmt: skip
    phi_k = _phi_packed(K + bh * D, KG + h * pg_stride, KB + h * pg_stride, i0, i1, wf, D,
                        NORM, BD)  # [BF]  # fmt: skip
    z = tl.load(Z + bh * F + offs_f, mask=fmask, other=0.0) + phi_k  # [BF]
    den = tl.sum(phi_q * z, 0) + eps
    offs_v = vb * BV + tl.arange(0, BV)
    vmask = offs_v < Dv
    m = fmask[:, None] & vmask[None, :]
    ptrs = (bh * F + offs_f[:, None]) * Dv + offs_v[None, :]  # [BF, BV]
    v = tl.load(V + bh * Dv + offs_v, mask=vmask, other=0.0).to(tl.float32)  # [BV]
    St = tl.load(S + ptrs, mask=m, other=0.0) + phi_k[:, None] * v[None, :]  # [BF, BV]
    tl.store(S_OUT + ptrs, St, mask=m)
    o = tl.sum(phi_q[:, None] * St, 0)  # [BV]
    if NORMALIZE:
        o = o / den
    tl.store(O + bh * Dv + offs_v, o.to(O.dtype.element_ty), mask=vmask)
    # acq_rel: this program's read of z happens before its count; the last reader writes z'
    if tl.atomic_add(READS + bh, 1) == tl.num_programs(1) - 1:
        tl.store(Z_OUT + bh * F + offs_f, z, mask=fmask)
        tl.store(READS + bh, 0)
