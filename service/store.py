"""Job state in Redis, under our own keys (Celery's task state is not used: it says PENDING for any id).

Keys (``P`` is the configured prefix):
- ``P:job:<id>``            hash: the job's fields (JSON for nested ones)
- ``P:job:<id>:events``     list: progress and status events, JSON; an event's ``seq`` is its index + 1
- ``P:owner:<owner>:jobs``  sorted set: the owner's job ids scored by creation time (µs)
- ``P:owner:<owner>:active`` / ``P:active``  sets of non-terminal job ids (for the caps and the reaper)
- ``P:idem:<owner>:<key>``  the job an Idempotency-Key created, with the hash of the request body
- ``P:workers``             sorted set: worker name scored by its last heartbeat

Status changes go through one Lua script that checks the current status, so a terminal status never
changes even when the API (cancel, reaper) and the worker race.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import redis

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLING, CANCELLED = (
    "queued", "running", "succeeded", "failed", "cancelling", "cancelled",
)
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED})
ACTIVE = frozenset({QUEUED, RUNNING, CANCELLING})
_JSON_FIELDS = ("metrics", "request", "artifacts", "checkpoints")

# ARGV: new status ("" keeps it), allowed current statuses (comma list), terminal flag, job id, then
# field/value pairs. KEYS: job hash, global active set, owner's active set.
_TRANSITION = """
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then return 0 end
local ok = false
for s in string.gmatch(ARGV[2], '[^,]+') do if s == cur then ok = true end end
if not ok then return 0 end
if ARGV[1] ~= '' then redis.call('HSET', KEYS[1], 'status', ARGV[1]) end
for i = 5, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
if ARGV[3] == '1' then
  redis.call('SREM', KEYS[2], ARGV[4])
  redis.call('SREM', KEYS[3], ARGV[4])
