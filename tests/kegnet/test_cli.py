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
           "--num-generators", "2", "--generator-steps", "10", "--distill-steps", "20", "--device", "cpu",
           "--keep-slower"]
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
