"""The web page: ``/`` (submit, list) and ``/jobs/{id}`` (one job), server-rendered HTML plus one vanilla JS
and one CSS file from ``service/web/static`` (no frontend toolchain), and ``GET /v1/architectures`` that
feeds its architecture field. The page holds no secret: the API key lives in the tab's sessionStorage and
every call is the ordinary API with its Authorization header."""

from __future__ import annotations

import functools
import html
import re
from pathlib import Path

from fastapi import APIRouter, HTTPException, Query
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

WEB_DIR = Path(__file__).resolve().parent.parent / "web"
# No inline script or style, nothing from another host; images are our own or blob: URLs made by the page.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
       "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
           "Cache-Control": "no-store"}
_JOB_ID = re.compile(r"^[0-9a-f]{32}$")

router = APIRouter(include_in_schema=False)
api = APIRouter(prefix="/v1", tags=["architectures"])


@functools.cache
def _template() -> str:
    return (WEB_DIR / "index.html").read_text()


def _page(job_id: str = "") -> HTMLResponse:
    return HTMLResponse(_template().replace("{{job_id}}", html.escape(job_id)), headers=HEADERS)


def static_files() -> StaticFiles:
    return StaticFiles(directory=WEB_DIR / "static")


@router.get("/", response_class=HTMLResponse)
def index() -> HTMLResponse:
    return _page()


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
def job_page(job_id: str) -> HTMLResponse:
    # The page itself is public (it holds no data); the job is fetched by the script with the caller's key.
    if not _JOB_ID.match(job_id):
        raise HTTPException(404, "no such job")
    return _page(job_id)


@functools.cache
def architecture_names() -> tuple[str, ...]:
    """Built-ins, then ``torchvision:`` and ``timm:`` names: the registries' lists, computed once."""
    from kegnet.models.libraries import timm_names, torchvision_names
    from kegnet.models.registry import list_models

    return (*list_models(), *(f"torchvision:{n}" for n in torchvision_names()),
            *(f"timm:{n}" for n in timm_names()), "onnx")


@api.get("/architectures", response_model=list[str])
def architectures(q: str = Query("", max_length=100), limit: int = Query(20, ge=1, le=200)) -> list[str]:
    """Architecture names containing ``q`` (case-insensitive), those starting with it (or with it after
    the library's prefix) first."""
    needle = q.strip().lower()
    hits = [n for n in architecture_names() if needle in n.lower()]
    starts = lambda n: n.lower().startswith(needle) or n.lower().split(":", 1)[-1].startswith(needle)  # noqa: E731
    return sorted(hits, key=lambda n: not starts(n))[:limit]