end
return 1
"""


def now() -> float:
    return time.time()


class JobStore:
    def __init__(self, client: redis.Redis, prefix: str = "kegnet", max_events: int = 2000) -> None:
        self.r = client
        self.p = prefix
        self.max_events = max_events
        self._transition = self.r.register_script(_TRANSITION)

    @classmethod
    def from_url(cls, url: str, prefix: str = "kegnet", max_events: int = 2000) -> JobStore:
        # Short timeouts: a stuck Redis must surface as an error, not hang a request forever.
        client = redis.Redis.from_url(url, decode_responses=True, socket_timeout=10, socket_connect_timeout=5)
        return cls(client, prefix, max_events)

    # ---- keys
    def _job(self, job_id: str) -> str:
        return f"{self.p}:job:{job_id}"

    def _events(self, job_id: str) -> str:
        return f"{self.p}:job:{job_id}:events"

    def _owner_jobs(self, owner: str) -> str:
        return f"{self.p}:owner:{owner}:jobs"

    def _owner_active(self, owner: str) -> str:
        return f"{self.p}:owner:{owner}:active"

    @property
    def _active(self) -> str:
        return f"{self.p}:active"

    # ---- jobs
    def create(self, owner: str, request: dict[str, Any], *, sha256: str, size: int,
               request_hash: str, job_id: str | None = None,
               checkpoints: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """A queued job. ``sha256``/``size`` describe its first checkpoint file; ``checkpoints`` lists every
        file in order (``{"sha256", "size"}``; default: the first only)."""
        job_id = job_id or uuid.uuid4().hex
        t = now()
        fields = {
            "id": job_id, "owner": owner, "status": QUEUED, "stage": "", "progress": "0",
            "metrics": "{}", "error": "", "created_at": repr(t), "started_at": "", "finished_at": "",
            "updated_at": repr(t), "request": json.dumps(request), "checkpoint_sha256": sha256,
            "checkpoint_size": str(size), "artifacts": "{}", "cancel_requested": "0", "heartbeat": "",
            "request_hash": request_hash,
            "checkpoints": json.dumps(checkpoints or [{"sha256": sha256, "size": size}]),
        }
        pipe = self.r.pipeline()
        pipe.hset(self._job(job_id), mapping=fields)
        pipe.zadd(self._owner_jobs(owner), {job_id: int(t * 1e6)})
        pipe.sadd(self._active, job_id)
        pipe.sadd(self._owner_active(owner), job_id)
        pipe.rpush(self._events(job_id), json.dumps({"type": "status", "status": QUEUED, "time": t}))
        pipe.execute()
        return self.get(job_id)  # type: ignore[return-value]

    def get(self, job_id: str) -> dict[str, Any] | None:
        raw = self.r.hgetall(self._job(job_id))
        if not raw:
            return None
        job: dict[str, Any] = dict(raw)
        for key in _JSON_FIELDS:
            job[key] = json.loads(job.get(key) or "{}")
        for key in ("created_at", "started_at", "finished_at", "updated_at", "heartbeat", "progress"):
            job[key] = float(job[key]) if job.get(key) else None
        job["checkpoint_size"] = int(job.get("checkpoint_size") or 0)
        if not job["checkpoints"]:  # jobs created before several checkpoints were possible
            job["checkpoints"] = [{"sha256": job.get("checkpoint_sha256", ""), "size": job["checkpoint_size"]}]
        job["cancel_requested"] = job.get("cancel_requested") == "1"
        return job

    def get_for(self, job_id: str, owner: str) -> dict[str, Any] | None:
        """The job if ``owner`` owns it; another caller's job is indistinguishable from a missing one."""
        job = self.get(job_id)
        return job if job and job["owner"] == owner else None

    def transition(self, job_id: str, new_status: str, allowed_from: set[str] | frozenset[str],
                   event: dict[str, Any] | None = None, **fields: Any) -> bool:
        """Set ``new_status`` (and ``fields``) only if the current status is in ``allowed_from``."""
        owner = self.r.hget(self._job(job_id), "owner")
        if owner is None:
            return False
        t = now()
        fields.setdefault("updated_at", repr(t))
        if new_status in TERMINAL:
            fields.setdefault("finished_at", repr(t))
        args: list[str] = [new_status, ",".join(sorted(allowed_from)), "1" if new_status in TERMINAL else "0",
                           job_id]
        for k, v in fields.items():
            args += [k, json.dumps(v) if k in _JSON_FIELDS else str(v)]
        done = bool(self._transition(keys=[self._job(job_id), self._active, self._owner_active(owner)],
                                     args=args))
        if done and new_status:
            ev = {"type": "status", "status": new_status, "time": t, **(event or {})}
            self.add_event(job_id, ev)
        return done

    def update_running(self, job_id: str, **fields: Any) -> bool:
        """Write progress fields while the job is still running or cancelling (never after it ended)."""
        return self.transition(job_id, "", {RUNNING, CANCELLING}, **fields)

    def request_cancel(self, job_id: str) -> str | None:
        """Queued jobs are cancelled at once; running ones are asked to stop. Returns the new status."""
        if self.transition(job_id, CANCELLED, {QUEUED}, cancel_requested="1"):
            return CANCELLED
        if self.transition(job_id, CANCELLING, {RUNNING}, cancel_requested="1"):
            return CANCELLING
        job = self.get(job_id)
        return job["status"] if job else None

    def cancel_requested(self, job_id: str) -> bool:
        return self.r.hget(self._job(job_id), "cancel_requested") == "1"

    def heartbeat(self, job_id: str) -> None:
        self.update_running(job_id, heartbeat=repr(now()))

    def delete(self, job_id: str) -> bool:
        job = self.get(job_id)
        if not job or job["status"] not in TERMINAL:
            return False
        pipe = self.r.pipeline()
        pipe.delete(self._job(job_id), self._events(job_id))
        pipe.zrem(self._owner_jobs(job["owner"]), job_id)
        pipe.execute()
        return True

    def list_for(self, owner: str, limit: int, cursor: int | None) -> tuple[list[dict[str, Any]], int | None]:
        """Newest first. ``cursor`` is the score (µs) of the last job of the previous page (exclusive)."""
        hi = f"({cursor}" if cursor is not None else "+inf"
        rows = self.r.zrevrangebyscore(self._owner_jobs(owner), hi, "-inf", start=0, num=limit + 1,
                                       withscores=True)
        jobs = [j for jid, _ in rows[:limit] if (j := self.get(jid))]
        next_cursor = int(rows[limit - 1][1]) if len(rows) > limit else None
        return jobs, next_cursor

    # ---- events
    def add_event(self, job_id: str, event: dict[str, Any]) -> int | None:
        """Append an event unless the list is full (status events always fit: they get 10 spare slots)."""
        key = self._events(job_id)
        limit = self.max_events + (10 if event.get("type") == "status" else 0)
        if self.r.llen(key) >= limit:
            return None
        return int(self.r.rpush(key, json.dumps(event)))

    def events(self, job_id: str, after: int = 0, limit: int = 500) -> list[dict[str, Any]]:
        raw = self.r.lrange(self._events(job_id), after, after + limit - 1)
        return [{"seq": after + i + 1, **json.loads(e)} for i, e in enumerate(raw)]

    # ---- caps, idempotency, reaping
    def active_count(self, owner: str | None = None) -> int:
        return int(self.r.scard(self._owner_active(owner) if owner else self._active))

    def active_ids(self) -> list[str]:
        return list(self.r.smembers(self._active))

    def idempotency_get(self, owner: str, key: str) -> dict[str, str] | None:
        raw = self.r.get(f"{self.p}:idem:{owner}:{key}")
        return json.loads(raw) if raw else None

    def idempotency_claim(self, owner: str, key: str, request_hash: str, job_id: str,
                          ttl_s: int = 7 * 24 * 3600) -> dict[str, str]:
        """Record ``key -> job``; returns what is recorded (another request's claim if it won the race)."""
        name = f"{self.p}:idem:{owner}:{key}"
        value = {"request_hash": request_hash, "job_id": job_id}
        if self.r.set(name, json.dumps(value), nx=True, ex=ttl_s):
            return value
        return json.loads(self.r.get(name) or json.dumps(value))

    def worker_heartbeat(self, name: str) -> None:
        self.r.zadd(f"{self.p}:workers", {name: now()})

    def live_workers(self, within_s: float) -> list[str]:
        return list(self.r.zrangebyscore(f"{self.p}:workers", now() - within_s, "+inf"))

    def ping(self) -> bool:
        return bool(self.r.ping())
