"""The public API: documented errors (property 7), T = 0, the custom op, compile, the layer."""

from __future__ import annotations

import pytest
import torch
from strategies import backends_under_test

import rebased_kernels as rk
from rebased_kernels import backend as backend_module
from rebased_kernels.backend import Backend
from rebased_kernels.testing import random_inputs, rel_err

BACKENDS = backends_under_test()


def _dtype_for(backend: str) -> torch.dtype:
    """float32 where the backend takes it (fla takes half types only)."""
    dtypes = rk.backend.get_backend(backend).dtypes
    return next(d for d in (torch.float32, torch.float16, torch.bfloat16) if d in dtypes)


def _qkv(B=1, T=10, H=2, D=16, Dv=8, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(B, T, H, d, generator=g, dtype=dtype) for d in (D, D, Dv))


BAD_CALLS = [
    ("q is 3-D", lambda q, k, v: ((q[0], k, v), {}), ValueError, "must be 4-D"),
    ("k differs", lambda q, k, v: ((q, k[:, :5], v), {}), ValueError, "q and k must match"),
    ("v differs", lambda q, k, v: ((q, k, v[:, :5]), {}), ValueError, "v must match q"),
    ("mixed dtypes", lambda q, k, v: ((q, k.double(), v), {}), ValueError, "one dtype"),
    (
        "int dtype",
        lambda q, k, v: ((q.int(), k.int(), v.int()), {}),
        ValueError,
        "supported dtypes",
    ),
    ("not a tensor", lambda q, k, v: ((q.tolist(), k, v), {}), TypeError, "torch.Tensor"),
    (
        "bias to gamma_x2",
        lambda q, k, v: ((q, k, v, "gamma_x2"), {"q_bias": torch.zeros(16)}),
        ValueError,
        "does not use",
    ),
    (
        "weight to x2",
        lambda q, k, v: ((q, k, v, "x2"), {"k_weight": torch.ones(16)}),
        ValueError,
        "does not use",
    ),
    (
        "param shape",
        lambda q, k, v: ((q, k, v), {"q_weight": torch.ones(3, 16)}),
        ValueError,
        r"\[H, D\]",
    ),
    ("unknown map", lambda q, k, v: ((q, k, v, "rebase"), {}), ValueError, "unknown feature map"),
    (
        "unknown backend",
        lambda q, k, v: ((q, k, v), {"backend": "cuda_magic"}),
        ValueError,
        "unknown backend",
    ),
    ("bad scale", lambda q, k, v: ((q, k, v), {"scale": -1.0}), ValueError, "scale"),
    (
        "NaN input",
        lambda q, k, v: ((q.index_fill(1, torch.tensor([3]), float("nan")), k, v), {}),
        ValueError,
        "NaN or Inf",
    ),
    (
        "Inf input",
        lambda q, k, v: ((q, k, v.index_fill(1, torch.tensor([0]), float("inf"))), {}),
        ValueError,
        "NaN or Inf",
    ),
    (
        "state shape",
        lambda q, k, v: (
            (q, k, v),
            {"initial_state": (torch.zeros(1, 2, 100, 8), torch.zeros(1, 2, 100))},
        ),
        ValueError,
        "F = 136",
    ),
    (
        "state not pair",
        lambda q, k, v: ((q, k, v), {"initial_state": torch.zeros(1, 2, 136, 8)}),
        ValueError,
        "pair",
    ),
    (
        "state dtype",
        lambda q, k, v: (
            (q, k, v),
            {
                "initial_state": (
                    torch.zeros(1, 2, 136, 8, dtype=torch.half),
                    torch.zeros(1, 2, 136),
                )
            },
        ),
        ValueError,
        "float32 or float64",
    ),
    (
        "cu_seqlens float",
        lambda q, k, v: ((q, k, v), {"cu_seqlens": torch.tensor([0.0, 10.0])}),
        ValueError,
        "int32 or int64",
    ),
    (
        "cu_seqlens end",
        lambda q, k, v: ((q, k, v), {"cu_seqlens": torch.tensor([0, 4, 9])}),
        ValueError,
        "end at T=10",
    ),
    (
        "cu_seqlens order",
        lambda q, k, v: ((q, k, v), {"cu_seqlens": torch.tensor([0, 6, 4, 10])}),
        ValueError,
        "never decrease",
    ),
    (
        "cu_seqlens batch",
        lambda q, k, v: (
            (q.expand(2, -1, -1, -1), k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1)),
            {"cu_seqlens": torch.tensor([0, 10])},
        ),
        ValueError,
        "batch must be 1",
    ),
    (
        "bad config",
        lambda q, k, v: ((q, k, v), {"config": {"block": 3}}),
        ValueError,
        "no tunables",
    ),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name, make, exc, match", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_inputs_raise_documented_errors(backend, name, make, exc, match) -> None:
    """7. Bad inputs raise ValueError/TypeError with a message that says what is wrong."""
    args, kwargs = make(*_qkv(dtype=_dtype_for(backend)))
    kwargs.setdefault("backend", backend)
    if name == "bad config" and not rk.backend.get_backend(backend).tuning_space:
        kwargs["config"] = {"chunk_size": 3}
        match = "no tunables"
    with pytest.raises(exc, match=match):
        rk.linear_attention(*args, **kwargs)


