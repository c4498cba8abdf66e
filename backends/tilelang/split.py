"""A sequence split into segments, one kernel program each (host side, torch on the device).

Every TileLang kernel walks the chunks of one (batch, head) in order, so a call of B * H
programs leaves most of a GPU idle when B * H is small against its SM count (64 programs on
an H100's 132 SMs at issue 3's shape). ``call`` splits T into ``n`` whole segments of
``L = segment`` tokens and a tail of ``rem = T - n L``: the segments are walked as a batch of
``B n`` sequences (``body``, a view of the ``[B, T, H, C]`` operands when T = n L), the tail
as a batch of B (``tail``). Linear attention composes over segments through the state:

    S_start[s] = S_0 + sum_{s' < s} S_own[s']           (forward: exclusive prefix)
    G_end[s]   = G_T + sum_{s' > s} G_own[s']           (dk/dv sweep: exclusive suffix)

where ``S_own[s]`` is segment s's state summed from zero (``kernels.state_kernel``) and
``G_own[s]`` its own final-state cotangent sum (``backward.dkv_kernel`` from zero). The scans
(``scan``) are torch cumsums in float32 on the device: the one piece of a split
call that is not TileLang.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SEGMENT_PROGRAMS = 4
"""The automatic split (``segment`` "auto") aims at this many programs per SM."""
MIN_SEGMENT = 256
"""The automatic split keeps segments at least this long (four 64-token chunks: shorter ones
would spend more on the state sums and scans than their walk saves)."""
DEFAULT_SEGMENT: int | str = 0
"""``segment`` where a configuration leaves it None: no split. "auto" is meant to replace it
once a GPU run has passed the property suite with a split configuration and timed it
(the C-target oracle tests pass; every earlier first GPU run of these kernels found
something the CPU could not)."""


def segment(config: dict | None, device: torch.device, programs: int, T: int) -> int:
    """Tokens per segment for a call of ``programs`` (B * H) sequences of length T, from
    ``config["segment"]`` (None or absent: ``DEFAULT_SEGMENT``): a token count (0: no split,
    one program walks a whole sequence), or "auto": on a CUDA device the power-of-two
    fraction of T that makes ~``SEGMENT_PROGRAMS`` programs per SM, at least
    ``MIN_SEGMENT`` tokens; 0 on the CPU, where the C target runs programs one after the
    other. Raises ``ValueError`` for anything else."""
    given = (config or {}).get("segment")
    given = DEFAULT_SEGMENT if given is None else given
    if given != "auto":
        if isinstance(given, bool) or not isinstance(given, int) or given < 0:
            raise ValueError(f"tilelang segment {given!r} is not a token count >= 0 or 'auto'")
        return given
    if device.type != "cuda":
        return 0
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = -(-SEGMENT_PROGRAMS * sms // programs)  # segments per sequence
    if want <= 1:
        return 0
    pieces = 1 << (want - 1).bit_length()
    return max(MIN_SEGMENT, -(-T // pieces))


@dataclass(frozen=True)
class Split:
    """``T = n L + rem`` for a ``[B, T, ...]`` call (``L = 0``: no split, n = 0)."""

    B: int
    T: int
    L: int

    @property
    def n(self) -> int:
        """Whole segments (0 when the sequence is not longer than one)."""
        return self.T // self.L if 0 < self.L < self.T else 0

    @property
    def rem(self) -> int:
        """Tokens past the last whole segment (the tail), T when there are none."""
        return self.T - self.n * self.L

    def body(self, t: torch.Tensor) -> torch.Tensor:
        """``[B, T, ...]`` -> the segments as a batch ``[B n, L, ...]``, contiguous (the
        kernels take packed operands): a view when T = n L, else a copy of the first ``n L``
        tokens. (``reshape`` alone returns a strided view when n = 1 < B: session 19's H100
        property run, B = 2, T = 49, L = 48, stopped at TileLang's stride check.)"""
        return t[:, : self.n * self.L].reshape(self.B * self.n, self.L, *t.shape[2:]).contiguous()

    def tail(self, t: torch.Tensor) -> torch.Tensor:
        """``[B, T, ...]`` -> its last ``rem`` tokens ``[B, rem, ...]``, contiguous."""
        return t[:, self.n * self.L :].contiguous()

    def empty_body(self, like: torch.Tensor) -> torch.Tensor:
        """An output ``[B n, L, ...]`` for ``body(like)``."""
        return torch.empty((self.B * self.n, self.L, *like.shape[2:]), dtype=like.dtype,
                           device=like.device)  # fmt: skip

    def empty_tail(self, like: torch.Tensor) -> torch.Tensor:
        """An output ``[B, rem, ...]`` for ``tail(like)``."""
        return torch.empty((self.B, self.rem, *like.shape[2:]), dtype=like.dtype,
                           device=like.device)  # fmt: skip

    def join(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """The per-token outputs of the body and / or the tail back as ``[B, T, ...]``."""
        whole = [p.reshape(self.B, -1, *p.shape[2:]) for p in parts]
        return whole[0] if len(whole) == 1 else torch.cat(whole, 1)

    def empty_states(self, S: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Per-segment state buffers ``[B n, H, R, BV]``, ``[B n, H, R]`` shaped like one
        sequence's ``S [B, H, R, BV]``, ``z [B, H, R]``."""
        n = self.B * self.n
        return (torch.empty((n, *S.shape[1:]), dtype=S.dtype, device=S.device),
                torch.empty((n, *z.shape[1:]), dtype=z.dtype, device=z.device))  # fmt: skip

    def scan(self, own: torch.Tensor, start: torch.Tensor | None,
             reverse: bool = False) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """From the segments' own sums ``own [B n, ...]`` and the sequence's ``start [B, ...]``
        (None: zero): each segment's initial state ``[B n, ...]`` (contiguous, float32), the
        exclusive prefix, or with ``reverse`` the exclusive suffix (the cotangent entering
        each segment's end from ``start`` at the sequence's end); and the total ``[B, ...]``,
        ``start`` plus every segment's sum (the final state; reversed, the initial state's
        gradient): ``exclusive_scan``."""
        own = own.reshape(self.B, self.n, *own.shape[1:])  # [B, n, ...]
        starts, total = exclusive_scan(own, start, reverse)
        return starts.reshape(self.B * self.n, *own.shape[2:]), total


def exclusive_scan(own: torch.Tensor, start: torch.Tensor | None,
                   reverse: bool = False) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Over the segments' own sums ``own [B, n, ...]`` (n >= 1) from ``start [B, ...]`` (None:
    zero): ``(starts [B, n, ...], total [B, ...])``, ``starts[:, s] = start + sum_{s' < s}
    own[:, s']`` (with ``reverse``: ``s' > s``) and ``total = start + sum own``."""
    if reverse:  # the suffix sums are the prefix sums of the segments in reverse order
        own = own.flip(1)
    # one pass over the sums: the exclusive prefix straight into its buffer (this scan's
    # traffic is a sizeable part of a split forward: the sums are ~70 KB a segment)
    starts = torch.empty_like(own)  # [B, n, ...]
    starts[:, 0] = 0.0
    if own.shape[1] > 1:
        torch.cumsum(own[:, :-1], 1, out=starts[:, 1:])
    total = starts[:, -1] + own[:, -1]  # [B, ...]
    if start is not None:
        starts += start[:, None]
        total += start
    if reverse:
        starts = starts.flip(1)
    return starts, total
