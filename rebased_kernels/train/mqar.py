"""Multi-query associative recall (MQAR) data, equivalent to Zoology's ``multiquery_ar``.

This is the synthetic task of the Based / ReBased papers, generated fully vectorised (a
Python loop runs only over blocks of examples and, for key/value sampling, over the
``num_kv_pairs`` columns, never over examples) and deterministically from a seed.

Format (``V = vocab_size``, ``L = seq_len``, ``kv = num_kv_pairs``, ``C = 2 * kv``):

* The vocabulary is split in half. Keys are drawn from ``[1, V/2)`` (token 0 is the fill
  token) and values from ``[V/2, V)``, without replacement within an example.
* Positions ``0 .. C-1`` hold the context ``k1 v1 k2 v2 ... k_kv v_kv``.
* The ``L - C`` positions after it are ``(L - C) // 2`` two-token query slots; slot ``g``
  (the *gap*, counted from the end of the context) starts at position ``C + 2 g``. Every
  key is queried exactly once: the slots are drawn without replacement with
  ``p(g) ∝ a (g + 1) ** (a - 1)``, ``g = 0 .. (L - C) // 2 - 1`` (``a = power_a``; small
  ``a`` favours short gaps), slot ``i`` of the draw order going to key ``i`` exactly as
  ``numpy.random.choice(..., replace=False, p=p)`` does in Zoology. Here the draw is the
  Gumbel-top-k trick (``top-kv`` of ``log p + Gumbel noise`` per row), which has the same
  distribution as that sequential draw, order included.
* At a query position ``q``: ``inputs[q] = key`` and ``labels[q] = value`` (next-token
  style: the model must emit the value right after reading the key). ``labels`` is -100
  everywhere else.
* Every other position after the context holds token 0 if ``random_non_queries`` is False,
  otherwise a token drawn uniformly from ``[0, V)`` (as Zoology does; such a random token
  may coincide with a key, but only query positions carry a label).

Tiny worked example (``V = 16``, ``L = 12``, ``kv = 2``, ``random_non_queries=False``):
keys ``(3, 5)``, values ``(9, 14)``, gaps ``(2, 0)`` (key 3 in slot 2, key 5 in slot 0)::

    position     0     1     2     3     4     5     6     7     8     9    10    11
    inputs       3     9     5    14     5     0     0     0     3     0     0     0
    labels    -100  -100  -100  -100    14  -100  -100  -100     9  -100  -100  -100

Differences from Zoology: odd ``seq_len`` is allowed (the last position is then always
filler) and ``vocab_size > seq_len`` is not required; the random streams differ (torch
instead of numpy), the distributions do not.

Speed (measured on the 2-core CPU dev machine, torch 2.13, one process): 100,000 examples
at ``seq_len=2048``, ``num_kv_pairs=64``, ``vocab_size=8192`` in 3.5-4.1 s (~25k examples/s,
~55M tokens/s; the two int64 outputs alone take 3.3 GB, sampling scratch is bounded by
blocks of ~8M elements); 20,000 examples at ``seq_len=512``, ``num_kv_pairs=32`` in 0.19 s.
Large ``num_kv_pairs`` is slower (keys/values then come from a top-k over the half
vocabulary): 20,000 x 2048 with ``num_kv_pairs=512`` takes ~2.3 s.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["IGNORE_INDEX", "MQARConfig", "generate", "train_test"]

IGNORE_INDEX = -100
"""Label at every non-query position (PyTorch's ``cross_entropy`` default ``ignore_index``)."""

# Scratch budget per block: rows * max(seq_len, pools) stays near this many elements.
_BLOCK_ELEMS = 1 << 23


def _is_int(x: object) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


@dataclass(frozen=True)
class MQARConfig:
    """One MQAR data split. See the module docstring for the format.

    Attributes:
        vocab_size: ``V``, even; keys come from ``[1, V/2)``, values from ``[V/2, V)``.
        seq_len: ``L``, the length of every example; at least ``4 * num_kv_pairs``.
        num_kv_pairs: key-value pairs per example (all queried once), at most ``V/2 - 1``.
        power_a: exponent ``a`` of the gap law ``p(g) ∝ a (g+1)^(a-1)``, in ``(0, 1]``.
        random_non_queries: fill non-query positions with uniform tokens (else token 0).
        num_examples: ``N``, the number of examples.
    """

    vocab_size: int = 8192
    seq_len: int = 256
    num_kv_pairs: int = 16
    power_a: float = 0.01
    random_non_queries: bool = True
    num_examples: int = 100_000

    def __post_init__(self) -> None:
        for name in ("vocab_size", "seq_len", "num_kv_pairs", "num_examples"):
            if not _is_int(getattr(self, name)):
                raise ValueError(f"{name} must be an int, got {getattr(self, name)!r}")
        if not isinstance(self.random_non_queries, (bool, np.bool_)):
            raise ValueError(f"random_non_queries must be a bool, got {self.random_non_queries!r}")
        if self.num_examples < 1:
            raise ValueError(f"num_examples must be >= 1, got {self.num_examples}")
        if self.num_kv_pairs < 1:
            raise ValueError(f"num_kv_pairs must be >= 1, got {self.num_kv_pairs}")
        if self.vocab_size < 4 or self.vocab_size % 2:
            raise ValueError(
                f"vocab_size must be even and >= 4 (keys [1, V/2), values [V/2, V)), "
                f"got {self.vocab_size}"
            )
        if self.vocab_size // 2 - 1 < self.num_kv_pairs:
            raise ValueError(
                f"vocab_size={self.vocab_size} leaves {self.vocab_size // 2 - 1} key tokens "
                f"[1, V/2), fewer than num_kv_pairs={self.num_kv_pairs}; need "
                f"vocab_size >= 2 * (num_kv_pairs + 1)"
            )
        if self.seq_len < 4 * self.num_kv_pairs:
            raise ValueError(
                f"seq_len={self.seq_len} is too short for num_kv_pairs={self.num_kv_pairs}: "
                f"the context takes 2*kv={2 * self.num_kv_pairs} positions and the kv queries "
                f"need kv two-token slots after it, so seq_len >= 4 * num_kv_pairs "
                f"= {4 * self.num_kv_pairs}"
            )
        a = self.power_a
        if isinstance(a, (bool, np.bool_)) or not isinstance(a, (int, float, np.number)):
            raise ValueError(f"power_a must be a real number, got {a!r}")
        if not (0.0 < float(a) <= 1.0):
            raise ValueError(f"power_a must be in (0, 1], got {a}")

    @property
    def num_gap_slots(self) -> int:
        """Number of query slots after the context, ``(seq_len - 2 * num_kv_pairs) // 2``."""
        return (self.seq_len - 2 * self.num_kv_pairs) // 2

    def gap_probs(self) -> np.ndarray:
        """The gap law ``p(g) ∝ (g+1)^(a-1)`` over ``g = 0 .. num_gap_slots-1``, float64 [S]."""
        g = np.arange(1, self.num_gap_slots + 1, dtype=np.float64)
        p = self.power_a * g ** (self.power_a - 1.0)
        return p / p.sum()


def _use_floyd(pool: int, k: int) -> bool:
    return k * k <= 8 * pool


def _sample_distinct(gen: torch.Generator, rows: int, pool: int, k: int) -> torch.Tensor:
    """Per row, ``k`` distinct values of ``[0, pool)`` as a uniform random ordered sample.

    Returns int64 [rows, k]. Floyd's algorithm (a loop over the k columns, vectorised over
    rows, then a per-row shuffle) when ``k`` is small next to ``pool``; otherwise the top-k
    of ``rows x pool`` uniform scores.
    """
    if _use_floyd(pool, k):
        out = torch.empty((rows, k), dtype=torch.int64)
        for i, j in enumerate(range(pool - k, pool)):
            t = torch.randint(0, j + 1, (rows,), generator=gen)
            if i:
                taken = (out[:, :i] == t[:, None]).any(dim=1)
                t = torch.where(taken, j, t)
            out[:, i] = t
        # Floyd draws a uniform subset in a biased order: shuffle each row.
        perm = torch.rand((rows, k), generator=gen).argsort(dim=1)
        return out.gather(1, perm)
    scores = torch.rand((rows, pool), generator=gen)
    return scores.topk(k, dim=1, sorted=True).indices


def _fill_block(
    cfg: MQARConfig, gen: torch.Generator, inputs: torch.Tensor, labels: torch.Tensor
) -> None:
    """Fill one block in place: ``inputs`` and ``labels`` are int64 [rows, seq_len] views."""
    V, kv, rows = cfg.vocab_size, cfg.num_kv_pairs, inputs.shape[0]
    C, half = 2 * kv, cfg.vocab_size // 2

    keys = _sample_distinct(gen, rows, half - 1, kv) + 1  # [rows, kv] in [1, V/2)
    values = _sample_distinct(gen, rows, V - half, kv) + half  # [rows, kv] in [V/2, V)

    # Gumbel-top-k: top-kv of log p(g) - log E, E ~ Exp(1) (E = -log U), is the same draw as
    # sequential proportional sampling without replacement, order included.
    logp = torch.from_numpy(np.log(cfg.gap_probs())).to(torch.float32)
    u = torch.rand((rows, logp.numel()), generator=gen)
    scores = u.log_().neg_().log_().neg_().add_(logp)
    gaps = scores.topk(kv, dim=1, sorted=True).indices  # [rows, kv], gaps[:, i] for key i
    pos = C + 2 * gaps

    if cfg.random_non_queries:
        torch.randint(0, V, inputs.shape, generator=gen, out=inputs)
    else:
        inputs.zero_()
    inputs[:, 0:C:2] = keys
    inputs[:, 1:C:2] = values
    inputs.scatter_(1, pos, keys)
    labels.fill_(IGNORE_INDEX)
    labels.scatter_(1, pos, values)


def _generate(
    cfg: MQARConfig, seq: np.random.SeedSequence, device: str | torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    N, L = cfg.num_examples, cfg.seq_len
    half, kv = cfg.vocab_size // 2, cfg.num_kv_pairs
    width = max(L, half if not _use_floyd(half - 1, kv) else 0)  # widest scratch per row
    rows_per_block = max(1, _BLOCK_ELEMS // width)
    n_blocks = -(-N // rows_per_block)
    inputs = torch.empty((N, L), dtype=torch.int64)
    labels = torch.empty((N, L), dtype=torch.int64)
    gen = torch.Generator()
    for b, child in enumerate(seq.spawn(n_blocks)):
        gen.manual_seed(int(child.generate_state(1, dtype=np.uint64)[0]))
        lo = b * rows_per_block
        hi = min(N, lo + rows_per_block)
        _fill_block(cfg, gen, inputs[lo:hi], labels[lo:hi])
    return inputs.to(device), labels.to(device)


def generate(
    cfg: MQARConfig, seed: int | np.random.SeedSequence, device: str | torch.device = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generate ``cfg.num_examples`` MQAR examples, deterministically from ``seed``.

    Sampling runs on the CPU (so a seed gives the same data on every device); the result is
    then moved to ``device``.

    Returns:
        ``(inputs, labels)``, both int64 ``[num_examples, seq_len]``; ``labels`` is the value
        at each of the ``num_kv_pairs`` query positions (where ``inputs`` holds its key) and
        -100 (``IGNORE_INDEX``) everywhere else.
    """
    if not isinstance(seed, np.random.SeedSequence):
        if not _is_int(seed) or seed < 0:
            raise ValueError(f"seed must be a non-negative int or a SeedSequence, got {seed!r}")
        seed = np.random.SeedSequence(int(seed))
    return _generate(cfg, seed, device)


def train_test(
    train_cfg: MQARConfig,
    test_cfg: MQARConfig,
    seed: int,
    device: str | torch.device = "cpu",
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Generate a train and a test split from disjoint seed streams.

    The two streams are ``numpy.random.SeedSequence(seed).spawn(2)``, so they never coincide
    (and differ from ``generate(cfg, seed)``'s stream too).

    Returns:
        ``((train_inputs, train_labels), (test_inputs, test_labels))``, each int64
        ``[cfg.num_examples, cfg.seq_len]`` of its config.
    """
    if not _is_int(seed) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    train_seq, test_seq = np.random.SeedSequence(int(seed)).spawn(2)
    return generate(train_cfg, train_seq, device), generate(test_cfg, test_seq, device)
