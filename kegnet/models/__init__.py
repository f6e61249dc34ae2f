"""Model architectures: a registry plus the built-in ``lenet5``, ``resnet`` and ``mlp``."""

from kegnet.models import lenet, mlp, resnet  # noqa: F401  (registers the built-ins)
from kegnet.models.registry import create_model, list_models, register_model

__all__ = ["create_model", "list_models", "register_model"]
