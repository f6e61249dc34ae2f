"""Decoding from an autoregressive model, batched: sampling, greedy, beam search, log-probabilities, diversity.

The model is any callable ``model(tokens: LongTensor (B, T)) -> logits (B, T, V)`` that is causal (the logits at
position t depend on ``tokens[:, :t + 1]`` only). A model that also offers a key-value cache (duck typing:
``new_cache(batch, device=..., capacity=...)`` returning a cache with ``select(index)`` and ``truncate(lengths)``,
and ``step(tokens_new, cache)``, as ``kegnet.models.transformer.DecoderTransformer`` does) is run incrementally:
one prefill of the prefixes, then one new token per row and step instead of the whole prefix again. Any other
model recomputes the prefix at every step. Both paths give the same tokens (logits agree up to float rounding),
and sampling draws from the generator in the same order. The model must already be on ``device``; it is put in
eval mode for the call (its previous mode is restored) and run under ``torch.inference_mode()``. Returned
tensors are ordinary tensors (cloned out of inference mode), so they can feed a training step.

Conventions shared by every function:

- Prefixes are a right-padded ``LongTensor (B, P)`` plus ``prefix_lengths (B,)`` (None: every row is ``P`` long);
  :func:`pack_prefixes` builds both from a list of 1-D tensors. Right padding keeps each prefix at positions
  ``0 .. len - 1``, so rows of different lengths decode together exactly: a causal model's logits at position
  ``len - 1`` never see the padding after it.
- Outputs are right-padded ``LongTensor (N, L)`` starting with the prefix, holding EOS when one was produced and
  ``pad_id`` after it, with ``lengths (N,)`` counting up to and including EOS. ``max_length`` bounds the whole
  row (prefix included); ``L`` is the longest row produced.
- The decoding distribution never emits BOS or PAD (unless one of them is EOS): their logits are set to -inf
  before anything else, so a PAD inside a sequence never becomes ambiguous. :func:`sequence_log_probs` scores
  under the same distribution.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F  # noqa: N812 - the conventional name
from torch import nn

from kegnet.errors import Cancelled

log = logging.getLogger(__name__)

CancelCheck = Callable[[], bool] | None


def _stop_if(should_cancel: CancelCheck) -> None:
    if should_cancel is not None and should_cancel():
        raise Cancelled("cancelled while decoding")

LanguageModel = Callable[[torch.Tensor], torch.Tensor]
Chooser = Callable[[torch.Tensor], torch.Tensor]


class Sequences(NamedTuple):
    """Decoded rows. Shapes: tokens (N, L), lengths (N,), prefix_lengths (N,)."""

    tokens: torch.Tensor
    lengths: torch.Tensor
    prefix_lengths: torch.Tensor


class BeamSequences(NamedTuple):
    """Beam-search hypotheses, ``num_return`` per prefix, best first (row ``b * num_return + j``).

    Shapes: tokens (B * n, L), lengths, prefix_lengths, scores, log_probs (B * n,). ``scores`` are the
    length-normalised scores the search ranked by; ``log_probs`` the raw sums over the generated tokens.
    """

    tokens: torch.Tensor
    lengths: torch.Tensor
    prefix_lengths: torch.Tensor
    scores: torch.Tensor
    log_probs: torch.Tensor


@dataclass(frozen=True)
class Diversity:
    """Distinct-n ratios (distinct n-grams / all n-grams of the generated parts) and unique whole sequences."""

    distinct: dict[int, float]
    unique_fraction: float
    num_sequences: int

    def to_dict(self) -> dict[str, float]:
        """Flat, JSON-ready: ``{"distinct_1": ..., "unique_fraction": ..., "num_sequences": ...}``."""
        out: dict[str, float] = {f"distinct_{n}": v for n, v in self.distinct.items()}
        out["unique_fraction"] = self.unique_fraction
        out["num_sequences"] = float(self.num_sequences)
        return out


# ----------------------------------------------------------------------------------------------- helpers


def pack_prefixes(prefixes: Sequence[torch.Tensor], pad_id: int,
                  device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pads a list of 1-D prefixes. Shapes: B x (P_b,) -> tokens (B, max P_b), lengths (B,)."""
    if not prefixes or any(p.dim() != 1 or p.numel() == 0 for p in prefixes):
        raise ValueError("prefixes must be a non-empty list of non-empty 1-D token tensors")
    lengths = torch.tensor([p.numel() for p in prefixes], dtype=torch.long, device=device)
    tokens = torch.full((len(prefixes), int(lengths.max())), pad_id, dtype=torch.long, device=device)
    for row, p in enumerate(prefixes):
        tokens[row, : p.numel()] = p.to(device=device, dtype=torch.long)
    return tokens, lengths


