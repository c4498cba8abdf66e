"""The triton backend beyond the property suite's D <= 16 draws: D in (16, 64], where S_2
stays in memory (on the CPU under TRITON_INTERPRET=1, on a GPU with
REBASED_KERNELS_TEST_DEVICE=cuda)."""

from __future__ import annotations

import importlib
from types import SimpleNamespace

import pytest
import torch
from rebased_kernels.backends.triton.launch import INTERPRET, interpreter_dtype_reason
from strategies import DEVICE

import rebased_kernels as rk
from rebased_kernels import reference
from rebased_kernels.backend import Inputs, get_backend
from rebased_kernels.spec import PRESETS, FeatureMap, LinearAttention, PreTransform
from rebased_kernels.testing import assert_close, feature_form_tolerance, random_inputs

PARAMS = ("q_weight", "q_bias", "k_weight", "k_bias")


def _available() -> bool:
    be = get_backend("triton")
    return be.unavailable_reason() is None and DEVICE.split(":")[0] in be.device_types


pytestmark = pytest.mark.skipif(not _available(), reason="triton cannot run on this device")


def _check_against_the_oracle(D: int, name: str | FeatureMap, normalize: bool, T: int, Dv: int,
                              config: dict, seed: int, state_io: bool = True) -> None:  # fmt: skip
    """o, S, z and every gradient (q, k, v, the four parameters, the initial state) of one
    triton call against the float64 oracle, with a random initial state; without
    ``state_io`` training's call: o and the input gradients, no state in or out."""
    fm = name if isinstance(name, FeatureMap) else PRESETS[name]
    x = random_inputs(1 if D > 16 else 2, T, 2 if D > 16 else 3, D, Dv, torch.float64, DEVICE, fm,
                      seed=seed, requires_grad=False)  # fmt: skip
    B, H = x["q"].shape[0], x["q"].shape[2]
    F = fm.num_features(D)
    g = torch.Generator().manual_seed(seed)
    S0 = (0.1 * torch.randn(B, H, F, Dv, generator=g, dtype=torch.float64)).to(DEVICE)
    z0 = torch.rand(B, H, F, generator=g, dtype=torch.float64).to(DEVICE)
    attn = LinearAttention(fm, D**-0.5, normalize=normalize)
    ref_in = {n: t.clone().requires_grad_() for n, t in x.items()}
    ref_state = (S0.clone().requires_grad_(), z0.clone().requires_grad_())
    params = tuple(ref_in.get(n) for n in PARAMS)
    if not state_io:
        ref_state = None
    ref = reference.quadratic(ref_in["q"], ref_in["k"], ref_in["v"], attn, params, ref_state)
    ours_in = {n: t.float().requires_grad_() for n, t in x.items()}
    state = (S0.float().requires_grad_(), z0.float().requires_grad_()) if state_io else None
    out = rk.linear_attention(
        **ours_in, feature_map=fm, normalize=normalize, backend="triton", initial_state=state,
        output_final_state=state_io, config=config,
    )  # fmt: skip
    ours = (out[0], out[1].S, out[1].z) if state_io else (out,)
    kappa = reference.condition(x["q"], x["k"], x["v"], attn, tuple(x.get(n) for n in PARAMS),
                                (S0, z0) if state_io else None)  # fmt: skip
    tol = feature_form_tolerance(torch.float32, kappa)
    what = f"D={D} {name} {config}"
    for a, b, n in zip(ours, ref, "oSz"):
        assert_close(a, b, torch.float32, f"{what} {n}", tol)
    cots = [torch.randn(r.shape, generator=g, dtype=torch.float64).to(DEVICE) for r in ref]
    sum((a.double() * c).sum() for a, c in zip(ours, cots)).backward()
    sum((b * c).sum() for b, c in zip(ref[: len(ours)], cots)).backward()
    pairs = [(ours_in[n].grad, ref_in[n].grad, n) for n in ours_in]
    if state_io:
        pairs += [(state[i].grad, ref_state[i].grad, f"{n}0") for i, n in enumerate("Sz")]
    for a, b, n in pairs:
        assert_close(a, b, torch.float32, f"{what} d{n}", tol)


@pytest.mark.parametrize("D, name", [(24, "rebased"), (64, "based")])
def test_large_feature_dims_match_the_oracle(D: int, name: str) -> None:
    _check_against_the_oracle(D, name, True, 45, 8, {"chunk_size": 32, "chunks_per_segment": 1},
                              seed=D)  # fmt: skip


