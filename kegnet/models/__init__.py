"""Model architectures: one registry (``create_model(name, **arguments)``, ``@register_model(name, task=...)``)
with the built-in classifiers ``lenet5``, ``resnet`` and ``mlp`` and the sequence model ``transformer`` (a
decoder-only Transformer)."""

from kegnet.models import lenet, mlp, resnet, transformer  # noqa: F401  (registers the built-ins)
from kegnet.models.registry import create_model, list_models, register_model

__all__ = ["create_model", "list_models", "register_model"]
