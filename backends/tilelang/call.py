"""Host side of the TileLang forward: compile once per shape class, launch, map the state.

``forward`` runs ``kernels.forward_kernel`` on CUDA tensors through TileLang's CUDA target
and on CPU tensors through its C target (the tests' path on a machine without a GPU). The
kernel's unpacked state (``S [B, H, 256, Dv]``, ``Z [B, H, 16, 16]``, unscaled) becomes the
spec's canonical layout here (``canonical_state``).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from rebased_kernels.backend import Inputs, Outputs
from rebased_kernels.spec import LinearAttention, feature_layout, feature_weights

DTYPES: dict[torch.dtype, str] = {
    torch.bfloat16: "bfloat16",
    torch.float16: "float16",
    torch.float32: "float32",
}
DEFAULT_CONFIG: dict[str, Any] = {"chunk_size": 64, "num_stages": 2, "threads": 256}
"""``forward_kernel``'s defaults. BC = 64 with 256 compute threads: 168 registers a thread
and no spills for sm_90a at Dv = 64 (nvcc 13.0); 128 threads spill, the fp32 S alone being
128 registers a thread. Not yet timed on a GPU."""


def unsupported_reason(attn: LinearAttention, D: int, Dv: int, dtype: torch.dtype) -> str | None:
    """Why ``forward`` cannot compute this problem (None when it can)."""
    fm = attn.feature_map
    if fm.powers != (2,):
        return f"computes only c2 (scale q'.k')^2 kernels, not coefficients {fm.coeffs}"
    if not attn.normalize:
        return "computes only the normalised attention (normalize=True)"
    if D > 16 or Dv > 64:
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
    c2: float,
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
        H, D, Dv, norm=norm, scale=scale, c2=c2, eps=eps, dtype=dtype, BC=chunk_size,
        num_stages=num_stages, threads=threads, target=target,
    )  # fmt: skip
    return tilelang.compile(func, target=target)


def canonical_state(
    S: torch.Tensor, Z: torch.Tensor, attn: LinearAttention, D: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's state in the spec's layout: ``(S [B, H, F, Dv], z [B, H, F])``.

    Feature ``(a, b)``, ``a <= b``, is ``sqrt(c2 scale^2 m) x'_a x'_b`` (``m`` = 2 off the
    diagonal), so its rows are row ``16 a + b`` of the kernel's unscaled ``S`` and entry
    ``(a, b)`` of ``Z``, times that weight.
    """
    rows = [16 * idx[0] + idx[1] for idx, _ in feature_layout(D, (2,))]
    index = torch.tensor(rows, device=S.device)
    w = torch.tensor(feature_weights(attn.feature_map, D, attn.scale), device=S.device)
    return S[:, :, index] * w[:, None], Z.flatten(-2)[..., index] * w


def _param(t: torch.Tensor | None, used: bool, fill: float, H: int, D: int, device) -> torch.Tensor:
    """A pre-transform parameter as the kernel takes it: ``[H, D]`` float32 (``fill`` when
    the feature map does not use it)."""
    if t is None or not used:
        return torch.full((H, D), fill, dtype=torch.float32, device=device)
    return t.to(torch.float32).expand(H, D).contiguous()


def forward(x: Inputs, attn: LinearAttention, config: dict[str, Any] | None = None) -> Outputs:
    """Causal linear attention through the TileLang kernel (see ``kernels``).

    ``x.q, x.k [B, T, H, D]``, ``x.v [B, T, H, Dv]`` (bf16 / fp16 / fp32, T >= 1) on a CUDA
    device or the CPU; returns ``o [B, T, H, Dv]`` in v's dtype and the final state
    ``S [B, H, F, Dv]``, ``z [B, H, F]`` (float32, canonical layout). Raises ``ValueError``
    for what ``unsupported_reason`` names and for an initial state (not supported yet).
    """
    B, _, H, D = x.q.shape
    Dv = x.v.shape[-1]
    reason = unsupported_reason(attn, D, Dv, x.v.dtype)
    if reason:
        raise ValueError(f"the tilelang forward {reason}")
    if x.S0 is not None:
        raise ValueError("the tilelang forward takes no initial state yet: pass S0 = z0 = None")
    cfg = {**DEFAULT_CONFIG, **(config or {})}
    fm, dev = attn.feature_map, x.q.device
    target = "cuda" if dev.type == "cuda" else "c"
    kernel = compiled(
        H, D, Dv, fm.pre.norm, attn.scale, fm.coeffs[2], attn.eps, DTYPES[x.v.dtype], target,
        cfg["chunk_size"], cfg["num_stages"], cfg["threads"],
    )  # fmt: skip
    params = [
        _param(x.q_weight, fm.pre.uses_gamma, 1.0, H, D, dev),
        _param(x.q_bias, fm.pre.uses_beta, 0.0, H, D, dev),
        _param(x.k_weight, fm.pre.uses_gamma, 1.0, H, D, dev),
        _param(x.k_bias, fm.pre.uses_beta, 0.0, H, D, dev),
    ]
    q, k, v = (t.to(x.v.dtype).contiguous() for t in (x.q, x.k, x.v))
    o = torch.empty_like(v)
    S = torch.empty(B, H, 256, Dv, dtype=torch.float32, device=dev)
    Z = torch.empty(B, H, 16, 16, dtype=torch.float32, device=dev)
    kernel(q, k, v, *params, o, S, Z)
    return Outputs(o, *canonical_state(S, Z, attn, D))