def gnmt_length_penalty(generated: torch.Tensor, alpha: float) -> torch.Tensor:
    """GNMT's ``((5 + len) / 6) ** alpha`` (Wu et al. 2016); alpha = 0 gives 1. Shapes: (...) -> (...)."""
    return ((5.0 + generated.double()) / 6.0) ** alpha


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Top-k then nucleus filtering: removed tokens get -inf. Shapes: (B, V) -> (B, V).

    ``top_k`` keeps exactly the k largest logits (0: off; ties broken by index). ``top_p`` keeps the smallest
    set of most likely tokens (of the top-k renormalised distribution) whose mass reaches ``top_p`` (1.0: off);
    the most likely token is always kept.
    """
    _check_filters(top_k, top_p)
    if 0 < top_k < logits.shape[-1]:
        keep = torch.zeros_like(logits, dtype=torch.bool)
        keep.scatter_(-1, logits.topk(top_k, dim=-1).indices, True)
        logits = logits.masked_fill(~keep, -math.inf)
    if top_p < 1.0:
        # float64 cumulative sums: a mass that reaches p exactly should not fall short by rounding.
        probs = F.softmax(logits.double(), dim=-1)
        sorted_p, order = probs.sort(dim=-1, descending=True, stable=True)
        mass_before = torch.cumsum(sorted_p, dim=-1) - sorted_p
        keep_sorted = mass_before < top_p
        keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
        logits = logits.masked_fill(~keep, -math.inf)
    return logits


def _check_filters(top_k: int, top_p: float) -> None:
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (1.0 = off), got {top_p}")


def _banned(bos_id: int, eos_id: int, pad_id: int) -> list[int]:
    """Token ids the decoder never emits: BOS and PAD, unless one of them doubles as EOS."""
    return sorted({bos_id, pad_id} - {eos_id})


def _log_probs(logits: torch.Tensor, banned: list[int]) -> torch.Tensor:
    """Log-softmax in float32 with the banned ids at -inf. Shapes: (..., V) -> (..., V)."""
    logits = logits.float()
    if banned:
        logits = logits.index_fill(-1, torch.tensor(banned, device=logits.device), -math.inf)
    return F.log_softmax(logits, dim=-1)


@contextlib.contextmanager
def _evaluating(model: LanguageModel) -> Iterator[None]:
    """Eval mode and inference mode for the duration; the module's previous mode comes back after."""
    was_training = isinstance(model, nn.Module) and model.training
    if isinstance(model, nn.Module):
        model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        if was_training:
            model.train()


