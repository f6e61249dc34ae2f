"""Scores of decoded pronunciations against the dictionary's: word accuracy and phoneme error rate.

Hypotheses and references are N sequences of token ids: lists of id lists, or a ``(N, T)`` tensor with
``(N,)`` lengths (``as_lists``). Ids are compared as they are, so a non-phoneme token in a hypothesis (a
letter, BOS, SEP) is simply an error.

- word accuracy: the share of words whose hypothesis equals the reference exactly;
- phoneme error rate (PER): the sum over words of the Levenshtein distance (unit-cost substitutions,
  insertions, deletions) between hypothesis and reference, over the sum of the reference lengths. It can
  exceed 1 when hypotheses are longer than their references.

``after_sep`` reads the phonemes out of whole decoded sequences (``BOS letters SEP phonemes EOS``);
``after_prefix`` takes everything a decoder generated after its prefix, up to the first EOS or PAD.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from bench.g2p.data import EOS, PAD, SEP

IdSeqs = Sequence[Sequence[int]] | torch.Tensor


def as_lists(seqs: IdSeqs, lengths: torch.Tensor | Sequence[int] | None = None) -> list[list[int]]:
    """N id lists from lists (``lengths`` optional, cuts each) or a ``(N, T)`` tensor (``lengths`` required)."""
    if isinstance(seqs, torch.Tensor):
        if seqs.ndim != 2 or lengths is None:
            raise ValueError("a tensor of sequences must be (N, T) and come with (N,) lengths")
        rows = seqs.tolist()
    else:
        rows = [s.tolist() if isinstance(s, torch.Tensor) else list(s) for s in seqs]
    if lengths is None:
        return rows
    ns = lengths.tolist() if isinstance(lengths, torch.Tensor) else list(lengths)
    if len(ns) != len(rows):
        raise ValueError(f"{len(rows)} sequences but {len(ns)} lengths")
    return [row[:n] for row, n in zip(rows, ns, strict=True)]


def edit_distance(a: Sequence[int], b: Sequence[int]) -> int:
    """Levenshtein distance (unit costs) between two id sequences; O(len(a) * len(b)) time, O(len(b)) memory."""
    if len(a) < len(b):
        a, b = b, a
    if not b:
        return len(a)
    if list(a) == list(b):
        return 0
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        left = i
        for j, y in enumerate(b, 1):
            left = min(prev[j] + 1, left + 1, prev[j - 1] + (x != y))
            cur.append(left)
        prev = cur
    return prev[-1]


@dataclass(frozen=True)
class G2PScore:
    """Scores of N words: ``word_accuracy`` and ``per`` in [0, 1] (PER can exceed 1), ``words`` = N,
    ``correct`` exact matches, ``edits`` summed edit distances, ``ref_phones`` summed reference lengths."""

    word_accuracy: float
    per: float
    words: int
    correct: int
    edits: int
    ref_phones: int


def score(hyps: IdSeqs, refs: IdSeqs, hyp_lengths: torch.Tensor | Sequence[int] | None = None,
          ref_lengths: torch.Tensor | Sequence[int] | None = None) -> G2PScore:
    """Word accuracy and PER of N hypotheses against N references (see ``as_lists`` for the forms)."""
    h, r = as_lists(hyps, hyp_lengths), as_lists(refs, ref_lengths)
    if len(h) != len(r):
        raise ValueError(f"{len(h)} hypotheses but {len(r)} references")
    if not r:
        raise ValueError("no words to score")
    ref_phones = sum(map(len, r))
    if ref_phones == 0:
        raise ValueError("the references hold no phonemes")
    correct = sum(a == b for a, b in zip(h, r, strict=True))
    edits = sum(edit_distance(a, b) for a, b in zip(h, r, strict=True))
    return G2PScore(correct / len(r), edits / ref_phones, len(r), correct, edits, ref_phones)


def word_accuracy(hyps: IdSeqs, refs: IdSeqs, hyp_lengths: torch.Tensor | Sequence[int] | None = None,
                  ref_lengths: torch.Tensor | Sequence[int] | None = None) -> float:
    """Share of the N hypotheses equal to their reference."""
    return score(hyps, refs, hyp_lengths, ref_lengths).word_accuracy


def phoneme_error_rate(hyps: IdSeqs, refs: IdSeqs, hyp_lengths: torch.Tensor | Sequence[int] | None = None,
                       ref_lengths: torch.Tensor | Sequence[int] | None = None) -> float:
    """Summed edit distances of the N hypotheses over the summed lengths of the N references."""
    return score(hyps, refs, hyp_lengths, ref_lengths).per


def _until_end(ids: list[int]) -> list[int]:
    """The ids before the first EOS or PAD."""
    for i, t in enumerate(ids):
        if t in (EOS, PAD):
            return ids[:i]
    return ids


def after_sep(seqs: IdSeqs) -> list[list[int]]:
    """Phoneme ids of N decoded sequences ``(N, T)``: the tokens after the first SEP up to the first EOS or PAD
    after it; a sequence without SEP yields no phonemes."""
    rows = as_lists(seqs, [seqs.shape[1]] * len(seqs)) if isinstance(seqs, torch.Tensor) else as_lists(seqs)
    return [_until_end(row[row.index(SEP) + 1:]) if SEP in row else [] for row in rows]


def after_prefix(seqs: IdSeqs, starts: int | torch.Tensor | Sequence[int]) -> list[list[int]]:
    """What a decoder generated: for each of N sequences ``(N, T)``, the tokens from column ``starts`` (one int
    for all, e.g. the padded prefix width, or N ints) up to the first EOS or PAD. No SEP handling."""
    rows = as_lists(seqs, [seqs.shape[1]] * len(seqs)) if isinstance(seqs, torch.Tensor) else as_lists(seqs)
    if isinstance(starts, int):
        begin = [starts] * len(rows)
    else:
        begin = starts.tolist() if isinstance(starts, torch.Tensor) else list(starts)
    if len(begin) != len(rows):
        raise ValueError(f"{len(rows)} sequences but {len(begin)} starts")
    return [_until_end(row[s:]) for row, s in zip(rows, begin, strict=True)]
