"""The TileLang forward (issue 4, first step) on a machine without a GPU.

* Lowering: ``forward_kernel`` lowers to CUDA C++ for Hopper (``sm_90a``) with no GPU
  present; each of its four ``T.gemm`` becomes a ``tl::wgmma_ss`` call and the chunk loads
  become TMA loads. Where ``nvcc`` is installed, that source also compiles to an sm_90a
  cubin: the PTX holds ``wgmma.mma_async`` and bulk-tensor copies and ptxas spills nothing.
* Numerics: the same ``prim_func`` (``target="c"``: static shared tiles, a serial row sum)
  compiled by TileLang's C backend, run on float32 CPU tensors through ``call.forward``: o,
  S and z against the float64 oracle at the float32 tolerance (1e-4).

What the C target cannot cover: the CUDA-only code paths, i.e. the ``T.reduce_sum`` warp
reduction of ``A 1``, the fragment layouts, wgmma, TMA and the warp-specialised pipeline
that ``T.Pipelined`` becomes on Hopper (in C it is a serial loop, and ``num_stages`` and
``threads`` change nothing); and half precision, since TileLang 0.1.15's C target compiles
neither bfloat16 (its BF16 legalisation leaves the static shared tiles undefined) nor float16
(its C templates lack the float4 -> half4 conversion), so the rounding of the tensor-core
operands to bf16 / fp16 is not exercised. Those need a GPU run.
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from rebased_kernels.backends.tilelang import call

from rebased_kernels import reference
from rebased_kernels.backend import Inputs
from rebased_kernels.spec import PRESETS, FeatureMap, LinearAttention, PreTransform
from rebased_kernels.testing import assert_close, random_inputs

tilelang = pytest.importorskip("tilelang")

PARAMS = ("q_weight", "q_bias", "k_weight", "k_bias")
HALF_X2 = FeatureMap("half_x2", PreTransform(False, "gamma_beta"), (0.0, 0.0, 0.5))
"""A user kernel ``0.5 s^2`` without LayerNorm: c2 != 1 and the affine-only pre-transform."""


@functools.cache
def _hopper_source(dtype: str) -> str:
    """The CUDA C++ of the default configuration at H=4, D=16, Dv=64, lowered for sm_90a."""
    from rebased_kernels.backends.tilelang.kernels import forward_kernel
    from tilelang import tvm

    cfg = call.DEFAULT_CONFIG
    func = forward_kernel(4, 16, 64, dtype=dtype, BC=cfg["chunk_size"],
                          num_stages=cfg["num_stages"], threads=cfg["threads"])  # fmt: skip
    target = tvm.target.Target({"kind": "cuda", "arch": "sm_90a"})
    with target:
        return tilelang.lower(func, target=target).kernel_source


@pytest.mark.parametrize(("dtype", "kind"), [("bfloat16", "kBFloat16"), ("float16", "kFloat16")])
def test_forward_lowers_to_hopper_wgmma(dtype: str, kind: str) -> None:
    """Every T.gemm (q'k'^T, A v, phi(q') S, phi(k')^T v) is one wgmma call site with
    operands of the input dtype and an fp32 accumulator; q, k, v chunks arrive by TMA."""
    src = _hopper_source(dtype)
    calls = re.findall(r"tl::wgmma_ss<([^>]*)>", src)
    assert len(calls) == 4, f"expected 4 wgmma_ss call sites, found {len(calls)}"
    for args in calls:
        assert args.startswith(f"tl::DataType::{kind}, tl::DataType::{kind}, "
                               "tl::DataType::kFloat32"), args  # fmt: skip
    assert src.count("tl::tma_load(") == 3
    assert "mma_sync" not in src  # no fallback to the pre-Hopper tensor-core path


def test_hopper_source_compiles_for_sm90a(tmp_path: Path) -> None:
    """nvcc builds the lowered source for sm_90a: wgmma and TMA in the PTX, no spills."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not installed: the CUDA source is lowered but not compiled")
    release = re.search(r"release (\d+)\.", subprocess.run([nvcc, "--version"],
                        capture_output=True, text=True).stdout)  # fmt: skip
    if release is None or int(release.group(1)) < 12:
        pytest.skip("nvcc older than CUDA 12 has no sm_90a: the source is lowered only")
    from tilelang.contrib.nvcc import default_compile_options

    src, cubin = tmp_path / "forward.cu", tmp_path / "forward.cubin"
    src.write_text(_hopper_source("bfloat16"))
    cmd = [nvcc, *default_compile_options(), "-w", "--cubin", "-O3", "--keep",
           f"--keep-dir={tmp_path}", "-gencode", "arch=compute_90a,code=sm_90a",
           "-Xptxas=-v", "-o", str(cubin), str(src)]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    ptx = "\n".join(p.read_text() for p in tmp_path.glob("*.ptx"))
    assert "wgmma.mma_async.sync.aligned" in ptx and ".f32.bf16.bf16" in ptx
    assert "cp.async.bulk.tensor" in ptx
    assert re.search(r"\b0 bytes spill stores", log), log[-2000:]