def test_decode_step_validates_too() -> None:
    q, k, v = (t[:, 0] for t in _qkv())
    with pytest.raises(ValueError, match="must be 3-D"):
        rk.decode_step(q[None], k, v, (torch.zeros(1, 2, 136, 8), torch.zeros(1, 2, 136)))
    with pytest.raises(ValueError, match=r"state\.S"):
        rk.decode_step(q, k, v, (torch.zeros(1, 2, 13, 8), torch.zeros(1, 2, 136)))


def test_backend_that_cannot_run_a_call_says_why(monkeypatch) -> None:
    class Quadratic(Backend):
        name = "only_quadratic"
        max_degree = 2
        max_D = 8

        def forward_dense(self, x, attn, config):
            raise AssertionError("never reached")

    class Missing(Backend):
        name = "missing"

        def unavailable_reason(self):
            return "its compiler is not installed"

    registry = {**backend_module._REGISTRY, "only_quadratic": Quadratic(), "missing": Missing()}
    monkeypatch.setattr(backend_module, "_REGISTRY", registry)
    from strategies import CUBIC

    q, k, v = _qkv(D=8)
    with pytest.raises(ValueError, match="degree <= 2, not 3"):
        rk.linear_attention(q, k, v, CUBIC, backend="only_quadratic")
    q, k, v = _qkv(D=16)
    with pytest.raises(ValueError, match="D <= 8, not 16"):
        rk.linear_attention(q, k, v, backend="only_quadratic")
    with pytest.raises(RuntimeError, match="not available here: its compiler"):
        rk.linear_attention(q, k, v, backend="missing")
    info = {b.name: b for b in rk.backends()}
    assert not info["missing"].available and "compiler" in info["missing"].reason


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_sequence(backend) -> None:
    q, k, v = _qkv(T=0, dtype=_dtype_for(backend))
    S0, z0 = torch.rand(1, 2, 136, 8), torch.rand(1, 2, 136)
    o, state = rk.linear_attention(
        q, k, v, backend=backend, initial_state=(S0, z0), output_final_state=True
    )
    assert o.shape == (1, 0, 2, 8)
    assert torch.equal(state.S, S0) and torch.equal(state.z, z0)
    o, state = rk.linear_attention(q, k, v, backend=backend, output_final_state=True)
    assert state.S.shape == (1, 2, 136, 8) and not state.S.any()


def test_backends_lists_availability() -> None:
    info = {b.name: b for b in rk.backends()}
    assert {"reference", "torch", "torch_compile"} <= set(info)
    assert info["torch"].available and info["torch"].reason is None
    assert info["torch"].tuning_space["chunk_size"]


