"""Valid Unicode in, valid Unicode out.

A lone UTF-16 surrogate (U+D800..U+DFFF) is a Python ``str`` character that no UTF-8 encoder
accepts: JSON's ``"\\ud800"`` escape and the raw bytes ``ED A0 80`` both decode to one (json.loads
decodes bytes with ``surrogatepass``). Stored once, it turned every later page that showed it
into a 500 (RELIABILITY.md, "Hostile input"). api/core/input_checks.py refuses it on the way in;
``replace_surrogates`` keeps rows stored before that from breaking a response on the way out.
"""

from __future__ import annotations

import re
from typing import Any

SURROGATE = re.compile("[\ud800-\udfff]")
REPLACEMENT = "\ufffd"


def first_surrogate(text: str) -> int | None:
    """Index of the first lone surrogate in ``text``, or None."""
    match = SURROGATE.search(text)
    return None if match is None else match.start()


def escape_surrogates(text: str) -> str:
    r"""``text`` with each lone surrogate written as its escape (``\ud800``): safe to show back."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def replace_surrogates(value: Any) -> Any:
    """``value`` with U+FFFD for each lone surrogate in its strings, dict keys included.

    Walks dicts and lists; returns the very same object when nothing needed replacing (the
    common case costs one regex search per string).
    """
    if isinstance(value, str):
        return SURROGATE.sub(REPLACEMENT, value) if SURROGATE.search(value) else value
    if isinstance(value, dict):
        items = [(replace_surrogates(k), replace_surrogates(v)) for k, v in value.items()]
        if all(k is k0 and v is v0 for (k, v), (k0, v0) in zip(items, value.items(), strict=True)):
            return value
        return dict(items)
    if isinstance(value, list):
        new = [replace_surrogates(item) for item in value]
        return value if all(a is b for a, b in zip(new, value, strict=True)) else new
    return value
