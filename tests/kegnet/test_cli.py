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
    assert "(4.10x)" in proc.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["plan"]["layers"][1]["in_rank"] == 7


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
    assert json.loads((tmp_path / "o" / "manifest.json").read_text())["teachers"]["count"] == 2
    proc = subprocess.run([sys.executable, "-m", "kegnet", "compress", *files * 5, "--out", str(tmp_path / "p"),
                           *base], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "at most 8 checkpoints, got 10" in proc.stderr
