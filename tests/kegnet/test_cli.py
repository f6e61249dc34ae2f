import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import MNIST_TEACHER, needs_shared


@needs_shared(MNIST_TEACHER)
def test_cli_compresses_the_shared_mnist_teacher(tmp_path: Path) -> None:
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "kegnet", "compress", str(MNIST_TEACHER), "--arch", "lenet5",
           "--input-shape", "1,32,32", "--num-classes", "10", "--out", str(out), "--layers", "conv2,conv3",
           "--num-generators", "2", "--generator-steps", "10", "--distill-steps", "20", "--rank-method", "evbmf",
           "--device", "cpu", "--keep-slower",
           # smaller batches than the defaults' 256 and 2,048 exam samples: the flags' effect is the same
           "--config", '{"generator": {"batch_size": 64}, "distill": {"batch_size": 64, "holdout_samples": 512}}']
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "(4.10x)" in proc.stdout and "agreement with the teacher: " in proc.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["classify"]["plan"]["layers"][1]["in_rank"] == 7
    # Every file readable alike (safetensors writes 0600 by itself), samples drawn, and how to use the student.
    assert {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()} == dict.fromkeys(
        ["student.safetensors", "student.pt2", "student.onnx", "curves.png", "samples.png", "manifest.json"], 0o644)
    assert "torch.export.load" in proc.stdout and "classes = student(x).argmax(1)" in proc.stdout


