"""A tiny CPU smoke of the benchmark command: it runs, prints its table and writes its JSON."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import MNIST_TEACHER, SHARED, needs_shared

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.shared
@needs_shared(MNIST_TEACHER)
@needs_shared(SHARED / "datasets" / "mnist")
def test_mnist_bench_smoke(tmp_path: Path) -> None:
    out = tmp_path / "mnist.json"
    cmd = [sys.executable, "-m", "bench", "mnist", "--seeds", "2", "--scale", "0.004", "--test-limit", "500",
           "--device", "cpu", "--methods", "tucker-only,kegnet", "--out", str(out),
           "--config", '{"generator": {"batch_size": 64}, "distill": {"batch_size": 64, "holdout_samples": 512}}']
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| 4.10x | kegnet |" in proc.stdout
    result = json.loads(out.read_text())
    rows = {(r["setting"], r["method"]): r for r in result["rows"]}
    assert list(rows) == [("-", "teacher"), ("3.62x", "tucker-only"), ("3.62x", "kegnet"), ("4.10x", "tucker-only"),
                          ("4.10x", "kegnet")]
    assert round(rows[("4.10x", "tucker-only")]["ratio"], 2) == 4.10
    assert len(rows[("4.10x", "kegnet")]["accuracy"]) == 2 and len(rows[("4.10x", "tucker-only")]["accuracy"]) == 1
    # The generators of a seed are trained once and shared by both settings.
    gen_times = [[t["generators"] for t in rows[(s, "kegnet")]["timings_s"]] for s in ("3.62x", "4.10x")]
    assert gen_times[0] == gen_times[1]
    assert result["command"].startswith("python -m bench mnist")
    # Each seed keeps the exam's grades, which python -m bench calibration compares with the real accuracy.
    conf = rows[("4.10x", "kegnet")]["confidence"][1]
    assert conf["estimate"] == min(conf["agreement"], conf["balanced"]) and conf["generator_exam"]
    assert conf["level"] in ("high", "medium", "low") and set(conf["per_source"]) >= {"kegnet/one_hot", "gaussian"}


def test_variants_set_their_config_and_ensembles_key_their_generators() -> None:
    from bench.__main__ import _generator_key, make_config
    from bench.scenarios import SCENARIOS

    objectives = SCENARIOS["pendigits-objectives"]
    cfg = make_config(objectives, "rank10", "kegnet:rkd", scale=0.1, extra={"distill": {"lr": 1e-4}})
    assert cfg.method == "kegnet" and cfg.distill.rkd_angle_weight == 2.0 and cfg.distill.lr == 1e-4
    assert cfg.generator.steps == 30 and cfg.compression.rank_method == "explicit"
    base = make_config(objectives, "rank10", "kegnet:kd", scale=0.1)
    # Objectives change only the student's training: the generators are shared ...
    assert _generator_key(cfg, ["a"], 0) == _generator_key(base, ["a"], 0)
    # ... but not across seeds, teachers or generator settings.
    assert len({_generator_key(base, ["a"], 0), _generator_key(base, ["a"], 1), _generator_key(base, ["b"], 0),
                _generator_key(base, ["a", "b"], 0),
                _generator_key(make_config(objectives, "rank10", "kegnet:kd", 0.2), ["a"], 0)}) == 5
    ensemble = SCENARIOS["pendigits-ensemble"]
    assert make_config(ensemble, "rank10", "kegnet:entropy", 1.0).distill.ensemble_weighting == "entropy"
    assert ensemble.teachers_of["kegnet:teacher2"] == [2]
    # The paper's rows keep their fixed layers whatever their speed; the library scenarios use the latency filter.
    assert make_config(SCENARIOS["mnist"], "4.10x", "kegnet", 1.0).compression.keep_slower
    assert make_config(objectives, "rank10", "kegnet:kd", 1.0).compression.keep_slower
    library = make_config(SCENARIOS["fashion-resnet18"], "2.5x", "kegnet:bnprior", 1.0)
    assert not library.compression.keep_slower and library.compression.target_ratio == 2.5
    assert library.generator.batchnorm_prior > 0 and library.generator.steps == 200



@pytest.mark.shared
@needs_shared(SHARED / "datasets" / "fashion-mnist")
def test_library_scenario_smoke(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """fashion-mobilenetv3 at a tiny scale, with a teacher of 2 training steps on 256 images (no cache)."""
    import bench.teachers as teachers
    from bench.__main__ import _fmt, run

    small = teachers.fashion_inputs
    monkeypatch.setattr(teachers, "CACHE", tmp_path)
    monkeypatch.setattr(teachers, "IMAGE_STEPS", {"fashion-mobilenetv3": 2})
    monkeypatch.setattr(teachers, "fashion_inputs", lambda split, c: tuple(t[:256] for t in small(split, c)))
    config = {"generator": {"batch_size": 8}, "distill": {"batch_size": 8, "holdout_samples": 64},
              # the weight fit: the output refit's tests are tests/kegnet/compression/test_fit.py (here it took 3/4
              # of the time)
              "compression": {"keep_slower": True, "latency_repeats": 3, "latency_budget_s": 0.05, "fit": "weights"}}
    result = run("fashion-mobilenetv3", 1, "cpu", 0.01, test_limit=64, methods=["tucker-only", "gaussian", "kegnet"],
                 settings=["2.5x"], extra=config)
    rows = {r["method"]: r for r in result["rows"]}
    assert list(rows) == ["teacher", "tucker-only", "gaussian", "kegnet"]
    assert rows["kegnet"]["ratio"] >= 2.4 and rows["kegnet"]["latency_ms"][0]["student"]["batch64_ms"] > 0
    assert rows["teacher"]["latency_ms"][0]["teacher"]["batch1_ms"] > 0
    timings = rows["kegnet"]["timings_s"][0]
    assert set(timings) >= {"load", "plan", "generators", "decompose", "finetune", "export"}
    # One decomposition, shared by the three rows, and charged to each.
    assert rows["gaussian"]["timings_s"][0]["decompose"] == timings["decompose"] > 0
    assert "decompose_computed" in timings
    assert "| 2.5x | kegnet |" in _fmt(rows["kegnet"])


def test_suite_variants_share_a_start_only_where_fine_tuning_alone_differs() -> None:
    from bench.suite.run import config_for
    from bench.suite.variants import _start_key

    base = _start_key(config_for("letter"))
    assert _start_key(config_for("letter", extra={"distill": {"feature_weight": 1.0, "lr": 3e-4}})) == base
    for other in ({"generator": {"batchnorm_prior": 10}}, {"compression": {"fit": "weights"}},
                  {"distill": {"label_codes": "simplex"}}):
        assert _start_key(config_for("letter", extra=other)) != base


def test_suite_library_entries_get_inputs_their_nets_take() -> None:
    import torch

    from bench.suite.tasks import rgb
    from bench.suite.teachers import ENTRIES, spec_of
    from kegnet import create_model

    grey = (torch.rand(4, 1, 32, 32), torch.tensor([0, 1, 2, 9]), torch.rand(2, 1, 32, 32), torch.tensor([0, 9]))
    task = rgb(grey)
    assert task[0].shape == (4, 3, 32, 32) and torch.equal(task[2][:, 2], grey[2][:, 0])
    for name, split in (("fashion-resnet18", task), ("fashion-mobilenetv3", grey)):
        spec = spec_of(name, split)
        assert spec.num_classes == 10 and ENTRIES[name].steps > 0
        model = create_model(spec.arch, input_shape=spec.input_shape, num_classes=10).eval()
        assert model(split[2]).shape == (2, 10)


def test_ceiling_finetune_moves_the_student_to_its_teacher() -> None:
    import copy

    import torch

    from bench.ceiling import finetune

    torch.manual_seed(0)
    teacher = torch.nn.Linear(8, 5).eval()
    student = copy.deepcopy(teacher)
    with torch.no_grad():  # a start near the teacher, as a decomposition gives
        student.weight.add_(0.2 * torch.randn_like(student.weight))
    x = torch.randn(2048, 8)
    before = (student(x).argmax(1) == teacher(x).argmax(1)).float().mean()
    tuned = finetune(student, teacher, x, steps=3000, seed=0)
    after = (tuned(x).argmax(1) == teacher(x).argmax(1)).float().mean()
    assert after > before + 0.1 and after > 0.9
