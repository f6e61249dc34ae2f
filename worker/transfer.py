"""The worker's side of the API's internal endpoints (service/routers/internal.py): one job's files, streamed
both ways with their sha256 checked, retried while the API restarts, optionally rate-capped.

A download is written to ``<dest>.part`` and renamed only once its bytes hash to what the job recorded at
submission; an upload is the file with its digest, which the API checks before keeping anything.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx

log = logging.getLogger(__name__)

CHUNK = 256 * 1024
_RETRY_STATUSES = frozenset({502, 503, 504})


class TransferError(Exception):
    """A file could not be moved between the worker and the API; the message says which and why."""


class _Throttle:
    """Sleeps so that ``rate`` bytes/s (None: unlimited) is not exceeded on average since the start."""

    def __init__(self, rate: int | None) -> None:
        self.rate, self.sent, self.t0 = rate, 0, time.monotonic()

    def __call__(self, n: int) -> None:
        self.sent += n
        if self.rate:
            ahead = self.sent / self.rate - (time.monotonic() - self.t0)
            if ahead > 0:
                time.sleep(ahead)


class ApiTransfer:
    """Moves one job's files with its worker credential: ``download`` inputs, ``upload`` artifacts."""

    def __init__(self, api_url: str, job_id: str, credential: str, attempts: int = 4,
                 rate_bytes_s: int | None = None, timeout_s: float = 60.0) -> None:
        self.base = f"{api_url.rstrip('/')}/internal/v1/jobs/{job_id}"
        self.attempts, self.rate = attempts, rate_bytes_s
        self.client = httpx.Client(headers={"Authorization": f"Bearer {credential}"},
                                   timeout=httpx.Timeout(timeout_s, connect=10.0))

    def close(self) -> None:
        self.client.close()

    def download(self, path: str, dest: Path, sha256: str, max_bytes: int) -> None:
        """GET ``path`` (under the job's internal URL) into ``dest``; its bytes must hash to ``sha256``."""
        self._with_retries(f"download {path}", lambda: self._download_once(path, dest, sha256, max_bytes))

    def upload(self, name: str, src: Path, sha256: str) -> None:
        """PUT ``src`` as the artifact ``name`` with its digest; the API keeps it only if the bytes match."""
        self._with_retries(f"upload {name}", lambda: self._upload_once(name, src, sha256))

    def _download_once(self, path: str, dest: Path, sha256: str, max_bytes: int) -> None:
        part = dest.with_name(dest.name + ".part")
        digest, size, throttle = hashlib.sha256(), 0, _Throttle(self.rate)
        try:
            with self.client.stream("GET", f"{self.base}/{path}") as response, part.open("wb") as out:
                _raise_for_status(response)
                for chunk in response.iter_bytes(CHUNK):
                    size += len(chunk)
                    if size > max_bytes:
                        raise TransferError(f"{path} is larger than this worker's limit of {max_bytes} bytes")
                    digest.update(chunk)
                    out.write(chunk)
                    throttle(len(chunk))
            if digest.hexdigest() != sha256:
                raise TransferError(f"{path}: received sha256 {digest.hexdigest()}, the job recorded {sha256}")
            part.replace(dest)
        finally:
            part.unlink(missing_ok=True)

    def _upload_once(self, name: str, src: Path, sha256: str) -> None:
        size = src.stat().st_size
        throttle = _Throttle(self.rate)

        def body() -> Iterator[bytes]:
            with src.open("rb") as f:
                while chunk := f.read(CHUNK if not self.rate else max(4096, min(CHUNK, self.rate // 4))):
                    yield chunk
                    throttle(len(chunk))

        # Content-Length declared: the API refuses an oversized file before reading it.
        response = self.client.put(f"{self.base}/artifacts/{name}", content=body(),
                                   headers={"X-Checksum-SHA256": sha256, "Content-Length": str(size)})
        _raise_for_status(response)

    def _with_retries(self, what: str, attempt: Callable[[], None]) -> None:
        """Run ``attempt`` until it succeeds, retrying network errors and 502-504 (an API restarting) with
        backoff; any other refusal is final."""
        delay = 1.0
        for i in range(1, self.attempts + 1):
            try:
                attempt()
                return
            except (httpx.TransportError, _Retryable) as exc:
                if i == self.attempts:
                    raise TransferError(f"could not {what} after {i} attempts: {exc}") from None
                log.warning("%s failed (%s); attempt %d of %d in %.0f s", what, exc, i + 1, self.attempts, delay)
                time.sleep(delay)
                delay = min(delay * 2, 30.0)


class _Retryable(Exception):  # noqa: N818
    pass


def _raise_for_status(response: httpx.Response) -> None:
    if response.status_code < 300:
        return
    response.read()
    text = response.text[:300]
    if response.status_code in _RETRY_STATUSES:
        raise _Retryable(f"HTTP {response.status_code}: {text}")
    raise TransferError(f"the API answered {response.status_code}: {text}")
