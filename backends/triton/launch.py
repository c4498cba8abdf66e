"""Host helpers shared by the triton variants: launch sizes, parameters, the segment scan."""

from __future__ import annotations

import os
from functools import lru_cache

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def interpreter_dtype_reason(dtype: torch.dtype) -> str | None:
    """Why a Triton kernel cannot take ``dtype`` under ``TRITON_INTERPRET=1`` (None when it
    can): the interpreter runs programs in numpy, which has no bfloat16, and returns wrong
    numbers for it without an error (an ``o`` of 7.8e8 against the oracle's 0.1 for a T = 2
    rebased call, session 15)."""
    if INTERPRET and dtype == torch.bfloat16:
        return (
            "runs under the Triton interpreter (TRITON_INTERPRET=1), which has no bfloat16 "
            "and computes wrong results for it: use float16 or float32 on the CPU"
        )
    return None


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def triton_next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


SWEEP_DOT = {"fma": "tf32", "x3": "x3", "x2": "x2", "bf16x3": "b3"}
"""The gradient sweeps' ``DOT`` (``kernels._dot``) for each ``exact``."""
EXACT = tuple(SWEEP_DOT)
"""How the gradient sweeps of half inputs form their ~fp32 products (``config["exact"]``,
``kernels._dot_exact``): CUDA-core fp32 FMAs, three tf32 tensor-core passes ("x3"), "x2":
"x3" with two passes where one operand is a half input's value, exact in tf32
(``kernels._dot_x2``; ptxas, tiles 64 x 4 at 1 stage: dq spills 272 bytes instead of 448,
dk/dv 544 instead of 968; not yet timed on a GPU), or three bf16 passes of operands split
``hi + lo`` (``kernels._dot_b3``, ~2^-16: 64x tf32's accuracy). The
last holds half the operand registers of tf32x3: ptxas (triton 3.6, sm_90a, tiles 64 x 4,
1 stage) gives the dq tile kernel 250 registers and no spill instead of 255 and 448 bytes,
dk/dv 248 bytes of spill instead of 968; on the H100 its gradient tile kernels took 2.9 ms
at 16k against tf32x3's 5.0 (``docs/results/h100-s14/``). Not searched by the tuner:
``MIN_BF16X3_TRITON``."""


def triton_version() -> tuple[int, int]:
    """``(major, minor)`` of the installed triton."""
    import triton

    major, minor = triton.__version__.split(".")[:2]
    return int(major), int(minor)


def warps(config: dict, default: int) -> int:
    """``config["num_warps"]``, or the variant's ``default`` when it is absent or None (the
    backend's default configuration leaves it None, so each variant keeps its own)."""
    n = config.get("num_warps")
    return default if n is None else int(n)


STAGES = (1, 2, 3, 4)
"""Software-pipelining depths a configuration may name (``num_stages`` for the sweep and tile
kernels, ``state_stages`` for the state kernel; None: Triton's default, 3). Each stage holds
another copy of a loop's loads in registers: ptxas (triton 3.6, sm_90a) gives the ``tiles``
forward at chunk 64 and 4 warps 195 registers at 3 stages, 179 at 2, 168 at 1, i.e. 2, 2
and 3 programs per SM (``docs/results/h100-s13/``). Every variant takes them (``walk``: its
state and sweep kernels)."""


def stages(config: dict, key: str) -> dict:
    """``{"num_stages": n}`` for the launch from ``config[key]`` (one of ``STAGES``), or {}
    (Triton's default) when it is absent or None."""
    n = config.get(key)
    if n is None:
        return {}
    if n not in STAGES:
        raise ValueError(f"triton {key} {n!r} is not one of {STAGES}")
    return {"num_stages": int(n)}


