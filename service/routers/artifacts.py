"""``/v1/jobs/{id}/artifacts``: list and download a finished job's outputs, by known name only."""

from __future__ import annotations

from fastapi import APIRouter, Depends, HTTPException
from fastapi.responses import FileResponse

from jobs.queue import ARTIFACT_NAMES
from jobs.storage import LocalStorage
from service.deps import get_storage
from service.routers.jobs import owned_job
from service.schemas import ArtifactInfo, JobOut

router = APIRouter(prefix="/v1/jobs/{job_id}/artifacts", tags=["artifacts"])

_MEDIA = {".safetensors": "application/octet-stream", ".pt2": "application/zip",
          ".json": "application/json", ".png": "image/png"}


@router.get("", response_model=list[ArtifactInfo])
def list_artifacts(job: dict = Depends(owned_job)) -> list[ArtifactInfo]:
    return JobOut.from_job(job).artifacts


@router.get("/{name}")
def download_artifact(name: str, job: dict = Depends(owned_job),
                      storage: LocalStorage = Depends(get_storage)) -> FileResponse:
    # The path is built from our own constant list, never from the client's text.
    if name not in ARTIFACT_NAMES or name not in job["artifacts"]:
        raise HTTPException(404, f"no artifact {name!r}; available: {', '.join(sorted(job['artifacts'])) or 'none'}")
    known = ARTIFACT_NAMES[ARTIFACT_NAMES.index(name)]
    path = storage.out_dir(job["id"]) / known
    if not path.is_file():
        raise HTTPException(404, "the artifact file is gone")
    suffix = "." + known.rsplit(".", 1)[1]
    return FileResponse(path, media_type=_MEDIA.get(suffix, "application/octet-stream"), filename=known,
                        headers={"X-Checksum-SHA256": job["artifacts"][known]["sha256"]})
