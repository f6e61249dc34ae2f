"""The Transformer's key-value cache: ``step`` against ``forward``, and decoding with the cache against without."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kegnet.compression.layers import LowRankLinear
from kegnet.config import CompressionConfig
from kegnet.models.transformer import DecoderTransformer, KVCache
from kegnet.sequence.compress import FactorizedEmbedding, compress_sequence_model
from kegnet.sequence.generate import beam_search, greedy_decode, pack_prefixes, sample_sequences

BOS, EOS, PAD = 0, 1, 2
VOCAB, MAX_LEN = 9, 16
IDS = {"bos_id": BOS, "eos_id": EOS, "pad_id": PAD}
CPU = torch.device("cpu")


def _model(tie: bool = True, seed: int = 0, std: float = 0.5, eos_bias: float | None = None) -> DecoderTransformer:
    """A small random decoder with large weights, so its next-token distributions are peaked (no near-ties
    between the best tokens that float rounding could flip); ``ln_f``'s bias leans towards EOS's output row so
    that rows end at varied lengths (the default ``eos_bias`` is picked for that: 1.0 tied, 0.5 untied)."""
    torch.manual_seed(seed)
    model = DecoderTransformer(VOCAB, MAX_LEN, n_layers=2, n_heads=2, d_model=16, tie_embeddings=tie)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=std)
        row = (model.tok_emb.weight if tie else model.head.weight)[EOS]
        bias = (1.0 if tie else 0.5) if eos_bias is None else eos_bias
        model.ln_f.bias.add_(bias * row / row.norm())
    return model.eval()


def _compressed(tie: bool = True) -> nn.Module:
    config = CompressionConfig(rank_method="fraction", rank_fraction=0.25, keep_slower=True)
    student, _ = compress_sequence_model(_model(tie), config, embedding_rank=4, seed=0)
    # The point of this case: the projections and the embedding really are the factorized modules.
    assert isinstance(student.blocks[0].attn.qkv, LowRankLinear)
    assert isinstance(student.blocks[0].attn.proj, LowRankLinear)
    assert isinstance(student.tok_emb, FactorizedEmbedding)
    return student.eval()


MODELS = {
    "tied": lambda: _model(tie=True),
    "untied": lambda: _model(tie=False),
    "compressed": lambda: _compressed(tie=True),
    "compressed-untied": lambda: _compressed(tie=False),
}


class Uncached(nn.Module):
    """The same model without ``new_cache`` / ``step``: decoding takes the full-prefix path."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(tokens)


