"""The backend protocol and registry.

A backend is one folder under ``backends/`` that registers one ``Backend`` object. The
object says what it supports, exposes its tuning space as data, and implements
``forward_dense``; ``forward`` (variable-length packing), ``backward`` (a vector-Jacobian
product of ``forward``) and ``decode_step`` have shared defaults that a backend overrides
when it has a native kernel. Registering a backend enrols it in the property tests, the
``check`` command and (later) the tuner and the asv suite.
"""

from __future__ import annotations

import functools
import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch

from .features import phi, pre_transform
from .spec import LinearAttention


class Inputs(NamedTuple):
    """The differentiable inputs of one call (None where absent).

    q, k: ``[B, T, H, D]``; v: ``[B, T, H, Dv]``; weights and biases ``[H, D]`` or ``[D]``;
    S0: ``[N, H, F, Dv]``, z0: ``[N, H, F]`` (N = B, or the number of packed sequences).
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    q_weight: torch.Tensor | None = None
    q_bias: torch.Tensor | None = None
    k_weight: torch.Tensor | None = None
    k_bias: torch.Tensor | None = None
    S0: torch.Tensor | None = None
    z0: torch.Tensor | None = None

    @property
    def params(self) -> tuple:
        return (self.q_weight, self.q_bias, self.k_weight, self.k_bias)


class Outputs(NamedTuple):
    """o ``[B, T, H, Dv]`` in v's dtype; S ``[N, H, F, Dv]``, z ``[N, H, F]`` (state dtype)."""

    o: torch.Tensor
    S: torch.Tensor
    z: torch.Tensor


