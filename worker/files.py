"""Where a job's files are, for the task: one interface, two places.

``JobFiles.workspace(job)`` gives the task its teacher files, its evaluation set and an output directory for
as long as it runs; ``publish`` hands the finished artifacts back. The task (worker/tasks.py) has one shape
whichever is used:

- ``SharedVolume``: the API's own storage directory, mounted on this host (one machine, or a shared volume).
  The inputs are read in place and the artifacts are written straight into the job's output directory.
- ``OverHttp``: a worker on another host (``KEGNET_API_URL`` set). The inputs are downloaded from the API's
  internal endpoints into a private temp directory, the pipeline runs there, the artifacts are uploaded, and
  the directory is deleted: the worker keeps nothing, and never opens the API's storage directory.

``job_files(settings, credential)`` picks one from the settings.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from jobs.settings import Settings
from jobs.storage import EVAL_SET_NAME, LocalStorage, checkpoint_name
from kegnet.artifacts import MANIFEST
from worker.transfer import ApiTransfer, TransferError

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class Workspace:
    checkpoints: list[Path]
    eval_set: Path | None
    out_dir: Path


class JobFiles(Protocol):
    # True when artifacts travel after the run (the task shows an "upload" stage then).
    uploads: bool

    def workspace(self, job: dict[str, Any]) -> contextlib.AbstractContextManager[Workspace]: ...
    def publish(self, workspace: Workspace, artifacts: dict[str, dict[str, Any]]) -> None: ...


class SharedVolume:
    """The API's storage directory, mounted here: nothing to move."""

    uploads = False

    def __init__(self, storage: LocalStorage) -> None:
        self.storage = storage

    @contextlib.contextmanager
    def workspace(self, job: dict[str, Any]) -> Iterator[Workspace]:
        job_id = job["id"]
        out_dir = self.storage.out_dir(job_id)
        out_dir.mkdir(parents=True, exist_ok=True)
        yield Workspace(checkpoints=[self.storage.checkpoint_path(job_id, i) for i in range(len(job["checkpoints"]))],
                        eval_set=self.storage.eval_set_path(job_id) if job.get("eval_set") else None,
                        out_dir=out_dir)

    def publish(self, workspace: Workspace, artifacts: dict[str, dict[str, Any]]) -> None:
        """The pipeline wrote them in place."""


class OverHttp:
    """The API's internal endpoints, with the job's worker credential; a private temp directory meanwhile."""

    uploads = True

    def __init__(self, api_url: str, credential: str | None, settings: Settings, tmp_root: Path | None = None) -> None:
        self.api_url, self.credential, self.settings, self.tmp_root = api_url, credential, settings, tmp_root
        self._transfer: ApiTransfer | None = None

    @property
    def transfer(self) -> ApiTransfer:
        if self._transfer is None:
            raise RuntimeError("publish must be called inside workspace()")
        return self._transfer

    @contextlib.contextmanager
    def workspace(self, job: dict[str, Any]) -> Iterator[Workspace]:
        if not self.credential:
            raise TransferError("this worker fetches files from the API (KEGNET_API_URL), but the job's message "
                                "carries no worker credential: set the same KEGNET_WORKER_SECRET on the API")
        s = self.settings
        self._transfer = ApiTransfer(self.api_url, job["id"], self.credential, attempts=s.transfer_attempts,
                                     rate_bytes_s=s.transfer_rate_bytes_s)
        root = Path(tempfile.mkdtemp(prefix=f"kegnet-job-{job['id'][:8]}-", dir=self.tmp_root))
        try:
            checkpoints = []
            for i, recorded in enumerate(job["checkpoints"]):
                # The API's own names (the same run on both kinds of worker), and the hash it recorded at
                # submission: a file changed since then is refused.
                dest = root / checkpoint_name(i)
                self.transfer.download(f"checkpoints/{i}", dest, recorded["sha256"], self.settings.max_upload_bytes)
                checkpoints.append(dest)
            eval_set = None
            if job.get("eval_set"):
                eval_set = root / EVAL_SET_NAME
                self.transfer.download("eval-set", eval_set, job["eval_set"]["sha256"], self.settings.max_eval_bytes)
            out_dir = root / "out"
            out_dir.mkdir()
            yield Workspace(checkpoints=checkpoints, eval_set=eval_set, out_dir=out_dir)
        finally:
            shutil.rmtree(root, ignore_errors=True)
            self._transfer.close()
            self._transfer = None

    def publish(self, workspace: Workspace, artifacts: dict[str, dict[str, Any]]) -> None:
        """Every artifact, the manifest last (it lists the others' hashes)."""
        for name in sorted(artifacts, key=lambda n: n == MANIFEST):
            self.transfer.upload(name, workspace.out_dir / name, artifacts[name]["sha256"])
        log.info("uploaded %d artifacts to the API", len(artifacts))


def job_files(settings: Settings, credential: str | None) -> JobFiles:
    """``OverHttp`` when this worker has ``KEGNET_API_URL``, else ``SharedVolume`` on ``KEGNET_DATA_DIR``."""
    if settings.api_url:
        return OverHttp(settings.api_url, credential, settings)
    return SharedVolume(LocalStorage(settings.data_dir))
