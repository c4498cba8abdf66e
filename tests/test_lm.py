"""The language-model harness on the CPU: data formats, AR mask, training, resume, DDP."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rebased_kernels.train import lm_data
from rebased_kernels.train.lm_loop import LMTrainConfig, ar_mask, eval_checkpoint, train_lm


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    """A real corpus without a download: 200 standard-library modules, byte-tokenised."""
    out = tmp_path_factory.mktemp("corpus")
    lm_data.prepare(lm_data.stdlib_corpus(limit=200), out, "byte", workers=2, progress=False)
    return str(out)


def _cfg(corpus: str, **kw) -> LMTrainConfig:
    base = dict(data=corpus, seq_len=64, batch_size=8, max_steps=12, warmup_steps=3,
                eval_every=6, eval_batches=2, lr=3e-3)  # fmt: skip
    return LMTrainConfig(**{**base, **kw})


def test_ar_mask_on_hand_built_sequences() -> None:
    # bigrams: (1,2) (2,3) (3,1) (1,2)* (2,4) (4,1) (1,2)* ; * = seen earlier in the row
    w = torch.tensor([[1, 2, 3, 1, 2, 4, 1, 2], [5, 5, 5, 5, 6, 5, 5, 6]])
    expect = torch.tensor([[0, 0, 0, 1, 0, 0, 1], [0, 1, 1, 0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(ar_mask(w), expect)


def test_token_files_and_indexed_datasets_round_trip(tmp_path) -> None:
    rng = np.random.default_rng(0)
    docs = [rng.integers(1, 50000, size=n).astype(np.uint16) for n in (5, 17, 3, 40)]
    lm_data.write_indexed(tmp_path / "pile", docs)
    got = lm_data.load_tokens(tmp_path / "pile.bin")
    assert got.dtype == np.uint16 and np.array_equal(got, np.concatenate(docs))
    (tmp_path / "idx").mkdir()
    (tmp_path / "pile.idx").write_bytes(b"NOTMAGIC" + (tmp_path / "pile.idx").read_bytes()[8:])
    with pytest.raises(ValueError, match="magic"):
        lm_data.load_tokens(tmp_path / "pile")
    flat = np.arange(1000, dtype=np.uint32) * 70001 % 100000
    flat.tofile(tmp_path / "idx" / "train.bin")
    (tmp_path / "idx" / "meta.json").write_text(json.dumps(dict(dtype="uint32")))
    assert np.array_equal(lm_data.load_tokens(tmp_path / "idx" / "train.bin"), flat)
    x, y = lm_data.batches(flat, 16, 4, seed=3, step=7)
    x2, y2 = lm_data.batches(flat, 16, 4, seed=3, step=7)
    assert torch.equal(x, x2) and torch.equal(y, y2) and x.shape == (4, 16)
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_gpt2_bpe_from_local_files(tmp_path) -> None:
    """The BPE merges in rank order on GPT-2's byte alphabet (space is 'Ġ')."""
    enc = {c: i for i, c in enumerate(["l", "o", "w", "e", "r", "Ġ", "lo", "low", "er", "Ġl"])}
    (tmp_path / "encoder.json").write_text(json.dumps(enc))
    (tmp_path / "vocab.bpe").write_text("#version: 0.2\nl o\nlo w\ne r\nĠ l\n")
    tok = lm_data.GPT2Tokenizer(tmp_path / "encoder.json", tmp_path / "vocab.bpe")
    # " low" = Ġ l o w: (l, o) ranks first, then (lo, w); (Ġ, low) is no merge
    assert tok.encode("lower low") == [enc["low"], enc["er"], enc["Ġ"], enc["low"]]
    assert tok.encode(" lr") == [enc["Ġl"], enc["r"]]


def test_tiny_lm_learns_the_stdlib_within_a_minute(corpus, tmp_path) -> None:
    start = time.perf_counter()
    r = train_lm(_cfg(corpus, max_steps=60, eval_every=60, out_dir=str(tmp_path)),
                 progress=False)  # fmt: skip
    h = r["history"]
    assert time.perf_counter() - start < 60
    first, last = np.mean([x["loss"] for x in h[:5]]), np.mean([x["loss"] for x in h[-5:]])
    assert last < first - 1.5, (first, last)  # from ~5.5 (uniform over 257 bytes)
    final = h[-1]
    assert final["ppl_ar"] < final["ppl_all"] < final["ppl_non_ar"]  # repeats are easier
    assert (tmp_path / "curves.png").stat().st_size > 0
    assert eval_checkpoint(tmp_path / "checkpoint.pt", batches=2)["ppl_all"] == pytest.approx(
        final["ppl_all"], rel=1e-5
    )