@dataclass(frozen=True)
class Problem:
    """What a call asks of a backend, without the tensors."""

    attention: LinearAttention
    D: int
    Dv: int
    dtype: torch.dtype
    device_type: str
    varlen: bool = False


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype policy, once: accumulate in float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class Backend:
    """One lowering of the spec. Subclasses set the class attributes and ``forward_dense``."""

    name: ClassVar[str]
    dtypes: ClassVar[frozenset[torch.dtype]] = frozenset(
        {torch.float16, torch.bfloat16, torch.float32, torch.float64}
    )
    device_types: ClassVar[frozenset[str]] = frozenset({"cpu", "cuda"})
    max_degree: ClassVar[int | None] = None
    max_D: ClassVar[int | None] = None
    max_Dv: ClassVar[int | None] = None
    tuning_space: ClassVar[dict[str, tuple]] = {}
    """Tunables and their candidate values, e.g. ``{"chunk_size": (16, 32, 64)}``."""
    default_config: ClassVar[dict[str, Any]] = {}
    named_configs: ClassVar[tuple[dict[str, Any], ...]] = ()
    """Configurations outside the searched space (other variants, say) that the property
    tests draw beside ``configs()``: every way a backend computes is tested, searched or not."""
    compiles: ClassVar[bool] = False
    """Whether the first call compiles (or loads compiled code): ``info`` times it."""
    runtime_tunables: ClassVar[tuple[str, ...]] = ()
    """Tunables that are run-time arguments (no recompile): configurations differing only in
    these share one compile, and the precompile runs one of them."""
    compiles_per_shape: ClassVar[bool] = False
    """Whether each new (B, T bucket, H) compiles again (static graphs): the tuner's
    precompile (``autotune.warm``) then compiles each tuned shape, not one small call."""
    state_cotangents_optional: ClassVar[bool] = False
    """Whether ``backward_dense`` takes ``grads.S = grads.z = None`` (no final state in the
    loss, as in training) and is faster for it; the others get zeros from ``backward``."""
    final_state_optional: ClassVar[bool] = False
    """Whether ``forward_dense`` takes ``final_state=False`` (the caller drops S and z, as
    in training) and may return ``Outputs(o, None, None)`` for it, faster; the others
    compute the state, which ``forward`` then drops."""
    float32_products: ClassVar[str] = "float32"
    """What float32 inputs' matrix products run in on this backend's devices: "float32", or
    "tf32" (10-bit mantissas on the tensor cores, float32 sums), which ``testing`` checks at
    ``TF32_TOLERANCE``. A backend says so here and in its docs; nothing rounds silently."""
    tolerance_factor: ClassVar[float] = 1.0
    """How much looser than the tolerance rule (``testing``) this backend's results are
    checked; 1 for ours. Only a peer whose numerics we cannot change sets more, saying why."""

    def unavailable_reason(self) -> str | None:
        """Why this backend cannot run on this machine (None when it can)."""
        return None

    def unsupported_reason(self, problem: Problem) -> str | None:
        """Why this backend cannot run ``problem`` (None when it can)."""
        fm = problem.attention.feature_map
        if problem.device_type not in self.device_types:
            return f"runs on {sorted(self.device_types)}, not {problem.device_type}"
        if problem.dtype not in self.dtypes:
            return f"supports dtypes {sorted(str(d) for d in self.dtypes)}, not {problem.dtype}"
        if self.max_degree is not None and fm.degree > self.max_degree:
            return f"supports kernels of degree <= {self.max_degree}, not {fm.degree}"
        if self.max_D is not None and problem.D > self.max_D:
            return f"supports D <= {self.max_D}, not {problem.D}"
        if self.max_Dv is not None and problem.Dv > self.max_Dv:
            return f"supports Dv <= {self.max_Dv}, not {problem.Dv}"
        return None

    def configs(self) -> list[dict[str, Any]]:
        """Every configuration of the tuning space (the cartesian product)."""
        configs: list[dict[str, Any]] = [{}]
        for key, values in self.tuning_space.items():
            configs = [{**c, key: value} for c in configs for value in values]
        return configs

    def test_configs(self) -> list[dict[str, Any]]:
        """``configs()`` and the ``named_configs``: what the property tests draw from."""
        return self.configs() + [dict(c) for c in self.named_configs]

    def forward_dense(self, x: Inputs, attn: LinearAttention, config: dict) -> Outputs:
        """Causal linear attention on a dense batch with T >= 1 (see ``spec``)."""
        raise NotImplementedError

    def backward_dense(
        self, x: Inputs, attn: LinearAttention, config: dict, grads: Outputs
    ) -> Inputs:
        """Gradients of every present input of ``forward_dense`` (None for absent ones).

        The default is the vector-Jacobian product of ``forward_dense`` through
        ``torch.func``; a backend with backward kernels overrides it.
        """
        return vjp(lambda inp: self.forward_dense(inp, attn, config), x, grads)

    def forward(
        self,
        x: Inputs,
        attn: LinearAttention,
        config: dict,
        cu_seqlens: torch.Tensor | None,
        final_state: bool = True,
    ) -> Outputs:
        """``forward_dense``, or one call per packed sequence when ``cu_seqlens`` is given.
        ``final_state=False``: the caller drops S and z (a ``final_state_optional`` backend
        is told, and may return None for them)."""
        lean = not final_state and self.final_state_optional
        if cu_seqlens is None:
            if lean:
                return self.forward_dense(x, attn, config, final_state=False)
            return self.forward_dense(x, attn, config)
        dense = (
            functools.partial(self.forward_dense, final_state=False) if lean else self.forward_dense
        )
        parts = [
            empty_sequence(part, attn) if part.q.shape[1] == 0 else dense(part, attn, config)
            for part in split_sequences(x, cu_seqlens)
        ]
        if lean:  # each sequence's own call without its final state, as a dense one
            return Outputs(torch.cat([p.o for p in parts], dim=1), None, None)
        return Outputs(*(torch.cat(t, dim=d) for t, d in zip(zip(*parts), (1, 0, 0))))

    def backward(
        self,
        x: Inputs,
        attn: LinearAttention,
        config: dict,
        cu_seqlens: torch.Tensor | None,
        grads: Outputs,
    ) -> Inputs:
        """``backward_dense``, or one call per packed sequence when ``cu_seqlens`` is given.
        ``grads.S``/``grads.z`` may be None: the final state is not in the loss."""
        if grads.S is None and not self.state_cotangents_optional:
            N = x.q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
            zero = empty_sequence(x._replace(S0=None, z0=None), attn, N)
            grads = grads._replace(S=zero.S, z=zero.z)
        if cu_seqlens is None:
            return self.backward_dense(x, attn, config, grads)
        g_parts = split_sequences(
            Inputs(grads.o, grads.o, grads.o, S0=grads.S, z0=grads.z), cu_seqlens
        )
        results = []
        for part, g in zip(split_sequences(x, cu_seqlens), g_parts):
            part_grads = Outputs(g.v, g.S0, g.z0)
            if part.q.shape[1] == 0:
                results.append(empty_sequence_grads(part, part_grads))
            else:
                results.append(self.backward_dense(part, attn, config, part_grads))
        return Inputs(*(_merge(field, ts) for field, ts in zip(Inputs._fields, zip(*results))))

    def decode_step(
        self, x: Inputs, attn: LinearAttention, out: tuple[torch.Tensor, torch.Tensor] | None
    ) -> Outputs:
        """One token: q, k ``[B, H, D]``, v ``[B, H, Dv]``, state in ``x.S0, x.z0``.

        ``S' = S + phi(k) v^T``, ``z' = z + phi(k)``, ``o = phi(q) S' / (phi(q) . z' + eps)``.
        With ``out`` (contiguous, state dtype; may be ``x.S0, x.z0`` themselves) the new
        state is written there.
        """
        fm = attn.feature_map
        dt = x.S0.dtype
        qp = pre_transform(x.q.to(dt), fm.pre, x.q_weight, x.q_bias)
        kp = pre_transform(x.k.to(dt), fm.pre, x.k_weight, x.k_bias)
        phi_q, phi_k = phi(qp, fm, attn.scale), phi(kp, fm, attn.scale)  # [B, H, F]
        S = x.S0 + phi_k[..., :, None] * x.v.to(dt)[..., None, :]  # [B, H, F, Dv]
        z = x.z0 + phi_k  # [B, H, F]
        o = torch.einsum("bhf,bhfe->bhe", phi_q, S)
        if attn.normalize:
            o = o / ((phi_q * z).sum(-1, keepdim=True) + attn.eps)
        if out is not None:
            S, z = out[0].copy_(S), out[1].copy_(z)
        return Outputs(o.to(x.v.dtype), S, z)


