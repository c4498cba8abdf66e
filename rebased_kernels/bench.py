"""Side-by-side timings of the registered backends on this machine (CPU or GPU).

``python -m rebased_kernels.bench`` times forward, forward+backward and one decode step for
every available backend on one shape, next to the machine's measured float32 matmul rate,
and writes a JSON record. Times are medians over repeats after warm-up (compilation
excluded); on a GPU they come from CUDA events.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch

import rebased_kernels as rk
from rebased_kernels.testing import random_inputs


def one_ms(fn: Callable[[], object], device: str) -> float:
    """Wall time of one call of ``fn`` in ms (CUDA events on GPU, a monotonic clock on CPU)."""
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def median_ms(fn: Callable[[], object], device: str, warmup: int = 3, repeats: int = 15) -> float:
    """Median wall time of ``fn`` in ms (CUDA events on GPU, a monotonic clock on CPU)."""
    return interleaved_ms([fn], device, warmup, repeats)[0]


def budget_ms(fn: Callable[[], object], device: str, budget: float = 250.0, lo: int = 5,
              hi: int = 20) -> float:  # fmt: skip
    """``median_ms`` with ``hi`` repeats, fewer for a slow call (at least ``lo``): about
    ``budget`` ms of timing after one warm-up call, which also sizes the repeats."""
    first = one_ms(fn, device)
    return median_ms(fn, device, warmup=0, repeats=max(lo, min(hi, int(budget / first))))


def interleaved_ms(fns: list[Callable[[], object]], device: str, warmup: int = 3,
                   repeats: int = 15) -> list[float]:  # fmt: skip
    """Median ms of each of ``fns``, timed call by call in turn (a drift of the machine's
    clocks or load hits every one alike: for ratios of near-equal calls)."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, t in zip(fns, times):
            t.append(one_ms(fn, device))
    return [statistics.median(t) for t in times]


def chunked_flops(B: int, T: int, H: int, D: int, Dv: int, F: int, C: int) -> float:
    """Forward FLOPs of the chunked algorithm: ``2 T (C D + C Dv + 2 F Dv + F)`` per head."""
    return 2.0 * B * H * T * (C * D + C * Dv + 2 * F * Dv + F)


