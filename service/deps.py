"""FastAPI dependencies: the job store, file storage and the caller's identity (owner id)."""

from __future__ import annotations

import hmac

from fastapi import Depends, HTTPException, Request

from jobs.settings import Settings
from jobs.storage import LocalStorage
from jobs.store import JobStore
from service.keys import KeyStore

DEV_OWNER = "dev"


def get_settings_dep(request: Request) -> Settings:
    return request.app.state.settings


def get_store(request: Request) -> JobStore:
    return request.app.state.store


def get_storage(request: Request) -> LocalStorage:
    return request.app.state.storage


def get_keys(request: Request) -> KeyStore:
    return request.app.state.keys


def current_owner(request: Request, settings: Settings = Depends(get_settings_dep),
                  keys: KeyStore = Depends(get_keys)) -> str:
    """The owner id of the presented API key; dev mode (no auth) only when explicitly configured."""
    if settings.auth_disabled:
        return DEV_OWNER
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    owner = keys.lookup(token.strip()) if hmac.compare_digest(scheme.lower(), "bearer") and token else None
    if owner is None:
        raise HTTPException(401, "missing or invalid API key; send 'Authorization: Bearer <key>'",
                            headers={"WWW-Authenticate": "Bearer"})
    return owner
