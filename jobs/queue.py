"""What the API and the worker agree on: the Celery task that carries a job id, its queue, and the files a
finished job leaves in its output directory (the only names the API serves as artifacts).

The API sends the task by name (it never imports the worker); the worker registers it under the same name.
"""

from __future__ import annotations

from kegnet.artifacts import ARTIFACT_NAMES

TASK_NAME = "worker.tasks.compress_job"
QUEUE = "gpu"

__all__ = ["ARTIFACT_NAMES", "QUEUE", "TASK_NAME"]
