"""Host side of the ``walk`` variant (``kernels.py``): the full state layout.

Inside these kernels the state is the *full* unweighted layout (``RF = 1 + BD + BD^2`` rows,
BD = D padded to 16, 32 or 64); ``_maps`` converts it to and from the canonical packed layout
of ``spec``. For D <= 16 the whole state stays on chip; for D in (16, 64] S_2 (1024 or 4096
rows) stays in the program's own rows of the prefix buffer, updated block by block (a
correctness path: D <= 16 runs the ``packed`` variant by default).
"""

from __future__ import annotations

from functools import lru_cache

import torch

from rebased_kernels.backend import Inputs, Outputs
from rebased_kernels.spec import FeatureMap, LinearAttention, feature_layout, feature_weights

from .launch import (
    call_warps,
    dot_precision,
    param_grads,
    params,
    scan,
    stages,
    triton_cdiv,
    triton_next_pow2,
)
from .packed_call import CARRIED_SP


def padded_dim(D: int) -> int:
    """BD: the kernels' feature dim, D padded to 16, 32 or 64 (padded dims are zero)."""
    return 16 if D <= 16 else (32 if D <= 32 else 64)


def feature_rows(BD: int) -> int:
    """RF: rows of the full state, ``1 + BD + BD * BD``."""
    return 1 + BD + BD * BD


def block_rows(BD: int) -> int:
    """BA: rows of a per S_2 block; ``BA < BD`` (D > 16) keeps S_2 in memory, not on chip."""
    return BD if BD == 16 else 256 // BD


NUM_WARPS = 8  # 4 spills the state tiles (ptxas report with triton 3.6, sm_90a)
BWD_CHUNK = 32  # the backward sweeps hold more tiles: 64 spills ~2.5 KB per thread
BLOCK_V = 32


@lru_cache(maxsize=64)
def _maps(fm: FeatureMap, D: int, scale: float, device: str) -> tuple[torch.Tensor, ...]:
    """``(unpack [RF, F], pack [F, RF])``: canonical <-> full state, ``pack @ unpack = I``.

    A canonical feature f (multiset ``idx``, weight ``w_f``) is ``w_f`` times the full row of
    ``idx``; unpacking puts ``S_f / w_f`` on every ordering of ``idx`` (the full S_2 is
    symmetric). The same pair maps gradients: the final state's gradient unpacks into the
    reverse sweep's initial state, whose total packs into the initial state's gradient.
    """
    layout = feature_layout(D, fm.powers)
    w = feature_weights(fm, D, scale)
    BD = padded_dim(D)
    RF = feature_rows(BD)
    unpack = torch.zeros(RF, len(layout), dtype=torch.float64)
    pack = torch.zeros(len(layout), RF, dtype=torch.float64)
    for f, ((idx, _), wf) in enumerate(zip(layout, w)):
        if len(idx) == 0:
            rows = [0]
        elif len(idx) == 1:
            rows = [1 + idx[0]]
        else:
            rows = sorted({1 + BD + idx[0] * BD + idx[1], 1 + BD + idx[1] * BD + idx[0]})
        for r in rows:
            unpack[r, f] = 1.0 / wf
        pack[f, rows[0]] = wf
    return unpack.to(device, torch.float32), pack.to(device, torch.float32)


