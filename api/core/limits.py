"""Bound request bodies before anything parses them (multipart uploads spool to disk otherwise)."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.core.errors import error_response

MULTIPART_OVERHEAD = 64 * 1024


class BodyLimitMiddleware:
    """413 when a body exceeds ``limit_for(path)`` bytes, by Content-Length or while streaming."""

    def __init__(self, app: ASGIApp, limit_for: Callable[[str], int]) -> None:
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["path"])
        detail = f"request body larger than {limit} bytes"
        for name, value in scope.get("headers", []):
            # len() first: int() of a header of thousands of digits raises (a 500 otherwise).
            if name == b"content-length" and value.isdigit() and (len(value) > 18 or int(value) > limit):
                await _send_413(send, detail)
                return
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    # Raised inside the body parser: FastAPI passes HTTPException through as is.
                    raise HTTPException(status_code=413, detail=detail)
            return message

        await self.app(scope, limited_receive, send)


async def _send_413(send: Send, detail: str) -> None:
    response = error_response(413, detail)
    await send({"type": "http.response.start", "status": 413, "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body})
