"""Compressing a decoder Transformer: exact at full rank, ratio targets met, smaller at lower ranks, reloadable."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from kegnet.compression import CompressionPlan, apply_plan, select_layers
from kegnet.compression.layers import LowRankLinear
from kegnet.compression.plan import _full_ranks, _layer_plan
from kegnet.config import CompressionConfig
from kegnet.errors import CompressionError
from kegnet.metrics import count_parameters
from kegnet.models.transformer import DecoderTransformer
from kegnet.sequence.compress import (
    DEFAULT_LAYERS,
    FactorizedEmbedding,
    block_indices,
    compress_sequence_model,
    compressed_structure,
)

V, L, D = 23, 12, 32


def _teacher(tie: bool = True, seed: int = 0, **kwargs: object) -> DecoderTransformer:
    torch.manual_seed(seed)
    spec = {"vocab_size": V, "max_length": L, "n_layers": 2, "n_heads": 4, "d_model": D} | kwargs
    return DecoderTransformer(**spec, tie_embeddings=tie).eval()


def _tokens(t: int = L, vocab: int = V) -> torch.Tensor:
    return torch.randint(0, vocab, (3, t), generator=torch.Generator().manual_seed(7))


def _max_diff(a: nn.Module, b: nn.Module, tokens: torch.Tensor) -> float:
    with torch.no_grad():
        return (a(tokens) - b(tokens)).abs().max().item()


@pytest.mark.parametrize("embedding", [False, True], ids=["linears", "linears+embedding"])
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_full_rank_svd_reproduces_the_teacher(tie: bool, embedding: bool) -> None:
    # Full rank never saves parameters, so plan_compression skips such layers: the plan is written out here.
    teacher = _teacher(tie)
    layers = select_layers(teacher, DEFAULT_LAYERS)
    plan = CompressionPlan([_layer_plan(n, m, *_full_ranks(m)) for n, m in layers.items()])
    student = apply_plan(teacher, plan)
    if embedding:
        student.tok_emb = FactorizedEmbedding.from_embedding(teacher.tok_emb, min(V, D))
    assert sum(isinstance(m, LowRankLinear) for m in student.modules()) == 8  # 4 per block
    assert _max_diff(student, teacher, _tokens()) < 1e-4


def _make_low_rank(model: DecoderTransformer, rank: int) -> None:
    """Project the embedding and the blocks' Linear weights onto their top ``rank`` singular directions."""
    with torch.no_grad():
        for m in [model.tok_emb, *select_layers(model, DEFAULT_LAYERS).values()]:
            u, s, vh = torch.linalg.svd(m.weight.double(), full_matrices=False)
            m.weight.copy_((u[:, :rank] * s[:rank]) @ vh[:rank])


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_rank_r_svd_of_a_rank_r_teacher_is_exact_end_to_end(tie: bool) -> None:
    teacher = _teacher(tie)
    _make_low_rank(teacher, 6)
    config = CompressionConfig(rank_method="explicit", ranks={"blocks.*": (6, 6)})
    student, report = compress_sequence_model(teacher, config, embedding_rank=6, seed=0)
    assert isinstance(student.tok_emb, FactorizedEmbedding) and student.tok_emb.rank == 6
    assert {v["rank"] for v in report["layers"].values()} == {6} and len(report["layers"]) == 8
    assert report["params_after"] < report["params_before"] == count_parameters(teacher)
    assert _max_diff(student, teacher, _tokens()) < 1e-4
    assert not isinstance(teacher.tok_emb, FactorizedEmbedding)  # the teacher is left as it was


def test_tied_logits_go_through_the_factors() -> None:
    torch.manual_seed(0)
    emb = FactorizedEmbedding(V, D, 5)
    h = torch.randn(2, 3, D)
    full = emb.a @ emb.b  # (V, d), formed here only to check
    assert torch.allclose(emb.logits(h), h @ full.T, atol=1e-6)
    assert torch.allclose(emb(_tokens(4)), full[_tokens(4)], atol=1e-6)
    assert sorted(emb.state_dict()) == ["a", "b"] and emb.a.shape == (V, 5) and emb.b.shape == (5, D)


@pytest.mark.parametrize("embedding_rank", [None, 8], ids=["linears", "linears+embedding"])
@pytest.mark.parametrize("target", [2.0, 3.5])
def test_ratio_target_is_met_for_the_whole_model(target: float, embedding_rank: int | None) -> None:
    # A larger vocabulary so that the embedding is a real share of the model.
    teacher = _teacher(vocab_size=200, d_model=64, max_length=16)
    config = CompressionConfig(rank_method="ratio", target_ratio=target)
    student, report = compress_sequence_model(teacher, config, embedding_rank=embedding_rank, seed=0)
    ratio = count_parameters(teacher) / count_parameters(student)
    assert ratio == pytest.approx(report["ratio"]) and report["target_ratio"] == target
    assert target <= ratio <= target * 1.05
    assert (report["embedding"] is not None) == (embedding_rank is not None)
    assert len(report["layers"]) == 8


def test_every_student_parameter_trains_even_from_a_frozen_teacher() -> None:
    teacher = _teacher().requires_grad_(False)  # as the pipeline holds it
    student, _ = compress_sequence_model(teacher, CompressionConfig(rank_method="fraction", rank_fraction=0.5),
                                         embedding_rank=8, seed=0)
    assert all(p.requires_grad for p in student.parameters())
    assert not any(p.requires_grad for p in teacher.parameters())