MIN_FP32_DQ_WARPS = 8
"""Triton < 3.9 fails to compile the fp32 dq sweep of ``walk`` and ``packed`` below 8 warps
for sm_90 (its RemoveLayoutConversions pass: "operand #0 does not dominate this use"; walk:
H200 session 9, packed with a c_0 or c_1 term: session 10; both reproduced on the CPU by
compiling for sm_90 with triton 3.6, which `resources` does; 3.9 compiles both). ``tiles``
compiles at 4."""
FP32_DQ_VARIANTS = ("walk", "packed")
TILES_BWD_MAX_WARPS = 4
"""``tiles``' gradient kernels at chunk 64 and 8 warps raised an illegal memory access on the
H200 with triton 3.6 (session 11, ``gpu_check --stages probe-warps``: the forward at 8 warps,
chunk 32 at 8 warps, and 4 warps ran). compute-sanitizer on an H100 (session 12,
``docs/results/h100-s12/``) found it: a tf32 ``tl.dot`` of the dq pass reads 512 bytes per
thread past the kernel's shared allocation in the programs whose pair loop runs once (the
first chunk of a segment that reads a stored state); no global access is out of bounds.
A compiler fault, so a GPU backward of ``tiles`` at chunk >= 64 on triton < 3.9 refuses more
warps than this (``call_warps``)."""


def call_warps(config: dict, default: int, variant: str, dtype: torch.dtype, gpu_backward: bool,
               version: tuple[int, int] | None = None) -> int:  # fmt: skip
    """The warps of one call: ``warps(config, default)``, except a GPU float32 backward of a
    ``FP32_DQ_VARIANTS`` variant on triton < 3.9, which takes ``MIN_FP32_DQ_WARPS`` when the
    configuration names none and raises ``ValueError`` when it names fewer, and a GPU
    backward of ``tiles`` at chunk >= 64 there, which raises ``ValueError`` above
    ``TILES_BWD_MAX_WARPS``."""
    n = warps(config, default)
    version = triton_version() if version is None and gpu_backward else version
    if (gpu_backward and variant == "tiles" and n > TILES_BWD_MAX_WARPS and version < (3, 9)
            and int(config.get("chunk_size") or 0) >= 64):  # fmt: skip
        raise ValueError(
            f"triton tiles: a backward at chunk_size >= 64 takes num_warps <= "
            f"{TILES_BWD_MAX_WARPS} with triton {'.'.join(map(str, version))} ({n} raised an "
            "illegal memory access on an H200); use 4 warps or chunk_size 32"
        )
    if not (gpu_backward and dtype == torch.float32 and variant in FP32_DQ_VARIANTS):
        return n
    if version >= (3, 9) or n >= MIN_FP32_DQ_WARPS:
        return n
    if config.get("num_warps") is None:
        return MIN_FP32_DQ_WARPS
    raise ValueError(
        f"triton {variant}: the float32 backward needs num_warps >= {MIN_FP32_DQ_WARPS} with "
        f"triton {'.'.join(map(str, version))} (its dq sweep does not compile at {n}); leave "
        f"num_warps unset, use {MIN_FP32_DQ_WARPS}, or the tiles variant"
    )


MIN_BF16X3_TRITON = (3, 9)
"""``exact`` "bf16x3" on a GPU needs a newer triton than 3.6: on an H100 (session 14,
``docs/results/h100-s14/``) triton 3.6's sm_90a code for it read shared memory out of bounds
(compute-sanitizer: 4,225 reads, all at the first bf16 product of ``kernels._dot_b3``) in
the tiles gradient kernels at one pipelining stage and at one segment, and in ``packed``
32 x 2 on the property suite's small shapes: an illegal memory access. Where it ran (tiles
64 x 4 at Triton's default depth, T = 2048 .. 32768) forward+backward took 4.7 ms at 16k
against tf32x3's 7.0. Triton >= 3.9 compiles it (not yet run on a GPU); the interpreter runs
its bit-exact emulation."""


def dot_precision(dtype: torch.dtype, backward: bool, exact: str = "fma", gpu: bool = False,
                  version: tuple[int, int] | None = None) -> str:  # fmt: skip
    """Matrix-product operands: exact fp32 for fp32 inputs; the input's half type in the
    forward; tf32 in the backward, whose LayerNorm projection amplifies operand rounding
    (bf16 operands there measured 1.3e-2 on an H100, over the 1e-2 tolerance), with its
    ~fp32 products (scores, pair gradients) as ``exact`` says (``SWEEP_DOT``); "bf16x3" a
    ``gpu`` backward refuses with a ``ValueError`` on triton older than
    ``MIN_BF16X3_TRITON``."""
    if exact not in EXACT:
        raise ValueError(f"triton exact {exact!r} is not one of {EXACT}")
    if dtype == torch.float32:
        return "ieee"
    if not backward:
        return "bf16" if dtype == torch.bfloat16 else "fp16"
    if exact == "bf16x3" and gpu:
        version = triton_version() if version is None else version
        if version < MIN_BF16X3_TRITON:
            raise ValueError(
                f"triton exact 'bf16x3' needs triton >= "
                f"{'.'.join(map(str, MIN_BF16X3_TRITON))} on a GPU (triton "
                f"{'.'.join(map(str, version))} compiles it to an illegal memory access); "
                "use exact 'x3'"
            )
    return SWEEP_DOT[exact]