@pytest.mark.parametrize("NSEG", [1, 5, 37])
@pytest.mark.parametrize("reverse", [False, True])
def test_prefix_over_segments_matches_cumsum(NSEG: int, reverse: bool) -> None:
    """The segment scan (one tile per program): exclusive prefix or suffix plus the initial
    state, in place, and the total."""
    from rebased_kernels.backends.triton.launch import scan as _scan

    g = torch.Generator().manual_seed(NSEG)
    seg = torch.randn(2, NSEG, 7, 45, generator=g).to(DEVICE)
    init = torch.randn(2, 7, 45, generator=g).to(DEVICE)
    walk = seg.flip(1) if reverse else seg
    incl = walk.cumsum(1)
    expect = incl - walk + init[:, None]
    expect = expect.flip(1) if reverse else expect
    prefix, total = _scan(seg.clone(), init, reverse)
    torch.testing.assert_close(prefix, expect, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(total, incl[:, -1] + init, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("affine", ["gamma_beta", "gamma", "none"])
def test_param_grads_sum_each_parameter_over_batch_and_blocks(shared: bool, affine) -> None:
    """``launch.param_grads``: the four partial sums ``[4, B*H, n, W]`` in one reduction give
    each parameter its own sum over batch and blocks (and heads when shared), columns past D
    dropped, None where the parameter is absent or unused."""
    from rebased_kernels.backends.triton.launch import param_grads

    B, H, n, W, D = 2, 3, 5, 16, 9
    g = torch.Generator().manual_seed(7)
    partials = torch.randn(4, B * H, n, W, generator=g)
    shape = (D,) if shared else (H, D)
    p = [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(4)]
    x = Inputs(None, None, None, *p)
    fm = PreTransform(affine=affine)
    got = param_grads(partials, B, H, D, x, fm)
    for i, (gi, used) in enumerate(zip(got, (fm.uses_gamma, fm.uses_beta) * 2)):
        if not used:
            assert gi is None
            continue
        want = partials[i].reshape(B, H, n, W)[..., :D].double().sum((0, 2))
        want = want.sum(0) if shared else want
        assert gi.dtype == torch.float64 and gi.shape == shape
        torch.testing.assert_close(gi, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "variant, rows, state_chunk, tile_rows",
    [("packed", 128, 128, 32), ("packed", 64, 256, 32), ("tiles", 128, 64, 128),
     ("tiles", 32, 128, 64), ("tiles", "fused", 64, 32), ("packed", "fused", 32, 32)],
)  # fmt: skip
def test_state_block_sizes_match_the_oracle(variant, rows, state_chunk, tile_rows) -> None:
    """The state kernel's rows per program, chunk and warps (``state_rows``, ``state_chunk``, which
    takes the gcd with the segment: 256 -> 128 here) and a tile program's rows per product
    (``tile_rows``), across segment and chunk edges (T = 200: two segments of 4 chunks of 32);
    "fused": one state program per segment (``state_fused``, 128 rows), forward and the
    backward's suffix states."""
    fused = rows == "fused"
    rows = 128 if fused else rows
    config = {"chunk_size": 32, "chunks_per_segment": 4, "variant": variant,
              "state_rows": rows, "state_chunk": state_chunk, "tile_rows": tile_rows,
              "state_warps": 8 if rows == 128 else None, "state_fused": fused}  # fmt: skip
    _check_against_the_oracle(16, "rebased", True, 200, 24, config, seed=11)


STAGE_CASES = [("packed", 1, 300), ("tiles", 1, 300)]
if DEVICE != "cpu":  # the interpreter ignores num_stages: more depths and EVEN on a GPU only
    STAGE_CASES += [(v, s, T) for v in ("packed", "tiles") for s, T in ((2, 300), (1, 512),
                                                                        (2, 512))]  # fmt: skip


@pytest.mark.parametrize("variant, stages, T", STAGE_CASES)
def test_pipelining_depths_match_the_oracle(variant: str, stages: int, T: int) -> None:
    """The software-pipelining depths (``num_stages``, ``state_stages``) are configuration
    keys every kernel launch takes; on a GPU each depth compiles other loops and must still
    match the oracle, masked (T = 300) and whole (T = 512: EVEN) alike. On the CPU the
    interpreter runs the same math whatever the depth: the keys' plumbing is checked."""
    config = {"chunk_size": 64, "chunks_per_segment": 4, "variant": variant,
              "num_stages": stages, "state_stages": stages}  # fmt: skip
    _check_against_the_oracle(16, "rebased", True, T, 64, config, seed=T + stages)
    if DEVICE != "cpu":
        _check_against_the_oracle(16, "based", True, T, 24, config, seed=T + stages,
                                  state_io=False)  # fmt: skip


def _record_launches(monkeypatch, module, name: str, run: bool = False) -> list:
    """Replace ``module.name`` (a Triton kernel) by a recorder: every launch appends
    ``(args, kwargs)`` to the returned list, and runs the kernel when ``run``."""
    kernel, launches = getattr(module, name), []

    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append((args, kwargs))
                if run:
                    kernel[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(module, name, Recorder())
    return launches


LAUNCHED = {
    "tiles": ("packed", "packed_tile_kernel", "packed_state_kernel"),
    "walk": ("kernels", "sweep_kernel", "segment_state_kernel"),
}
"""Each variant's module of kernels, its sweep kernel and its state kernel."""


@pytest.mark.parametrize("variant", sorted(LAUNCHED))
@pytest.mark.parametrize(
    "config, sweep, state",
    [({"num_stages": 1}, 1, None), ({"state_stages": 2}, None, 2),
     ({"num_stages": 4, "state_stages": 1}, 4, 1), ({}, None, None)],
)  # fmt: skip
def test_each_kernel_takes_its_own_pipelining_depth(monkeypatch, variant, config, sweep,
                                                    state) -> None:  # fmt: skip
    """``num_stages`` reaches the sweep (tile) kernel alone and ``state_stages`` the state
    kernel alone, in every variant; an absent key leaves Triton's default (no
    ``num_stages`` in the launch), except ``tiles``' tile kernel: ``TILES_STAGES``."""
    from rebased_kernels.backends.triton.packed_call import TILES_STAGES

    module_name, sweep_name, state_name = LAUNCHED[variant]
    module = importlib.import_module(f"rebased_kernels.backends.triton.{module_name}")
    kernels = importlib.import_module("rebased_kernels.backends.triton.kernels")
    launches = {n: _record_launches(monkeypatch, module, n) for n in (sweep_name, state_name)}
    _record_launches(monkeypatch, kernels, "prefix_kernel")
    fm = PRESETS["rebased"]
    x = random_inputs(1, 200, 1, 16, 16, torch.float32, DEVICE, fm, requires_grad=False)
    inp = Inputs(x["q"], x["k"], x["v"], *(x[n] for n in PARAMS))
    be = get_backend("triton")
    cfg = {**be.default_config, "variant": variant, "chunk_size": 32, "chunks_per_segment": 2,
           **config}  # fmt: skip
    be.forward_dense(inp, LinearAttention(fm, 0.25), cfg)
    if sweep is None and variant == "tiles":
        sweep = TILES_STAGES
    assert launches[sweep_name][0][1].get("num_stages") == sweep
    assert launches[state_name][0][1].get("num_stages") == state


@pytest.mark.parametrize("key, value", [("state_rows", 48), ("tile_rows", 256),
                                        ("state_chunk", 96), ("num_stages", 5),
                                        ("state_stages", 0)])  # fmt: skip
def test_state_block_sizes_reject_bad_values(key: str, value: int) -> None:
    fm = PRESETS["rebased"]
    x = random_inputs(1, 40, 1, 16, 8, torch.float32, DEVICE, fm, requires_grad=False)
    with pytest.raises(ValueError, match=f"triton {key} {value}"):
        rk.linear_attention(**x, feature_map=fm, backend="triton",
                            config={"variant": "tiles", key: value})  # fmt: skip


def test_a_fused_state_kernel_takes_128_rows() -> None:
    fm = PRESETS["rebased"]
    x = random_inputs(1, 40, 1, 16, 8, torch.float32, DEVICE, fm, requires_grad=False)
    with pytest.raises(ValueError, match="state_fused takes state_rows 128, not 64"):
        rk.linear_attention(
            **x,
            feature_map=fm,
            backend="triton",
            config={"variant": "tiles", "state_fused": True, "state_rows": 64},
        )


@pytest.mark.parametrize("variant", ["walk", "packed", "tiles"])
@pytest.mark.parametrize("name, normalize", [("rebased", True), ("x2", False), ("based", True)])
def test_every_variant_matches_the_oracle(variant: str, name: str, normalize: bool) -> None:
    """Each forward/backward variant across segment and chunk edges (T = 70: chunks of 32, 2
    per segment), with a random initial state and final-state cotangents."""
    config = {"chunk_size": 32, "chunks_per_segment": 2, "variant": variant}
    _check_against_the_oracle(16, name, normalize, 70, 24, config, seed=7)


@pytest.mark.parametrize(
    ("variant", "name", "T"),
    [("packed", "rebased", 70), ("tiles", "rebased", 70), ("tiles", "based", 70),
     ("tiles", "rebased", 150)],
)  # fmt: skip
def test_training_calls_without_state_match_the_oracle(variant: str, name: str, T: int) -> None:
    """Training's call, no state in or out, in chunks of 32, four per segment: at T = 70 one
    segment covers the sequence (the packed walk from a zero prefix with no state kernel, the
    tiles compiled without the state's code, ``STATE`` off); at T = 150 two segments."""
    config = {"chunk_size": 32, "chunks_per_segment": 4, "variant": variant}
    _check_against_the_oracle(16, name, True, T, 24, config, seed=T, state_io=False)


@pytest.mark.parametrize("variant", ["packed", "tiles"])
@pytest.mark.parametrize("name, state_io", [("rebased", True), ("based", False)])
def test_whole_chunks_run_without_masks(variant: str, name: str, state_io: bool) -> None:
    """T a multiple of the segment, D = 16 and Dv = BV: the state kernel and the tile
    programs are compiled without masks (``EVEN``, ``kernels._below``), and still match the
    oracle; the earlier tests' T = 70 and 150 and Dv = 24 keep the masked kernels covered."""
    from rebased_kernels.backends.triton.packed_call import PackedCall

    config = {"chunk_size": 32, "chunks_per_segment": 2, "variant": variant}
    x = random_inputs(1, 128, 1, 16, 16, torch.float32, DEVICE, PRESETS[name])
    call = PackedCall(Inputs(x["q"], x["k"], x["v"]), LinearAttention(PRESETS[name], 0.25),
                      config, backward=False)  # fmt: skip
    assert call.even(call.BC) and call.even(call.NCS * call.BC)
    _check_against_the_oracle(16, name, True, 128, 16, config, seed=11, state_io=state_io)


LINEAR = FeatureMap("linear", PreTransform(True, "gamma_beta"), (0.5, 1.0))


@pytest.mark.parametrize("variant", ["packed", "tiles"])
@pytest.mark.parametrize("D, fm, Dv", [(5, "gamma_x_beta_x2", 64), (16, LINEAR, 3)])
def test_packed_layouts_pad_D_and_drop_absent_powers(variant: str, D: int, fm, Dv: int) -> None:
    """The packed rows at D < 16 (padded dims), a degree-1 kernel (no quadratic block) and
    Dv below and at the value block, over three segments of 64-row chunks."""
    config = {"chunk_size": 64, "chunks_per_segment": 1, "variant": variant}
    _check_against_the_oracle(D, fm, False, 150, Dv, config, seed=D)


def test_gradients_without_a_final_state_cotangent_match_a_zero_one() -> None:
    """``grads.S = None`` (no final state in the loss: tf32 state products in the sweeps) and
    a zero cotangent (``X3``: ~fp32) give the same gradients, within the tolerance."""
    from rebased_kernels.backend import Inputs, Outputs

    fm = PRESETS["rebased"]
    x = random_inputs(2, 70, 2, 16, 24, torch.float32, DEVICE, fm, seed=3, requires_grad=False)
    inp = Inputs(x["q"], x["k"], x["v"], *(x[n] for n in PARAMS))
    be, attn = get_backend("triton"), LinearAttention(fm, 0.25)
    config = {"chunk_size": 32, "chunks_per_segment": 2, "variant": "walk"}
    out = be.forward(inp, attn, config, None)
    do = torch.randn_like(out.o)
    a = be.backward(inp, attn, config, None, Outputs(do, None, None))
    b = be.backward(inp, attn, config, None, Outputs(do, torch.zeros_like(out.S),
                                                     torch.zeros_like(out.z)))  # fmt: skip
    for n, ga, gb in zip(Inputs._fields, a, b):
        if ga is not None:
            assert_close(ga, gb, torch.float32, n)


@pytest.mark.parametrize(
    ("variant", "T", "state"),
    [("packed", 40, False), ("tiles", 40, False), ("packed", 40, True), ("tiles", 100, False)],
)
def test_dropping_the_final_state_changes_nothing_else(variant: str, T: int, state: bool) -> None:
    """``output_final_state=False`` (training's call: the packed variants then skip the state
    kernel where one segment covers the sequence and no state comes in, here T = 40 in
    chunks of 32 x 2) gives bit-identical o and gradients to the same call keeping the state;
    T = 100 (two segments) and an initial state take the full path."""
    fm = PRESETS["rebased"]
    x = random_inputs(2, T, 3, 16, 20, torch.float32, DEVICE, fm, seed=T + state)
    F = fm.num_features(16)
    g = torch.Generator().manual_seed(T)
    init = None
    if state:
        init = ((0.1 * torch.randn(2, 3, F, 20, generator=g)).to(DEVICE),
                torch.rand(2, 3, F, generator=g).to(DEVICE))  # fmt: skip
    config = {"variant": variant, "chunk_size": 32, "chunks_per_segment": 2}
    do = torch.randn(2, T, 3, 20, generator=g).to(DEVICE)
    runs = []
    for keep in (True, False):
        leaves = {n: t.detach().clone().requires_grad_() for n, t in x.items()}
        out = rk.linear_attention(**leaves, backend="triton", config=config,
                                  initial_state=init, output_final_state=keep)  # fmt: skip
        o = out[0] if keep else out
        (o * do).sum().backward()
        runs.append([o.detach(), *(leaves[n].grad for n in leaves)])
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    assert torch.isfinite(runs[0][0]).all()


def _compiled_json(code: str):
    """The last stdout line, as JSON, of ``code`` run in a process without
    ``TRITON_INTERPRET`` (the interpreter's kernels do not compile for sm_90a)."""
    import json
    import os
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_ptxas_resource_report_without_a_gpu() -> None:
    """``resources.usage`` compiles a sweep kernel for sm_90a here (no GPU) and reads its
    registers and spills; the ~fp32 state products (``X3``) cost the dq sweep registers.
    In a process without ``TRITON_INTERPRET`` (the interpreter's kernels do not compile)."""
    code = (
        "import json; from rebased_kernels.backends.triton import kernels, resources as r\n"
        "u = [r.usage(kernels.sweep_kernel, r.sweep_constants(1, 32, 'walk', 'tf32', x3=x), 8)"
        " for x in (False, True)]\n"
        "print(json.dumps([[v.registers, v.stack] for v in u]))"
    )
    (regs, stack), (_, stack_x3) = _compiled_json(code)
    assert 0 < regs <= 255 and stack >= 0
    assert stack_x3 > stack


def test_exact_x3_moves_the_gradient_products_to_the_tensor_cores() -> None:
    """``config["exact"] = "x3"`` reaches the kernels: the one-segment tiles dq sweep of half
    inputs compiled for sm_90a has its scores and pair gradients as tf32x3 tensor-core
    products (more wgmma) instead of fp32 FMAs (far fewer ``fma.rn.f32``). The interpreter
    computes both exactly, so on the CPU only the compiled code can tell them apart."""
    code = (
        "import json; from rebased_kernels.backends.triton import packed, resources as r\n"
        "out = []\n"
        "for dot in ('tf32', 'x3'):\n"
        "    c = {**r.sweep_constants(1, 64, 'tiles', dot), 'BV': 16, 'STATE': False}\n"
        "    out.append(r.ptx_ops(packed.packed_tile_kernel, c, 4))\n"
        "print(json.dumps(out))"
    )
    fma, x3 = _compiled_json(code)
    assert x3["fp32 fma"] * 4 < fma["fp32 fma"], (fma, x3)
    assert x3["wgmma"] > fma["wgmma"] > 0, (fma, x3)


@pytest.mark.parametrize("dot", ["b3", "x2"])
def test_split_products_lighten_the_gradient_kernels(dot: str) -> None:
    """``config["exact"]`` "bf16x3" ("b3" sweeps) and "x2" reach the kernels: the tiles dq and
    dk/dv kernels at chunk 64, 4 warps, 1 stage compiled for sm_90a issue fewer wgmma than
    tf32x3 (bf16 takes k = 16 per instruction; x2 drops the third pass where the value side
    is exact) and spill less: session 14's ptxas, dq 448 -> 0 (b3) / 272 (x2) bytes, dk/dv
    968 -> 248 / 544."""
    code = (
        "import json; from rebased_kernels.backends.triton import packed, resources as r\n"
        "r.OPTIONS['num_stages'] = 1\n"
        "out = []\n"
        "for mode in (1, 2):\n"
        f"    for dot in ('x3', '{dot}'):\n"
        "        c = {**r.sweep_constants(mode, 64, 'tiles', dot), 'EVEN': True}\n"
        "        u = r.usage(packed.packed_tile_kernel, c, 4)\n"
        "        ops = r.ptx_ops(packed.packed_tile_kernel, c, 4)\n"
        "        out.append([u.stack, ops['wgmma']])\n"
        "print(json.dumps(out))"
    )
    (dq_x3, dq_new, dkv_x3, dkv_new) = _compiled_json(code)
    for x3, new in ((dq_x3, dq_new), (dkv_x3, dkv_new)):
        assert new[1] < x3[1] and new[0] < x3[0], (x3, new)


def test_bf16x3_products_are_near_fp32() -> None:
    """``_dot_x3`` in a "b3" sweep (``exact`` "bf16x3"): each operand split into bf16
    ``hi + lo``, three bf16 products. On operands spread over 2^-8 .. 2^8 its error is within
    2^-15 of ``|a| |b|``, at least 16x below one bf16 product's; the interpreter emulates the
    bf16 rounding bit by bit (``kernels._bf16_part``), a GPU casts."""
    from triton_probes import product_b3

    g = torch.Generator().manual_seed(3)
    a, b = (torch.randn(64, 64, generator=g) * 2.0 ** torch.randint(-8, 9, (64, 64), generator=g)
            for _ in range(2))  # fmt: skip
    c = torch.full((64, 64), float("nan"), device=DEVICE)
    product_b3[(1,)](a.to(DEVICE), b.to(DEVICE), c, N=64)
    ref = a.double() @ b.double()
    scale = a.double().abs() @ b.double().abs()
    err = ((c.cpu().double() - ref).abs() / scale).max().item()
    one_pass = ((a.bfloat16().double() @ b.bfloat16().double() - ref).abs() / scale).max().item()
    assert err <= 2.0**-15 and err * 16 <= one_pass, (err, one_pass)


def test_x2_products_split_only_the_inexact_operand() -> None:
    """``_dot_x2`` ("x2" sweeps): with A a half input's values (exact in tf32) and B spread
    over 2^-8 .. 2^8, declaring A exact splits B alone and two tf32 products come within
    2^-18 of |A||B|; declaring B exact instead leaves B truncated to tf32 (2^-11). The
    interpreter truncates tf32 operands as the tensor cores do (``_dot_tf32_of``)."""
    from triton_probes import product_x2

    g = torch.Generator().manual_seed(4)
    a = torch.randn(64, 64, generator=g).bfloat16().float()
    b = torch.randn(64, 64, generator=g) * 2.0 ** torch.randint(-8, 9, (64, 64), generator=g)
    ref = a.double() @ b.double()
    scale = a.double().abs() @ b.double().abs()
    errs = []
    for exact in (1, 2):
        c = torch.full((64, 64), float("nan"), device=DEVICE)
        product_x2[(1,)](a.to(DEVICE), b.to(DEVICE), c, N=64, EXACT=exact)
        errs.append(((c.cpu().double() - ref).abs() / scale).max().item())
    assert errs[0] <= 2.0**-18 and errs[1] >= 2.0**-14, errs


def test_x2_keeps_the_cancelling_gradients_as_small_as_x3() -> None:
    """At T = 1 normalised o = v whatever q and k are, so dq and dk are pure cancellation in
    ``P = g . v + r``: "x2" (the value side unsplit, ``_pair_grad``'s ``MODE``) keeps them
    within 4x of tf32x3's (interpreter, fp16: both ~4e-5 of |dv|); declaring the other side
    exact truncates g to tf32 and measured 1.4e-3."""
    fm = PRESETS["rebased"]
    dtype = torch.float16 if DEVICE == "cpu" else torch.bfloat16
    x = random_inputs(2, 1, 3, 16, 24, dtype, DEVICE, fm, seed=3, requires_grad=False)
    do = torch.randn(2, 1, 3, 24, generator=torch.Generator().manual_seed(0)).to(DEVICE, dtype)
    ratios = {}
    for exact in ("x3", "x2"):
        leaves = {n: t.clone().requires_grad_() for n, t in x.items()}
        config = {"variant": "tiles", "chunk_size": 64, "chunks_per_segment": 2, "exact": exact}
        o = rk.linear_attention(**leaves, feature_map=fm, backend="triton", config=config)
        (o.float() * do.float()).sum().backward()
        dv = leaves["v"].grad.double().norm()
        ratios[exact] = [float(leaves[n].grad.double().norm() / dv) for n in "qk"]
    for r2, r3 in zip(ratios["x2"], ratios["x3"]):
        assert r2 <= 4 * r3 + 2.0**-20, ratios


@pytest.mark.parametrize("exact", ["bf16x3", "x2"])
@pytest.mark.parametrize("T, normalize", [(1, True), (200, True), (200, False)])
def test_split_product_gradients_match_the_oracle(T: int, normalize: bool, exact: str) -> None:
    """The tiles backward with ``exact`` "bf16x3" or "x2" on half inputs (fp16 under the
    interpreter, which emulates both roundings; bf16 on a GPU), checked as the property suite
    checks a draw: T = 1 normalised (dq is all cancellation, the case that failed tf32
    products) and T = 200 (four chunks of 64 across a segment edge), with parameters and an
    initial state. On a GPU with triton older than ``launch.MIN_BF16X3_TRITON`` the backward
    refuses bf16x3 instead."""
    from rebased_kernels.backends.triton.launch import MIN_BF16X3_TRITON, triton_version
    from strategies import Case
    from test_properties import test_forward_and_gradients_match_reference as check_draw

    config = {"variant": "tiles", "chunk_size": 64, "chunks_per_segment": 2, "exact": exact}
    dtype = torch.float16 if DEVICE == "cpu" else torch.bfloat16
    case = Case("triton", 1, T, 2, 16, 24, dtype, PRESETS["rebased"], normalize, True, "HD", True,
                tuple(sorted(config.items())), T + normalize)  # fmt: skip
    if exact == "bf16x3" and DEVICE != "cpu" and triton_version() < MIN_BF16X3_TRITON:
        with pytest.raises(ValueError, match="bf16x3"):
            check_draw.check(case, None)
    else:
        check_draw.check(case, None)


def test_bf16x3_is_refused_on_a_gpu_with_an_older_triton() -> None:
    """``dot_precision``: "bf16x3" is "b3" in a backward, except on a GPU with triton older
    than 3.9, which compiled it to an illegal memory access (H100, session 14): a clear
    error there; forwards and float32 inputs never use it."""
    from rebased_kernels.backends.triton.launch import EXACT, dot_precision

    bf16 = torch.bfloat16
    assert dot_precision(bf16, True, "bf16x3", gpu=False) == "b3"
    assert dot_precision(bf16, True, "bf16x3", gpu=True, version=(3, 9)) == "b3"
    with pytest.raises(ValueError, match=r"triton >= 3\.9"):
        dot_precision(bf16, True, "bf16x3", gpu=True, version=(3, 6))
    assert dot_precision(bf16, False, "bf16x3", gpu=True, version=(3, 6)) == "bf16"
    sweeps = {e: dot_precision(bf16, True, e, gpu=False) for e in EXACT}
    assert sweeps == {"fma": "tf32", "x3": "x3", "x2": "x2", "bf16x3": "b3"}
    assert dot_precision(torch.float32, True, "bf16x3", gpu=True, version=(3, 6)) == "ieee"


@pytest.mark.parametrize("inplace, BV", [(False, 16), (True, 16), (True, 8), (True, 32)])
def test_decode_splits_the_values_across_programs(inplace: bool, BV: int, monkeypatch) -> None:
    """Dv = 40: ceil(40 / BV) decode programs of BV value columns per (b, h) (``DECODE_BV``,
    which the GPU profile sweeps), which all read z and the last of which writes z'. Three
    steps from a random state (in place or not) against the float64 oracle over the same
    tokens; the reader counts are zero again afterwards."""
    tri = importlib.import_module("rebased_kernels.backends.triton")
    monkeypatch.setattr(tri, "DECODE_BV", BV)
    fm = PRESETS["rebased"]
    x = random_inputs(2, 3, 3, 16, 40, torch.float64, DEVICE, fm, seed=5, requires_grad=False)
    F = fm.num_features(16)
    g = torch.Generator().manual_seed(5)
    S0 = (0.1 * torch.randn(2, 3, F, 40, generator=g, dtype=torch.float64)).to(DEVICE)
    z0 = torch.rand(2, 3, F, generator=g, dtype=torch.float64).to(DEVICE)
    attn = LinearAttention(fm, 16**-0.5)
    params = tuple(x.get(n) for n in PARAMS)
    o_ref, S_ref, z_ref = reference.quadratic(x["q"], x["k"], x["v"], attn, params, (S0, z0))
    kw = {n: x[n].float() for n in PARAMS if n in x}
    state = (S0.float().clone(), z0.float().clone())
    buffers, outs = state, []
    for t in range(3):
        o_t, state = rk.decode_step(x["q"][:, t].float(), x["k"][:, t].float(),
                                    x["v"][:, t].float(), state, fm, backend="triton",
                                    inplace=inplace, **kw)  # fmt: skip
        outs.append(o_t)
    assert (state.S is buffers[0]) == inplace
    assert_close(torch.stack(outs, 1), o_ref, torch.float32, "decoded o")
    assert_close(state.S, S_ref, torch.float32, "S")
    assert_close(state.z, z_ref, torch.float32, "z")
    assert all(int(buf.abs().sum()) == 0 for buf in tri._READERS.values())


@pytest.mark.parametrize("variant, warps", [("walk", 8), ("packed", 4), ("tiles", 4)])
def test_each_variant_keeps_its_own_warps_under_the_default_config(variant: str, warps: int):
    """The default configuration's ``num_warps`` None leaves each variant its own: a config
    naming only ``variant="walk"`` must not inherit packed's 4 warps (at 4 the walk spills,
    and its float32 dq sweep does not compile with triton 3.6: H200 session 9)."""
    from rebased_kernels.backends.triton import packed_call, walk

    be = get_backend("triton")
    fm = PRESETS["rebased"]
    x = random_inputs(1, 40, 2, 16, 8, torch.float32, "cpu", fm, seed=3, requires_grad=False)
    inputs, attn = Inputs(x["q"], x["k"], x["v"]), LinearAttention(fm, 0.25)
    make = walk._Call if variant == "walk" else packed_call.PackedCall
    config = {**be.default_config, "variant": variant}
    assert make(inputs, attn, config, False).num_warps == warps
    assert make(inputs, attn, {**config, "num_warps": 2}, False).num_warps == 2


@pytest.mark.parametrize("variant", ["walk", "packed"])
def test_float32_backward_takes_the_warps_triton_can_compile(variant: str) -> None:
    """Below 8 warps, triton < 3.9's sm_90 compile of the walk's and packed's float32 dq
    sweeps fails (``launch.MIN_FP32_DQ_WARPS``): an unset ``num_warps`` takes 8, a named 4
    raises a clear error instead of an MLIR dump; half inputs, tiles, forwards and newer
    triton keep theirs."""
    from rebased_kernels.backends.triton.launch import call_warps

    f32, bf16 = torch.float32, torch.bfloat16
    assert call_warps({}, 4, variant, f32, True, (3, 6)) == 8
    assert call_warps({"num_warps": None}, 4, variant, f32, True, (3, 6)) == 8
    with pytest.raises(ValueError, match=f"triton {variant}: .*num_warps >= 8"):
        call_warps({"num_warps": 4}, 8, variant, f32, True, (3, 6))
    assert call_warps({"num_warps": 4}, 8, variant, bf16, True, (3, 6)) == 4
    assert call_warps({"num_warps": 4}, 8, variant, f32, False, (3, 6)) == 4
    assert call_warps({"num_warps": 4}, 8, variant, f32, True, (3, 9)) == 4
    assert call_warps({}, 4, "tiles", f32, True, (3, 6)) == 4


def test_tiles_backward_at_chunk_64_refuses_8_warps_on_triton_3_6() -> None:
    """tiles' gradient kernels at chunk 64 and 8 warps raised an illegal memory access on an
    H200 with triton 3.6 (session 11's probe; the forward, chunk 32 and 4 warps ran): such a
    GPU backward raises a clear error instead; the forward, chunk 32, 4 warps, the CPU and
    newer triton keep theirs."""
    from rebased_kernels.backends.triton.launch import call_warps

    bf16, c64 = torch.bfloat16, {"chunk_size": 64, "num_warps": 8}
    with pytest.raises(ValueError, match="triton tiles: a backward at chunk_size >= 64"):
        call_warps(c64, 4, "tiles", bf16, True, (3, 6))
    assert call_warps(c64, 4, "tiles", bf16, False, (3, 6)) == 8
    assert call_warps({**c64, "chunk_size": 32}, 4, "tiles", bf16, True, (3, 6)) == 8
    assert call_warps({**c64, "num_warps": 4}, 4, "tiles", bf16, True, (3, 6)) == 4
    assert call_warps(c64, 4, "tiles", bf16, True, (3, 9)) == 8
    assert call_warps(c64, 4, "packed", bf16, True, (3, 6)) == 8


@pytest.mark.parametrize("backward", [False, True])
def test_float16_state_products_stay_as_exact_as_their_inputs(backward: bool) -> None:
    """fp16 inputs' state products are tf32 (``packed_call.FP16_SP``), never bf16: bf16
    operands rounded fp16's exact v and features to 8 bits, over the rule's 2^-11 (H200
    session 11); bf16 inputs keep ``HALF_SP``; a carried state is tf32 in both."""
    from rebased_kernels.backends.triton import packed_call

    fm = PRESETS["rebased"]
    for dtype, own in ((torch.float16, "tf32"), (torch.bfloat16, packed_call.HALF_SP)):
        x = random_inputs(1, 40, 2, 16, 8, dtype, "cpu", fm, seed=5, requires_grad=False)
        for variant in ("packed", "tiles"):
            config = {**get_backend("triton").default_config, "variant": variant}
            call = packed_call.PackedCall(Inputs(x["q"], x["k"], x["v"]),
                                          LinearAttention(fm, 0.25), config, backward)  # fmt: skip
            assert (call.sp(False), call.sp(True)) == (own, "tf32"), (dtype, variant)


@pytest.mark.parametrize("variant", ["packed", "tiles"])
def test_a_final_state_handed_to_the_caller_is_summed_in_tf32(monkeypatch, variant) -> None:
    """bf16 inputs: the state kernel multiplies in bf16 (``HALF_SP``) while the state stays
    inside the call, in tf32 (``CARRIED_SP``) when the forward returns its final state, which
    a later call contracts with its queries (H100, session 14: a split run's o missed the rule
    at 1.84e-2 > 1.48e-2 with bf16 products); a backward's prefix keeps bf16."""
    from rebased_kernels.backends.triton import packed, packed_call

    launches = _record_launches(monkeypatch, packed, "packed_state_kernel")
    monkeypatch.setattr(packed_call, "scan", lambda seg, init, reverse, dtype=None: (seg, seg))
    fm = PRESETS["rebased"]
    x = random_inputs(1, 300, 2, 16, 8, torch.bfloat16, "cpu", fm, seed=2, requires_grad=False)
    config = {**get_backend("triton").default_config, "variant": variant, "chunk_size": 32,
              "chunks_per_segment": 2}  # fmt: skip
    for backward, total, want in ((False, True, "tf32"), (False, False, packed_call.HALF_SP),
                                  (True, False, packed_call.BWD_SP)):  # fmt: skip
        call = packed_call.PackedCall(Inputs(x["q"], x["k"], x["v"]), LinearAttention(fm, 0.25),
                                      config, backward)  # fmt: skip
        call.states(call.k, call.kg, call.kb, call.kg_stride, call.v, None, None, (None, None),
                    reverse=False, total=total)  # fmt: skip
        assert launches[-1][1]["SP"] == want, (variant, backward, total)


def test_half_segment_sums_match_the_oracle(monkeypatch) -> None:
    """``segment_half``: a training call (no final state) of half inputs stores each
    segment's S in the prefix's half type and scans in fp32; o and every gradient stay
    within the rule against the float64 oracle (fp16 with bf16's half state products here:
    the interpreter has no bf16), and the per-segment sums really are half (the state
    kernel's S argument), fp32 when the forward returns its final state."""
    from rebased_kernels.backends.triton import packed, packed_call
    from strategies import Case, kappa, make_inputs, oracle

    launches = _record_launches(monkeypatch, packed, "packed_state_kernel", run=True)
    config = {"variant": "tiles", "chunk_size": 32, "chunks_per_segment": 2, "exact": "x3",
              "segment_half": True}  # fmt: skip
    case = Case("triton", 1, 150, 2, 16, 8, torch.float16, PRESETS["rebased"], True, True, "HD",
                False, tuple(sorted(config.items())), 5)  # fmt: skip
    kw = make_inputs(case)
    leaves = {n: t.detach().requires_grad_() for n, t in kw.items()}
    ref_leaves = {n: t.detach().double().requires_grad_() for n, t in kw.items()}
    # fp16 inputs multiply states in tf32 (FP16_SP); here they take HALF_SP as bf16 inputs do,
    # so that a half prefix (and half segment sums) exists on the interpreter too
    monkeypatch.setattr(packed_call, "FP16_SP", packed_call.HALF_SP)
    o = rk.linear_attention(**leaves, feature_map=case.fm, normalize=True, backend="triton",
                            config=config)  # fmt: skip
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(1)).to(o.dtype)
    (o.double() * do.double()).sum().backward()
    seg_dtypes = [args[6].dtype for args, _ in launches]  # Sst: fwd, prefix, suffix
    assert seg_dtypes == [torch.float16] * 3, seg_dtypes
    rk.linear_attention(**kw, feature_map=case.fm, normalize=True, backend="triton",
                        config=config, output_final_state=True)  # fmt: skip
    assert launches[-1][0][6].dtype == torch.float32
    ref = oracle(case, ref_leaves)[0]
    (ref * do.double()).sum().backward()
    tol = feature_form_tolerance(torch.float16, kappa(case, kw))
    assert_close(o, ref, torch.float16, "o", tol)
    floor = 1e-2 * max(float(t.grad.norm()) for t in ref_leaves.values())
    for n in leaves:
        assert_close(leaves[n].grad, ref_leaves[n].grad, torch.float16, f"d{n}", tol, floor)


def test_the_interpreter_refuses_bfloat16() -> None:
    """Under TRITON_INTERPRET=1 a bf16 call fails with the reason, not with numbers ~1e9
    (numpy has no bfloat16; a GPU takes it)."""
    q, k, v = (torch.randn(1, 4, 2, d, device=DEVICE).bfloat16() for d in (8, 8, 4))
    if not INTERPRET:
        o = rk.linear_attention(q, k, v, feature_map="rebased", backend="triton")
        assert o.isfinite().all() and o.abs().max() < 1e3
        return
    with pytest.raises(ValueError, match=r"interpreter.*no bfloat16"):
        rk.linear_attention(q, k, v, feature_map="rebased", backend="triton")


@pytest.mark.parametrize(
    ("dtype", "exact"),
    [(torch.float16, "fma"), (torch.bfloat16, "bf16x3"), (torch.bfloat16, "x3")],
    ids=["session-11-fp16", "session-14-bf16", "bf16-x3"],
)
def test_split_runs_that_failed_on_a_gpu_match_the_oracle(dtype, exact) -> None:
    """The GPU draws whose split run failed with half-precision state products: B = 2,
    T = 2, D = 8, Dv = 1, rebased, unnormalised, split at t = 1, packed 32 x 2; fp16 on the
    H200 (session 11: o 1.98e-2 against 1.49e-2 before the carried state went tf32) and bf16
    on the H100 (session 14: 1.84e-2 against 1.48e-2, the first half's final state summed in
    bf16). o of the carried half within the kappa-scaled rule."""
    from strategies import Case, kappa, make_inputs, oracle, run

    if interpreter_dtype_reason(dtype):
        pytest.skip("the interpreter has no bfloat16 (GPU only)")
    config = {"chunk_size": 32, "chunks_per_segment": 2, "exact": exact, "variant": "packed"}
    case = Case("triton", 2, 2, 1, 8, 1, dtype, PRESETS["rebased"], False, False, "HD",
                False, tuple(sorted(config.items())), 0)  # fmt: skip
    kw = make_inputs(case)
    first = run(case, {**kw, **{n: kw[n][:, :1] for n in "qkv"}})
    second = run(case, {**kw, **{n: kw[n][:, 1:] for n in "qkv"},
                        "initial_state": (first[1], first[2])})  # fmt: skip
    tol = feature_form_tolerance(dtype, kappa(case, kw))
    o = torch.cat([first[0], second[0]], dim=1)
    assert_close(o, oracle(case, kw)[0], dtype, "o", tol)


@pytest.mark.parametrize("variant", ["parallel", "packed", "tiles", "walk"])
def test_carried_state_gradients_of_session_18_match_the_oracle(variant: str) -> None:
    """The GPU draw of session 18 (H100): fp16, T = 1, D = 8, Dv = 1, gamma_x2 normalised,
    per-head gamma, an initial state, chunk 16 x2 (``parallel``, which runs ``packed`` when a
    state is carried): d gamma_Q missed the rule at 1.025e-2 against 1e-2 with the gradient
    sweeps' state products in tf32; ~fp32 now (``packed_call.CARRIED_GRAD_SP``). The
    interpreter rounds tf32 operands as the tensor cores do, so this fails on the CPU too
    without the mend."""
    from strategies import Case
    from test_properties import test_forward_and_gradients_match_reference as check

    fm = FeatureMap("gamma_x2", PreTransform(norm=False, affine="gamma"), (0.0, 0.0, 1.0))
    config = tuple(sorted({"chunk_size": 16, "exact": "x2", "variant": variant}.items()))
    case = Case("triton", 1, 1, 1, 8, 1, torch.float16, fm, True, True, "HD", True, config, 48)
    check.check(case, None)


ONEPASS_CASES = [
    # dtype, B, T, H, D, Dv, map, normalize, params, state, chunk, chunks a segment, seed
    (torch.float16, 1, 150, 2, 16, 8, "rebased", True, True, False, 32, 2, 3),
    (torch.float32, 1, 70, 1, 8, 5, "based", True, True, True, 16, 2, 4),
    (torch.float16, 2, 45, 1, 8, 3, "rebased", False, False, True, 16, 2, 5),
    (torch.float16, 1, 1, 1, 8, 1, "gamma_x2", True, True, True, 16, 2, 48),
]


@pytest.mark.parametrize("fields", ONEPASS_CASES)
def test_one_pass_dq_matches_the_oracle(fields: tuple) -> None:
    """``dq_onepass`` (``tiles``): the dq tile kernel's one pass over its key chunks, dq from
    the sums of ``dO v^T``, ``A o P0``, ``(P0 o sim') y'`` and ``sim' y'`` combined at the end
    (``packed._dq_one_pass``), through the property test against the float64 oracle: several
    segments, an initial state, normalised or not, Based's three powers, and session 18's
    carried-state GPU draw (T = 1), on the interpreter's tf32 rounding."""
    from strategies import Case
    from test_properties import test_forward_and_gradients_match_reference as check

    dtype, B, T, H, D, Dv, name, normalize, params, state, BC, NCS, seed = fields
    fm = {**PRESETS, "gamma_x2": FeatureMap("gamma_x2", PreTransform(False, "gamma"), (0, 0, 1))}
    config = {"variant": "tiles", "chunk_size": BC, "chunks_per_segment": NCS, "exact": "x2",
              "dq_onepass": True}  # fmt: skip
    case = Case("triton", B, T, H, D, Dv, dtype, fm[name], normalize, params, "HD", state,
                tuple(sorted(config.items())), seed)  # fmt: skip
    for training in (False, True) if not state else (False,):  # (the draw of a stateless case)
        check.check(case, SimpleNamespace(draw=lambda strategy, label=None, t=training: t))


def test_one_pass_dq_is_a_tiles_key() -> None:
    """``dq_onepass`` on another variant is refused with the reason."""
    q, k, v = (torch.randn(1, 8, 1, d, device=DEVICE) for d in (8, 8, 4))
    with pytest.raises(ValueError, match="dq_onepass is a tiles"):
        rk.linear_attention(q, k, v, feature_map="rebased", backend="triton",
                            config={"variant": "packed", "dq_onepass": True})  # fmt: skip


def test_tiles_runs_the_one_pass_dq_by_default() -> None:
    """``dq_onepass`` None (the default) is the variant's own: one pass for ``tiles``
    (session 21's H100: 5.78 -> 5.51 ms forward+backward at 16k), none for ``packed``; an
    explicit False keeps ``tiles``' two passes."""
    from rebased_kernels.backends.triton.packed_call import PackedCall

    q, k, v = (torch.randn(1, 64, 1, d, device=DEVICE) for d in (16, 16, 8))
    attn = LinearAttention(PRESETS["rebased"], 0.25)
    default = get_backend("triton").default_config
    for variant, given, onepass in (("tiles", None, True), ("tiles", False, False),
                                    ("packed", None, False)):  # fmt: skip
        config = {**default, "variant": variant, "dq_onepass": given}
        assert PackedCall(Inputs(q, k, v), attn, config, True).dq_onepass is onepass


@pytest.mark.parametrize("state", [False, True])
def test_one_pass_dq_equals_the_two_pass_one(state: bool) -> None:
    """The one-pass dq (``dq_onepass``) against the two-pass kernel on the same inputs: every
    gradient within 1e-3 relative (the property test checks dq against 1% of the largest
    gradient where it is small; here it is compared whole), normalised ``rebased`` over three
    segments, with and without an initial state."""
    fm = PRESETS["rebased"]
    x = random_inputs(1, 150, 2, 16, 8, torch.float16, DEVICE, fm, seed=3, requires_grad=False)
    if state:
        F = fm.num_features(16)
        g = torch.Generator().manual_seed(4)
        S0, z0 = torch.rand(1, 2, F, 8, generator=g), torch.rand(1, 2, F, generator=g) + 1
        x["initial_state"] = (S0.to(DEVICE), z0.to(DEVICE))
    grads = []
    for one in (False, True):
        leaves = {n: t.clone().requires_grad_() for n, t in x.items() if n != "initial_state"}
        config = {"variant": "tiles", "chunk_size": 32, "chunks_per_segment": 2, "exact": "x2",
                  "dq_onepass": one}  # fmt: skip
        o = rk.linear_attention(**leaves, initial_state=x.get("initial_state"), feature_map=fm,
                                backend="triton", config=config)  # fmt: skip
        weights = torch.linspace(-1, 1, o.numel(), device=o.device).reshape(o.shape)
        (o.float() * weights).sum().backward()
        grads.append({n: t.grad.float() for n, t in leaves.items()})
    for n, want in grads[0].items():
        err = float((grads[1][n] - want).norm() / want.norm())
        assert err < 1e-3, (n, err)  # (r, 1 / den summed in another order; 0.9 without r)
