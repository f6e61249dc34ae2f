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
           "--num-generators", "2", "--generator-steps", "10", "--distill-steps", "20", "--device", "cpu"]
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
