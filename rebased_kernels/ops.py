"""The public functions: ``linear_attention`` (a ``torch.library`` custom op), ``decode_step``."""

from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

import torch

from . import _validate
from .backend import (
    Backend,
    Inputs,
    Outputs,
    Problem,
    compute_dtype,
    decode_config,
    empty_sequence,
    empty_sequence_grads,
    encode_config,
    get_backend,
    resolve,
)
from .spec import FeatureMap, LinearAttention, PreTransform, get_feature_map


class State(NamedTuple):
    """The recurrent state: ``S [N, H, F, Dv]`` and ``z [N, H, F]`` in the canonical layout."""

    S: torch.Tensor
    z: torch.Tensor


def _attention(
    norm: bool, affine: str, coeffs: list[float], scale: float, normalize: bool, eps: float
) -> LinearAttention:
    fm = FeatureMap("custom", PreTransform(norm, affine), tuple(coeffs))  # type: ignore[arg-type]
    return LinearAttention(fm, scale, normalize, eps)


_OPT = torch.Tensor | None


def _unaliased(outputs, inputs) -> list[torch.Tensor]:
    """Contiguous outputs that share no memory with the op's inputs or each other.

    A backend may legally pass a tensor through (e.g. dS0 = dS when T = 1), but a custom
    op's outputs must not alias; such outputs are copied.
    """
    seen = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, torch.Tensor)}
    out = []
    for t in outputs:
        t = t.contiguous()
        ptr = t.untyped_storage().data_ptr()
        if t.numel() and ptr in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out.append(t)
    return out


@torch.library.custom_op("rebased_kernels::linear_attention_fwd", mutates_args=())
def _fwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_weight: _OPT,
    q_bias: _OPT,
    k_weight: _OPT,
    k_bias: _OPT,
    S0: _OPT,
    z0: _OPT,
    cu_seqlens: _OPT,
    norm: bool,
    affine: str,
    coeffs: list[float],
    scale: float,
    normalize: bool,
    eps: float,
    backend: str,
    config: str,
    check_finite: bool,
    final_state: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = Inputs(q, k, v, q_weight, q_bias, k_weight, k_bias, S0, z0)
    if check_finite:
        _validate.check_finite(dict(zip(Inputs._fields, x)))
    attn = _attention(norm, affine, coeffs, scale, normalize, eps)
    if q.shape[1] == 0:  # N empty sequences when packed, else B
        N = q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
        out = empty_sequence(x, attn, N)
    else:
        be = get_backend(backend)
        out = be.forward(x, attn, decode_config(be, config), cu_seqlens, final_state)
    if not final_state:  # not asked for: empty placeholders (custom ops return tensors)
        out = Outputs(out.o, v.new_empty(0), v.new_empty(0))
    return tuple(_unaliased(out, (*x, cu_seqlens)))


@_fwd_op.register_fake
def _(
    q,
    k,
    v,
    q_weight,
    q_bias,
    k_weight,
    k_bias,
    S0,
    z0,
    cu_seqlens,
    norm,
    affine,
    coeffs,
    scale,
    normalize,
    eps,
    backend,
    config,
    check_finite,
    final_state,
):
    B, T, H, D = q.shape
    if not final_state:
        return v.new_empty(B, T, H, v.shape[-1]), v.new_empty(0), v.new_empty(0)
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    fm = FeatureMap("custom", PreTransform(norm, affine), tuple(coeffs))
    F, Dv, dt = fm.num_features(D), v.shape[-1], compute_dtype(v.dtype)
    return (
        v.new_empty(B, T, H, Dv),
        v.new_empty(N, H, F, Dv, dtype=dt),
        v.new_empty(N, H, F, dtype=dt),
    )


@torch.library.custom_op("rebased_kernels::linear_attention_bwd", mutates_args=())
def _bwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_weight: _OPT,
    q_bias: _OPT,
    k_weight: _OPT,
    k_bias: _OPT,
    S0: _OPT,
    z0: _OPT,
    cu_seqlens: _OPT,
    do: torch.Tensor,
    dS: _OPT,
    dz: _OPT,
    norm: bool,
    affine: str,
    coeffs: list[float],
    scale: float,
    normalize: bool,
    eps: float,
    backend: str,
    config: str,
) -> list[torch.Tensor]:
    x = Inputs(q, k, v, q_weight, q_bias, k_weight, k_bias, S0, z0)
    attn = _attention(norm, affine, coeffs, scale, normalize, eps)
    grads = Outputs(do, dS, dz)
    if q.shape[1] == 0:
        g = empty_sequence_grads(x, grads)
    else:
        be = get_backend(backend)
        g = be.backward(x, attn, decode_config(be, config), cu_seqlens, grads)
    # absent inputs get an empty placeholder; custom ops cannot return None
    return _unaliased([q.new_empty(0) if t is None else t for t in g], (*x, do, dS, dz))


