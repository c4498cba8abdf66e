"""Compile side of the TileLang kernels: what a problem compiles, the compile cache, the
parallel precompile (TileLang is imported only when a kernel is built).

One compiled kernel serves every problem with its ``CompileKey``: the kind (``KINDS``), BV
(the value columns: Dv rounded up to 64 bytes, ``layout.padded_value_dim``) and the
``options.KernelOptions`` (which powers of sim are present, the LayerNorm, the normaliser,
whether a state is read, the dtype, the tunables, the target). Everything else is read at
launch: B, T and H are symbolic sizes, and D <= 16, ``w_p = c_p scale^p`` and ``eps`` are
scalar arguments (``options.Scalars``), so problems that differ in them share a kernel.
``compile_classes`` lists the keys a set of problems needs and ``precompile`` builds them in
parallel (``precompile_problems``: both, with a report) (nvcc and gcc are subprocesses and
TileLang's lowering releases the GIL, so threads suffice). CPython before 3.13 keeps the
``ast`` module's recursion depth in per-interpreter state, and a thread switch inside a
syntax-tree conversion (a garbage collection running Python code) can make another thread
raise a spurious ``SystemError: AST constructor recursion depth mismatch`` (python/cpython
gh-106905; seen once in CI, in a dq build). TVMScript parses a kernel's source thousands of
times (``prim_func``: 3,255 ``ast.parse`` calls for ``based`` with a state) and
``tilelang.compile`` hundreds more (793), so the parse runs under ``_PARSE_LOCK`` (Python
code: threads gain nothing there) and ``precompile`` builds a key that raised that error
once more on its own thread after the others (``AST_RACE``)."""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import torch

from rebased_kernels.backend import Problem
from rebased_kernels.spec import LinearAttention

from .layout import DK, padded_value_dim
from .options import KernelOptions

DTYPES: dict[torch.dtype, str] = {
    torch.bfloat16: "bfloat16",
    torch.float16: "float16",
    torch.float32: "float32",
}
DEFAULT_CONFIG: dict[str, Any] = {"chunk_size": 64, "num_stages": 2, "threads": 256}
"""Every kernel's defaults (forward and both backward sweeps). BC = 64 with 256 compute
threads: 168 registers a thread and no spills for sm_90a at Dv = 64 (nvcc 13.0), for the
forward of ``rebased`` and of ``based`` with an initial state alike (its c1 and c0 blocks
live in shared memory); 128 threads spill, the fp32 S_2 alone being 128 registers a thread.
The backward sweeps: 168 registers and no spills for ``rebased``, none (dq) and 44 bytes
(dk/dv) spilled for ``based`` with its states; 160 KiB of shared memory (bf16). Float32
halves that: see ``FP32_CONFIG``."""
FP32_CONFIG: dict[str, Any] = {"chunk_size": 32, "num_stages": 2, "threads": 128}
"""Float32's defaults: at BC = 64 its fp32 chunk tiles took the backward sweeps to 298 KB of
shared memory (the H200 refused them: 227 KB at most), BC = 32 at 256 threads does not lower
(TileLang 0.1.15), BC = 32 at 128 threads needs 187 KB (dq), 186 KB (dk/dv), 137 KB
(forward); ``tests/test_tilelang.py`` reads each kernel's size from its sm_90a lowering."""
MAX_SHARED_BYTES = 232_448
"""Dynamic shared memory a Hopper block may opt in to (227 KiB)."""
_PARSE_LOCK = threading.Lock()
"""Held while TVMScript parses a kernel (``prim_func``): its ``ast`` use is not thread-safe."""
AST_RACE = "AST constructor recursion depth mismatch"
"""CPython's spurious ``SystemError`` of concurrent ``ast`` use (gh-106905): retried."""
KINDS = ("forward", "state", "dq", "dkv", "cotangent", "tile", "tile_dq", "tile_dkv")
"""The kernels: ``kernels.forward_kernel``, ``kernels.state_kernel`` (the forward's walk
without its output: the segments' sums of a split sequence, ``split``),
``backward.dq_kernel``, ``backward.dkv_kernel``, ``backward.cotangent_kernel`` (the dk/dv
sweep's walk without its outputs: the segments' cotangent sums), ``tile.tile_forward_kernel``
and ``tile_backward.tile_dq_kernel`` / ``tile_dkv_kernel`` (one program per chunk from its
segment's start or end: configuration ``forward="tiles"``; they always read their segment's
state, and their ``state`` flag says whether it carries the caller's)."""
SWEEPS = ("dq", "dkv", "cotangent", "tile_dq", "tile_dkv")
"""The kernels of the backward, on ``SWEEP_DTYPE`` operands."""
SWEEP_DTYPE = torch.float32
"""The gradient sweeps' operand dtype for every input dtype: bf16 / fp16 inputs are widened
to float32 (tf32 products, ``FP32_CONFIG``), as triton's sweeps take tf32 operands. On an
H200 (session 10) the half sweeps measured 1.5e-2 (bf16, d gamma_q) and 1.04e-2 (fp16, dq, T
= 1) against the 1e-2 rule, their fp32 twins 6.5e-3 on the worst draw; the configuration
(``chunk_size``, ``num_stages``, ``threads``) applies to the forward."""


