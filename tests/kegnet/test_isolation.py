"""The validate stage's child process (kegnet/isolation.py): limits that hold, errors that say what to fix."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from kegnet import ClassifierConfig, ModelSpec, create_model, run_pipeline
from kegnet.errors import Cancelled, CheckpointError, KegnetError
from kegnet.isolation import Isolation, check_model_isolated
from kegnet.preflight import Limits
from tests.conftest import tiny_config

MIB = 1024 ** 2


def _teacher(tmp_path: Path, spec: ModelSpec) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "t.safetensors"
    save_file(create_model(spec.arch, **spec.model_arguments(), **spec.kwargs()).state_dict(), str(path))
    return path


def test_a_good_teacher_passes_and_its_spec_comes_back(tmp_path: Path, small_cnn_spec: ModelSpec) -> None:
    path = _teacher(tmp_path, small_cnn_spec)
    spec = check_model_isolated([path], small_cnn_spec, ClassifierConfig(), Limits(), Isolation(1024 * MIB, 120))
    assert spec == small_cnn_spec


def test_the_childs_error_keeps_its_class_and_message(tmp_path: Path, small_cnn_spec: ModelSpec) -> None:
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="the checkpoint file is empty"):
        check_model_isolated([empty], small_cnn_spec, ClassifierConfig(), Limits(), Isolation(1024 * MIB, 120))


def test_a_model_over_the_memory_limit_fails_with_a_message(tmp_path: Path) -> None:
    # 256 × 65,536 float weights are 64 MiB: over a 16 MiB budget, the child cannot even read them.
    spec = ModelSpec(arch="mlp", arch_kwargs={"hidden": [256]}, input_shape=(65_536,), num_classes=2)
    path = _teacher(tmp_path, spec)
    t0 = time.monotonic()
    with pytest.raises(KegnetError, match=r"(memory|limits)"):
        check_model_isolated([path], spec, ClassifierConfig(), Limits(), Isolation(16 * MIB, 120))
    assert time.monotonic() - t0 < 60


def test_the_time_limit_kills_the_child(tmp_path: Path, small_cnn_spec: ModelSpec) -> None:
    path = _teacher(tmp_path, small_cnn_spec)
    t0 = time.monotonic()
    with pytest.raises(KegnetError, match="took longer than 0 s, this service's limit"):
        check_model_isolated([path], small_cnn_spec, ClassifierConfig(), Limits(), Isolation(1024 * MIB, 0.3))
    assert time.monotonic() - t0 < 5


def test_cancel_kills_the_child_within_a_second(tmp_path: Path, small_cnn_spec: ModelSpec) -> None:
    path = _teacher(tmp_path, small_cnn_spec)
    t0 = time.monotonic()
    with pytest.raises(Cancelled):
        check_model_isolated([path], small_cnn_spec, ClassifierConfig(), Limits(), Isolation(1024 * MIB, 120),
                             should_cancel=lambda: time.monotonic() - t0 > 0.2)
    assert time.monotonic() - t0 < 1.5


def test_the_pipeline_validates_first_when_asked(tmp_path: Path, small_cnn_spec: ModelSpec) -> None:
    path = _teacher(tmp_path, small_cnn_spec)
    stages: list[str] = []
    result = run_pipeline(path, small_cnn_spec, tiny_config("tucker-only"), tmp_path / "out", device="cpu",
                          progress=lambda e: stages.append(e.stage), isolation=Isolation(1024 * MIB, 120))
    assert stages[0] == "validate" and list(result.report.timings_s)[0] == "validate"
    unlimited = run_pipeline(path, small_cnn_spec, tiny_config("tucker-only"), tmp_path / "out2", device="cpu")
    assert "validate" not in unlimited.report.timings_s  # a local run loads its own files directly
