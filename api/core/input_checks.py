"""Refuse hostile text and numbers before any route sees them (issue 10, section 1).

One ASGI layer checks what every route receives, so no route can forget:
- the path and the query string: percent-decoded, they must be UTF-8 (Starlette would turn bad
  bytes into U+FFFD silently) - else 400 naming the parameter;
- form bodies: only a UTF-8 (or ASCII / Latin-1) charset, since Starlette decodes multipart fields
  with the codec the client names, and ``unicode_escape`` or ``utf-7`` make lone surrogates;
- JSON bodies: UTF-8 (json.loads would accept UTF-16 and raw surrogate bytes), and no value a
  job could not use - a lone surrogate, an integer beyond 64 bits (also the 5000-digit ones that
  made json.loads fail with no position), NaN / Infinity or a float that overflows to it,
  nesting deeper than MAX_JSON_DEPTH - each a 422 issue with its location, as pydantic's are.
Header-derived strings are Latin-1 by HTTP and cannot hold a surrogate; the one the API stores
(Idempotency-Key) is limited to visible ASCII where it is declared (api/routes/jobs.py).
"""

from __future__ import annotations

import codecs
import json
import math
from collections.abc import Iterator
from email.message import Message as EmailMessage
from email.utils import collapse_rfc2231_value
from typing import Any
from urllib.parse import unquote_to_bytes

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.core.errors import error_response
from api.core.unicode import escape_surrogates, first_surrogate

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_JSON_DEPTH = 32  # a job spec is 3 levels deep (config_overrides); json.loads recurses in C
MAX_ISSUES = 20
FORM_CHARSETS = frozenset({"utf-8", "ascii", "latin-1", "iso8859-1"})
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})

Problem = tuple[int, Any]  # (status, detail) of the refusal


class _Refused:
    """What the JSON parser hooks return in place of a number no field can take."""

    def __init__(self, kind: str, msg: str, shown: str) -> None:
        self.kind, self.msg, self.shown = kind, msg, shown


def _parse_int(text: str) -> int | _Refused:
    digits = len(text.lstrip("-"))
    if digits <= 19 and INT64_MIN <= (value := int(text)) <= INT64_MAX:
        return value
    shown = text if digits <= 40 else f"{text[:20]}... ({digits} digits)"
    return _Refused("int_out_of_range", f"integers must lie within {INT64_MIN}..{INT64_MAX} (64 bits)", shown)


def _parse_float(text: str) -> float | _Refused:
    value = float(text)
    if math.isfinite(value):
        return value
    return _Refused("finite_number", "the number overflows a 64-bit float; send a finite number", text[:40])


def _parse_constant(name: str) -> _Refused:
    return _Refused("finite_number", f"{name} is not a JSON number; send a finite number", name)


def _surrogate_issue(loc: list[str | int], text: str, index: int) -> dict[str, Any]:
    msg = (
        f"lone UTF-16 surrogate {escape_surrogates(text[index])} at character {index}: send valid "
        "Unicode (a character beyond U+FFFF is a high and a low surrogate together)"
    )
    return {"type": "lone_surrogate", "loc": loc, "msg": msg, "input": text}


def _walk(value: Any) -> Iterator[dict[str, Any]]:
    """Issues found in a parsed JSON value, depth first, without recursion."""
    stack: list[tuple[list[str | int], Any]] = [(["body"], value)]
    while stack:
        loc, item = stack.pop()
        if isinstance(item, _Refused):
            yield {"type": item.kind, "loc": loc, "msg": item.msg, "input": item.shown}
        elif isinstance(item, str):
            if (index := first_surrogate(item)) is not None:
                yield _surrogate_issue(loc, item, index)
        elif isinstance(item, (dict, list)) and len(loc) > MAX_JSON_DEPTH:
            yield {
                "type": "json_too_deep",
                "loc": loc[:4] + ["..."],
                "msg": f"JSON nested more than {MAX_JSON_DEPTH} levels deep; a job spec needs 3",
                "input": None,
            }
            return  # one is enough: the rest is as deep
        elif isinstance(item, dict):
            for key, child in reversed(item.items()):
                if (index := first_surrogate(key)) is not None:
                    yield _surrogate_issue([*loc, escape_surrogates(key)], key, index)
                stack.append(([*loc, escape_surrogates(key)], child))
        elif isinstance(item, list):
            stack.extend(([*loc, i], child) for i, child in reversed(list(enumerate(item))))


