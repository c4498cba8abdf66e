"""``triton``: fused, chunked, sequence-parallel ReBased attention for kernels of degree <= 2.

Forward: (1) one program per (segment, batch*head) sums its segment's state; (2) an
exclusive prefix over segments (one scan launch); (3) one program per segment walks its
chunks from that prefix, the state on chip: intra-chunk scores are the polynomial of
``s = sc * q'.k'`` from the raw D-dim q', k', inter-chunk terms go through the state.
LayerNorm, gamma/beta, the polynomial and the fp32 normaliser are fused. The backward runs
the same kernels twice: forward-ordered for dq (which also stores ``1 / (den + eps)`` and
``r`` per token), reverse-ordered for dk and dv; d gamma and d beta come out of the kernels
as per-segment partial sums.

Variants (``config["variant"]``): ``walk`` (``kernels.py``, ``walk.py``) keeps the
full ``1 + BD + BD^2`` state layout (S_2 in memory for D > 16); ``packed`` (the default;
D <= 16; ``packed.py``, ``packed_call.py``) keeps the quadratic state as 144 cyclic-pair rows
built on the tensor cores and walks like ``walk``; ``tiles`` (D <= 16) is ``packed`` with one
program per chunk: its segment's stored prefix state plus the segment's earlier chunks
quadratically, no walk. Larger D runs ``walk`` whatever the variant. ``parallel``
(``parallel.py``, any D <= 64) is a forward quadratic in T with no state at all: a
forward with no state in or out runs it; any other call, and every backward, runs
``packed``'s kernels (``walk``'s for D > 16).
Supported: D <= 64, Dv <= 64, float32 / float16 / bfloat16. The decode kernel covers
D <= 16 (larger D decode through the protocol's default). On CPU it runs under
``TRITON_INTERPRET=1``."""

from __future__ import annotations

from functools import lru_cache
from types import ModuleType
from typing import Any, ClassVar

import torch

from rebased_kernels.backend import Backend, Inputs, Outputs, Problem, register
from rebased_kernels.spec import FeatureMap, LinearAttention, feature_layout, feature_weights

from . import packed_call, parallel, walk
from .launch import INTERPRET, interpreter_dtype_reason, params, triton_cdiv, triton_next_pow2

MAX_D = 64
VARIANTS = ("packed", "walk", "tiles", "parallel")


def _variant(x: Inputs, config: dict) -> ModuleType:
    """The host module of the call's chunked variant: ``packed`` and ``tiles`` run D <= 16
    (larger D walks); ``parallel``'s backward, and its forward with a state in or out, run
    ``packed``'s."""
    name = config.get("variant", "walk")
    if name not in VARIANTS:
        raise ValueError(f"triton variant {name!r} is not one of {VARIANTS}")
    return packed_call if name != "walk" and x.q.shape[3] <= 16 else walk


@lru_cache(maxsize=64)
def _packed_index(fm: FeatureMap, D: int, scale: float, device: str) -> tuple[torch.Tensor, ...]:
    """``(i0, i1 [F] int32, w [F] fp32)`` for the decode kernel (index D stands for 1)."""
    pairs = [tuple(idx) + (D,) * (2 - len(idx)) for idx, _ in feature_layout(D, fm.powers)]
    i0 = torch.tensor([p[0] for p in pairs], dtype=torch.int32, device=device)
    i1 = torch.tensor([p[1] for p in pairs], dtype=torch.int32, device=device)
    w = torch.tensor(feature_weights(fm, D, scale), dtype=torch.float32, device=device)
    return i0, i1, w


DECODE_BV = 16
"""Value columns per decode program: B*H*Dv/16 programs (256 at B=4, H=16, Dv=64), each a
[256, 16] fp32 tile of the state; one program per (b, h) walking Dv measured 27.7 us per
step on an H200 (CUDA graph; ``docs/results/h200-s8/``), latency-bound on 64 programs."""
_READERS: dict[tuple[str, int], torch.Tensor] = {}


def _readers(n: int, device: torch.device) -> torch.Tensor:
    """The decode kernel's per-(b, h) reader counts, ``[>= n]`` int32, zero between calls
    (each call's last reader resets its count): one buffer per device and stream, so calls
    on different streams never share counts."""
    stream = torch.cuda.current_stream(device).stream_id if device.type == "cuda" else 0
    key = (str(device), stream)
    buf = _READERS.get(key)
    if buf is None or buf.numel() < n:
        buf = _READERS[key] = torch.zeros(max(n, 256), dtype=torch.int32, device=device)
    return buf


WIDE = packed_call.TILES_STATE
"""A named ``packed`` configuration with ``tiles``' state kernel (``packed_call.TILES_STATE``)."""
NARROW = {"state_rows": 32, "state_chunk": 32, "state_warps": 4}
"""A named ``tiles`` configuration with ``packed``'s state kernel."""


