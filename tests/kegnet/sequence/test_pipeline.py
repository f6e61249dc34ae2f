"""A sequence job end to end on a tiny random Transformer: stages, files, run report, the saved student, and
what the job refuses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from kegnet.config import SequenceJobConfig
from kegnet.cost import Profile, check_cost, estimate_sequence_cost
from kegnet.errors import KegnetError, SpecError
from kegnet.models import create_model
from kegnet.pipeline import run_pipeline
from kegnet.sequence.generate import Sequences
from kegnet.sequence.prompts import cut_prompts
from kegnet.spec import ModelSpec, SequenceSpec
from kegnet.student import load_student

KWARGS = {"n_layers": 1, "d_model": 32, "n_heads": 2}
TOKENS = {"vocab_size": 16, "max_length": 10, "bos_id": 1, "eos_id": 2, "pad_id": 0, "sep_id": 3}
SPEC = ModelSpec(arch="transformer", arch_kwargs=KWARGS, task="sequence", sequence=TOKENS)
CONFIG = {"compression": {"rank_method": "ratio", "target_ratio": 1.5},
          "sequence": {"samples": 128, "holdout": 16, "steps": 20, "eval_every": 10, "batch_size": 16}}


def tiny_teacher(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model("transformer", vocab_size=16, max_length=10, **KWARGS)


@pytest.mark.parametrize("objective", ["word", "sequence", "both"])
def test_sequence_job_writes_a_loadable_student(tmp_path: Path, objective: str) -> None:
    config = SequenceJobConfig.model_validate({**CONFIG, "sequence": {**CONFIG["sequence"], "objective": objective}})
    stages: list[str] = []
    result = run_pipeline(tiny_teacher(), SPEC, config, tmp_path, device="cpu", seed=0,
                          progress=lambda e: stages.append(e.stage))
    r = result.report
    assert list(dict.fromkeys(stages)) == ["load", "compress", "sample", "finetune", "export", "done"]
    assert r.task == "sequence" and r.classify is None and r.compression_ratio >= 1.5 * 0.95
    assert set(r.files) == {"student.safetensors", "student.pt2"}
    assert r.sequence.distill["objective"] == objective
    assert 0.0 <= r.sequence.exact_agreement.final <= 1.0
    assert 0.0 <= r.sequence.exact_agreement.before_finetune <= 1.0
    assert 0.0 <= r.agreement.final <= 1.0 and 0.0 <= r.agreement.before_finetune <= 1.0
    assert {"distinct_1", "distinct_2", "unique_fraction"} <= set(r.sequence.generation["diversity"])
    assert r.speed.student["batch1_tokens_per_s"] > 0 and r.speed.teacher["batch1_tokens_per_s"] > 0
    if objective != "word":
        assert "beam_mean_length" in r.sequence.generation
    # manifest.json on disk: the core, then the sequence section.
    m = json.loads((tmp_path / "manifest.json").read_text())
    assert (m["format"], m["version"], m["task"]) == ("kegnet.run-report", 2, "sequence")
    assert m["sequence"]["exact_agreement"]["final"] == r.sequence.exact_agreement.final
    assert m["speed"]["student"]["batch1_tokens_per_s"] == r.speed.student["batch1_tokens_per_s"]
    # The saved student, rebuilt from its file, and the portable program compute what the run's student does.
    tokens = torch.randint(4, 16, (3, 7))
    tokens[:, 0] = 1
    with torch.no_grad():
        expected = result.student.cpu().eval()(tokens)
        assert torch.allclose(load_student(tmp_path)(tokens), expected, atol=1e-5)
        assert torch.allclose(torch.export.load(tmp_path / "student.pt2").module()(tokens), expected, atol=1e-5)


def test_same_seed_same_student(tmp_path: Path) -> None:
    config = SequenceJobConfig.model_validate(CONFIG)
    a = run_pipeline(tiny_teacher(), SPEC, config, tmp_path / "a", device="cpu", seed=3)
    b = run_pipeline(tiny_teacher(), SPEC, config, tmp_path / "b", device="cpu", seed=3)
    assert a.report.agreement == b.report.agreement
    assert a.report.sequence.exact_agreement == b.report.sequence.exact_agreement
    for (k, v), (_, w) in zip(a.student.state_dict().items(), b.student.state_dict().items(), strict=True):
        assert torch.equal(v, w), k


def test_a_shallower_student_is_saved_and_reloaded(tmp_path: Path) -> None:
    kwargs = {**KWARGS, "n_layers": 3}
    torch.manual_seed(0)
    teacher = create_model("transformer", vocab_size=16, max_length=10, **kwargs)
    spec = ModelSpec(arch="transformer", arch_kwargs=kwargs, task="sequence", sequence=TOKENS)
    config = SequenceJobConfig.model_validate({**CONFIG, "sequence": {**CONFIG["sequence"], "student_layers": 1}})
    result = run_pipeline(teacher, spec, config, tmp_path, device="cpu", seed=0)
    assert result.report.sequence.compression["blocks"] == {"kept": [0], "of": 3}
    assert result.report.compression_ratio >= 1.5 and len(result.student.blocks) == 1
    tokens = torch.randint(4, 16, (2, 6))
    with torch.no_grad():
        assert torch.allclose(load_student(tmp_path)(tokens), result.student.cpu().eval()(tokens), atol=1e-5)
    with pytest.raises(ValueError, match="less than or equal to 48"):
        SequenceJobConfig.model_validate({"sequence": {"student_layers": 49}})


def test_prompts_end_at_the_separator_or_at_a_random_cut() -> None:
    tokens = SequenceSpec(**TOKENS)
    seqs = torch.tensor([[1, 5, 6, 3, 7, 2, 0, 0],    # SEP at 3: prompt 1 5 6 3
                         [1, 5, 6, 7, 8, 9, 2, 0],    # no SEP: a cut in 1..5
                         [1, 3, 9, 2, 0, 0, 0, 0]])   # SEP at 1
    samples = Sequences(seqs, torch.tensor([6, 7, 4]), torch.ones(3, dtype=torch.long))
    prompts = cut_prompts(samples, tokens, torch.Generator().manual_seed(0))
    assert prompts.lengths[0] == 4 and prompts.tokens[0].tolist()[:4] == [1, 5, 6, 3]
    assert 1 <= prompts.lengths[1] <= 5 and prompts.tokens[1, : prompts.lengths[1]].tolist() == \
        seqs[1, : prompts.lengths[1]].tolist()
    assert prompts.lengths[2] == 2
    assert (prompts.tokens[2, 2:] == tokens.pad_id).all()


def test_bad_sequence_specs_say_what_to_fix() -> None:
    with pytest.raises(ValueError, match="needs a 'sequence' section"):
        ModelSpec(arch="transformer", task="sequence")
    with pytest.raises(ValueError, match="has no input_shape or num_classes"):
        ModelSpec(arch="transformer", task="sequence", sequence=TOKENS, num_classes=3)
    with pytest.raises(ValueError, match="must be below vocab_size 16: sep_id=20"):
        ModelSpec(arch="transformer", task="sequence", sequence={**TOKENS, "sep_id": 20})
    with pytest.raises(ValueError, match="distinct"):
        ModelSpec(arch="transformer", task="sequence", sequence={**TOKENS, "eos_id": 1})
    with pytest.raises(ValueError, match="built-in architectures"):
        ModelSpec(arch="timm:gpt2", task="sequence", sequence=TOKENS)
    with pytest.raises(ValueError, match="only for task: sequence"):
        ModelSpec(arch="mlp", input_shape=(4,), num_classes=2, sequence=TOKENS)


def test_weights_of_another_vocabulary_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "lm.safetensors"
    save_file(tiny_teacher().state_dict(), str(path))
    other = ModelSpec(arch="transformer", arch_kwargs=KWARGS, task="sequence", sequence={**TOKENS, "vocab_size": 20})
    with pytest.raises(SpecError, match=r"shape mismatch: tok_emb.weight .*check sequence.vocab_size"):
        run_pipeline(path, other, SequenceJobConfig.model_validate(CONFIG), tmp_path / "o", device="cpu")
    with pytest.raises(KegnetError, match=r"eval_set: an evaluation set \(x, y\) is for classifiers"):
        run_pipeline(path, SPEC, SequenceJobConfig.model_validate(CONFIG), tmp_path / "o", device="cpu",
                     eval_set=(torch.zeros(2, 3), torch.zeros(2)))


def test_sequence_cost_names_the_knob_to_lower() -> None:
    profile = Profile(parameters=100_000_000, macs=100_000_000 * 512, activations=10_000_000)
    big = SequenceJobConfig.model_validate({"sequence": {"samples": 500_000, "beam_size": 16}})
    cost = estimate_sequence_cost(profile, 512, 50_000, big)
    with pytest.raises(SpecError, match="config.sequence.samples, holdout or beam_size"):
        check_cost(cost, max_memory_bytes=1 << 40, max_macs=int(5e17))
    small = estimate_sequence_cost(Profile(10_000, 10_000 * 10, 1000), 10, 16, SequenceJobConfig.model_validate(CONFIG))
    check_cost(small, max_memory_bytes=1 << 30, max_macs=int(1e12))


def test_cli_compresses_a_sequence_model(tmp_path: Path) -> None:
    path = tmp_path / "lm.safetensors"
    save_file(tiny_teacher().state_dict(), str(path))
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "kegnet", "compress", str(path), "--arch", "transformer", "--arch-kwargs",
           json.dumps(KWARGS), "--sequence", json.dumps(TOKENS), "--config", json.dumps(CONFIG), "--device", "cpu",
           "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "agreement with the teacher: " in proc.stdout
    assert "greedy completions identical to the teacher's: " in proc.stdout
    assert "logits = student(tokens)" in proc.stdout
    assert json.loads((out / "manifest.json").read_text())["task"] == "sequence"
