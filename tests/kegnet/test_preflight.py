"""kegnet.preflight: the checks the API and the pipeline share, before a job runs (static) and on the built
teacher (model), with messages that say what to fix and which file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from kegnet.config import ClassifierConfig, SequenceJobConfig, config_for
from kegnet.cost import JobCost
from kegnet.errors import CheckpointError, KegnetError, SpecError
from kegnet.models import create_model, registry
from kegnet.preflight import Limits, check_model, check_static, file_label
from kegnet.spec import ModelSpec

MLP = ModelSpec(arch="mlp", arch_kwargs={"hidden": [16]}, input_shape=(8,), num_classes=3)
TOKENS = {"vocab_size": 16, "max_length": 10, "bos_id": 1, "eos_id": 2, "pad_id": 0, "sep_id": 3}
LM_KWARGS = {"n_layers": 1, "d_model": 16, "n_heads": 2}
LM = ModelSpec(arch="transformer", arch_kwargs=LM_KWARGS, task="sequence", sequence=TOKENS)
NO_LIMITS = Limits(max_parameters=None)


def _mlp_file(path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = create_model("mlp", input_shape=(8,), num_classes=3, hidden=[16])
    save_file(model.state_dict(), str(path))
    return path


def _lm_file(path: Path) -> Path:
    torch.manual_seed(0)
    save_file(create_model("transformer", vocab_size=16, max_length=10, **LM_KWARGS).state_dict(), str(path))
    return path


def test_file_labels_name_a_file_only_among_several() -> None:
    assert file_label(0, 1) == ""
    assert file_label(1, 3) == "checkpoint 2 of 3 (index 1): "


def test_a_sequence_job_takes_one_teacher_and_no_eval_set(tmp_path: Path) -> None:
    files = [_lm_file(tmp_path / "a.safetensors"), _lm_file(tmp_path / "b.safetensors")]
    config = SequenceJobConfig()
    with pytest.raises(KegnetError, match=r"^a sequence job takes one teacher \(one 'checkpoint' file\), got 2$"):
        check_static(files, LM, config, NO_LIMITS)
    with pytest.raises(KegnetError, match=r"^eval_set: an evaluation set \(x, y\) is for classifiers; a sequence "
                                          "job reports agreement with the teacher on its own generations$"):
        check_static(files[:1], LM, config, NO_LIMITS, has_eval_set=True)
    check_static(files[:1], LM, config, NO_LIMITS)  # one teacher, no evaluation set: accepted


def test_a_classifier_job_takes_one_to_eight_teachers(tmp_path: Path) -> None:
    path = _mlp_file(tmp_path / "t.safetensors")
    check_static([path] * 8, MLP, ClassifierConfig(), NO_LIMITS, has_eval_set=True)
    with pytest.raises(KegnetError, match="give 1 to 8 teachers, got 9"):
        check_static([path] * 9, MLP, ClassifierConfig(), NO_LIMITS)


def test_an_architecture_over_the_parameter_limit_is_refused_without_building_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    devices: list[torch.device] = []

    def spy(input_shape: tuple[int, ...], num_classes: int, width: int = 64) -> nn.Module:
        model = nn.Sequential(nn.Flatten(), nn.Linear(input_shape[0], width), nn.Linear(width, num_classes))
        devices.append(next(model.parameters()).device)
        return model

    monkeypatch.setitem(registry._REGISTRY, "spy", registry.Entry(spy, "classify"))
    spec = ModelSpec(arch="spy", arch_kwargs={"width": 100_000}, input_shape=(8,), num_classes=3)
    path = tmp_path / "t.safetensors"
    save_file(spy((8,), 3, 100_000).state_dict(), str(path))  # the user's weights, made here on the CPU
    devices.clear()
    with pytest.raises(SpecError, match=r"'spy' with these arguments has 1,200,003 parameters, above this "
                                        r"service's limit of 1,000"):
        check_static([path], spec, ClassifierConfig(), Limits(max_parameters=1_000))
    check_static([path], spec, ClassifierConfig(), Limits(max_parameters=None))  # no limit: accepted
    assert devices and set(devices) == {torch.device("meta")}  # counted and checked, never allocated


def test_a_bad_file_among_several_is_named(tmp_path: Path) -> None:
    good = _mlp_file(tmp_path / "good.safetensors")
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"^checkpoint 2 of 2 \(index 1\): the checkpoint file is empty"):
        check_static([good, empty], MLP, ClassifierConfig(), NO_LIMITS)
    with pytest.raises(CheckpointError, match=r"^the checkpoint file is empty"):  # one file: no label
        check_static([empty], MLP, ClassifierConfig(), NO_LIMITS)


def test_check_static_returns_the_spec_and_the_cost(tmp_path: Path) -> None:
    files = [_mlp_file(tmp_path / "a.safetensors", 0), _mlp_file(tmp_path / "b.safetensors", 1)]
    config = config_for("classify", "fast")
    spec, cost = check_static(files, MLP, config, NO_LIMITS)
    assert spec == MLP and isinstance(cost, JobCost)
    assert cost.memory_bytes > 0 and cost.macs == cost.generator_macs + cost.distill_macs > 0
    _, one = check_static(files[:1], MLP, config, NO_LIMITS)
    assert cost.macs > one.macs  # two teachers cost more than one
    lm_spec, lm_cost = check_static([_lm_file(tmp_path / "lm.safetensors")], LM, SequenceJobConfig(), NO_LIMITS)
    assert lm_spec == LM and lm_cost.knobs.sample_stage == "the teacher's generations"
    assert check_model(files, MLP, config, NO_LIMITS) == MLP  # the worker's part: loads and runs them


def test_check_static_refuses_a_job_over_the_limits(tmp_path: Path) -> None:
    path = _mlp_file(tmp_path / "t.safetensors")
    config = ClassifierConfig.from_preset("fast", generator={"batch_size": 2048, "num_generators": 8})
    with pytest.raises(SpecError, match=r"^this job would need about \d+\.\d GiB of memory in generator training, "
                                        r"above this service's limit of 0\.0 GiB; lower config\.generator\."
                                        r"batch_size \(or num_generators, or a smaller input_shape\)$"):
        check_static([path], MLP, config, Limits(max_parameters=None, max_memory_bytes=1_000))
    with pytest.raises(SpecError, match=r"multiply-accumulates, mostly in the teacher's generations, above this "
                                        r"service's limit of 1\.00e\+03; lower config\.sequence\.samples, holdout "
                                        r"or beam_size \(or a smaller sequence\.max_length\)$"):
        check_static([_lm_file(tmp_path / "lm.safetensors")], LM,
                     SequenceJobConfig.model_validate({"sequence": {"samples": 50_000, "steps": 1}}),
                     Limits(max_parameters=None, max_macs=1_000))


def test_a_config_of_another_task_is_refused(tmp_path: Path) -> None:
    with pytest.raises(KegnetError, match="a sequence job needs the sequence config"):
        check_static([_lm_file(tmp_path / "lm.safetensors")], LM, ClassifierConfig(), NO_LIMITS)


def test_check_model_names_the_eval_set_and_the_forward_check(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    path = _mlp_file(tmp_path / "t.safetensors")
    bad = tmp_path / "eval.safetensors"
    save_file({"x": torch.randn(4, 9), "y": torch.zeros(4, dtype=torch.long)}, str(bad))
    with pytest.raises(SpecError, match=r"^eval_set: the evaluation set's 'x' must have shape \(N, 8\)"):
        check_model([path], MLP, ClassifierConfig(), NO_LIMITS, eval_set=bad)
    with pytest.raises(SpecError, match=r"^eval_set: the evaluation set's 'x' must have shape \(N, 8\)"):
        check_static([path], MLP, ClassifierConfig(), NO_LIMITS, eval_set=bad)
    good = tmp_path / "good.safetensors"
    save_file({"x": torch.randn(4, 8), "y": torch.tensor([0, 1, 2, 0])}, str(good))
    check_model([path], MLP, ClassifierConfig(), NO_LIMITS, eval_set=good)

    # A registered classifier whose head ignores num_classes: the forward pass says what came out.
    def five_classes(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(144, 5))

    monkeypatch.setitem(registry._REGISTRY, "five", registry.Entry(five_classes, "classify"))
    spec = ModelSpec(arch="five", input_shape=(1, 12, 12), num_classes=10)
    weights = tmp_path / "five.safetensors"
    save_file(five_classes((1, 12, 12), 10).state_dict(), str(weights))
    with pytest.raises(SpecError, match=r"^the model outputs shape \(2, 5\) for input shape \(1, 12, 12\), "
                                        r"expected \(2, 10\)$"):
        check_model([weights], spec, ClassifierConfig(), NO_LIMITS)
    with pytest.raises(SpecError, match=r"^checkpoint 2 of 2 \(index 1\): the weights do not match architecture "
                                        r"'mlp'"):
        check_model([path, weights], MLP, ClassifierConfig(), NO_LIMITS)
