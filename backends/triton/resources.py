"""Registers and spills of the triton kernels on Hopper, without a GPU.

``python -m rebased_kernels.backends.triton.resources [--chunk 32,64] [--warps 4,8]
[--dot bf16]`` compiles each sweep kernel (forward, dq, dk/dv; ``walk``, ``packed`` and
``tiles``) and the packed state kernel for ``sm_90a`` with Triton's own ptxas and prints, per
configuration, the registers per thread and the stack (spill) bytes per thread that
``cuobjdump`` reports.
The state tiles are the kernels' register budget: a configuration that spills runs slower
(session 5: ~fp32 state products doubled the gradient sweeps' stack and made them 3x
slower on an H100). Numbers are from the local Triton, which may differ from a GPU's.
"""

from __future__ import annotations

import argparse
import inspect
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import kernels, packed

RUNTIME_INTS = {"T", "H", "D", "Dv", "NSEG", "NCS", "NORM", "NORMALIZE", "pgx_stride",
                "pgy_stride"}  # fmt: skip
FLOATS = {"sc", "C0", "C1", "C2", "eps"}
OPTIONS: dict = {}
"""Extra compile options of `_compile` (e.g. maxnreg, num_stages), for experiments."""


@dataclass(frozen=True)
class Usage:
    """ptxas's resource report of one compiled kernel (per thread, bytes for the stack)."""

    registers: int
    stack: int


def _signature(fn, constants: dict, types: dict | None = None) -> dict[str, str]:
    """Triton's argument types: constexpr for ``constants``, fp32 scalars, int32 sizes,
    fp32 pointers for the rest (the tensors) unless ``types`` names another."""
    sig = {}
    for name in inspect.signature(fn.fn).parameters:
        if name in constants:
            sig[name] = "constexpr"
        elif name in FLOATS:
            sig[name] = "fp32"
        elif name in RUNTIME_INTS:
            sig[name] = "i32"
        else:
            sig[name] = (types or {}).get(name, "*fp32")
    return sig


def _compile(fn, constants: dict, num_warps: int, arch: int = 90, types: dict | None = None,
             divisible: tuple[str, ...] = kernels.SPECIALISED):  # fmt: skip
    """``fn`` (a ``@triton.jit`` kernel) with ``constants``, compiled for ``sm_<arch>``;
    ``types``: pointer types by argument name (``"*bf16"``); every pointer and the integers
    named in ``divisible`` are taken as multiples of 16, as a launch with aligned tensors (and
    such sizes, where the kernel lets Triton specialise them) tells the compiler."""
    names = list(inspect.signature(fn.fn).parameters)
    sig = _signature(fn, constants, types)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n, t in sig.items()
             if t.startswith("*") or n in divisible}  # fmt: skip
    src = ASTSource(fn, sig, constexprs={(names.index(k),): v for k, v in constants.items()},
                    attrs=attrs)  # fmt: skip
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=num_warps, **OPTIONS))  # fmt: skip


PTX_OPS = {"fp32 fma": r"\bfma\.rn\.f32\b", "wgmma": r"\bwgmma\.mma_async\b",
           "mma": r"\bmma\.sync\b"}  # fmt: skip


def ptx_ops(fn, constants: dict, num_warps: int, arch: int = 90) -> dict[str, int]:
    """Static counts of ``PTX_OPS`` (CUDA-core fp32 FMAs, tensor-core instructions) in the
    PTX of ``fn`` compiled for ``sm_<arch>``: where a kernel's products run."""
    ptx = _compile(fn, constants, num_warps, arch).asm["ptx"]
    return {name: len(re.findall(pat, ptx)) for name, pat in PTX_OPS.items()}


def usage(fn, constants: dict, num_warps: int, arch: int = 90) -> Usage:
    """Compile ``fn`` (a ``@triton.jit`` kernel) with ``constants`` for ``sm_<arch>`` and
    read its registers and stack from the cubin."""
    compiled = _compile(fn, constants, num_warps, arch)
    tool = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        report = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True,
                                check=True).stdout  # fmt: skip
    m = re.search(r"REG:(\d+).*?STACK:(\d+)", report, re.S)
    if m is None:
        raise RuntimeError(f"no resource line in cuobjdump's report:\n{report}")
    return Usage(int(m[1]), int(m[2]))


def sweep_constants(mode: int, chunk: int, variant: str, dot: str, x3: bool = False,
                    features: str = "onehot") -> dict:  # fmt: skip
    """The constexprs of the D=16 sweep kernels the backend launches for ``mode`` (0 forward,
    1 dq, 2 dk/dv) with the value block of Dv = 64, for the ``rebased`` kernel, its feature
    rows formed as ``features`` says (``packed_call.FEATURES``)."""
    if variant == "walk":
        return dict(BC=chunk, BD=16, BV=64, RF=1 + 16 + 256, MODE=mode, HAS_WSC=mode == 2,
                    HAS_C2=True, DOT=dot, X3=x3, BA=16, REVERSE=mode == 2)  # fmt: skip
    c = dict(BC=chunk, BV=64, MODE=mode, HAS_WS=mode == 2, HAS_WSC=mode == 2, HAS_LIN=False,
             HAS_C2=True, DOT=dot, SP="ieee" if dot == "ieee" else "bf16")  # fmt: skip
    c["GATHER"] = features == "gather"
    if variant == "tiles":
        c.update(HAS_INIT=False, STATE=True, FB=packed.FB_ROWS, EVEN=False, ONEPASS=False)
    else:
        c["PREFIX"] = True
    return c


KERNELS = {"walk": kernels.sweep_kernel, "packed": packed.packed_sweep_kernel,
           "tiles": packed.packed_tile_kernel}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rebased_kernels.backends.triton.resources",
                                 description=__doc__.splitlines()[0])  # fmt: skip
    ap.add_argument("--chunk", default="32,64")
    ap.add_argument("--warps", default="8")
    ap.add_argument("--dot", default="bf16", help="forward operands: bf16, fp16 or ieee")
    ap.add_argument("--features", default="onehot", help="onehot or gather")
    args = ap.parse_args(argv)
    print(f"triton {triton.__version__}, sm_90a; stack = spilled bytes per thread")
    print(f"{'variant':>7} {'mode':>5} {'chunk':>5} {'warps':>5} {'regs':>5} {'stack':>6}")
    for variant, kernel in KERNELS.items():
        for mode in (0, 1, 2):
            dot = args.dot if mode == 0 else ("ieee" if args.dot == "ieee" else "tf32")
            for chunk in map(int, args.chunk.split(",")):
                for warps in map(int, args.warps.split(",")):
                    c = sweep_constants(mode, chunk, variant, dot, features=args.features)
                    u = usage(kernel, c, warps)
                    print(f"{variant:>7} {('fwd', 'dq', 'dk/dv')[mode]:>5} {chunk:>5} "
                          f"{warps:>5} {u.registers:>5} {u.stack:>6}", flush=True)  # fmt: skip
    for chunk in map(int, args.chunk.split(",")):
        for warps in map(int, args.warps.split(",")):
            c = dict(BC=chunk, BV=64, HAS_WS=False, HAS_WSC=False, HAS_LIN=False, HAS_C2=True,
                     SP="ieee" if args.dot == "ieee" else "bf16", FB=packed.FB_ROWS,
                     GATHER=args.features == "gather")  # fmt: skip
            u = usage(packed.packed_state_kernel, c, warps)
            print(f"{'state':>7} {'':>5} {chunk:>5} {warps:>5} {u.registers:>5} {u.stack:>6}",
                  flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