def _byte_hint(data: bytes, start: int) -> str:
    chunk = data[start : start + 3]
    hint = f"bytes {chunk.hex(' ')}"
    if len(chunk) == 3 and chunk[0] == 0xED and chunk[1] >= 0xA0:
        hint += ": a lone UTF-16 surrogate encoded as bytes"
    return hint


def json_body_problem(body: bytes) -> Problem | None:
    """A 400 or 422 refusal for a JSON body, or None (malformed JSON is left to FastAPI's parser,
    which answers 422 with its position)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        return (
            400,
            f"body: not valid UTF-8 at byte {exc.start} ({_byte_hint(body, exc.start)}); send JSON as UTF-8",
        )
    try:
        value = json.loads(
            text, parse_int=_parse_int, parse_float=_parse_float, parse_constant=_parse_constant
        )
    except RecursionError:
        msg = f"JSON nested more than {MAX_JSON_DEPTH} levels deep; a job spec needs 3"
        return 422, [{"type": "json_too_deep", "loc": ["body"], "msg": msg, "input": None}]
    except ValueError:
        return None
    issues = []
    for issue in _walk(value):
        issues.append(issue)
        if len(issues) == MAX_ISSUES:
            break
    return (422, issues) if issues else None


def _not_utf8(raw: bytes) -> str | None:
    """None if ``raw`` percent-decodes to UTF-8, else what is wrong."""
    data = unquote_to_bytes(raw.replace(b"+", b" "))
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"not valid UTF-8 at byte {exc.start} ({_byte_hint(data, exc.start)}); percent-encode UTF-8"
    return None


def url_problem(scope: Scope) -> str | None:
    """What is wrong with the request's path or query string, or None."""
    raw_path = scope.get("raw_path")
    if raw_path and (why := _not_utf8(raw_path)):
        return f"path: {why}"
    for pair in scope.get("query_string", b"").split(b"&"):
        name, _, value = pair.partition(b"=")
        label = unquote_to_bytes(name.replace(b"+", b" ")).decode("utf-8", "replace")
        if why := _not_utf8(name):
            return f"query parameter name {label!r}: {why}"
        if why := _not_utf8(value):
            return f"query parameter {label!r}: {why}"
    return None


def _content_type(scope: Scope) -> EmailMessage:
    message = EmailMessage()
    for name, value in scope.get("headers", []):
        if name == b"content-type":
            message["content-type"] = value.decode("latin-1")
    return message


def _is_json(content_type: EmailMessage) -> bool:
    # The same test as FastAPI's (fastapi/routing.py): no content type at all is read as JSON too.
    if "content-type" not in content_type:
        return True
    subtype = content_type.get_content_subtype()
    return content_type.get_content_maintype() == "application" and (
        subtype == "json" or subtype.endswith("+json")
    )


def charset_problem(content_type: EmailMessage) -> str | None:
    """Refuse a form body in a charset that can decode to lone surrogates (see module doc)."""
    param = content_type.get_param("charset")
    if param is None or content_type.get_content_type() not in (
        "multipart/form-data",
        "application/x-www-form-urlencoded",
    ):
        return None
    charset = collapse_rfc2231_value(param)  # type: ignore[arg-type]
    try:
        name = codecs.lookup(charset).name
    except LookupError:
        name = charset
    if name in FORM_CHARSETS:
        return None
    return f"Content-Type charset {charset[:40]!r} is not supported; send the form as UTF-8"


class InputCheckMiddleware:
    """400 / 422 for hostile paths, query strings, form charsets and JSON bodies (module doc)."""

    def __init__(self, app: ASGIApp, max_json_bytes: int) -> None:
        self.app = app
        self.max_json_bytes = max_json_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        content_type = _content_type(scope)
        if why := url_problem(scope) or charset_problem(content_type):
            await error_response(400, why)(scope, receive, send)
            return
        if scope["method"] in BODY_METHODS and _is_json(content_type):
            try:
                body = await self._read(receive)
            except HTTPException as exc:  # raised by BodyLimitMiddleware (api/core/limits.py)
                await error_response(exc.status_code, exc.detail)(scope, receive, send)
                return
            if problem := json_body_problem(body):
                await error_response(*problem)(scope, receive, send)
                return
            receive = _replay(body, receive)
        await self.app(scope, receive, send)

    async def _read(self, receive: Receive) -> bytes:
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break  # the client left; the app sees an empty body and the disconnect next
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_json_bytes:
                raise HTTPException(413, f"JSON body larger than {self.max_json_bytes} bytes")
            chunks.append(chunk)
            more = message.get("more_body", False)
        return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that hands the app the body already read, then the client's later messages."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
