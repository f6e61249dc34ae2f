"""Worker credentials (jobs/credentials.py): one job's, until they expire, and only with the server's secret."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from jobs import credentials
from jobs.settings import Settings

SECRET = "s" * 40
JOB_A, JOB_B = "a" * 32, "b" * 32


def test_a_credential_opens_its_own_job_until_it_expires() -> None:
    token = credentials.mint(SECRET, JOB_A, ttl_s=60, now=1000)
    assert credentials.verify(SECRET, JOB_A, token, now=1059)
    assert not credentials.verify(SECRET, JOB_A, token, now=1060)  # expired
    assert not credentials.verify(SECRET, JOB_B, token, now=1000)  # another job's
    assert not credentials.verify("t" * 40, JOB_A, token, now=1000)  # another server's secret


def test_a_tampered_or_malformed_credential_is_refused() -> None:
    token = credentials.mint(SECRET, JOB_A, ttl_s=60, now=1000)
    expiry, mac = token.split(".")
    assert not credentials.verify(SECRET, JOB_A, f"{int(expiry) + 10**6}.{mac}", now=1000)  # expiry pushed out
    assert not credentials.verify(SECRET, JOB_A, f"{expiry}.{mac[:-1]}0" if mac[-1] != "0" else f"{expiry}.{mac[:-1]}1",
                                  now=1000)
    for bad in ("", mac, f"x.{mac}", f"-5.{mac}", f"{'9' * 13}.{mac}"):
        assert not credentials.verify(SECRET, JOB_A, bad, now=1000), bad


def test_the_lifetime_covers_a_queued_then_running_job() -> None:
    s = Settings()
    assert credentials.lifetime_s(s.queued_stale_s, s.hard_time_limit_s) > s.queued_stale_s + s.hard_time_limit_s


def test_a_short_worker_secret_is_refused() -> None:
    with pytest.raises(ValidationError, match="at least 32"):
        Settings(worker_secret="short")
    assert Settings(worker_secret=SECRET).worker_secret.get_secret_value() == SECRET
    assert SECRET not in repr(Settings(worker_secret=SECRET))  # never logged with the settings
