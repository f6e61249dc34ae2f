"""Worker credentials: what a worker on another host presents to the API's internal endpoints.

A credential is ``<expiry>.<mac>``: ``expiry`` a Unix time in whole seconds, ``mac`` the hex HMAC-SHA256,
keyed with ``KEGNET_WORKER_SECRET``, of ``kegnet-worker/v1``, the job id and the expiry. The API mints one
when it queues a job and sends it in the job's Celery message; nothing is stored. Why this scheme:

- **Not a user key.** It names no owner and opens only ``/internal/...`` (service/routers/internal.py),
  never ``/v1/...``; a user key opens nothing there.
- **Scoped to one job.** The job id is signed but not written in the credential: the API recomputes the MAC
  with the id in the URL, so job A's credential is simply wrong for job B.
- **Expires with the job.** The signed expiry is as far as a job can live (queued until the reaper gives up
  on it, then run to the hard time limit, then its uploads), and the API also refuses any job that is not
  running: once the job ends, its credential opens nothing, whatever its expiry says.
- **Stateless.** Any API replica verifies it with the shared secret; a GPU host needs only the broker's URL,
  the API's URL and that secret. Changing the secret voids every credential in flight (those jobs fail on
  their worker; resubmit them).
- **In the broker's message.** Whoever reads Redis can read it, but whoever reads Redis can already queue
  tasks and edit jobs: Redis must stay private either way (README "Workers on other hosts").

Compared in constant time; the version tag keeps these MACs from ever meaning anything else.
"""

from __future__ import annotations

import hashlib
import hmac
import time

_TAG = b"kegnet-worker/v1"


def _mac(secret: str, job_id: str, expiry: int) -> str:
    message = b"\n".join((_TAG, job_id.encode(), str(expiry).encode()))
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def mint(secret: str, job_id: str, ttl_s: float, now: float | None = None) -> str:
    """A credential for ``job_id`` valid for ``ttl_s`` seconds from ``now``."""
    expiry = int((time.time() if now is None else now) + ttl_s)
    return f"{expiry}.{_mac(secret, job_id, expiry)}"


def verify(secret: str, job_id: str, credential: str, now: float | None = None) -> bool:
    """Whether ``credential`` was minted for ``job_id`` with ``secret`` and has not expired."""
    expiry_text, sep, mac = credential.partition(".")
    if not sep or not expiry_text.isdigit() or len(expiry_text) > 12:
        return False
    expiry = int(expiry_text)
    if not hmac.compare_digest(mac, _mac(secret, job_id, expiry)):
        return False
    return (time.time() if now is None else now) < expiry


def lifetime_s(queued_stale_s: float, hard_time_limit_s: float, transfer_margin_s: float = 3600) -> float:
    """How long a job may need its credential: queued until the reaper fails it, run to the hard time limit,
    and an hour for its transfers."""
    return queued_stale_s + hard_time_limit_s + transfer_margin_s