def kernel_dtype(kind: str, dtype: torch.dtype, carried: bool) -> torch.dtype:
    """The operand dtype kernel ``kind`` runs in for inputs of ``dtype``: ``SWEEP_DTYPE`` for
    the gradient sweeps and for a forward (or state walk) whose state carries a caller's
    (``carried``), whose products an arbitrary state's entries need exact (triton's
    ``CARRIED_SP`` is tf32 too: on an H200, session 11, bf16 products of a carried state
    measured 1.13e-2 on o at T = 1 against the 1e-2 rule); else the inputs' own (a segment's
    initial state summed from the call's own tokens, as triton's ``HALF_SP``)."""
    return SWEEP_DTYPE if kind in SWEEPS or carried else dtype


FORWARDS = ("walk", "tiles")
"""How the forward runs (``config["forward"]``): the chunk walk (``kernels.forward_kernel``,
one program per (batch, head) or segment) or one program per chunk from its segment's start
(``tile.tile_forward_kernel``, then ``tile_backward``'s kernels; segments of
``config["segment"]`` tokens, ``TILE_SEGMENT`` when that is 0, None or "auto")."""
DEFAULT_FORWARD = "walk"
"""The forward where a configuration leaves it None: the walk, until a GPU run has timed the
tile forward and passed the property suite with it."""
TILE_SEGMENT = 256
"""Tokens per segment of the tile kernels by default (triton's ``tiles`` 64 x 4; 4 chunks of
the forward's 64, 8 of the sweeps' 32): a chunk takes at most this many tokens' pairs
quadratically; longer segments cost more pairs, shorter ones more state sums (~65 KB each
at Dv = 64, written, scanned and read)."""


def forward_variant(config: dict | None) -> str:
    """``config["forward"]`` (None or absent: ``DEFAULT_FORWARD``), one of ``FORWARDS``;
    raises ``ValueError`` for anything else."""
    given = (config or {}).get("forward")
    given = DEFAULT_FORWARD if given is None else given
    if given not in FORWARDS:
        raise ValueError(f"tilelang forward {given!r} is not one of {FORWARDS}")
    return given


