"""The tuning cache, the selection rule and the tuner (CPU)."""

from __future__ import annotations

import json
import multiprocessing as mp
import warnings

import pytest
import torch
from rebased_kernels.autotune import TuneCache, bucket, bucket_key, choose
from rebased_kernels.autotune import tuner as tuner_module

import rebased_kernels as rk
from rebased_kernels import autotune
from rebased_kernels.backend import Backend, Outputs, Problem, get_backend
from rebased_kernels.spec import PRESETS, LinearAttention

FP = dict(device_type="cpu", name="test-cpu", torch="1")


def _problem(dtype=torch.float32, D=16, Dv=8) -> Problem:
    return Problem(LinearAttention(PRESETS["rebased"], D**-0.5), D, Dv, dtype, "cpu")


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("REBASED_KERNELS_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(autotune, "_CACHES", {})
    return tmp_path


def test_cache_round_trip(tmp_path) -> None:
    c = TuneCache("cpu", FP, tmp_path)
    c.put("k1", dict(backend="torch", config={"chunk_size": 32}, ms=1.5))
    again = TuneCache("cpu", FP, tmp_path)
    assert again.get("k1") == dict(backend="torch", config={"chunk_size": 32}, ms=1.5)
    assert again.get("missing") is None


def test_corrupt_and_foreign_files_are_reported_and_rebuilt(tmp_path) -> None:
    c = TuneCache("cpu", FP, tmp_path)
    c.path.write_text("{not json")
    with pytest.warns(UserWarning, match="unusable"):
        assert TuneCache("cpu", FP, tmp_path).get("k") is None
    assert c.path.with_suffix(".corrupt").exists() and not c.path.exists()
    c.path.write_text(json.dumps(dict(device={**FP, "name": "other"}, entries={"k": {}})))
    with pytest.warns(UserWarning, match="another device"):
        TuneCache("cpu", FP, tmp_path).put("k2", dict(ms=1.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert TuneCache("cpu", FP, tmp_path).entries() == {"k2": dict(ms=1.0)}


def _writer(root: str, tag: str, n: int) -> None:
    from pathlib import Path

    c = TuneCache("cpu", FP, Path(root))
    for i in range(n):
        c.put(f"{tag}{i}", dict(ms=float(i)))


def test_concurrent_writers_lose_nothing(tmp_path) -> None:
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), t, 25)) for t in "ab"]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    entries = TuneCache("cpu", FP, tmp_path).entries()
    assert set(entries) == {f"{t}{i}" for t in "ab" for i in range(25)}


def test_keys_separate_devices_versions_and_buckets(tmp_path) -> None:
    paths = {
        TuneCache("cpu", fp, tmp_path).path
        for fp in (FP, {**FP, "name": "other"}, {**FP, "torch": "2"}, {**FP, "triton": "3.6"})
    }
    assert len(paths) == 4
    p = _problem()
    assert bucket(1000) == bucket(1024) == 1024 and bucket(1025) == 2048 and bucket(3) == 16
    assert bucket_key(p, 1000, 8) == bucket_key(p, 1024, 8)
    others = [
        bucket_key(p, 2048, 8),
        bucket_key(p, 1024, 16),
        bucket_key(_problem(torch.float64), 1024, 8),
        bucket_key(_problem(Dv=16), 1024, 8),
    ]
    assert len({bucket_key(p, 1024, 8), *others}) == 5


