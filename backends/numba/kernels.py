"""numba kernels for the chunked algorithm (``backends/torch/chunked.py``), parallel over (b, h).

Legend
------
``B`` batch, ``T`` tokens, ``H`` heads, ``D`` q/k feature dim, ``Dv`` value dim, ``C`` chunk
size, ``N = ceil(T / C)`` chunks, ``m`` the tokens of the current chunk (``C``, fewer in the
last), ``F`` features. Each ``prange`` iteration owns one (b, h) pair and walks its chunks
in order, keeping the state ``S [F, Dv]``, ``z [F]`` in local arrays. A name ending in
``T`` is the transpose (``PhiQT [F, C]`` is ``phi(Q)^T``).

Host arrays (C-contiguous, all in the compute dtype ``dt``, float32 or float64):
``q, k [B, T, H, D]`` are the pre-transformed q', k'; ``v, do [B, T, H, Dv]``;
``S0, dS [B0, H, F, Dv]`` and ``z0, dz [B0, H, F]`` (``B0 = 0`` when there is no initial
state). Feature ``f`` of ``x [D]`` is ``w[f] * xa[i0[f]] * xa[i1[f]]`` with
``xa = (x_0, .., x_{D-1}, 1)``: index ``D`` is the constant 1, so a power-0 feature is
``(D, D)``, power 1 ``(i, D)``, power 2 ``(i, j)`` with ``i <= j`` (the canonical layout).
``P [7]`` holds the scalars in ``dt`` so float32 stays float32:
``scale, eps, c0, c1, c2, 0, 2 * c2`` (``sim = c0 + c1 s + c2 s^2``, ``sim' = c1 + 2 c2 s``).

Every product goes through ``_mm``: a 4 x 4 register block whose inner loop is an axpy over
the contiguous last axis, so LLVM vectorises it without reassociating a reduction
(``fastmath=False``). Features are computed transposed (``[F, C]``: contiguous over tokens).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

_SCALE, _EPS, _C0, _C1, _C2, _ZERO, _DC2 = range(7)
FULL, A_LOWER, OUT_LOWER, A_UPPER = 0, 1, 2, 3
"""``_mm`` triangle modes: all of it; ``a`` lower-triangular (k <= i); only ``out``'s lower
triangle is wanted (e <= i); ``a`` upper-triangular (k >= i). Within the 4 x 4 diagonal
blocks the zeros of a triangular ``a`` must be stored, and ``OUT_LOWER`` writes there too."""


@njit(cache=True, fastmath=False)
def _mm(a, b, out, M, K, E, tri):
    """``out[:M, :E] += a[:M, :K] @ b[:K, :E]``: a ``[>=M, >=K]``, b ``[>=K, >=E]``."""
    m4 = M - M % 4
    for i in range(0, m4, 4):
        k0 = i if tri == A_UPPER else 0
        k1 = min(i + 4, K) if tri == A_LOWER else K
        e1 = min(i + 4, E) if tri == OUT_LOWER else E
        k4 = k1 - (k1 - k0) % 4
        for kk in range(k0, k4, 4):
            a00, a01, a02, a03 = a[i, kk], a[i, kk + 1], a[i, kk + 2], a[i, kk + 3]
            a10, a11, a12, a13 = a[i + 1, kk], a[i + 1, kk + 1], a[i + 1, kk + 2], a[i + 1, kk + 3]
            a20, a21, a22, a23 = a[i + 2, kk], a[i + 2, kk + 1], a[i + 2, kk + 2], a[i + 2, kk + 3]
            a30, a31, a32, a33 = a[i + 3, kk], a[i + 3, kk + 1], a[i + 3, kk + 2], a[i + 3, kk + 3]
            for e in range(e1):
                b0, b1, b2, b3 = b[kk, e], b[kk + 1, e], b[kk + 2, e], b[kk + 3, e]
                out[i, e] += a00 * b0 + a01 * b1 + a02 * b2 + a03 * b3
                out[i + 1, e] += a10 * b0 + a11 * b1 + a12 * b2 + a13 * b3
                out[i + 2, e] += a20 * b0 + a21 * b1 + a22 * b2 + a23 * b3
                out[i + 3, e] += a30 * b0 + a31 * b1 + a32 * b2 + a33 * b3
        for kk in range(k4, k1):
            a0, a1, a2, a3 = a[i, kk], a[i + 1, kk], a[i + 2, kk], a[i + 3, kk]
            for e in range(e1):
                b0 = b[kk, e]
                out[i, e] += a0 * b0
                out[i + 1, e] += a1 * b0
                out[i + 2, e] += a2 * b0
                out[i + 3, e] += a3 * b0
    for i in range(m4, M):
        k0 = i if tri == A_UPPER else 0
        k1 = min(i + 1, K) if tri == A_LOWER else K
        e1 = min(i + 1, E) if tri == OUT_LOWER else E
        k4 = k1 - (k1 - k0) % 4
        for kk in range(k0, k4, 4):
            a0, a1, a2, a3 = a[i, kk], a[i, kk + 1], a[i, kk + 2], a[i, kk + 3]
            for e in range(e1):
                b0, b1, b2, b3 = b[kk, e], b[kk + 1, e], b[kk + 2, e], b[kk + 3, e]
                out[i, e] += a0 * b0 + a1 * b1 + a2 * b2 + a3 * b3
        for kk in range(k4, k1):
            a0 = a[i, kk]
            for e in range(e1):
                out[i, e] += a0 * b[kk, e]


@njit(cache=True, fastmath=False)
def _load(src, b, t0, h, m, dst):
    """``dst[:m] = src[b, t0:t0+m, h]``: src ``[B, T, H, E]``, dst ``[C, E]``."""
    for i in range(m):
        for e in range(src.shape[3]):
            dst[i, e] = src[b, t0 + i, h, e]


@njit(cache=True, fastmath=False)
def _store(src, m, dst, b, t0, h, add):
    """``dst[b, t0:t0+m, h] (+)= src[:m]``: src ``[C, E]``, dst ``[B, T, H, E]``."""
    E = dst.shape[3]
    for i in range(m):
        if add:
            for e in range(E):
                dst[b, t0 + i, h, e] += src[i, e]
        else:
            for e in range(E):
                dst[b, t0 + i, h, e] = src[i, e]


@njit(cache=True, fastmath=False)
def _transpose(src, rows, cols, dst):
    """``dst[:cols, :rows] = src[:rows, :cols].T``."""
    for i in range(rows):
        for e in range(cols):
            dst[e, i] = src[i, e]


@njit(cache=True, fastmath=False)
def _load_chunk(q, k, v, b, t0, h, m, Q, K, V, QT, KT):
    """Q, K ``[C, D]``, V ``[C, Dv]`` and QT, KT ``[D + 1, C]`` (row D all ones)."""
    D = Q.shape[1]
    _load(q, b, t0, h, m, Q)
    _load(k, b, t0, h, m, K)
    _load(v, b, t0, h, m, V)
    _transpose(Q, m, D, QT)
    _transpose(K, m, D, KT)
    QT[D, :m] = 1
    KT[D, :m] = 1


@njit(cache=True, fastmath=False)
def _features(xT, m, i0, i1, w, phiT):
    """``phiT[:, :m] = phi(x)^T``: xT ``[D + 1, C]`` (row D all ones), phiT ``[F, C]``."""
    for f in range(w.shape[0]):
        a, c, wf = i0[f], i1[f], w[f]
        for i in range(m):
            phiT[f, i] = wf * xT[a, i] * xT[c, i]


@njit(cache=True, fastmath=False)
def _features_backward(xT, m, i0, i1, w, dphiT, dxT):
    """``dxT[:, :m] = (dphi . dphi/dx)^T``: xT, dxT ``[D + 1, C]``, dphiT ``[F, C]``.

    Row D of dxT (the constant) collects junk and is ignored.
    """
    dxT[:, :m] = 0
    for f in range(w.shape[0]):
        a, c, wf = i0[f], i1[f], w[f]
        for i in range(m):
            g = wf * dphiT[f, i]
            dxT[a, i] += g * xT[c, i]
            dxT[c, i] += g * xT[a, i]


@njit(cache=True, fastmath=False)
def _scores(Q, KT, m, P, s, A):
    """``s = scale * Q K^T`` and ``A = sim(s)`` on ``j <= i``, zero above (``j < m``).

    Q ``[C, D]``, KT ``[D + 1, C]``, s and A ``[C, C]``.
    """
    scale, c0, c1, c2 = P[_SCALE], P[_C0], P[_C1], P[_C2]
    s[:m, :m] = 0
    _mm(Q, KT, s, m, Q.shape[1], m, OUT_LOWER)
    for i in range(m):
        for j in range(i + 1):
            x = scale * s[i, j]
            s[i, j] = x
            A[i, j] = (c2 * x + c1) * x + c0
        A[i, i + 1 : m] = 0


@njit(cache=True, fastmath=False)
def _attend(PhiQ, PhiQT, A, V, S, z, m, P, normalize, out, den):
    """``out[:m] = (PhiQ S + A V) / den`` with ``den = PhiQ z + rowsum(A) + eps``.

    PhiQ ``[C, F]``, PhiQT ``[F, C]``, A ``[C, C]``, V and out ``[C, Dv]``, S ``[F, Dv]``,
    z ``[F]``, den ``[C]`` (all ones without normalize).
    """
    F, Dv = S.shape
    out[:m] = 0
    _mm(PhiQ, S, out, m, F, Dv, FULL)
    _mm(A, V, out, m, m, Dv, A_LOWER)
    den[:m] = 1
    if normalize:
        den[:m] = 0
        for f in range(F):
            zf = z[f]
            for i in range(m):
                den[i] += PhiQT[f, i] * zf
        for i in range(m):
            rowsum = P[_ZERO]
            for j in range(i + 1):
                rowsum += A[i, j]
            d = den[i] + rowsum + P[_EPS]
            den[i] = d
            for e in range(Dv):
                out[i, e] = out[i, e] / d


@njit(cache=True, fastmath=False)
def _update_state(PhiKT, V, m, S, z):
    """``S += PhiK^T V``, ``z += colsum(PhiK)``: PhiKT ``[F, C]``, S ``[F, Dv]``, z ``[F]``."""
    F, Dv = S.shape
    _mm(PhiKT, V, S, F, m, Dv, FULL)
    for f in range(F):
        acc = z[f]
        for i in range(m):
            acc += PhiKT[f, i]
        z[f] = acc


@njit(cache=True, fastmath=False)
def _normalize_backward(PhiQT, A, z, m, P, dphiT, ds, dO, den, dden):
    """Turn the raw products with ``do`` into those with ``dnum``, for normalize=True.

    In: dphiT ``[F, C]`` = S do^T, ds ``[C, C]`` = do V^T (lower), dO ``[C, Dv]`` = do.
    Out: ``den [m]`` (with eps), ``dden [m] = -(do . out) / den`` with
    ``do . out = (do . (phi_q S) + do . (A V)) / den`` (the first term is ``PhiQ . dphiT``,
    the second ``A . ds``, so out is never formed), ``dO = dnum = do / den``,
    ``ds = dnum V^T + dden``, ``dphiT = (dnum S^T + dden z^T)^T``.
    """
    F = PhiQT.shape[0]
    Dv = dO.shape[1]
    zero = P[_ZERO]
    for i in range(m):
        den[i] = zero
        dden[i] = zero  # accumulates do . (phi_q S) first
    for f in range(F):
        zf = z[f]
        for i in range(m):
            den[i] += PhiQT[f, i] * zf
            dden[i] += PhiQT[f, i] * dphiT[f, i]
    for i in range(m):
        rowsum = zero
        adot = zero
        for j in range(i + 1):
            rowsum += A[i, j]
            adot += A[i, j] * ds[i, j]
        d = den[i] + rowsum + P[_EPS]
        g = -((dden[i] + adot) / d) / d
        den[i] = d
        dden[i] = g
        for e in range(Dv):
            dO[i, e] = dO[i, e] / d
        for j in range(i + 1):
            ds[i, j] = ds[i, j] / d + g
    for f in range(F):
        zf = z[f]
        for i in range(m):
            dphiT[f, i] = dphiT[f, i] / den[i] + zf * dden[i]


@njit(parallel=True, cache=True, fastmath=False)
def forward_kernel(q, k, v, S0, z0, i0, i1, w, P, C, normalize, o, S_out, z_out):
    """o ``[B, T, H, Dv]``, S_out ``[B, H, F, Dv]``, z_out ``[B, H, F]`` (written in place)."""
    B, T, H, D = q.shape
    Dv = v.shape[3]
    F = w.shape[0]
    N = (T + C - 1) // C
    dt = q.dtype
    for bh in prange(B * H):
        b, h = bh // H, bh % H
        S = np.zeros((F, Dv), dt)  # [F, Dv], the state before the current chunk
        z = np.zeros(F, dt)  # [F]
        if S0.shape[0] > 0:
            S[:, :] = S0[b, h]
            z[:] = z0[b, h]
        Q, K = np.empty((C, D), dt), np.empty((C, D), dt)  # [C, D]
        QT, KT = np.empty((D + 1, C), dt), np.empty((D + 1, C), dt)  # [D + 1, C]
        V, out = np.empty((C, Dv), dt), np.empty((C, Dv), dt)  # [C, Dv]
        PhiQT, PhiKT = np.empty((F, C), dt), np.empty((F, C), dt)  # [F, C]
        PhiQ = np.empty((C, F), dt)  # [C, F]
        s, A = np.empty((C, C), dt), np.empty((C, C), dt)  # [C, C]
        den = np.empty(C, dt)  # [C]
        for n in range(N):
            t0 = n * C
            m = min(C, T - t0)
            _load_chunk(q, k, v, b, t0, h, m, Q, K, V, QT, KT)
            _features(QT, m, i0, i1, w, PhiQT)
            _features(KT, m, i0, i1, w, PhiKT)
            _transpose(PhiQT, F, m, PhiQ)
            _scores(Q, KT, m, P, s, A)
            _attend(PhiQ, PhiQT, A, V, S, z, m, P, normalize, out, den)
            _store(out, m, o, b, t0, h, False)
            _update_state(PhiKT, V, m, S, z)
        S_out[b, h] = S
        z_out[b, h] = z


@njit(parallel=True, cache=True, fastmath=False)
def backward_kernel(q, k, v, S0, z0, do, dS, dz, i0, i1, w, P, C, normalize, dq, dk, dv, dS0, dz0):
    """Gradients w.r.t. q', k', v, S0, z0, written in place.

    dq, dk ``[B, T, H, D]``, dv ``[B, T, H, Dv]``, dS0 ``[B, H, F, Dv]``, dz0 ``[B, H, F]``.
    Pass 1 walks the chunks forward (recomputing S, z) for what is local to a chunk given
    its state: the intra-chunk terms, all of dq, and ``den``, ``dden`` per token. Pass 2
    walks them in reverse carrying ``G = dL/dS``, ``Gz = dL/dz`` after each chunk, for the
    inter-chunk terms of dk and dv, and leaves ``dL/dS0``, ``dL/dz0``.
    """
    B, T, H, D = q.shape
    Dv = v.shape[3]
    F = w.shape[0]
    N = (T + C - 1) // C
    dt = q.dtype
    scale, dc1, dc2 = P[_SCALE], P[_C1], P[_DC2]
    for bh in prange(B * H):
        b, h = bh // H, bh % H
        S = np.zeros((F, Dv), dt)  # [F, Dv]: S before the chunk (pass 1), G after it (pass 2)
        z = np.zeros(F, dt)  # [F]: z (pass 1), Gz (pass 2)
        if S0.shape[0] > 0:
            S[:, :] = S0[b, h]
            z[:] = z0[b, h]
        den_t = np.ones(T, dt)  # [T], the denominators (with eps)
        dden_t = np.zeros(T, dt)  # [T], dL/dden
        Q, K = np.empty((C, D), dt), np.empty((C, D), dt)  # [C, D]
        dQ, dK = np.empty((C, D), dt), np.empty((C, D), dt)  # [C, D]
        QT, KT = np.empty((D + 1, C), dt), np.empty((D + 1, C), dt)  # [D + 1, C]
        dxT = np.empty((D + 1, C), dt)  # [D + 1, C]
        V, dV = np.empty((C, Dv), dt), np.empty((C, Dv), dt)  # [C, Dv]
        dO = np.empty((C, Dv), dt)  # [C, Dv]: do, then dnum = do / den
        VT, dOT = np.empty((Dv, C), dt), np.empty((Dv, C), dt)  # [Dv, C]
        PhiQT, PhiKT = np.empty((F, C), dt), np.empty((F, C), dt)  # [F, C]
        dphiT = np.empty((F, C), dt)  # [F, C]
        PhiK = np.empty((C, F), dt)  # [C, F]
        s, A, AT = np.empty((C, C), dt), np.empty((C, C), dt), np.empty((C, C), dt)  # [C, C]
        ds, dsT = np.empty((C, C), dt), np.empty((C, C), dt)  # [C, C]

        for n in range(N):  # pass 1: forward over chunks
            t0 = n * C
            m = min(C, T - t0)
            _load_chunk(q, k, v, b, t0, h, m, Q, K, V, QT, KT)
            _load(do, b, t0, h, m, dO)
            _features(QT, m, i0, i1, w, PhiQT)
            _features(KT, m, i0, i1, w, PhiKT)
            _scores(Q, KT, m, P, s, A)
            # raw products with do: ds = do V^T (lower), dphiT = S do^T
            _transpose(V, m, Dv, VT)
            _transpose(dO, m, Dv, dOT)
            ds[:m, :m] = 0
            _mm(dO, VT, ds, m, Dv, m, OUT_LOWER)
            dphiT[:, :m] = 0
            _mm(S, dOT, dphiT, F, Dv, m, FULL)
            if normalize:  # now dnum, ds = dnum V^T + dden, dphiT = dphi_q^T
                _normalize_backward(
                    PhiQT, A, z, m, P, dphiT, ds, dO, den_t[t0 : t0 + m], dden_t[t0 : t0 + m]
                )
            # ds = scale * tril(dA) * sim'(s)  [C, C]
            for i in range(m):
                for j in range(i + 1):
                    ds[i, j] = scale * ds[i, j] * (dc2 * s[i, j] + dc1)
                ds[i, i + 1 : m] = 0
            _transpose(ds, m, m, dsT)
            _transpose(A, m, m, AT)
            # dq = ds K + phi_backward(q, dphi_q); dk = ds^T Q; dv = A^T dnum (intra-chunk)
            _features_backward(QT, m, i0, i1, w, dphiT, dxT)
            _transpose(dxT, D, m, dQ)
            _mm(ds, K, dQ, m, m, D, A_LOWER)
            dK[:m] = 0
            _mm(dsT, Q, dK, m, m, D, A_UPPER)
            dV[:m] = 0
            _mm(AT, dO, dV, m, m, Dv, A_UPPER)
            _store(dQ, m, dq, b, t0, h, False)
            _store(dK, m, dk, b, t0, h, False)
            _store(dV, m, dv, b, t0, h, False)
            _update_state(PhiKT, V, m, S, z)

        S[:, :] = dS[b, h]  # pass 2: reverse over chunks, S and z now G and Gz
        z[:] = dz[b, h]
        for n in range(N - 1, -1, -1):
            t0 = n * C
            m = min(C, T - t0)
            _load_chunk(q, k, v, b, t0, h, m, Q, K, V, QT, KT)
            _load(do, b, t0, h, m, dO)
            for i in range(m):
                d = den_t[t0 + i]
                for e in range(Dv):
                    dO[i, e] = dO[i, e] / d
            _features(QT, m, i0, i1, w, PhiQT)
            _features(KT, m, i0, i1, w, PhiKT)
            _transpose(PhiKT, F, m, PhiK)
            # dphi_k^T = G V^T + Gz  [F, C]; dk += phi_backward(k, dphi_k)
            _transpose(V, m, Dv, VT)
            for f in range(F):
                zf = z[f]
                for i in range(m):
                    dphiT[f, i] = zf
            _mm(S, VT, dphiT, F, Dv, m, FULL)
            _features_backward(KT, m, i0, i1, w, dphiT, dxT)
            _transpose(dxT, D, m, dK)
            _store(dK, m, dk, b, t0, h, True)
            # dv += PhiK G
            dV[:m] = 0
            _mm(PhiK, S, dV, m, F, Dv, FULL)
            _store(dV, m, dv, b, t0, h, True)
            # G += PhiQ^T dnum, Gz += PhiQ^T dden
            _mm(PhiQT, dO, S, F, m, Dv, FULL)
            if normalize:
                for f in range(F):
                    acc = z[f]
                    for i in range(m):
                        acc += PhiQT[f, i] * dden_t[t0 + i]
                    z[f] = acc
        dS0[b, h] = S
        dz0[b, h] = z
