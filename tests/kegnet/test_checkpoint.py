import math
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from kegnet import CheckpointError, ModelSpec, SpecError, create_model, load_teacher, read_state_dict
from tests.conftest import MNIST_TEACHER, needs_shared

MLP_SPEC = ModelSpec(arch="mlp", arch_kwargs={"hidden": [8]}, input_shape=(5,), num_classes=3)


def _mlp_state() -> dict[str, torch.Tensor]:
    return create_model("mlp", input_shape=(5,), num_classes=3, hidden=[8]).state_dict()


@pytest.mark.parametrize("wrap", [None, "model_state", "state_dict"])
def test_reads_plain_and_nested_torch_files(tmp_path: Path, wrap: str | None) -> None:
    state = _mlp_state()
    path = tmp_path / "m.pt"
    torch.save(state if wrap is None else {wrap: state, "epoch": 3}, path)
    loaded = read_state_dict(path)
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_reads_safetensors_and_strips_dataparallel_prefix(tmp_path: Path) -> None:
    state = {f"module.{k}": v.contiguous() for k, v in _mlp_state().items()}
    save_file(state, str(tmp_path / "m.safetensors"))
    model = load_teacher(tmp_path / "m.safetensors", MLP_SPEC)
    assert model(torch.zeros(1, 5)).shape == (1, 3)


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_with_code_is_refused_without_running(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model_state": _mlp_state(), "x": _Payload(marker)}, path)
    with pytest.raises(CheckpointError, match="refused without running"):
        read_state_dict(path)
    assert not marker.exists()
    # A raw pickle (protocol 2, as old torch.save wrote) is refused the same way.
    raw = tmp_path / "evil.pkl"
    raw.write_bytes(pickle.dumps(_Payload(marker), protocol=2))
    with pytest.raises(CheckpointError):
        read_state_dict(raw)
    assert not marker.exists()


def test_nan_wrong_keys_and_shapes_name_the_problem(tmp_path: Path) -> None:
    state = _mlp_state()
    state["head.weight"][0, 0] = math.nan
    torch.save(state, tmp_path / "nan.pt")
    with pytest.raises(CheckpointError, match="NaN or infinite values in: head.weight"):
        load_teacher(tmp_path / "nan.pt", MLP_SPEC)

    state = _mlp_state()
    state["extra.weight"] = torch.zeros(1)
    del state["head.bias"]
    torch.save(state, tmp_path / "keys.pt")
    with pytest.raises(SpecError, match=r"missing keys: head.bias; unexpected keys: extra.weight"):
        load_teacher(tmp_path / "keys.pt", MLP_SPEC)

    torch.save(_mlp_state(), tmp_path / "ok.pt")
    wrong_classes = MLP_SPEC.model_copy(update={"num_classes": 4})
    with pytest.raises(SpecError, match=r"head.weight is \(3, 8\) but 'mlp' expects \(4, 8\)"):
        load_teacher(tmp_path / "ok.pt", wrong_classes)


def test_unknown_architecture_and_bad_kwargs() -> None:
    with pytest.raises(SpecError, match="unknown architecture 'vgg99'"):
        create_model("vgg99", input_shape=(1, 32, 32), num_classes=10)
    with pytest.raises(SpecError, match="does not take argument"):
        create_model("mlp", input_shape=(5,), num_classes=3, colour="red")


@needs_shared(MNIST_TEACHER)
def test_wrong_input_shape_for_the_shared_teacher() -> None:
    spec = ModelSpec(arch="lenet5", input_shape=(1, 28, 28), num_classes=10)
    with pytest.raises(SpecError, match="lenet5 takes C,32,32"):
        load_teacher(MNIST_TEACHER, spec)
