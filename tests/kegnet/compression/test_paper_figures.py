"""The paper's Tucker-only figures on its own MNIST teacher, with real MNIST test data (benchmark data)."""

import pytest

from bench.datasets import accuracy, load_image_split, shared_dir
from kegnet import load_teacher
from kegnet.compression import apply_plan, plan_compression
from kegnet.config import CompressionConfig
from tests.conftest import LENET_SPEC, MNIST_TEACHER, needs_shared

MNIST_TEST = shared_dir() / "datasets" / "mnist" / "t10k-images-idx3-ubyte.gz"


@pytest.mark.shared
@needs_shared(MNIST_TEACHER)
@needs_shared(MNIST_TEST)
def test_tucker_only_accuracy_matches_the_paper() -> None:
    x, y = load_image_split("mnist", "test")
    teacher = load_teacher(MNIST_TEACHER, LENET_SPEC)
    assert accuracy(teacher, x, y) == pytest.approx(0.9891, abs=1e-4)
    for layers, expected in ((["conv3"], 0.852), (["conv2", "conv3"], 0.674)):
        student = apply_plan(teacher, plan_compression(teacher, CompressionConfig(layers=layers, rank_method="evbmf")))
        assert accuracy(student, x, y) == pytest.approx(expected, abs=0.003), layers
