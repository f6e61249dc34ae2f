"""Shared fixtures: paths to ../shared and tiny models and budgets that run in seconds on a CPU."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import torch

from bench.datasets import shared_dir
from kegnet import ClassifierConfig, ModelSpec, create_model

SHARED = shared_dir()
MNIST_TEACHER = SHARED / "teachers" / "kegnet-mnist-lenet5.pth.tar"
FASHION_TEACHER = SHARED / "teachers" / "kegnet-fashion-resnet14.pth.tar"
LENET_SPEC = ModelSpec(arch="lenet5", input_shape=(1, 32, 32), num_classes=10)


def needs_shared(path: Path) -> pytest.MarkDecorator:
    return pytest.mark.skipif(not path.exists(), reason=f"{path} not present (../shared missing)")


@pytest.fixture
def redis_db() -> Iterator[redis.Redis]:
    """The test Redis database (``KEGNET_TEST_REDIS_URL``, default DB 15), flushed before and after: never
    anyone else's data."""
    from tests.service.svc_helpers import REDIS_TEST_URL

    client = redis.Redis.from_url(REDIS_TEST_URL, decode_responses=True)
    try:
        client.ping()
    except redis.ConnectionError:
        pytest.skip(f"redis is not running at {REDIS_TEST_URL}")
    client.flushdb()
    yield client
    client.flushdb()


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    # The tests train tiny models: one torch thread is much faster than two on a small, busy CPU (and the
    # integration tests' worker processes need the other core).
    torch.set_num_threads(1)


def tiny_config(method: str = "kegnet", **sections: dict) -> ClassifierConfig:
    """A budget of a few steps per stage: exercises every code path in seconds."""
    base = {
        "generator": {"num_generators": 2, "steps": 4, "batch_size": 16},
        # Tiny layers are slower factorized (three calls for one): keep them, and time them briefly; the output
        # refit (fit: auto) on 64 samples, not 2,048.
        "compression": {"keep_slower": True, "latency_repeats": 3, "latency_budget_s": 0.01, "fit_samples": 64},
        "distill": {"steps": 6, "batch_size": 16, "holdout_samples": 64, "eval_every": 3,
                    "samples_per_generator": 64},
    }
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value}
    return ClassifierConfig.from_preset("fast", method=method, **base)


@pytest.fixture
def small_cnn_spec() -> ModelSpec:
    return ModelSpec(arch="resnet", arch_kwargs={"depth": 8, "widths": [4, 8]}, input_shape=(1, 12, 12),
                     num_classes=3)


@pytest.fixture
def small_cnn(small_cnn_spec: ModelSpec) -> torch.nn.Module:
    torch.manual_seed(0)
    s = small_cnn_spec
    return create_model(s.arch, input_shape=s.input_shape, num_classes=s.num_classes, **s.kwargs()).eval()
