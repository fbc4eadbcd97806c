"""Liveness and readiness (no API key needed)."""

from __future__ import annotations

import os
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy import text

from api.core.errors import error_responses
from api.db.session import get_engine
from api.queue import broker_folders, is_filesystem_broker

router = APIRouter(tags=["health"])


@router.get("/healthz", responses=error_responses(400))
def healthz() -> dict[str, str]:
    """The process is up."""
    # `akl serve` tells the API it started from one left over on the same port (akl_cli/serve.py).
    instance = os.environ.get("AKL_SERVE_INSTANCE")
    return {"status": "ok", "instance": instance} if instance else {"status": "ok"}


def _check_database(url: str) -> str | None:
    try:
        with get_engine(url).connect() as connection:
            connection.execute(text("SELECT 1"))
    except Exception as exc:
        return type(exc).__name__
    return None


def _check_broker(request: Request) -> str | None:
    settings = request.app.state.settings
    if is_filesystem_broker(settings.broker_url):
        folder: Path = broker_folders(settings)["queue"]
        return None if folder.is_dir() else f"broker folder {folder} is missing"
    try:
        with request.app.state.celery.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=settings.enqueue_timeout_s)
    except Exception as exc:
        return type(exc).__name__
    return None


class Readiness(BaseModel):
    status: str = Field(description="ok, or unavailable")
    checks: dict[str, str] = Field(description='{"database": "ok" or why not, "broker": ...}')


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={
        **error_responses(400),
        503: {"model": Readiness, "description": "the database or the broker is unreachable"},
    },
)
def readyz(request: Request) -> JSONResponse:
    """The database and the broker are reachable (503 otherwise)."""
    problems = {
        "database": _check_database(request.app.state.settings.database_url),
        "broker": _check_broker(request),
    }
    ok = not any(problems.values())
    body = {"status": "ok" if ok else "unavailable", "checks": {k: v or "ok" for k, v in problems.items()}}
    return JSONResponse(body, status_code=200 if ok else 503)