def test_selection_rule(cache_dir) -> None:
    p = _problem()
    named = choose("torch", p, 100, 4, {"chunk_size": 16})
    assert (named.backend, named.config, named.reason) == (
        "torch", {"chunk_size": 16}, "named by the call"
    )  # fmt: skip
    static = choose("auto", p, 100, 4, {})
    assert static.backend == "numba" and "not tuned" in static.reason
    cache = TuneCache("cpu")
    record = dict(backend="torch", config={"chunk_size": 32}, ms=2.0, objective="forward",
                  shape=[1, 100, 4, 16, 8])  # fmt: skip
    cache.put(bucket_key(p, 100, 4), record)
    autotune._CACHES.clear()
    tuned = choose("auto", p, 120, 4, {})
    assert tuned.backend == "torch" and tuned.config == {"chunk_size": 32}
    assert "tuned" in tuned.reason
    # the call's own config wins over the tuned one; another bucket stays static
    assert choose("auto", p, 120, 4, {"chunk_size": 64}).config == {"chunk_size": 64}
    assert choose("auto", p, 5000, 4, {}).backend == "numba"
    # a stale record (its backend is gone from this install) falls back, never fails a call
    cache.put(bucket_key(p, 100, 8), dict(backend="no-such", config={}, ms=1.0,
                                          objective="forward", shape=[]))  # fmt: skip
    autotune._CACHES.clear()
    assert choose("auto", p, 100, 8, {}).backend == "numba"
    # and the public explain() says the same as the call uses
    q, v = torch.randn(1, 100, 4, 16), torch.randn(1, 100, 4, 8)
    assert rk.explain(q, q, v).backend == "torch"


class _Broken(Backend):
    """Computes the wrong function for config bad=True: the tuner must drop it."""

    name = "broken-test"
    tuning_space = {"bad": (False, True)}  # noqa: RUF012
    default_config = {"bad": False}  # noqa: RUF012

    def forward_dense(self, x, attn, config):
        out = get_backend("torch").forward_dense(x, attn, {"chunk_size": 64})
        return Outputs(out.o * (2.0 if config["bad"] else 1.0), out.S, out.z)


def test_tuner_drops_wrong_configs_and_caches_the_winner(cache_dir, monkeypatch) -> None:
    monkeypatch.setattr(tuner_module, "candidates", lambda problem, names=None: [_Broken()])
    res = autotune.tune(1, 64, 2, 16, 8, torch.float32, "cpu", budget_s=60, progress=False)
    by_config = {r["config"]["bad"]: r for r in res.rows}
    assert "rejected" in by_config[True] and "ms" in by_config[False]
    assert res.best["backend"] == "broken-test" and res.best["config"] == {"bad": False}
    again = autotune.tune(1, 60, 2, 16, 8, torch.float32, "cpu", progress=False)
    assert again.cached and again.best["config"] == {"bad": False}
    # budget 0: nothing but the first job runs
    res = autotune.tune(1, 200, 2, 16, 8, torch.float32, "cpu", budget_s=0.0, force=True,
                        progress=False)  # fmt: skip
    assert any(r.get("skipped") == "time budget" for r in res.rows)


def test_schedule_is_round_robin_and_a_zero_budget_still_times_every_backend(
    cache_dir, monkeypatch
) -> None:
    """Defaults of every backend first (compiling ones last), then one more of each in turn;
    a zero budget skips everything after the first round, never a whole backend."""
    torch_be, numba_be = get_backend("torch"), get_backend("numba")
    jobs = tuner_module.schedule([numba_be, torch_be], quick=False)
    names = [be.name for be, _ in jobs]
    assert names[:2] == ["torch", "numba"]  # numba compiles
    assert next(c for be, c in jobs if be is torch_be) == torch_be.default_config
    assert names[2:4] == ["torch", "numba"]
    assert len(jobs) == len(torch_be.configs()) + len(numba_be.configs())
    monkeypatch.setattr(
        tuner_module, "candidates", lambda problem, names=None: [torch_be, _Broken()]
    )
    res = autotune.tune(1, 64, 2, 16, 8, torch.float32, "cpu", budget_s=0.0, progress=False)
    timed = {r["backend"] for r in res.rows if "ms" in r}
    assert timed == {"torch", "broken-test"}
    assert all("skipped" in r for r in res.rows[2:]) and len(res.rows) > 2


