"""Architectures from the libraries people train with: ``torchvision:<name>`` and ``timm:<name>``.

Only names that the library's own registry lists are built (``torchvision.models.list_models`` of the
classification models, ``timm.list_models``), never pretrained (no weights are fetched), and only with the
keyword arguments listed here: each is a plain number or switch. Arguments that could name a file or fetch
something (timm's ``checkpoint_path``, ``pretrained_cfg``, torchvision's ``weights``) are never passed.
The libraries are imported on first use, so importing kegnet stays cheap.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable
from typing import Any

from torch import nn

# Keyword arguments a client may pass on, with the types and bounds they must respect.
TORCHVISION_KWARGS: dict[str, tuple[type, float, float]] = {
    "dropout": (float, 0.0, 0.99),
    "attention_dropout": (float, 0.0, 0.99),
    "stochastic_depth_prob": (float, 0.0, 0.99),
    "width_mult": (float, 0.05, 4.0),
    "aux_logits": (bool, 0, 1),
    "transform_input": (bool, 0, 1),
    "init_weights": (bool, 0, 1),
    "image_size": (int, 4, 1024),   # torchvision ViTs: the input side (default: the spec's)
}
TIMM_KWARGS: dict[str, tuple[type, float, float]] = {
    "drop_rate": (float, 0.0, 0.99),
    "drop_path_rate": (float, 0.0, 0.99),
    "img_size": (int, 4, 1024),     # timm ViTs: the input side they were trained at
    "patch_size": (int, 1, 64),
}
SOURCES = ("torchvision", "timm")


def split_arch(arch: str) -> tuple[str, str]:
    """``"timm:resnet18"`` -> ``("timm", "resnet18")``; a built-in name -> ``("kegnet", name)``."""
    source, sep, name = arch.partition(":")
    return (source, name) if sep else ("kegnet", arch)


def _check_kwargs(source: str, allowed: dict[str, tuple[type, float, float]], kwargs: dict[str, Any]) -> None:
    for key, value in kwargs.items():
        if key not in allowed:
            raise ValueError(f"{source} architectures take only {', '.join(sorted(allowed))} in arch_kwargs, "
                             f"not {key!r} (input_shape and num_classes come from the spec)")
        kind, lo, hi = allowed[key]
        ok = isinstance(value, bool) if kind is bool else (
            isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
            and (kind is float or float(value).is_integer()) and lo <= value <= hi)
        if not ok:
            what = "true or false" if kind is bool else f"a{'n integer' if kind is int else ' number'} in {lo}..{hi}"
            raise ValueError(f"{key} must be {what}, got {value!r}")


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """``"; did you mean resnet18?"`` for the closest of ``known`` names (difflib), or ``""``."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


def unknown_model(source: str, name: str) -> str:
    """What to say about a model ``source`` does not list: the closest names it does, and where the list is."""
    known = torchvision_names() if source == "torchvision" else timm_names()
    hint = did_you_mean(name, known)
    where = "torchvision.models.list_models()" if source == "torchvision" else "timm.list_models()"
    return f"unknown {source} model {name!r}{hint or f'; see {where}'}"


def check_library_name(source: str, name: str) -> None:
    """Raise ``ValueError`` (with a suggestion) unless ``source`` lists ``name``."""
    if source == "torchvision" and name not in torchvision_names():
        raise ValueError(unknown_model(source, name))
    if source == "timm":
        import timm

        if not timm.is_model(name) or "." in name:
            raise ValueError(unknown_model(source, name))


def torchvision_names() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))  # classification models only


def build_torchvision(name: str, input_shape: tuple[int, ...], num_classes: int, **kwargs: Any) -> nn.Module:
    """``torchvision.models.get_model(name, weights=None, num_classes=...)``; torchvision nets take 3 channels."""
    import torchvision

    check_library_name("torchvision", name)
    _check_kwargs("torchvision", TORCHVISION_KWARGS, kwargs)
    if len(input_shape) != 3 or input_shape[0] != 3:
        raise ValueError("torchvision models take 3,H,W images (replicate grey images to 3 channels, or use timm: "
                         "its models take in_chans from the input shape)")
    if name.startswith("vit_") and "image_size" not in kwargs:
        kwargs["image_size"] = input_shape[1]  # torchvision ViTs are built for one input side
    if name in ("googlenet", "inception_v3"):
        kwargs.setdefault("aux_logits", False)  # auxiliary heads exist only in training; weights often lack them
        kwargs.setdefault("init_weights", False)  # scipy's truncated normal is slow and the weights are loaded
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)


def timm_names() -> list[str]:
    import timm

    return timm.list_models()


def build_timm(name: str, input_shape: tuple[int, ...], num_classes: int, **kwargs: Any) -> nn.Module:
    """``timm.create_model(name, pretrained=False, num_classes=..., in_chans=...)``."""
    import timm

    check_library_name("timm", name)
    _check_kwargs("timm", TIMM_KWARGS, kwargs)
    if len(input_shape) != 3:
        raise ValueError("timm models take C,H,W images")
    return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=input_shape[0], **kwargs)


def library_version(source: str) -> str | None:
    if source not in SOURCES:
        return None
    module = __import__(source)
    return str(module.__version__)


__all__ = ["SOURCES", "TIMM_KWARGS", "TORCHVISION_KWARGS", "build_timm", "build_torchvision", "check_library_name",
           "did_you_mean", "library_version", "split_arch", "timm_names", "torchvision_names", "unknown_model"]
