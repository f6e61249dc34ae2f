"""Job state in Redis, under our own keys (Celery's task state is not used: it says PENDING for any id).

Keys (``P`` is the configured prefix):
- ``P:job:<id>``            hash: the job's fields (JSON for nested ones)
- ``P:job:<id>:events``     list: progress and status events, JSON; an event's ``seq`` is its index + 1
- ``P:owner:<owner>:jobs``  sorted set: the owner's job ids scored by creation time (µs)
- ``P:owner:<owner>:active`` / ``P:active``  sets of non-terminal job ids (for the caps and the reaper)
- ``P:owner:<owner>:reserved`` / ``P:reserved``  sorted sets: slots reserved by submissions in flight, scored
  by their expiry time; they count toward the caps like active jobs (``reserve_slot``)
- ``P:idem:<owner>:<key>``  the job an Idempotency-Key created, with the hash of the request body and when the
  claim was made; deleting the job frees it
- ``P:workers``             sorted set: worker name scored by its last heartbeat
- ``P:instances``, ``P:instance:<id>``, ``P:instance:<id>:held``  the API instances, their liveness keys and
  the slots and claims each holds (jobs/instances.py): a dead instance's are let go at once

Status changes go through one Lua script that checks the current status, so a terminal status never
changes even when the API (cancel, reaper) and the worker race.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Any

import redis

from jobs.instances import InstanceRegistry, idem_field, idem_value, parse_held

log = logging.getLogger(__name__)

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLING, CANCELLED = (
    "queued", "running", "succeeded", "failed", "cancelling", "cancelled",
)
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED})
ACTIVE = frozenset({QUEUED, RUNNING, CANCELLING})
_JSON_FIELDS = ("metrics", "request", "artifacts", "checkpoints", "eval_set")
# What a JSON field reads as when the hash lacks it (jobs created before the field existed).
_JSON_DEFAULTS: dict[str, Any] = {"eval_set": None}

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


# A slot under both caps, or why not. KEYS: owner's active set, global active set, owner's reservations,
# global reservations, and optionally the reserving API instance's held hash. ARGV: token, per-owner cap,
# global cap, ttl (ms), owner. Returns 0 (reserved), 1 (the
# owner's cap is reached) or 2 (the global cap is). Expired reservations are dropped first.
_RESERVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)
if redis.call('SCARD', KEYS[1]) + redis.call('ZCARD', KEYS[3]) >= tonumber(ARGV[2]) then return 1 end
if redis.call('SCARD', KEYS[2]) + redis.call('ZCARD', KEYS[4]) >= tonumber(ARGV[3]) then return 2 end
local ttl = tonumber(ARGV[4])
redis.call('ZADD', KEYS[3], now + ttl, ARGV[1])
redis.call('ZADD', KEYS[4], now + ttl, ARGV[1])
redis.call('PEXPIRE', KEYS[3], ttl)
redis.call('PEXPIRE', KEYS[4], ttl)
if KEYS[5] then redis.call('HSET', KEYS[5], 'slot:' .. ARGV[1], ARGV[5]) end
return 0
"""

