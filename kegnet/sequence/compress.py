"""Compressing a decoder Transformer: fewer blocks, truncated SVD of the blocks' Linear layers, and a factorized
embedding.

A shallower student (``student_layers``) keeps that many of the teacher's blocks, evenly spaced with the first
and the last kept (DistilBERT's every-other-layer initialization, generalized): decoding cost on small models is
per block, so depth is the lever for speed, while SVD alone saves parameters but adds a call per layer.

The Linear layers go through the classifier machinery (``plan_compression`` / ``apply_plan`` with the rank
methods of ``CompressionConfig``), named explicitly: by default ``DEFAULT_LAYERS``, the attention and MLP
projections of every block, never the output head. The token embedding ``tok_emb`` (V, d) becomes a
``FactorizedEmbedding`` A (V, r) · B (r, d) when an ``embedding_rank`` is given; a tied head then computes its
logits through the factors.

With ``rank_method: ratio`` the target is for the whole model, embedding included: blocks are dropped and the
embedding is factorized first, and the Linear ranks are solved for what is left of the target (see
``compress_sequence_model``); when the dropped blocks alone reach it, no layer is factorized.
"""

from __future__ import annotations

import copy
import logging
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 - the conventional name
from torch import nn

from kegnet.compression import CompressionPlan, apply_plan, plan_compression
from kegnet.compression.plan import blas_threads
from kegnet.config import CompressionConfig
from kegnet.errors import CompressionError
from kegnet.metrics import count_parameters

log = logging.getLogger(__name__)

EMBEDDING = "tok_emb"
BLOCKS = "blocks"
DEFAULT_LAYERS = ["blocks.*.attn.qkv", "blocks.*.attn.proj", "blocks.*.mlp.fc", "blocks.*.mlp.proj"]


class FactorizedEmbedding(nn.Module):
    """Token embedding of rank ``r``: row ``A[token]`` (r) mapped by ``B`` (r, d), so ``E = A · B`` (V, d).

    Keys: ``a`` (V, r), ``b`` (r, d). Shapes: ``(B, T) -> (B, T, d)``; ``logits``: ``(..., d) -> (..., V)``
    computed as ``(h · Bᵀ) · Aᵀ``, never forming ``A · B``. Parameters: ``r (V + d)`` instead of ``V d``.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, rank: int) -> None:
        super().__init__()
        if not 1 <= rank <= min(num_embeddings, embedding_dim):
            raise ValueError(f"embedding rank must be in 1..{min(num_embeddings, embedding_dim)} "
                             f"(min of vocabulary and width), got {rank}")
        self.num_embeddings, self.embedding_dim, self.rank = num_embeddings, embedding_dim, rank
        self.a = nn.Parameter(torch.empty(num_embeddings, rank))
        self.b = nn.Parameter(torch.empty(rank, embedding_dim))
        # Each factor N(0, 0.02 / sqrt(r)): the product's entries then have the std 0.02 of a GPT embedding.
        std = math.sqrt(0.02 / math.sqrt(rank))
        nn.init.normal_(self.a, std=std)
        nn.init.normal_(self.b, std=std)

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, rank: int) -> FactorizedEmbedding:
        """Truncated SVD of ``emb.weight`` (V, d) = U S Vᵀ: ``A = U_r √S_r``, ``B = √S_r V_rᵀ``; exact at
        ``rank = min(V, d)``. Computed in float64, stored in the embedding's dtype and device."""
        weight = emb.weight
        layer = cls(emb.num_embeddings, emb.embedding_dim, rank).to(device=weight.device, dtype=weight.dtype)
        with blas_threads():
            u, s, vh = np.linalg.svd(weight.detach().cpu().double().numpy(), full_matrices=False)
        root = np.sqrt(s[:rank])
        with torch.no_grad():
            layer.a.copy_(torch.from_numpy(np.ascontiguousarray(u[:, :rank] * root[None, :])))
            layer.b.copy_(torch.from_numpy(np.ascontiguousarray(root[:, None] * vh[:rank])))
        return layer

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.embedding(tokens, self.a) @ self.b

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return (h @ self.b.T) @ self.a.T


