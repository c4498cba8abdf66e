"""Host side of the TileLang kernels: pad the operands, pass the runtime scalars, launch,
map the state.

``forward`` runs ``kernels.forward_kernel`` and ``backward`` the two sweeps of ``backward``
(``dq_kernel``, then ``dkv_kernel``) on CUDA tensors through TileLang's CUDA target and on
CPU tensors through its C target (the tests' path on a machine without a GPU), each
compiled once per ``build.CompileKey`` (kind, BV, ``options.KernelOptions``). What the key
leaves out is given at launch: B, T and H as the tensors' sizes, and ``scalars`` (``w_p =
c_p scale^p``, eps and D) as scalar arguments. The kernels take 16 feature columns and BV
value columns (16, 32, 48 or 64 in fp32, 32 or 64 in bf16 / fp16:
``layout.padded_value_dim``): ``_operands`` pads q, k (D < 16) and v, dO with zero columns,
copying nothing where D = 16 and Dv is a bucket, and the outputs are cut back. The kernel's
state (``layout``: one unscaled, unpacked block per
power, stacked into ``S [B, H, R, BV]`` and ``z [B, H, R]``) and the spec's canonical
layout are mapped into each other here: ``kernel_state`` (canonical -> kernel, for an
initial state) and ``canonical_state`` (kernel -> canonical, for the final state), exact
inverses on the canonical space. Their adjoints carry the state's cotangents: the final
state's cotangent enters the dk/dv sweep through ``kernel_state`` itself (in the sweep's
``dS_p / w_p`` convention) and the initial state's gradient leaves it through
``state_gradient``.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from rebased_kernels.backend import Inputs, Outputs, Problem
from rebased_kernels.spec import FeatureMap, LinearAttention, feature_layout, feature_weights

from .build import (
    compile_key,
    compiled,
    forward_variant,
    kernel_dtype,
    tile_segment,
    unsupported_reason,
)
from .layout import DK, block_offsets, block_row, padded_value_dim
from .options import Scalars
from .split import Split, exclusive_scan, segment


def scalars(attn: LinearAttention, D: int) -> Scalars:
    """The kernels' runtime scalars (``options.Scalars``): ``w_p = c_p scale^p`` in float64
    (0 for an absent power; the launch rounds them to float32 once), ``attn.eps`` and D."""
    coeffs = attn.feature_map.coeffs
    w = [coeffs[p] * attn.scale**p if p < len(coeffs) else 0.0 for p in range(3)]
    return Scalars(*w, attn.eps, D)


def _kernel(kind: str, x: Inputs, attn: LinearAttention, config: dict | None, state: bool,
            carried: bool | None = None, wide: bool = False):  # fmt: skip
    """``build.compiled`` for this call's ``build.compile_key`` (``state``, ``carried``,
    ``wide`` as there); raises ``ValueError`` for what ``build.unsupported_reason`` names."""
    return compiled(*compile_key(kind, _problem(x, attn), state, config, carried, wide))


def _check(x: Inputs, attn: LinearAttention) -> None:
    """Raises ``ValueError`` for what ``build.unsupported_reason`` names, before any buffer."""
    reason = unsupported_reason(attn, x.q.shape[-1], x.v.shape[-1], x.v.dtype)
    if reason:
        raise ValueError(f"the tilelang kernels {reason}")


@functools.cache
def _rows(fm: FeatureMap, D: int) -> tuple[list[int], list[int]]:
    """For each canonical feature ``x'_{i_1} ... x'_{i_p}``, its row in the kernel's stacked
    state and the row of the same multiset in reverse order (``16 b + a`` for ``(a, b)``)."""
    offsets, _ = block_offsets(fm.powers)
    layout = feature_layout(D, fm.powers)
    rows = [offsets[len(idx)] + block_row(idx) for idx, _ in layout]
    mirrors = [offsets[len(idx)] + block_row(idx[::-1]) for idx, _ in layout]
    return rows, mirrors


def canonical_state(
    S: torch.Tensor, z: torch.Tensor, attn: LinearAttention, D: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's state ``(S [B, H, R, Dv], z [B, H, R])`` in the spec's layout:
    ``(S [B, H, F, Dv], z [B, H, F])``, float32.

    Feature ``x'_{i_1} ... x'_{i_p}`` (``i_1 <= ... <= i_p``) is ``sqrt(c_p scale^p m) x^(p)_r``
    with ``r`` its row (``16 a + b`` for ``(a, b)``, ``a`` for ``(a,)``, the ``x^(0)`` row for
    ``()``; ``m`` = 2 off the diagonal), so its rows of S and z are the kernel's row ``r``
    times that weight (computed in float64, then rounded once).
    """
    rows, _ = _rows(attn.feature_map, D)
    index = torch.tensor(rows, device=S.device)
    w = torch.tensor(feature_weights(attn.feature_map, D, attn.scale), device=S.device)
    S_c = S[:, :, index].double() * w[:, None]
    z_c = z[..., index].double() * w
    return S_c.float(), z_c.float()


