"""The TileLang forward (issue 4: every kernel of degree <= 2) on a machine without a GPU.

* Lowering: ``forward_kernel`` lowers to CUDA C++ for Hopper (``sm_90a``) with no GPU
  present; each ``T.gemm`` becomes one ``tl::wgmma_ss`` call site (four for ``c2 s^2``:
  q'k'^T, A v, Q^(2) S_2, K^(2)T v; a fifth, q' S_1, with a ``c1 s`` term) and the chunk
  loads become TMA loads. Where ``nvcc`` is installed, that source also compiles to an
  sm_90a cubin: the PTX holds ``wgmma.mma_async`` and bulk-tensor copies and ptxas spills
  nothing, for ``rebased`` and for ``based`` with an initial state.
* Numerics: the same ``prim_func`` (``target="c"``: static shared tiles, a serial row sum)
  compiled by TileLang's C backend, run on float32 CPU tensors through ``call.forward``: o,
  S and z against the float64 oracle at the float32 tolerance (1e-4), for presets and user
  polynomials ``c0 + c1 s + c2 s^2`` with and without each power, normalised or not, with
  and without an initial state (mapped into the kernel's layout by ``call.kernel_state``,
  whose round trip through ``call.canonical_state`` is exact).

What the C target cannot cover: the CUDA-only code paths, i.e. the ``T.reduce_sum`` warp
reduction of ``A 1``, the fragment layouts, wgmma, TMA, the thread partition of the fp32
state sums and the warp-specialised pipeline that ``T.Pipelined`` becomes on Hopper (in C it
is a serial loop, and ``num_stages`` and ``threads`` change nothing); and half precision,
since TileLang 0.1.15's C target compiles neither bfloat16 (its BF16 legalisation leaves the
static shared tiles undefined) nor float16 (its C templates lack the float4 -> half4
conversion), so the rounding of the tensor-core operands to bf16 / fp16 is not exercised.
Those need a GPU run.
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
USER_MAPS = {
    fm.name: fm
    for fm in (
        # c0 and c2 != 1 without c1, and the affine-only pre-transform
        FeatureMap("lifted_x2", PreTransform(False, "gamma_beta"), (0.25, 0.0, 0.5)),
        # degree 1: no quadratic block at all; LayerNorm with gamma only
        FeatureMap("affine", PreTransform(True, "gamma"), (0.5, 2.0)),
    )
}
MAPS = {**PRESETS, **USER_MAPS}
BASED = {"coeffs": (1.0, 1.0, 0.5), "initial_state": True}
LOW_POWER_TILES = {"b_S1", "b_S1acc", "b_z1", "b_S0acc", "b_z0"}
"""The on-chip tiles of the c1 and c0 blocks: absent from a c2-only kernel."""


@functools.cache
def _hopper_source(dtype: str, based: bool = False) -> str:
    """The CUDA C++ of the default configuration at H=4, D=16, Dv=64, lowered for sm_90a:
    ``rebased``'s kernel, or (``based``) ``based``'s with an initial state."""
    from rebased_kernels.backends.tilelang.kernels import forward_kernel
    from tilelang import tvm

    cfg = call.DEFAULT_CONFIG
    func = forward_kernel(4, 16, 64, dtype=dtype, BC=cfg["chunk_size"],
                          num_stages=cfg["num_stages"], threads=cfg["threads"],
                          **(BASED if based else {}))  # fmt: skip
    target = tvm.target.Target({"kind": "cuda", "arch": "sm_90a"})
    with target:
        return tilelang.lower(func, target=target).kernel_source


@pytest.mark.parametrize(
    ("dtype", "kind", "based", "gemms"),
    [("bfloat16", "kBFloat16", False, 4), ("float16", "kFloat16", False, 4),
     ("bfloat16", "kBFloat16", True, 5)],
)  # fmt: skip
def test_forward_lowers_to_hopper_wgmma(dtype: str, kind: str, based: bool, gemms: int) -> None:
    """Every T.gemm (q'k'^T, A v, Q^(2) S_2, K^(2)T v, and q' S_1 for based) is one wgmma
    call site with operands of the input dtype and an fp32 accumulator; q, k, v chunks
    arrive by TMA. Only based reads a state (S and z) and holds the c1 and c0 tiles; its
    state has 256 + 16 + 1 rows."""
    src = _hopper_source(dtype, based)
    calls = re.findall(r"tl::wgmma_ss<([^>]*)>", src)
    assert len(calls) == gemms, f"expected {gemms} wgmma_ss call sites, found {len(calls)}"
    for args in calls:
        assert args.startswith(f"tl::DataType::{kind}, tl::DataType::{kind}, "
                               "tl::DataType::kFloat32"), args  # fmt: skip
    assert src.count("tl::tma_load(") == 3
    assert "mma_sync" not in src  # no fallback to the pre-Hopper tensor-core path
    state_reads = re.findall(r"= (?:\*\(float\d?\*\)\()?([Sz])(?:\[| \+)", src)
    assert set(state_reads) == ({"S", "z"} if based else set()), state_reads
    tiles = set(re.findall(r"\bb_\w+", src)) & LOW_POWER_TILES
    assert tiles == (LOW_POWER_TILES if based else set()), tiles
    assert ("(int64_t)273" in src) == based  # z's row stride: 256 + 16 + 1 rows for based


@pytest.mark.parametrize("based", [False, True])
def test_hopper_source_compiles_for_sm90a(tmp_path: Path, based: bool) -> None:
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
    src.write_text(_hopper_source("bfloat16", based))
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


@pytest.mark.parametrize(
    ("name", "D", "Dv"), [("based", 5, 7), ("rebased", 16, 3), ("affine", 3, 2), ("x2", 1, 1)]
)
def test_state_maps_are_inverse(name: str, D: int, Dv: int) -> None:
    """``canonical_state(kernel_state(S, z)) == (S, z)`` bit for bit on random canonical
    float32 states; the kernel's quadratic rows come out symmetric, its padding rows zero."""
    attn = LinearAttention(MAPS[name], D**-0.5)
    F = attn.feature_map.num_features(D)
    g = torch.Generator().manual_seed(D * 100 + Dv)
    S, z = torch.randn(2, 3, F, Dv, generator=g), torch.randn(2, 3, F, generator=g)
    S_k, z_k = call.kernel_state(S, z, attn, D)
    S_back, z_back = call.canonical_state(S_k, z_k, attn, D)
    assert S_back.dtype == z_back.dtype == torch.float32
    assert torch.equal(S_back, S) and torch.equal(z_back, z)
    if 2 in attn.feature_map.powers:  # block 2 comes first: rows 16 a + b
        Z = z_k[..., :256].unflatten(-1, (16, 16))
        assert torch.equal(Z, Z.transpose(-1, -2))
        assert not Z[..., D:, :].any() and Z[..., :D, :D].all()


def _state(fm: FeatureMap, B: int, H: int, D: int, Dv: int, seed: int, normalize: bool):
    """A fresh canonical float32 initial state: the oracle's final state after a random
    19-token prefix when normalised (so ``den`` stays a sum of similarities), else randn."""
    if normalize:
        x = random_inputs(B, 19, H, D, Dv, torch.float64, "cpu", fm, seed, requires_grad=False)
        attn = LinearAttention(fm, D**-0.5)
        _, S0, z0 = reference.quadratic(x["q"], x["k"], x["v"], attn,
                                        tuple(x.get(n) for n in PARAMS))  # fmt: skip
        return S0.float(), z0.float()
    g = torch.Generator().manual_seed(seed)
    F = fm.num_features(D)
    return torch.randn(B, H, F, Dv, generator=g), torch.randn(B, H, F, generator=g)


CASES = [
    # feature map, normalize, initial state, B, H, D, Dv, chunk, lengths (one compile
    # serves every B and T; every length > chunk ends in a partial chunk)
    ("rebased", True, False, 2, 2, 16, 32, 32, (1, 77)),
    ("norm_x2", False, True, 1, 3, 8, 17, 16, (40,)),
    ("lifted_x2", True, False, 1, 1, 16, 64, 64, (130,)),
    ("based", True, True, 2, 2, 16, 24, 16, (1, 50)),
    ("affine", False, True, 1, 2, 5, 8, 16, (33,)),
]


@pytest.mark.parametrize(("name", "normalize", "init", "B", "H", "D", "Dv", "BC", "lengths"), CASES)
def test_c_target_matches_the_oracle(
    name: str, normalize: bool, init: bool, B: int, H: int, D: int, Dv: int, BC: int,
    lengths: tuple[int, ...],
) -> None:  # fmt: skip
    """o, S, z of the C-compiled forward (float32) against ``reference.quadratic``: masked
    tail chunks, D < 16 and Dv < BV padding, LayerNorm with gamma and beta, the power sets
    {2}, {0, 2}, {0, 1, 2} and {0, 1}, normalize=False, initial states."""
    fm = MAPS[name]
    attn = LinearAttention(fm, D**-0.5, normalize=normalize)
    for T in lengths:
        x = random_inputs(B, T, H, D, Dv, torch.float64, "cpu", fm, seed=T, requires_grad=False)
        params = tuple(x.get(n) for n in PARAMS)
        S0, z0 = _state(fm, B, H, D, Dv, T + 1, normalize) if init else (None, None)
        ours = call.forward(
            Inputs(x["q"].float(), x["k"].float(), x["v"].float(),
                   *(None if p is None else p.float() for p in params), S0, z0),
            attn, {"chunk_size": BC},
        )  # fmt: skip
        # the oracle on the same float32-rounded inputs
        x32 = {n: t.float().double() for n, t in x.items()}
        state = None if S0 is None else (S0.double(), z0.double())
        ref = reference.quadratic(x32["q"], x32["k"], x32["v"], attn,
                                  tuple(x32.get(n) for n in PARAMS), state)  # fmt: skip
        for out, want, what in zip(ours, ref, "oSz"):
            assert_close(out, want, torch.float32, f"{name} B={B} T={T} BC={BC} {what}")


def test_unsupported_problems_raise() -> None:
    """What the kernel does not compute is refused with a reason, before any compile."""
    from rebased_kernels.backends.tilelang.kernels import forward_kernel

    x = random_inputs(1, 8, 1, 16, 8, torch.float32, "cpu", "based", requires_grad=False)
    inputs = Inputs(x["q"], x["k"], x["v"])
    cubic = FeatureMap("cubic", PreTransform(True, "gamma_beta"), (0.0, 0.0, 1.0, 0.1))
    with pytest.raises(ValueError, match=r"degree <= 2"):
        call.forward(inputs, LinearAttention(cubic, 0.25))
    x64 = Inputs(*(t.double() for t in inputs[:3]))
    with pytest.raises(ValueError, match="float64"):
        call.forward(x64, LinearAttention(PRESETS["x2"], 0.25))
    with pytest.raises(ValueError, match="D <= 16"):
        forward_kernel(1, 32, 8)
    with pytest.raises(ValueError, match="multiple of 16"):
        forward_kernel(1, 16, 8, BC=24)
    with pytest.raises(ValueError, match="c0, c1, c2 >= 0"):
        forward_kernel(1, 16, 8, coeffs=(1.0, -1.0))
