"""The paper's language model: hybrid blocks, a short convolution on every odd layer.

Each layer is ``x = x + mixer(norm(x)); x = x + mlp(norm(x))`` (pre-norm, residual), where
the sequence mixer of layer ``i`` is a BaseConv short convolution for odd ``i`` (1, 3, ...)
and the mixer under test (``rebased`` or any feature-map variant, ``based``, or softmax
``attention``) for even ``i``; the state mixer is a GELU MLP (4x); RMSNorm or LayerNorm;
tied embeddings; no position embedding (the convolutions carry order). Presets: ``tiny``
(CPU tests), ``lm-30m`` (12 layers, d_model 512, 8 heads of 64, feature dim 16: 30.9M
parameters at the 257-token byte vocabulary; ``gpu_lm``'s ReBased vs Based comparison) and
``paper-150m`` (appendix B: 18 layers, d_model 768, feature dim 16).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch
from torch import nn

from rebased_kernels.spec import PRESETS

from .model import BaseConv, init_weights, make_mixer


@dataclass(frozen=True)
class LMConfig:
    """``forward(tokens [B, T] int64) -> logits [B, T, vocab_size]``."""

    vocab_size: int
    n_layers: int = 4
    d_model: int = 64
    num_heads: int = 4
    feature_dim: int = 16
    mixer: str = "rebased"
    norm: str = "rms"
    norm_scope: str = "head"
    conv_kernel: int = 3
    backend: str = "auto"

    def __post_init__(self) -> None:
        if self.mixer != "attention" and self.mixer not in PRESETS:
            raise ValueError(f"unknown mixer {self.mixer!r}: 'attention' or {sorted(PRESETS)}")
        if self.norm not in ("rms", "layer"):
            raise ValueError(f"norm must be 'rms' or 'layer', not {self.norm!r}")
        if self.n_layers < 1 or self.d_model < 1 or self.vocab_size < 2:
            raise ValueError("n_layers, d_model >= 1 and vocab_size >= 2 are needed")


LM_PRESETS = {
    "tiny": dict(n_layers=4, d_model=64, num_heads=4, feature_dim=16),
    "lm-30m": dict(n_layers=12, d_model=512, num_heads=8, feature_dim=16),
    "paper-150m": dict(n_layers=18, d_model=768, num_heads=48, feature_dim=16),
}


def lm_config(preset: str, vocab_size: int, **overrides) -> LMConfig:
    if preset not in LM_PRESETS:
        raise ValueError(f"unknown preset {preset!r}: {sorted(LM_PRESETS)}")
    return replace(LMConfig(vocab_size, **LM_PRESETS[preset]), **overrides)


def _norm(kind: str, d: int) -> nn.Module:
    return nn.RMSNorm(d, eps=1e-5) if kind == "rms" else nn.LayerNorm(d, eps=1e-5)


class Layer(nn.Module):
    def __init__(self, cfg: LMConfig, mixer: nn.Module) -> None:
        super().__init__()
        d = cfg.d_model
        self.norm1, self.mixer = _norm(cfg.norm, d), mixer
        self.norm2 = _norm(cfg.norm, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mixer(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class LanguageModel(nn.Module):
    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.embed = nn.Embedding(cfg.vocab_size, d)
        self.layers = nn.ModuleList(
            Layer(cfg, BaseConv(d, cfg.conv_kernel) if i % 2 == 1 else make_mixer(
                cfg.mixer, d, cfg.num_heads, cfg.feature_dim, cfg.norm_scope, cfg.backend))
            for i in range(cfg.n_layers)
        )  # fmt: skip
        self.norm_f = _norm(cfg.norm, d)
        self.head = nn.Linear(d, cfg.vocab_size, bias=False)
        self.apply(init_weights)
        self.head.weight = self.embed.weight  # tied

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm_f(x))

    def config_dict(self) -> dict:
        return asdict(self.cfg)
