"""kegnet.tasks: each kind of job's stages, and the driver refusing a config of another task."""

from __future__ import annotations

from pathlib import Path

import pytest

from kegnet import KegnetError, run_pipeline
from kegnet.config import TASK_CONFIGS, ClassifierConfig, SequenceJobConfig, config_for
from kegnet.events import overall_progress
from kegnet.spec import ModelSpec
from kegnet.tasks import get_task
from kegnet.tasks.base import Run

TASKS = ["classify", "sequence"]
STAGES = {"classify": ["load", "plan", "generators", "decompose", "finetune", "export"],
          "sequence": ["load", "compress", "sample", "finetune", "export"]}
LM = ModelSpec(arch="transformer", arch_kwargs={"n_layers": 1, "d_model": 16, "n_heads": 2}, task="sequence",
               sequence={"vocab_size": 16, "max_length": 10, "bos_id": 1, "eos_id": 2, "pad_id": 0})


@pytest.mark.parametrize("name", TASKS)
def test_stages_are_unique_named_and_weighted(name: str) -> None:
    task = get_task(name)
    names = [s.name for s in task.stages]
    assert task.name == name and names == STAGES[name]
    assert len(set(names)) == len(names) and "done" not in names  # "done" is the driver's last event
    assert all(s.weight > 0 for s in task.stages) and all(callable(s.run) for s in task.stages)
    assert task.stage_weights == [(s.name, s.weight) for s in task.stages]
    assert issubclass(task.job_type, Run)
    # Each stage's end is further along than the previous one's, and the last one's is the whole job.
    ends = [overall_progress(task.stage_weights, s, 1.0) for s in names]
    assert ends == sorted(ends) and len(set(ends)) == len(ends) and ends[-1] == pytest.approx(1.0)
    assert get_task(name) is task and TASK_CONFIGS[name]().task == name


def test_an_unknown_task_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown task 'nope'; tasks: classify, sequence"):
        get_task("nope")


def test_config_for_builds_each_tasks_config() -> None:
    assert isinstance(config_for("classify"), ClassifierConfig)
    sequence = config_for("sequence", sequence={"samples": 128})
    assert isinstance(sequence, SequenceJobConfig) and sequence.sequence.samples == 128
    assert sequence.sequence.holdout == SequenceJobConfig().sequence.holdout  # the rest of the section: defaults
    with pytest.raises(ValueError, match="generator"):  # a sequence job has no generator section
        config_for("sequence", generator={"steps": 3})
    with pytest.raises(ValueError, match="preset 'paper' is for classifier jobs"):
        config_for("sequence", "paper")
    with pytest.raises(ValueError, match="sequence"):  # nor a classifier job a sequence section
        config_for("classify", sequence={"samples": 128})


def test_a_config_of_another_task_is_refused(tmp_path: Path, small_cnn, small_cnn_spec) -> None:
    with pytest.raises(KegnetError, match=r"a classify job needs the classify config \(kegnet.config.config_for\), "
                                          "got SequenceJobConfig"):
        run_pipeline(small_cnn, small_cnn_spec, SequenceJobConfig(), tmp_path / "a", device="cpu")
    with pytest.raises(KegnetError, match="a sequence job needs the sequence config .* got ClassifierConfig"):
        run_pipeline(small_cnn, LM, ClassifierConfig(), tmp_path / "b", device="cpu")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # refused before anything was written
