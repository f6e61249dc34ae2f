"""Decoder-only Transformer (GPT-style, pre-LayerNorm) for autoregressive sequence models.

Shapes: ``tokens (B, T) -> logits (B, T, V)`` with ``1 <= T <= max_length``; position ``t`` only sees tokens
``0..t`` (causal self-attention through ``scaled_dot_product_attention(..., is_causal=True)``).

State-dict keys (``V`` vocabulary, ``L`` max_length, ``d`` d_model, ``F`` d_ff; ``i`` in ``0..n_layers-1``); a
user's checkpoint of this layout loads into ``create_model("transformer", vocab_size=..., max_length=...)``:

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

Incremental decoding: ``new_cache`` makes a :class:`KVCache` (per layer keys and values ``(B, H, C, d / H)``
and per-row lengths) and ``step(tokens_new (B, t), cache)`` runs only the new tokens, at positions
``cache.lengths[b] ..`` of each row, attending to the cached ones; ``forward(tokens, cache)`` is the same call.
The cache is not part of the state dict. It is meant for inference (``torch.no_grad`` or
``torch.inference_mode``): it is written in place, so autograd through several steps is not supported.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F  # noqa: N812 - the conventional name
from torch import nn

from kegnet.models.registry import register_model

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


class _Step(NamedTuple):
    """One incremental call's layout, shared by every layer.

    ``positions (B, t)``: the new tokens' absolute positions, which are also the cache slots they fill.
    ``width``: the queries look at slots ``[0, width)`` only. ``mask (B, 1, t, width)``: slot ``j`` is visible
    to a query at position ``p`` iff ``j <= p``.
    """

    positions: torch.Tensor
    width: int
    mask: torch.Tensor


class KVCache:
    """Keys and values of the tokens a :class:`DecoderTransformer` has seen, for incremental decoding.

    Shapes: ``keys[i]``, ``values[i]``: ``(B, H, C, d / H)`` for layer ``i`` with ``C`` the capacity;
    ``lengths (B,)``: the tokens held per row, at slots ``0 .. lengths[b] - 1`` (slot = position). Rows may
    hold different lengths. Slots at or past a row's length may hold stale values (from padding, or from
    :meth:`truncate`): they are never visible, because a query at position ``p`` sees slots ``<= p`` only
    and its own slot is written before it attends.
    """

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], lengths: torch.Tensor) -> None:
        self.keys, self.values, self.lengths = keys, values, lengths

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]

    @property
    def capacity(self) -> int:
        """The most tokens a row can hold."""
        return self.keys[0].shape[2]

    def select(self, index: torch.Tensor) -> KVCache:
        """A new cache of the rows ``index`` (in that order; repeats allowed), copied: beam search's reordering
        and the dropping of finished rows. Shapes: index (B',) -> a cache of B' rows."""
        index = index.to(device=self.lengths.device, dtype=torch.long)
        return KVCache([k.index_select(0, index) for k in self.keys],
                       [v.index_select(0, index) for v in self.values], self.lengths.index_select(0, index))

    def truncate(self, lengths: torch.Tensor | int) -> None:
        """Keep only the first ``lengths`` tokens of each row (in place). Shapes: lengths (B,) or an int.

        After a prefill of right-padded prefixes, truncating to the true lengths drops the padding: the next
        step writes over it.
        """
        lengths = torch.as_tensor(lengths, dtype=torch.long, device=self.lengths.device).expand_as(self.lengths)
        if bool((lengths < 0).any()) or bool((lengths > self.lengths).any()):
            raise ValueError("truncate can only shorten rows (0 <= lengths <= cache.lengths)")
        self.lengths = lengths.clone()


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention. Shapes: ``(B, T, d) -> (B, T, d)``."""

    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.d_model, self.n_heads, self.dropout = d_model, n_heads, dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None = None,
                step: _Step | None = None) -> torch.Tensor:
        """Without ``past``: causal attention over ``x`` alone. With ``past`` (this layer's key and value buffers
        ``(B, H, C, d/H)``) and ``step``: the new keys and values are written at ``step.positions`` first, then
        the queries attend to slots ``[0, step.width)`` under ``step.mask``."""
        b, t, d = x.shape
        # (B, T, 3d) -> 3 x (B, H, T, d/H); sizes come from the module, not from qkv (which may be factorized)
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        dropout_p = self.dropout if self.training else 0.0
        if past is None or step is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        else:
            keys, values = past
            # Row r's new tokens go to slots positions[r]: indices (B, 1) and (B, t) around the head slice put
            # (B, t) first, hence (B, t, H, d/H) values (advanced indexing; a few times faster than scatter_).
            rows = torch.arange(b, device=x.device).unsqueeze(1)
            keys[rows, :, step.positions] = k.transpose(1, 2).to(keys.dtype)
            values[rows, :, step.positions] = v.transpose(1, 2).to(values.dtype)
            y = F.scaled_dot_product_attention(q, keys[:, :, : step.width], values[:, :, : step.width],
                                               attn_mask=step.mask, dropout_p=dropout_p)
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

    def forward(self, x: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None = None,
                step: _Step | None = None) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x), past, step))
        return x + self.drop(self.mlp(self.ln2(x)))


