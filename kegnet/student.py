"""Loading a saved student back: ``student.safetensors`` (written by ``kegnet.export``) rebuilds the model.

The file's metadata holds the spec and the compression plan (a sequence student: its compression report), so
the file alone rebuilds the architecture, the factorized structure and then the weights, with this package.
"""

from __future__ import annotations

from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from kegnet.artifacts import ONNX, WEIGHTS
from kegnet.export import SPEC_METADATA
from kegnet.models import create_model
from kegnet.spec import ModelSpec
from kegnet.tasks import get_task


def load_student(path: str | Path, onnx_teacher: str | Path | None = None) -> nn.Module:
    """Rebuild a student from ``student.safetensors`` (or a run directory holding it); eval mode, CPU.

    The architecture is built from the spec, the task rebuilds the student's structure on it from the rest of
    the metadata (kegnet.tasks: a classifier's plan, a sequence student's compression report), then the weights
    are loaded strictly. A student of an ONNX teacher is rebuilt on the teacher's converted graph: pass the
    teacher's ``.onnx`` file as ``onnx_teacher`` (or use ``student.onnx``, which needs nothing else).
    """
    path = Path(path)
    if path.is_dir():
        path = path / WEIGHTS
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    spec = ModelSpec.model_validate_json(meta[SPEC_METADATA])
    if spec.arch == "onnx":
        if onnx_teacher is None:
            raise ValueError("this student's teacher was an ONNX graph: pass onnx_teacher=<the teacher's .onnx>, "
                             f"or load {ONNX} with an ONNX runtime")
        from kegnet.models import onnx_graph

        model = onnx_graph.to_torch(onnx_graph.read_graph(onnx_teacher))
    else:
        model = create_model(spec.arch, max_parameters=None, **spec.model_arguments(), **spec.kwargs())
    student = get_task(spec.task).rebuild_student(model, meta)
    student.load_state_dict(load_file(str(path)), strict=True)
    return student.eval()
