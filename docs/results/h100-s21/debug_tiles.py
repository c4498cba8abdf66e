"""Session 21: where the tile kernels go wrong on the GPU (session 21 call 1: tiles-256 and
tiles-512 differed from the unsplit walk by 0.17-0.35, the walks by ~2e-3) and why the tile
forward took 8.6 ms at 16k. Per output against the float64 oracle, for segment lengths,
pipeline stages and dtypes; per-chunk errors of o; forward times at 16k.

    python3 docs/results/h100-s21/debug_tiles.py $OUT
"""

import json
import sys
import traceback

import torch
from rebased_kernels.backends.tilelang import call

from rebased_kernels import reference
from rebased_kernels._validate import PARAM_NAMES
from rebased_kernels.backend import Inputs, Outputs
from rebased_kernels.gpu_profile import kernel_table
from rebased_kernels.spec import PRESETS, LinearAttention
from rebased_kernels.testing import random_inputs, rel_err

OUT = sys.argv[1]
fm = PRESETS["rebased"]
attn = LinearAttention(fm, 0.25)
ROUND = sys.argv[2] if len(sys.argv) > 2 else "1"
log: dict = {"cases": [], "times": []}


def dump():
    with open(f"{OUT}/debug_tiles.json", "w") as f:
        json.dump(log, f, indent=1)


def case(dtype, T, cfg, grads, name="rebased"):
    fm = PRESETS[name]
    attn = LinearAttention(fm, 0.25)
    x = random_inputs(2, T, 3, 16, 64, dtype, "cuda", fm, seed=T, requires_grad=False)
    inp = Inputs(x["q"], x["k"], x["v"], *(x.get(n) for n in PARAM_NAMES))
    leaves = {n: t.double().requires_grad_() for n, t in x.items()}
    ref = reference.quadratic(leaves["q"], leaves["k"], leaves["v"], attn,
                              tuple(leaves.get(n) for n in PARAM_NAMES))  # fmt: skip
    o = call.forward(inp, attn, cfg).o
    row = dict(name=name, dtype=str(dtype), T=T, cfg=cfg, err_o=rel_err(o, ref[0]))
    tok = ((o.double() - ref[0]).abs().amax((0, 2, 3)) / ref[0].abs().max()).cpu()  # [T]
    BC = 64 if dtype != torch.float32 else 32
    row["o_chunk_err"] = [round(float(e), 5) for e in tok.view(-1, BC).amax(1)[:24]]
    if grads:
        do = torch.randn_like(ref[0])
        g = call.backward(inp, attn, cfg, Outputs(do.to(dtype), None, None))
        (ref[0] * do).sum().backward()
        for n, a in zip(("q", "k", "v", *PARAM_NAMES), g):
            if a is not None and n in leaves:
                row[f"err_d{n}"] = rel_err(a, leaves[n].grad)
    log["cases"].append(row)
    print(row, flush=True)


CASES = [
    (torch.bfloat16, 512, {"segment": 0}, True),
    (torch.bfloat16, 512, {"forward": "tiles", "segment": 256}, True),
    (torch.bfloat16, 512, {"forward": "tiles", "segment": 64}, True),
    (torch.bfloat16, 512, {"forward": "tiles", "segment": 512}, False),
    (torch.bfloat16, 64, {"forward": "tiles", "segment": 64}, False),
    (torch.bfloat16, 512, {"forward": "tiles", "segment": 256, "num_stages": 1}, False),
    (torch.bfloat16, 512, {"forward": "tiles", "segment": 256, "threads": 128}, False),
    (torch.float32, 512, {"forward": "tiles", "segment": 256}, True),
    (torch.float32, 512, {"forward": "tiles", "segment": 32}, False),
]
if ROUND == "3":  # session 21 call 3, lean (~320 s of device time left): the dq mend
    CASES = [
        (torch.bfloat16, 512, {"forward": "tiles", "segment": 256}, True),
        (torch.float32, 512, {"forward": "tiles", "segment": 256}, True),
        (torch.bfloat16, 300, {"forward": "tiles", "segment": 128}, True, "based"),
    ]
if ROUND == "2":  # after the dq mend, more maps and dtypes
    CASES = [c for c in CASES if c[3]] + [
        (torch.float16, 700, {"forward": "tiles", "segment": 256}, True),
        (torch.bfloat16, 300, {"forward": "tiles", "segment": 128}, True, "based"),
        (torch.float32, 300, {"forward": "tiles", "segment": 128}, True, "based"),
        (torch.bfloat16, 333, {"forward": "tiles", "segment": 192}, True, "norm_x2"),
    ]
for c in CASES:
    try:
        case(*c)
    except Exception as exc:
        log["cases"].append(dict(cfg=c[2], T=c[1], error=traceback.format_exc()[-1500:]))
        print("error", c, exc, flush=True)
    dump()

B, T, H = 4, 16384, 16
x = random_inputs(B, T, H, 16, 64, torch.bfloat16, "cuda", fm, requires_grad=False)
inp = Inputs(x["q"], x["k"], x["v"], *(x.get(n) for n in PARAM_NAMES))
do = Outputs(torch.randn_like(x["v"]), None, None)


def ms(fn):
    for _ in range(2):
        fn()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    e0.record()
    for _ in range(5):
        fn()
    e1.record()
    torch.cuda.synchronize()
    return e0.elapsed_time(e1) / 5


TIMED = [{"segment": 0}, {"forward": "tiles", "segment": 256},
         {"forward": "tiles", "segment": 256, "num_stages": 1},
         {"forward": "tiles", "segment": 128}, {"forward": "tiles", "segment": 64}]  # fmt: skip
if ROUND in ("2", "3"):
    TIMED = [{"segment": 0}, {"forward": "tiles", "segment": 256},
             {"forward": "tiles", "segment": 512}]  # fmt: skip
    TIMED = TIMED[:2] if ROUND == "3" else TIMED
for cfg in TIMED:
    try:
        log["times"].append(dict(cfg=cfg, fwd_ms=ms(lambda cfg=cfg: call.forward(inp, attn, cfg))))
        if ROUND in ("2", "3") and cfg.get("forward") == "tiles":  # where the time goes
            log["times"][-1]["fwd_kernels"] = kernel_table(
                lambda cfg=cfg: call.forward(inp, attn, cfg), "cuda", calls=3, top=6
            )
        if ROUND in ("2", "3"):
            log["times"][-1]["fwd_bwd_ms"] = ms(
                lambda cfg=cfg: (call.forward(inp, attn, cfg), call.backward(inp, attn, cfg, do))
            )
    except Exception as exc:
        log["times"].append(dict(cfg=cfg, error=str(exc)[:500]))
    print(log["times"][-1], flush=True)
    dump()
