"""Host side of the ``packed`` variant (``packed.py``): D <= 16, 144 quadratic state rows.

Forward: (1) ``packed_state_kernel`` sums each segment's state, (2) ``launch.scan`` turns the
sums into exclusive prefixes (from the caller's initial state), (3) ``packed_sweep_kernel``
walks each segment from its prefix. Backward: the same, then the dq sweep (which stores
``1 / (den + eps)`` and ``r`` per token), the suffix states of ``(q, dO / (den + eps), r)``
and the reverse dk/dv sweep. One program covers all of Dv (the gradient sweeps need
``dO . out`` over the whole row), so scores are formed once per chunk.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

from rebased_kernels.backend import Inputs, Outputs
from rebased_kernels.spec import FeatureMap, LinearAttention, feature_layout, feature_weights

from .launch import (
    INTERPRET,
    call_warps,
    dot_precision,
    param_grads,
    params,
    scan,
    stages,
    triton_cdiv,
    triton_next_pow2,
)

RS, RZ = 161, 273  # state rows (S0 | S1 | SA | SB) and normaliser numbers (z0 | z1 | Z2)
NUM_WARPS = 4
"""packed and tiles: 4 warps unless the configuration names them (the backend's default
since session 7: packed at 4 warps was 1.8x faster forward+backward than walk at MQAR's T=256)."""
BWD_CHUNK = 32
HALF_SP = "fp16" if INTERPRET else "bf16"
"""State products of a state built from the call's own tokens, for bf16 inputs (fp16 under
the interpreter, which has no bfloat16; fp16 inputs take ``FP16_SP``: fp16 operands would
hold a long state out of range)."""
CARRIED_SP = "tf32"
"""State products when the state carries the caller's state (an initial state, a
final-state cotangent): an arbitrary state's entries need not average out as a sum of the
call's own features does; and in a forward that hands its final state to the caller, who
contracts it with later queries: bf16 operands rounded it to 2^-9 (the rule allows half
inputs' products 2^-11), and on an H100 (session 14, ``docs/results/h100-s14/``) a bf16
split run's o missed the kappa-scaled rule at 1.84e-2 against 1.48e-2 (packed 32 x 2, T = 2,
D = 8, Dv = 1, unnormalised)."""
CARRIED_GRAD_SP = "tf32x3"
"""State products of a gradient sweep whose state carries the caller's (an initial state in
the dq sweep, a final-state cotangent in dk/dv): ~fp32, three tf32 passes, as ``walk``'s
``X3``. There the state's part of a row's gradient meets the normaliser's (``U . S`` against
``u z``), terms that cancel; tf32 operands (``CARRIED_SP``) measured d gamma_Q 1.025e-2
against the 1e-2 rule on an H100 (session 18, ``docs/results/h100-s18/``: fp16, T = 1,
D = 8, Dv = 1, an initial state; packed 16 x2), and so does the interpreter since it rounds
tf32 operands as the tensor cores do (``kernels._dot_tf32_of``). Training's call carries no
state and never takes these. Their cost (ptxas, triton 3.6, sm_90a, 4 warps, x2): stack per
thread tiles 64 dq 608 -> 632 bytes, dk/dv 472 -> 824; packed 32 dq 1,080 -> 4,464, dk/dv
1,328 -> 5,040, so such a backward runs several times slower than one without a state."""
FP16_SP = "tf32"
"""State products of float16 inputs: tf32, as exact as their inputs. bf16 operands rounded
fp16's exact v and features to 8 bits (u = 2^-8 against the rule's 2^-11): on an H200
(session 11, ``docs/results/h200-s11/``) a split run's o failed the kappa-scaled tolerance at
1.98e-2 against 1.49e-2 (T = 2, kappa 30). bf16 inputs keep bf16 (``HALF_SP``)."""
FEATURES = ("onehot", "gather")
"""How the kernels form the 144 feature rows (``config["features"]``): one-hot products on
the tensor cores (measured on the H200), or loads of x gathered by column with the
pre-transform applied elementwise (``packed._pairs``; 1.5-2x slower on the H200, session 9).
Session 11 measured a third way and removed it: the full 256-row outer product built
elementwise in the state kernel and the tiles' state reads took tiles 64 x 4 x3 from 1.22 to
1.50 ms forward at T = 16384 (``docs/results/h200-s11/``)."""
BWD_SP = HALF_SP
"""State products of the gradient sweeps for half inputs: bf16, as in the forward. On the
H200 (``docs/results/h200-s6/``) they kept the oracle errors at 5.5e-3 (tf32: 4.6e-3; the
tolerance is 1e-2) and forward+backward at 16k took 14.1 ms against 15.7 (``tiles``: 16.7
against 19.0)."""


def _rows(idx: tuple[int, ...]) -> tuple[int, list[int], float, int, list[int]]:
    """Where the canonical multiset ``idx`` lives in the kernels' layout: ``(S row, every S
    row, w_d, Z entry, every Z entry)``; a pair at distance 8 has two S rows of weight 1
    (``x_i x_j``, ``x_j x_i``), an off-diagonal pair two Z entries (Z2 is symmetric); ``w_d``
    is the S row's weight relative to the unweighted product (sqrt 2 on block A's
    off-diagonal rows, else 1)."""
    if len(idx) < 2:
        r = 0 if not idx else 1 + idx[0]
        return r, [r], 1.0, r, [r]
    i, j = idx
    zs = sorted({17 + 16 * i + j, 17 + 16 * j + i})
    d = (j - i) % 16
    if d == 8:
        return 145 + i, [145 + i, 145 + j], 1.0, zs[0], zs
    if d > 8:
        i, d = j, 16 - d
    return 17 + 16 * d + i, [17 + 16 * d + i], 2**0.5 if d else 1.0, zs[0], zs


@lru_cache(maxsize=64)
def _packed_maps(fm: FeatureMap, D: int, scale: float, device: str) -> tuple[torch.Tensor, ...]:
    """``(unpack_S [RS, F], pack_S [F, RS], unpack_Z [RZ, F], pack_Z [F, RZ])``: canonical
    <-> kernel layout, ``pack @ unpack = I``. Feature f (multiset idx, weight ``w_f``) is
    ``w_f / w_d`` times its kernel row (``w_d = sqrt 2`` on block A's off-diagonal rows, else
    1); rows and Z entries a pair shares both get ``S_f / w_f`` (``Z2`` is symmetric). As in
    the ``walk`` variant the same pair maps gradients (``unpack`` a final-state cotangent into
    the reverse sweep, ``pack`` its total)."""
    layout = feature_layout(D, fm.powers)
    w = feature_weights(fm, D, scale)
    F = len(layout)
    uS, pS = torch.zeros(RS, F, dtype=torch.float64), torch.zeros(F, RS, dtype=torch.float64)
    uZ, pZ = torch.zeros(RZ, F, dtype=torch.float64), torch.zeros(F, RZ, dtype=torch.float64)
    for f, ((idx, _), wf) in enumerate(zip(layout, w)):
        srow, srows, wd, zrow, zrows = _rows(idx)
        uS[srows, f] = wd / wf
        pS[f, srow] = wf / wd
        uZ[zrows, f] = 1.0 / wf
        pZ[f, zrow] = wf
    return tuple(t.to(device, torch.float32) for t in (uS, pS, uZ, pZ))


TILES_STATE = {"state_rows": 128, "state_chunk": 128, "state_warps": 8}
"""``tiles``' own state kernel (where a configuration leaves these None): one program per
segment for the quadratic block, 128 tokens per product, 8 warps (4 spill 1.1 KB per thread:
ptxas, triton 3.6, sm_90a). On the H200 (session 10, ``docs/results/h200-s10/``) it took
tiles 64 x 4 x3 from 1.52 to 1.29 ms forward and 11.66 to 10.58 ms forward+backward at
T = 16384, 0.51 to 0.30 / 2.00 to 1.75 ms at 2048. ``packed`` keeps 32 rows of its chunk at
the call's warps: the wide kernel was faster forward there too, slower forward+backward at
2048."""


STATE_FUSED = False
"""``config["state_fused"]`` (with ``state_rows`` 128): one state-kernel program per segment
sums block A and the rest from one load of each chunk (``packed.packed_state_kernel``'s
``FUSED``), half the programs of the default split. ptxas (triton 3.6, sm_90a, 8 warps):
255 registers and no spill at ``state_chunk`` 64 (520 bytes of spill at 128), against 234 /
163 for the split kernel's block-A program; not yet timed on a GPU, so off by default."""
SEGMENT_HALF = False
"""``config["segment_half"]``: where a ``tiles`` call's prefix states are half (own tokens'
states, ``HALF_SP``) and no total leaves the call, the state kernel stores each segment's S
in that half type too (z stays fp32) and the scan sums in fp32: half the bytes of the
per-segment sums, which the prefix kernel is bound by (73% of DRAM bandwidth in session 12's
ncu). Each segment's sum rounds once more (2^-9 in bf16) before the prefix rounds again.
Not yet timed or run on a GPU, so off by default."""
TILES_STAGES = 1
"""``tiles``' tile kernels' pipelining depth where a configuration leaves ``num_stages`` None
(its state kernel keeps Triton's default). On an H100 (session 14, ``docs/results/h100-s14/``,
64 x 4 at T = 16384) one stage took the forward tile kernel from 480 to 423 us (168
registers instead of 195: 3 programs per SM) and the two gradient tile kernels from ~5.4 to
5.0 ms, while one stage slowed the state kernel from 328 to 395 us, hence no default there."""


def _block_rows(config: dict, key: str) -> int:
    """``config[key]`` (``state_rows`` / ``tile_rows``): rows of block A per product, one of
    ``packed.FB_CHOICES`` (default ``FB_ROWS``)."""
    from .packed import FB_CHOICES, FB_ROWS

    n = config.get(key)
    n = FB_ROWS if n is None else n
    if n not in FB_CHOICES:
        raise ValueError(f"triton {key} {n!r} is not one of {FB_CHOICES}")
    return int(n)


def _state_chunk(config: dict, chunk: int) -> int:
    """``config["state_chunk"]``: the state kernel's chunk (rows per product), a power of two
    in [16, 256]; the call's chunk when absent or None."""
    n = config.get("state_chunk")
    if n is None:
        return chunk
    if n not in (16, 32, 64, 128, 256):
        raise ValueError(f"triton state_chunk {n!r} is not a power of two in [16, 256]")
    return int(n)


class PackedCall:
    """Launch arguments shared by the kernels of one call."""

    def __init__(self, x: Inputs, attn: LinearAttention, config: dict, backward: bool) -> None:
        fm = attn.feature_map
        self.B, self.T, self.H, self.D = x.q.shape
        self.Dv = x.v.shape[3]
        self.tiles = config.get("variant") == "tiles"
        # the walks' gradient sweeps keep more tiles on chip; the tiles keep no state there
        self.BC = BWD_CHUNK if backward and not self.tiles else int(config["chunk_size"])
        self.NCS = int(config["chunks_per_segment"])
        self.NCH = triton_cdiv(self.T, self.BC)
        self.NSEG = triton_cdiv(self.NCH, self.NCS)
        self.BV = max(16, triton_next_pow2(self.Dv))
        variant = "tiles" if self.tiles else "packed"
        self.num_warps = call_warps(config, NUM_WARPS, variant, x.v.dtype, backward and x.q.is_cuda)
        self.attn, self.fm, self.backward = attn, fm, backward
        self.C = fm.quadratic_coeffs
        self.dot = dot_precision(x.v.dtype, backward, config.get("exact", "fma"), x.q.is_cuda)
        self.q, self.k, self.v = x.q.contiguous(), x.k.contiguous(), x.v.contiguous()
        H, D, dev = self.H, self.D, x.q.device
        self.qg, self.qb, self.qg_stride = params(x.q_weight, x.q_bias, fm.pre, H, D, dev)
        self.kg, self.kb, self.kg_stride = params(x.k_weight, x.k_bias, fm.pre, H, D, dev)
        self.uS, self.pS, self.uZ, self.pZ = _packed_maps(fm, D, float(attn.scale), str(dev))
        lin = self.C[0] != 0.0 or self.C[1] != 0.0
        features = config.get("features", "onehot")
        if features not in FEATURES:
            raise ValueError(f"triton features {features!r} are not one of {FEATURES}")
        self.flags = dict(HAS_LIN=lin, HAS_C2=self.C[2] != 0.0, GATHER=features == "gather",
                          num_warps=self.num_warps)  # fmt: skip
        own = {k: v for k, v in config.items() if k in TILES_STATE and v is not None}
        if self.tiles:  # the variant's own state kernel where the configuration names none
            own = {**TILES_STATE, **own}
        self.state_rows = _block_rows(own, "state_rows")
        self.tile_rows = _block_rows(config, "tile_rows")
        # the state kernel's chunk divides the segment: gcd(state_chunk, NCS * BC)
        self.BCS = math.gcd(_state_chunk(own, self.BC), self.NCS * self.BC)
        self.state_warps = int(own.get("state_warps") or self.num_warps)
        self.state_fused = bool(config.get("state_fused"))
        self.segment_half = bool(config.get("segment_half"))
        onepass = config.get("dq_onepass")  # None: tiles' own (one pass, session 21)
        self.dq_onepass = self.tiles if onepass is None else bool(onepass)
        if self.dq_onepass and not self.tiles:
            raise ValueError("triton dq_onepass is a tiles configuration key")
        if self.state_fused and self.state_rows != 128:
            raise ValueError(f"triton state_fused takes state_rows 128, not {self.state_rows}")
        self.stages = stages(config, "num_stages")  # the sweep / tile kernels'
        if self.tiles and config.get("num_stages") is None:
            self.stages = {"num_stages": TILES_STAGES}
        self.state_stages = stages(config, "state_stages")

    def even(self, rows: int) -> bool:
        """Whether a kernel that steps through T in blocks of ``rows`` may drop its masks
        (``kernels._below``): T a multiple of ``rows``, D = 16, Dv = BV."""
        return self.T % rows == 0 and self.D == 16 and self.Dv == self.BV

    def sp(self, carried: bool, sweep: bool = False) -> str:
        """The state products' operands: exact for fp32 inputs, ``CARRIED_SP`` when the state
        starts from the caller's (``carried``; ``CARRIED_GRAD_SP`` in a gradient ``sweep``),
        ``FP16_SP`` for fp16 inputs, else ``BWD_SP`` / ``HALF_SP``."""
        if self.dot == "ieee":
            return "ieee"
        if carried:
            return CARRIED_GRAD_SP if sweep and self.backward else CARRIED_SP
        if self.v.dtype == torch.float16:
            return FP16_SP
        return BWD_SP if self.backward else HALF_SP

    def kernel_state(self, S: torch.Tensor | None, z: torch.Tensor | None):
        """A canonical state ``(S [B, H, F, Dv], z [B, H, F])`` in the kernels' layout
        ``([B*H, RS, Dv], [B*H, RZ, 1])``; None for none."""
        if S is None and z is None:
            return None, None
        BH, Dv = self.B * self.H, self.Dv
        S_k = None if S is None else self.uS @ S.to(torch.float32).reshape(BH, -1, Dv)
        z_k = None if z is None else self.uZ @ z.to(torch.float32).reshape(BH, -1, 1)
        return S_k, z_k

    def canonical(self, S_k: torch.Tensor, z_k: torch.Tensor) -> tuple[torch.Tensor, ...]:
        S = (self.pS @ S_k).reshape(self.B, self.H, -1, self.Dv)
        return S, (self.pZ @ z_k).reshape(self.B, self.H, -1)

    def states(self, y, yg, yb, ys, W, WS, Wsc, init: tuple, reverse: bool,
               total: bool = True):  # fmt: skip
        """``((prefix S [BH, NSEG, RS, Dv], total), (prefix z, total))``: the exclusive prefix
        (suffix when ``reverse``) of the segments' states from ``init`` (canonical; a state
        given there is carried, and so is a forward's total: ``sp``, ``CARRIED_SP``). Without
        ``total`` (None then) a call of one segment per sequence and no ``init`` has a zero
        prefix: nothing is launched and the prefixes are None too (the sweeps start from zero,
        ``sweep``)."""
        if not total and self.NSEG == 1 and init[0] is None and init[1] is None:
            return (None, None), (None, None)
        handed = total and not self.backward  # a forward's final state goes to the caller
        sp = self.sp(init[0] is not None or init[1] is not None or handed)
        half = self.tiles and sp in ("bf16", "fp16")  # the tiles read S as dot operands
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[sp] if half else torch.float32
        BH, Dv, dev = self.B * self.H, self.Dv, y.device
        from .packed import packed_state_kernel

        # half per-segment sums where the prefix is half and no total leaves the call
        seg_dtype = dtype if self.segment_half and not total else torch.float32
        seg_S = torch.empty(BH, self.NSEG, RS, Dv, device=dev, dtype=seg_dtype)
        seg_z = torch.empty(BH, self.NSEG, RZ, 1, device=dev, dtype=torch.float32)
        ncs = self.NCS * self.BC // self.BCS  # the state kernel's chunks per segment
        programs = 1 if self.state_fused else 128 // self.state_rows + 1
        packed_state_kernel[(self.NSEG, BH, programs)](
            y, yg, yb, W, W if WS is None else WS, W if Wsc is None else Wsc, seg_S, seg_z,
            self.T, self.H, self.D, Dv, ys, self.NSEG, ncs, int(self.fm.pre.norm),
            BC=self.BCS, BV=self.BV, HAS_WS=WS is not None, HAS_WSC=Wsc is not None, SP=sp,
            FB=self.state_rows, EVEN=self.even(self.NCS * self.BC), FUSED=self.state_fused,
            **{**self.flags, "num_warps": self.state_warps, **self.state_stages},
        )  # fmt: skip
        S0, z0 = self.kernel_state(*init)
        return scan(seg_S, S0, reverse, dtype), scan(seg_z, z0, reverse)

    def sweep(self, mode: int, states, carried: bool, **t) -> None:
        """``packed_sweep_kernel`` (``packed_tile_kernel`` for ``tiles``) in mode 0
        (forward), 1 (dq) or 2 (dk, dv) from ``states`` (``carried``: they start from the
        caller's state); ``t``: the tensors by kernel argument name."""
        from .packed import packed_sweep_kernel, packed_tile_kernel

        fm, attn, dummy = self.fm, self.attn, self.v
        q, k = (self.qg, self.qb, self.qg_stride), (self.kg, self.kb, self.kg_stride)
        (xg, xb, xs), (yg, yb, ys) = (k, q) if mode == 2 else (q, k)  # rows, columns
        (S_st, _), (z_st, _) = states
        prefix = S_st is not None  # None: one segment from zero (``states``)
        if not prefix:
            S_st = z_st = dummy
        args = [t.get(n, dummy) for n in ("X", "Y", "W", "WS", "Wsc", "U", "DO")]
        out = [t.get(n, dummy) for n in ("OUT", "INV", "ROUT", "DX", "DG", "DB")]
        if self.tiles:
            state = carried or self.NSEG > 1  # else every program skips the state
            kernel, n = packed_tile_kernel, self.NCH
            extra = dict(HAS_INIT=carried, STATE=state, FB=self.tile_rows, EVEN=self.even(self.BC),
                         ONEPASS=mode == 1 and self.dq_onepass)  # fmt: skip
        else:
            kernel, n, extra = packed_sweep_kernel, self.NSEG, dict(PREFIX=prefix)
        kernel[(n, self.B * self.H)](
            args[0], xg, xb, args[1], yg, yb, *args[2:], S_st, z_st, *out,
            self.T, self.H, self.D, self.Dv, xs, ys, self.NSEG, self.NCS, int(fm.pre.norm),
            int(attn.normalize), float(attn.scale), *self.C, float(attn.eps),
            BC=self.BC, BV=self.BV, MODE=mode, HAS_WS="WS" in t, HAS_WSC="Wsc" in t,
            DOT=self.dot, SP=self.sp(carried, sweep=True), **self.flags, **self.stages, **extra,
        )  # fmt: skip

    def partials(self) -> int:
        """d gamma / d beta partial sums a gradient sweep leaves per (b, h): one per segment
        (``packed``) or per chunk (``tiles``)."""
        return self.NCH if self.tiles else self.NSEG


def forward(x: Inputs, attn: LinearAttention, config: dict, final_state: bool = True) -> Outputs:
    """``o`` and, with ``final_state``, the final state in the canonical layout; without it
    ``Outputs(o, None, None)`` (``states`` then skips what nothing reads)."""
    call = PackedCall(x, attn, config, backward=False)
    prefix = call.states(call.k, call.kg, call.kb, call.kg_stride, call.v, None, None,
                         (x.S0, x.z0), reverse=False, total=final_state)  # fmt: skip
    o = torch.empty_like(call.v)
    call.sweep(0, prefix, x.S0 is not None, X=call.q, Y=call.k, W=call.v, OUT=o)
    if not final_state:
        return Outputs(o, None, None)
    (_, S_total), (_, z_total) = prefix
    return Outputs(o, *call.canonical(S_total, z_total))


def backward(x: Inputs, attn: LinearAttention, config: dict, grads: Outputs) -> Inputs:
    fm = attn.feature_map
    carried_in, carried_out = x.S0 is not None, grads.S is not None or grads.z is not None
    call = PackedCall(x, attn, config, backward=True)
    B, T, H = call.B, call.T, call.H
    dev = call.q.device
    # the prefix totals are the forward's final state: the backward never reads them
    prefix = call.states(call.k, call.kg, call.kb, call.kg_stride, call.v, None, None,
                         (x.S0, x.z0), reverse=False, total=False)  # fmt: skip
    inv = torch.empty(B, T, H, device=dev, dtype=torch.float32)
    r = torch.empty_like(inv)
    dq = torch.empty_like(call.q)
    partials = torch.empty(4, B * H, call.partials(), 16, device=dev, dtype=torch.float32)
    dgq, dbq, dgk, dbk = partials  # d gamma / d beta sums: q's from the dq sweep, k's from dk/dv
    dO = grads.o.contiguous()
    call.sweep(1, prefix, carried_in, X=call.q, Y=call.k, W=call.v, DO=dO, INV=inv, ROUT=r,
               DX=dq, DG=dgq, DB=dbq)  # fmt: skip
    suffix = call.states(call.q, call.qg, call.qb, call.qg_stride, dO, inv, r,
                         (grads.S, grads.z), reverse=True, total=carried_in)  # fmt: skip
    dk, dv = torch.empty_like(call.k), torch.empty_like(call.v)
    call.sweep(2, suffix, carried_out, X=call.k, Y=call.q, W=dO, WS=inv, Wsc=r, U=call.v,
               OUT=dv, DX=dk, DG=dgk, DB=dbk)  # fmt: skip
    (_, dS_total), (_, dz_total) = suffix
    dS0, dz0 = call.canonical(dS_total, dz_total) if carried_in else (None, None)
    pre = fm.pre
    return Inputs(
        dq, dk, dv,
        *param_grads(partials, B, H, call.D, x, pre),
        None if dS0 is None else dS0.to(x.S0.dtype),
        None if dz0 is None else dz0.to(x.z0.dtype),
    )  # fmt: skip
