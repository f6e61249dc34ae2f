"""kegnet: data-free model compression (KegNet samples + Tucker-2 + distillation).

Public API::

    from kegnet import ModelSpec, PipelineConfig, run_pipeline, create_model, register_model, load_student
"""

from kegnet.checkpoint import load_teacher, read_state_dict
from kegnet.config import PipelineConfig
from kegnet.errors import Cancelled, CheckpointError, CompressionError, KegnetError, SpecError
from kegnet.events import ProgressEvent
from kegnet.export import load_student
from kegnet.models import create_model, list_models, register_model
from kegnet.pipeline import RunResult, run_pipeline
from kegnet.spec import ModelSpec

__all__ = [
    "Cancelled", "CheckpointError", "CompressionError", "KegnetError", "ModelSpec", "PipelineConfig",
    "ProgressEvent", "RunResult", "SpecError", "create_model", "list_models", "load_student",
    "load_teacher", "read_state_dict", "register_model", "run_pipeline",
]
