"""``gpu_check --stages tilelang``: the TileLang kernels' first GPU check (not yet a backend).

For each dtype (bf16, fp16; fp32, which TileLang runs as TF32 on the tensor cores), feature
map (``rebased``, ``based``), length and with or without an initial state: the forward's
o, S and z (and, where ``call.backward`` exists, every gradient) against the float64
oracle on the same rounded inputs; then forward times at B=4, H=16, D=16, Dv=64 beside the
triton backend's default. The kernels those cases need are built first, in parallel
(``build.precompile``; its time and any key that fails go to ``log["tilelang"]["precompile"]``).
Rows go to ``log["tilelang"]``; a case that raises is recorded.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import reference
from ._validate import PARAM_NAMES
from .backend import Inputs, Outputs, Problem, get_backend
from .spec import PRESETS, LinearAttention
from .testing import random_inputs, rel_err


def _case(call, name: str, dtype: torch.dtype, T: int, state: bool, device: str) -> dict:
    """Relative errors of one forward (and backward) against the float64 oracle."""
    fm = PRESETS[name]
    attn = LinearAttention(fm, 0.25)
    x = random_inputs(2, T, 3, 16, 64, dtype, device, fm, seed=T, requires_grad=False)
    x64 = {n: t.double() for n, t in x.items()}
    S0 = z0 = None
    if state:  # the oracle's state after a random prefix: a state the kernels can meet
        p = random_inputs(2, 9, 3, 16, 64, torch.float64, device, fm, seed=T + 1)
        _, S0, z0 = reference.quadratic(p["q"], p["k"], p["v"], attn,
                                        tuple(p.get(n) for n in PARAM_NAMES))  # fmt: skip
        S0, z0 = S0.detach(), z0.detach()
    inp = Inputs(x["q"], x["k"], x["v"], *(x.get(n) for n in PARAM_NAMES),
                 *(None if t is None else t.float() for t in (S0, z0)))  # fmt: skip
    out = call.forward(inp, attn)
    leaves = {n: t.clone().requires_grad_() for n, t in x64.items()}
    init = None if S0 is None else (S0.clone().requires_grad_(), z0.clone().requires_grad_())
    ref = reference.quadratic(leaves["q"], leaves["k"], leaves["v"], attn,
                              tuple(leaves.get(n) for n in PARAM_NAMES), init)  # fmt: skip
    row = dict(feature_map=name, dtype=str(dtype).replace("torch.", ""), T=T, state=state,
               **{f"err_{n}": rel_err(a, b) for n, a, b in zip("oSz", out, ref)})  # fmt: skip
    if hasattr(call, "backward"):
        g = torch.Generator().manual_seed(T)
        cot = [torch.randn(r.shape, generator=g, dtype=torch.float64).to(device) for r in ref]
        grads = call.backward(inp, attn, None, Outputs(cot[0].to(dtype), cot[1].float(),
                                                       cot[2].float()))  # fmt: skip
        sum((r * c).sum() for r, c in zip(ref, cot)).backward()
        theirs = [*(None if n not in leaves else leaves[n].grad
                    for n in ("q", "k", "v", *PARAM_NAMES)),
                  *((None, None) if init is None else (init[0].grad, init[1].grad))]  # fmt: skip
        row["err_grads"] = max(rel_err(a, b) for a, b in zip(grads, theirs)
                               if a is not None and b is not None)  # fmt: skip
    return row


def _precompile(device: str, dtypes: tuple[torch.dtype, ...]) -> dict:
    """Build every kernel that ``_case`` and the timings launch in ``dtypes`` (each kind with
    and without a state) on all cores: ``build.precompile_problems``' report."""
    from rebased_kernels.backends.tilelang import build

    problems = [Problem(LinearAttention(PRESETS[name], 0.25), 16, 64, dtype, device.split(":")[0])
                for dtype in dtypes for name in ("rebased", "based")]  # fmt: skip
    return build.precompile_problems(problems, (None, {"forward": "tiles"}))


CONFIGS: dict[str, dict] = {
    "0": {"segment": 0},
    "512": {"segment": 512},
    "2048": {"segment": 2048},
    "auto": {"segment": "auto"},
    "tiles-256": {"forward": "tiles", "segment": 256},
    "tiles-512": {"forward": "tiles", "segment": 512},
}
"""The configurations timed, by name: the walk forward at segment lengths (``tilelang.split``;
0 walks a whole sequence per program, "auto" the automatic split) and the tile forward
and backward (``tilelang.tile``, ``tile_backward``: one program per chunk) at segments of 4
and 8 chunks of 64 (the backward's fp32 chunks are 32: 8 and 16 of them). Each one's o and
gradients are compared with "0"'s."""


