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
from itertools import islice
from typing import Any
from urllib.parse import unquote_to_bytes

from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.core.errors import error_response
from api.core.unicode import escape_surrogates, first_surrogate

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_JSON_DEPTH = 32  # a job spec is 3 levels deep (config_overrides); json.loads recurses in C
MAX_ISSUES = 20
FORM_CHARSETS = frozenset({"utf-8", "ascii", "latin-1", "iso8859-1"})
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
OFF_LOOP_BYTES = 64 * 1024

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


def _parse(text: str) -> tuple[Any, bool]:
    """The JSON value with ``_Refused`` in place of each number no field can take, and whether
    there is one. Raises ValueError (not JSON) or RecursionError (nested thousands deep)."""
    refused = False

    def keep(value: Any) -> Any:
        nonlocal refused
        refused = refused or type(value) is _Refused
        return value

    def parse_int(text: str) -> Any:  # 18 digits always fit 64 bits: int() alone, the common case
        return int(text) if len(text) <= 18 else keep(_parse_int(text))

    value = json.loads(
        text,
        parse_int=parse_int,
        parse_float=lambda text: keep(_parse_float(text)),
        parse_constant=lambda name: keep(_parse_constant(name)),
    )
    return value, refused


def _surrogate_issue(loc: list[str | int], text: str, index: int) -> dict[str, Any]:
    msg = (
        f"lone UTF-16 surrogate {escape_surrogates(text[index])} at character {index}: send valid "
        "Unicode (a character beyond U+FFFF is a high and a low surrogate together)"
    )
    return {"type": "lone_surrogate", "loc": loc, "msg": msg, "input": text}


Node = tuple[Any, str | int] | None  # (parent node, key): a location, built only for an issue


def _loc(node: Node) -> list[str | int]:
    keys: list[str | int] = []
    while node is not None:
        node, key = node
        keys.append(escape_surrogates(key) if isinstance(key, str) else key)
    return ["body", *reversed(keys)]


def _walk(value: Any, visit: frozenset[type]) -> Iterator[dict[str, Any]]:
    """Issues in a parsed JSON value, depth first, without recursion. ``visit``: the types to
    look into besides dicts and lists (str when the text has a \\u escape, _Refused when a
    number was refused); numbers are never visited."""
    strings = str in visit
    stack: list[tuple[Any, Node, int]] = [(value, None, 0)]
    while stack:
        item, node, depth = stack.pop()
        kind = type(item)
        if kind is str:
            if (index := first_surrogate(item)) is not None:
                yield _surrogate_issue(_loc(node), item, index)
        elif kind is _Refused:
            yield {"type": item.kind, "loc": _loc(node), "msg": item.msg, "input": item.shown}
        elif depth >= MAX_JSON_DEPTH:
            msg = f"JSON nested more than {MAX_JSON_DEPTH} levels deep; a job spec needs 3"
            yield {"type": "json_too_deep", "loc": _loc(node)[:5] + ["..."], "msg": msg, "input": None}
            return  # one is enough: the rest is as deep
        elif kind is dict:
            for key, child in reversed(item.items()):
                if strings and (index := first_surrogate(key)) is not None:
                    yield _surrogate_issue(_loc((node, key)), key, index)
                if type(child) in visit:
                    stack.append((child, (node, key), depth + 1))
        else:
            for i in range(len(item) - 1, -1, -1):
                if type(item[i]) in visit:
                    stack.append((item[i], (node, i), depth + 1))


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
        hint = _byte_hint(body, exc.start)
        return 400, f"body: not valid UTF-8 at byte {exc.start} ({hint}); send JSON as UTF-8"
    try:
        value, refused = _parse(text)
    except RecursionError:
        msg = f"JSON nested more than {MAX_JSON_DEPTH} levels deep; a job spec needs 3"
        return 422, [{"type": "json_too_deep", "loc": ["body"], "msg": msg, "input": None}]
    except ValueError:
        return None
    # A lone surrogate needs a \u escape (raw ones failed UTF-8 above); depth needs brackets.
    strings = "\\u" in text
    if not (strings or refused) and text.count("[") + text.count("{") <= MAX_JSON_DEPTH:
        return None
    visit = frozenset({dict, list} | ({str} if strings else set()) | ({_Refused} if refused else set()))
    issues = list(islice(_walk(value, visit), MAX_ISSUES))
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
    charset = collapse_rfc2231_value(param)
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
            if len(body) > OFF_LOOP_BYTES:  # ~0.3 s a MiB on a busy core: not on the event loop
                problem = await run_in_threadpool(json_body_problem, body)
            else:
                problem = json_body_problem(body)
            if problem:
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
