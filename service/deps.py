"""FastAPI dependencies: the job store, file storage and the caller's identity (owner id)."""

from __future__ import annotations

import hmac

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from jobs.settings import Settings
from jobs.storage import LocalStorage
from jobs.store import JobStore
from service.keys import KeyStore

DEV_OWNER = "dev"
# Declares the bearer scheme in the OpenAPI schema (/docs gets an "Authorize" button); auto_error=False so
# the 401 below, with its message, stays this API's own.
bearer = HTTPBearer(auto_error=False, scheme_name="bearerAuth",
                    description="an API key made by `python -m service.keys create`")


def get_settings_dep(request: Request) -> Settings:
    return request.app.state.settings


def get_store(request: Request) -> JobStore:
    return request.app.state.store


def get_storage(request: Request) -> LocalStorage:
    return request.app.state.storage


def get_keys(request: Request) -> KeyStore:
    return request.app.state.keys


def current_owner(settings: Settings = Depends(get_settings_dep), keys: KeyStore = Depends(get_keys),
                  credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> str:
    """The owner id of the presented API key; dev mode (no auth) only when explicitly configured."""
    if settings.auth_disabled:
        return DEV_OWNER
    scheme, token = (credentials.scheme, credentials.credentials) if credentials else ("", "")
    owner = keys.lookup(token.strip()) if hmac.compare_digest(scheme.lower(), "bearer") and token else None
    if owner is None:
        raise HTTPException(401, "missing or invalid API key; send 'Authorization: Bearer <key>'",
                            headers={"WWW-Authenticate": "Bearer"})
    return owner
