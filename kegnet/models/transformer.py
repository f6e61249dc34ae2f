"""Decoder-only Transformer (GPT-style, pre-LayerNorm) for autoregressive sequence models.

Shapes: ``tokens (B, T) -> logits (B, T, V)`` with ``1 <= T <= max_length``; position ``t`` only sees tokens
``0..t`` (causal self-attention through ``scaled_dot_product_attention(..., is_causal=True)``).

State-dict keys (``V`` vocabulary, ``L`` max_length, ``d`` d_model, ``F`` d_ff; ``i`` in ``0..n_layers-1``); a
user's checkpoint of this layout loads into ``create_sequence_model("transformer", ...)``:

==================================  ===========  ===============================================
key                                 shape        role
==================================  ===========  ===============================================
``tok_emb.weight``                  (V, d)       token embedding (and the output head when tied)
``pos_emb.weight``                  (L, d)       learned absolute position embedding
``blocks.{i}.ln1.{weight,bias}``    (d,)         LayerNorm before attention
``blocks.{i}.attn.qkv.weight``      (3d, d)      fused query, key, value projection (q, k, v rows)
``blocks.{i}.attn.qkv.bias``        (3d,)
``blocks.{i}.attn.proj.weight``     (d, d)       attention output projection
``blocks.{i}.attn.proj.bias``       (d,)
``blocks.{i}.ln2.{weight,bias}``    (d,)         LayerNorm before the MLP
``blocks.{i}.mlp.fc.weight``        (F, d)       MLP expansion (GELU follows)
``blocks.{i}.mlp.fc.bias``          (F,)
``blocks.{i}.mlp.proj.weight``      (d, F)       MLP contraction
``blocks.{i}.mlp.proj.bias``        (d,)
``ln_f.{weight,bias}``              (d,)         final LayerNorm
``head.weight``                     (V, d)       output head, only with ``tie_embeddings=False`` (no bias)
==================================  ===========  ===============================================

Within ``attn.qkv`` the heads are contiguous: rows ``[0, d)`` are the queries, ``[d, 2d)`` the keys and
``[2d, 3d)`` the values, each split into ``n_heads`` blocks of ``d / n_heads`` rows (the GPT-2 layout).

The projections are plain ``nn.Linear`` so compression can swap them for factorized modules. With tied
embeddings the logits are ``tok_emb.logits(h)``: any replacement of ``tok_emb`` (``FactorizedEmbedding`` in
``kegnet.sequence.compress``) provides that method, so the tied head follows the embedding it replaces.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F  # noqa: N812 - the conventional name
from torch import nn

from kegnet.models.registry import register_sequence_model

MAX_VOCAB = 65_536
MAX_LENGTH = 2_048
MAX_LAYERS = 48
MAX_D_MODEL = 4_096
MAX_HEADS = 256
MAX_D_FF = 4 * MAX_D_MODEL


class TokenEmbedding(nn.Embedding):
    """``nn.Embedding`` (key ``weight``, (V, d)) that also serves as the tied output head.

    Shapes: ``(B, T) -> (B, T, d)``; ``logits``: ``(..., d) -> (..., V)``.
    """

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.weight)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention. Shapes: ``(B, T, d) -> (B, T, d)``."""

    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.d_model, self.n_heads, self.dropout = d_model, n_heads, dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        # (B, T, 3d) -> 3 x (B, H, T, d/H); sizes come from the module, not from qkv (which may be factorized)
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                           is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    """``fc`` (d -> F), GELU, ``proj`` (F -> d). Shapes: ``(B, T, d) -> (B, T, d)``."""

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d_model, d_ff)
        self.act = nn.GELU()
        self.proj = nn.Linear(d_ff, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.act(self.fc(x)))


class Block(nn.Module):
    """Pre-LayerNorm residual block: ``x + attn(ln1(x))`` then ``x + mlp(ln2(x))``.

    Shapes: ``(B, T, d) -> (B, T, d)``.
    """

    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads, dropout)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = MLP(d_model, d_ff)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x)))
        return x + self.drop(self.mlp(self.ln2(x)))


def _check_int(name: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in {low}..{high}, got {value}")
    return value


@register_sequence_model("transformer")
class DecoderTransformer(nn.Module):
    """GPT-style decoder: token + position embeddings, ``n_layers`` pre-LN blocks, final LayerNorm, head.

    Shapes: ``(B, T) -> (B, T, V)`` with ``T <= max_length``. Key names: see the module docstring.
    ``d_ff`` defaults to ``4 * d_model``; ``dropout`` applies to embeddings, attention and residuals in
    training mode only. Raises ``ValueError`` on out-of-range arguments.
    """

    def __init__(self, vocab_size: int, max_length: int, n_layers: int = 2, n_heads: int = 4, d_model: int = 128,
                 d_ff: int | None = None, tie_embeddings: bool = True, dropout: float = 0.0) -> None:
        super().__init__()
        _check_int("vocab_size", vocab_size, 2, MAX_VOCAB)
        _check_int("max_length", max_length, 1, MAX_LENGTH)
        _check_int("n_layers", n_layers, 1, MAX_LAYERS)
        _check_int("n_heads", n_heads, 1, MAX_HEADS)
        _check_int("d_model", d_model, 1, MAX_D_MODEL)
        d_ff = 4 * d_model if d_ff is None else _check_int("d_ff", d_ff, 1, MAX_D_FF)
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        if not isinstance(tie_embeddings, bool):
            raise ValueError(f"tie_embeddings must be true or false, got {tie_embeddings!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, int | float) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
        self.vocab_size, self.max_length, self.n_layers = vocab_size, max_length, n_layers
        self.n_heads, self.d_model, self.d_ff = n_heads, d_model, d_ff
        self.tie_embeddings = tie_embeddings

        self.tok_emb = TokenEmbedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(max_length, d_model)
        self.drop = nn.Dropout(float(dropout))
        self.blocks = nn.ModuleList(Block(d_model, n_heads, d_ff, float(dropout)) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = None if tie_embeddings else nn.Linear(d_model, vocab_size, bias=False)
        self._init_weights()

    def _init_weights(self) -> None:
        """GPT-2's initialisation: N(0, 0.02), residual projections scaled by 1/sqrt(2 n_layers) so the
        residual stream's variance does not grow with depth."""
        for m in self.modules():
            if isinstance(m, nn.Linear | nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        for block in self.blocks:
            for proj in (block.attn.proj, block.mlp.proj):
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * self.n_layers))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.dim() != 2 or tokens.dtype.is_floating_point or tokens.dtype.is_complex:
            raise ValueError(f"tokens must be an integer tensor of shape (B, T), got {tuple(tokens.shape)} "
                             f"of {tokens.dtype}")
        t = tokens.shape[1]
        if not 1 <= t <= self.max_length:
            raise ValueError(f"sequence length {t} is outside 1..max_length ({self.max_length})")
        positions = torch.arange(t, device=tokens.device)
        x = self.drop(self.tok_emb(tokens) + self.pos_emb(positions))
        for block in self.blocks:
            x = block(x)
        h = self.ln_f(x)
        return self.tok_emb.logits(h) if self.head is None else self.head(h)
