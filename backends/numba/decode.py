"""The numba decode step: one token per (b, h), pre-transform and features fused.

Legend as in ``kernels.py``. ``q, k [B, H, D]``, ``v [B, H, Dv]``, the state
``S [B, H, F, Dv]``, ``z [B, H, F]``; ``gq, bq, gk, bk [H, D]`` the affine parameters
(ones and zeros when unused); ``norm`` applies LayerNorm (eps ``ln_eps``) over D first.
Writes ``o [B, H, Dv]`` and the new state ``S' = S + phi(k) v^T``, ``z' = z + phi(k)``
into ``S_out, z_out``; with ``inplace`` those are ``S, z`` themselves.
"""

from __future__ import annotations

import numpy as np
from numba import njit

_SCALE, _EPS = 0, 1


@njit(cache=True, fastmath=False)
def _pre(x, g, beta, norm, ln_eps, xa):
    """``xa[:D] = g * LN(x) + beta`` (or without LN), ``xa[D] = 1``: x, g, beta ``[D]``."""
    D = x.shape[0]
    mean = 0.0
    var = 0.0
    if norm:
        for i in range(D):
            mean += x[i]
        mean /= D
        for i in range(D):
            var += (x[i] - mean) * (x[i] - mean)
        var = 1.0 / np.sqrt(var / D + ln_eps)
    else:
        var = 1.0
    for i in range(D):
        xa[i] = g[i] * ((x[i] - mean) * var) + beta[i]
    xa[D] = 1.0


@njit(cache=True, fastmath=False)
def decode_kernel(
    q, k, v, S, z, gq, bq, gk, bk, norm, ln_eps, i0, i1, w, P, normalize, inplace, o, S_out, z_out
):
    B, H, D = q.shape
    Dv = v.shape[2]
    F = w.shape[0]
    qa = np.empty(D + 1, dtype=S.dtype)  # [D + 1]
    ka = np.empty(D + 1, dtype=S.dtype)  # [D + 1]
    phi_q = np.empty(F, dtype=S.dtype)  # [F]
    acc = np.empty(Dv, dtype=S.dtype)  # [Dv], phi(q) S' for one (b, h)
    for b in range(B):
        for h in range(H):
            _pre(q[b, h], gq[h], bq[h], norm, ln_eps, qa)
            _pre(k[b, h], gk[h], bk[h], norm, ln_eps, ka)
            S_bh, S_new, v_bh = S[b, h], S_out[b, h], v[b, h]  # [F, Dv], [F, Dv], [Dv]
            acc[:] = 0.0
            den = 0.0
            for f in range(F):
                phi_k = w[f] * ka[i0[f]] * ka[i1[f]]
                phi_q[f] = w[f] * qa[i0[f]] * qa[i1[f]]
                z_out[b, h, f] = z[b, h, f] + phi_k
                den += phi_q[f] * z_out[b, h, f]
                pq = phi_q[f]
                if inplace:  # one pointer, so LLVM vectorises without a runtime alias check
                    for e in range(Dv):
                        S_bh[f, e] += phi_k * v_bh[e]  # S'[f, e]
                        acc[e] += pq * S_bh[f, e]
                else:
                    for e in range(Dv):
                        s_new = S_bh[f, e] + phi_k * v_bh[e]  # S'[f, e]
                        S_new[f, e] = s_new
                        acc[e] += pq * s_new
            scale = 1.0 / (den + P[_EPS]) if normalize else 1.0
            for e in range(Dv):
                o[b, h, e] = acc[e] * scale
