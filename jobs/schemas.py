"""The job request: what a caller asks for, stored with the job and read back by the worker."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from kegnet.config import JobConfig
from kegnet.spec import ModelSpec


class JobRequest(BaseModel):
    """The ``spec`` form field of ``POST /v1/jobs``: the model, the config of its task (``ClassifierConfig`` for
    ``task: classify``, ``SequenceJobConfig`` for ``task: sequence``; sections of another task are refused),
    the seed and the device."""

    model_config = ConfigDict(extra="forbid")

    model: ModelSpec
    config: JobConfig
    seed: int = Field(0, ge=0, le=2**31 - 1)
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @model_validator(mode="before")
    @classmethod
    def _config_of_the_models_task(cls, data: Any) -> Any:
        """The config is read as the model's task's: ``config.task`` defaults to ``model.task``."""
        if not isinstance(data, dict):
            return data
        model, config = data.get("model"), data.get("config")
        task = (model.get("task") if isinstance(model, dict) else getattr(model, "task", None)) or "classify"
        if config is None:
            config = {}
        if isinstance(config, dict) and "task" not in config:
            config = {**config, "task": task}
        return {**data, "config": config}

    @model_validator(mode="after")
    def _config_matches_the_model(self) -> JobRequest:
        if self.config.task != self.model.task:
            raise ValueError(f"config.task is {self.config.task!r} but model.task is {self.model.task!r}")
        return self
