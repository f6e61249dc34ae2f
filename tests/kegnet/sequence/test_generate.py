"""Decoding checked against brute force on a tiny causal model: 5 tokens (BOS, EOS, PAD, two content tokens)."""

from __future__ import annotations

import itertools
import math
from collections import Counter

import pytest
import torch
from torch import nn

from kegnet.sequence.generate import (
    beam_search,
    diversity,
    filter_logits,
    greedy_decode,
    pack_prefixes,
    sample_sequences,
    sequence_log_probs,
)

BOS, EOS, PAD, A, B = 0, 1, 2, 3, 4
VOCAB, MAX_LEN = 5, 5
IDS = {"bos_id": BOS, "eos_id": EOS, "pad_id": PAD}
CPU = torch.device("cpu")


class ToyLM(nn.Module):
    """A seeded GRU language model: causal, and its logits depend on the whole prefix. Shapes: (B, T) -> (B, T, V)."""

    def __init__(self, seed: int = 0, eos_bias: float = 0.0, hidden: int = 8) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, hidden)
        self.gru = nn.GRU(hidden, hidden, batch_first=True)
        self.out = nn.Linear(hidden, VOCAB)
        self.eos_bias = eos_bias
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h, _ = self.gru(self.emb(tokens))
        logits = self.out(h)
        logits[..., EOS] += self.eos_bias  # steers towards (or away from) short hypotheses
        return logits


def step_log_probs(model: nn.Module, prefix: list[int]) -> torch.Tensor:
    """Reference next-token log-probabilities, BOS and PAD banned. Shapes: prefix (T,) -> (V,)."""
    with torch.no_grad():
        logits = model(torch.tensor([prefix]))[0, -1].double()
    logits[[BOS, PAD]] = -math.inf
    return torch.log_softmax(logits, dim=-1)


def hypotheses(prefix: list[int], max_length: int = MAX_LEN) -> list[list[int]]:
    """Every full sequence decoding can produce from ``prefix``: content then EOS, or content up to max_length."""
    free = max_length - len(prefix)
    out = [prefix + list(c) + [EOS] for size in range(free) for c in itertools.product((A, B), repeat=size)]
    return out + [prefix + list(c) for c in itertools.product((A, B), repeat=free)]


def log_prob(model: nn.Module, seq: list[int], prefix_len: int) -> float:
    return sum(float(step_log_probs(model, seq[:t])[seq[t]]) for t in range(prefix_len, len(seq)))


def brute_force(model: nn.Module, prefix: list[int], alpha: float) -> list[tuple[float, list[int]]]:
    """All hypotheses with their GNMT-normalised scores, best first."""
    scored = []
    for seq in hypotheses(prefix):
        gen = len(seq) - len(prefix)
        scored.append((log_prob(model, seq, len(prefix)) / ((5 + gen) / 6) ** alpha, seq))
    return sorted(scored, key=lambda s: -s[0])


def rows(tokens: torch.Tensor, lengths: torch.Tensor) -> list[list[int]]:
    return [t[: int(n)].tolist() for t, n in zip(tokens, lengths, strict=True)]


def variable_prefixes() -> tuple[torch.Tensor, torch.Tensor, list[list[int]]]:
    alone = [[BOS], [BOS, A, B], [BOS, B], [BOS, B, B, A]]
    tokens, lengths = pack_prefixes([torch.tensor(p) for p in alone], PAD)
    return tokens, lengths, alone


def test_filter_top_k_keeps_exactly_the_k_largest() -> None:
    logits = torch.tensor([[0.1, 2.0, -1.0, 1.5, 0.3], [3.0, 3.0, 3.0, 0.0, -2.0]])
    kept = torch.isfinite(filter_logits(logits, top_k=2))
    assert kept[0].tolist() == [False, True, False, True, False]
    assert kept.sum(1).tolist() == [2, 2]  # ties still keep exactly k
    assert torch.equal(filter_logits(logits, top_k=0), logits)
    assert torch.equal(filter_logits(logits, top_k=9), logits)