def tile_segment(config: dict | None, BC: int) -> int:
    """Tokens per segment of the tile kernels at chunk length BC: ``config["segment"]`` when it
    is a positive token count (a multiple of BC), ``TILE_SEGMENT`` (rounded up to a multiple
    of BC) when it is None, 0 or "auto". Raises ``ValueError`` for anything else, as
    ``split.segment`` does, and for a count that is not a multiple of BC."""
    given = (config or {}).get("segment")
    if given is None or given == 0 or given == "auto":
        return -(-TILE_SEGMENT // BC) * BC
    if isinstance(given, bool) or not isinstance(given, int) or given < 0:
        raise ValueError(f"tilelang segment {given!r} is not a token count >= 0 or 'auto'")
    if given % BC:
        raise ValueError(f"tilelang segment {given} of the tile kernels is not a multiple of "
                         f"the chunk length {BC}")  # fmt: skip
    return given


def default_config(dtype: str) -> dict[str, Any]:
    """``DEFAULT_CONFIG``, or ``FP32_CONFIG`` for ``"float32"`` (``DTYPES``' names)."""
    return dict(FP32_CONFIG if dtype == "float32" else DEFAULT_CONFIG)


def unsupported_reason(attn: LinearAttention, D: int, Dv: int, dtype: torch.dtype) -> str | None:
    """Why the kernels cannot compute this problem (None when they can)."""
    fm = attn.feature_map
    if fm.degree > 2:
        return f"computes kernels c0 + c1 s + c2 s^2 (degree <= 2), not degree {fm.degree}"
    if D > DK or Dv > 64:
        return f"keeps the whole state on chip for D <= 16 and Dv <= 64, not D={D}, Dv={Dv}"
    if dtype not in DTYPES:
        return f"supports dtypes {sorted(str(d) for d in DTYPES)}, not {dtype}"
    return None


TF32_ON_C = False
"""Whether a C-target kernel emulates tf32 products (``KernelOptions.tf32``): what the tests
that check the GPU's numerics on the CPU set (``tests/test_tilelang.py``)."""


def options(attn: LinearAttention, dtype: torch.dtype, device_type: str, state: bool,
            config: dict | None) -> KernelOptions:  # fmt: skip
    """The ``KernelOptions`` of a call: its attention, dtype and device type (``"cuda"``, or
    the C target for any other), and ``config`` (``DEFAULT_CONFIG``'s keys; what it leaves
    out or sets to None comes from ``default_config(dtype)``)."""
    given = {key: value for key, value in (config or {}).items() if value is not None}
    cfg = {**default_config(DTYPES[dtype]), **given}
    fm = attn.feature_map
    return KernelOptions(
        norm=fm.pre.norm, powers=fm.powers, normalize=attn.normalize, state=state,
        dtype=DTYPES[dtype], BC=cfg["chunk_size"], num_stages=cfg["num_stages"],
        threads=cfg["threads"], target="cuda" if device_type == "cuda" else "c",
        tf32=TF32_ON_C and device_type != "cuda",
    )  # fmt: skip


class CompileKey(NamedTuple):
    """What one compiled kernel is built for: ``compiled(*key)``."""

    kind: str  # one of KINDS
    BV: int  # the value columns: 16, 32, 48 or 64 in fp32, 32 or 64 in bf16 / fp16
    opt: KernelOptions


def compile_key(kind: str, problem: Problem, state: bool, config: dict | None,
                carried: bool | None = None, wide: bool = False) -> CompileKey:  # fmt: skip
    """The ``CompileKey`` of kernel ``kind`` for ``problem`` in ``config``, ``state`` as in
    ``KernelOptions`` (the forward, the state walk and the dq sweep: an initial state is
    given; the dk/dv sweep: a final-state cotangent is); ``carried`` (default: ``state``):
    that state holds a caller's (``kernel_dtype``), not only sums of the call's own
    segments; ``wide``: on the sweeps' operands whatever ``kernel_dtype`` says (the state
    walk of a backward). Raises ``ValueError`` for what ``unsupported_reason`` names."""
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is not one of {KINDS}")
    attn, D, Dv, dtype = problem.attention, problem.D, problem.Dv, problem.dtype
    reason = unsupported_reason(attn, D, Dv, dtype)
    if reason:
        raise ValueError(f"the tilelang {kind} kernel {reason}")
    tiles = forward_variant(config) == "tiles"  # (its value columns: padded_value_dim)
    operands = (
        SWEEP_DTYPE if wide else kernel_dtype(kind, dtype, state if carried is None else carried)
    )
    if operands != dtype:  # widened: its own defaults
        dtype, config = operands, None
    opt = options(attn, dtype, problem.device_type, state, config)
    return CompileKey(kind, padded_value_dim(Dv, dtype.itemsize, tiles), opt)


def compile_classes(problems: Iterable[Problem], configs: Iterable[dict | None] = (None,),
                    states: Iterable[bool] = (False, True),
                    kinds: Iterable[str] = KINDS) -> list[CompileKey]:  # fmt: skip
    """The distinct ``CompileKey`` that running ``problems`` needs, in first-seen order: each
    of ``kinds`` (every kernel by default) in each of ``configs``, with and without a state
    (``states``), and what a split sequence (``split``) adds: a forward reading a state of
    the call's own segments (the input dtype, not widened) and the state walk on the sweeps'
    operands (the backward's segment sums); a state walk always starts from zero; the tile
    kernels (``forward_variant`` "tiles", where they replace the forward and the dq and dk/dv
    walks; the segments' sums stay) always read their segments' states, ``state`` saying
    whether those carry the caller's. Raises ``ValueError`` as ``compile_key``."""
    configs, states, kinds = list(configs), list(states), list(kinds)
    keys: dict[CompileKey, None] = {}
    for problem in problems:
        for config in configs:
            for state in states:
                for kind in kinds:
                    tiles = forward_variant(config) == "tiles"
                    if kind.startswith("tile") != tiles and kind not in ("state", "cotangent"):
                        continue  # the tile kernels where asked for, else the walks
                    if kind in ("state", "cotangent") and state:
                        continue  # a segment's own sums start from zero
                    keys[compile_key(kind, problem, state, config)] = None
                    if kind == "forward" and state:
                        keys[compile_key(kind, problem, True, config, carried=False)] = None
                    if kind == "state":
                        keys[compile_key(kind, problem, False, config, wide=True)] = None
    return list(keys)


def prim_func(kind: str, BV: int, opt: KernelOptions) -> Any:
    """The ``T.prim_func`` of kernel ``kind`` (one of ``KINDS``) for BV value columns
    (``layout.padded_value_dim``), built with ``opt``."""
    from .backward import cotangent_kernel, dkv_kernel, dq_kernel
    from .kernels import forward_kernel, state_kernel
    from .tile import tile_forward_kernel
    from .tile_backward import tile_dkv_kernel, tile_dq_kernel

    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is not one of {KINDS}")
    builders = {"forward": forward_kernel, "state": state_kernel, "dq": dq_kernel,
                "dkv": dkv_kernel, "cotangent": cotangent_kernel,
                "tile": tile_forward_kernel, "tile_dq": tile_dq_kernel,
                "tile_dkv": tile_dkv_kernel}  # fmt: skip
    return builders[kind](BV, opt)


@functools.cache
def compiled(kind: str, BV: int, opt: KernelOptions) -> Any:
    """The compiled kernel ``kind`` (``prim_func``; a ``tilelang.JITKernel``) of one
    ``CompileKey``: every batch size, length, head count, D <= 16 and polynomial with these
    powers reuses it, and every Dv that pads to BV."""
    import tilelang

    with _PARSE_LOCK:  # the parse alone: the lowering and nvcc / gcc run in parallel
        func = prim_func(kind, BV, opt)
    return tilelang.compile(func, target=opt.target)


def precompile(
    keys: Iterable[CompileKey], workers: int | None = None
) -> dict[CompileKey, Exception]:
    """Build ``compiled(*key)`` for every key on ``workers`` threads (default: one per key,
    at most one per CPU core), so that later calls find them in its cache. Returns the keys
    that did not build, with the exception each raised (empty when all did); some
    configurations do not lower (``DEFAULT_CONFIG``'s notes). A build that raised CPython's
    ``AST_RACE`` is built again after the pool, alone."""
    keys = list(dict.fromkeys(keys))
    workers = workers or max(1, min(len(keys), os.cpu_count() or 1))

    def build(key: CompileKey) -> Exception | None:
        try:
            compiled(*key)
        except Exception as error:  # recorded for the caller, the other keys still build
            return error
        return None

    with ThreadPoolExecutor(workers) as pool:
        errors = list(pool.map(build, keys))
    errors = [  # alone now: no other thread can race its ast use
        build(key) if isinstance(error, SystemError) and AST_RACE in str(error) else error
        for key, error in zip(keys, errors)
    ]
    return {key: error for key, error in zip(keys, errors) if error is not None}


def precompile_problems(problems: Iterable[Problem], configs: Iterable[dict | None] = (None,),
                        workers: int | None = None) -> dict:  # fmt: skip
    """``precompile`` of ``compile_classes(problems, configs)`` (each kind, with and without
    a state): ``{"keys": how many, "seconds": wall, "failed": {key: error}}`` (the key as
    ``"kind opt"``, the error's repr, both cut to 300 characters)."""
    keys = compile_classes(problems, configs)
    start = time.perf_counter()
    failed = precompile(keys, workers)
    return dict(keys=len(keys), seconds=round(time.perf_counter() - start, 1),
                failed={f"{k.kind} {k.opt}": repr(e)[:300] for k, e in failed.items()})  # fmt: skip