def compress_sequence_model(model: nn.Module, config: CompressionConfig, *, embedding_rank: int | None,
                            seed: int, student_layers: int | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """A compressed copy of ``model`` (left as it is) and a report of what was done.

    Depth: ``student_layers`` of the model's blocks are kept (``block_indices``; ``None``: all). Layers:
    ``config.layers`` when given, else ``DEFAULT_LAYERS``; ranks by ``config.rank_method``. The token
    embedding ``model.tok_emb`` is factorized at ``embedding_rank`` (``None``: kept). With ``rank_method:
    ratio``, ``config.ratio`` (``target_ratio`` or its default) is parameters(model) / parameters(student) for
    the whole model: the dropped blocks' and the embedding's savings are counted first and the Linear ranks
    are solved for the remaining ratio. When the dropped blocks reach the target, no layer is factorized; an
    ``embedding_rank`` that alone already exceeds it is refused (raise it or the target). ``seed`` is passed
    to ``apply_plan`` (SVD itself is deterministic).

    Report (JSON-ready): ``params_before``, ``params_after``, ``ratio``, ``rank_method``, ``target_ratio``
    (``None`` unless ratio), ``blocks`` (``{kept, of}``: the teacher's block indices kept, or ``None``),
    ``embedding`` (``{rank, params_before, params_after}`` or ``None``), ``layers`` (name -> ``{rank,
    params_before, params_after}``, names in the student's block numbering), ``skipped`` (name -> why),
    ``plan`` (``CompressionPlan.to_dict()``, for ``compressed_structure``). Raises ``CompressionError``.
    """
    before = count_parameters(model)
    # The student trains whole (embeddings, LayerNorms, kept dense layers), even when the teacher is frozen.
    student = copy.deepcopy(model).requires_grad_(True)
    blocks = None if student_layers is None else _drop_blocks(student, student_layers)
    embedding = None
    if embedding_rank is not None:
        embedding = _factorize_embedding(student, embedding_rank)
    layers_config = config.model_copy(update={"layers": list(config.layers or DEFAULT_LAYERS)})
    plan = CompressionPlan()  # stays empty when the dropped blocks already reach the target
    if config.rank_method != "ratio":
        plan = plan_compression(student, layers_config)
    else:
        # plan_compression measures the ratio against the model it is given (here, already shallower and with
        # the embedding factorized); ask it for what remains of the whole-model target.
        remaining = config.ratio * count_parameters(student) / before
        if remaining > 1.0:
            plan = plan_compression(student, layers_config.model_copy(update={"target_ratio": remaining}))
        elif blocks is None:
            raise CompressionError(
                f"embedding_rank {embedding_rank} alone makes the model {before / count_parameters(student):.2f}x "
                f"smaller, beyond target_ratio {config.ratio:g}; raise embedding_rank or target_ratio"
            )
        else:
            log.info("%d of %d blocks already make the model %.2fx smaller (target %.2fx): no SVD", student_layers,
                     blocks["of"], before / count_parameters(student), config.ratio)
    student = apply_plan(student, plan, n_iter_max=config.n_iter_max, seed=seed)
    after = count_parameters(student)
    report: dict[str, Any] = {
        "params_before": before, "params_after": after, "ratio": before / after,
        "rank_method": config.rank_method,
        "target_ratio": config.ratio if config.rank_method == "ratio" else None,
        "blocks": blocks,
        "embedding": embedding,
        "layers": {p.name: {"rank": p.in_rank, "params_before": p.params_before, "params_after": p.params_after}
                   for p in plan.layers},
        "skipped": dict(plan.skipped),
        "plan": plan.to_dict(),
    }
    log.info("compressed %d -> %d parameters (%.2fx): blocks %s, %d linear layers, embedding rank %s", before,
             after, before / after, "all" if blocks is None else blocks["kept"], len(plan.layers), embedding_rank)
    return student, report


def compressed_structure(model: nn.Module, report: dict[str, Any]) -> nn.Module:
    """A copy of ``model`` with the structure ``report`` describes and uninitialized factors, to load a saved
    compressed model's state dict into."""
    student = copy.deepcopy(model)
    if report.get("blocks"):
        _keep(student, report["blocks"]["kept"])
    if report.get("embedding"):
        emb = _token_embedding(student)
        setattr(student, EMBEDDING, FactorizedEmbedding(emb.num_embeddings, emb.embedding_dim,
                                                        report["embedding"]["rank"]).to(emb.weight.device))
    return apply_plan(student, CompressionPlan.from_dict(report["plan"]), initialize=False)


def block_indices(total: int, keep: int) -> list[int]:
    """The ``keep`` of ``total`` blocks a shallower student starts from: evenly spaced, the first and the last
    always (``keep == 1``: the first, which reads the embeddings the student keeps). Distinct and increasing
    for ``1 <= keep <= total``."""
    if keep == 1:
        return [0]
    return [round(i * (total - 1) / (keep - 1)) for i in range(keep)]


def check_student_layers(model: nn.Module, keep: int | None) -> None:
    """Raise ``CompressionError`` unless ``keep`` is ``None`` or a block count ``model`` can be cut to (the API
    calls this before queueing a job, so the mistake is a 422, not a failed job)."""
    if keep is None:
        return
    blocks = getattr(model, BLOCKS, None)
    if not isinstance(blocks, nn.ModuleList):
        raise CompressionError(f"student_layers needs the model's blocks in {BLOCKS!r} (an nn.ModuleList, as in the "
                               "'transformer' architecture); this model has none")
    total = len(blocks)
    if isinstance(keep, bool) or not isinstance(keep, int) or not 1 <= keep <= total:
        raise CompressionError(f"student_layers must be an integer in 1..{total} (the teacher's blocks), got "
                               f"{keep!r}; leave it unset to keep every block")


def _drop_blocks(student: nn.Module, keep: int) -> dict[str, Any]:
    """Keep ``block_indices(len(student.blocks), keep)`` of ``student.blocks``, in place; returns the report
    entry ``{kept, of}``."""
    check_student_layers(student, keep)
    total = len(getattr(student, BLOCKS))
    kept = block_indices(total, keep)
    _keep(student, kept)
    return {"kept": kept, "of": total}


def _keep(student: nn.Module, kept: list[int]) -> None:
    blocks = getattr(student, BLOCKS)
    setattr(student, BLOCKS, nn.ModuleList(blocks[i] for i in kept))
    if hasattr(student, "n_layers"):  # the transformer's own record of its depth (new_cache reads the blocks)
        student.n_layers = len(kept)


def _token_embedding(model: nn.Module) -> nn.Embedding:
    emb = getattr(model, EMBEDDING, None)
    if not isinstance(emb, nn.Embedding):
        raise CompressionError(f"embedding_rank needs the token embedding {EMBEDDING!r} (an nn.Embedding, as in "
                               "the 'transformer' architecture); this model has none")
    return emb


def _factorize_embedding(student: nn.Module, rank: int) -> dict[str, int]:
    """Replace ``student.tok_emb`` by its rank-``rank`` SVD, in place; returns its report entry."""
    emb = _token_embedding(student)
    full = min(emb.num_embeddings, emb.embedding_dim)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= full:
        raise CompressionError(f"embedding_rank must be an integer in 1..{full} (min of vocabulary "
                               f"{emb.num_embeddings} and width {emb.embedding_dim}), got {rank!r}")
    factorized = FactorizedEmbedding.from_embedding(emb, rank)
    entry = {"rank": rank, "params_before": emb.weight.numel(), "params_after": count_parameters(factorized)}
    if entry["params_after"] >= entry["params_before"]:
        log.warning("embedding rank %d does not reduce the embedding's %d parameters (%d after)", rank,
                    entry["params_before"], entry["params_after"])
    setattr(student, EMBEDDING, factorized)
    return entry
