"""A 401 on every /v1 path, known or not, before anything else reads the request.

The ``CurrentTenant`` dependency (api/deps.py) checks the key of the routes that exist; this
middleware answers the others, and answers before a body is read or validated, so a client without
a valid key learns that first (issue 13: "a missing or wrong key is a 401 on every /v1 path").
The tenant it found is left in ``scope["state"]`` for the dependency, which then reads no key twice.
"""

from __future__ import annotations

from sqlalchemy.exc import OperationalError
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Receive, Scope, Send

from api.core.config import Settings
from api.core.errors import error_response
from api.crud import api_keys as api_keys_crud
from api.db.session import get_engine, session_factory

UNAUTHORIZED = "a valid API key is required: Authorization: Bearer <key>"
TENANT_STATE = "tenant_id"


def bearer_key(authorization: str | None) -> str | None:
    """The key of an ``Authorization: Bearer <key>`` header, else None."""
    scheme, _, key = (authorization or "").partition(" ")
    key = key.strip()
    return key if scheme.lower() == "bearer" and key else None


def unauthorized_response():
    return error_response(401, UNAUTHORIZED, headers={"WWW-Authenticate": "Bearer"})


def is_versioned(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/")


class ApiKeyMiddleware:
    """401 for a /v1 request without a valid, unrevoked key; else the tenant id in the scope."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not is_versioned(scope["path"]):
            await self.app(scope, receive, send)
            return
        header = next((v for k, v in scope.get("headers", []) if k == b"authorization"), b"")
        key = bearer_key(header.decode("latin-1"))
        try:
            tenant_id = None if key is None else await run_in_threadpool(self._tenant_id, key)
        except OperationalError:
            await error_response(503, "the database is unavailable; retry later")(scope, receive, send)
            return
        if tenant_id is None:
            await unauthorized_response()(scope, receive, send)
            return
        scope.setdefault("state", {})[TENANT_STATE] = tenant_id
        await self.app(scope, receive, send)

    def _tenant_id(self, key: str) -> int | None:
        with session_factory(get_engine(self.settings.database_url))() as session:
            tenant = api_keys_crud.authenticate(session=session, key=key)
            return None if tenant is None else tenant.id
