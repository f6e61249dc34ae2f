"""``/internal/v1/jobs/{id}/...``: what a worker on another host reads and writes, so it needs no shared volume.

A worker downloads the job's teacher files and evaluation set, and uploads its artifacts, with the job's
worker credential (jobs/credentials.py) as a bearer token; user keys open nothing here, and these routes are
off (404) unless ``KEGNET_WORKER_SECRET`` is set. Every transfer carries its sha256: downloads in the
``X-Checksum-SHA256`` header, uploads must send it, and an upload is written to a temp file and renamed
into the job's output directory only once its bytes hash to it. An interrupted, oversized or corrupted
upload leaves nothing in the job's directory (an API killed mid-upload leaves a ``tmp/*.part`` that the next
start-up removes). An uploaded file is not an artifact yet: the job lists it when the worker records the
job's success, after every upload.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from fastapi import APIRouter, Depends, Header, HTTPException, Request
from fastapi.responses import FileResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from jobs import credentials
from jobs.queue import ARTIFACT_NAMES
from jobs.settings import Settings
from jobs.storage import CHUNK, LocalStorage, UploadTooLarge
from jobs.store import CANCELLING, RUNNING, JobStore
from service.deps import get_settings_dep, get_storage, get_store

log = logging.getLogger(__name__)
router = APIRouter(prefix="/internal/v1/jobs/{job_id}", tags=["internal"], include_in_schema=False)
_worker_bearer = HTTPBearer(auto_error=False)

_JOB_ID = re.compile(r"^[0-9a-f]{32}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# A worker only moves files of a job it is running (a cancelling job still uploads nothing it needs, but
# may be mid-transfer when the cancel arrives).
_WORKING = frozenset({RUNNING, CANCELLING})


def worker_job(job_id: str, store: JobStore = Depends(get_store), settings: Settings = Depends(get_settings_dep),
               auth: HTTPAuthorizationCredentials | None = Depends(_worker_bearer)) -> dict:
    """The job the presented worker credential was minted for, while it runs; else 401 (no or a wrong or
    expired credential: another job's fails here too) or 403 (the job is not running)."""
    secret = settings.worker_secret
    if secret is None:
        raise HTTPException(404, "not found")  # remote workers are not enabled on this API
    token = auth.credentials.strip() if auth and auth.scheme.lower() == "bearer" else ""
    if not (_JOB_ID.match(job_id) and token and credentials.verify(secret.get_secret_value(), job_id, token)):
        raise HTTPException(401, "missing, invalid or expired worker credential",
                            headers={"WWW-Authenticate": "Bearer"})
    job = store.get(job_id)
    if job is None or job["status"] not in _WORKING:
        raise HTTPException(403, f"the job is {job['status'] if job else 'gone'}, not running")
    return job


def _file(path: Path, sha256: str) -> FileResponse:
    if not path.is_file():
        raise HTTPException(404, "the file is gone")
    return FileResponse(path, media_type="application/octet-stream", headers={"X-Checksum-SHA256": sha256})


@router.get("/checkpoints/{index}")
def download_checkpoint(index: int, job: dict = Depends(worker_job),
                        storage: LocalStorage = Depends(get_storage)) -> FileResponse:
    if not 0 <= index < len(job["checkpoints"]):
        raise HTTPException(404, f"the job has {len(job['checkpoints'])} checkpoint file(s)")
    return _file(storage.checkpoint_path(job["id"], index), job["checkpoints"][index]["sha256"])


@router.get("/eval-set")
def download_eval_set(job: dict = Depends(worker_job), storage: LocalStorage = Depends(get_storage)) -> FileResponse:
    if not job.get("eval_set"):
        raise HTTPException(404, "the job has no evaluation set")
    return _file(storage.eval_set_path(job["id"]), job["eval_set"]["sha256"])


def artifact_cap(settings: Settings) -> int:
    """The largest artifact a worker may upload: a submission's whole body cap (a student is never larger
    than its teachers, plus its program's graph)."""
    return settings.max_upload_bytes + settings.max_eval_bytes + settings.form_overhead_bytes


@router.put("/artifacts/{name}", status_code=201)
async def upload_artifact(name: str, request: Request, job: dict = Depends(worker_job),
                          storage: LocalStorage = Depends(get_storage),
                          settings: Settings = Depends(get_settings_dep),
                          x_checksum_sha256: str = Header(...)) -> Response:
    """The body is the file; ``X-Checksum-SHA256`` its hex digest. 201 once it is in place, 413 over the cap,
    422 when the bytes do not hash to the digest (nothing is kept)."""
    if name not in ARTIFACT_NAMES:
        raise HTTPException(404, f"no artifact {name!r}; known: {', '.join(ARTIFACT_NAMES)}")
    expected = x_checksum_sha256.strip().lower()
    if not _SHA256.match(expected):
        raise HTTPException(422, "X-Checksum-SHA256 must be 64 hex digits")
    cap = artifact_cap(settings)
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > cap:
        raise HTTPException(413, f"the artifact is larger than {cap} bytes")
    tmp, sha256, size = await _receive(request, storage, cap, f"{job['id']}/{name}")
    if sha256 != expected:
        storage.discard(tmp)
        raise HTTPException(422, f"the upload's sha256 is {sha256}, not {expected}; nothing was kept")
    storage.commit_artifact(tmp, job["id"], name)
    log.info("job %s: artifact %s received (%d bytes, sha256 %s)", job["id"], name, size, sha256[:12])
    return Response(status_code=201)


async def _receive(request: Request, storage: LocalStorage, cap: int, what: str) -> tuple[Path, str, int]:
    """Stream the body into a temp file under ``cap``, in ``CHUNK``-sized writes off the event loop."""
    part = storage.new_part(cap)
    buffer = bytearray()
    try:
        async for chunk in request.stream():
            buffer += chunk
            if len(buffer) >= CHUNK:
                await run_in_threadpool(part.write, bytes(buffer))
                buffer.clear()
        await run_in_threadpool(part.write, bytes(buffer))
        return await run_in_threadpool(part.finish)
    except UploadTooLarge:
        part.abort()
        raise HTTPException(413, f"the artifact is larger than {cap} bytes") from None
    except ClientDisconnect:
        part.abort()
        log.warning("upload of %s interrupted after %d bytes; nothing kept", what, part.size + len(buffer))
        raise HTTPException(400, "the upload was interrupted; nothing was kept") from None
    except BaseException:
        part.abort()
        raise
