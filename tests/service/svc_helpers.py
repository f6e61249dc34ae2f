"""Helpers shared by the service, worker and integration tests: tiny checkpoints and specs."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from kegnet.models import create_model

# Its database is flushed by the tests: never point it at one that holds anyone's data.
REDIS_TEST_URL = os.environ.get("KEGNET_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")

MLP_MODEL = {"arch": "mlp", "arch_kwargs": {"hidden": [16]}, "input_shape": [8], "num_classes": 3}
TINY_CONFIG = {
    "preset": "fast",
    "generator": {"num_generators": 1, "steps": 5, "batch_size": 32},
    "distill": {"steps": 5, "batch_size": 32, "holdout_samples": 64, "eval_every": 5},
    # A 16-unit layer is slower factorized (two calls for one): keep it anyway, and time it briefly; the output
    # refit (fit: auto) on 64 samples.
    "compression": {"rank_method": "fraction", "rank_fraction": 0.5, "keep_slower": True, "latency_repeats": 3,
                    "latency_budget_s": 0.01, "fit_samples": 64},
}


def spec_json(model: dict[str, Any] | None = None, config: dict[str, Any] | None = None, **extra: Any) -> str:
    return json.dumps({"model": model or MLP_MODEL, "config": config or TINY_CONFIG, "seed": 0, "device": "cpu",
                       **extra})


def mlp_state(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = create_model("mlp", input_shape=(8,), num_classes=3, hidden=[16])
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def write_mlp_safetensors(path: Path, seed: int = 0) -> Path:
    save_file(mlp_state(seed), str(path))
    return path


def eval_tensors(n: int = 60, seed: int = 0, shape: tuple[int, ...] = (8,)) -> dict[str, torch.Tensor]:
    """A labelled evaluation set for the MLP of ``mlp_state()``: its own predictions are the labels, so the
    teacher scores 100% and the student's accuracy is its agreement with the teacher. Another ``shape`` (a
    wrong one) gets random labels."""
    torch.manual_seed(seed)
    x = torch.randn(n, *shape)
    if shape != (8,):
        return {"x": x, "y": torch.randint(0, 3, (n,))}
    model = create_model("mlp", input_shape=(8,), num_classes=3, hidden=[16])
    model.load_state_dict(mlp_state())
    with torch.no_grad():
        return {"x": x, "y": model.eval()(x).argmax(1)}


def write_eval_set(path: Path, n: int = 60, seed: int = 0, shape: tuple[int, ...] = (8,)) -> Path:
    """A safetensors evaluation file (``kegnet.evaluation``) for the MLP teacher of ``mlp_state()``."""
    save_file(eval_tensors(n, seed, shape), str(path))
    return path


def write_mlp_torch(path: Path, state: dict[str, torch.Tensor] | None = None) -> Path:
    torch.save(state if state is not None else mlp_state(), path)
    return path


class _Evil:
    """Unpickling this would create ``marker``: proof that code from the upload ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def write_evil_pickle(path: Path, marker: Path, *, zip_format: bool = True) -> Path:
    payload = {"model_state": mlp_state(), "extra": _Evil(marker)}
    if zip_format:
        torch.save(payload, path)  # torch.save pickles the object (its __reduce__) into the zip
    else:
        with path.open("wb") as f:
            pickle.dump(payload, f, protocol=2)
    return path


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}