class _Call:
    """Launch arguments shared by the forward and both backward sweeps of one call."""

    def __init__(self, x: Inputs, attn: LinearAttention, config: dict, backward: bool) -> None:
        fm = attn.feature_map
        self.B, self.T, self.H, self.D = x.q.shape
        self.Dv = x.v.shape[3]
        self.BC = BWD_CHUNK if backward else int(config["chunk_size"])
        self.NCS = int(config["chunks_per_segment"])
        self.BD = padded_dim(self.D)
        self.RF = feature_rows(self.BD)
        self.BA = block_rows(self.BD)
        if self.BD > 16:  # 64-row chunks need > 227 KB of shared memory at BD = 64
            self.BC = min(self.BC, 32)
        self.NSEG = triton_cdiv(triton_cdiv(self.T, self.BC), self.NCS)
        self.num_warps = call_warps(config, NUM_WARPS, "walk", x.v.dtype, backward and x.q.is_cuda)
        self.stages = stages(config, "num_stages")  # the sweep kernel's
        self.state_stages = stages(config, "state_stages")
        self.attn, self.fm = attn, fm
        self.C = fm.quadratic_coeffs
        self.dot = dot_precision(x.v.dtype, backward, config.get("exact", "fma"), x.q.is_cuda)
        self.q, self.k, self.v = x.q.contiguous(), x.k.contiguous(), x.v.contiguous()
        H, D = self.H, self.D
        self.qg, self.qb, self.qg_stride = params(x.q_weight, x.q_bias, fm.pre, H, D, x.q.device)
        self.kg, self.kb, self.kg_stride = params(x.k_weight, x.k_bias, fm.pre, H, D, x.q.device)
        self.unpack, self.pack = _maps(fm, D, float(attn.scale), str(x.q.device))

    def full(self, canonical: torch.Tensor | None, cols: int) -> torch.Tensor | None:
        """A canonical state ``[B, H, F(, Dv)]`` as full rows ``[B*H, RF, cols]`` (None for
        none: the scan then adds nothing)."""
        if canonical is None:
            return None
        c = canonical.to(torch.float32).reshape(self.B * self.H, -1, cols)
        return self.unpack @ c

    def states(self, y, yg, yb, gamma_stride, W, Wsc, init_S, init_z, reverse: bool,
               handed: bool = False):  # fmt: skip
        """Prefix (suffix when ``reverse``) states per segment and the total, full layout;
        ``handed``: the total goes to the caller, so bf16 products become ``CARRIED_SP``'s."""
        BH, Dv = self.B * self.H, self.Dv
        alloc = torch.empty if self.BA == self.BD else torch.zeros  # S_2 accumulates in place
        seg_S = alloc(BH, self.NSEG, self.RF, Dv, device=y.device, dtype=torch.float32)
        seg_z = torch.empty(BH, self.NSEG, self.RF, device=y.device, dtype=torch.float32)
        BV = 16 if Dv <= 16 else (32 if Dv <= 32 else 64)
        grid = (self.NSEG, BH, triton_cdiv(Dv, BV))
        fm = self.fm
        from .kernels import segment_state_kernel

        segment_state_kernel[grid](
            y, yg, yb, W, W if Wsc is None else Wsc, seg_S, seg_z,
            self.T, self.H, self.D, Dv, gamma_stride, self.NSEG, self.NCS, int(fm.pre.norm),
            BC=self.BC, BD=self.BD, BA=self.BA, BV=BV, RF=self.RF, HAS_WSC=Wsc is not None,
            HAS_C2=self.C[2] != 0.0,
            DOT=CARRIED_SP if handed and self.dot == "bf16" else self.dot,
            num_warps=self.num_warps, **self.state_stages,
        )  # fmt: skip
        return scan(seg_S, init_S, reverse), scan(seg_z[..., None], init_z, reverse)

    def sweep(self, mode: int, states, carried: bool = False, **t) -> None:
        """The second kernel of mode 0 (forward), 1 (dq) or 2 (dk, dv) from the segments'
        ``states``: ``sweep_kernel`` walks each segment. ``t``: the tensors by kernel
        argument name, and BV.
        ``carried``: the states start from the caller's state (an initial state, or a final
        state's cotangent); a gradient sweep then takes its state products to ~fp32."""
        from .kernels import sweep_kernel

        fm, attn = self.fm, self.attn
        BH, Dv, BV = self.B * self.H, self.Dv, t.pop("BV")
        q, k = (self.qg, self.qb, self.qg_stride), (self.kg, self.kb, self.kg_stride)
        (xg, xb, xs), (yg, yb, ys) = (k, q) if mode == 2 else (q, k)  # rows, columns
        dummy = self.v
        (S_st, _), (z_st, _) = states
        args = (
            t["X"], xg, xb, t["Y"], yg, yb, t["W"], t.get("Wsc", dummy), t.get("U", dummy),
            t.get("DO", dummy), S_st, z_st,
            t.get("OUT", dummy), t.get("GOUT", dummy), t.get("ROUT", dummy),
            t.get("DX", dummy), t.get("DG", dummy), t.get("DB", dummy),
            self.T, self.H, self.D, Dv, xs, ys, self.NSEG, self.NCS, int(fm.pre.norm),
            int(attn.normalize), float(attn.scale), *self.C, float(attn.eps),
        )  # fmt: skip
        flags = dict(BC=self.BC, BD=self.BD, BV=BV, RF=self.RF, MODE=mode, HAS_WSC="Wsc" in t,
                     HAS_C2=self.C[2] != 0.0, DOT=self.dot, X3=carried and mode != 0,
                     num_warps=self.num_warps, **self.stages)  # fmt: skip
        grid = (self.NSEG, BH, triton_cdiv(Dv, BV))
        sweep_kernel[grid](*args, BA=self.BA, REVERSE=mode == 2, **flags)

    def canonical(self, full: torch.Tensor, cols: int | None) -> torch.Tensor:
        c = self.pack @ full  # [BH, F, cols]
        shape = (self.B, self.H, c.shape[1]) + ((cols,) if cols is not None else ())
        return c.reshape(shape)