class StepSpy(nn.Module):
    """Forwards to a cached model and records the width of every ``step`` and any full ``forward``."""

    def __init__(self, model: DecoderTransformer) -> None:
        super().__init__()
        self.model, self.steps, self.forwards = model, [], 0

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        self.forwards += 1
        return self.model(tokens)

    def new_cache(self, batch: int, **kwargs: object) -> KVCache:
        return self.model.new_cache(batch, **kwargs)

    def step(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        self.steps.append(tokens.shape)
        return self.model.step(tokens, cache)


def _tokens(b: int, t: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


def _prefixes() -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded prefixes of lengths 1 to 5, BOS first."""
    rows = [torch.tensor([BOS] + t.tolist()) for t in _tokens(6, 4, seed=3) % (VOCAB - 3) + 3]
    return pack_prefixes([r[:n] for r, n in zip(rows, (1, 3, 5, 2, 5, 1), strict=True)], PAD)


# ----------------------------------------------------------------------------------------------- the model


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_step_matches_forward_position_by_position(kind: str) -> None:
    model = MODELS[kind]()
    tokens = _tokens(3, MAX_LEN)
    with torch.no_grad():
        full = model(tokens)
        for splits in ([MAX_LEN], [1] * MAX_LEN, [5, 1, 1, 4, 5], [2, 7, 1, 6]):
            cache = model.new_cache(3)
            parts, start = [], 0
            for t in splits:
                parts.append(model.step(tokens[:, start: start + t], cache))
                start += t
                assert cache.lengths.tolist() == [start] * 3
            torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)


def test_forward_with_cache_is_step() -> None:
    model = _model()
    tokens = _tokens(2, 6)
    with torch.no_grad():
        a, b = model.new_cache(2), model.new_cache(2)
        torch.testing.assert_close(model(tokens, cache=a), model.step(tokens, b), rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["untied", "compressed"])
def test_rows_of_different_lengths(kind: str) -> None:
    """A right-padded prefill truncated to each row's length, then several tokens at once per row: each row's
    logits are those of its own sequence, the padding never seen."""
    model = MODELS[kind]()
    tokens = _tokens(4, 12, seed=5)
    lengths = torch.tensor([1, 4, 7, 3])
    with torch.no_grad():
        full = model(tokens)
        cache = model.new_cache(4, capacity=12)
        model.step(tokens[:, :7].masked_fill(torch.arange(7) >= lengths[:, None], PAD), cache)
        cache.truncate(lengths)
        new = torch.stack([tokens[r, n: n + 3] for r, n in enumerate(lengths.tolist())])
        out = model.step(new, cache)
        assert cache.lengths.tolist() == (lengths + 3).tolist()
        for r, n in enumerate(lengths.tolist()):
            torch.testing.assert_close(out[r], full[r, n: n + 3], rtol=1e-5, atol=1e-5)


def test_select_reorders_and_repeats_rows() -> None:
    model = _model(tie=False)
    tokens = _tokens(3, 8, seed=7)
    with torch.no_grad():
        full = model(tokens)
        cache = model.new_cache(3)
        model.step(tokens[:, :5], cache)
        index = torch.tensor([2, 0, 2])
        picked = cache.select(index)
        assert picked.batch_size == 3 and cache.batch_size == 3
        out = model.step(tokens[index, 5:], picked)
        torch.testing.assert_close(out, full[index, 5:], rtol=1e-5, atol=1e-5)
        # the original cache is untouched by the selection and the step on the copy
        torch.testing.assert_close(model.step(tokens[:, 5:], cache), full[:, 5:], rtol=1e-5, atol=1e-5)


def test_cache_bounds_and_state_dict() -> None:
    model = _model()
    keys = list(model.state_dict())
    with torch.no_grad():
        cache = model.new_cache(2, capacity=1000)
        assert cache.capacity == MAX_LEN  # never more than the position embedding covers
        assert len(cache.keys) == len(cache.values) == 2
        assert cache.keys[0].shape == (2, 2, MAX_LEN, 8)
        model.step(_tokens(2, MAX_LEN), cache)
        with pytest.raises(ValueError, match="max_length"):
            model.step(_tokens(2, 1), cache)
        small = model.new_cache(2, capacity=4)
        model.step(_tokens(2, 3), small)
        with pytest.raises(ValueError, match="capacity"):
            model.step(_tokens(2, 2), small)
        with pytest.raises(ValueError, match="rows"):
            model.step(_tokens(3, 1), small)
        with pytest.raises(ValueError, match="shorten"):
            small.truncate(4)
    assert list(model.state_dict()) == keys  # the cache lives outside the module


# ---------------------------------------------------------------------------------------------- decoding


def test_decoding_uses_the_cache() -> None:
    """One prefill, then one new token per row and step; never a full forward."""
    spy = StepSpy(_model())
    prefixes, lengths = _prefixes()
    greedy_decode(spy, prefixes, lengths, **IDS, max_length=MAX_LEN, device=CPU)
    assert spy.forwards == 0 and len(spy.steps) > 2
    assert spy.steps[0] == prefixes.shape and all(s[1] == 1 for s in spy.steps[1:])
    spy.steps.clear()
    beam_search(spy, prefixes, lengths, **IDS, max_length=MAX_LEN, device=CPU, beam_size=3)
    assert spy.forwards == 0 and spy.steps[0] == prefixes.shape  # one prefill per prefix, not per beam
    assert all(s[1] == 1 for s in spy.steps[1:])


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("batch_size", [1024, 4])
def test_greedy_same_with_and_without_cache(kind: str, batch_size: int) -> None:
    model = MODELS[kind]()
    prefixes, lengths = _prefixes()
    kw = {**IDS, "max_length": MAX_LEN, "device": CPU, "batch_size": batch_size}
    cached = greedy_decode(model, prefixes, lengths, **kw)
    plain = greedy_decode(Uncached(model), prefixes, lengths, **kw)
    for a, b in zip(cached, plain, strict=True):
        assert torch.equal(a, b)
    assert len(set(cached.lengths.tolist())) > 1  # EOS at different lengths: rows leave the cache at different steps


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize(("beam_size", "alpha", "num_return"), [(1, 0.0, 1), (3, 0.6, 2), (4, 1.0, 4)])
def test_beam_search_same_with_and_without_cache(kind: str, beam_size: int, alpha: float, num_return: int) -> None:
    model = MODELS[kind]()
    prefixes, lengths = _prefixes()
    kw = {**IDS, "max_length": MAX_LEN, "device": CPU, "beam_size": beam_size, "length_penalty": alpha,
          "num_return": num_return, "batch_size": 8}
    cached = beam_search(model, prefixes, lengths, **kw)
    plain = beam_search(Uncached(model), prefixes, lengths, **kw)
    for name in ("tokens", "lengths", "prefix_lengths"):
        assert torch.equal(getattr(cached, name), getattr(plain, name)), name
    for name in ("scores", "log_probs"):
        torch.testing.assert_close(getattr(cached, name), getattr(plain, name), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_sampling_same_with_and_without_cache(kind: str) -> None:
    model = MODELS[kind]()
    prefixes, lengths = _prefixes()
    kw = {**IDS, "max_length": MAX_LEN, "device": CPU, "prefixes": prefixes, "prefix_lengths": lengths,
          "batch_size": 16, "temperature": 1.3, "top_k": 6, "top_p": 0.95}
    cached = sample_sequences(model, 5, generator=torch.Generator().manual_seed(11), **kw)
    plain = sample_sequences(Uncached(model), 5, generator=torch.Generator().manual_seed(11), **kw)
    for a, b in zip(cached, plain, strict=True):
        assert torch.equal(a, b)
    assert len(set(cached.lengths.tolist())) > 1


def test_generation_past_the_models_length_fails_alike() -> None:
    """A decoding max_length beyond the model's context fails with the same error on both paths, and only once
    a row actually gets that long."""
    model = _model(std=0.02, eos_bias=0.0)  # near-uniform: rows rarely stop early
    prefixes = torch.full((2, 1), BOS)
    for m in (model, Uncached(model)):
        with pytest.raises(ValueError, match="outside 1..max_length"):
            greedy_decode(m, prefixes, **IDS, max_length=MAX_LEN + 5, device=CPU)
    short = greedy_decode(model, prefixes, **IDS, max_length=MAX_LEN + 1, device=CPU)  # last token: position 15
    assert torch.equal(short.tokens, greedy_decode(Uncached(model), prefixes, **IDS, max_length=MAX_LEN + 1,
                                                   device=CPU).tokens)


def test_training_mode_is_restored() -> None:
    model = _model().train()
    greedy_decode(model, torch.full((1, 1), BOS), **IDS, max_length=6, device=CPU)
    assert model.training
