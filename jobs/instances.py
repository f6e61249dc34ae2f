"""Which API processes are alive, so what a dead one held (cap slots, Idempotency-Key claims, temp uploads)
can be let go at once instead of after ``reservation_ttl_s``.

Each API process makes an instance id at start-up (``host:pid:tag``) and keeps a short-lived liveness key
(``P:instance:<id>``, TTL ``instance_ttl_s``) refreshed every ``instance_beat_s`` while it runs; the ids are
listed in ``P:instances`` so a survivor can find the dead ones. What an instance holds is recorded in its hash
``P:instance:<id>:held`` (``slot:<token>`` -> owner, ``idem:<job id>`` -> {"owner", "key"}).

An instance is dead when its liveness key is gone, or, without waiting for the TTL, when it ran on this host
(same hostname, so the same pid namespace) and its pid is no longer running or is now another instance's
(a restarted container's API is often pid 1 again). Replicas on other hosts are judged by the key only, so
they never release each other's live reservations.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import uuid
from typing import Any

import redis

log = logging.getLogger(__name__)


def new_instance_id() -> str:
    """``host:pid:tag``; the tag (12 hex digits) is unique per start and names the instance's temp uploads."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


def instance_tag(instance_id: str) -> str:
    return instance_id.rsplit(":", 1)[-1]


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True


def dead_on_this_host(instance_id: str, me: str | None) -> bool:
    """True when ``instance_id`` ran on this host and its process is gone (or its pid is ours now)."""
    host, _, rest = instance_id.partition(":")
    pid_text, _, _tag = rest.partition(":")
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    if me is not None and instance_id != me and me.split(":")[:2] == [host, pid_text]:
        return True  # the same pid on the same host is one process at a time: that one is us, so it is gone
    return not _pid_running(int(pid_text))


class InstanceRegistry:
    """The liveness keys and the per-instance record of what each instance holds."""

    def __init__(self, client: redis.Redis, prefix: str, me: str | None = None, ttl_s: float = 15.0) -> None:
        self.r = client
        self.p = prefix
        self.me = me
        self.ttl_ms = max(1, int(ttl_s * 1000))

    def _alive_key(self, instance_id: str) -> str:
        return f"{self.p}:instance:{instance_id}"

    def held_key(self, instance_id: str) -> str:
        return f"{self.p}:instance:{instance_id}:held"

    @property
    def _registry(self) -> str:
        return f"{self.p}:instances"

    def beat(self) -> None:
        """Say this instance is alive for another ``ttl``; called at start-up and every ``instance_beat_s``."""
        if self.me is None:
            return
        pipe = self.r.pipeline()
        pipe.set(self._alive_key(self.me), "1", px=self.ttl_ms)
        pipe.sadd(self._registry, self.me)
        pipe.execute()

    def alive(self, instance_id: str) -> bool:
        if instance_id == self.me:
            return True
        return bool(self.r.exists(self._alive_key(instance_id))) and not dead_on_this_host(instance_id, self.me)

    def known(self) -> list[str]:
        return sorted(self.r.smembers(self._registry))

    def dead(self) -> list[str]:
        return [i for i in self.known() if not self.alive(i)]

    def live_tags(self) -> set[str]:
        return {instance_tag(i) for i in self.known() if self.alive(i)}

    def held(self, instance_id: str) -> dict[str, str]:
        return dict(self.r.hgetall(self.held_key(instance_id)))

    def forget(self, instance_id: str) -> None:
        """Drop an instance's liveness key, record and registry entry (after what it held was let go)."""
        pipe = self.r.pipeline()
        pipe.delete(self._alive_key(instance_id), self.held_key(instance_id))
        pipe.srem(self._registry, instance_id)
        pipe.execute()


def idem_field(job_id: str) -> str:
    return f"idem:{job_id}"


def idem_value(owner: str, key: str) -> str:
    return json.dumps({"owner": owner, "key": key})


def parse_held(fields: dict[str, str]) -> tuple[list[tuple[str, str]], list[dict[str, Any]]]:
    """``(slots, claims)`` of a held hash: ``[(owner, token)]`` and ``[{"owner", "key", "job_id"}]``."""
    slots, claims = [], []
    for name, value in fields.items():
        kind, _, ident = name.partition(":")
        if kind == "slot":
            slots.append((value, ident))
        elif kind == "idem":
            try:
                claims.append({**json.loads(value), "job_id": ident})
            except ValueError:
                log.warning("unreadable idempotency record %s=%r", name, value)
    return slots, claims
