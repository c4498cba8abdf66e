"""The paper's MQAR model: two residual blocks, a short convolution then the mixer under test.

Appendix A of the ReBased paper trains Zoology's two-layer MQAR model with the first
sequence mixer replaced by a BaseConv-style short convolution (more stable than two
attention layers). The state mixer (MLP) is the identity, so each block is::

    x = x + mixer(LayerNorm(x))

* block 1: ``BaseConv``: ``Linear(u) * causal_depthwise_conv1d(u, kernel=3)``;
* block 2: ``ReBasedAttention`` with a feature-map preset (``rebased``, ``based``, the
  ablations of Table 1) or causal softmax attention (``mixer="attention"``).

Token and learned position embeddings go in; a final LayerNorm and an output head tied to
the token embedding come out. ``attention_matrix`` returns the second layer's normalised
causal attention matrix (for the IoU analysis of the paper's Section 5.3).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from .. import reference
from ..layer import ReBasedAttention
from ..spec import LAYER_NORM_EPS, PRESETS, LinearAttention

__all__ = ["BaseConv", "MQARModel", "ModelConfig", "SoftmaxAttention", "init_weights", "make_mixer"]


@dataclass
class ModelConfig:
    """Model hyper-parameters.

    Attributes:
        vocab_size: number of tokens.
        d_model: model width.
        seq_len: maximum sequence length (rows of the position embedding).
        mixer: a feature-map preset name (``spec.PRESETS``) or ``"attention"``.
        num_heads: heads of the second mixer (softmax attention falls back to 1 head when
            ``d_model`` is not divisible by it).
        feature_dim: per-head q/k feature dim of ``ReBasedAttention``.
        norm_scope: ``"head"`` or ``"all_heads"`` (see ``ReBasedAttention``).
        backend: linear-attention backend name or ``"auto"``.
        conv_kernel: kernel size of the first block's causal depthwise convolution.
    """

    vocab_size: int
    d_model: int = 64
    seq_len: int = 256
    mixer: str = "rebased"
    num_heads: int = 12
    feature_dim: int = 16
    norm_scope: str = "head"
    backend: str = "auto"
    conv_kernel: int = 3

    def __post_init__(self) -> None:
        if self.mixer != "attention" and self.mixer not in PRESETS:
            raise ValueError(
                f"unknown mixer {self.mixer!r}: use 'attention' or one of {sorted(PRESETS)}"
            )
        for name in ("vocab_size", "d_model", "seq_len", "num_heads", "feature_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


class BaseConv(nn.Module):
    """``y = Linear(u) * causal_depthwise_conv1d(u)`` (Zoology's BaseConv, short kernel)."""

    def __init__(self, d_model: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.projection = nn.Linear(d_model, d_model)
        self.conv = nn.Conv1d(
            d_model, d_model, kernel_size, groups=d_model, padding=kernel_size - 1
        )

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        T = u.shape[1]
        # left padding of kernel_size - 1 then keeping the first T outputs is causal
        conv = self.conv(u.transpose(1, 2))[..., :T].transpose(1, 2)
        return self.projection(u) * conv


class SoftmaxAttention(nn.Module):
    """Causal multi-head softmax attention via ``scaled_dot_product_attention``."""

    def __init__(self, d_model: int, num_heads: int) -> None:
        super().__init__()
        self.H = num_heads if d_model % num_heads == 0 else 1
        self.Dh = d_model // self.H
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.o_proj = nn.Linear(d_model, d_model, bias=False)

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, T, _ = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.H, self.Dh).permute(2, 0, 3, 1, 4)
        return q, k, v  # each [B, H, T, Dh]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self._qkv(x)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, self.H * self.Dh))

    def attention_matrix(self, x: torch.Tensor) -> torch.Tensor:
        """The causal softmax matrix ``[B, H, T, T]`` (float64)."""
        q, k, _ = (t.double() for t in self._qkv(x))
        T = x.shape[1]
        s = q @ k.transpose(-1, -2) * self.Dh**-0.5
        mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        return s.masked_fill(~mask, float("-inf")).softmax(-1)


def rebased_attention_matrix(layer: ReBasedAttention, x: torch.Tensor) -> torch.Tensor:
    """The normalised causal attention matrix ``[B, H, T, T]`` of a ``ReBasedAttention``.

    ``A[i, j] = sim(q_i, k_j) / (sum_{j' <= i} sim(q_i, k_j') + eps)`` for ``j <= i`` and 0
    above the diagonal, computed in float64 from the layer's q, k, pre-transform and kernel
    (``scale = D ** -0.5``, as the layer uses). Without ``normalize`` the raw masked ``sim``.
    """
    q, k, _ = layer._qkv(x)
    attn = LinearAttention(layer.feature_map, layer.D**-0.5, layer.normalize, layer.eps)
    params = (layer.q_weight, layer.q_bias, layer.k_weight, layer.k_bias)
    sim = reference.similarity_matrix(q, k, attn, params)  # [B, H, T, T]
    if not layer.normalize:
        return sim
    return sim / (sim.sum(-1, keepdim=True) + layer.eps)


def init_weights(module: nn.Module) -> None:
    """GPT-style init: linear and embedding weights ~ N(0, 0.02), biases 0."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)


def make_mixer(
    name: str, d_model: int, num_heads: int, feature_dim: int, norm_scope: str, backend: str
) -> nn.Module:
    """The sequence mixer under test: ``"attention"`` or a feature-map preset name."""
    if name == "attention":
        return SoftmaxAttention(d_model, num_heads)
    return ReBasedAttention(
        d_model,
        num_heads=num_heads,
        feature_dim=feature_dim,
        head_dim=max(1, d_model // num_heads),
        feature_map=name,
        norm_scope=norm_scope,  # type: ignore[arg-type]
        backend=backend,
        check_finite=False,  # no sync per step: the loop raises on a non-finite loss
    )


class Block(nn.Module):
    """Pre-norm residual block with an identity state mixer: ``x + mixer(LN(x))``."""

    def __init__(self, d_model: int, mixer: nn.Module) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_model, eps=LAYER_NORM_EPS)
        self.mixer = mixer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mixer(self.norm(x))


class MQARModel(nn.Module):
    """Embeddings, ``[BaseConv block, mixer block]``, final LayerNorm, tied output head.

    ``forward(inputs [B, T] int64) -> logits [B, T, vocab_size]``; with ``where [B, T]``
    (bool) only the selected positions' logits, ``[N, vocab_size]`` in row-major order (the
    loss needs the query positions only: the head is skipped on the rest).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.tok_emb = nn.Embedding(cfg.vocab_size, d)
        self.pos_emb = nn.Embedding(cfg.seq_len, d)
        mixer = make_mixer(cfg.mixer, d, cfg.num_heads, cfg.feature_dim, cfg.norm_scope,
                           cfg.backend)  # fmt: skip
        self.blocks = nn.ModuleList([Block(d, BaseConv(d, cfg.conv_kernel)), Block(d, mixer)])
        self.norm_f = nn.LayerNorm(d, eps=LAYER_NORM_EPS)
        self.lm_head = nn.Linear(d, cfg.vocab_size, bias=False)
        self.apply(init_weights)
        self.lm_head.weight = self.tok_emb.weight  # tied

    def _embed(self, inputs: torch.Tensor) -> torch.Tensor:
        T = inputs.shape[1]
        if T > self.cfg.seq_len:
            raise ValueError(f"sequence length {T} exceeds seq_len={self.cfg.seq_len}")
        pos = torch.arange(T, device=inputs.device)
        return self.tok_emb(inputs) + self.pos_emb(pos)

    def forward(self, inputs: torch.Tensor, where: torch.Tensor | None = None) -> torch.Tensor:
        x = self._embed(inputs)
        for block in self.blocks:
            x = block(x)
        if where is not None:
            x = x[where]  # [N, d]
        return self.lm_head(self.norm_f(x))

    @torch.no_grad()
    def attention_matrix(self, inputs: torch.Tensor) -> torch.Tensor:
        """The second layer's normalised causal attention matrix, float64 ``[B, H, T, T]``."""
        x = self.blocks[0](self._embed(inputs))
        block = self.blocks[1]
        u = block.norm(x)
        if isinstance(block.mixer, SoftmaxAttention):
            return block.mixer.attention_matrix(u)
        return rebased_attention_matrix(block.mixer, u)
