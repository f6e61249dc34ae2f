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
    assert "latency on cpu" in proc.stdout
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["spec"]["input_shape"] == [6] and manifest["spec"]["num_classes"] == 4
    assert manifest["onnx_check"]["max_abs_diff"] < 1e-4
    # Without an .onnx file the architecture must be named.
    other = tmp_path / "x.safetensors"
    other.write_bytes(b"0")
    proc = subprocess.run([sys.executable, "-m", "kegnet", "compress", str(other), "--out", str(tmp_path / "p")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--arch" in proc.stderr