def test_lower_ranks_give_fewer_parameters() -> None:
    teacher = _teacher()
    sizes = []
    for fraction, embedding_rank in [(0.5, 16), (0.5, 8), (0.25, 8), (0.125, 4)]:
        config = CompressionConfig(rank_method="fraction", rank_fraction=fraction)
        _, report = compress_sequence_model(teacher, config, embedding_rank=embedding_rank, seed=0)
        sizes.append(report["params_after"])
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == len(sizes)


def test_compressed_model_runs_full_length_and_reloads_from_its_report() -> None:
    teacher = _teacher(tie=False)
    config = CompressionConfig(rank_method="fraction", rank_fraction=0.25)
    student, report = compress_sequence_model(teacher, config, embedding_rank=4, seed=0)
    tokens = _tokens(L)
    assert student(tokens).shape == (3, L, V)
    with pytest.raises(ValueError, match="outside 1..max_length"):
        student(_tokens(L + 1))
    report = json.loads(json.dumps(report))  # as written to and read back from a manifest
    rebuilt = compressed_structure(teacher, report)
    rebuilt.load_state_dict(student.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(rebuilt(tokens), student(tokens))
    assert "head" not in report["layers"]  # the output head is not factorized by default


def test_evbmf_ranks_are_recorded() -> None:
    teacher = _teacher()
    _make_low_rank(teacher, 3)
    _, report = compress_sequence_model(teacher, CompressionConfig(rank_method="evbmf"), embedding_rank=None, seed=0)
    assert report["embedding"] is None and report["rank_method"] == "evbmf"
    assert all(1 <= v["rank"] < D for v in report["layers"].values())
    assert np.isclose(report["ratio"], report["params_before"] / report["params_after"])


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"embedding_rank": 0}, r"embedding_rank must be an integer in 1\.\.23 \(min of vocabulary 23 and width 32\)"),
    ({"embedding_rank": 24}, r"embedding_rank must be an integer in 1\.\.23"),
    ({"embedding_rank": 1, "config": CompressionConfig(rank_method="ratio", target_ratio=1.01)},
     r"embedding_rank 1 alone makes the model .*x smaller, beyond target_ratio 1.01"),
    ({"embedding_rank": None, "config": CompressionConfig(rank_method="ratio", target_ratio=500)},
     "target ratio 500.*out of reach"),
    ({"embedding_rank": None, "config": CompressionConfig(layers=["blocks.*.nope"])}, "matches no Conv2d or Linear"),
])
def test_impossible_requests_are_refused_with_the_reason(kwargs: dict, match: str) -> None:
    config = kwargs.pop("config", CompressionConfig(rank_method="fraction", rank_fraction=0.5))
    with pytest.raises(CompressionError, match=match):
        compress_sequence_model(_teacher(), config, seed=0, **kwargs)


@pytest.mark.parametrize(("total", "keep", "expected"), [
    (3, 1, [0]), (3, 2, [0, 2]), (3, 3, [0, 1, 2]), (5, 4, [0, 1, 3, 4]), (12, 4, [0, 4, 7, 11]),
])
def test_a_shallower_student_keeps_evenly_spaced_blocks(total: int, keep: int, expected: list[int]) -> None:
    assert block_indices(total, keep) == expected


def test_a_shallower_student_is_the_kept_blocks_of_the_teacher() -> None:
    teacher = _teacher(n_layers=3)
    config = CompressionConfig(rank_method="fraction", rank_fraction=0.25)
    student, report = compress_sequence_model(teacher, config, embedding_rank=None, seed=0, student_layers=2)
    assert report["blocks"] == {"kept": [0, 2], "of": 3}
    assert len(student.blocks) == student.n_layers == 2 and len(teacher.blocks) == 3  # the teacher is untouched
    # Names in the report follow the student's numbering; untouched tensors are the kept teacher blocks'.
    assert set(report["layers"]) == {f"blocks.{i}.{n}" for i in (0, 1) for n in
                                     ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")}
    assert torch.equal(student.blocks[1].ln1.weight, teacher.blocks[2].ln1.weight)
    # Decoding through the cache needs one buffer per kept block, and the model reloads from its report.
    tokens = _tokens(L)
    with torch.no_grad():
        cache = student.new_cache(3)
        assert len(cache.keys) == 2
        assert torch.allclose(student.step(tokens, cache), student(tokens), atol=1e-5)
    rebuilt = compressed_structure(teacher, json.loads(json.dumps(report)))
    rebuilt.load_state_dict(student.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(rebuilt(tokens), student(tokens))


def test_depth_counts_toward_the_ratio_target() -> None:
    teacher = _teacher(n_layers=4, vocab_size=64)
    before = count_parameters(teacher)
    # Half the blocks alone are about 1.9x here: a 3x target still needs SVD, a 1.5x target none.
    for target, factorized in [(3.0, True), (1.5, False)]:
        config = CompressionConfig(rank_method="ratio", target_ratio=target)
        student, report = compress_sequence_model(teacher, config, embedding_rank=None, seed=0, student_layers=2)
        assert (len(report["layers"]) > 0) == factorized
        assert before / count_parameters(student) >= target
    assert before / count_parameters(student) < 2.2  # no SVD: only the dropped blocks


@pytest.mark.parametrize("keep", [0, 3, True])
def test_student_layers_outside_the_teacher_are_refused(keep: object) -> None:
    with pytest.raises(CompressionError, match=r"student_layers must be an integer in 1\.\.2 \(the teacher's blocks\)"):
        compress_sequence_model(_teacher(), CompressionConfig(), embedding_rank=None, seed=0, student_layers=keep)


def test_embedding_rank_needs_a_token_embedding() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    with pytest.raises(CompressionError, match="needs the token embedding 'tok_emb'"):
        compress_sequence_model(model, CompressionConfig(layers=["0"]), embedding_rank=2, seed=0)
