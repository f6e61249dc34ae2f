"""The files a run writes beside its student: one list of names, for the library and the service (no torch import).

``student.safetensors`` (weights; its metadata rebuilds the model with this package), ``student.pt2`` (a
``torch.export`` program), ``student.onnx``, ``student.int8.onnx`` (its INT8 model, with ``compression.quantize:
int8``), ``manifest.json`` (the run report, kegnet/report.py), ``curves.png`` (losses and agreement by step) and
``samples.png`` (synthetic images, one row per class).
"""

from __future__ import annotations

WEIGHTS = "student.safetensors"
PROGRAM = "student.pt2"
ONNX = "student.onnx"
INT8_ONNX = "student.int8.onnx"
MANIFEST = "manifest.json"
CURVES = "curves.png"
SAMPLES = "samples.png"

ARTIFACT_NAMES = (WEIGHTS, PROGRAM, ONNX, INT8_ONNX, MANIFEST, CURVES, SAMPLES)
