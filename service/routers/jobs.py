"""``/v1/jobs``: submit, list, inspect, follow, cancel and delete compression jobs."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Header, HTTPException, Query, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from jobs.schemas import JobRequest
from jobs.settings import Settings
from jobs.storage import LocalStorage, UploadTooLarge
from jobs.store import FAILED, KEY_FULL, QUEUED, TERMINAL, JobStore
from jobs.streams import StreamLeases
from kegnet import preflight
from kegnet.config import TASK_CONFIGS
from kegnet.errors import KegnetError
from kegnet.preflight import Limits
from kegnet.spec import ModelSpec
from service.deps import current_owner, get_settings_dep, get_storage, get_store
from service.schemas import EventPage, JobOut, JobPage

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

_JOB_ID = re.compile(r"^[0-9a-f]{32}$")
_IDEM_KEY = re.compile(r"^[A-Za-z0-9_.:-]{1,200}$")


def owned_job(job_id: str, owner: str = Depends(current_owner), store: JobStore = Depends(get_store)) -> dict:
    """The caller's job; a malformed id, a missing job and someone else's job all read as 404."""
    job = store.get_for(job_id, owner) if _JOB_ID.match(job_id) else None
    if job is None:
        raise HTTPException(404, "no such job")
    return job


@dataclass
class _Held:
    """What a submission in flight holds: a slot under the caps, a claim of its Idempotency-Key naming the job
    it is about to create, and its uploads in temp files. Whatever it still holds when it ends (refused, or the
    job was not created) is given back by ``_let_go``."""

    owner: str
    idempotency_key: str | None
    job_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    reservation: str | None = None
    claimed_job: str | None = None  # set while the key's claim names a job not yet created
    tmps: list[Path] = field(default_factory=list)  # whatever is not committed to a job is removed at the end


@dataclass
class _Upload:
    """A submission's form, read: the parsed spec and the files saved to temp storage, with their digests."""

    job_request: JobRequest
    checkpoint_tmps: list[Path]
    checkpoints: list[dict[str, Any]]  # {"sha256", "size"} per checkpoint file, in upload order
    eval_tmp: Path | None = None
    eval_set: dict[str, Any] | None = None  # {"sha256", "size"} of the evaluation set, if one was sent

    def request_hash(self) -> str:
        """The spec and every file's digest, in order: another file or order is another request. The
        evaluation set's comes last and only when there is one, so requests without it hash as before."""
        canonical = json.dumps(self.job_request.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        digests = "\n".join(f["sha256"] for f in self.checkpoints)
        if self.eval_set:
            digests += f"\neval_set:{self.eval_set['sha256']}"
        return hashlib.sha256(f"{digests}\n{canonical}".encode()).hexdigest()


# The body is read by hand (``_receive``: streamed to disk under the caps, files counted), so FastAPI cannot
# infer it; this describes it for /docs and clients: the form ``submit_job`` reads.
_SUBMIT_BODY = {
    "required": True,
    "content": {"multipart/form-data": {"schema": {
        "type": "object",
        "required": ["checkpoint", "spec"],
        "properties": {
            "checkpoint": {"type": "array", "items": {"type": "string", "format": "binary"},
                           "description": "the teacher: .safetensors, torch.save state dict or .onnx; repeat "
                                          "the field (up to max_teachers) for an ensemble of one architecture"},
            "spec": {"type": "string", "contentMediaType": "application/json",
                     "description": 'JSON {"model": {"arch", "input_shape", "num_classes", ...}, '
                                    '"config": {...}, "seed"?, "device"?}; the config is kegnet.config\'s '
                                    "ClassifierConfig (or SequenceJobConfig)",
                     "example": '{"model": {"arch": "lenet5", "input_shape": [1, 32, 32], "num_classes": 10}, '
                                '"config": {"preset": "fast"}}'},
            "eval_set": {"type": "string", "format": "binary",
                         "description": "optional labelled safetensors file: x (N, *input_shape) float, "
                                        "y (N,) int; accuracy is reported, never trained on"},
        },
    }}},
}


@router.post("", status_code=202, response_model=JobOut, responses={409: {}, 413: {}, 422: {}, 429: {}},
             openapi_extra={"requestBody": _SUBMIT_BODY})
async def submit_job(
    request: Request,
    owner: str = Depends(current_owner),
    store: JobStore = Depends(get_store),
    storage: LocalStorage = Depends(get_storage),
    settings: Settings = Depends(get_settings_dep),
    idempotency_key: str | None = Header(None),
) -> JSONResponse:
    """Multipart form: ``checkpoint`` (safetensors or torch.save state dict) and ``spec`` (JSON).

    ``checkpoint`` may be repeated, up to ``max_teachers`` times, for a teacher ensemble (all of the spec's
    architecture, in the order sent); ``max_upload_bytes`` caps the files together. An optional ``eval_set``
    file (safetensors with ``x`` (N, *input_shape) float and ``y`` (N,) int; at most ``max_eval_bytes`` and
    ``max_eval_samples``) is labelled data the job reports real accuracy on; it is never trained on.
    """
    held = _Held(owner, idempotency_key)
    key_state = await _known_key(store, settings, owner, idempotency_key)
    # Refuse before the upload is read when the caller cannot get a job anyway, and hold the slot until the
    # job exists, so concurrent submissions cannot all pass the caps (replaying a key's job needs no slot; a
    # stale claim names no job, so its request is a new one and reserves like any other).
    held.reservation = None if key_state == "job" else await run_in_threadpool(_reserve, store, settings, owner)
    try:
        upload = await _receive(request, storage, settings, held.tmps)
        request_hash = upload.request_hash()
        if idempotency_key:
            replay = await _claim_key(store, settings, held, request_hash)
            if replay is not None:  # the same request already made its job
                return _accepted(replay, replayed=True)
        await _check_upload(request, upload.checkpoint_tmps, upload.eval_tmp, upload.job_request, settings)
        job = await _create_job(store, storage, held, upload, request_hash)
    finally:
        await _let_go(store, storage, held)
    await _enqueue(request, store, settings, job["id"])
    files = upload.checkpoints
    log.info("job %s queued for owner %s (%d checkpoint(s), %d bytes, sha256 %s; evaluation set: %s)", job["id"],
             owner, len(files), sum(f["size"] for f in files), files[0]["sha256"][:12],
             f"{upload.eval_set['size']} bytes" if upload.eval_set else "none")
    return _accepted(job)


# ---- Idempotency-Key and caps


async def _known_key(store: JobStore, settings: Settings, owner: str, idempotency_key: str | None) -> str:
    """What the caller's Idempotency-Key names, before the body is read (``JobStore.idempotency_state``):
    "none" (no key, or a new one), "job" (its job exists: the body is still read, to replay it or to refuse a
    different request with 422), "stale" (its request died: a new request may take it). A malformed key is a
    422, and a key whose request is still in flight a 409 now, not after the upload."""
    if idempotency_key is None:
        return "none"
    if not _IDEM_KEY.match(idempotency_key):
        raise HTTPException(422, "Idempotency-Key must be 1-200 characters of A-Z a-z 0-9 _ . : -")
    state, _ = await run_in_threadpool(store.idempotency_state, owner, idempotency_key, settings.reservation_ttl_s)
    if state == "pending":
        raise _in_flight(settings)
    return state


def _in_flight(settings: Settings) -> HTTPException:
    return HTTPException(409, "a request with this Idempotency-Key is still being processed; retry shortly",
                         headers={"Retry-After": str(settings.retry_after_s)})


async def _claim_key(store: JobStore, settings: Settings, held: _Held, request_hash: str) -> dict[str, Any] | None:
    """Claim the Idempotency-Key for ``held.job_id``. Returns the existing job to replay when the same request
    already has one; refuses (422) the key used with another request, and (409) a same request still in flight."""
    assert held.idempotency_key
    claim = await run_in_threadpool(store.idempotency_claim, held.owner, held.idempotency_key, request_hash,
                                    held.job_id, pending_s=settings.reservation_ttl_s)
    if claim["job_id"] != held.job_id:
        if claim["request_hash"] != request_hash:
            raise HTTPException(422, "this Idempotency-Key was already used with a different request")
        existing = await run_in_threadpool(store.get, claim["job_id"])
        if existing is None:  # another request with this key is between its claim and its job
            raise _in_flight(settings)
        return existing
    held.claimed_job = held.job_id
    if held.reservation is None:  # the key's job was deleted while this request's body was read
        held.reservation = await run_in_threadpool(_reserve, store, settings, held.owner)
    return None


def _too_many(settings: Settings, what: str) -> HTTPException:
    return HTTPException(429, f"{what}; retry later", headers={"Retry-After": str(settings.retry_after_s)})


def _reserve(store: JobStore, settings: Settings, owner: str) -> str:
    """A slot under the per-key and global caps, held until the job is created (or released on refusal)."""
    token, full = store.reserve_slot(owner, settings.max_active_jobs_per_key, settings.max_queued_jobs,
                                     settings.reservation_ttl_s)
    if token is None:
        if full == KEY_FULL:
            raise _too_many(settings, f"this key already has {settings.max_active_jobs_per_key} active jobs")
        raise _too_many(settings, "the service queue is full")
    return token


def _give_back(store: JobStore, owner: str, reservation: str | None, idempotency_key: str | None,
               claimed_job: str | None) -> None:
    """Free what a refused submission held: its slot, and its Idempotency-Key (the caller may fix the request
    and reuse the key). A store error here is logged: the slot expires and the claim goes stale anyway."""
    try:
        if reservation:
            store.release_slot(owner, reservation)
        if idempotency_key and claimed_job:
            store.idempotency_release(owner, idempotency_key, claimed_job)
    except Exception:
        log.warning("could not free the slot/key of a refused submission by %s", owner, exc_info=True)


async def _let_go(store: JobStore, storage: LocalStorage, held: _Held) -> None:
    """Remove the uploads not committed to a job, and free the slot and key claim a refused submission holds."""
    for tmp in held.tmps:
        storage.discard(tmp)  # no-op once committed
    if held.reservation or held.claimed_job:
        await run_in_threadpool(_give_back, store, held.owner, held.reservation, held.idempotency_key,
                                held.claimed_job)


# ---- the multipart form and the uploads


async def _receive(request: Request, storage: LocalStorage, settings: Settings, tmps: list[Path]) -> _Upload:
    """Read the form and save its files to temp storage, each appended to ``tmps`` as soon as it exists."""
    # The body is capped by BodySizeLimitMiddleware while it streams, so this spool is bounded.
    form = await _read_form(request, settings)
    try:
        uploads, job_request, eval_upload = _form_fields(form, settings)
        checkpoint_tmps: list[Path] = []
        checkpoints: list[dict[str, Any]] = []
        for upload in uploads:
            budget = settings.max_upload_bytes - sum(f["size"] for f in checkpoints)  # one cap for all files
            try:
                tmp, sha256, size = await run_in_threadpool(storage.save_stream, upload.file, budget)
            except UploadTooLarge:
                what = "the checkpoint is" if len(uploads) == 1 else "the checkpoint files together are"
                raise HTTPException(413, f"{what} larger than {settings.max_upload_bytes} bytes") from None
            tmps.append(tmp)
            checkpoint_tmps.append(tmp)
            checkpoints.append({"sha256": sha256, "size": size})
        received = _Upload(job_request, checkpoint_tmps, checkpoints)
        if eval_upload is not None:
            try:  # its own budget: an evaluation set never takes room from the checkpoints
                eval_tmp, sha256, size = await run_in_threadpool(storage.save_stream, eval_upload.file,
                                                                 settings.max_eval_bytes)
            except UploadTooLarge:
                raise HTTPException(413, f"eval_set: the evaluation set is larger than "
                                         f"{settings.max_eval_bytes} bytes; send fewer samples") from None
            tmps.append(eval_tmp)
            received.eval_tmp, received.eval_set = eval_tmp, {"sha256": sha256, "size": size}
        return received
    finally:
        await form.close()


def _form_fields(form: FormData, settings: Settings) -> tuple[list[UploadFile], JobRequest, UploadFile | None]:
    """The form's checkpoint files, its parsed ``spec`` and its optional ``eval_set`` file, or a 422."""
    uploads, spec_text = form.getlist("checkpoint"), form.get("spec")
    if not uploads:
        raise HTTPException(422, "missing file field 'checkpoint'")
    if not all(isinstance(u, UploadFile) for u in uploads):
        raise HTTPException(422, "every 'checkpoint' field must be a file")
    if len(uploads) > settings.max_teachers:
        raise _too_many_files(settings)
    if not isinstance(spec_text, str):
        raise HTTPException(422, "missing form field 'spec' (JSON: {\"model\": {...}, \"config\": {...}})")
    try:
        job_request = JobRequest.model_validate_json(spec_text)
    except ValidationError as exc:
        raise _spec_error(exc) from None
    return uploads, job_request, _eval_upload(form)  # type: ignore[return-value]


def _spec_error(exc: ValidationError) -> HTTPException:
    errors = [{"loc": ["spec", *_without_task_tag(e["loc"])], "msg": e["msg"], "type": e["type"]}
              for e in exc.errors(include_url=False, include_input=False, include_context=False)]
    return HTTPException(422, errors)


def _without_task_tag(loc: tuple[int | str, ...]) -> list[int | str]:
    """``config.<task>.field`` -> ``config.field``: the config is one model per task, and pydantic names the
    one it tried; the client wrote ``config.field``."""
    if len(loc) > 1 and loc[0] == "config" and loc[1] in TASK_CONFIGS:
        return [loc[0], *loc[2:]]
    return list(loc)


def _too_many_files(settings: Settings) -> HTTPException:
    return HTTPException(422, f"too many files: a job takes at most {settings.max_teachers} 'checkpoint' files "
                              "and one 'eval_set'")


def _eval_upload(form: FormData) -> UploadFile | None:
    """The optional ``eval_set`` file: one at most, and a file, not a text field."""
    fields = form.getlist("eval_set")
    if len(fields) > 1:
        raise HTTPException(422, f"eval_set: send at most one 'eval_set' file, got {len(fields)}")
    if fields and not isinstance(fields[0], UploadFile):
        raise HTTPException(422, "eval_set: 'eval_set' must be a file (a safetensors file with 'x' and 'y')")
    return fields[0] if fields else None  # type: ignore[return-value]


async def _read_form(request: Request, settings: Settings) -> FormData:
    """The multipart form, parsed with at most ``max_teachers`` checkpoint files plus one evaluation set (the
    parser stops at the next file)."""
    try:
        return await request.form(max_files=settings.max_teachers + 1, max_fields=4)
    except StarletteHTTPException as exc:
        # Starlette's parser limits answer 400 "Too many files. ..."; say it in this API's terms.
        if exc.status_code == 400 and "too many files" in str(exc.detail).lower():
            raise _too_many_files(settings) from None
        raise


# ---- validation: the checks a job must pass before it is queued


async def _check_upload(request: Request, checkpoint_tmps: list[Path], eval_tmp: Path | None,
                        job_request: JobRequest, settings: Settings) -> ModelSpec:
    """Fail fast on bad uploads (a 422 now, not a failed job after the generators), through the library's
    static preflight (``kegnet.preflight.check_static``): the task's rules, each file's structure, the
    architecture built on the meta device and counted, the files' declared keys and shapes, the task's
    structural checks, the job's cost from the meta model's profile and the evaluation set. Nothing here
    loads weights or runs the model: an upload never runs in the API (the worker's validate stage does
    ``check_model``). Returns the resolved spec (an ONNX graph fills in the input shape and classes)."""
    limits = Limits(max_parameters=settings.max_parameters, max_bytes=settings.max_upload_bytes,
                    max_memory_bytes=settings.max_job_memory_bytes, max_macs=int(settings.max_job_macs),
                    max_eval_samples=settings.max_eval_samples)
    model, config = job_request.model, job_request.config
    try:
        async with request.app.state.validation_slots:  # bounded work, but a thread each: cap them
            spec, cost = await run_in_threadpool(preflight.check_static, checkpoint_tmps, model, config, limits,
                                                 eval_set=eval_tmp)
    except KegnetError as exc:
        raise HTTPException(422, str(exc)) from None
    log.info("job cost estimate: %s", cost.describe())
    return spec


# ---- the job: created, then queued


async def _create_job(store: JobStore, storage: LocalStorage, held: _Held, upload: _Upload,
                      request_hash: str) -> dict[str, Any]:
    """Move the uploads into the job's directory and create the queued job, which takes over the submission's
    slot and Idempotency-Key claim."""
    job_id, files = held.job_id, upload.checkpoints
    for i, tmp in enumerate(upload.checkpoint_tmps):
        storage.commit_checkpoint(tmp, job_id, i)
    if upload.eval_tmp is not None:
        storage.commit_eval_set(upload.eval_tmp, job_id)
    job = await run_in_threadpool(
        lambda: store.create(held.owner, upload.job_request.model_dump(mode="json"), sha256=files[0]["sha256"],
                             size=files[0]["size"], request_hash=request_hash, job_id=job_id, checkpoints=files,
                             reservation=held.reservation, idempotency_key=held.idempotency_key,
                             eval_set=upload.eval_set))
    held.reservation = held.claimed_job = None  # the job holds the slot and the key now
    return job


async def _enqueue(request: Request, store: JobStore, settings: Settings, job_id: str) -> None:
    """Hand the job to the worker; if the queue is unreachable, fail the job and answer 503."""
    try:
        await run_in_threadpool(request.app.state.enqueue, job_id)
    except Exception:
        log.exception("could not queue job %s", job_id)
        store.transition(job_id, FAILED, {QUEUED}, error="the job could not be queued; retry later")
        raise HTTPException(503, "the job queue is unavailable; retry later",
                            headers={"Retry-After": str(settings.retry_after_s)}) from None


def _accepted(job: dict[str, Any], replayed: bool = False) -> JSONResponse:
    headers = {"Location": f"/v1/jobs/{job['id']}"}
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    return JSONResponse(JobOut.from_job(job).model_dump(mode="json"), status_code=202, headers=headers)


@router.get("", response_model=JobPage)
def list_jobs(
    owner: str = Depends(current_owner),
    store: JobStore = Depends(get_store),
    limit: int = Query(20, ge=1, le=100),
    cursor: str | None = Query(None, pattern=r"^\d{1,20}$"),
) -> JobPage:
    jobs, next_cursor = store.list_for(owner, limit, int(cursor) if cursor else None)
    return JobPage(jobs=[JobOut.from_job(j) for j in jobs],
                   next_cursor=str(next_cursor) if next_cursor is not None else None)


@router.get("/{job_id}", response_model=JobOut)
def get_job(job: dict = Depends(owned_job)) -> JobOut:
    return JobOut.from_job(job)


@router.post("/{job_id}/cancel", response_model=JobOut, status_code=202)
def cancel_job(job: dict = Depends(owned_job), store: JobStore = Depends(get_store)) -> JobOut:
    """Queued jobs are cancelled at once; a running job is asked to stop at its next check (cancelling)."""
    if job["status"] in TERMINAL:
        raise HTTPException(409, f"the job already ended ({job['status']})")
    store.request_cancel(job["id"])
    return JobOut.from_job(store.get(job["id"]) or job)


@router.delete("/{job_id}", status_code=204)
def delete_job(job: dict = Depends(owned_job), store: JobStore = Depends(get_store),
               storage: LocalStorage = Depends(get_storage)) -> Response:
    if job["status"] not in TERMINAL:
        raise HTTPException(409, "only finished jobs can be deleted; cancel it first")
    store.delete(job["id"])
    storage.delete_job(job["id"])
    return Response(status_code=204)


@router.get("/{job_id}/events", response_model=EventPage)
async def job_events(
    request: Request,
    job: dict = Depends(owned_job),
    store: JobStore = Depends(get_store),
    after: int = Query(0, ge=0),
    limit: int = Query(500, ge=1, le=1000),
    last_event_id: str | None = Header(None),
) -> Response:
    """Server-sent events with ``Accept: text/event-stream``, else a JSON page of events after ``after``."""
    if "text/event-stream" not in request.headers.get("accept", ""):
        events = await run_in_threadpool(store.events, job["id"], after, limit)
        current = await run_in_threadpool(store.get, job["id"])
        return JSONResponse(EventPage(events=events, next_after=after + len(events),
                                      status=(current or job)["status"]).model_dump(mode="json"))
    start = int(last_event_id) if last_event_id and last_event_id.isdigit() else after
    streams: StreamLeases = request.app.state.streams
    settings: Settings = request.app.state.settings
    lease = await run_in_threadpool(streams.open, job["owner"], settings.max_event_streams_per_key)
    if lease is None:
        raise _too_many(settings, f"this key already has {settings.max_event_streams_per_key} open event streams; "
                                  "close one, or poll without Accept: text/event-stream")
    return StreamingResponse(_leased(_sse(request, store, job["id"], start), streams, job["owner"], lease,
                                     settings.instance_beat_s),
                             media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _leased(events: AsyncIterator[str], streams: StreamLeases, owner: str, lease: str,
                  renew_s: float) -> AsyncIterator[str]:
    """``events``, renewing the stream's lease every ``renew_s`` while it runs and ending it when the stream
    ends (finished, the client left, or the server stops); a crash lets the lease expire instead."""
    renewed = time.monotonic()
    try:
        async for chunk in events:
            yield chunk
            if time.monotonic() - renewed >= renew_s:
                renewed = time.monotonic()
                await run_in_threadpool(streams.renew, owner, lease)
    finally:
        await run_in_threadpool(streams.close, owner, lease)


async def _sse(request: Request, store: JobStore, job_id: str, after: int) -> AsyncIterator[str]:
    idle = 0.0
    while not await request.is_disconnected():
        events = await run_in_threadpool(store.events, job_id, after, 200)
        for ev in events:
            after = ev["seq"]
            yield f"id: {ev['seq']}\nevent: {ev.get('type', 'message')}\ndata: {json.dumps(ev)}\n\n"
        if events:
            idle = 0.0
            continue
        job = await run_in_threadpool(store.get, job_id)
        if job is None or job["status"] in TERMINAL:
            return
        await asyncio.sleep(0.5)
        idle += 0.5
        if idle >= 15:  # keep proxies from closing a quiet stream
            idle = 0.0
            yield ": keep-alive\n\n"
        elif idle % 5 == 0:  # an empty chunk every 5 s: lets _leased renew the lease on a quiet stream
            yield ""