def test_cli_reports_bad_input_clearly(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"")
    proc = subprocess.run([sys.executable, "-m", "kegnet", "compress", str(bad), "--arch", "mlp",
                           "--input-shape", "4", "--num-classes", "2", "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "the checkpoint file is empty" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "kegnet", "compress", str(bad), "--arch", "mlp",
                           "--input-shape", "4", "--num-classes", "2", "--out", str(tmp_path / "o"),
                           "--config", '{"generator": {"steps": -3}}'], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "invalid options" in proc.stderr


def test_cli_takes_several_checkpoints_as_a_teacher_ensemble(tmp_path: Path) -> None:
    from tests.service.svc_helpers import write_mlp_safetensors

    files = [str(write_mlp_safetensors(tmp_path / f"t{i}.safetensors", seed=i)) for i in range(2)]
    config = {"export_onnx": False, "export_portable": False,
              "generator": {"num_generators": 1, "batch_size": 16},
              "distill": {"batch_size": 16, "holdout_samples": 64, "ensemble_weighting": "entropy"}}
    base = ["--arch", "mlp", "--arch-kwargs", '{"hidden": [16]}', "--input-shape", "8", "--num-classes", "3",
            "--generator-steps", "2", "--distill-steps", "2", "--device", "cpu", "--keep-slower",
            "--config", json.dumps(config)]
    proc = subprocess.run([sys.executable, "-m", "kegnet", "compress", *files, "--out", str(tmp_path / "o"), *base],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "2 teachers, entropy weighting" in proc.stdout
    assert json.loads((tmp_path / "o" / "manifest.json").read_text())["classify"]["teachers"]["count"] == 2
    proc = subprocess.run([sys.executable, "-m", "kegnet", "compress", *files * 5, "--out", str(tmp_path / "p"),
                           *base], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "at most 8 checkpoints, got 10" in proc.stderr


def test_cli_takes_an_onnx_file_without_arch_or_shapes(tmp_path: Path) -> None:
    import torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32), torch.nn.ReLU(),
                              torch.nn.Linear(32, 4)).eval()
    path = tmp_path / "mine.onnx"
    torch.onnx.export(net, (torch.zeros(2, 6),), str(path), dynamo=False, input_names=["x"],
                      dynamic_axes={"x": {0: "batch"}}, opset_version=17)
    config = {"export_portable": False, "generator": {"num_generators": 1, "batch_size": 16},
              "distill": {"batch_size": 16, "holdout_samples": 64}}
    proc = subprocess.run([sys.executable, "-m", "kegnet", "compress", str(path), "--out", str(tmp_path / "o"),
                           "--generator-steps", "2", "--distill-steps", "2", "--device", "cpu", "--keep-slower",
                           "--rank-method", "fraction", "--rank-fraction", "0.25", "--config", json.dumps(config)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "speed on cpu (ms, " in proc.stdout
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["spec"]["input_shape"] == [6] and manifest["spec"]["num_classes"] == 4
    assert manifest["classify"]["onnx_check"]["max_abs_diff"] < 1e-4
    # Without an .onnx file the architecture must be named.
    other = tmp_path / "x.safetensors"
    other.write_bytes(b"0")
    proc = subprocess.run([sys.executable, "-m", "kegnet", "compress", str(other), "--out", str(tmp_path / "p")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--arch" in proc.stderr


@needs_shared(MNIST_TEACHER)
def test_cli_fails_fast_on_a_bad_plan_and_leaves_no_folder(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "kegnet", "compress", str(MNIST_TEACHER), "--arch", "lenet5",
                           "--input-shape", "1,32,32", "--num-classes", "10", "--out", str(out), "--layers", "conv9",
                           "--device", "cpu"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "'conv9' matches no Conv2d or Linear layer" in proc.stderr
    assert "generators" not in proc.stderr  # refused in the plan stage, before any generator step
    assert not out.exists()


def test_wrong_input_shape_says_input_shape(tmp_path: Path) -> None:
    from tests.service.svc_helpers import write_mlp_safetensors

    path = write_mlp_safetensors(tmp_path / "t.safetensors")  # an MLP on 8 features
    proc = subprocess.run([sys.executable, "-m", "kegnet", "compress", str(path), "--arch", "mlp", "--arch-kwargs",
                           '{"hidden": [16]}', "--input-shape", "9", "--num-classes", "3",
                           "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "check input_shape" in proc.stderr


def test_help_is_quick_and_shows_flags_as_flags() -> None:
    import time

    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "kegnet", "compress", "--help"], capture_output=True, text=True,
                          timeout=60, env={**__import__("os").environ, "COLUMNS": "120"})
    assert proc.returncode == 0 and time.perf_counter() - t0 < 3.0  # torch is not imported to print help
    assert "-v, --verbose" in proc.stdout and "<bool>" not in proc.stdout
    assert "--threads" in proc.stdout and "one per core" in " ".join(proc.stdout.split())


def test_progress_is_plain_lines_off_a_terminal_and_skips_empty_stages() -> None:
    import io

    from kegnet.cli import StageProgress
    from kegnet.events import ProgressEvent

    stream = io.StringIO()
    show = StageProgress(stream)
    show(ProgressEvent(stage="load", stage_progress=1.0, progress=0.02, message="teacher loaded"))
    for step in range(1, 11):
        show(ProgressEvent(stage="generators", stage_progress=step / 10, progress=0.3, step=step, total=10,
                           metrics={"cls_loss": 0.5}))
    show(ProgressEvent(stage="finetune", stage_progress=1.0, progress=0.9, message="nothing", skipped=True))
    show(ProgressEvent(stage="done", stage_progress=1.0, progress=1.0))
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("load") and "teacher loaded" in lines[0] and "s)" in lines[0]
    assert "generators 1/10 cls_loss=0.5" in lines and "generators 10/10 cls_loss=0.5" in lines
    assert not any("finetune" in line or "‰" in line for line in lines)


def test_cli_eval_set_reports_accuracy_and_confidence(tmp_path: Path) -> None:
    from tests.service.svc_helpers import write_eval_set, write_mlp_safetensors

    ckpt = write_mlp_safetensors(tmp_path / "t.safetensors")
    config = {"export_onnx": False, "export_portable": False, "generator": {"num_generators": 1, "batch_size": 16},
              "distill": {"batch_size": 16, "holdout_samples": 64}}
    base = [sys.executable, "-m", "kegnet", "compress", str(ckpt), "--arch", "mlp", "--arch-kwargs",
            '{"hidden": [16]}', "--input-shape", "8", "--num-classes", "3", "--generator-steps", "2",
            "--distill-steps", "2", "--device", "cpu", "--keep-slower", "--config", json.dumps(config)]
    good = write_eval_set(tmp_path / "eval.safetensors")  # labels: the teacher's predictions
    proc = subprocess.run([*base, "--out", str(tmp_path / "o"), "--eval-set", str(good)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    ev, conf = manifest["classify"]["evaluation"], manifest["classify"]["confidence"]
    assert (f"evaluation accuracy on your 60 labelled samples: teacher 1.0000, student "
            f"{ev['student_accuracy']:.4f}") in proc.stdout
    assert f"confidence estimate: {conf['estimate']:.4f} ({conf['level']};" in proc.stdout
    assert f"sample recipe kept: {manifest['classify']['recipe']}" in proc.stdout
    assert all(f"warning: {w}" in proc.stdout.splitlines() for w in conf["warnings"])
    # A file that does not fit the teacher is refused in the load stage, saying what to fix.
    bad = write_eval_set(tmp_path / "bad.safetensors", shape=(9,))
    proc = subprocess.run([*base, "--out", str(tmp_path / "p"), "--eval-set", str(bad)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 1 and "the evaluation set's 'x' must have shape (N, 8)" in proc.stderr


# ---- one error style (issue 20, part 6): one line "error: ...", exit 2 for bad options, 1 for a failed run


def _cli(capsys, *args: str) -> tuple[int, str]:
    from kegnet.cli import run_app

    code = run_app(list(args))
    return code, capsys.readouterr().err


def _mlp_args(tmp_path: Path, *extra: str) -> list[str]:
    from tests.service.svc_helpers import write_mlp_safetensors

    path = write_mlp_safetensors(tmp_path / "t.safetensors")
    return ["compress", str(path), "--arch", "mlp", "--arch-kwargs", '{"hidden": [16]}', "--num-classes", "3",
            "--out", str(tmp_path / "o"), *extra]


def test_bad_options_are_one_line_naming_the_field(tmp_path: Path, capsys) -> None:
    cases = {
        ("--input-shape", "3,32"): "input_shape must be C,H,W for images or F for feature vectors",
        ("--input-shape", "8", "--config", '{"generatr": {}}'):
            "unknown field 'generatr'; allowed: compression, distill, export_onnx",
        ("--input-shape", "8", "--config", '{"generator": {"stepz": 3}}'):
            "unknown field 'generator.stepz'; allowed: activation, alpha, batch_size",
        ("--input-shape", "8", "--config", '{"generator": {"steps": -3}}'): "generator.steps: Input should be",
        ("--input-shape", "a,b"): "--input-shape 'a,b': use C,H,W",
        ("--input-shape", "8", "--config", "{bad"): "--config is not valid JSON",
    }
    for extra, expected in cases.items():
        code, err = _cli(capsys, *_mlp_args(tmp_path, *extra))
        assert code == 2 and err.startswith("error: invalid options: ") and expected in err, (extra, err)
        assert err.count("\n") == 1 and "validation error" not in err and "errors.pydantic.dev" not in err
    assert not (tmp_path / "o").exists()


def test_click_errors_are_one_line_too(tmp_path: Path, capsys) -> None:
    code, err = _cli(capsys, "compress", "--bogus")
    assert code == 2 and err.startswith("error: No such option: --bogus") and err.count("\n") == 1
    code, err = _cli(capsys, "compress", str(tmp_path / "missing.safetensors"), "--out", "x")
    assert code == 2 and err.startswith("error: ") and "does not exist" in err and err.count("\n") == 1


def test_unknown_architectures_say_did_you_mean(tmp_path: Path, capsys) -> None:
    code, err = _cli(capsys, *_mlp_args(tmp_path, "--input-shape", "3,32,32"), "--arch", "torchvision:resnet19")
    assert code == 2 and "unknown torchvision model 'resnet19'; did you mean resnet18?" in err, err
    code, err = _cli(capsys, *_mlp_args(tmp_path, "--input-shape", "8"), "--arch", "lenet6")
    assert code == 2 and "unknown architecture 'lenet6'; did you mean lenet5?" in err, err


def test_the_library_suggests_names_too() -> None:
    import pytest

    from kegnet.models import libraries

    with pytest.raises(ValueError, match=r"unknown torchvision model 'resnet19'; did you mean resnet18\?"):
        libraries.build_torchvision("resnet19", (3, 32, 32), 10)
    assert libraries.did_you_mean("zzzz", ["resnet18"]) == ""


def test_help_documents_the_exit_codes() -> None:
    proc = subprocess.run([sys.executable, "-m", "kegnet", "--help"], capture_output=True, text=True, timeout=60)
    text = " ".join(proc.stdout.split())
    assert proc.returncode == 0 and "1 the run or the job failed; 2 bad options or input" in text


def test_a_failed_run_is_exit_1_in_one_line(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"")
    code, err = _cli(capsys, "compress", str(bad), "--arch", "mlp", "--input-shape", "4", "--num-classes", "2",
                     "--out", str(tmp_path / "o"))
    assert code == 1 and err.startswith("error: ") and "the checkpoint file is empty" in err
    assert err.count("\n") == 1


# ---- stage lines with the seconds the manifest records


class _Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_stage_lines_carry_each_stages_real_elapsed_time(monkeypatch) -> None:
    import io

    import kegnet.cli as cli
    from kegnet.events import ProgressEvent

    clock = _Clock()
    monkeypatch.setattr(cli.time, "monotonic", clock)
    stream = io.StringIO()
    show = cli.StageProgress(stream, stages=["load", "plan", "generators", "decompose", "finetune"],
                             heartbeat_s=3600)

    def at(t: float, stage: str, fraction: float, message: str = "", **kw) -> None:
        clock.t = 1000.0 + t
        show(ProgressEvent(stage=stage, stage_progress=fraction, progress=0.5, message=message, **kw))

    at(0.5, "load", 0.0, "loading the teacher")
    at(2.0, "load", 1.0, "teacher loaded")
    at(2.0, "plan", 0.0, "choosing layers")
    at(16.0, "plan", 1.0, "3 layers to factorize")
    at(17.0, "generators", 0.5, step=5, total=10)
    at(20.0, "generators", 1.0, step=10, total=10)  # its last event counts steps: it ends at the next stage
    at(69.6, "decompose", 1.0, "3 layers factorized")  # reports only when it ends, 49.6 s later
    at(80.0, "finetune", 1.0, "nothing to do", skipped=True)
    at(80.0, "done", 1.0)
    show.close()
    ends = [line for line in stream.getvalue().splitlines() if line.endswith(" s)")]
    assert ends == ["load       teacher loaded (2.0 s)", "plan       3 layers to factorize (14.0 s)",
                    "generators  (4.0 s)", "decompose  3 layers factorized (49.6 s)"], stream.getvalue()


def test_long_silent_stages_print_a_line_every_heartbeat() -> None:
    import io
    import time

    from kegnet.cli import StageProgress
    from kegnet.events import ProgressEvent

    stream = io.StringIO()
    show = StageProgress(stream, stages=["load", "plan", "generators", "decompose"], heartbeat_s=0.2)
    show(ProgressEvent(stage="plan", stage_progress=0.3, progress=0.1, message="timing 14 layers"))
    time.sleep(0.5)
    show(ProgressEvent(stage="decompose", stage_progress=0.0, progress=0.5, message="x", skipped=True))
    show(ProgressEvent(stage="generators", stage_progress=1.0, progress=0.5, message="samples ready"))
    time.sleep(0.5)
    show.close()
    lines = stream.getvalue().splitlines()
    assert any(line.startswith("plan: timing 14 layers… ") and line.endswith(" s") for line in lines), lines
    assert any(line.startswith("decompose… ") for line in lines), lines  # the stage after generators


def test_quantize_option_is_validated_with_the_config(tmp_path: Path, capsys) -> None:
    code, err = _cli(capsys, *_mlp_args(tmp_path, "--input-shape", "8", "--quantize", "int4"))
    assert code == 2 and "compression.quantize" in err and err.count("\n") == 1
    code, err = _cli(capsys, *_mlp_args(tmp_path, "--input-shape", "8", "--quantize", "int8",
                                        "--config", '{"export_onnx": false}'))
    assert code == 2 and "set export_onnx true" in err
