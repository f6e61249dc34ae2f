"""What the API and the worker agree on: the Celery task that carries a job id, its queue, and the files a
finished job leaves in its output directory (the only names the API serves as artifacts).

The API sends the task by name (it never imports the worker); the worker registers it under the same name.
"""

from __future__ import annotations

TASK_NAME = "worker.tasks.compress_job"
QUEUE = "gpu"

ARTIFACT_NAMES = ("student.safetensors", "student.pt2", "student.onnx", "manifest.json", "curves.png", "samples.png")