CASES = [
    # feature map, B, H, D, Dv, chunk, lengths (one compile serves every B and T)
    ("rebased", 2, 2, 16, 32, 32, (1, 77)),
    ("norm_x2", 1, 3, 8, 17, 16, (40,)),
    ("half_x2", 1, 1, 16, 64, 64, (130,)),
]


@pytest.mark.parametrize(("name", "B", "H", "D", "Dv", "BC", "lengths"), CASES)
def test_c_target_matches_the_oracle(
    name: str, B: int, H: int, D: int, Dv: int, BC: int, lengths: tuple[int, ...]
) -> None:
    """o, S, z of the C-compiled forward (float32) against ``reference.quadratic``: masked
    tail chunks, D < 16 and Dv < BV padding, LayerNorm with gamma and beta, c2 != 1."""
    fm = HALF_X2 if name == "half_x2" else PRESETS[name]
    attn = LinearAttention(fm, D**-0.5)
    for T in lengths:
        x = random_inputs(B, T, H, D, Dv, torch.float64, "cpu", fm, seed=T, requires_grad=False)
        params = tuple(x.get(n) for n in PARAMS)
        ours = call.forward(
            Inputs(x["q"].float(), x["k"].float(), x["v"].float(),
                   *(None if p is None else p.float() for p in params)),
            attn, {"chunk_size": BC},
        )  # fmt: skip
        # the oracle on the same float32-rounded inputs
        x32 = {n: t.float().double() for n, t in x.items()}
        ref = reference.quadratic(x32["q"], x32["k"], x32["v"], attn,
                                  tuple(x32.get(n) for n in PARAMS))  # fmt: skip
        for out, want, what in zip(ours, ref, "oSz"):
            assert_close(out, want, torch.float32, f"{name} B={B} T={T} BC={BC} {what}")


def test_unsupported_problems_raise() -> None:
    """What the kernel does not compute is refused with a reason, before any compile."""
    from rebased_kernels.backends.tilelang.kernels import forward_kernel

    x = random_inputs(1, 8, 1, 16, 8, torch.float32, "cpu", "based", requires_grad=False)
    inputs = Inputs(x["q"], x["k"], x["v"])
    with pytest.raises(ValueError, match=r"c2 \(scale q'\.k'\)\^2"):
        call.forward(inputs, LinearAttention(PRESETS["based"], 0.25))
    with pytest.raises(ValueError, match="normalised"):
        call.forward(inputs, LinearAttention(PRESETS["x2"], 0.25, normalize=False))
    state = inputs._replace(S0=torch.zeros(1, 1, 136, 8), z0=torch.zeros(1, 1, 136))
    with pytest.raises(ValueError, match="initial state"):
        call.forward(state, LinearAttention(PRESETS["x2"], 0.25))
    with pytest.raises(ValueError, match="D <= 16"):
        forward_kernel(1, 32, 8)
    with pytest.raises(ValueError, match="multiple of 16"):
        forward_kernel(1, 16, 8, BC=24)