def params(weight, bias, pre, H: int, D: int, device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(gamma, beta, row stride)`` for the kernels: both ``[H, D]`` (stride D) or ``[D]``
    (stride 0); the identity (ones, zeros) where the pre-transform does not use one."""
    used = [p for p, u in ((weight, pre.uses_gamma), (bias, pre.uses_beta)) if u and p is not None]
    rows = H if any(p.dim() == 2 for p in used) else 1
    g = weight if pre.uses_gamma and weight is not None else constant(1.0, rows, D, str(device))
    b = bias if pre.uses_beta and bias is not None else constant(0.0, rows, D, str(device))
    g, b = (p.expand(rows, D) if rows > 1 else p.reshape(-1, D)[0] for p in (g, b))
    return g.contiguous(), b.contiguous(), (D if rows > 1 else 0)


@lru_cache(maxsize=32)
def constant(fill: float, rows: int, D: int, device: str) -> torch.Tensor:
    return torch.full((rows, D), fill, dtype=torch.float32, device=device)


def scan(seg: torch.Tensor, init: torch.Tensor | None, reverse: bool,
         dtype: torch.dtype = torch.float32):  # fmt: skip
    """``(exclusive prefix per segment [BH, NSEG, RF, c], total [BH, RF, c])`` from ``init``
    (``[BH, RF, c]``, or None for a zero state), one launch, summed in float32; the prefix
    overwrites ``seg`` when it has ``dtype``, else goes to a new tensor of ``dtype``."""
    from .kernels import prefix_kernel

    BH, NSEG = seg.shape[:2]
    N = seg[0, 0].numel()
    total = torch.empty(BH, *seg.shape[2:], device=seg.device, dtype=torch.float32)
    if init is not None:
        init = init.to(torch.float32).contiguous()
    BS = triton_next_pow2(NSEG)  # the whole segment axis in one tile
    BLOCK = max(16, min(triton_next_pow2(N), 4096 // BS))
    pre = seg if dtype == seg.dtype else torch.empty_like(seg, dtype=dtype)
    prefix_kernel[(BH, triton_cdiv(N, BLOCK))](
        seg, total if init is None else init, total, pre, NSEG, N,
        HAS_INIT=init is not None, REVERSE=reverse, BS=BS, BLOCK=BLOCK, num_warps=4,
    )  # fmt: skip
    return pre, total


def param_grads(partials: torch.Tensor, B: int, H: int, D: int, x, pre) -> tuple:
    """``(d gamma_Q, d beta_Q, d gamma_K, d beta_K)`` of ``x`` (``Inputs``) from the gradient
    sweeps' per-segment (per-chunk) sums ``partials [4, B*H, n, W]`` (W >= D, in that
    order), summed over the batch and n in one reduction (four took ~8 us each on an H100 at
    T = 2048, session 17); None where the parameter is absent or ``pre`` does not use it; a
    parameter of shape [D] (shared by the heads) gets the sum over heads too."""
    ps = (x.q_weight, x.q_bias, x.k_weight, x.k_bias)
    used = (pre.uses_gamma, pre.uses_beta) * 2
    if all(p is None or not u for p, u in zip(ps, used)):
        return (None,) * 4
    g = partials.reshape(4, B, H, -1, partials.shape[-1])[..., :D].sum((1, 3))  # [4, H, D]
    dtypes = {p.dtype for p in ps if p is not None}
    if len(dtypes) == 1 and all(p is None or p.dim() == 2 for p in ps):
        g = g.to(dtypes.pop())  # one conversion, not one a parameter
    return tuple(
        None if p is None or not u else (gi if p.dim() == 2 else gi.sum(0)).to(p.dtype)
        for gi, p, u in zip(g, ps, used)
    )
