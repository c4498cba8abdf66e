"""The persistent tuning cache: one JSON file per device fingerprint.

Location: ``$REBASED_KERNELS_CACHE_DIR`` or ``~/.cache/rebased-kernels`` (``$XDG_CACHE_HOME``).
A file holds ``{"device": fingerprint, "entries": {bucket key: record}}``. Writes take an
exclusive lock, re-read, merge and replace the file atomically, so concurrent writers lose
nothing; a corrupt or foreign file is reported (a warning), moved aside and rebuilt.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import platform
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch


def cache_dir() -> Path:
    root = os.environ.get("REBASED_KERNELS_CACHE_DIR")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "rebased-kernels"


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return None


def device_fingerprint(device_type: str) -> dict[str, Any]:
    """What a timing depends on besides the problem: the device and every library version."""
    fp: dict[str, Any] = dict(device_type=device_type)
    if device_type == "cuda":
        p = torch.cuda.get_device_properties(torch.cuda.current_device())
        fp.update(name=p.name, capability=f"{p.major}.{p.minor}", cuda=torch.version.cuda,
                  multiprocessors=p.multi_processor_count)  # fmt: skip
    else:
        fp.update(name=platform.processor() or platform.machine(),
                  threads=torch.get_num_threads())  # fmt: skip
    fp.update({m: _version(m) for m in ("torch", "triton", "tilelang", "numba", "rebased-kernels")})
    return fp


class TuneCache:
    """Tuned records for one device fingerprint (``fingerprint`` defaults to this machine's)."""

    def __init__(self, device_type: str, fingerprint: dict | None = None, root: Path | None = None):
        self.fingerprint = fingerprint or device_fingerprint(device_type)
        digest = hashlib.sha1(json.dumps(self.fingerprint, sort_keys=True).encode()).hexdigest()
        self.path = (root or cache_dir()) / f"tune-{digest[:16]}.json"
        self._memo: dict[str, Any] | None = None

    def entries(self) -> dict[str, Any]:
        """Every record in the file (read once per process; ``refresh`` re-reads)."""
        if self._memo is None:
            self._memo = self._read()
        return self._memo

    def get(self, key: str) -> dict | None:
        return self.entries().get(key)

    def refresh(self) -> None:
        self._memo = None

    def put(self, key: str, record: dict) -> None:
        """Merge one record into the file under the lock (other writers' records are kept)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._locked():
            entries = self._read()
            entries[key] = record
            payload = dict(device=self.fingerprint, entries=entries)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".tune-", suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump(payload, f, indent=1, sort_keys=True)
            os.replace(tmp, self.path)
        self._memo = entries

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _read(self) -> dict[str, Any]:
        if not self.path.exists():
            return {}
        try:
            payload = json.loads(self.path.read_text())
            if payload.get("device") != self.fingerprint or not isinstance(
                payload.get("entries"), dict
            ):
                raise ValueError("written for another device or library versions")
            return payload["entries"]
        except (ValueError, OSError, AttributeError) as exc:
            aside = self.path.with_suffix(".corrupt")
            warnings.warn(
                f"rebased-kernels: tuning cache {self.path} is unusable ({exc}); "
                f"moved to {aside.name} and rebuilt",
                stacklevel=2,
            )
            with contextlib.suppress(OSError):
                os.replace(self.path, aside)
            return {}