# Delete KEYS[1] (an idempotency claim) only if it names job ARGV[1].
_RELEASE_CLAIM = """
local v = redis.call('GET', KEYS[1])
if not v then return 0 end
local ok, claim = pcall(cjson.decode, v)
if ok and type(claim) == 'table' and claim['job_id'] == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

KEY_FULL, QUEUE_FULL = "key", "queue"


def now() -> float:
    return time.time()


class JobStore:
    def __init__(self, client: redis.Redis, prefix: str = "kegnet", max_events: int = 2000,
                 instance: str | None = None, instance_ttl_s: float = 15.0) -> None:
        self.r = client
        self.p = prefix
        self.max_events = max_events
        # The API instance whose requests this store serves (None: the worker, tools): what it reserves and
        # claims is recorded under it, so a survivor can release it if this process dies.
        self.instance = instance
        self.instances = InstanceRegistry(client, prefix, instance, instance_ttl_s)
        self._transition = self.r.register_script(_TRANSITION)
        self._reserve = self.r.register_script(_RESERVE)
        self._release_claim = self.r.register_script(_RELEASE_CLAIM)

    @classmethod
    def from_url(cls, url: str, prefix: str = "kegnet", max_events: int = 2000, instance: str | None = None,
                 instance_ttl_s: float = 15.0) -> JobStore:
        # Short timeouts: a stuck Redis must surface as an error, not hang a request forever.
        client = redis.Redis.from_url(url, decode_responses=True, socket_timeout=10, socket_connect_timeout=5)
        return cls(client, prefix, max_events, instance, instance_ttl_s)

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

    def _owner_reserved(self, owner: str) -> str:
        return f"{self.p}:owner:{owner}:reserved"

    @property
    def _reserved(self) -> str:
        return f"{self.p}:reserved"

    def _idem(self, owner: str, key: str) -> str:
        return f"{self.p}:idem:{owner}:{key}"

    def _held(self) -> str | None:
        return self.instances.held_key(self.instance) if self.instance else None

    # ---- jobs
    def create(self, owner: str, request: dict[str, Any], *, sha256: str, size: int,
               request_hash: str, job_id: str | None = None,
               checkpoints: list[dict[str, Any]] | None = None, reservation: str | None = None,
               idempotency_key: str | None = None, eval_set: dict[str, Any] | None = None) -> dict[str, Any]:
        """A queued job. ``sha256``/``size`` describe its first checkpoint file; ``checkpoints`` lists every
        file in order (``{"sha256", "size"}``; default: the first only); ``eval_set`` describes the optional
        labelled evaluation file the same way (None: the job has none). The job takes the place of
        ``reservation`` (``reserve_slot``) in the same transaction; ``idempotency_key`` is the key that
        claimed it, freed when the job is deleted."""
        job_id = job_id or uuid.uuid4().hex
        t = now()
        fields = {
            "id": job_id, "owner": owner, "status": QUEUED, "stage": "", "progress": "0",
            "metrics": "{}", "error": "", "created_at": repr(t), "started_at": "", "finished_at": "",
            "updated_at": repr(t), "request": json.dumps(request), "checkpoint_sha256": sha256,
            "checkpoint_size": str(size), "artifacts": "{}", "cancel_requested": "0", "heartbeat": "",
            "request_hash": request_hash,
            "checkpoints": json.dumps(checkpoints or [{"sha256": sha256, "size": size}]),
            "idempotency_key": idempotency_key or "",
            "eval_set": json.dumps(eval_set),
        }
        pipe = self.r.pipeline()  # MULTI/EXEC: the reservation becomes the active job at once
        if reservation:
            pipe.zrem(self._owner_reserved(owner), reservation)
            pipe.zrem(self._reserved, reservation)
        if held := self._held():  # the job holds the slot and the key now, not this instance
            pipe.hdel(held, idem_field(job_id), *([f"slot:{reservation}"] if reservation else []))
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
            raw_value = job.get(key)
            job[key] = json.loads(raw_value) if raw_value else _JSON_DEFAULTS.get(key, {})
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
        if job.get("idempotency_key"):  # the key no longer names a job: let it create one again
            self.idempotency_release(job["owner"], job["idempotency_key"], job_id)
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

    def reserve_slot(self, owner: str, per_owner_cap: int, global_cap: int, ttl_s: float) -> tuple[str | None, str]:
        """Reserve a place for a job about to be created, atomically under both caps (active jobs and
        other reservations count). Returns ``(token, "")``, or ``(None, KEY_FULL | QUEUE_FULL)``. Hand the
        token to ``create`` (which consumes it) or to ``release_slot``; unused, it expires after ``ttl_s``."""
        token = uuid.uuid4().hex
        keys = [self._owner_active(owner), self._active, self._owner_reserved(owner), self._reserved]
        if held := self._held():
            keys.append(held)
        code = int(self._reserve(keys=keys, args=[token, per_owner_cap, global_cap, max(1, int(ttl_s * 1000)),
                                                  owner]))
        if code == 0:
            return token, ""
        return None, KEY_FULL if code == 1 else QUEUE_FULL

    def release_slot(self, owner: str, token: str) -> None:
        pipe = self.r.pipeline()
        pipe.zrem(self._owner_reserved(owner), token)
        pipe.zrem(self._reserved, token)
        if held := self._held():
            pipe.hdel(held, f"slot:{token}")
        pipe.execute()

    def reserved_count(self, owner: str | None = None) -> int:
        """Reservations not yet expired (expired ones are dropped by the next ``reserve_slot``)."""
        return int(self.r.zcount(self._owner_reserved(owner) if owner else self._reserved, now() * 1000, "+inf"))

    def idempotency_get(self, owner: str, key: str) -> dict[str, Any] | None:
        raw = self.r.get(self._idem(owner, key))
        return json.loads(raw) if raw else None

    def idempotency_claim(self, owner: str, key: str, request_hash: str, job_id: str,
                          ttl_s: int = 7 * 24 * 3600, pending_s: float = 900.0) -> dict[str, Any]:
        """Record ``key -> job``; returns what is recorded (another request's claim if it won the race).

        A stale claim (``claim_is_stale``) is replaced: it names no job and no request can still be creating
        it. The claim records this store's API instance, so it is released if the instance dies.
        """
        name = self._idem(owner, key)
        value: dict[str, Any] = {"request_hash": request_hash, "job_id": job_id, "claimed_at": now()}
        if self.instance:
            value["instance"] = self.instance
        held = self._held()
        if held:
            # Recorded before the claim is made: an instance killed between the two leaves a record of a claim
            # it never made, which release ignores (it deletes a claim only if it names this job); the other
            # order left a claim no record named, which outlived the instance.
            self.r.hset(held, idem_field(job_id), idem_value(owner, key))
        for _ in range(3):
            if self.r.set(name, json.dumps(value), nx=True, ex=ttl_s):
                return value
            raw = self.r.get(name)
            if raw is None:
                continue  # released in between: claim again
            claim: dict[str, Any] = json.loads(raw)
            if not self.claim_is_stale(claim, pending_s):
                break
            log.info("replacing a stale idempotency claim of %s (job %s does not exist)", owner, claim["job_id"])
            self.idempotency_release(owner, key, claim["job_id"])
        if held:
            self.r.hdel(held, idem_field(job_id))  # the key is another request's
        return json.loads(self.r.get(name) or json.dumps(value))

    def claim_is_stale(self, claim: dict[str, Any], pending_s: float) -> bool:
        """A claim naming no job whose request cannot still be creating it: made longer than ``pending_s``
        ago, or by an API instance that is no longer alive (its request died with it)."""
        if not claim.get("job_id") or self.r.exists(self._job(claim["job_id"])):
            return False
        if now() - float(claim.get("claimed_at") or 0) > pending_s:
            return True
        return bool(claim.get("instance")) and not self.instances.alive(claim["instance"])

    def idempotency_state(self, owner: str, key: str, pending_s: float) -> tuple[str, dict[str, Any] | None]:
        """What ``key`` means before a request's body is read: ``("none", None)``; ``("job", claim)`` when
        its job exists; ``("pending", claim)`` while another request may still be creating it; ``("stale",
        claim)`` when nothing will (a new request may take the key)."""
        claim = self.idempotency_get(owner, key)
        if claim is None:
            return "none", None
        if claim.get("job_id") and self.r.exists(self._job(claim["job_id"])):
            return "job", claim
        return ("stale" if self.claim_is_stale(claim, pending_s) else "pending"), claim

    def idempotency_release(self, owner: str, key: str, job_id: str) -> bool:
        """Forget ``key`` if it still names ``job_id`` (never another request's later claim)."""
        if held := self._held():
            self.r.hdel(held, idem_field(job_id))
        return bool(self._release_claim(keys=[self._idem(owner, key)], args=[job_id]))

    def release_dead_instances(self) -> tuple[int, int]:
        """Let go of the slots and pending Idempotency-Key claims of API instances that are no longer alive
        (killed mid-request). Returns ``(slots, claims)`` released. A claim whose job was created stays."""
        slots_freed = claims_freed = 0
        for instance in self.instances.dead():
            slots, claims = parse_held(self.instances.held(instance))
            for owner, token in slots:
                pipe = self.r.pipeline()
                pipe.zrem(self._owner_reserved(owner), token)
                pipe.zrem(self._reserved, token)
                slots_freed += int(pipe.execute()[0])
            for c in claims:
                if not self.r.exists(self._job(c["job_id"])):
                    claims_freed += int(self._release_claim(keys=[self._idem(c["owner"], c["key"])],
                                                            args=[c["job_id"]]))
            self.instances.forget(instance)
            if slots or claims:
                log.warning("API instance %s is gone: released %d slot(s) and %d pending Idempotency-Key "
                            "claim(s) it held", instance, len(slots), len(claims))
        return slots_freed, claims_freed

    def worker_heartbeat(self, name: str) -> None:
        self.r.zadd(f"{self.p}:workers", {name: now()})

    def live_workers(self, within_s: float) -> list[str]:
        return list(self.r.zrangebyscore(f"{self.p}:workers", now() - within_s, "+inf"))

    def ping(self) -> bool:
        return bool(self.r.ping())
