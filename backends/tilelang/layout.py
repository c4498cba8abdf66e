"""The TileLang kernels' state layout (plain Python: importing it loads no TileLang).

The kernel keeps one block per power ``p`` of ``sim`` with ``c_p != 0``, unscaled and
unpacked: ``ROWS[p]`` rows of the power-p features ``x^(p)`` of a 16-column row ``x'``::

    x^(2)[16 a + b] = x'_a x'_b   (256 rows)    x^(1)[a] = x'_a   (16 rows)    x^(0) = 1   (1 row)

Its state ``S [R, Dv]`` stacks the blocks ``S_p = sum_j k_j^(p) v_j^T`` highest power first
(so every block starts on a 16-row boundary) and ``z [R]`` the matching ``z_p = sum_j k_j^(p)``
(``z_2`` is ``Z = sum_j k'_j k'_j^T`` flattened, ``z_0`` the token count). ``call`` maps it
to the spec's canonical layout and back.
"""

from __future__ import annotations

DK = 16
"""q', k' columns on chip: D <= 16 padded with exact zeros."""
ROWS = {2: DK * DK, 1: DK, 0: 1}
"""Rows of the kernel's block of power p."""


def block_offsets(powers: tuple[int, ...]) -> tuple[dict[int, int], int]:
    """The first row of each power's block in the stacked state, and the row count R."""
    offsets, R = {}, 0
    for p in sorted(powers, reverse=True):
        offsets[p] = R
        R += ROWS[p]
    return offsets, R


def block_row(idx: tuple[int, ...]) -> int:
    """The row of feature ``x'_{i_1} ... x'_{i_p}`` inside its block: ``16 i_1 + i_2`` for
    p = 2, ``i_1`` for p = 1, 0 for p = 0."""
    row = 0
    for i in idx:
        row = DK * row + i
    return row


def padded_value_dim(Dv: int, itemsize: int, tiles: bool = False) -> int:
    """``BV``: Dv rounded up to 64 bytes of elements of ``itemsize`` bytes: a multiple of 16
    in fp32, of 32 in bf16 / fp16. Hopper's wgmma takes v (and g, dO) as an MN-major shared
    operand, whose canonical layouts are 64-byte rows: bf16 tiles of 16 or 48 columns fail
    TileLang's sm_90a lowering ("Not a canonical GMMA_MN layout", H200 session 10; the
    lowering on the CPU fails the same way, ``tests/test_tilelang.py``). ``tiles`` (the
    ``forward="tiles"`` configuration's kernels): a multiple of 32 in fp32 too: the tile dq
    kernel's first pass runs outside its pipeline on both warpgroups, whose 8 warps cannot
    share an ``A v`` product of 16 columns ("No valid warp partition", TileLang 0.1.15), and
    an fp32 tile forward of 16 columns failed its lowering's ThreadSync (session 20)."""
    step = max(64 // itemsize, 32 if tiles else 0)
    return max(step, -(-Dv // step) * step)
