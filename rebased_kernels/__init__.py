"""rebased-kernels: ReBased linear attention, one spec lowered to many backends.

>>> import rebased_kernels as rk
>>> o = rk.linear_attention(q, k, v, "rebased", q_weight=gq, q_bias=bq, k_weight=gk, k_bias=bk)
"""

from __future__ import annotations

from . import backends as _builtin_backends  # noqa: F401  (registers the built-in backends)
from .backend import Backend, Inputs, Outputs, Problem, register
from .layer import ReBasedAttention
from .ops import State, decode_step, explain, linear_attention
from .registry_info import BackendInfo, backends
from .spec import PRESETS, FeatureMap, LinearAttention, PreTransform, get_feature_map

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "Backend",
    "BackendInfo",
    "FeatureMap",
    "Inputs",
    "LinearAttention",
    "Outputs",
    "PreTransform",
    "Problem",
    "ReBasedAttention",
    "State",
    "backends",
    "decode_step",
    "explain",
    "get_feature_map",
    "linear_attention",
    "register",
]