def copy_tbps(device: str, n: int | None = None) -> float:
    """The device's measured copy rate of ``n`` bytes (read + written), the memory ceiling."""
    n = n or (2**26 if device == "cuda" else 2**24)
    a = torch.empty(n, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    return 2 * n / (median_ms(lambda: b.copy_(a), device, warmup=2, repeats=10) * 1e-3) / 1e12


def sdpa_ms(B, T, H, Dv, dtype, device, objective) -> float:
    """Softmax attention (SDPA, causal) at head dim Dv: the line a user would otherwise draw."""
    q, k, v = (torch.randn(B, H, T, Dv, dtype=dtype, device=device, requires_grad=True)
               for _ in range(3))  # fmt: skip
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def call():
        o = sdpa(q, k, v, is_causal=True)
        if objective == "forward_backward":
            o.backward(o)

    return median_ms(call, device, warmup=2, repeats=5)


def traffic_bytes(B: int, T: int, H: int, D: int, Dv: int, dtype: torch.dtype,
                  objective: str = "forward") -> float:  # fmt: skip
    """The memory floor's bytes: the forward reads q, k, v and writes o (``2 D + 2 Dv``
    elements per token and head); forward+backward also reads dO and writes dq, dk, dv,
    ~2.6x that (832 against 320 bytes at D = 16, Dv = 64, bf16)."""
    factor = 2.6 if objective == "forward_backward" else 1.0
    return B * H * T * (2 * D + 2 * Dv) * dtype.itemsize * factor


def matmul_gflops(device: str, n: int = 2048) -> float:
    """The machine's measured float32 matmul rate (the compute ceiling for the report)."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    return 2 * n**3 / median_ms(lambda: a @ b, device, repeats=5) / 1e6


def bench(
    B: int, T: int, H: int, D: int, Dv: int, dtype: torch.dtype, device: str, backends: list[str]
) -> dict:
    fm = rk.get_feature_map("rebased")
    x = random_inputs(B, T, H, D, Dv, dtype, device, fm)
    params = {n: x.pop(n) for n in ("q_weight", "q_bias", "k_weight", "k_bias")}
    F = fm.num_features(D)
    return dict(rows=[_bench_backend(n, x, params, device, (B, T, H, D, Dv, F)) for n in backends])


def _bench_backend(name: str, x: dict, params: dict, device: str, shape: tuple) -> dict:
    B, T, H, D, Dv, F = shape
    C = rk.backend.get_backend(name).default_config.get("chunk_size", 64)

    def fwd():
        with torch.no_grad():
            return rk.linear_attention(**x, **params, backend=name)

    def fwd_bwd():
        o = rk.linear_attention(**x, **params, backend=name)
        o.backward(torch.ones_like(o))

    with torch.no_grad():
        _, state = rk.linear_attention(**x, **params, backend=name, output_final_state=True)
    step = [t[:, -1].detach().contiguous() for t in (x["q"], x["k"], x["v"])]
    p = {n: t.detach() for n, t in params.items()}

    def decode():
        return rk.decode_step(*step, state, **p, backend=name)

    def decode_inplace():
        return rk.decode_step(*step, state, **p, backend=name, inplace=True)

    f_ms, fb_ms = median_ms(fwd, device), median_ms(fwd_bwd, device, repeats=7)
    d_us = median_ms(decode, device, warmup=20, repeats=200) * 1e3
    di_us = median_ms(decode_inplace, device, warmup=20, repeats=200) * 1e3
    flops = chunked_flops(B, T, H, D, Dv, F, C)
    return dict(
        backend=name, forward_ms=f_ms, forward_backward_ms=fb_ms, decode_us=d_us,
        decode_inplace_us=di_us, forward_gflops=flops / f_ms / 1e6, chunk_size=C,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rebased_kernels.bench", description=__doc__)
    ap.add_argument("--shape", default="1,4096,8,16,64", help="B,T,H,D,Dv")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backends", default=None, help="comma-separated (default: all but reference)")
    ap.add_argument("--out", default=None, help="write the JSON record here")
    args = ap.parse_args(argv)
    B, T, H, D, Dv = (int(s) for s in args.shape.split(","))
    dtype = getattr(torch, args.dtype)
    names = args.backends.split(",") if args.backends else [
        b.name for b in rk.backends() if b.available and b.name != "reference"
    ]  # fmt: skip
    record = dict(
        machine=dict(platform=platform.platform(), processor=platform.processor(),
                     threads=torch.get_num_threads(), torch=torch.__version__),
        shape=dict(B=B, T=T, H=H, D=D, Dv=Dv), dtype=args.dtype, device=args.device,
        matmul_gflops=matmul_gflops(args.device),
        command=" ".join(["python -m rebased_kernels.bench", *(argv or sys.argv[1:])]),
    )  # fmt: skip
    record.update(bench(B, T, H, D, Dv, dtype, args.device, names))
    peak = record["matmul_gflops"]
    print(
        f"shape B,T,H,D,Dv = {args.shape}  {args.dtype}  {args.device}  matmul {peak:.0f} GFLOP/s"
    )
    print(
        f"{'backend':<15}{'fwd ms':>9}{'fwd+bwd ms':>12}{'decode us':>11}{'in place':>10}"
        f"{'fwd GFLOP/s':>13}{'of peak':>9}"
    )
    for r in record["rows"]:
        print(
            f"{r['backend']:<15}{r['forward_ms']:>9.2f}{r['forward_backward_ms']:>12.2f}"
            f"{r['decode_us']:>11.1f}{r['decode_inplace_us']:>10.1f}"
            f"{r['forward_gflops']:>13.1f}{r['forward_gflops'] / peak:>9.1%}"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(record, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
