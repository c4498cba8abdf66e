"""The TileLang kernels lowered to CUDA C++ for Hopper (``sm_90a``) on any machine.

No GPU is needed to lower: ``hopper_source`` returns the source TileLang would build on an
H100 / H200, which the tests inspect (wgmma call sites, TMA loads, launch bounds, which
buffers are read and written), and ``sm90a`` also compiles it with ``nvcc`` where one is
installed (ptxas' register and spill report, the PTX).
"""

from __future__ import annotations

import functools
import re
import subprocess
import tempfile
from pathlib import Path
from typing import NamedTuple

from .build import CompileKey, default_config, prim_func
from .options import KernelOptions

BASED = (0, 1, 2)
"""The Based kernel's powers (``1 + s + s^2 / 2``): every power block present."""


@functools.cache
def hopper_lowering(
    kind: str = "forward",
    dtype: str = "bfloat16",
    based: bool = False,
    BV: int = 64,
) -> tuple[str, int]:
    """The CUDA C++ of kernel ``kind`` (one of ``build.KINDS``) in ``build.default_config``
    for BV value columns (any B, T, H and D <= 16), lowered for sm_90a, and the dynamic
    shared memory its launch asks for (bytes; the device function's
    ``dyn_shared_memory_buf``, what a GPU checks against its limit):
    ``rebased``'s kernel (``c2 s^2``, LayerNorm, no state), or with ``based`` the Based
    polynomial ``1 + s + s^2 / 2`` (the same pre-transform) with the kernel's state flag set
    (the forward and the dq sweep read an initial state, the dk/dv sweep a final-state
    cotangent)."""
    import tilelang
    from tilelang import tvm

    cfg = default_config(dtype)
    opt = KernelOptions(state=based, dtype=dtype, BC=cfg["chunk_size"],
                        num_stages=cfg["num_stages"], threads=cfg["threads"],
                        **({"powers": BASED} if based else {}))  # fmt: skip
    func = prim_func(kind, BV, opt)
    target = tvm.target.Target({"kind": "cuda", "arch": "sm_90a"})
    with target:
        lowered = tilelang.lower(func, target=target)
    return lowered.kernel_source, _shared_bytes(lowered)


def _shared_bytes(lowered) -> int:
    """The dynamic shared memory a lowered kernel's launch asks for (bytes): its device
    function's ``dyn_shared_memory_buf``."""
    funcs = lowered.device_mod.functions.values()
    return max(int(f.attrs["dyn_shared_memory_buf"]) for f in funcs
               if f.attrs is not None and "dyn_shared_memory_buf" in f.attrs)  # fmt: skip


def hopper_source(kind: str = "forward", dtype: str = "bfloat16", based: bool = False) -> str:
    """``hopper_lowering``'s CUDA C++ alone."""
    return hopper_lowering(kind, dtype, based)[0]


class Sm90a(NamedTuple):
    """A kernel lowered (and, with nvcc, built) for sm_90a."""

    source: str  # the CUDA C++
    shared_bytes: int  # the dynamic shared memory of its launch
    returncode: int | None = None  # nvcc's (None: not built)
    log: str = ""  # nvcc's and ptxas -v's output: registers, spills
    ptx: str = ""  # the PTX nvcc kept


def sm90a(kind: str, dtype: str = "bfloat16", based: bool = False, nvcc: str | None = None):
    """``hopper_source(kind, dtype, based)`` as an ``Sm90a``, compiled to a cubin by ``nvcc``
    (CUDA >= 12; None: not compiled) with TileLang's compile options."""
    from tilelang.contrib.nvcc import default_compile_options

    source, shared = hopper_lowering(kind, dtype, based)
    if nvcc is None:
        return Sm90a(source, shared)
    with tempfile.TemporaryDirectory() as tmp:
        src, cubin = Path(tmp) / f"{kind}.cu", Path(tmp) / f"{kind}.cubin"
        src.write_text(source)
        cmd = [nvcc, *default_compile_options(), "-w", "--cubin", "-O3", "--keep",
               f"--keep-dir={tmp}", "-gencode", "arch=compute_90a,code=sm_90a",
               "-Xptxas=-v", "-o", str(cubin), str(src)]  # fmt: skip
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        ptx = "\n".join(p.read_text() for p in Path(tmp).glob("*.ptx"))
    return Sm90a(source, shared, result.returncode, result.stdout + result.stderr, ptx)


_BUFFER = re.compile(r"void\* (\w+) = \(\(void\*\)\(\(char\*\)buf_dyn_shmem \+ (\d+)\)\);")
"""A shared buffer's declaration in a lowered kernel: its name and byte offset."""
_PIPELINED = re.compile(r"for \(int (\w+) = 0;[^\n]*\{\n\s*mbarrier\[")
"""A pipelined loop of a lowered kernel (its body starts by waiting on a stage's barrier):
its variable."""
_STAGED = (
    r"\(\((\w+)\*\)(\w+)\)(?:\[|\s*\+\s*)[(\s]*(?:\(int64_t\))?(?:\(\(int\))?\(?"
    r"({var})\)? & (?:\(int64_t\))?1\)\s*\*\s*(?:\(int64_t\))?(\d+)"
)
"""An access to a two-stage buffer of a pipelined loop (variable ``var``): ``((type*)buf)[((var
& 1) * stride ...`` (element type, buffer, variable, stride in elements)."""
_BYTES = {"float": 4, "bfloat16_t": 2, "half_t": 2}