def test_custom_op_passes_opcheck() -> None:
    from rebased_kernels.ops import _fwd_op

    g = torch.Generator().manual_seed(5)
    q, k, v = (
        torch.randn(1, 20, 2, d, generator=g, dtype=torch.float64, requires_grad=True)
        for d in (4, 4, 3)
    )
    w = torch.randn(2, 4, generator=g, dtype=torch.float64, requires_grad=True)
    S0 = torch.randn(1, 2, 10, 3, generator=g, dtype=torch.float64, requires_grad=True)
    z0 = torch.rand(1, 2, 10, generator=g, dtype=torch.float64, requires_grad=True)
    args = (
        q,
        k,
        v,
        w,
        w,
        w,
        w,
        S0,
        z0,
        None,
        True,
        "gamma_beta",
        [0.0, 0.0, 1.0],
        0.5,
        True,
        1e-5,
        "torch",
        '{"chunk_size": 16}',
        True,
        True,
    )
    torch.library.opcheck(_fwd_op, args)
    torch.library.opcheck(_fwd_op, (*args[:-1], False))  # no final state: empty S, z


def test_layer_compiles_fullgraph_without_graph_breaks() -> None:
    torch.manual_seed(0)
    layer = rk.ReBasedAttention(d_model=32, num_heads=2, feature_dim=8, backend="torch")
    x = torch.randn(2, 24, 32)
    eager = layer(x)
    compiled = torch.compile(layer, fullgraph=True)
    out = compiled(x)
    assert rel_err(out, eager) < 1e-5
    out.sum().backward()
    assert layer.q_bias.grad is not None and layer.q_bias.grad.abs().sum() > 0


@pytest.mark.parametrize("norm_scope", ["head", "all_heads"])
@pytest.mark.parametrize("feature_map", ["rebased", "based", "gamma_x2"])
def test_layer_cache_generation_matches_full_forward(norm_scope, feature_map) -> None:
    torch.manual_seed(1)
    layer = rk.ReBasedAttention(
        d_model=24, num_heads=3, feature_dim=4, feature_map=feature_map, norm_scope=norm_scope
    )
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
        x = torch.randn(2, 12, 24, dtype=torch.float32)
        full = layer(x)
        y, state = layer(x[:, :5], use_cache=True)
        outs = [y]
        for t in range(5, 12):
            y, state = layer(x[:, t : t + 1], state=state, use_cache=True)
            outs.append(y)
    assert rel_err(torch.cat(outs, dim=1), full) < 1e-5


def test_layer_trains() -> None:
    torch.manual_seed(2)
    layer = rk.ReBasedAttention(d_model=16, num_heads=2, feature_dim=4)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    x = torch.randn(4, 16, 16)
    target = torch.roll(x, 1, dims=1)
    losses = []
    for _ in range(30):
        loss = (layer(x) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]


def test_torch_compile_does_not_recompile_per_sequence_length() -> None:
    """Lengths in one power-of-two bucket share one graph; a new bucket adds one."""
    from torch._dynamo.utils import counters

    def graphs() -> int:
        return counters["stats"]["unique_graphs"]

    g = torch.Generator().manual_seed(6)
    w = 1 + 0.1 * torch.randn(3, 8, generator=g)

    def call(T: int) -> None:
        q, k = torch.randn(2, T, 3, 8, generator=g), torch.randn(2, T, 3, 8, generator=g)
        v = torch.randn(2, T, 3, 4, generator=g)
        o = rk.linear_attention(
            q, k, v, "gamma_x2", q_weight=w, k_weight=w, backend="torch_compile"
        )
        ref = rk.linear_attention(q, k, v, "gamma_x2", q_weight=w, k_weight=w, backend="torch")
        assert rel_err(o, ref) < 1e-5

    call(70)  # bucket 128
    before = graphs()
    for T in (65, 99, 128):
        call(T)
    assert graphs() == before
    call(129)  # bucket 256
    assert graphs() == before + 1


