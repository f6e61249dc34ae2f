"""Where uploads and artifacts live. Only server-made names are used as paths, never client text."""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from pathlib import Path
from typing import BinaryIO, Protocol

from kegnet.config import MAX_TEACHERS

CHUNK = 1024 * 1024


class UploadTooLarge(Exception):  # noqa: N818
    pass


class Storage(Protocol):
    """What the API and the worker need from file storage (a shared directory today; could be S3)."""

    def checkpoint_path(self, job_id: str, index: int = 0) -> Path: ...
    def out_dir(self, job_id: str) -> Path: ...
    def save_stream(self, src: BinaryIO, max_bytes: int) -> tuple[Path, str, int]: ...
    def commit_checkpoint(self, tmp: Path, job_id: str, index: int = 0) -> Path: ...
    def eval_set_path(self, job_id: str) -> Path: ...
    def commit_eval_set(self, tmp: Path, job_id: str) -> Path: ...
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
        """The job's ``index``-th teacher: ``teacher.ckpt`` (the only one of a one-teacher job), then
        ``teacher.1.ckpt``, ``teacher.2.ckpt``... Names are made here from an int, never from client text."""
        if not (isinstance(index, int) and 0 <= index < MAX_TEACHERS):
            raise ValueError("invalid checkpoint index")
        return self.job_dir(job_id) / ("teacher.ckpt" if index == 0 else f"teacher.{index}.ckpt")

    def out_dir(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "out"

    def save_stream(self, src: BinaryIO, max_bytes: int) -> tuple[Path, str, int]:
        """Copy ``src`` into a new temp file, hashing as it goes; raise ``UploadTooLarge`` past ``max_bytes``."""
        name = f"{self.tmp_tag}-{uuid.uuid4().hex}" if self.tmp_tag else uuid.uuid4().hex
        tmp = self.root / "tmp" / f"{name}.part"
        digest = hashlib.sha256()
        size = 0
        try:
            with tmp.open("wb") as out:
                while chunk := src.read(CHUNK):
                    size += len(chunk)
                    if size > max_bytes:
                        raise UploadTooLarge
                    digest.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return tmp, digest.hexdigest(), size

    def commit_checkpoint(self, tmp: Path, job_id: str, index: int = 0) -> Path:
        return self._commit(tmp, self.checkpoint_path(job_id, index))

    def eval_set_path(self, job_id: str) -> Path:
        """The job's labelled evaluation set (optional): one fixed name, never the client's."""
        return self.job_dir(job_id) / "eval.safetensors"

    def commit_eval_set(self, tmp: Path, job_id: str) -> Path:
        return self._commit(tmp, self.eval_set_path(job_id))

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

