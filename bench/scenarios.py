"""The benchmark scenarios: a teacher, its real test set, compression settings and the methods compared.

Real data appears only here, to score students; the pipeline's own model selection uses synthetic samples.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from bench.datasets import load_image_split, load_uci_split, shared_dir
from bench.teachers import uci_teacher
from kegnet import ModelSpec, load_teacher

# The paper's comparison rows: Tucker alone, Tucker + a noise baseline, Tucker + KegNet samples.
PAPER_METHODS = ["tucker-only", "gaussian", "uniform", "kegnet"]

LENET = ModelSpec(arch="lenet5", input_shape=(1, 32, 32), num_classes=10)
RESNET14 = ModelSpec(arch="resnet", input_shape=(1, 32, 32), num_classes=10)


@dataclass
class Scenario:
    teacher: Callable[[], tuple[nn.Module, ModelSpec]]
    test_set: Callable[[], tuple[torch.Tensor, torch.Tensor]]
    settings: dict[str, dict[str, Any]]  # setting name -> CompressionConfig fields
    methods: list[str] = field(default_factory=lambda: list(PAPER_METHODS))
    overrides: dict[str, Any] = field(default_factory=dict)  # PipelineConfig sections on top of "fast"
    about: str = ""


def _shared_teacher(file: str, spec: ModelSpec) -> Callable[[], tuple[nn.Module, ModelSpec]]:
    return lambda: (load_teacher(shared_dir() / "teachers" / file, spec), spec)


def _uci_teacher(name: str) -> Callable[[], tuple[nn.Module, ModelSpec]]:
    def build() -> tuple[nn.Module, ModelSpec]:
        path, spec = uci_teacher(name, seed=0)
        return load_teacher(path, spec), spec

    return build


def _explicit(rank: int) -> dict[str, Any]:
    return {"layers": ["*"], "rank_method": "explicit", "ranks": {"*": [rank, rank]}}


# The paper's Fashion/SVHN generator settings (its code: decoder depth 3, Adam 1e-2, beta 10 for Fashion).
_FASHION_GEN = {"lr": 1e-2, "beta": 10.0, "decoder_layers": 3}

SCENARIOS: dict[str, Scenario] = {
    "mnist": Scenario(
        teacher=_shared_teacher("kegnet-mnist-lenet5.pth.tar", LENET),
        test_set=lambda: load_image_split("mnist", "test"),
        settings={"3.62x": {"layers": ["conv3"]}, "4.10x": {"layers": ["conv2", "conv3"]}},
        about="the paper's LeNet-5 MNIST teacher, EVBMF Tucker-2 on conv3 / conv2+conv3",
    ),
    "fashion": Scenario(
        teacher=_shared_teacher("kegnet-fashion-resnet14.pth.tar", RESNET14),
        test_set=lambda: load_image_split("fashion-mnist", "test"),
        settings={"1.40x": {"layers": ["layers3.*.conv1"]}, "1.58x": {"layers": ["layers3.*.conv2"]}},
        overrides={"generator": _FASHION_GEN},
        about="the paper's ResNet-14 Fashion-MNIST teacher, EVBMF Tucker-2 on stage 3's conv1 / conv2 layers",
    ),
    "pendigits": Scenario(
        teacher=_uci_teacher("pendigits"),
        test_set=lambda: load_uci_split("pendigits", "test"),
        settings={"rank10": _explicit(10), "rank5": _explicit(5)},
        about="the paper's UCI MLP trained here on pendigits; every linear layer at rank 10 / 5 where it shrinks",
    ),
    # Whether the frozen teacher should run in eval mode or with batch statistics while the generators learn.
    "teacher-mode": Scenario(
        teacher=_shared_teacher("kegnet-fashion-resnet14.pth.tar", RESNET14),
        test_set=lambda: load_image_split("fashion-mnist", "test"),
        settings={"1.58x": {"layers": ["layers3.*.conv2"]}},
        methods=["kegnet:eval", "kegnet:train"],
        overrides={"generator": _FASHION_GEN},
        about="generators trained against an eval-mode teacher vs. one using batch statistics (the paper's code)",
    ),
}
