"""The open event streams (SSE) of each key, counted in Redis under a cap.

Counted in Redis rather than per process: behind a load balancer a per-process count would let one key hold
``cap x replicas`` streams. Each open stream is a lease, a member ``<instance>:<uuid>`` of
``P:owner:<owner>:streams`` scored by its expiry; the stream renews it while it runs, and ends it when it
closes. A crashed API cannot end its leases, so they expire after ``ttl_s`` instead of leaking the count.
"""

from __future__ import annotations

import time
import uuid

import redis

# KEYS: the owner's leases. ARGV: lease id, cap, ttl (ms). Expired leases are dropped first; returns 1 when
# the lease was taken, 0 when the owner already holds ``cap`` live ones.
_OPEN = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]))
return 1
"""

# Renew a lease that still exists (never re-create one the cap check did not admit).
_RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
return 1
"""


class StreamLeases:
    def __init__(self, client: redis.Redis, prefix: str, instance: str, ttl_s: float = 15.0) -> None:
        self.r = client
        self.p = prefix
        self.instance = instance
        self.ttl_s = ttl_s
        self._open = client.register_script(_OPEN)
        self._renew = client.register_script(_RENEW)

    def _key(self, owner: str) -> str:
        return f"{self.p}:owner:{owner}:streams"

    def open(self, owner: str, cap: int) -> str | None:
        """A lease for one more stream of ``owner``, or None when it holds ``cap`` already."""
        lease = f"{self.instance}:{uuid.uuid4().hex}"
        return lease if int(self._open(keys=[self._key(owner)], args=[lease, cap, self._ttl_ms()])) else None

    def renew(self, owner: str, lease: str) -> None:
        self._renew(keys=[self._key(owner)], args=[lease, self._ttl_ms()])

    def close(self, owner: str, lease: str) -> None:
        self.r.zrem(self._key(owner), lease)

    def count(self, owner: str) -> int:
        return int(self.r.zcount(self._key(owner), time.time() * 1000, "+inf"))

    def _ttl_ms(self) -> int:
        return max(1, int(self.ttl_s * 1000))