@_bwd_op.register_fake
def _(q, k, v, q_weight, q_bias, k_weight, k_bias, S0, z0, cu_seqlens, do, dS, dz, *args):
    x = (q, k, v, q_weight, q_bias, k_weight, k_bias, S0, z0)
    return [q.new_empty(0) if t is None else torch.empty_like(t) for t in x]


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs[:10])
    ctx.args = inputs[10:-2]  # not check_finite, final_state: the backward needs neither
    # None, not zeros, for outputs outside the loss: a backend can skip a final state that
    # nobody used (triton's gradient sweeps run faster without one)
    ctx.set_materialize_grads(False)


def _backward(ctx, do, dS, dz):
    saved = ctx.saved_tensors
    # a forward without its final state returned empty placeholders: no cotangent there
    dS, dz = (None if t is not None and t.dim() == 1 else t for t in (dS, dz))
    if do is None:  # only the final state is in the loss; o has v's shape and dtype
        do = torch.zeros_like(saved[2])
    if dS is None and dz is not None:  # one of the state's two parts in the loss
        dS = dz.new_zeros(*dz.shape, saved[2].shape[-1])  # [N, H, F, Dv]
    elif dz is None and dS is not None:
        dz = dS.new_zeros(dS.shape[:-1])  # [N, H, F]
    grads = _bwd_op(*saved, do, dS, dz, *ctx.args)
    present = [t is not None for t in saved[:9]]
    return tuple(g if p else None for g, p in zip(grads, present)) + (None,) * 11


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def _plan(
    backend: str,
    norm: bool,
    affine: str,
    coeffs: tuple[float, ...],
    D: int,
    Dv: int,
    dtype: torch.dtype,
    device_type: str,
    varlen: bool,
    config_items: tuple,
    normalize: bool = True,
    T: int = 1,
    BH: int = 1,
) -> tuple[str, str]:
    """The backend name and encoded configuration for a call (a constant under compile)."""
    choice = _choose(backend, norm, affine, coeffs, D, Dv, dtype, device_type, varlen,
                     config_items, normalize, T, BH)  # fmt: skip
    be = get_backend(choice.backend)
    return be.name, encode_config(decode_config(be, encode_config(choice.config)))


# what ``torch.compiler.assume_constant_result`` sets, without the decorator's eager import of
# torch._dynamo (4 s of every process's start on the GPU image; tests pin the equivalence)
_plan._dynamo_marked_constant = True  # type: ignore[attr-defined]


def _choose(backend, norm, affine, coeffs, D, Dv, dtype, device_type, varlen, config_items,
            normalize, T, BH):  # fmt: skip
    from rebased_kernels.autotune import choose

    attn = _attention(norm, affine, list(coeffs), 1.0, normalize, 0.0)
    problem = Problem(attn, D, Dv, dtype, device_type, varlen)
    return choose(backend, problem, T, BH, dict(config_items))


def explain(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    feature_map: str | FeatureMap = "rebased",
    *,
    normalize: bool = True,
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "auto",
    config: dict | None = None,
):
    """Which backend and configuration ``linear_attention`` would use for these inputs,
    and why: ``Choice(backend, config, reason)`` (tuned bucket, or the static order)."""
    fm = get_feature_map(feature_map)
    _validate.check_qkv(q, k, v, ndim=4)
    B, T, H, D = q.shape
    return _choose(backend, fm.pre.norm, fm.pre.affine, fm.coeffs, D, v.shape[-1], q.dtype,
                   q.device.type, cu_seqlens is not None, tuple(sorted((config or {}).items())),
                   normalize, T, B * H)  # fmt: skip


def linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    feature_map: str | FeatureMap = "rebased",
    *,
    q_weight: torch.Tensor | None = None,
    q_bias: torch.Tensor | None = None,
    k_weight: torch.Tensor | None = None,
    k_bias: torch.Tensor | None = None,
    scale: float | None = None,
    normalize: bool = True,
    eps: float = 1e-5,
    initial_state: tuple[torch.Tensor, torch.Tensor] | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "auto",
    config: dict | None = None,
    check_finite: bool = True,
) -> torch.Tensor | tuple[torch.Tensor, State]:
    """Causal linear attention with a polynomial kernel on pre-transformed q, k.

    ``o_i = sum_{j<=i} sim(q_i, k_j) v_j / (sum_{j<=i} sim(q_i, k_j) + eps)`` with
    ``sim = sum_p c_p (scale * q'_i . k'_j)^p`` and ``x' = weight * LN(x) + bias`` as the
    feature map says (``rebased``: ``(scale * q'.k')^2`` on LayerNormed, affine q, k).
    Without ``normalize`` the denominator is dropped.

    Args:
        q, k: ``[B, T, H, D]``; v: ``[B, T, H, Dv]``; one float dtype, one device.
        feature_map: a preset name (``rebased``, ``x2``, ``norm_x2``, ``gamma_x2``,
            ``gamma_x_beta_x2``, ``based``) or a ``FeatureMap``.
        q_weight, q_bias, k_weight, k_bias: ``[H, D]`` or ``[D]``; missing weights mean 1,
            missing biases 0; passing one the feature map does not use raises.
        scale: defaults to ``D ** -0.5``.
        initial_state: ``(S [N, H, F, Dv], z [N, H, F])`` from an earlier call.
        output_final_state: also return the state after the last token.
        cu_seqlens: int32/int64 ``[N + 1]`` offsets of N sequences packed along T (B == 1).
        backend: a registered name or ``"auto"``; config: that backend's tunables.
        check_finite: raise on NaN / Inf in the inputs (one device sync per call on a GPU;
            training loops that watch their loss can pass False to keep the host ahead).

    Returns:
        ``o [B, T, H, Dv]`` in v's dtype, or ``(o, State(S, z))`` with S, z in float32
        (float64 for float64 inputs), N = B or the number of packed sequences.

    Raises:
        ValueError / TypeError for bad shapes, dtypes, devices, parameters, states,
        ``cu_seqlens`` or non-finite values; RuntimeError for an unavailable backend.
    """
    fm = get_feature_map(feature_map)
    _validate.check_qkv(q, k, v, ndim=4)
    params = (q_weight, q_bias, k_weight, k_bias)
    _validate.check_params(fm, q, params)
    B, T, H, D = q.shape
    scale = D**-0.5 if scale is None else float(scale)
    _validate.check_scalars(scale, eps)
    N = B if cu_seqlens is None else _validate.check_cu_seqlens(cu_seqlens, B, T, q.device)
    S0 = z0 = None
    if initial_state is not None:
        S0, z0 = _validate.check_state(
            initial_state, N, H, fm.num_features(D), v.shape[-1], q.device, "initial_state"
        )
    name, cfg = _plan(
        backend, fm.pre.norm, fm.pre.affine, fm.coeffs, D, v.shape[-1], q.dtype,
        q.device.type, cu_seqlens is not None, tuple(sorted((config or {}).items())),
        normalize, T, B * H,
    )  # fmt: skip
    o, S, z = _fwd_op(
        q, k, v, *params, S0, z0, cu_seqlens,
        fm.pre.norm, fm.pre.affine, list(fm.coeffs), scale, normalize, eps, name, cfg,
        check_finite, output_final_state,
    )  # fmt: skip
    return (o, State(S, z)) if output_final_state else o


@lru_cache(maxsize=64)
def _decode_plan(
    backend: str,
    feature_map: str | FeatureMap,
    D: int,
    Dv: int,
    dtype: torch.dtype,
    device_type: str,
    scale: float | None,
    normalize: bool,
    eps: float,
) -> tuple[FeatureMap, LinearAttention, Backend, int]:
    """What a decode step with these settings runs (resolved once: the step is per token)."""
    fm = get_feature_map(feature_map)
    scale = D**-0.5 if scale is None else float(scale)
    _validate.check_scalars(scale, eps)
    attn = LinearAttention(fm, scale, normalize, eps)
    be = resolve(backend, Problem(attn, D, Dv, dtype, device_type, False))
    return fm, attn, be, fm.num_features(D)


def decode_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: tuple[torch.Tensor, torch.Tensor],
    feature_map: str | FeatureMap = "rebased",
    *,
    q_weight: torch.Tensor | None = None,
    q_bias: torch.Tensor | None = None,
    k_weight: torch.Tensor | None = None,
    k_bias: torch.Tensor | None = None,
    scale: float | None = None,
    normalize: bool = True,
    eps: float = 1e-5,
    backend: str = "auto",
    inplace: bool = False,
) -> tuple[torch.Tensor, State]:
    """One token per sequence: the O(1)-per-token inference path.

    ``S' = S + phi(k) v^T``, ``z' = z + phi(k)``, ``o = phi(q) S' / (phi(q) . z' + eps)``
    (no denominator without ``normalize``), equal to the last row of ``linear_attention``
    over the whole prefix. q, k: ``[B, H, D]``; v: ``[B, H, Dv]``; state:
    ``(S [B, H, F, Dv], z [B, H, F])``. Returns ``(o [B, H, Dv] in v's dtype, State)``.
    With ``inplace=True`` the given state tensors (contiguous, float32 or float64 as the
    inputs' compute dtype) are updated and returned, saving a state-sized allocation.
    """
    _validate.check_qkv(q, k, v, ndim=3)
    B, H, D = q.shape
    Dv = v.shape[-1]
    fm, attn, be, F = _decode_plan(
        backend, feature_map, D, Dv, q.dtype, q.device.type, scale, normalize, eps
    )
    params = (q_weight, q_bias, k_weight, k_bias)
    _validate.check_params(fm, q, params)
    S, z = _validate.check_state(state, B, H, F, Dv, q.device, "state")
    dt = compute_dtype(v.dtype)
    out = None
    if inplace:
        if not (S.dtype == z.dtype == dt and S.is_contiguous() and z.is_contiguous()):
            raise ValueError(
                f"inplace=True needs a contiguous {dt} state (got S {S.dtype}, z {z.dtype}); "
                "pass the state a previous call returned, or inplace=False"
            )
        out = (S, z)
    S0, z0 = (S, z) if S.dtype == z.dtype == dt else (S.to(dt), z.to(dt))
    o, S, z = be.decode_step(Inputs(q, k, v, *params, S0, z0), attn, out)
    # o depends on every input: one small check per step instead of one per input
    _validate.check_finite({"decode_step's output (so q, k, v, the state or a parameter)": o})
    return o, State(S, z)