def staged_buffers(source: str) -> set[tuple[str, int]]:
    """``(buffer, stage bytes)`` of the tiles a lowered kernel's pipelined loops index by
    stage."""
    loops = "|".join(sorted(set(_PIPELINED.findall(source)))) or "(?!)"
    found = re.findall(_STAGED.format(var=loops), source)
    return {(name, int(stride) * _BYTES[kind]) for kind, name, _, stride in found if kind in _BYTES}


_TMA_TARGET = re.compile(r"tl::tma_load\([^;]*?\(\(\w+\*\)(\w+)\)")
"""A tile a lowered kernel's producer fills by TMA."""


def _pipelined_bodies(source: str) -> list[str]:
    """The bodies of a lowered kernel's pipelined loops (producer's and consumers')."""
    bodies = []
    for loop in _PIPELINED.finditer(source):
        start, depth = source.index("{", loop.start()), 0
        for end in range(start, len(source)):
            depth += {"{": 1, "}": -1}.get(source[end], 0)
            if depth == 0:
                bodies.append(source[start:end])
                break
    return bodies


def stage_clashes(source: str) -> list[str]:
    """The tiles of a lowered kernel that begin inside another's pipeline stages while that
    pipeline may overwrite them: one line each, none when every staged tile's allocation
    holds its stages. A tile in the stages of a TMA target clashes if it is used after the
    warp-specialised split (``warpgroup_reg_dealloc``: the producer loads while the
    consumers run); one in the stages of a tile the consumers write per stage, if it is
    used inside a pipelined loop. (TileLang 0.1.15 indexed a k' tile that two loops shared
    by stage in the pipelined one but allocated it once: its second stage lay on v's
    first, session 21.) Two stages (``j & 1``), as ``T.Pipelined`` with ``num_stages=2``
    lowers. A tile that begins below a staged one and runs into it is not seen: the source
    declares offsets, not sizes."""
    offsets = {name: int(at) for name, at in _BUFFER.findall(source)}
    lines = source.splitlines()
    split = next((i for i, line in enumerate(lines) if "warpgroup_reg_dealloc" in line), None)
    if split is None:
        return []
    after = "\n".join(lines[split:])
    in_loops = "\n".join(_pipelined_bodies(source))
    loaded = set(_TMA_TARGET.findall(source))
    clashes = set()
    for name, stage in staged_buffers(source):
        if name not in offsets:
            continue
        lo, hi = offsets[name], offsets[name] + 2 * stage
        live = after if name in loaded else in_loops
        for other, at in offsets.items():
            used = re.search(rf"\b{other}\b(?!\s*=\s*\(\(void)", live)
            if other != name and lo <= at < hi and used:
                clashes.add(f"{other} (at {at}) lies in {name}'s stages [{lo}, {hi})")
    return sorted(clashes)


def lower(key: CompileKey) -> str | None:
    """Lower one compile key's kernel for sm_90a (its ``opt.target`` aside): None, or the
    error TileLang raised (its layout inference and thread-sync checks run here, so a kernel
    that lowers is one a GPU's precompile builds, nvcc permitting), or the dynamic shared
    memory its launch would ask for where that is more than a Hopper block may have."""
    import tilelang
    from tilelang import tvm

    from .build import _PARSE_LOCK, MAX_SHARED_BYTES

    try:
        with _PARSE_LOCK:
            func = prim_func(key.kind, key.BV, key.opt)
        target = tvm.target.Target({"kind": "cuda", "arch": "sm_90a"})
        with target:
            lowered = tilelang.lower(func, target=target)
    except Exception as error:  # reported with its key
        return f"{type(error).__name__}: {error}"[:500]
    shared = _shared_bytes(lowered)
    if shared > MAX_SHARED_BYTES:
        return f"{shared} bytes of shared memory, more than a Hopper block's {MAX_SHARED_BYTES}"
    clashes = stage_clashes(lowered.kernel_source)
    return "; ".join(clashes) if clashes else None


def main(argv: list[str] | None = None) -> int:
    """``python -m rebased_kernels.backends.tilelang.hopper [--tiles] [--workers N]``: lower
    every kernel the GPU property suite precompiles (each preset of degree <= 2, normalised
    or not, bf16 / fp16 / fp32, the backend's test configurations; ``--tiles``: only the
    tile configuration's) for sm_90a on this machine, and print each key's result; exit 1
    if any fails."""
    import argparse
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from rebased_kernels.backend import Problem
    from rebased_kernels.spec import PRESETS, LinearAttention

    from . import TileLangBackend
    from .build import compile_classes

    ap = argparse.ArgumentParser(prog="python -m rebased_kernels.backends.tilelang.hopper")
    ap.add_argument("--tiles", action="store_true")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args(argv)
    be = TileLangBackend()
    problems = [Problem(LinearAttention(fm, 0.25, normalize), 16, 16, dtype, "cuda")
                for dtype in (torch.bfloat16, torch.float16, torch.float32)
                for fm in PRESETS.values() for normalize in (False, True)]  # fmt: skip
    problems = [p for p in problems if be.unsupported_reason(p) is None]
    configs = [c for c in be.test_configs() if not args.tiles or c.get("forward") == "tiles"]
    keys = compile_classes(problems, configs)
    print(f"{len(keys)} kernels, lowered for sm_90a on {args.workers} threads", flush=True)
    failed = 0
    with ThreadPoolExecutor(args.workers) as pool:
        for key, error in zip(keys, pool.map(lower, keys)):
            failed += error is not None
            o = key.opt
            print(f"{key.kind:9} BV={key.BV:<2} {o.dtype:8} powers={o.powers} norm={o.norm:d} "
                  f"normalize={o.normalize:d} state={o.state:d} BC={o.BC}: {error or 'ok'}",
                  flush=True)  # fmt: skip
    print(f"{len(keys) - failed} lowered, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
