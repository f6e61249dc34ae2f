"""The job request: what a caller asks for, stored with the job and read back by the worker."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from kegnet.config import PipelineConfig
from kegnet.spec import ModelSpec


class JobRequest(BaseModel):
    """The ``spec`` form field of ``POST /v1/jobs``."""

    model_config = ConfigDict(extra="forbid")

    model: ModelSpec
    config: PipelineConfig = Field(default_factory=PipelineConfig)
    seed: int = Field(0, ge=0, le=2**31 - 1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
