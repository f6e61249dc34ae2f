"""Loading a saved student back: ``student.safetensors`` (written by ``kegnet.export``) rebuilds the model.

The file's metadata holds the spec and the compression plan (a sequence student: its compression report), so
the file alone rebuilds the architecture, the factorized structure and then the weights, with this package.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from kegnet.compression import CompressionPlan, apply_plan
from kegnet.export import ONNX, SEQUENCE_REPORT, WEIGHTS
from kegnet.models import create_model
from kegnet.spec import ModelSpec


def load_student(path: str | Path, onnx_teacher: str | Path | None = None) -> nn.Module:
    """Rebuild a student from ``student.safetensors`` (or a run directory holding it); eval mode, CPU.

    A student of an ONNX teacher is rebuilt on the teacher's converted graph: pass the teacher's ``.onnx``
    file as ``onnx_teacher`` (or use ``student.onnx``, which needs nothing else).
    """
    path = Path(path)
    if path.is_dir():
        path = path / WEIGHTS
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    spec = ModelSpec.model_validate_json(meta["kegnet_spec"])
    if spec.is_sequence:
        return _load_sequence_student(path, spec, json.loads(meta[SEQUENCE_REPORT]))
    plan = CompressionPlan.from_dict(json.loads(meta["kegnet_plan"]))
    if spec.arch == "onnx":
        if onnx_teacher is None:
            raise ValueError("this student's teacher was an ONNX graph: pass onnx_teacher=<the teacher's .onnx>, "
                             f"or load {ONNX} with an ONNX runtime")
        from kegnet.models import onnx_graph

        model = onnx_graph.to_torch(onnx_graph.read_graph(onnx_teacher))
    else:
        model = create_model(spec.arch, input_shape=spec.input_shape, num_classes=spec.num_classes,
                             max_parameters=None, **spec.kwargs())
    student = apply_plan(model, plan, initialize=False)
    student.load_state_dict(load_file(str(path)), strict=True)
    return student.eval()


def _load_sequence_student(path: Path, spec: ModelSpec, report: dict) -> nn.Module:
    """A sequence student: the architecture, the factorized structure its compression report describes
    (kegnet/sequence/compress.py), then its weights."""
    from kegnet.models import create_sequence_model
    from kegnet.sequence.compress import compressed_structure

    assert spec.sequence is not None
    model = create_sequence_model(spec.arch, vocab_size=spec.sequence.vocab_size,
                                  max_length=spec.sequence.max_length, max_parameters=None, **spec.kwargs())
    student = compressed_structure(model, report)
    student.load_state_dict(load_file(str(path)), strict=True)
    return student.eval()
