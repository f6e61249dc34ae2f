"""The user's optional labelled evaluation set: read safely, bounded, and checked against the spec."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from kegnet import ModelSpec
from kegnet.errors import SpecError
from kegnet.evaluation import read_eval_set

SPEC = ModelSpec(arch="mlp", input_shape=(6,), num_classes=3)


def _write(path: Path, **tensors: torch.Tensor) -> Path:
    save_file(tensors, str(path))
    return path


def test_a_good_set_is_read_as_float_inputs_and_long_labels(tmp_path: Path) -> None:
    x, y = torch.randn(20, 6, dtype=torch.float64), torch.arange(20, dtype=torch.int32) % 3
    got_x, got_y = read_eval_set(_write(tmp_path / "e.safetensors", x=x, y=y), SPEC)
    assert got_x.dtype == torch.float32 and got_y.dtype == torch.int64
    assert torch.allclose(got_x, x.float()) and torch.equal(got_y, y.long())


@pytest.mark.parametrize(("tensors", "message"), [
    ({"x": torch.randn(4, 6)}, "exactly two tensors"),
    ({"x": torch.randn(4, 5), "y": torch.zeros(4, dtype=torch.long)}, r"shape \(N, 6\)"),
    ({"x": torch.randn(4, 6), "y": torch.zeros(4, 1, dtype=torch.long)}, r"shape \(N,\)"),
    ({"x": torch.randn(4, 6), "y": torch.full((4,), 3)}, r"labels must be in \[0, 3\)"),
    ({"x": torch.randn(4, 6), "y": torch.zeros(4)}, "integer 'y'"),
    ({"x": torch.full((4, 6), float("nan")), "y": torch.zeros(4, dtype=torch.long)}, "NaN"),
    ({"x": torch.randn(11, 6), "y": torch.zeros(11, dtype=torch.long)}, "N <= 10"),
])
def test_bad_sets_are_refused_with_what_to_fix(tmp_path: Path, tensors: dict, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        read_eval_set(_write(tmp_path / "e.safetensors", **tensors), SPEC, max_samples=10)


def test_a_pickle_is_never_loaded(tmp_path: Path) -> None:
    path = tmp_path / "e.pt"
    torch.save({"x": torch.randn(4, 6), "y": torch.zeros(4, dtype=torch.long)}, path)
    with pytest.raises(SpecError, match="not a readable safetensors file"):
        read_eval_set(path, SPEC)