@pytest.mark.parametrize(("top_p", "expected"), [(0.3, {0}), (0.55, {0, 1}), (0.74, {0, 1}), (0.76, {0, 1, 2}),
                                                 (0.9, {0, 1, 2}), (0.96, {0, 1, 2, 3}), (1.0, {0, 1, 2, 3})])
def test_filter_top_p_keeps_the_smallest_set_reaching_p(top_p: float, expected: set[int]) -> None:
    probs = torch.tensor([0.5, 0.25, 0.2, 0.05])
    order = torch.tensor([2, 0, 3, 1])  # shuffled, so sorting matters
    kept = torch.isfinite(filter_logits(probs[order].log().unsqueeze(0), top_p=top_p))[0]
    assert {int(order[i]) for i in kept.nonzero().flatten()} == expected


def test_filter_top_p_stops_when_the_mass_reaches_p_exactly() -> None:
    uniform = torch.zeros(1, 4)  # probabilities exactly 1/4: the masses 1/2 and 3/4 are hit exactly
    assert torch.isfinite(filter_logits(uniform, top_p=0.5)).sum().item() == 2
    assert torch.isfinite(filter_logits(uniform, top_p=0.75)).sum().item() == 3


def test_filter_top_k_then_top_p_renormalises() -> None:
    logits = torch.tensor([[0.5, 0.25, 0.2, 0.05]]).log()
    # top-2 renormalised: 2/3, 1/3; p = 0.6 needs only the first.
    assert torch.isfinite(filter_logits(logits, top_k=2, top_p=0.6)).tolist() == [[True, False, False, False]]
    with pytest.raises(ValueError, match="top_p"):
        filter_logits(logits, top_p=0.0)


@pytest.mark.parametrize("alpha", [0.0, 0.6, 2.0])
@pytest.mark.parametrize(("seed", "eos_bias"), [(0, 0.0), (1, -3.0), (2, 1.0)])
def test_wide_beam_equals_exhaustive_search(alpha: float, seed: int, eos_bias: float) -> None:
    model = ToyLM(seed, eos_bias)
    expected = brute_force(model, [BOS], alpha)
    k = len(expected)  # 31 hypotheses: a beam this wide never drops one
    got = beam_search(model, torch.tensor([[BOS]]), beam_size=k, num_return=k, length_penalty=alpha,
                      max_length=MAX_LEN, device=CPU, **IDS)
    assert rows(got.tokens, got.lengths) == [seq for _, seq in expected]
    assert torch.allclose(got.scores, torch.tensor([s for s, _ in expected], dtype=torch.float64), atol=1e-5)
    raw = torch.tensor([log_prob(model, seq, 1) for _, seq in expected])
    assert torch.allclose(got.log_probs, raw, atol=1e-5)
    assert torch.equal(got.prefix_lengths, torch.ones(k, dtype=torch.long))


def test_beam_best_can_be_a_hypothesis_without_eos() -> None:
    model = ToyLM(1, eos_bias=-3.0)
    best_score, best = brute_force(model, [BOS], 1.0)[0]
    assert best[-1] != EOS and len(best) == MAX_LEN  # the case this test is about
    got = beam_search(model, torch.tensor([[BOS]]), beam_size=32, length_penalty=1.0, max_length=MAX_LEN,
                      device=CPU, **IDS)
    assert rows(got.tokens, got.lengths) == [best]
    assert got.scores.item() == pytest.approx(best_score, abs=1e-5)


@pytest.mark.parametrize("alpha", [0.0, 0.6])
@pytest.mark.parametrize("seed", [0, 3, 4])
def test_beam_of_one_is_greedy(alpha: float, seed: int) -> None:
    model = ToyLM(seed)
    prefixes, lengths, _ = variable_prefixes()
    greedy = greedy_decode(model, prefixes, lengths, max_length=7, device=CPU, **IDS)
    beam = beam_search(model, prefixes, lengths, beam_size=1, length_penalty=alpha, max_length=7, device=CPU, **IDS)
    assert rows(beam.tokens, beam.lengths) == rows(greedy.tokens, greedy.lengths)


