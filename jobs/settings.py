"""Typed settings shared by the API and the worker, read from ``KEGNET_*`` environment variables."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from kegnet.config import MAX_TEACHERS


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KEGNET_", env_file=None, extra="ignore")

    redis_url: str = "redis://127.0.0.1:6379/0"
    # Celery's broker; defaults to the same Redis as the job store (our keys are prefixed "kegnet:").
    broker_url: str | None = None
    data_dir: Path = Path("./kegnet-data")
    key_prefix: str = Field("kegnet", pattern=r"^[a-z0-9_:-]{1,32}$")

    auth_disabled: bool = False
    # The cap on all of a job's checkpoint files together (the body cap adds max_eval_bytes and the overhead).
    max_upload_bytes: int = Field(200 * 1024 * 1024, ge=1024)
    # Checkpoint files in one job (a teacher ensemble); the library's own bound is the ceiling.
    max_teachers: int = Field(MAX_TEACHERS, ge=1, le=MAX_TEACHERS)
    # Room for the multipart framing and the JSON spec on top of the file itself.
    form_overhead_bytes: int = Field(256 * 1024, ge=1024)
    # The optional labelled evaluation set (kegnet/evaluation.py): its own cap, so it never eats into the
    # checkpoints' (the body cap is checkpoints + evaluation set + form overhead), and its sample count.
    max_eval_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    # kegnet.evaluation.DEFAULT_MAX_SAMPLES, written out: importing it would load torch into every settings user.
    max_eval_samples: int = Field(10_000, ge=1)
    # Largest model a job may describe, counted on the meta device before anything is allocated
    # (ViT-B/16 has 86 M, ResNet-50 26 M).
    max_parameters: int = Field(200_000_000, ge=1_000)
    # The whole job's estimated peak memory and compute (kegnet/cost.py, from the teacher, input size and
    # config), refused before it is queued. The defaults admit the fast and paper presets on a 224x224x3
    # ResNet-18 (estimated 25 GiB, 1.6e17 MACs: the paper preset's generators) with room for the estimate's
    # error, and every bench scenario (32x32 inputs: under 2 GiB and 1e15 MACs); 64 GiB fits an 80 GB GPU.
    max_job_memory_bytes: int = Field(64 * 1024 ** 3, ge=1024 ** 2)
    max_job_macs: float = Field(5e17, ge=1e9)
    max_active_jobs_per_key: int = Field(2, ge=1)
    max_queued_jobs: int = Field(50, ge=1)
    # A submission holds a slot under both caps from before its upload is read until its job is created or
    # it is refused; the slot of a request that died expires after this. An Idempotency-Key whose job does
    # not exist this long after it was claimed is free again.
    reservation_ttl_s: float = Field(900.0, ge=1)
    # Upload checks load the weights in the API process: bound how many run at once (memory).
    max_concurrent_validations: int = Field(2, ge=1)
    retry_after_s: int = Field(30, ge=1)
    # Event streams (SSE) one key may hold open at once, over all API replicas (jobs/streams.py).
    max_event_streams_per_key: int = Field(8, ge=1)
    # Each API process renews a liveness key this often, which expires after instance_ttl_s: the slots and
    # Idempotency-Key claims of an instance whose key expired (killed) are released (jobs/instances.py).
    # Open event streams hold leases of the same TTL.
    instance_beat_s: float = Field(5.0, gt=0)
    instance_ttl_s: float = Field(15.0, gt=0)

    # Worker limits. The hard limit kills the child; the soft one lets the task record a clear failure.
    soft_time_limit_s: int = Field(6 * 3600, ge=5)
    hard_time_limit_s: int = Field(6 * 3600 + 300, ge=10)
    heartbeat_interval_s: float = Field(5.0, gt=0)
    # A running job whose heartbeat is older than this is declared lost by the reaper.
    heartbeat_stale_s: float = Field(60.0, gt=0)
    # A job still queued after this long (its message was lost) is failed by the reaper.
    queued_stale_s: float = Field(7 * 24 * 3600, gt=0)
    reaper_interval_s: float = Field(15.0, gt=0)
    progress_write_interval_s: float = Field(1.0, ge=0)
    max_events_per_job: int = Field(2000, ge=10)
    # The worker's validate stage runs each uploaded teacher once in a child process (kegnet.isolation) with
    # this much memory above its imports, and this much wall time, before the job loads it.
    validate_memory_bytes: int = Field(8 * 1024 ** 3, ge=64 * 1024 ** 2)
    validate_timeout_s: float = Field(600.0, gt=0)
    # CPU threads for torch in a job (None: torch's default). On a shared or busy CPU host, 1-2 threads
    # avoid oversubscription, which was measured to slow small models down by ~100x.
    torch_threads: int | None = Field(None, ge=1, le=256)

    # Workers on other hosts (README "Workers on other hosts"). The API signs each job a credential with this
    # secret (jobs/credentials.py) and sends it in the job's message; a worker presents it to the API's
    # internal endpoints. Unset on the API: those endpoints answer 404 and jobs carry no credential.
    worker_secret: SecretStr | None = None
    # Set on a worker: it fetches the job's inputs from this API and uploads the artifacts back, and needs no
    # shared volume (data_dir is then never opened). Unset: the shared-volume worker of one host.
    api_url: str | None = Field(None, pattern=r"^https?://[^\s]+$")
    # The worker's transfers: attempts per file (a restarting API), and an optional rate cap in bytes/s for a
    # shared or metered link between the hosts.
    transfer_attempts: int = Field(4, ge=1, le=20)
    transfer_rate_bytes_s: int | None = Field(None, ge=1024)

    @field_validator("worker_secret", "api_url", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        # ``KEGNET_WORKER_SECRET=`` in an env file means "not set", as an absent line does.
        return None if value == "" else value

    @field_validator("worker_secret")
    @classmethod
    def _long_enough(cls, secret: SecretStr | None) -> SecretStr | None:
        # An HMAC key a person could guess or brute-force protects nothing: ask for 32 characters or more
        # (e.g. `python -c "import secrets; print(secrets.token_urlsafe(32))"`).
        if secret is not None and len(secret.get_secret_value()) < 32:
            raise ValueError("KEGNET_WORKER_SECRET must be at least 32 characters")
        return secret

    @property
    def celery_broker_url(self) -> str:
        return self.broker_url or self.redis_url


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
