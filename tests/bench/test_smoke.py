"""A tiny CPU smoke of one benchmark scenario: the command runs, prints its table and writes its JSON."""

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
def test_mnist_bench_smoke() -> None:
    cmd = [sys.executable, "-m", "bench", "mnist", "--seeds", "1", "--scale", "0.004", "--test-limit", "500",
           "--device", "cpu", "--methods", "tucker-only,kegnet", "--settings", "4.10x"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "4.10x | kegnet" in proc.stdout
    result = json.loads((ROOT / "bench" / "results" / "mnist.json").read_text())
    methods = [r["method"] for r in result["rows"]]
    assert methods == ["teacher", "tucker-only", "kegnet"]
    assert result["rows"][1]["ratio"] > 4.0