def test_resume_is_bit_identical(corpus, tmp_path) -> None:
    full = train_lm(_cfg(corpus, out_dir=str(tmp_path / "a")), progress=False)
    train_lm(_cfg(corpus, stop_at=5, out_dir=str(tmp_path / "b")), progress=False)
    resumed = train_lm(_cfg(corpus, out_dir=str(tmp_path / "c")),
                       resume_from=tmp_path / "b" / "checkpoint.pt", progress=False)  # fmt: skip
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in full["history"]]
    for (n, a), b in zip(
        full["model"].state_dict().items(), resumed["model"].state_dict().values()
    ):
        assert torch.equal(a, b), n


def _grads(model) -> dict:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _ddp_worker(rank: int, world: int, corpus: str, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.set_num_threads(1)
    first = train_lm(_cfg(corpus, max_steps=1, grad_accum=2), progress=False)
    r = train_lm(_cfg(corpus, max_steps=3, grad_accum=2), progress=False)
    if rank == 0:
        torch.save(dict(losses=[h["loss"] for h in r["history"]],
                        grads=_grads(first["model"])), out)  # fmt: skip
    dist.destroy_process_group()


def test_two_process_ddp_equals_one_process(corpus, tmp_path) -> None:
    """Same global batch: 2 gloo processes x 2 accumulation steps == 1 process, 1 step each:
    the same losses over 3 steps and the same first-step gradients (after DDP's all-reduce;
    weights after Adam are not compared: Adam's first step is sign-like on tiny gradients)."""
    out = str(tmp_path / "ddp.pt")
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_ddp_worker, args=(2, corpus, init, out), nprocs=2, join=True)
    ddp = torch.load(out, weights_only=False)
    torch.set_num_threads(1)
    single = train_lm(_cfg(corpus, max_steps=3), progress=False)
    first = train_lm(_cfg(corpus, max_steps=1), progress=False)
    assert np.allclose(ddp["losses"], [h["loss"] for h in single["history"]], rtol=1e-5)
    grads = _grads(first["model"])
    assert grads.keys() == ddp["grads"].keys() and len(grads) > 10
    for n, g in grads.items():
        torch.testing.assert_close(ddp["grads"][n], g, rtol=1e-4, atol=1e-7, msg=n)


def _fsdp_worker(rank: int, world: int, corpus: str, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.set_num_threads(1)
    r = train_lm(_cfg(corpus, max_steps=4, stop_at=2, grad_accum=2, fsdp=True, out_dir=out),
                 progress=False)  # fmt: skip
    if rank == 0:
        torch.save([h["loss"] for h in r["history"]], f"{out}/losses.pt")
    dist.destroy_process_group()


def test_two_process_fsdp_matches_one_process_and_resumes(corpus, tmp_path) -> None:
    """FSDP2 over 2 gloo processes (2 accumulation steps each) trains like 1 process on the
    same global batch, and its checkpoint (the full state, gathered) resumes in 1 process:
    steps 1-2 sharded + steps 3-4 resumed == 4 steps in one process."""
    out = str(tmp_path / "fsdp")
    mp.spawn(_fsdp_worker, args=(2, corpus, f"file://{tmp_path / 'rdv'}", out), nprocs=2,
             join=True)  # fmt: skip
    torch.set_num_threads(1)
    single = [h["loss"] for h in train_lm(_cfg(corpus, max_steps=4), progress=False)["history"]]
    sharded = torch.load(f"{out}/losses.pt")
    resumed = train_lm(_cfg(corpus, max_steps=4), resume_from=f"{out}/checkpoint.pt",
                       progress=False)["history"]  # fmt: skip
    assert len(sharded) == 2 and [h["step"] for h in resumed] == [1, 2, 3, 4]
    assert np.allclose([h["loss"] for h in resumed], single, rtol=1e-5, atol=0)
    assert np.allclose(sharded, single[:2], rtol=1e-5, atol=0)


def test_fsdp_needs_several_processes(corpus) -> None:
    with pytest.raises(ValueError, match="torchrun"):
        train_lm(_cfg(corpus, fsdp=True), progress=False)