def forward(x: Inputs, attn: LinearAttention, config: dict, final_state: bool = True) -> Outputs:
    """``o`` and the final state (canonical), or ``Outputs(o, None, None)`` without
    ``final_state`` (the states are summed either way: the walks start from them)."""
    call = _Call(x, attn, config, backward=False)
    Dv = call.Dv
    prefix = call.states(
        call.k, call.kg, call.kb, call.kg_stride, call.v, None,
        call.full(x.S0, Dv), call.full(x.z0, 1), reverse=False, handed=final_state,
    )  # fmt: skip
    o = torch.empty_like(call.v)
    BV = min(BLOCK_V, max(16, triton_next_pow2(Dv)))
    call.sweep(0, prefix, X=call.q, Y=call.k, W=call.v, OUT=o, BV=BV)
    if not final_state:
        return Outputs(o, None, None)
    (_, S_total), (_, z_total) = prefix
    return Outputs(o, call.canonical(S_total, Dv), call.canonical(z_total, None))


def backward(x: Inputs, attn: LinearAttention, config: dict, grads: Outputs) -> Inputs:
    call = _Call(x, attn, config, backward=True)
    B, T, H, Dv = call.B, call.T, call.H, call.Dv
    fm = attn.feature_map
    dev = call.q.device
    BV = max(16, triton_next_pow2(Dv))
    prefix = call.states(
        call.k, call.kg, call.kb, call.kg_stride, call.v, None,
        call.full(x.S0, Dv), call.full(x.z0, 1), reverse=False,
    )  # fmt: skip
    g = torch.empty(B, T, H, Dv, device=dev, dtype=torch.float32)
    r = torch.empty(B, T, H, device=dev, dtype=torch.float32)
    dq = torch.empty_like(call.q)
    partials = torch.empty(4, B * H, call.NSEG, call.BD, device=dev, dtype=torch.float32)
    dgq, dbq, dgk, dbk = partials  # d gamma / d beta sums: q's from the dq sweep, k's from dk/dv
    call.sweep(1, prefix, x.S0 is not None or x.z0 is not None, X=call.q, Y=call.k,
               W=call.v, DO=grads.o.contiguous(), GOUT=g, ROUT=r, DX=dq, DG=dgq, DB=dbq,
               BV=BV)  # fmt: skip
    suffix = call.states(
        call.q, call.qg, call.qb, call.qg_stride, g, r,
        call.full(grads.S, Dv), call.full(grads.z, 1), reverse=True,
    )  # fmt: skip
    dk = torch.empty_like(call.k)
    dv = torch.empty_like(call.v)
    carried = grads.S is not None or grads.z is not None
    call.sweep(2, suffix, carried, X=call.k, Y=call.q, W=g, Wsc=r, U=call.v, OUT=dv, DX=dk,
               DG=dgk, DB=dbk, BV=BV)  # fmt: skip
    (_, dS_total), (_, dz_total) = suffix
    has_state = x.S0 is not None
    return Inputs(
        dq,
        dk,
        dv,
        *param_grads(partials, B, H, call.D, x, fm.pre),
        call.canonical(dS_total, Dv).to(x.S0.dtype) if has_state else None,
        call.canonical(dz_total, None).to(x.z0.dtype) if has_state else None,
    )
