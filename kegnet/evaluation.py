"""An optional labelled evaluation set from the user: real accuracy in the report, nothing else.

It is never used for training, step selection or the choice of recipe: those stay data-free. The file is
safetensors (never a pickle) with two tensors, ``x`` of shape ``(N, *input_shape)`` (any float dtype) and
``y`` of shape ``(N,)`` (integer class indices in ``[0, num_classes)``), with ``N`` at most ``max_samples``.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from kegnet.errors import SpecError
from kegnet.spec import ModelSpec

DEFAULT_MAX_SAMPLES = 10_000

_FLOATS = {"F16", "BF16", "F32", "F64"}
_INTS = {"I8", "U8", "I16", "I32", "I64"}


def read_eval_set(path: str | Path, spec: ModelSpec, max_samples: int = DEFAULT_MAX_SAMPLES
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Read and check an evaluation file; raises ``SpecError`` with what to fix."""
    shape = tuple(spec.input_shape or ())
    try:
        with safe_open(str(path), "pt") as f:
            keys = set(f.keys())  # noqa: SIM118 (safe_open has no __iter__)
            if keys != {"x", "y"}:
                raise SpecError(f"the evaluation set must hold exactly two tensors, 'x' and 'y'; it holds "
                                f"{sorted(keys)[:8]}")
            xs, ys = f.get_slice("x"), f.get_slice("y")
            x_shape, y_shape = tuple(xs.get_shape()), tuple(ys.get_shape())
            if len(y_shape) != 1 or not 1 <= y_shape[0] <= max_samples:
                raise SpecError(f"the evaluation set's 'y' must have shape (N,) with 1 <= N <= {max_samples}; "
                                f"it has {y_shape}")
            if x_shape != (y_shape[0], *shape):
                raise SpecError(f"the evaluation set's 'x' must have shape (N, {', '.join(map(str, shape))}) with "
                                f"N = {y_shape[0]} (the teacher's input); it has {x_shape}")
            if xs.get_dtype() not in _FLOATS or ys.get_dtype() not in _INTS:
                raise SpecError(f"the evaluation set needs float 'x' and integer 'y'; they are {xs.get_dtype()} "
                                f"and {ys.get_dtype()}")
            x, y = f.get_tensor("x").float(), f.get_tensor("y").long()
    except SafetensorError as exc:
        raise SpecError(f"the evaluation set is not a readable safetensors file ({exc})") from exc
    if not torch.isfinite(x).all():
        raise SpecError("the evaluation set's 'x' holds NaN or infinite values")
    if int(y.min()) < 0 or int(y.max()) >= spec.num_classes:
        raise SpecError(f"the evaluation set's labels must be in [0, {spec.num_classes}); they range "
                        f"{int(y.min())}..{int(y.max())}")
    return x, y


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device,
             chunk: int = 1024) -> tuple[float, torch.Tensor]:
    """Accuracy of ``model`` on ``(x, y)`` and its predictions ``(N,)``, on the CPU."""
    was_training = model.training
    model.eval()
    pred = torch.cat([model(c.to(device)).argmax(1).cpu() for c in x.split(chunk)])
    model.train(was_training)
    return (pred == y).float().mean().item(), pred


def evaluate(teacher: nn.Module, students: dict[str, nn.Module], chosen: str | None, x: torch.Tensor,
             y: torch.Tensor, num_classes: int, device: torch.device) -> dict:
    """The manifest's ``evaluation`` section: teacher, chosen student and every candidate on real data."""
    teacher_acc, _ = accuracy(teacher, x, y, device)
    per = {name: accuracy(m, x, y, device) for name, m in students.items()}
    final_acc, final_pred = per[chosen] if chosen is not None else next(iter(per.values()))
    per_class = {}
    for c in range(num_classes):
        rows = y == c
        if rows.any():
            per_class[str(c)] = {"accuracy": (final_pred[rows] == c).float().mean().item(),
                                 "samples": int(rows.sum())}
    return {"samples": len(y), "teacher_accuracy": teacher_acc, "student_accuracy": final_acc,
            "student_per_class": per_class, "candidates": {name: a for name, (a, _) in per.items()},
            "note": "user-supplied labelled data: reported only, never used for training or selection",
            "bytes": math.prod(x.shape) * 4}