def split_sequences(x: Inputs, cu_seqlens: torch.Tensor) -> list[Inputs]:
    """One B=1 ``Inputs`` per packed sequence (``cu_seqlens`` [N + 1], B == 1)."""
    bounds = cu_seqlens.tolist()
    return [
        x._replace(
            q=x.q[:, bos:eos],
            k=x.k[:, bos:eos],
            v=x.v[:, bos:eos],
            S0=None if x.S0 is None else x.S0[n : n + 1],
            z0=None if x.z0 is None else x.z0[n : n + 1],
        )
        for n, (bos, eos) in enumerate(itertools.pairwise(bounds))
    ]


def vjp(fn: Callable[[Inputs], Outputs], x: Inputs, grads: Outputs) -> Inputs:
    """``d<grads, fn(x)>/dx`` for every present (non-None) input, through ``torch.func``."""
    present = [i for i, t in enumerate(x) if t is not None]

    def run(*tensors: torch.Tensor) -> tuple:
        full = list(x)
        for i, t in zip(present, tensors):
            full[i] = t
        return tuple(fn(Inputs(*full)))

    _, pullback = torch.func.vjp(run, *(x[i] for i in present))
    result: list[torch.Tensor | None] = [None] * len(x)
    for i, g in zip(present, pullback(tuple(grads))):
        result[i] = g
    return Inputs(*result)


