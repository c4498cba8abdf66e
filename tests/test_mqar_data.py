"""MQAR data generator: format, determinism, seeds, validation, gap law and speed."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest
import torch

from rebased_kernels.train.mqar import IGNORE_INDEX, MQARConfig, generate, train_test

CONFIGS = [
    # Floyd path for keys/values (kv^2 small next to the pool).
    MQARConfig(vocab_size=8192, seq_len=256, num_kv_pairs=16, num_examples=300),
    # top-k path (pool of 19 keys, 16 pairs), and seq_len exactly 4 * kv.
    MQARConfig(vocab_size=40, seq_len=64, num_kv_pairs=16, num_examples=300),
    # odd seq_len, a = 1 (uniform gaps), a single pair.
    MQARConfig(vocab_size=16, seq_len=11, num_kv_pairs=1, power_a=1.0, num_examples=300),
    MQARConfig(vocab_size=1024, seq_len=512, num_kv_pairs=64, power_a=0.3, num_examples=200),
]


def _gaps(cfg: MQARConfig, inputs: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """Per row, the gap of each key in context order: [N, kv] (asserts one query per key)."""
    kv, C = cfg.num_kv_pairs, 2 * cfg.num_kv_pairs
    rows, cols = torch.nonzero(labels != IGNORE_INDEX, as_tuple=True)
    assert torch.equal(rows, torch.arange(labels.shape[0]).repeat_interleave(kv))
    pos = cols.view(-1, kv)  # sorted by position within each row
    assert (pos >= C).all() and ((pos - C) % 2 == 0).all()
    q_keys = inputs.gather(1, pos)
    match = q_keys[:, :, None] == inputs[:, None, 0:C:2]  # [N, query, key]
    assert (match.sum(dim=2) == 1).all()
    by_key = torch.empty_like(pos).scatter_(1, match.int().argmax(dim=2), pos)
    return ((by_key - C) // 2).numpy()


def _check_format(cfg: MQARConfig, inputs: torch.Tensor, labels: torch.Tensor) -> None:
    N, L, kv, V = cfg.num_examples, cfg.seq_len, cfg.num_kv_pairs, cfg.vocab_size
    C, half = 2 * kv, V // 2
    assert inputs.shape == labels.shape == (N, L)
    assert inputs.dtype == labels.dtype == torch.int64
    assert inputs.min() >= 0 and inputs.max() < V

    keys, values = inputs[:, 0:C:2], inputs[:, 1:C:2]
    assert ((keys >= 1) & (keys < half)).all()
    assert ((values >= half) & (values < V)).all()
    for t in (keys, values):  # distinct within an example
        s = t.sort(dim=1).values
        assert (s[:, 1:] != s[:, :-1]).all()
    assert (labels[:, :C] == IGNORE_INDEX).all()

    # Exactly kv labelled positions per row, all after the context at even offsets.
    n_q = (labels != IGNORE_INDEX).sum(dim=1)
    assert (n_q == kv).all()
    rows, cols = torch.nonzero(labels != IGNORE_INDEX, as_tuple=True)
    assert (cols >= C).all() and ((cols - C) % 2 == 0).all()
    q_keys = inputs[rows, cols].view(N, kv)
    q_vals = labels[rows, cols].view(N, kv)
    # The queried keys are a permutation of the context keys (each queried once) ...
    assert torch.equal(q_keys.sort(dim=1).values, keys.sort(dim=1).values)
    # ... and each label is the value paired with that key in the context.
    match = q_keys[:, :, None] == keys[:, None, :]  # [N, q, kv], one True per query
    assert (match.sum(dim=2) == 1).all()
    expected = values.gather(1, match.int().argmax(dim=2))
    assert torch.equal(q_vals, expected)

    # Gaps of distinct keys are distinct slots inside the sequence.
    gaps = _gaps(cfg, inputs, labels)
    assert (gaps < cfg.num_gap_slots).all()
    s = np.sort(gaps, axis=1)
    assert (s[:, 1:] != s[:, :-1]).all()

    if not cfg.random_non_queries:
        tail_in, tail_lab = inputs[:, C:], labels[:, C:]
        assert (tail_in[tail_lab == IGNORE_INDEX] == 0).all()
        # Every key appears exactly once after the context (fill never collides).
        counts = (tail_in[:, :, None] == keys[:, None, :]).sum(dim=1)
        assert (counts == 1).all()


@pytest.mark.parametrize("random_fill", [False, True])
@pytest.mark.parametrize(
    "cfg", CONFIGS, ids=lambda c: f"V{c.vocab_size}-L{c.seq_len}-kv{c.num_kv_pairs}"
)
def test_format(cfg: MQARConfig, random_fill: bool) -> None:
    cfg = dataclasses.replace(cfg, random_non_queries=random_fill)
    inputs, labels = generate(cfg, seed=123)
    _check_format(cfg, inputs, labels)


def test_random_fill_is_random_over_whole_vocab() -> None:
    cfg = MQARConfig(vocab_size=64, seq_len=256, num_kv_pairs=4, num_examples=200)
    inputs, labels = generate(cfg, seed=5)
    fill = inputs[:, 8:][labels[:, 8:] == IGNORE_INDEX]
    counts = torch.bincount(fill, minlength=64).double()
    assert counts.min() > 0  # token 0 and both halves of the vocabulary show up
    expected = fill.numel() / 64
    assert (counts - expected).abs().max() < 6 * expected**0.5


def test_worked_example_layout() -> None:
    """The smallest case spelled out: V=16, L=12, kv=2, zero fill."""
    cfg = MQARConfig(vocab_size=16, seq_len=12, num_kv_pairs=2, random_non_queries=False,
                     num_examples=50)  # fmt: skip
    inputs, labels = generate(cfg, seed=0)
    _check_format(cfg, inputs, labels)
    row, lab = inputs[0].tolist(), labels[0].tolist()
    k1, v1, k2, v2 = row[:4]
    q = [p for p in range(12) if lab[p] != IGNORE_INDEX]
    assert sorted(row[p] for p in q) == sorted([k1, k2])
    assert {row[p]: lab[p] for p in q} == {k1: v1, k2: v2}
    assert all(p in (4, 6, 8, 10) for p in q)


def test_determinism() -> None:
    cfg = MQARConfig(seq_len=128, num_kv_pairs=8, num_examples=500)
    a = generate(cfg, seed=7)
    b = generate(cfg, seed=7)
    c = generate(cfg, seed=8)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    assert not torch.equal(a[1], c[1])
    d = generate(cfg, seed=np.random.SeedSequence(7))
    assert torch.equal(a[0], d[0]) and torch.equal(a[1], d[1])


def test_determinism_across_blocks() -> None:
    """Large N crosses internal block boundaries; still deterministic and well formed."""
    cfg = MQARConfig(vocab_size=64, seq_len=4096, num_kv_pairs=16, num_examples=2500)
    a, la = generate(cfg, seed=1)
    b, lb = generate(cfg, seed=1)
    assert torch.equal(a, b) and torch.equal(la, lb)
    _check_format(cfg, a, la)
    # Blocks are seeded independently: the first and the last rows are not repeats.
    assert not torch.equal(a[:10], a[-10:])


def test_train_test_disjoint() -> None:
    tr_cfg = MQARConfig(seq_len=128, num_kv_pairs=8, num_examples=400)
    te_cfg = dataclasses.replace(tr_cfg, num_examples=100)
    (xtr, ytr), (xte, yte) = train_test(tr_cfg, te_cfg, seed=0)
    _check_format(tr_cfg, xtr, ytr)
    _check_format(te_cfg, xte, yte)
    assert not torch.equal(xtr[:100], xte)
    # No test example is a train example.
    tr_rows = {tuple(r) for r in xtr.tolist()}
    assert not any(tuple(r) in tr_rows for r in xte.tolist())
    # Same config for both splits still gives different data, and is reproducible.
    (a, _), (b, _) = train_test(tr_cfg, tr_cfg, seed=0)
    assert torch.equal(a, xtr) and not torch.equal(a, b)
    (c, _), _ = train_test(tr_cfg, te_cfg, seed=1)
    assert not torch.equal(a, c)
    # Neither split is the plain generate() stream of the same seed.
    assert not torch.equal(generate(tr_cfg, seed=0)[0], xtr)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(seq_len=63, num_kv_pairs=16), "seq_len"),
        (dict(seq_len=10, num_kv_pairs=3), "4 \\* num_kv_pairs"),
        (dict(vocab_size=8191), "even"),
        (dict(vocab_size=2, num_kv_pairs=1, seq_len=8), "even and >= 4"),
        (dict(vocab_size=32, num_kv_pairs=16), "key tokens"),
        (dict(power_a=0.0), "power_a"),
        (dict(power_a=-0.5), "power_a"),
        (dict(power_a=1.5), "power_a"),
        (dict(power_a=float("nan")), "power_a"),
        (dict(num_kv_pairs=0), "num_kv_pairs"),
        (dict(num_examples=0), "num_examples"),
        (dict(num_examples=2.5), "num_examples"),
        (dict(seq_len=True), "seq_len"),
        (dict(random_non_queries=1), "random_non_queries"),
    ],
)
def test_invalid_configs(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MQARConfig(**{"num_examples": 10, **kwargs})


def test_valid_edge_configs() -> None:
    MQARConfig(vocab_size=34, seq_len=64, num_kv_pairs=16, power_a=1.0, num_examples=1)
    MQARConfig(vocab_size=4, seq_len=4, num_kv_pairs=1, num_examples=1)
    with pytest.raises(ValueError, match="seed"):
        generate(MQARConfig(num_examples=1), seed=-1)


def _ks(samples: np.ndarray, p: np.ndarray) -> float:
    """max |empirical CDF - CDF of p| over the support of p."""
    emp = np.bincount(samples, minlength=p.size)[: p.size] / samples.size
    return float(np.abs(np.cumsum(emp) - np.cumsum(p)).max())


@pytest.mark.parametrize("a", [0.01, 0.3, 1.0])
def test_gap_power_law_single_pair(a: float) -> None:
    """kv=1: each gap is one exact draw from p(g) ∝ (g+1)^(a-1) over the free slots."""
    n = 40_000
    cfg = MQARConfig(vocab_size=64, seq_len=256, num_kv_pairs=1, power_a=a, num_examples=n)
    inputs, labels = generate(cfg, seed=2024)
    gaps = _gaps(cfg, inputs, labels)[:, 0]
    S = cfg.num_gap_slots
    assert S == 127
    g = np.arange(S, dtype=np.float64)
    p = (g + 1) ** (a - 1)
    p /= p.sum()
    np.testing.assert_allclose(cfg.gap_probs(), p, rtol=1e-12)
    bound = 1.63 / np.sqrt(n)  # KS at alpha = 0.01 (conservative for a discrete law)
    assert _ks(gaps, p) < bound
    # The test has teeth: a wrong law (uniform, or a different exponent) is far outside it.
    wrong = np.full(S, 1.0 / S) if a != 1.0 else (g + 1) ** -0.5 / ((g + 1) ** -0.5).sum()
    assert np.abs(np.cumsum(wrong) - np.cumsum(p)).max() > 5 * bound
    # Chi-square on the first bins, where most of the mass of a small a sits.
    counts = np.bincount(gaps, minlength=S).astype(np.float64)
    exp = n * p
    chi2 = float((((counts - exp) ** 2) / exp).sum())
    # df = 126: mean 126, sd ~ 15.9; 6 sd above the mean is never reached by a right law.
    assert chi2 < 126 + 6 * np.sqrt(2 * 126)


def test_gap_order_matches_zoology_sequential_draw() -> None:
    """Key i gets the i-th draw of numpy ``choice(replace=False, p=p)``, as in Zoology.

    The first key's gap is an exact draw from p; later keys' gaps follow the conditional
    laws of a sequential draw. Compare every key's gap marginal with a loop-based numpy
    reference by a two-sample KS bound.
    """
    kv, n_ref = 4, 4000
    cfg = MQARConfig(vocab_size=64, seq_len=48, num_kv_pairs=kv, power_a=0.05,
                     num_examples=20_000)  # fmt: skip
    inputs, labels = generate(cfg, seed=99)
    gaps = _gaps(cfg, inputs, labels)
    p = cfg.gap_probs()
    S = p.size
    rng = np.random.RandomState(0)
    ref = np.stack([rng.choice(S, size=kv, replace=False, p=p) for _ in range(n_ref)])
    assert _ks(gaps[:, 0], p) < 1.63 / np.sqrt(gaps.shape[0])
    bound = 1.95 * np.sqrt(1 / n_ref + 1 / gaps.shape[0])  # alpha = 0.001 per key
    for i in range(kv):
        cdf_ref = np.cumsum(np.bincount(ref[:, i], minlength=S)) / n_ref
        cdf = np.cumsum(np.bincount(gaps[:, i], minlength=S)) / gaps.shape[0]
        assert np.abs(cdf - cdf_ref).max() < bound, i
    # Later draws are spread further than the first one (the test can tell them apart).
    assert gaps[:, kv - 1].mean() > gaps[:, 0].mean() + 1.0


@pytest.mark.parametrize("vocab_size, kv", [(20, 2), (20, 8)])  # Floyd path, top-k path
def test_keys_and_values_uniform_in_order(vocab_size: int, kv: int) -> None:
    """Each context slot holds a uniform key/value: a biased order would show here."""
    n = 20_000
    cfg = MQARConfig(vocab_size=vocab_size, seq_len=4 * kv, num_kv_pairs=kv, num_examples=n)
    inputs, _ = generate(cfg, seed=3)
    half = vocab_size // 2
    for col, lo, hi in ((0, 1, half), (2 * kv - 2, 1, half), (1, half, vocab_size)):
        counts = np.bincount(inputs[:, col].numpy(), minlength=vocab_size)[lo:hi]
        q = 1.0 / (hi - lo)
        sd = np.sqrt(n * q * (1 - q))
        assert np.abs(counts - n * q).max() < 5 * sd, (col, counts)


def test_device_and_shapes() -> None:
    cfg = MQARConfig(seq_len=64, num_kv_pairs=4, num_examples=3)
    x, y = generate(cfg, seed=0, device="cpu")
    assert x.device.type == y.device.type == "cpu"
    assert x.shape == y.shape == (3, 64)
    assert x.is_contiguous() and y.is_contiguous()


def test_vectorised_speed() -> None:
    cfg = MQARConfig(vocab_size=8192, seq_len=512, num_kv_pairs=32, num_examples=20_000)
    generate(dataclasses.replace(cfg, num_examples=16), seed=0)  # warm-up
    t0 = time.perf_counter()
    inputs, labels = generate(cfg, seed=0)
    elapsed = time.perf_counter() - t0
    assert inputs.shape == labels.shape == (20_000, 512)
    assert elapsed < 10.0, f"20k x 512 took {elapsed:.1f} s"