def kernel_state(
    S: torch.Tensor, z: torch.Tensor, attn: LinearAttention, D: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of ``canonical_state``: a canonical ``(S [B, H, F, Dv], z [B, H, F])`` in
    the kernel's layout ``(S [B, H, R, Dv], z [B, H, R])``, float64.

    Feature ``(a, b)`` fills both of its rows ``16 a + b`` and ``16 b + a`` (the kernel's
    ``x' (x) x'`` rows are symmetric), divided by its weight; the rows of padding columns
    ``a >= D`` are zero. ``canonical_state(*kernel_state(S, z))`` is ``(S, z)`` bit for bit for
    float32 states (the division stays in float64 here; the caller rounds for the kernel).
    """
    B, H, _, Dv = S.shape
    rows, mirrors = _rows(attn.feature_map, D)
    _, R = block_offsets(attn.feature_map.powers)
    w = torch.tensor(feature_weights(attn.feature_map, D, attn.scale), device=S.device)
    S_k = S.new_zeros(B, H, R, Dv, dtype=torch.float64)
    z_k = z.new_zeros(B, H, R, dtype=torch.float64)
    for index in (rows, mirrors):
        index = torch.tensor(index, device=S.device)
        S_k[:, :, index] = S.double() / w[:, None]
        z_k[..., index] = z.double() / w
    return S_k, z_k


def state_gradient(
    S: torch.Tensor, z: torch.Tensor, attn: LinearAttention, D: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The adjoint of ``kernel_state``: the gradient of a canonical initial state
    ``(dS0 [B, H, F, Dv], dz0 [B, H, F])``, float32, from the dk/dv sweep's
    ``(Sg [B, H, R, Dv], zr [B, H, R])`` (``Sg_p = dL/dS_p / w_p`` in the kernel's layout).

    ``kernel_state`` writes feature ``f`` of power p into its rows ``r`` and ``m`` (its mirror;
    the same row on the diagonal) divided by ``sqrt(w_p mult_f)``, so
    ``dS0_f = w_p (Sg_r + Sg_m) / sqrt(w_p mult_f)`` summed over the distinct rows, which is
    ``weight_f * mean(Sg_r, Sg_m)`` in both cases: ``canonical_state`` of the row pairs'
    mean (computed in float64, rounded once).
    """
    rows, mirrors = _rows(attn.feature_map, D)
    index, mirror = torch.tensor(rows, device=S.device), torch.tensor(mirrors, device=S.device)
    w = torch.tensor(feature_weights(attn.feature_map, D, attn.scale), device=S.device)
    dS0 = (S[:, :, index].double() + S[:, :, mirror].double()) * (w[:, None] / 2)
    dz0 = (z[..., index].double() + z[..., mirror].double()) * (w / 2)
    return dS0.float(), dz0.float()


def _params(x: Inputs, attn: LinearAttention) -> list[torch.Tensor]:
    """``qw, qb, kw, kb`` as the kernels take them: ``[H, 16]`` float32 (zero past D), gamma 1
    and beta 0 where the feature map does not use them."""
    pre, (_, _, H, D), dev = attn.feature_map.pre, x.q.shape, x.q.device

    def param(t: torch.Tensor | None, used: bool, fill: float) -> torch.Tensor:
        if t is None or not used:
            return _identity_param(fill, H, D, str(dev))
        return _pad(t.to(torch.float32).expand(H, D), DK).contiguous()

    return [
        param(x.q_weight, pre.uses_gamma, 1.0),
        param(x.q_bias, pre.uses_beta, 0.0),
        param(x.k_weight, pre.uses_gamma, 1.0),
        param(x.k_bias, pre.uses_beta, 0.0),
    ]


@functools.lru_cache(maxsize=32)
def _identity_param(fill: float, H: int, D: int, device: str) -> torch.Tensor:
    """``[H, 16]`` float32, ``fill`` in the first D columns and 0 past them: an unused gamma
    (1) or beta (0), made once per shape and device instead of on every call (the kernels
    only read it)."""
    return _pad(torch.full((H, D), fill, dtype=torch.float32, device=device), DK).contiguous()


def _pad(t: torch.Tensor, n: int) -> torch.Tensor:
    """``t`` with its last dim zero-padded to ``n`` columns (``t`` itself when it has n)."""
    return t if t.shape[-1] == n else torch.nn.functional.pad(t, (0, n - t.shape[-1]))


def _cut(t: torch.Tensor, n: int) -> torch.Tensor:
    """``t[..., :n]``, contiguous (``t`` itself when it has n columns)."""
    return t if t.shape[-1] == n else t[..., :n].contiguous()


def _state_in(S, z, attn: LinearAttention, B: int, H: int, D: int, Dv: int, v: torch.Tensor):
    """A canonical state (either part may be None: zeros) in the kernel's layout
    ``[B, H, R, BV]``, ``[B, H, R]``, float32, contiguous, its columns >= Dv zero; empty
    buffers (to be written) when both are None; BV and the device are the operand v's."""
    _, R = block_offsets(attn.feature_map.powers)
    BV, device = v.shape[-1], v.device
    if S is None and z is None:
        return (torch.empty(B, H, R, BV, dtype=torch.float32, device=device),
                torch.empty(B, H, R, dtype=torch.float32, device=device))  # fmt: skip
    F = attn.feature_map.num_features(D)
    S = torch.zeros(B, H, F, Dv, device=device) if S is None else S
    z = torch.zeros(B, H, F, device=device) if z is None else z
    S_k, z_k = kernel_state(S, z, attn, D)
    return _pad(S_k.float(), BV).contiguous(), z_k.float().contiguous()


def _operands(
    x: Inputs, *extra: torch.Tensor, dtype: torch.dtype | None = None, tiles: bool = False
) -> list[torch.Tensor]:
    """q, k ``[B, T, H, 16]`` and v (then each of ``extra``, shaped like v) ``[B, T, H, BV]``
    as the kernels take them: in ``dtype`` (v's when None), contiguous, zero in the columns
    past D and Dv (one copy where a column is padded or a dtype converted, none otherwise);
    ``tiles``: BV as the tile kernels take it (``layout.padded_value_dim``)."""
    dtype = x.v.dtype if dtype is None else dtype
    BV = padded_value_dim(x.v.shape[-1], dtype.itemsize, tiles)
    qk = [_pad(t.to(dtype), DK).contiguous() for t in (x.q, x.k)]
    return qk + [_pad(t.to(dtype), BV).contiguous() for t in (x.v, *extra)]


def forward(x: Inputs, attn: LinearAttention, config: dict[str, Any] | None = None) -> Outputs:
    """Causal linear attention through the TileLang kernel (see ``kernels``).

    ``x.q, x.k [B, T, H, D]``, ``x.v [B, T, H, Dv]`` (bf16 / fp16 / fp32, T >= 1) on a CUDA
    device or the CPU, optionally an initial state ``x.S0 [B, H, F, Dv]``, ``x.z0 [B, H, F]``
    (canonical layout; rounded to float32 in the kernel's); returns ``o [B, T, H, Dv]`` in
    v's dtype and the final state ``S [B, H, F, Dv]``, ``z [B, H, F]`` (float32, canonical
    layout), for any ``sim = c0 + c1 s + c2 s^2`` and ``attn.normalize`` either way. Raises
    ``ValueError`` for what ``build.unsupported_reason`` names. The kernel takes 16 feature
    columns and a multiple of 16 value columns: q, k (D < 16) and v (Dv not a multiple of
    16) are copied with zero columns added where they have fewer (none at D = 16, Dv = 64).
    A sequence longer than the configuration's ``segment`` (``split.Split``) is walked by one
    program per segment: ``state_kernel`` sums each segment's state, a torch scan (on the
    device) turns the sums into each segment's initial state and their total, and
    ``forward_kernel`` walks every segment from its own; the tail (T past the last whole
    segment) from the total.
    """
    (B, T, H, D), Dv = x.q.shape, x.v.shape[-1]
    _check(x, attn)
    carried = x.S0 is not None
    tiles = forward_variant(config) == "tiles"
    # [B, T, H, 16] twice, [B, T, H, BV]; widened to fp32 when a state is read (kernel_dtype)
    q, k, v = _operands(x, dtype=kernel_dtype("forward", x.v.dtype, carried), tiles=tiles)
    params, sc = _params(x, attn), scalars(attn, D)
    S, z = _state_in(x.S0, x.z0, attn, B, H, D, Dv, v)  # [B, H, R, BV], [B, H, R]
    if tiles:
        o, S, z = _tile_forward(x, attn, config, q, k, v, params, sc, S, z)
        return Outputs(_cut(o, Dv).to(x.v.dtype), *canonical_state(S[..., :Dv], z, attn, D))
    sp = Split(B, T, segment(config, x.q.device, B * H, T))
    outs = []
    if sp.n:
        body, sums = [sp.body(t) for t in (q, k, v)], sp.empty_states(S, z)
        _kernel("state", x, attn, config, False, carried)(*body, *params, *sc, body[2], *sums)
        (S_b, S), (z_b, z) = (sp.scan(t, t0 if carried else None) for t, t0 in zip(sums, (S, z)))
        o_b = sp.empty_body(v)
        _kernel("forward", x, attn, config, True, carried)(*body, *params, *sc, o_b, S_b, z_b)
        outs.append(o_b)
    if sp.rem:
        o_t = sp.empty_tail(v)
        _kernel("forward", x, attn, config, carried or sp.n > 0, carried)(
            *map(sp.tail, (q, k, v)), *params, *sc, o_t, S, z)  # reads S, z if any  # fmt: skip
        outs.append(o_t)
    o = _cut(sp.join(outs), Dv).to(x.v.dtype)
    return Outputs(o, *canonical_state(S[..., :Dv], z, attn, D))


def _segment_sums(launch, sp: Split, NS: int, rows: list[torch.Tensor], S: torch.Tensor,
                  z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Each segment's own sums ``[B, NS, ...]`` (shaped like ``S [B, ...]``, ``z``): ``launch(
    rows', S', z')`` (a state or cotangent walk from zero) on the whole segments as a batch
    (``rows'``: ``sp.body`` of each of ``rows``) and on the tail past them as another."""
    B, parts = sp.B, []
    if sp.n:
        sums = sp.empty_states(S, z)  # [B n, ...]
        launch([sp.body(t) for t in rows], *sums)
        parts.append([t.view(B, sp.n, *t.shape[1:]) for t in sums])
    if sp.rem:
        own = torch.empty_like(S), torch.empty_like(z)  # [B, ...]
        launch([sp.tail(t) for t in rows], *own)
        parts.append([t[:, None] for t in own])
    S_own, z_own = (p[0] if len(parts) == 1 else torch.cat(p, 1) for p in zip(*parts))
    assert S_own.shape[1] == NS
    return S_own, z_own


def _tile_starts(x: Inputs, attn: LinearAttention, config: dict | None, kind: str, q, k, v,
                 params, sc, S: torch.Tensor, z: torch.Tensor):  # fmt: skip
    """The segments of tile kernel ``kind`` (``build.tile_segment`` tokens at its compile
    key's chunk length BC) and their starts: ``(L, ceil(T / BC), (starts, zstarts), (S, z))``,
    each segment's own state sum (``state_kernel`` on the whole segments, then the tail, on
    the kernel's operands: the forward's, or the sweeps' fp32 for ``tile_dq``) scanned from
    the caller's state ``S, z`` (kernel layout; unread when there is none) into
    ``[B, NS, H, R, BV]`` starts and their total ``[B, H, R, BV]`` (the final state)."""
    (B, T), carried = q.shape[:2], x.S0 is not None
    BC = compile_key(kind, _problem(x, attn), carried, config).opt.BC
    L = tile_segment(config, BC)
    sp, wide = Split(B, T, L), kind != "tile"

    def launch(rows, S_out, z_out):
        _kernel("state", x, attn, config, False, carried, wide)(*rows, *params, *sc, rows[2],
                                                                 S_out, z_out)  # fmt: skip

    own = _segment_sums(launch, sp, -(-T // L), [q, k, v], S, z)
    (starts, S), (zstarts, z) = (exclusive_scan(t, t0 if carried else None)
                                 for t, t0 in zip(own, (S, z)))  # fmt: skip
    return L, -(-T // BC), (starts.flatten(0, 1), zstarts.flatten(0, 1)), (S, z)


def _tile_forward(x: Inputs, attn: LinearAttention, config: dict | None, q, k, v, params, sc,
                  S: torch.Tensor, z: torch.Tensor):  # fmt: skip
    """``forward`` with ``config["forward"] = "tiles"`` (``tile``): returns o ``[B, T, H, BV]``
    and the final state in the kernel's layout: the segments' starts (``_tile_starts``), then
    one tile program per chunk over the unsplit q, k, v."""
    L, _, starts, (S, z) = _tile_starts(x, attn, config, "tile", q, k, v, params, sc, S, z)
    o = torch.empty_like(v)  # [B, T, H, BV]
    _kernel("tile", x, attn, config, x.S0 is not None)(q, k, v, *params, *sc, L, o, *starts)
    return o, S, z


def _tile_backward(x: Inputs, attn: LinearAttention, config: dict | None, grads: Outputs,
                   q, k, v, do, params, sc) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """``backward``'s kernels with ``config["forward"] = "tiles"`` (``tile_backward``):
    returns ``(dq, dk, dv, dqw, dqb, dkw, dkb, Sg, zr)`` as ``backward`` assembles them (the
    parameter gradients per program, ``(Sg, zr)`` the initial state's gradient in the kernel's
    layout). The segments' starts as the tile forward's on the sweeps' operands; the dq
    programs (storing 1 / (den + eps) and r); the segments' own cotangent sums
    (``cotangent_kernel`` from zero) scanned in reverse from the final state's cotangent into
    each segment's end; the dk/dv programs."""
    (B, T, H, _), dev = q.shape, q.device
    carried, cot = x.S0 is not None, grads.S is not None or grads.z is not None
    D, Dv = x.q.shape[-1], x.v.shape[-1]
    S, z = _state_in(x.S0, x.z0, attn, B, H, D, Dv, v)  # [B, H, R, BV], [B, H, R]
    L, NC, starts, _ = _tile_starts(x, attn, config, "tile_dq", q, k, v, params, sc, S, z)
    sp = Split(B, T, L)
    new = torch.empty if attn.feature_map.degree >= 1 else torch.zeros  # sim = c0: no dq, dk
    g = {n: new(B * NC, H, DK, dtype=torch.float32, device=dev) for n in PARAM_GRADS}
    inv, r = (torch.empty(B, T, H, dtype=torch.float32, device=dev) for _ in range(2))
    dq = new(q.shape, dtype=q.dtype, device=dev)
    _kernel("tile_dq", x, attn, config, carried)(
        q, k, v, do, *params, *sc, L, *starts, dq, g["dqw"], g["dqb"], inv, r)  # fmt: skip

    Sg, zr = _state_in(grads.S, grads.z, attn, B, H, D, Dv, v)  # [B, H, R, BV], [B, H, R]

    def cotangent(rows, S_out, z_out):
        # dk, dv, dkw, dkb stay unwritten (cotangent_kernel): k and v stand in for dk and dv
        # (no buffers of their size allocated for nothing; k's and v's shapes and dtypes)
        unwritten = [rows[1], rows[2]] + [
            torch.empty(rows[0].shape[0], H, DK, device=dev) for _ in range(2)
        ]
        _kernel("cotangent", x, attn, config, False)(*rows[:4], *params, *sc, *rows[4:], S_out,
                                                      z_out, *unwritten)  # fmt: skip

    own = _segment_sums(cotangent, sp, -(-T // L), [q, k, v, do, inv, r], Sg, zr)
    (ends, Sg), (zends, zr) = (exclusive_scan(t, t0 if cot else None, reverse=True)
                               for t, t0 in zip(own, (Sg, zr)))  # fmt: skip
    dk, dv = new(k.shape, dtype=k.dtype, device=dev), torch.empty_like(v)
    _kernel("tile_dkv", x, attn, config, cot)(
        q, k, v, do, *params, *sc, L, inv, r, ends.flatten(0, 1), zends.flatten(0, 1), dk, dv,
        g["dkw"], g["dkb"])  # fmt: skip
    return dq, dk, dv, g["dqw"], g["dqb"], g["dkw"], g["dkb"], Sg, zr


def _problem(x: Inputs, attn: LinearAttention) -> Problem:
    """The call's ``Problem`` (``build.compile_key``'s)."""
    return Problem(attn, x.q.shape[-1], x.v.shape[-1], x.v.dtype, x.q.device.type)


PARAM_GRADS = ("dqw", "dqb", "dkw", "dkb")
"""The sweeps' per-program ``[B, H, 16]`` d gamma / d beta of q and k."""


def _param_grad(g: torch.Tensor, like: torch.Tensor | None, used: bool) -> torch.Tensor | None:
    """A per-program ``[B, H, 16]`` parameter gradient summed to ``like``'s shape ([H, D] or
    [D]) and dtype; None for an absent parameter or one the feature map does not use."""
    if like is None or not used:
        return None
    return g[..., : like.shape[-1]].reshape(-1, *like.shape).sum(0).to(like.dtype)


def backward(
    x: Inputs, attn: LinearAttention, config: dict[str, Any] | None, grads: Outputs
) -> Inputs:
    """``d <grads, forward(x)> / dx`` for every present input (the protocol's
    ``Backend.backward_dense``), T >= 1.

    ``grads.o [B, T, H, Dv]``; ``grads.S [B, H, F, Dv]``, ``grads.z [B, H, F]`` (canonical)
    or None (the final state is not in the loss). Returns ``Inputs``: dq, dk
    ``[B, T, H, D]`` and dv ``[B, T, H, Dv]`` in the inputs' dtypes; d gamma / d beta of q
    and k in their parameters' shapes ([H, D] or [D]; None when absent or unused by the
    feature map); dS0, dz0 in S0's dtype (None without an initial state). Two launches:
    ``dq_kernel`` (which stores 1 / (den + eps) and r per token) and ``dkv_kernel``, on
    float32 operands for every input dtype (``build.SWEEP_DTYPE``: half inputs are widened
    here, tf32 products); the per-program d gamma / d beta are summed here. Raises
    ``ValueError`` and pads q, k, v and dO as ``forward``.
    """
    D, Dv, pre = x.q.shape[-1], x.v.shape[-1], attn.feature_map.pre
    _check(x, attn)
    # [B, T, H, 16] twice, [B, T, H, BV] twice, in the sweeps' dtype (build.kernel_dtype)
    tiles = forward_variant(config) == "tiles"
    q, k, v, do = _operands(x, grads.o, dtype=kernel_dtype("dq", x.v.dtype, False), tiles=tiles)
    params, sc = _params(x, attn), scalars(attn, D)
    sweeps = _tile_backward if tiles else _walk_backward
    dq, dk, dv, dqw, dqb, dkw, dkb, Sg, zr = sweeps(x, attn, config, grads, q, k, v, do, params,
                                                    sc)  # fmt: skip

    dS0 = dz0 = None
    if x.S0 is not None:
        dS0, dz0 = state_gradient(Sg[..., :Dv], zr, attn, D)
        dS0, dz0 = dS0.to(x.S0.dtype), dz0.to(x.z0.dtype)
    return Inputs(
        _cut(dq, D).to(x.q.dtype), _cut(dk, D).to(x.k.dtype), _cut(dv, Dv).to(x.v.dtype),
        _param_grad(dqw, x.q_weight, pre.uses_gamma), _param_grad(dqb, x.q_bias, pre.uses_beta),
        _param_grad(dkw, x.k_weight, pre.uses_gamma), _param_grad(dkb, x.k_bias, pre.uses_beta),
        dS0, dz0,
    )  # fmt: skip


def _walk_backward(x: Inputs, attn: LinearAttention, config: dict | None, grads: Outputs,
                   q, k, v, do, params, sc) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """``backward``'s walks: ``dq_kernel`` then ``dkv_kernel`` over the whole sequence, or over
    its segments and tail (``split``); returns ``_tile_backward``'s tuple."""
    (B, T, H, _), D, Dv, dev = q.shape, x.q.shape[-1], x.v.shape[-1], q.device
    carried, final = x.S0 is not None, grads.S is not None or grads.z is not None
    sp = Split(B, T, segment(config, dev, B * H, T))
    new = torch.empty if attn.feature_map.degree >= 1 else torch.zeros  # sim = c0: no dq, dk

    def part_of(ops: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """A part's operands (q, k, v, dO of its [B', T', H, ..]) and its outputs' buffers."""
        (Bp, Tp, _, _), v_ = ops[0].shape, ops[2]
        g = {n: new(ops[0].shape, dtype=q.dtype, device=dev) for n in ("dq", "dk")}
        g |= {n: new(Bp, H, DK, dtype=torch.float32, device=dev) for n in PARAM_GRADS}
        g |= {n: torch.empty(Bp, Tp, H, dtype=torch.float32, device=dev) for n in ("inv", "r")}
        return {"ops": ops, "dv": torch.empty_like(v_), **g}

    S, z = _state_in(x.S0, x.z0, attn, B, H, D, Dv, v)  # [B, H, R, BV], [B, H, R]
    parts = []  # the body (the segments) and / or the tail, in order
    if sp.n:  # the segments' initial states, summed on the sweeps' operands
        body, sums = part_of([sp.body(t) for t in (q, k, v, do)]), sp.empty_states(S, z)
        _kernel("state", x, attn, config, False, wide=True)(
            *body["ops"][:3], *params, *sc, body["ops"][2], *sums)  # fmt: skip
        (S_b, S), (z_b, z) = (sp.scan(t, t0 if carried else None) for t, t0 in zip(sums, (S, z)))
        parts.append((body, (S_b, z_b), True))
    if sp.rem:
        parts.append((part_of([sp.tail(t) for t in (q, k, v, do)]), (S, z), carried or sp.n > 0))
    for p, (S_in, z_in), state in parts:
        _kernel("dq", x, attn, config, state)(*p["ops"], *params, *sc, S_in, z_in, p["dq"],
                                              p["dqw"], p["dqb"], p["inv"], p["r"])  # fmt: skip

    # the dk/dv sweep walks back: the tail from the final state's cotangent, each segment from
    # the cotangent its later segments and the tail leave at its end
    Sg, zr = _state_in(grads.S, grads.z, attn, B, H, D, Dv, v)  # in, then out
    cot = final
    for i, (p, _, _) in reversed(list(enumerate(parts))):
        segments = sp.n > 0 and i == 0
        rows = (*p["ops"], *params, *sc, p["inv"], p["r"])
        outs = (p["dk"], p["dv"], p["dkw"], p["dkb"])
        if segments:  # each segment's own cotangent sum (outs unwritten: the dkv call's)
            sums = sp.empty_states(Sg, zr)
            _kernel("cotangent", x, attn, config, False)(*rows, *sums, *outs)
            (Sg, Sg_0), (zr, zr_0) = (sp.scan(t, t0 if cot else None, reverse=True)
                                      for t, t0 in zip(sums, (Sg, zr)))  # fmt: skip
            cot = True
        _kernel("dkv", x, attn, config, cot)(*rows, Sg, zr, *outs)
        if segments:  # the scan's total: the initial state's gradient
            Sg, zr = Sg_0, zr_0
        cot = True
    dq, dk, dv = (sp.join([p[n] for p, _, _ in parts]) for n in ("dq", "dk", "dv"))
    dqw, dqb, dkw, dkb = (torch.cat([p[n] for p, _, _ in parts]) for n in PARAM_GRADS)
    return dq, dk, dv, dqw, dqb, dkw, dkb, Sg, zr