def empty_sequence(x: Inputs, attn: LinearAttention, N: int | None = None) -> Outputs:
    """The result for T = 0: no output, the state passes through (zeros for N sequences,
    default B, if none)."""
    B, _, H, D = x.q.shape
    Dv = x.v.shape[-1]
    F = attn.feature_map.num_features(D)
    dt = compute_dtype(x.v.dtype)
    N = B if N is None else N
    S = x.S0.to(dt) if x.S0 is not None else x.v.new_zeros(N, H, F, Dv, dtype=dt)
    z = x.z0.to(dt) if x.z0 is not None else x.v.new_zeros(N, H, F, dtype=dt)
    return Outputs(x.v.new_empty(B, 0, H, Dv), S, z)


def empty_sequence_grads(x: Inputs, grads: Outputs) -> Inputs:
    """The gradients for T = 0: the state's gradient passes through to the initial state."""
    zeros = [None if t is None else torch.zeros_like(t) for t in x[:7]]
    dS0 = None if x.S0 is None else _or_zeros(grads.S, x.S0)
    dz0 = None if x.z0 is None else _or_zeros(grads.z, x.z0)
    return Inputs(*zeros, dS0, dz0)


def _or_zeros(g: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """A state cotangent in ``like``'s dtype; zeros for None (the state is not in the loss)."""
    return torch.zeros_like(like) if g is None else g.to(like.dtype)


def _merge(field: str, parts: tuple) -> torch.Tensor | None:
    """Join per-sequence gradients: tokens along T, states along N, parameters summed."""
    if parts[0] is None:
        return None
    if field in ("q", "k", "v"):
        return torch.cat(parts, dim=1)
    if field in ("S0", "z0"):
        return torch.cat(parts, dim=0)
    return torch.stack(parts).sum(0)


_REGISTRY: dict[str, Backend] = {}
AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "cuda": ("triton", "tilelang", "torch"),
    "cpu": ("numba", "torch"),
}
"""The static order ``backend="auto"`` follows until a backend is tuned for the call."""


def register(backend: Backend) -> Backend:
    """Enrol a backend: the API, the property tests and ``check`` see it from now on."""
    if backend.name in _REGISTRY:
        raise ValueError(f"a backend named {backend.name!r} is already registered")
    _REGISTRY[backend.name] = backend
    return backend


def registered() -> dict[str, Backend]:
    """Every registered backend by name (import ``rebased_kernels`` to load the built-ins)."""
    return dict(_REGISTRY)


def get_backend(name: str) -> Backend:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown backend {name!r}: registered backends are {sorted(_REGISTRY)} "
            "(rebased_kernels.backends() says which are available here)"
        ) from None


def resolve(name: str, problem: Problem) -> Backend:
    """The backend a call runs on; raises if it cannot run ``problem`` here."""
    if name == "auto":
        for candidate in AUTO_ORDER.get(problem.device_type, ("torch",)):
            backend = _REGISTRY.get(candidate)
            if (
                backend
                and not backend.unavailable_reason()
                and not backend.unsupported_reason(problem)
            ):
                return backend
        return get_backend("torch")
    backend = get_backend(name)
    reason = backend.unavailable_reason()
    if reason:
        raise RuntimeError(f"backend {name!r} is not available here: {reason}")
    reason = backend.unsupported_reason(problem)
    if reason:
        raise ValueError(f"backend {name!r} cannot run this call: it {reason}")
    return backend


def encode_config(config: dict) -> str:
    return json.dumps(config, sort_keys=True)


def decode_config(backend: Backend, text: str) -> dict:
    config = {**backend.default_config, **(json.loads(text) if text else {})}
    unknown = set(config) - set(backend.default_config)
    if unknown:
        raise ValueError(
            f"backend {backend.name!r} has no tunables {sorted(unknown)}; "
            f"its tuning space is {backend.tuning_space}"
        )
    return config
