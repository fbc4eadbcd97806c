"""The API's one error shape, its OpenAPI entry, and exception handlers that cannot fail.

Every error answer is OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, so the
``openai`` SDK raises its typed exceptions with our message (issue 13). Beside it, ``detail`` keeps
the older FastAPI shape (a message, or a list of issues each naming its location) as a deprecated
alias for clients written against it (akl_cli/client.py, the dashboard's api/ui/static/js/api.js).
Only ``error_response`` builds the body, and only ``error_responses`` documents it, so a change of
shape is an edit here alone.

A handler that fails turns a 4xx into a 500 or a dropped connection: the request's own input
(echoed in validation errors) may hold lone surrogates, NaN, integers of thousands of digits or
bytes, none of which a strict JSON encoder takes. ``safe_json`` makes any value encodable, and
``error_response`` falls back to a fixed body if even that fails.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from fastapi.utils import is_body_allowed_for_status_code
from pydantic import BaseModel, Field
from sqlalchemy.exc import OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.core.unicode import escape_surrogates

log = logging.getLogger(__name__)

MAX_ECHO_CHARS = 200  # of a request's own input shown back in an error
MAX_TEXT_CHARS = 2000  # of any other string in an error body
MAX_DEPTH = 6
MAX_ITEMS = 50


class ErrorIssue(BaseModel):
    type: str = Field(description="a stable code, e.g. missing, less_than_equal, lone_surrogate")
    loc: list[str | int] = Field(
        description='where: ["body", "training", "max_steps"], ["query", "after"], ...'
    )
    msg: str = Field(description="what is wrong and what to send instead")
    input: Any = Field(None, description="the value received, shortened")
    ctx: dict[str, Any] | None = None


class ErrorObject(BaseModel):
    """OpenAI's error object: what the SDK's exceptions carry as message, type, param and code."""

    message: str = Field(description="what is wrong and what to send instead")
    type: str = Field(description="a class of error: invalid_request_error, authentication_error, ...")
    param: str | None = Field(None, description='the offending field, e.g. "training.max_steps"')
    code: str | None = Field(None, description="a stable code, e.g. not_found, invalid_api_key")


class ErrorBody(BaseModel):
    """Every 4xx and 5xx answer of the API (readiness aside: see GET /readyz)."""

    error: ErrorObject
    detail: str | list[ErrorIssue] = Field(
        description="deprecated alias: the message, or (422) one issue per invalid value with its location",
        json_schema_extra={"deprecated": True},
    )


class ApiError(StarletteHTTPException):
    """An HTTP error that also names the offending parameter and a stable code."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(status_code, message, headers=headers)
        self.param = param
        self.code = code


ERROR_DESCRIPTIONS = {
    400: "malformed request: not valid UTF-8, an unknown cursor, an invalid upload",
    401: "no API key, or an unknown one",
    403: "refused by this server's configuration (e.g. hub models disabled)",
    404: "no such resource for this tenant",
    409: "conflicts with the resource's state or an earlier request",
    413: "request body too large",
    422: "a value is invalid; each issue names its location",
    429: "a per-tenant limit is reached; retry later or free resources",
    500: "internal error (a bug: never caused by input)",
    503: "the database or the broker is unavailable; retry later",
}


def error_responses(*codes: int, **descriptions: str) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for these statuses, each with the error body's schema;
    ``descriptions`` (``s409="..."``) replace the generic text for this route."""
    return {
        code: {"model": ErrorBody, "description": descriptions.get(f"s{code}", ERROR_DESCRIPTIONS[code])}
        for code in codes
    }


def safe_json(value: Any, limit: int = MAX_TEXT_CHARS, depth: int = 0) -> Any:
    """``value`` made encodable by a strict JSON encoder: surrogates escaped, NaN / Infinity and
    huge integers as text, bytes decoded, long strings and lists shortened, deep nesting cut."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value if value.bit_length() <= 64 else f"<an integer of {value.bit_length()} bits>"
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value[: limit * 4]).decode("utf-8", "backslashreplace")
    if isinstance(value, str):
        text = escape_surrogates(value)
        return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"
    if depth >= MAX_DEPTH:
        return "..."
    if isinstance(value, dict):
        items = list(value.items())[:MAX_ITEMS]
        return {str(safe_json(k, limit, depth + 1)): safe_json(v, limit, depth + 1) for k, v in items}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [safe_json(v, limit, depth + 1) for v in list(value)[:MAX_ITEMS]]
    return safe_json(f"<{type(value).__name__}>", limit, depth)


# OpenAI's error types by status (the SDK picks its exception class by status alone).
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
}
ERROR_CODES = {401: "invalid_api_key", 404: "not_found", 409: "conflict", 413: "too_large", 429: "limit"}


