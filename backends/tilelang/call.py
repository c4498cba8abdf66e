"""Host side of the TileLang forward: compile once per shape class, launch, map the state.

``forward`` runs ``kernels.forward_kernel`` on CUDA tensors through TileLang's CUDA target
and on CPU tensors through its C target (the tests' path on a machine without a GPU). The
kernel's state (``layout``: one unscaled, unpacked block per power, stacked into
``S [B, H, R, Dv]`` and ``z [B, H, R]``) and the spec's canonical layout are mapped into
each other here: ``kernel_state`` (canonical -> kernel, for an initial state) and
``canonical_state`` (kernel -> canonical, for the final state), exact inverses on the
canonical space.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from rebased_kernels.backend import Inputs, Outputs
from rebased_kernels.spec import FeatureMap, LinearAttention, feature_layout, feature_weights

from .layout import DK, block_offsets, block_row

DTYPES: dict[torch.dtype, str] = {
    torch.bfloat16: "bfloat16",
    torch.float16: "float16",
    torch.float32: "float32",
}
DEFAULT_CONFIG: dict[str, Any] = {"chunk_size": 64, "num_stages": 2, "threads": 256}
"""``forward_kernel``'s defaults. BC = 64 with 256 compute threads: 168 registers a thread
and no spills for sm_90a at Dv = 64 (nvcc 13.0), for ``rebased`` and for ``based`` with an
initial state alike (its c1 and c0 blocks live in shared memory); 128 threads spill, the
fp32 S_2 alone being 128 registers a thread. Not yet timed on a GPU."""


def unsupported_reason(attn: LinearAttention, D: int, Dv: int, dtype: torch.dtype) -> str | None:
    """Why ``forward`` cannot compute this problem (None when it can)."""
    fm = attn.feature_map
    if fm.degree > 2:
        return f"computes kernels c0 + c1 s + c2 s^2 (degree <= 2), not degree {fm.degree}"
    if D > DK or Dv > 64:
        return f"keeps the whole state on chip for D <= 16 and Dv <= 64, not D={D}, Dv={Dv}"
    if dtype not in DTYPES:
        return f"supports dtypes {sorted(str(d) for d in DTYPES)}, not {dtype}"
    return None


@functools.cache
def compiled(
    H: int,
    D: int,
    Dv: int,
    norm: bool,
    scale: float,
    coeffs: tuple[float, ...],
    normalize: bool,
    initial_state: bool,
    eps: float,
    dtype: str,
    target: str,
    chunk_size: int,
    num_stages: int,
    threads: int,
) -> Any:
    """The compiled ``forward_kernel`` (a ``tilelang.JITKernel``) for one shape class; B and T
    stay symbolic, so every batch size and length reuses it."""
    import tilelang

    from .kernels import forward_kernel

    func = forward_kernel(
        H, D, Dv, norm=norm, scale=scale, coeffs=coeffs, normalize=normalize,
        initial_state=initial_state, eps=eps, dtype=dtype, BC=chunk_size,
        num_stages=num_stages, threads=threads, target=target,
    )  # fmt: skip
    return tilelang.compile(func, target=target)


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


def _param(t: torch.Tensor | None, used: bool, fill: float, H: int, D: int, device) -> torch.Tensor:
    """A pre-transform parameter as the kernel takes it: ``[H, D]`` float32 (``fill`` when
    the feature map does not use it)."""
    if t is None or not used:
        return torch.full((H, D), fill, dtype=torch.float32, device=device)
    return t.to(torch.float32).expand(H, D).contiguous()


def forward(x: Inputs, attn: LinearAttention, config: dict[str, Any] | None = None) -> Outputs:
    """Causal linear attention through the TileLang kernel (see ``kernels``).

    ``x.q, x.k [B, T, H, D]``, ``x.v [B, T, H, Dv]`` (bf16 / fp16 / fp32, T >= 1) on a CUDA
    device or the CPU, optionally an initial state ``x.S0 [B, H, F, Dv]``, ``x.z0 [B, H, F]``
    (canonical layout; rounded to float32 in the kernel's); returns ``o [B, T, H, Dv]`` in
    v's dtype and the final state ``S [B, H, F, Dv]``, ``z [B, H, F]`` (float32, canonical
    layout), for any ``sim = c0 + c1 s + c2 s^2`` and ``attn.normalize`` either way. Raises
    ``ValueError`` for what ``unsupported_reason`` names.
    """
    B, _, H, D = x.q.shape
    Dv = x.v.shape[-1]
    reason = unsupported_reason(attn, D, Dv, x.v.dtype)
    if reason:
        raise ValueError(f"the tilelang forward {reason}")
    cfg = {**DEFAULT_CONFIG, **(config or {})}
    fm, dev = attn.feature_map, x.q.device
    target = "cuda" if dev.type == "cuda" else "c"
    kernel = compiled(
        H, D, Dv, fm.pre.norm, attn.scale, fm.coeffs[:3], attn.normalize, x.S0 is not None,
        attn.eps, DTYPES[x.v.dtype], target, cfg["chunk_size"], cfg["num_stages"],
        cfg["threads"],
    )  # fmt: skip
    params = [
        _param(x.q_weight, fm.pre.uses_gamma, 1.0, H, D, dev),
        _param(x.q_bias, fm.pre.uses_beta, 0.0, H, D, dev),
        _param(x.k_weight, fm.pre.uses_gamma, 1.0, H, D, dev),
        _param(x.k_bias, fm.pre.uses_beta, 0.0, H, D, dev),
    ]
    q, k, v = (t.to(x.v.dtype).contiguous() for t in (x.q, x.k, x.v))
    o = torch.empty_like(v)
    if x.S0 is None:
        _, R = block_offsets(fm.powers)
        S = torch.empty(B, H, R, Dv, dtype=torch.float32, device=dev)
        z = torch.empty(B, H, R, dtype=torch.float32, device=dev)
    else:
        S, z = (t.float().contiguous() for t in kernel_state(x.S0, x.z0, attn, D))
    kernel(q, k, v, *params, o, S, z)  # reads the initial state from S, z; writes the final
    return Outputs(o, *canonical_state(S, z, attn, D))