KERNEL_TABLES = ("0", "auto", "tiles-256")
"""The configurations whose device time per kernel is recorded at the longest T (session 18:
the automatic split made forward+backward 1.5x faster at 16k, the forward no faster; the
table says whether the state sums, the scan, the walk or the tiles take it)."""


def _kernel_tables(call, inp: Inputs, attn: LinearAttention, c: dict, do: Outputs,
                   device: str) -> dict:  # fmt: skip
    """``gpu_profile.kernel_table`` of one forward and of one forward+backward."""
    from rebased_kernels.gpu_profile import kernel_table

    return dict(
        fwd=kernel_table(lambda: call.forward(inp, attn, c), device, calls=3),
        fwd_bwd=kernel_table(lambda: (call.forward(inp, attn, c),
                                      call.backward(inp, attn, c, do)), device, calls=3),
    )  # fmt: skip


def check_and_time(log: dict, device: str, small: bool, ms: Callable,
                   dtypes: tuple[torch.dtype, ...] | None = None,
                   triton_config: dict | None = None, timings: bool = True) -> None:  # fmt: skip
    """The oracle rows (``dtypes``: default bf16, fp16, fp32), then forward and
    forward+backward times beside triton's ``triton_config`` (``ms``: gpu_check's timer)."""
    from rebased_kernels.backends.tilelang import call

    rows: list[dict] = []
    log["tilelang"] = dict(oracle=rows, timings=[])  # filled in place (a cut call keeps rows)
    if dtypes is None:
        dtypes = (torch.float32,) if small else (torch.bfloat16, torch.float16, torch.float32)
    timed = torch.float32 if small else torch.bfloat16  # the timings' dtype
    log["tilelang"]["precompile"] = _precompile(device, (*dtypes, *([timed] if timings else [])))
    print("tilelang precompile", log["tilelang"]["precompile"], flush=True)
    for dtype in dtypes:
        for name in ("rebased", "based"):
            for T in (37,) if small else (100, 3000):
                for state in (False, True):
                    try:
                        rows.append(_case(call, name, dtype, T, state, device))
                    except Exception as exc:  # recorded: the first GPU run of these kernels
                        rows.append(dict(feature_map=name, dtype=str(dtype), T=T, state=state,
                                         error=f"{type(exc).__name__}: {exc}"[:300]))  # fmt: skip
                    print("tilelang", rows[-1], flush=True)
    if not timings:
        return
    fm = PRESETS["rebased"]
    attn = LinearAttention(fm, 0.25)
    triton = get_backend("triton")
    cfg = {**triton.default_config, **(triton_config or {})}
    Ts = (64,) if small else (2048, 8192, 16384)
    for T in Ts:
        B, H = (1, 2) if small else (4, 16)
        x = random_inputs(B, T, H, 16, 64, timed, device, fm, requires_grad=False)
        inp = Inputs(x["q"], x["k"], x["v"], *(x.get(n) for n in PARAM_NAMES))
        do = Outputs(torch.randn_like(x["v"]), None, None)  # training: no final state
        row: dict = dict(T=T, by_config={}, split_vs_whole={})
        whole = None  # o and the gradients of segment 0 (one program a sequence)
        for name, c in CONFIGS.items():
            got = [call.forward(inp, attn, c).o, *call.backward(inp, attn, c, do)]
            if whole is None:
                whole = got
            else:  # a split that broke shows O(1); bf16's reordered sums ~1e-3
                row["split_vs_whole"][name] = max(
                    rel_err(a, b) for a, b in zip(got, whole) if a is not None
                )
            fwd = ms(lambda inp=inp, c=c: call.forward(inp, attn, c))
            fwd_bwd = ms(lambda inp=inp, do=do, c=c: (call.forward(inp, attn, c),
                                                      call.backward(inp, attn, c, do)))  # fmt: skip
            row["by_config"][name] = [fwd, fwd_bwd]
            if T == Ts[-1] and name in KERNEL_TABLES:
                row.setdefault("kernels", {})[name] = _kernel_tables(call, inp, attn, c, do, device)
        # the row's own numbers: the fastest configuration of each (named beside them)
        for i, what in enumerate(("fwd", "fwd_bwd")):
            best = min(row["by_config"], key=lambda n: row["by_config"][n][i])
            row[f"tilelang_{what}"], row[f"best_{what}"] = row["by_config"][best][i], best
        if triton.unavailable_reason() is None and not small:  # (the interpreter: slow)
            row["triton_config"] = cfg
            row["triton_fwd"] = ms(lambda inp=inp: triton.forward_dense(inp, attn, cfg))
            row["triton_fwd_bwd"] = ms(
                lambda inp=inp, do=do: (
                    triton.forward_dense(inp, attn, cfg),
                    triton.backward_dense(inp, attn, cfg, do),
                )
            )
        log["tilelang"]["timings"].append(row)
        print("tilelang timing", row, flush=True)