def _first_param(issues: list[Any]) -> str | None:
    """The dotted location of the first issue, without its source: ["body", "training", "max_steps"]."""
    loc = issues[0].get("loc") if issues and isinstance(issues[0], dict) else None
    if not isinstance(loc, list):
        return None
    parts = [str(part) for part in loc[1:]] if loc and loc[0] in ("body", "query", "path", "header") else loc
    return ".".join(str(part) for part in parts) or None


def _message(detail: Any) -> str:
    """One line of text: the message, or for a list of issues each issue's location and message."""
    if isinstance(detail, str):
        return detail
    if isinstance(detail, list):
        lines = []
        for issue in detail[:10]:
            if isinstance(issue, dict):
                where = ".".join(str(part) for part in issue.get("loc") or [])
                lines.append(f"{where}: {issue.get('msg')}" if where else str(issue.get("msg")))
        return "; ".join(lines) or "the request is invalid"
    return str(detail)


def error_body(
    status_code: int, detail: Any, *, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """``{"error": {message, type, param, code}, "detail": detail}`` (``detail``: deprecated)."""
    detail = safe_json(detail)
    if param is None and isinstance(detail, list):
        param = _first_param(detail)
    error = {
        "message": _message(detail),
        "type": ERROR_TYPES.get(
            status_code, "server_error" if status_code >= 500 else "invalid_request_error"
        ),
        "param": param,
        "code": code or ERROR_CODES.get(status_code) or ("invalid_value" if status_code == 422 else None),
    }
    return {"error": error, "detail": detail}


def error_response(
    status_code: int,
    detail: Any,
    headers: Mapping[str, str] | None = None,
    *,
    param: str | None = None,
    code: str | None = None,
) -> Response:
    """The error answer (``error_body``), encodable whatever ``detail`` holds."""
    try:
        body = json.dumps(
            error_body(status_code, detail, param=param, code=code),
            ensure_ascii=False,
            allow_nan=False,
            separators=(",", ":"),
        ).encode()
    except Exception:  # safe_json should make this unreachable; never let an error answer fail
        log.exception("could not encode an error body (status %s)", status_code)
        message = ERROR_DESCRIPTIONS.get(status_code, "error")
        fallback = {"message": message, "type": "server_error", "param": None, "code": None}
        body = json.dumps({"error": fallback, "detail": message}).encode()
    return Response(body, status_code=status_code, media_type="application/json", headers=headers)


# Messages from FastAPI that do not say what to send instead (issue 10, section 7).
CLEARER_MESSAGES = {
    "Expected UploadFile": "the multipart part has no filename, so it arrived as a text field; "
    "send it as a file with a filename, e.g. curl -F file=@train.jsonl",
    "^[!-~]+$": "use visible ASCII characters only (no spaces), e.g. a UUID",
    "integer, exceeded maximum size": "integer too long: send one within this parameter's bounds",
}


def _issue(error: dict[str, Any]) -> dict[str, Any]:
    issue: dict[str, Any] = {key: error[key] for key in ("type", "loc", "msg", "ctx") if key in error}
    issue["input"] = safe_json(error.get("input"), limit=MAX_ECHO_CHARS)
    for words, clearer in CLEARER_MESSAGES.items():
        if words in str(issue.get("msg", "")):
            issue["msg"] = clearer
            issue.pop("ctx", None)
    return issue


def validation_issues(exc: RequestValidationError) -> list[dict[str, Any]]:
    try:
        return [_issue(error) for error in exc.errors()]
    except Exception:
        log.exception("could not render a validation error")
        return [{"type": "invalid", "loc": ["request"], "msg": "the request is invalid", "input": None}]


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        return error_response(422, validation_issues(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        if not is_body_allowed_for_status_code(exc.status_code):
            return Response(status_code=exc.status_code, headers=exc.headers)
        param, code = getattr(exc, "param", None), getattr(exc, "code", None)
        return error_response(exc.status_code, exc.detail, headers=exc.headers, param=param, code=code)

    @app.exception_handler(OperationalError)
    async def _database_down(request: Request, exc: OperationalError) -> Response:
        log.error("database error on %s %s: %s", request.method, request.url.path, type(exc.orig).__name__)
        return error_response(503, "the database is unavailable; retry later")

    @app.exception_handler(UnicodeDecodeError)
    async def _bad_encoding(request: Request, exc: UnicodeDecodeError) -> Response:
        return error_response(400, "request is not valid UTF-8")

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> Response:
        # Never echo the exception: it may carry paths or secrets.
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal error")
