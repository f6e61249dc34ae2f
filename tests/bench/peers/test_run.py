"""Each peer runs a few steps on a tiny teacher within its time and returns the pipeline's student structure."""

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from bench.peers.run import METHODS, build_student, kegnet_rows, train_peer
from kegnet import ModelSpec
from kegnet.compression import LowRankLinear, Tucker2Conv2d
from kegnet.metrics import count_parameters
from tests.bench.peers.conftest import config

SECONDS = 1.5
SLACK = 1.0  # one step past the deadline, and the clock's start


def _check(method: str, teacher: nn.Module, spec: ModelSpec, layers: list[str], kind: type[nn.Module]) -> None:
    cfg = config(layers)
    student = build_student(teacher, cfg, seed=0)
    before = copy.deepcopy(student.state_dict())
    reference = build_student(teacher, cfg, seed=0)
    result = train_peer(method, teacher, student, spec, SECONDS, batch_size=8, device=torch.device("cpu"), seed=0)
    assert result.method == method
    assert SECONDS <= result.seconds < SECONDS + SLACK
    assert result.steps["student"] > 0
    # The structure the pipeline would start from: same modules, same parameter count, factorized layers.
    assert [type(m) for m in student.modules()] == [type(m) for m in reference.modules()]
    assert count_parameters(student) == count_parameters(reference) < count_parameters(teacher)
    assert all(isinstance(student.get_submodule(name), kind) for name in layers)
    changed = any(not torch.equal(v, student.state_dict()[k]) for k, v in before.items())
    assert changed, "training moved no weight"
    assert not student.training
    assert all(p.requires_grad for p in teacher.parameters())  # the peer froze a copy, not the caller's teacher


@pytest.mark.parametrize("method", METHODS)
def test_peer_on_a_batchnorm_convnet(method: str, conv_teacher: nn.Module) -> None:
    spec = ModelSpec(arch="mlp", input_shape=(1, 8, 8), num_classes=3)
    _check(method, conv_teacher, spec, ["conv2"], Tucker2Conv2d)


@pytest.mark.parametrize("method", METHODS)
def test_peer_on_an_mlp(method: str, mlp_teacher: nn.Module) -> None:
    spec = ModelSpec(arch="mlp", input_shape=(6,), num_classes=4)
    _check(method, mlp_teacher, spec, ["2"], LowRankLinear)


def test_build_student_needs_the_plan_as_is(mlp_teacher: nn.Module) -> None:
    cfg = config(["2"])
    cfg = cfg.model_copy(update={"compression": cfg.compression.model_copy(update={"keep_slower": False})})
    with pytest.raises(ValueError, match="keep slower"):
        build_student(mlp_teacher, cfg, seed=0)


def test_unknown_peer_is_refused(mlp_teacher: nn.Module) -> None:
    spec = ModelSpec(arch="mlp", input_shape=(6,), num_classes=4)
    with pytest.raises(ValueError, match="unknown peer"):
        train_peer("nope", mlp_teacher, copy.deepcopy(mlp_teacher), spec, 1.0, batch_size=8,
                   device=torch.device("cpu"), seed=0)


def test_budgets_reuse_the_kegnet_rows_of_an_earlier_run(tmp_path: Path) -> None:
    earlier = tmp_path / "peers.json"
    earlier.write_text(json.dumps({"rows": [
        {"entry": "letter", "seed": 0, "kegnet": {"accuracy": 0.8, "seconds": 120.0}, "peers": {}},
        {"entry": "letter", "seed": 1, "peers": {}},  # a --seconds run: no KegNet row to reuse
    ]}))
    rows = kegnet_rows(earlier)
    assert rows == {("letter", 0): {"accuracy": 0.8, "seconds": 120.0, "from": str(earlier)}}
