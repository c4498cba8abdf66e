"""triton's ``parallel`` variant (a quadratic forward, no state; the chunked backward)
against the float64 oracle, on the CPU under TRITON_INTERPRET=1 or on a GPU with
REBASED_KERNELS_TEST_DEVICE=cuda."""

from __future__ import annotations

import pytest
import torch
from rebased_kernels.backends.triton import parallel
from strategies import DEVICE
from test_triton import _available, _check_against_the_oracle, _record_launches

import rebased_kernels as rk
from rebased_kernels import gpu_check, reference
from rebased_kernels.spec import PRESETS, LinearAttention
from rebased_kernels.testing import assert_close, random_inputs

pytestmark = pytest.mark.skipif(not _available(), reason="triton cannot run on this device")


@pytest.fixture
def launches(monkeypatch) -> list:
    """``parallel.pairs_kernel``'s launches, ``(args, kwargs)`` each; the kernel runs."""
    return _record_launches(monkeypatch, parallel, "pairs_kernel", run=True)


@pytest.mark.parametrize(
    ("D", "name", "normalize", "T", "Dv", "BC"),
    [(16, "rebased", True, 45, 8, 16), (8, "based", True, 70, 5, 32),
     (24, "rebased", False, 33, 16, 16), (64, "x2", True, 20, 8, 16),
     (16, "rebased", True, 64, 24, 32)],
)  # fmt: skip
def test_parallel_training_calls_match_the_oracle(launches, D, name, normalize, T, Dv, BC):
    """o and every gradient of training's call (no state in or out): the forward's row blocks
    against all earlier column blocks (one launch), the chunked backward:
    T over several blocks, a last block cut short or whole, D > 16 (no state, so no D <= 16
    limit), Based's constant and linear terms, unnormalised."""
    config = {"variant": "parallel", "chunk_size": BC}
    _check_against_the_oracle(D, name, normalize, T, Dv, config, seed=T + D, state_io=False)
    assert [kw["BC"] for _, kw in launches] == [BC]


def test_parallel_calls_with_a_state_run_the_chunked_kernels(launches) -> None:
    """An initial state, a final state and its cotangents: the chunked variant runs (the pairs
    alone cannot form a state), and matches the oracle."""
    config = {"variant": "parallel", "chunk_size": 16, "chunks_per_segment": 2}
    _check_against_the_oracle(16, "rebased", True, 40, 8, config, seed=3, state_io=True)
    assert launches == []


def test_a_parallel_call_with_a_state_takes_the_default_segments(launches, monkeypatch):
    """A ``parallel`` configuration names no segments: its chunked fallback (here a final
    state) takes the default's, completed where configurations enter (the API's
    ``decode_config``; session 17's GPU profile stopped at a KeyError there)."""
    fm = PRESETS["rebased"]
    x = random_inputs(1, 20, 2, 16, 8, torch.float32, DEVICE, fm, seed=5, requires_grad=False)
    config = {"variant": "parallel", "chunk_size": 16}
    _, state = rk.linear_attention(**x, feature_map=fm, backend="triton", config=config,
                                   output_final_state=True)  # fmt: skip
    assert state.S is not None and launches == []
    monkeypatch.setattr(gpu_check, "DEVICE", DEVICE)
    monkeypatch.setattr(gpu_check, "SMALL", not DEVICE.startswith("cuda"))  # fp16 on the CPU
    calls = gpu_check._ours(1, 20, 2, config, 8)  # the GPU scripts' entry, same completion
    assert calls.fwd_final_state().S is not None and launches == []


def test_packed_sequences_run_the_pairs_each(launches) -> None:
    """``cu_seqlens`` in training's call: each sequence runs the pairs on its own (an empty
    one none), and o is each sequence's alone against the oracle."""
    fm, lengths = PRESETS["rebased"], (5, 0, 40)
    x = random_inputs(1, sum(lengths), 2, 16, 8, torch.float32, DEVICE, fm, seed=11,
                      requires_grad=False)  # fmt: skip
    bounds = torch.tensor([0, 5, 5, 45], dtype=torch.int32, device=DEVICE)
    o = rk.linear_attention(**x, feature_map=fm, backend="triton", cu_seqlens=bounds,
                            config={"variant": "parallel", "chunk_size": 16})  # fmt: skip
    assert len(launches) == 2
    attn = LinearAttention(fm, 16**-0.5)
    params = tuple(x[n].double() for n in ("q_weight", "q_bias", "k_weight", "k_bias"))
    for a, b in ((0, 5), (5, 45)):
        qkv = (x[n][:, a:b].double() for n in "qkv")
        ref = reference.quadratic(*qkv, attn, params)[0]
        assert_close(o[:, a:b], ref, torch.float32, f"o of tokens {a}..{b}")
