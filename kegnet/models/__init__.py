"""Model architectures: a registry plus the built-in ``lenet5``, ``resnet`` and ``mlp``, and a sequence-model
registry with the built-in ``transformer`` (a decoder-only Transformer)."""

from kegnet.models import lenet, mlp, resnet, transformer  # noqa: F401  (registers the built-ins)
from kegnet.models.registry import (
    create_model,
    create_sequence_model,
    list_models,
    list_sequence_models,
    register_model,
    register_sequence_model,
)

__all__ = [
    "create_model", "create_sequence_model", "list_models", "list_sequence_models", "register_model",
    "register_sequence_model",
]