def test_variable_length_prefixes_decode_as_each_alone() -> None:
    model = ToyLM(5)
    prefixes, lengths, alone = variable_prefixes()
    greedy = greedy_decode(model, prefixes, lengths, max_length=8, device=CPU, **IDS)
    beam = beam_search(model, prefixes, lengths, beam_size=3, num_return=2, max_length=8, device=CPU, batch_size=6,
                       **IDS)  # two prefixes per chunk
    for i, p in enumerate(alone):
        one = greedy_decode(model, torch.tensor([p]), max_length=8, device=CPU, **IDS)
        assert rows(greedy.tokens[i: i + 1], greedy.lengths[i: i + 1]) == rows(one.tokens, one.lengths)
        solo = beam_search(model, torch.tensor([p]), beam_size=3, num_return=2, max_length=8, device=CPU, **IDS)
        assert rows(beam.tokens[2 * i: 2 * i + 2], beam.lengths[2 * i: 2 * i + 2]) == rows(solo.tokens, solo.lengths)
        assert torch.allclose(beam.scores[2 * i: 2 * i + 2], solo.scores)
    assert greedy.prefix_lengths.tolist() == [len(p) for p in alone]
    for seq, n, pl in zip(greedy.tokens, greedy.lengths, greedy.prefix_lengths, strict=True):
        assert (seq[n:] == PAD).all() and (seq[pl:n - 1] != EOS).all()


def test_sampling_with_top_k_one_is_greedy() -> None:
    model = ToyLM(6)
    prefixes, lengths, _ = variable_prefixes()
    greedy = greedy_decode(model, prefixes, lengths, max_length=7, device=CPU, **IDS)
    sampled = sample_sequences(model, 3, prefixes=prefixes, prefix_lengths=lengths, top_k=1, max_length=7,
                               generator=torch.Generator().manual_seed(0), device=CPU, **IDS)
    expected = [r for r in rows(greedy.tokens, greedy.lengths) for _ in range(3)]  # prefix-major
    assert rows(sampled.tokens, sampled.lengths) == expected


def exact_distribution(model: nn.Module, temperature: float, top_k: int) -> dict[tuple[int, ...], float]:
    """Sequence probabilities under per-step tempered, top-k-truncated sampling, by enumeration."""
    out = {}
    for seq in hypotheses([BOS]):
        p = 1.0
        for t in range(1, len(seq)):
            logits = step_log_probs(model, seq[:t]) / temperature
            if top_k:
                logits[logits < logits.topk(top_k).values[-1]] = -math.inf
            p *= float(torch.softmax(logits, -1)[seq[t]])
        out[tuple(seq)] = p
    return out


@pytest.mark.parametrize(("temperature", "top_k"), [(1.0, 0), (0.7, 2)])
def test_samples_follow_the_exact_sequence_distribution(temperature: float, top_k: int) -> None:
    model = ToyLM(7)
    exact = exact_distribution(model, temperature, top_k)
    assert sum(exact.values()) == pytest.approx(1.0)
    n = 20_000
    got = sample_sequences(model, n, temperature=temperature, top_k=top_k, max_length=MAX_LEN,
                           generator=torch.Generator().manual_seed(1), device=CPU, batch_size=4096, **IDS)
    counts = Counter(tuple(r) for r in rows(got.tokens, got.lengths))
    assert set(counts) <= set(exact)
    tv = 0.5 * sum(abs(counts.get(s, 0) / n - p) for s, p in exact.items())
    assert tv < 0.03


def test_seeds_repeat_and_differ() -> None:
    model = ToyLM(8)

    def draw(seed: int) -> torch.Tensor:
        return sample_sequences(model, 64, max_length=MAX_LEN, generator=torch.Generator().manual_seed(seed),
                                device=CPU, **IDS).tokens

    assert torch.equal(draw(0), draw(0))
    first, other = draw(0), draw(1)
    assert first.shape != other.shape or not torch.equal(first, other)