def test_precompile_jobs_cover_every_configuration_and_run_in_processes() -> None:
    """``warm`` lists each compiling backend's configurations per dtype and runs them in
    worker processes (numba here: it compiles on the CPU)."""
    from rebased_kernels.autotune import warm

    numba_be = get_backend("numba")
    shapes = [(1, 64, 2, 16, 8), (1, 256, 2, 16, 8)]
    todo = warm.jobs(["numba", "torch"], [torch.float32, torch.float64], shapes, "cpu")
    assert {j[0] for j in todo} == {"numba"}  # torch does not compile
    assert len(todo) == 2 * len(numba_be.configs())  # one small call per config, any length
    # run-time tunables share a compile: triton's segment length is not precompiled per value
    triton_be = get_backend("triton")
    compiles = warm._compiles(triton_be)
    assert len(compiles) == len(triton_be.configs()) // len(
        triton_be.tuning_space["chunks_per_segment"]
    )
    assert all(j[5] is None for j in todo)
    # static graphs compile per shape: the default configuration at each tuned (B, T, H)
    per_shape = warm.jobs(["torch_compile"], [torch.float32], shapes, "cpu")
    assert [(j[0], j[2], j[5]) for j in per_shape] == [
        ("torch_compile", {}, [1, 64, 2]),
        ("torch_compile", {}, [1, 256, 2]),
    ]
    res = warm.warm(["numba"], [torch.float32], shapes[:1], "cpu", workers=2)
    assert res["jobs"] == len(numba_be.configs()) and res["failed"] == []


def test_search_skips_slow_backends_and_static_compiles_that_do_not_fit() -> None:
    """After the defaults round: a backend PRUNE x slower than the best default is not
    searched, nor a per-shape compiling one when less than a static compile's time is left."""
    from types import SimpleNamespace

    from rebased_kernels.autotune.tuner import PRUNE, STATIC_COMPILE_S, _not_searched

    fast, slow = SimpleNamespace(name="fast", compiles_per_shape=False), SimpleNamespace(
        name="slow", compiles_per_shape=False)  # fmt: skip
    static = SimpleNamespace(name="static", compiles_per_shape=True)
    defaults = [dict(backend="fast", ms=1.0), dict(backend="slow", ms=PRUNE * 1.01),
                dict(backend="static", ms=1.1), dict(backend="broken", error="x")]  # fmt: skip
    assert _not_searched(fast, defaults, 10.0) is None
    assert "x the best default" in _not_searched(slow, defaults, 10.0)
    assert "static compile" in _not_searched(static, defaults, STATIC_COMPILE_S - 1)
    assert _not_searched(static, defaults, STATIC_COMPILE_S + 1) is None
    assert _not_searched(fast, defaults, 0.0) == "time budget"
    broken = SimpleNamespace(name="broken", compiles_per_shape=False)
    assert _not_searched(broken, defaults, 10.0) == "its default did not run"


class _Lean(Backend):
    """Records the ``final_state`` of each forward the tuner times."""

    name = "lean-test"
    final_state_optional = True
    default_config = {}  # noqa: RUF012

    def __init__(self) -> None:
        self.asked: list[bool] = []

    def forward_dense(self, x, attn, config, final_state=True):
        self.asked.append(final_state)
        out = get_backend("torch").forward_dense(x, attn, {"chunk_size": 64})
        return out if final_state else Outputs(out.o, None, None)

    def backward_dense(self, x, attn, config, grads):
        return get_backend("torch").backward_dense(x, attn, {"chunk_size": 64}, grads)


@pytest.mark.parametrize("objective, final", [("forward_backward", False), ("forward", True)])
def test_the_tuner_times_training_call_or_prefill(objective: str, final: bool) -> None:
    """forward_backward times training's call (no final state: a backend may skip forming
    it), forward a prefill's (with it)."""
    be = _Lean()
    attn = LinearAttention(PRESETS["rebased"], 0.25)
    sets = [tuner_module._inputs(1, 32, 2, 16, 8, torch.float32, "cpu", PRESETS["rebased"], s)[0]
            for s in range(2)]  # fmt: skip
    assert tuner_module._time(be, attn, {}, sets, objective, "cpu") > 0
    assert be.asked and set(be.asked) == {final}