class TritonBackend(Backend):
    name = "triton"
    dtypes: ClassVar[frozenset[torch.dtype]] = frozenset(
        {torch.float32, torch.float16, torch.bfloat16}
    )
    device_types: ClassVar[frozenset[str]] = frozenset({"cuda", "cpu"} if INTERPRET else {"cuda"})
    max_degree: ClassVar[int | None] = 2
    max_D: ClassVar[int | None] = MAX_D
    max_Dv: ClassVar[int | None] = 64
    tuning_space: ClassVar[dict[str, tuple]] = {
        "variant": ("packed", "tiles"),
        "chunk_size": (32, 64),
        "exact": ("fma", "x3", "x2"),
        "chunks_per_segment": (2, 4, 8, 16, 32),
    }
    """The variant, the chunk length and ``exact`` (``launch.EXACT``: how the gradient sweeps of
    half inputs form their ~fp32 products) compile a kernel per value; the segment length
    (chunks one program walks, i.e. how many programs split a sequence) is a run-time argument.
    The searched variants are the two that won somewhere on the H200: ``packed`` (the default;
    fastest forward+backward at T = 2048) and ``tiles`` (64 x 4 with ``x3``: fastest
    forward+backward at T = 16384 and 1.41x the default at MQAR's T = 256,
    ``docs/results/h200-s9/``). ``parallel`` is not searched: on an H100 (session 17,
    ``docs/results/h100-s17/``) its forward beat tiles 64 x 4 only at T = 1024 (0.048 against
    0.063 ms; 0.157 against 0.122 at 2048), and the tuner's objectives are a prefill's forward
    (with a final state, which it does not form) and training's forward+backward; it is a named
    configuration. ``exact`` "x2" joined the space after session 18's H100 profile
    (``docs/results/h100-s18/``): tiles 64 x 4 forward+backward at T = 16384 in 5.79 ms
    against x3's 6.76 (the gradient tile kernels 4.41 against 5.44 ms). A configuration may
    also name ``num_warps`` and, for ``packed`` and
    ``tiles``, ``features`` (``packed_call.FEATURES``), ``state_rows`` and ``tile_rows`` (rows
    of the quadratic block per product in the state kernel and in a tile program's read of the
    state: 32, 64 or 128) and ``state_chunk`` (the state kernel's rows per product; it takes the
    gcd with the segment length) and ``state_warps`` (the state kernel's, None: the call's),
    ``state_fused`` (``packed_call.STATE_FUSED``), ``segment_half``
    (``packed_call.SEGMENT_HALF``) and ``dq_onepass`` (``tiles``: the dq tile kernel's one
    pass over its key chunks, ``packed._dq_one_pass``, instead of two; None, the default:
    one pass for ``tiles``. Session 21's H100, tiles 64 x 4 x2: forward+backward 5.78 ->
    5.51 ms at 16k, 0.789 -> 0.774 ms at 2k, its GPU tests passed, ``docs/results/h100-s21/``;
    the two-pass kernel is a named configuration);
    every variant takes the software-pipelining depths ``num_stages`` (the sweep and tile
    kernels) and ``state_stages`` (the state kernel), each
    one of ``launch.STAGES`` or None for Triton's default (``tiles``' tile kernels:
    ``packed_call.TILES_STAGES``); ``walk`` is a named configuration only."""
    runtime_tunables: ClassVar[tuple[str, ...]] = ("chunks_per_segment",)

    default_config: ClassVar[dict[str, Any]] = {
        "chunk_size": 32,
        "chunks_per_segment": 16,
        "variant": "packed",
        "num_warps": None,
        "features": "onehot",
        "exact": "fma",
        "state_rows": None,
        "state_chunk": None,
        "tile_rows": 32,
        "state_warps": None,
        "state_fused": False,
        "segment_half": False,
        "dq_onepass": None,
        "num_stages": None,
        "state_stages": None,
    }
    """``packed``; the state kernel's keys None are the variant's own (``packed_call.TILES_STATE``
    for tiles; 32 rows of the call's chunk at its warps for packed); ``num_warps`` None is each
    variant's own (4 for ``packed`` and ``tiles``, 8 for ``walk``, which spills at 4).
    ``packed``'s forward was 2.4x ``walk``'s at 16k on an H200 with forward+backward no slower
    (``docs/results/h200-s6/``), 1.8x faster forward+backward at MQAR's T = 256
    (``docs/results/h200-s7/``); its GPU property run passed there (session 7). The tuner
    searches ``tiles`` beside it; ``walk`` and the ``features`` variants are named
    configurations: drawn by the property tests, timed by the sweeps."""
    named_configs: ClassVar[tuple[dict[str, Any], ...]] = (
        {"variant": "walk", "chunk_size": 32, "chunks_per_segment": 4, "num_warps": 8},
        {"variant": "walk", "chunk_size": 64, "chunks_per_segment": 2, "num_warps": 8},
        {"variant": "packed", "chunk_size": 32, "chunks_per_segment": 2},
        {"variant": "packed", "chunk_size": 64, "chunks_per_segment": 1},
        {"variant": "tiles", "chunk_size": 32, "chunks_per_segment": 2},
        {"variant": "tiles", "chunk_size": 64, "chunks_per_segment": 2},
        {"variant": "packed", "chunk_size": 32, "chunks_per_segment": 2, "features": "gather"},
        {"variant": "tiles", "chunk_size": 32, "chunks_per_segment": 2, "features": "gather"},
        {"variant": "packed", "chunk_size": 32, "chunks_per_segment": 2, "exact": "x3"},
        {"variant": "tiles", "chunk_size": 64, "chunks_per_segment": 4, "exact": "x3"},
        {
            "variant": "tiles",
            "chunk_size": 64,
            "chunks_per_segment": 4,
            "exact": "x3",
            "num_stages": 1,
            "state_stages": 1,
        },
        {"variant": "packed", "chunk_size": 32, "chunks_per_segment": 4, **WIDE},
        {"variant": "tiles", "chunk_size": 64, "chunks_per_segment": 4, "exact": "x2"},
        {
            "variant": "tiles",
            "chunk_size": 64,
            "chunks_per_segment": 4,
            "exact": "x2",
            "dq_onepass": False,
        },
        {"variant": "packed", "chunk_size": 32, "chunks_per_segment": 2, "exact": "x2"},
        {
            "variant": "tiles",
            "chunk_size": 64,
            "chunks_per_segment": 4,
            "exact": "x3",
            "state_fused": True,
            "state_chunk": 64,
            "segment_half": True,
        },
        {"variant": "tiles", "chunk_size": 32, "chunks_per_segment": 4, **NARROW, "tile_rows": 128},
        {"variant": "parallel", "chunk_size": 16, "exact": "x2"},
        {"variant": "parallel", "chunk_size": 64, "exact": "x2"},
        {
            "variant": "walk",
            "chunk_size": 32,
            "chunks_per_segment": 4,
            "num_warps": 8,
            "exact": "x3",
        },
    )
    compiles: ClassVar[bool] = True
    state_cotangents_optional: ClassVar[bool] = True
    final_state_optional: ClassVar[bool] = True

    def unavailable_reason(self) -> str | None:
        try:
            import triton  # noqa: F401
        except ImportError as exc:
            return f"triton cannot be imported ({exc}); pip install 'rebased-kernels[triton]'"
        if not INTERPRET and not torch.cuda.is_available():
            return "no CUDA GPU (set TRITON_INTERPRET=1 to run the kernels on the CPU, slowly)"
        return None

    def unsupported_reason(self, problem: Problem) -> str | None:
        return interpreter_dtype_reason(problem.dtype) or super().unsupported_reason(problem)

    def forward_dense(
        self, x: Inputs, attn: LinearAttention, config: dict, final_state: bool = True
    ) -> Outputs:
        if config.get("variant") == "parallel" and parallel.uses_pairs(x, final_state):
            return parallel.forward(x, attn, config)
        return _variant(x, config).forward(x, attn, config, final_state)

    def backward_dense(
        self, x: Inputs, attn: LinearAttention, config: dict, grads: Outputs
    ) -> Inputs:
        return _variant(x, config).backward(x, attn, config, grads)

    def decode_step(
        self, x: Inputs, attn: LinearAttention, out: tuple[torch.Tensor, torch.Tensor] | None
    ) -> Outputs:
        from .kernels import decode_kernel

        fm = attn.feature_map
        B, H, D = x.q.shape
        if D > 16:  # a [F, Dv] state tile of F = 2080 features does not fit one program
            return Backend.decode_step(self, x, attn, out)
        Dv = x.v.shape[-1]
        F = fm.num_features(D)
        S0, z0 = x.S0.contiguous(), x.z0.contiguous()
        if S0.dtype != torch.float32:
            raise ValueError(f"the triton decode step keeps a float32 state, not {S0.dtype}")
        S, z = out if out is not None else (torch.empty_like(S0), torch.empty_like(z0))
        o = torch.empty(B, H, Dv, device=x.v.device, dtype=x.v.dtype)
        i0, i1, w = _packed_index(fm, D, float(attn.scale), str(x.q.device))
        q = x.q.contiguous()
        g, bq, gs = params(x.q_weight, x.q_bias, fm.pre, H, D, q.device)
        kg, kb, ks = params(x.k_weight, x.k_bias, fm.pre, H, D, q.device)
        if ks != gs:
            raise ValueError("the triton decode step needs q and k parameters of one shape")
        decode_kernel[(B * H, triton_cdiv(Dv, DECODE_BV))](
            q, x.k.contiguous(), x.v.contiguous(), g, bq, kg, kb, S0, z0, i0, i1, w, o, S, z,
            _readers(B * H, q.device), H, D, Dv, F, gs, int(fm.pre.norm), int(attn.normalize),
            float(attn.eps), BD=16, BF=triton_next_pow2(F), BV=DECODE_BV, num_warps=4,
        )  # fmt: skip
        return Outputs(o, S, z)


register(TritonBackend())