def _check_int(name: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in {low}..{high}, got {value}")
    return value


@register_model("transformer", task="sequence")
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

    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Shapes: ``(B, T) -> (B, T, V)``. With ``cache``: :meth:`step` (logits of the new tokens only)."""
        if cache is not None:
            return self.step(tokens, cache)
        _check_tokens(tokens)
        t = tokens.shape[1]
        if not 1 <= t <= self.max_length:
            raise ValueError(f"sequence length {t} is outside 1..max_length ({self.max_length})")
        positions = torch.arange(t, device=tokens.device)
        x = self.drop(self.tok_emb(tokens) + self.pos_emb(positions))
        for block in self.blocks:
            x = block(x)
        h = self.ln_f(x)
        return self.tok_emb.logits(h) if self.head is None else self.head(h)

    def new_cache(self, batch: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                  capacity: int | None = None) -> KVCache:
        """An empty :class:`KVCache` for ``batch`` rows of up to ``capacity`` tokens (default, and at most,
        ``max_length``). ``device`` and ``dtype`` default to the model's (that of ``ln_f``, which compression
        never replaces). Zero-filled: a masked slot must hold finite values (0 * NaN would leak through)."""
        ref = self.ln_f.weight
        capacity = self.max_length if capacity is None else min(_check_int("capacity", capacity, 1, MAX_LENGTH),
                                                                  self.max_length)
        shape = (_check_int("batch", batch, 1, 2 ** 31), self.n_heads, capacity, self.d_model // self.n_heads)
        device = ref.device if device is None else device
        dtype = ref.dtype if dtype is None else dtype
        return KVCache([torch.zeros(shape, device=device, dtype=dtype) for _ in self.blocks],
                       [torch.zeros(shape, device=device, dtype=dtype) for _ in self.blocks],
                       torch.zeros(batch, dtype=torch.long, device=device))

    def step(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Runs ``tokens`` (B, t) after what ``cache`` holds and appends them to it; returns their logits (B, t, V).

        Row ``b``'s new tokens sit at positions ``cache.lengths[b] .. cache.lengths[b] + t - 1`` and each sees
        the row's cached tokens and the new ones up to itself, so a prefill (t > 1 on an empty cache) gives
        ``forward``'s logits, and so does any split of a sequence into consecutive steps (up to float rounding).
        Raises ``ValueError`` when a row would pass ``max_length`` or the cache's capacity.
        """
        _check_tokens(tokens)
        b, t = tokens.shape
        if cache.batch_size != b or len(cache.keys) != len(self.blocks):
            raise ValueError(f"cache holds {cache.batch_size} rows and {len(cache.keys)} layers, tokens have {b} "
                             f"rows and the model {len(self.blocks)} layers")
        if t == 0:
            raise ValueError("step needs at least one new token per row")
        width = int(cache.lengths.max()) + t
        if width > self.max_length:
            raise ValueError(f"sequence length {width} is outside 1..max_length ({self.max_length})")
        if width > cache.capacity:
            raise ValueError(f"sequence length {width} exceeds the cache's capacity ({cache.capacity})")
        positions = cache.lengths.unsqueeze(1) + torch.arange(t, device=tokens.device)  # (B, t)
        mask = torch.arange(width, device=tokens.device) <= positions.unsqueeze(-1)  # (B, t, width)
        layout = _Step(positions, width, mask.unsqueeze(1))
        x = self.drop(self.tok_emb(tokens) + self.pos_emb(positions))
        for block, keys, values in zip(self.blocks, cache.keys, cache.values, strict=True):
            x = block(x, (keys, values), layout)
        cache.lengths = cache.lengths + t
        h = self.ln_f(x)
        return self.tok_emb.logits(h) if self.head is None else self.head(h)


def _check_tokens(tokens: torch.Tensor) -> None:
    if tokens.dim() != 2 or tokens.dtype.is_floating_point or tokens.dtype.is_complex:
        raise ValueError(f"tokens must be an integer tensor of shape (B, T), got {tuple(tokens.shape)} "
                         f"of {tokens.dtype}")