def _prepare_prefixes(prefixes: torch.Tensor, prefix_lengths: torch.Tensor | None, *, pad_id: int,
                      max_length: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Validated prefixes on ``device`` with ``pad_id`` after each length. Shapes: (B, P), (B,) -> same."""
    if prefixes.dim() != 2 or prefixes.shape[0] == 0 or prefixes.shape[1] == 0:
        raise ValueError(f"prefixes must be a (B, P) tensor with B, P >= 1, got shape {tuple(prefixes.shape)}")
    if prefixes.dtype != torch.long:
        raise ValueError(f"prefixes must hold token ids (torch.long), got {prefixes.dtype}")
    prefixes = prefixes.to(device)
    b, p = prefixes.shape
    if prefix_lengths is None:
        lengths = torch.full((b,), p, dtype=torch.long, device=device)
    else:
        lengths = prefix_lengths.to(device=device, dtype=torch.long)
        if lengths.shape != (b,):
            raise ValueError(f"prefix_lengths must have shape ({b},), got {tuple(lengths.shape)}")
        if bool((lengths < 1).any()) or bool((lengths > p).any()):
            raise ValueError(f"prefix_lengths must lie in [1, {p}]")
    if int(lengths.max()) >= max_length:
        raise ValueError(f"max_length ({max_length}) must exceed every prefix length (longest: {int(lengths.max())})")
    width = int(lengths.max())  # padding past the longest prefix may exceed max_length; it carries nothing
    beyond = torch.arange(width, device=device) >= lengths.unsqueeze(1)
    return prefixes[:, :width].masked_fill(beyond, pad_id), lengths


def _check_common(max_length: int, batch_size: int) -> None:
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2 (BOS and one token), got {max_length}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


def _trimmed(tokens: torch.Tensor, lengths: torch.Tensor, prefix_lengths: torch.Tensor) -> Sequences:
    """Drops all-pad columns on the right and clones out of inference mode."""
    width = int(lengths.max()) if lengths.numel() else tokens.shape[1]
    return Sequences(tokens[:, :width].clone(), lengths.clone(), prefix_lengths.clone())


# ------------------------------------------------------------------------------- sampling and greedy


def _has_cache(model: LanguageModel) -> bool:
    """Whether ``model`` offers incremental decoding (``new_cache`` and ``step``)."""
    return callable(getattr(model, "new_cache", None)) and callable(getattr(model, "step", None))


class _NextLogits:
    """Next-token logits for a set of rows that evolves between calls only through :meth:`keep`.

    Each call gets the rows' tokens ``(n, W)`` and lengths ``(n,)`` and returns the logits at position
    ``length - 1`` of each row ``(n, V)``. Without a cache the model reruns every row's whole prefix. With one,
    the first call prefills (the right padding past a row's length is computed, then dropped by ``truncate``
    and overwritten by later steps) and every later call feeds one token per row: the caller must have grown
    each row by exactly one token since the previous call and told :meth:`keep` which rows it kept, in order.
    """

    def __init__(self, model: LanguageModel, capacity: int) -> None:
        self.model, self.capacity = model, capacity
        self.cached = _has_cache(model)
        self.cache = None  # the model's cache object, from the first call on

    def __call__(self, tokens: torch.Tensor, lengths: torch.Tensor, group: int = 1) -> torch.Tensor:
        """``group``: on the first call the rows come in runs of ``group`` identical rows (beam search's copies
        of a prefix); the cached path prefills one row per run."""
        rows = torch.arange(tokens.shape[0], device=tokens.device)
        if not self.cached:
            return self.model(tokens[:, : int(lengths.max())])[rows, lengths - 1]  # (n, T, V) -> (n, V)
        if self.cache is None:
            distinct, distinct_len = tokens[::group], lengths[::group]
            self.cache = self.model.new_cache(distinct.shape[0], device=tokens.device, capacity=self.capacity)
            logits = self.model.step(distinct[:, : int(distinct_len.max())], self.cache)
            last = logits[torch.arange(distinct.shape[0], device=tokens.device), distinct_len - 1]
            self.cache.truncate(distinct_len)
            if group > 1:
                self.keep(torch.arange(distinct.shape[0], device=tokens.device).repeat_interleave(group))
                last = last.repeat_interleave(group, 0)
            return last
        return self.model.step(tokens[rows, lengths - 1].unsqueeze(1), self.cache)[:, 0]  # (n, 1, V) -> (n, V)

    def keep(self, index: torch.Tensor) -> None:
        """The next call's rows are this call's rows ``index`` (reordered, dropped, repeated). Shapes: (n',)."""
        if self.cache is not None:
            self.cache = self.cache.select(index)


def _extend(model: LanguageModel, prefixes: torch.Tensor, prefix_lengths: torch.Tensor, choose: Chooser, *,
            banned: list[int], eos_id: int, pad_id: int, max_length: int,
            should_cancel: CancelCheck = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Appends ``choose(log_probs)`` tokens to each row until EOS or ``max_length``; ``should_cancel`` is asked
    every step.

    Shapes: prefixes (N, P), prefix_lengths (N,) -> tokens (N, max_length), lengths (N,). Rows sit at different
    positions; each step runs the model on the unfinished rows only and reads each row's last real position.
    """
    n = prefixes.shape[0]
    tokens = torch.full((n, max_length), pad_id, dtype=torch.long, device=prefixes.device)
    tokens[:, : prefixes.shape[1]] = prefixes
    lengths = prefix_lengths.clone()
    finished = torch.zeros(n, dtype=torch.bool, device=prefixes.device)
    # The longest row the model ever sees is max_length - 1 tokens: it predicts the last one.
    next_logits = _NextLogits(model, capacity=max_length - 1)
    rows = torch.arange(n, device=prefixes.device)
    while True:
        live = (~finished[rows]) & (lengths[rows] < max_length)
        if not bool(live.all()):
            next_logits.keep(live.nonzero().squeeze(1))  # the cache follows the rows still decoding
            rows = rows[live]
        if rows.numel() == 0:
            return tokens, lengths
        _stop_if(should_cancel)
        cur = lengths[rows]
        last = next_logits(tokens[rows], cur)  # (n, V)
        chosen = choose(_log_probs(last, banned))
        tokens[rows, cur] = chosen
        lengths[rows] = cur + 1
        finished[rows] = chosen == eos_id


def _decode_chunks(model: LanguageModel, prefixes: torch.Tensor, prefix_lengths: torch.Tensor, choose: Chooser,
                   *, bos_id: int, eos_id: int, pad_id: int, max_length: int, batch_size: int,
                   should_cancel: CancelCheck = None) -> Sequences:
    """:func:`_extend` over ``batch_size`` rows at a time. Shapes: (N, P), (N,) -> Sequences (N, L)."""
    banned = _banned(bos_id, eos_id, pad_id)
    outs, lens = [], []
    with _evaluating(model):
        for start in range(0, prefixes.shape[0], batch_size):
            stop = start + batch_size
            tok, length = _extend(model, prefixes[start:stop], prefix_lengths[start:stop], choose, banned=banned,
                                  eos_id=eos_id, pad_id=pad_id, max_length=max_length, should_cancel=should_cancel)
            outs.append(tok)
            lens.append(length)
            log.debug("decoded rows %d..%d", start, min(stop, prefixes.shape[0]))
        tokens, lengths = torch.cat(outs), torch.cat(lens)
    return _trimmed(tokens, lengths, prefix_lengths)


def sample_sequences(model: LanguageModel, num_samples: int, *, bos_id: int, eos_id: int, pad_id: int,
                     max_length: int, generator: torch.Generator, device: torch.device | str,
                     prefixes: torch.Tensor | None = None, prefix_lengths: torch.Tensor | None = None,
                     temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                     batch_size: int = 1024, should_cancel: CancelCheck = None) -> Sequences:
    """Ancestral sampling: ``num_samples`` continuations of each prefix (default: the single prefix [BOS]).

    Shapes: prefixes (B, P), prefix_lengths (B,) -> Sequences (B * num_samples, L), prefix-major (row
    ``b * num_samples + i``). Each step divides the logits by ``temperature`` (> 0; use :func:`greedy_decode`
    for the limit 0), applies :func:`filter_logits` (top-k, then top-p) and draws from ``generator``, which
    must live on ``device``. The same seed and ``batch_size`` give the same samples.
    """
    if not (temperature > 0.0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be finite and > 0 (greedy_decode is the limit 0), got {temperature}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    _check_filters(top_k, top_p)
    _check_common(max_length, batch_size)
    if prefixes is None:
        prefixes = torch.full((1, 1), bos_id, dtype=torch.long)
        prefix_lengths = None
    prefixes, prefix_lengths = _prepare_prefixes(prefixes, prefix_lengths, pad_id=pad_id, max_length=max_length,
                                                 device=device)

    def choose(log_probs: torch.Tensor) -> torch.Tensor:
        probs = F.softmax(filter_logits(log_probs / temperature, top_k, top_p), dim=-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)

    return _decode_chunks(model, prefixes.repeat_interleave(num_samples, 0),
                          prefix_lengths.repeat_interleave(num_samples, 0), choose, bos_id=bos_id, eos_id=eos_id,
                          pad_id=pad_id, max_length=max_length, batch_size=batch_size, should_cancel=should_cancel)


def greedy_decode(model: LanguageModel, prefixes: torch.Tensor, prefix_lengths: torch.Tensor | None = None, *,
                  bos_id: int, eos_id: int, pad_id: int, max_length: int, device: torch.device | str,
                  batch_size: int = 1024, should_cancel: CancelCheck = None) -> Sequences:
    """The most likely next token at every step (ties: the lowest id). Shapes: (B, P), (B,) -> Sequences (B, L)."""
    _check_common(max_length, batch_size)
    prefixes, prefix_lengths = _prepare_prefixes(prefixes, prefix_lengths, pad_id=pad_id, max_length=max_length,
                                                 device=device)
    return _decode_chunks(model, prefixes, prefix_lengths, lambda lp: lp.argmax(dim=-1), bos_id=bos_id,
                          eos_id=eos_id, pad_id=pad_id, max_length=max_length, batch_size=batch_size,
                          should_cancel=should_cancel)


# -------------------------------------------------------------------------------------------- beam search


def _beam_chunk(model: LanguageModel, prefixes: torch.Tensor, prefix_lengths: torch.Tensor, *, beam_size: int,
                banned: list[int], eos_id: int, pad_id: int, max_length: int, alpha: float,
                num_return: int) -> tuple[torch.Tensor, ...]:
    """Beam search for B prefixes at once, K beams each, fairseq-style.

    Shapes: prefixes (B, P), prefix_lengths (B,) -> tokens (B, n, max_length), lengths, scores, log_probs (B, n).
    Each step ranks the 2K best one-token extensions of a group's live beams by raw log-probability. EOS
    extensions among the first K leave for the group's pool of finished hypotheses (ranked by normalised
    score, at most K kept) and are never extended; the first K others become the live beams. At ``max_length``
    those others are hypotheses too (no EOS). A group stops once its pool holds K hypotheses, at
    ``max_length``, or when no live beam is left.
    """
    b, p = prefixes.shape
    k, dev, inf = beam_size, prefixes.device, math.inf
    beams = torch.full((b, k, max_length), pad_id, dtype=torch.long, device=dev)
    beams[:, :, :p] = prefixes.unsqueeze(1)
    bare = beams[:, :1].clone()  # (B, 1, max_length): the prefix alone
    beam_lp = torch.full((b, k), -inf, device=dev)
    beam_lp[:, 0] = 0.0  # one live beam at first, so the K copies of the prefix do not yield K equal extensions
    cur = prefix_lengths.clone()
    pool_tok = beams.clone()
    pool_score = torch.full((b, k), -inf, dtype=torch.float64, device=dev)
    pool_lp = torch.full((b, k), -inf, device=dev)
    pool_len = prefix_lengths.unsqueeze(1).repeat(1, k)
    done = torch.zeros(b, dtype=torch.bool, device=dev)
    next_logits = _NextLogits(model, capacity=max_length - 1)  # rows: the live groups' beams, group-major
    while True:
        act = (~done).nonzero().squeeze(1)
        if act.numel() == 0:
            break
        n, c, rows = act.numel(), cur[act], beams[act]  # (n,), (n, K, max_length)
        last = next_logits(rows.reshape(n * k, max_length), c.repeat_interleave(k), group=k)  # (n K, V)
        vocab = last.shape[-1]
        cand = (beam_lp[act].unsqueeze(-1) + _log_probs(last, banned).view(n, k, vocab)).view(n, k * vocab)
        m = min(2 * k, k * vocab)
        top_lp, top_i = cand.topk(m, dim=1)  # (n, m), best first
        tok = top_i % vocab
        valid = torch.isfinite(top_lp)
        is_eos = tok == eos_id
        new_len = c + 1
        at_max = (new_len >= max_length).unsqueeze(1)
        live = valid & ~is_eos
        live &= live.cumsum(1) <= k  # the first K non-EOS extensions
        fin = (valid & is_eos & (torch.arange(m, device=dev) < k)) | (live & at_max)
        cand_tok = rows.gather(1, (top_i // vocab).unsqueeze(-1).expand(n, m, max_length)).clone()
        cand_tok.scatter_(2, c.view(n, 1, 1).expand(n, m, 1), tok.unsqueeze(-1))
        norm = top_lp.double() / gnmt_length_penalty(new_len - prefix_lengths[act], alpha).unsqueeze(1)
        all_score = torch.cat([pool_score[act], norm.masked_fill(~fin, -inf)], 1)  # (n, K + m)
        best_s, best_i = all_score.topk(k, dim=1)
        pool_score[act] = best_s
        pool_lp[act] = torch.cat([pool_lp[act], top_lp], 1).gather(1, best_i)
        pool_len[act] = torch.cat([pool_len[act], new_len.unsqueeze(1).expand(n, m)], 1).gather(1, best_i)
        pool_tok[act] = torch.cat([pool_tok[act], cand_tok], 1).gather(
            1, best_i.unsqueeze(-1).expand(n, k, max_length))
        next_lp, next_i = top_lp.masked_fill(~live | at_max, -inf).topk(k, dim=1)
        beam_lp[act] = next_lp
        beams[act] = cand_tok.gather(1, next_i.unsqueeze(-1).expand(n, k, max_length))
        cur[act] = new_len
        stop = at_max.squeeze(1) | torch.isfinite(best_s[:, -1]) | ~torch.isfinite(next_lp[:, 0])
        done[act] = stop
        # The new beam j of group g extends the old beam top_i // vocab: its cache row is that beam's.
        source = torch.arange(n, device=dev).unsqueeze(1) * k + top_i.gather(1, next_i) // vocab  # (n, K)
        next_logits.keep(source[~stop].flatten())
    found = torch.isfinite(pool_score[:, :num_return])
    # Slots no hypothesis reached (a hypothesis space smaller than num_return) report the bare prefix at -inf.
    tokens = torch.where(found.unsqueeze(-1), pool_tok[:, :num_return], bare.expand(b, num_return, -1))
    lengths = torch.where(found, pool_len[:, :num_return], prefix_lengths.unsqueeze(1))
    return tokens, lengths, pool_score[:, :num_return], pool_lp[:, :num_return]


def beam_search(model: LanguageModel, prefixes: torch.Tensor, prefix_lengths: torch.Tensor | None = None, *,
                bos_id: int, eos_id: int, pad_id: int, max_length: int, device: torch.device | str,
                beam_size: int = 5, length_penalty: float = 0.6, num_return: int = 1,
                batch_size: int = 1024, should_cancel: CancelCheck = None) -> BeamSequences:
    """Batched beam search with GNMT length normalisation; the ``num_return`` best hypotheses per prefix.

    Shapes: prefixes (B, P), prefix_lengths (B,) -> BeamSequences (B * num_return, L), best first per prefix.
    A hypothesis scores ``log p(generated | prefix) / ((5 + g) / 6) ** length_penalty`` with ``g`` the number
    of generated tokens (EOS included); ``length_penalty = 0`` ranks by raw log-probability. Hypotheses that
    reach ``max_length`` without EOS count. ``batch_size`` bounds the rows (prefixes x beams) per forward pass.
    """
    _check_common(max_length, batch_size)
    if beam_size < 1 or not 1 <= num_return <= beam_size:
        raise ValueError(f"need beam_size >= 1 and 1 <= num_return <= beam_size, got {beam_size}, {num_return}")
    if length_penalty < 0:
        raise ValueError(f"length_penalty (GNMT alpha) must be >= 0, got {length_penalty}")
    prefixes, prefix_lengths = _prepare_prefixes(prefixes, prefix_lengths, pad_id=pad_id, max_length=max_length,
                                                 device=device)
    banned = _banned(bos_id, eos_id, pad_id)
    groups = max(1, batch_size // beam_size)
    parts = []
    with _evaluating(model):
        for start in range(0, prefixes.shape[0], groups):
            _stop_if(should_cancel)
            stop = start + groups
            parts.append(_beam_chunk(model, prefixes[start:stop], prefix_lengths[start:stop], beam_size=beam_size,
                                     banned=banned, eos_id=eos_id, pad_id=pad_id, max_length=max_length,
                                     alpha=length_penalty, num_return=num_return))
            log.debug("beam-searched prefixes %d..%d", start, min(stop, prefixes.shape[0]))
        tokens, lengths, scores, log_probs = (torch.cat(t).flatten(0, 1) for t in zip(*parts, strict=True))
        seqs = _trimmed(tokens, lengths, prefix_lengths.repeat_interleave(num_return, 0))
        return BeamSequences(*seqs, scores.clone(), log_probs.clone())


# ------------------------------------------------------------------------------ scoring and diversity


def sequence_log_probs(model: LanguageModel, tokens: torch.Tensor, lengths: torch.Tensor,
                       prefix_lengths: torch.Tensor, *, bos_id: int, eos_id: int, pad_id: int,
                       device: torch.device | str, length_penalty: float = 0.0,
                       batch_size: int = 1024) -> torch.Tensor:
    """Log-probability of each row's generated tokens (positions ``prefix_len .. length - 1``) given its prefix.

    Shapes: tokens (N, L), lengths (N,), prefix_lengths (N,) -> (N,) float32 on ``device``. Scored under the
    decoders' distribution (BOS and PAD banned), divided by the GNMT penalty when ``length_penalty`` > 0, so
    it equals :func:`beam_search`'s score for the same alpha. Rows with nothing generated score 0.
    """
    if tokens.dim() != 2 or tokens.dtype != torch.long:
        raise ValueError(f"tokens must be a (N, L) torch.long tensor, got {tuple(tokens.shape)} {tokens.dtype}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    tokens, lengths, prefix_lengths = (t.to(device) for t in (tokens, lengths, prefix_lengths))
    if bool((prefix_lengths < 1).any()) or bool((lengths < prefix_lengths).any()) or \
            bool((lengths > tokens.shape[1]).any()):
        raise ValueError("need 1 <= prefix_lengths <= lengths <= L for every row")
    banned = _banned(bos_id, eos_id, pad_id)
    out = []
    with _evaluating(model):
        for start in range(0, tokens.shape[0], batch_size):
            tok, ln, pl = (t[start: start + batch_size] for t in (tokens, lengths, prefix_lengths))
            width = int(ln.max())
            if width < 2:  # nothing generated in this chunk: every row scores 0
                out.append(torch.zeros(ln.shape[0], device=tok.device))
                continue
            log_p = _log_probs(model(tok[:, : width - 1]), banned)  # (n, width - 1, V): predicts tok[:, 1:]
            picked = log_p.gather(2, tok[:, 1:width].unsqueeze(-1)).squeeze(-1)
            pos = torch.arange(1, width, device=tok.device)
            counted = (pos >= pl.unsqueeze(1)) & (pos < ln.unsqueeze(1))
            out.append(torch.where(counted, picked, 0.0).sum(1))
        total = torch.cat(out)
        if length_penalty > 0:
            total = (total.double() / gnmt_length_penalty(lengths - prefix_lengths, length_penalty)).float()
        return total.clone()


def _count_distinct(rows: torch.Tensor) -> int:
    """Distinct rows of an (M, n) id tensor, through one int64 key per row. Shapes: (M, n) -> int.

    Keys grow by ``key * base + column``; when that could overflow (large vocabularies), the key so far is first
    replaced by its rank among the distinct keys, which keeps distinct prefixes distinct. ``unique(dim=0)`` is
    several times slower on millions of rows.
    """
    low = int(rows.min())
    base = int(rows.max()) - low + 1
    shifted = rows - low
    keys = shifted[:, 0].clone()
    for col in shifted[:, 1:].unbind(1):
        if (int(keys.max()) + 1) * base >= 2 ** 63:
            keys = torch.unique(keys, return_inverse=True)[1]
        keys = keys * base + col
    space = int(keys.max()) + 1
    if space <= max(1 << 20, 4 * keys.numel()):  # small key space: a presence table beats a sort
        return int(torch.zeros(space, dtype=torch.bool, device=keys.device).index_fill_(0, keys, True).sum())
    return int(torch.unique(keys).numel())


def diversity(tokens: torch.Tensor, lengths: torch.Tensor, prefix_lengths: torch.Tensor, *, eos_id: int,
              max_n: int = 4) -> Diversity:
    """Distinct-n for n = 1..max_n over the generated parts, and the fraction of unique whole sequences.

    Shapes: tokens (N, L), lengths (N,), prefix_lengths (N,) -> Diversity. n-grams lie inside each row's
    generated tokens (after the prefix, before the final EOS; PAD never counts); distinct-n is 0.0 when there
    are no n-grams. Whole sequences compare every token up to ``lengths`` (prefix and EOS included).
    Vectorised (a sort or two per n): a few seconds for 10^5 rows of 32 tokens on one CPU core.
    """
    if tokens.dim() != 2 or tokens.shape[0] == 0:
        raise ValueError(f"tokens must be a non-empty (N, L) tensor, got shape {tuple(tokens.shape)}")
    if max_n < 1:
        raise ValueError(f"max_n must be >= 1, got {max_n}")
    lengths, prefix_lengths = lengths.to(tokens.device), prefix_lengths.to(tokens.device)
    n_rows, width = tokens.shape
    last = tokens.gather(1, (lengths - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
    end = lengths - ((last == eos_id) & (lengths > prefix_lengths)).long()  # content ends before EOS
    distinct: dict[int, float] = {}
    for n in range(1, max_n + 1):
        if width < n:
            distinct[n] = 0.0
            continue
        start = torch.arange(width - n + 1, device=tokens.device)
        inside = (start >= prefix_lengths.unsqueeze(1)) & (start + n <= end.unsqueeze(1))
        grams = tokens.unfold(1, n, 1)[inside]  # (M, n)
        distinct[n] = _count_distinct(grams) / grams.shape[0] if grams.shape[0] else 0.0
    whole = tokens.masked_fill(torch.arange(width, device=tokens.device) >= lengths.unsqueeze(1), -1)
    unique = int(torch.unique(whole, dim=0).shape[0])
    return Diversity(distinct, unique / n_rows, n_rows)

