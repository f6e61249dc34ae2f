"""What a user tells us about their model: architecture, its arguments, and what it computes.

A classifier (``task: classify``, the default) has an input shape and a class count. ``arch`` is a built-in
name (``lenet5``, ``resnet``, ``mlp``), ``torchvision:<name>``, ``timm:<name>``, or ``onnx`` for an uploaded
ONNX graph, whose input shape and class count may be left out (they are read from the graph:
``kegnet.models.onnx_graph``).

A sequence model (``task: sequence``) is autoregressive: token ids ``(B, T)`` in, next-token logits
``(B, T, V)`` out. Its ``sequence`` section gives the vocabulary size, the longest sequence and the special
tokens; ``arch`` names a sequence architecture (``transformer``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# Bounds keep a stranger's spec from asking for absurd allocations before anything is checked.
MAX_SIDE = 512
MAX_FEATURES = 65_536
MAX_CHANNELS = 16

JsonScalar = str | int | float | bool | None
ArchKwarg = JsonScalar | list[JsonScalar]


MAX_VOCAB = 65_536
MAX_SEQUENCE_LENGTH = 2048


class SequenceSpec(BaseModel):
    """An autoregressive model's vocabulary, longest sequence and special tokens.

    Generation starts from ``bos_id`` and stops at ``eos_id``; ``pad_id`` fills sequences after their end.
    ``sep_id`` (optional) ends a prompt: for models trained on ``prompt SEP answer`` sequences (translation,
    grapheme-to-phoneme), sequence-level targets and model selection decode the part after it.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    vocab_size: int = Field(ge=4, le=MAX_VOCAB)
    max_length: int = Field(ge=4, le=MAX_SEQUENCE_LENGTH, description="longest sequence, BOS and EOS included")
    bos_id: int = Field(ge=0)
    eos_id: int = Field(ge=0)
    pad_id: int = Field(ge=0)
    sep_id: int | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _special_tokens(self) -> SequenceSpec:
        named = {"bos_id": self.bos_id, "eos_id": self.eos_id, "pad_id": self.pad_id, "sep_id": self.sep_id}
        ids = {k: v for k, v in named.items() if v is not None}
        outside = [f"{k}={v}" for k, v in ids.items() if v >= self.vocab_size]
        if outside:
            raise ValueError(f"special token ids must be below vocab_size {self.vocab_size}: {', '.join(outside)}")
        if len(set(ids.values())) != len(ids):
            raise ValueError(f"special tokens must be distinct ids, got {ids}")
        return self


