"""kegnet: data-free model compression (KegNet samples + Tucker-2 + distillation).

Public API::

    from kegnet import ModelSpec, ClassifierConfig, run_pipeline, create_model, register_model, load_student

Names are imported on first use (PEP 562), so ``import kegnet`` and ``kegnet --help`` do not load torch.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> module that defines it
_EXPORTS = {
    "Cancelled": "kegnet.errors", "CheckpointError": "kegnet.errors", "CompressionError": "kegnet.errors",
    "KegnetError": "kegnet.errors", "SpecError": "kegnet.errors",
    "ModelSpec": "kegnet.spec", "ClassifierConfig": "kegnet.config", "SequenceJobConfig": "kegnet.config",
    "config_for": "kegnet.config", "Recipe": "kegnet.config", "RunReport": "kegnet.report",
    "ProgressEvent": "kegnet.events", "read_eval_set": "kegnet.evaluation",
    "RunResult": "kegnet.pipeline", "run_pipeline": "kegnet.pipeline",
    "load_student": "kegnet.student",
    "create_model": "kegnet.models", "list_models": "kegnet.models", "register_model": "kegnet.models",
    "load_teacher": "kegnet.checkpoint", "open_teacher": "kegnet.checkpoint", "read_state_dict": "kegnet.checkpoint",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'kegnet' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