def test_packed_empty_sequences_give_one_state_each() -> None:
    """T = 0 with ``cu_seqlens`` of N empty sequences: N zero states (found on the GPU run)."""
    q, k, v = torch.randn(1, 0, 2, 4), torch.randn(1, 0, 2, 4), torch.randn(1, 0, 2, 3)
    cu = torch.tensor([0, 0, 0, 0], dtype=torch.int32)
    o, st = rk.linear_attention(q, k, v, cu_seqlens=cu, output_final_state=True, backend="torch")
    assert o.shape == (1, 0, 2, 3)
    assert st.S.shape == (3, 2, 10, 3) and st.z.shape == (3, 2, 10)
    assert not st.S.any() and not st.z.any()


def test_fast_finite_check_names_the_culprit_and_tolerates_overflowing_sums() -> None:
    """The GPU path (one fp32 sum per tensor): a NaN or Inf is named; finite values whose
    sum overflows fall through to the exact pass and raise nothing."""
    from rebased_kernels._validate import check_finite

    big = torch.full((2, 3), 3e38)  # finite, sums to inf in fp32
    ok = torch.randn(4, 5)
    check_finite({"q": ok, "k": big, "S0": None}, fast=True)
    bad = ok.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"^k contains NaN or Inf"):
        check_finite({"q": ok, "k": bad}, fast=True)
    with pytest.raises(ValueError, match=r"^v contains NaN or Inf"):
        check_finite({"q": big, "v": torch.tensor([1.0, float("-inf")])}, fast=True)


def test_check_finite_false_skips_the_check_and_nan_propagates() -> None:
    q, k, v = (torch.randn(1, 6, 2, 4) for _ in range(3))
    q[0, 2, 1, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        rk.linear_attention(q, k, v, backend="torch")
    o = rk.linear_attention(q, k, v, backend="torch", check_finite=False)
    assert torch.isnan(o[0, 2:, 1]).any() and torch.isfinite(o[0, :2]).all()


def test_plan_is_marked_constant_like_the_decorator_and_import_skips_dynamo() -> None:
    """``ops._plan`` carries what ``torch.compiler.assume_constant_result`` sets (the fullgraph
    test checks dynamo honours it), and importing the package does not import dynamo."""
    import subprocess
    import sys

    from rebased_kernels.ops import _plan

    def probe() -> None:
        pass

    marked = torch.compiler.assume_constant_result(probe)
    flags = {k: v for k, v in vars(marked).items() if k.startswith("_dynamo")}
    assert flags and all(getattr(_plan, k, None) == v for k, v in flags.items())
    code = "import sys, rebased_kernels; print('torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_state_outside_the_loss_reaches_the_backend_as_none(monkeypatch) -> None:
    """A final state nobody used arrives as None cotangents (a backend may skip it; triton's
    sweeps then run without ~fp32 state products); the gradients equal those of an explicit
    zero cotangent, and a loss of the state alone still reaches k and v."""
    be = backend_module.get_backend("torch")
    seen = []
    real = type(be).backward

    def spy(self, x, attn, config, cu_seqlens, grads):
        seen.append((grads.S is None, grads.z is None))
        return real(self, x, attn, config, cu_seqlens, grads)  # torch's: zeros for None

    monkeypatch.setattr(type(be), "backward", spy)
    x = random_inputs(2, 37, 3, 16, 8, torch.float64, "cpu", "rebased", requires_grad=True)
    o = rk.linear_attention(**x, backend="torch")
    g = torch.randn_like(o)
    o.backward(g)
    without = {n: t.grad.clone() for n, t in x.items()}
    for t in x.values():
        t.grad = None
    o, state = rk.linear_attention(**x, backend="torch", output_final_state=True)
    (o * g).sum().backward(inputs=list(x.values()), retain_graph=True)
    assert seen == [(True, True), (True, True)]
    for n, t in x.items():
        torch.testing.assert_close(t.grad, without[n], msg=n)
        t.grad = None
    (0 * o.sum() + (state.S * torch.randn_like(state.S)).sum()).backward()
    assert seen[-1] == (False, False)  # dz materialised as zeros beside dS
    assert x["k"].grad.abs().max() > 0 and x["v"].grad.abs().max() > 0
