"""Where uploads and artifacts live. Only server-made names are used as paths, never client text."""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from pathlib import Path
from typing import BinaryIO, Protocol

from kegnet.artifacts import ARTIFACT_NAMES
from kegnet.config import MAX_TEACHERS

CHUNK = 1024 * 1024
EVAL_SET_NAME = "eval.safetensors"


def checkpoint_name(index: int) -> str:
    """The ``index``-th teacher file's name: ``teacher.ckpt`` (the only one of a one-teacher job), then
    ``teacher.1.ckpt``, ``teacher.2.ckpt``... Made here from an int, never from client text."""
    if not (isinstance(index, int) and 0 <= index < MAX_TEACHERS):
        raise ValueError("invalid checkpoint index")
    return "teacher.ckpt" if index == 0 else f"teacher.{index}.ckpt"


class UploadTooLarge(Exception):  # noqa: N818
    pass


class PartFile:
    """A temp file written chunk by chunk (an upload as it arrives), hashed and bounded as it goes. Whoever
    opens one calls ``finish`` (the path, sha256 and size) or ``abort`` (removed)."""

    def __init__(self, path: Path, max_bytes: int) -> None:
        self.path, self.max_bytes = path, max_bytes
        self.size = 0
        self._digest = hashlib.sha256()
        self._out: BinaryIO = path.open("wb")

    def write(self, chunk: bytes) -> None:
        """Append ``chunk``; ``UploadTooLarge`` past ``max_bytes`` (the caller aborts)."""
        self.size += len(chunk)
        if self.size > self.max_bytes:
            raise UploadTooLarge
        self._digest.update(chunk)
        self._out.write(chunk)

    def finish(self) -> tuple[Path, str, int]:
        self._out.flush()
        os.fsync(self._out.fileno())
        self._out.close()
        return self.path, self._digest.hexdigest(), self.size

    def abort(self) -> None:
        self._out.close()
        self.path.unlink(missing_ok=True)


class Storage(Protocol):
    """What the API needs from file storage (a directory; could be S3). A worker on the same host reads and
    writes the same directory; a worker elsewhere goes through the API's internal endpoints."""

    def checkpoint_path(self, job_id: str, index: int = 0) -> Path: ...
    def out_dir(self, job_id: str) -> Path: ...
    def save_stream(self, src: BinaryIO, max_bytes: int) -> tuple[Path, str, int]: ...
    def commit_checkpoint(self, tmp: Path, job_id: str, index: int = 0) -> Path: ...
    def eval_set_path(self, job_id: str) -> Path: ...
    def commit_eval_set(self, tmp: Path, job_id: str) -> Path: ...
    def new_part(self, max_bytes: int) -> PartFile: ...
    def commit_artifact(self, tmp: Path, job_id: str, name: str) -> Path: ...
    def discard(self, tmp: Path) -> None: ...
    def delete_job(self, job_id: str) -> None: ...


class LocalStorage:
    """A directory tree: ``tmp/`` for uploads in flight, ``jobs/<id>/`` for a job's input and outputs."""

    def __init__(self, root: Path, tmp_tag: str | None = None) -> None:
        self.root = Path(root)
        # The API instance's tag (jobs/instances.py) starts its temp uploads' names, so after a crash the
        # survivors know which ``.part`` files no live request is writing.
        self.tmp_tag = tmp_tag
        (self.root / "tmp").mkdir(parents=True, exist_ok=True)
        (self.root / "jobs").mkdir(parents=True, exist_ok=True)

    def job_dir(self, job_id: str) -> Path:
        # job ids are uuid hex made by the server; check anyway so a bad id can never escape the root.
        if not (len(job_id) == 32 and all(c in "0123456789abcdef" for c in job_id)):
            raise ValueError("invalid job id")
        return self.root / "jobs" / job_id

    def checkpoint_path(self, job_id: str, index: int = 0) -> Path:
        """The job's ``index``-th teacher (``checkpoint_name``)."""
        return self.job_dir(job_id) / checkpoint_name(index)

    def out_dir(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "out"

    def new_part(self, max_bytes: int) -> PartFile:
        """A new temp upload in ``tmp/``, named with this instance's tag (``clear_orphan_uploads``)."""
        name = f"{self.tmp_tag}-{uuid.uuid4().hex}" if self.tmp_tag else uuid.uuid4().hex
        return PartFile(self.root / "tmp" / f"{name}.part", max_bytes)

    def save_stream(self, src: BinaryIO, max_bytes: int) -> tuple[Path, str, int]:
        """Copy ``src`` into a new temp file, hashing as it goes; raise ``UploadTooLarge`` past ``max_bytes``."""
        part = self.new_part(max_bytes)
        try:
            while chunk := src.read(CHUNK):
                part.write(chunk)
            return part.finish()
        except BaseException:
            part.abort()
            raise

    def commit_checkpoint(self, tmp: Path, job_id: str, index: int = 0) -> Path:
        return self._commit(tmp, self.checkpoint_path(job_id, index))

    def eval_set_path(self, job_id: str) -> Path:
        """The job's labelled evaluation set (optional): one fixed name, never the client's."""
        return self.job_dir(job_id) / EVAL_SET_NAME

    def commit_eval_set(self, tmp: Path, job_id: str) -> Path:
        return self._commit(tmp, self.eval_set_path(job_id))

    def commit_artifact(self, tmp: Path, job_id: str, name: str) -> Path:
        """A whole, checked artifact from a remote worker, renamed into the job's output directory: a reader
        sees the old file or the new one, never part of one. ``name`` must be one of ``ARTIFACT_NAMES``."""
        if name not in ARTIFACT_NAMES:
            raise ValueError("invalid artifact name")
        known = ARTIFACT_NAMES[ARTIFACT_NAMES.index(name)]  # our constant, not the caller's string
        return self._commit(tmp, self.out_dir(job_id) / known)

    @staticmethod
    def _commit(tmp: Path, dest: Path) -> Path:
        """Atomically move an upload to ``dest`` in the job's directory (same file system, so rename is atomic)."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, dest)
        return dest

    def discard(self, tmp: Path) -> None:
        tmp.unlink(missing_ok=True)

    def clear_orphan_uploads(self, live_tags: set[str]) -> int:
        """Remove the temp uploads no live API instance is writing (its process died mid-upload): those whose
        tag is not in ``live_tags``, and untagged ones (from before tags). Returns how many were removed."""
        removed = 0
        for part in (self.root / "tmp").glob("*.part"):
            tag, sep, _ = part.stem.partition("-")
            if sep and tag in live_tags:
                continue
            part.unlink(missing_ok=True)
            removed += 1
        return removed

    def delete_job(self, job_id: str) -> None:
        shutil.rmtree(self.job_dir(job_id), ignore_errors=True)

