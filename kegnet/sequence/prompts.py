"""Prompts for a sequence model, cut from its own samples (sequence-level targets and model selection)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kegnet.sequence.generate import Sequences
from kegnet.spec import SequenceSpec


@dataclass
class Prompts:
    """Prompts cut from teacher samples, right-padded: ``tokens (N, P)``, ``lengths (N,)``."""

    tokens: torch.Tensor
    lengths: torch.Tensor


def cut_prompts(samples: Sequences, tokens: SequenceSpec, rng: torch.Generator) -> Prompts:
    """Prompts from sampled sequences: up to and including the first ``sep_id`` when the spec has one and the
    sample contains it; else a uniformly random cut after BOS (at least one token of the sample is kept
    when there is one). Shapes: ``(N, L) -> (N, P)``, ``P`` the longest prompt."""
    seqs, lengths = samples.tokens.cpu(), samples.lengths.cpu()
    n = len(seqs)
    # A random cut in 1..length-1 (the generated part, EOS excluded): the prompt keeps BOS at least.
    last = (lengths - 1).clamp(min=1)
    cut = 1 + (torch.rand(n, generator=rng) * last).long().clamp(max=last - 1)
    if tokens.sep_id is not None:
        is_sep = seqs == tokens.sep_id
        has_sep = is_sep.any(1)
        first_sep = is_sep.float().argmax(1)
        cut = torch.where(has_sep, first_sep + 1, cut)
    cut = cut.clamp(max=tokens.max_length - 1)  # something must be left to complete
    width = int(cut.max())
    out = torch.full((n, width), tokens.pad_id, dtype=torch.long)
    cols = torch.arange(width)
    keep = cols[None, :] < cut[:, None]
    out[keep] = seqs[:, :width][keep]
    return Prompts(out, cut)