class ModelSpec(BaseModel):
    """Architecture name + keyword arguments, and either input shape (C,H,W or F) and number of classes
    (a classifier) or a ``sequence`` section (an autoregressive model)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    arch: Annotated[str, Field(
        pattern=r"^(?:(?:torchvision|timm):)?[a-z][a-z0-9_]{0,63}$",
        description="built-in name (lenet5, resnet, mlp), torchvision:<name>, timm:<name>, or onnx",
    )]
    arch_kwargs: dict[Annotated[str, Field(pattern=r"^[a-z_][a-z0-9_]{0,63}$")], ArchKwarg] = Field(
        default_factory=dict, max_length=32
    )
    input_shape: tuple[int, ...] | None = Field(None, description="(C, H, W) for images or (F,) for feature vectors; "
                                                             "optional for onnx (read from the graph)")
    num_classes: int | None = Field(None, ge=2, le=10_000, description="optional for onnx (read from the graph)")
    task: Literal["classify", "sequence"] = "classify"
    sequence: SequenceSpec | None = Field(None, description="vocabulary, length and special tokens of a sequence "
                                                            "model (task: sequence)")

    @field_validator("input_shape")
    @classmethod
    def _check_shape(cls, shape: tuple[int, ...] | None) -> tuple[int, ...] | None:
        if shape is None:
            return None
        if len(shape) == 1:
            if not 1 <= shape[0] <= MAX_FEATURES:
                raise ValueError(f"feature count must be in 1..{MAX_FEATURES}, got {shape[0]}")
        elif len(shape) == 3:
            c, h, w = shape
            if not 1 <= c <= MAX_CHANNELS:
                raise ValueError(f"channels must be in 1..{MAX_CHANNELS}, got {c}")
            if not (4 <= h <= MAX_SIDE and 4 <= w <= MAX_SIDE):
                raise ValueError(f"image height and width must be in 4..{MAX_SIDE}, got {h}x{w}")
        else:
            raise ValueError("input_shape must be C,H,W for images or F for feature vectors")
        return shape

    @field_validator("arch_kwargs")
    @classmethod
    def _no_reserved_kwargs(cls, kwargs: dict[str, ArchKwarg]) -> dict[str, ArchKwarg]:
        reserved = sorted(set(kwargs) & {"input_shape", "num_classes", "max_parameters", "name"})
        if reserved:
            raise ValueError(f"{', '.join(reserved)} cannot be given in arch_kwargs (input_shape and num_classes are "
                             "fields of the spec itself)")
        return kwargs

    @model_validator(mode="after")
    def _shape_and_classes_known(self) -> ModelSpec:
        if self.task == "sequence":
            if self.sequence is None:
                raise ValueError("a sequence model needs a 'sequence' section: vocab_size, max_length, bos_id, "
                                 "eos_id, pad_id (and sep_id for prompt SEP answer data)")
            if self.input_shape is not None or self.num_classes is not None:
                raise ValueError("a sequence model has no input_shape or num_classes: its vocabulary and length "
                                 "are in the 'sequence' section")
            if self.arch == "onnx" or ":" in self.arch:
                raise ValueError("sequence models are built-in architectures (transformer); onnx, torchvision "
                                 "and timm models are classifiers")
            return self
        if self.sequence is not None:
            raise ValueError("'sequence' is only for task: sequence")
        if self.arch != "onnx" and (self.input_shape is None or self.num_classes is None):
            raise ValueError("input_shape and num_classes are required (only an onnx graph can supply its own)")
        return self

    @property
    def source(self) -> str:
        """Where the architecture comes from: ``kegnet`` (built-in), ``torchvision``, ``timm`` or ``onnx``."""
        return "onnx" if self.arch == "onnx" else (self.arch.partition(":")[0] if ":" in self.arch else "kegnet")

    @property
    def resolved(self) -> bool:
        """Whether input shape and class count are known (an onnx spec gets them from its graph)."""
        return self.sequence is not None or (self.input_shape is not None and self.num_classes is not None)

    # What the spec's task says about the model itself: the architecture's arguments, an input to probe it
    # with, and the output that input must give. The task's fields are defined here, so their uses are too.
    def model_arguments(self) -> dict[str, Any]:
        """The spec arguments of the architecture's constructor (kegnet.models.registry.SPEC_ARGUMENTS)."""
        if self.sequence is not None:
            return {"vocab_size": self.sequence.vocab_size, "max_length": self.sequence.max_length}
        return {"input_shape": self.input_shape, "num_classes": self.num_classes}

    @property
    def shape_fields(self) -> str:
        """The fields that decide the weights' shapes, for messages."""
        if self.sequence is not None:
            return "sequence.vocab_size, sequence.max_length and arch_kwargs"
        return "input_shape, arch_kwargs and num_classes"

    def probe(self, batch: int = 2) -> tuple[Any, tuple[int, ...], str]:
        """A batch of zeros the model must accept (tokens: BOS), the output shape it must give, and the input
        described for messages."""
        import torch

        if self.sequence is not None:
            tokens = torch.full((batch, 2), self.sequence.bos_id, dtype=torch.long)
            return tokens, (batch, 2, self.sequence.vocab_size), f"tokens of shape ({batch}, 2)"
        assert self.input_shape is not None and self.num_classes is not None
        return torch.zeros(batch, *self.input_shape), (batch, self.num_classes), f"input shape {self.input_shape}"

    @property
    def is_image(self) -> bool:
        return self.input_shape is not None and len(self.input_shape) == 3

    def kwargs(self) -> dict[str, Any]:
        """The keyword arguments passed to the architecture's constructor."""
        return dict(self.arch_kwargs)