def test_sequence_log_probs_match_reference_and_beam_scores() -> None:
    model = ToyLM(9)
    prefixes, lengths, _ = variable_prefixes()
    beam = beam_search(model, prefixes, lengths, beam_size=4, num_return=4, length_penalty=0.6, max_length=7,
                       device=CPU, **IDS)
    raw = sequence_log_probs(model, beam.tokens, beam.lengths, beam.prefix_lengths, device=CPU, **IDS)
    normed = sequence_log_probs(model, beam.tokens, beam.lengths, beam.prefix_lengths, length_penalty=0.6,
                                device=CPU, batch_size=5, **IDS)
    reference = [log_prob(model, seq, int(pl)) for seq, pl in
                 zip(rows(beam.tokens, beam.lengths), beam.prefix_lengths, strict=True)]
    assert torch.allclose(raw, torch.tensor(reference), atol=1e-5)
    assert torch.allclose(raw, beam.log_probs, atol=1e-5)
    assert torch.allclose(normed.double(), beam.scores, atol=1e-5)
    assert (beam.scores.view(4, 4).diff(dim=1) <= 0).all()  # best first within each prefix


def test_diversity_on_a_hand_made_set() -> None:
    pad = PAD
    tokens = torch.tensor([
        [BOS, A, B, A, B, EOS],  # generated: a b a b
        [BOS, A, B, EOS, pad, pad],  # a b
        [BOS, A, B, EOS, pad, pad],  # a duplicate
        [BOS, B, B, B, B, B],  # prefix "BOS b", then b b b b without EOS
    ])
    lengths = torch.tensor([6, 4, 4, 6])
    prefix_lengths = torch.tensor([1, 1, 1, 2])
    d = diversity(tokens, lengths, prefix_lengths, eos_id=EOS)
    # unigrams: abab ab ab bbbb -> 12 total, {a, b}; bigrams: ab ba ab | ab | ab | bb bb bb -> 8, {ab, ba, bb}
    # trigrams: aba bab | bbb bbb -> 4, 3 distinct; 4-grams: abab | bbbb -> 2, 2 distinct
    assert d.distinct == {1: 2 / 12, 2: 3 / 8, 3: 3 / 4, 4: 2 / 2}
    assert d.unique_fraction == pytest.approx(3 / 4)
    assert d.to_dict()["distinct_2"] == pytest.approx(3 / 8)
    assert diversity(tokens[1:3], lengths[1:3], prefix_lengths[1:3], eos_id=EOS).distinct[3] == 0.0


def test_mode_restored_outputs_trainable_and_bad_arguments_refused() -> None:
    model = ToyLM(10).train()
    out = sample_sequences(model, 4, max_length=MAX_LEN, generator=torch.Generator().manual_seed(0), device=CPU,
                           **IDS)
    assert model.training
    wide = torch.full((2, 9), PAD)  # padded past max_length: only the lengths matter
    wide[:, :2] = torch.tensor([[BOS, A], [BOS, B]])
    short = greedy_decode(model, wide, torch.tensor([2, 1]), max_length=MAX_LEN, device=CPU, **IDS)
    alone = greedy_decode(model, torch.tensor([[BOS]]), max_length=MAX_LEN, device=CPU, **IDS)
    assert rows(short.tokens[1:], short.lengths[1:]) == rows(alone.tokens, alone.lengths)
    nothing = sequence_log_probs(model, torch.tensor([[BOS]]), torch.tensor([1]), torch.tensor([1]), device=CPU,
                                 **IDS)
    assert nothing.tolist() == [0.0]
    model(out.tokens).sum().backward()  # not inference tensors: usable as training inputs
    with pytest.raises(ValueError, match="temperature"):
        sample_sequences(model, 4, temperature=0.0, max_length=MAX_LEN, generator=torch.Generator(), device=CPU,
                         **IDS)
    with pytest.raises(ValueError, match="max_length"):
        greedy_decode(model, torch.tensor([[BOS, A, A]]), max_length=3, device=CPU, **IDS)
    with pytest.raises(ValueError, match="num_return"):
        beam_search(model, torch.tensor([[BOS]]), beam_size=2, num_return=3, max_length=MAX_LEN, device=CPU, **IDS)
