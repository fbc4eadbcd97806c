"""Keep the server's directory layout out of what tenants read.

Runner errors and log events quote paths (``cannot load a causal LM from /srv/akl/models/x``,
checkpoint directories, Python's own messages). A tenant sees job errors and events through the
API, so before they are stored every occurrence of a configured root is replaced by a short
placeholder: ``<models>/x``. Roots are matched as given and resolved (symbolic links followed),
longest first, so a root inside another keeps its own name.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from api.core.config import Settings

Redact = Callable[[str], str]


def _forms(path: Path | str) -> set[str]:
    given = os.fspath(path)
    full = os.path.abspath(given)
    forms = {full, os.path.realpath(full)}
    if given not in (".", "./") and len(given) > 2:  # a relative root as configured: .akl/models
        forms.add(given.rstrip("/"))
    return forms


def make_redactor(settings: Settings) -> Redact:
    """A function that replaces the settings' roots (and the Python install) in a text."""
    named: dict[str, str] = {}
    roots = [
        ("<data>", settings.data_root),
        ("<models>", settings.models_root),
        ("<artifacts>", settings.artifacts_root),
        ("<files>", settings.files_root),
        ("<caches>", settings.caches_root),
        ("<python>", sys.prefix),
        ("<python>", sys.base_prefix),
    ]
    for placeholder, root in roots:
        if root is None:
            continue
        for form in _forms(root):
            if form not in ("/", "") and form not in named:
                named[form] = placeholder
    ordered = sorted(named.items(), key=lambda kv: len(kv[0]), reverse=True)

    def redact(text: str) -> str:
        for path, placeholder in ordered:
            if path in text:
                text = text.replace(path, placeholder)
        return text

    return redact


def redact_value(value: Any, redact: Redact) -> Any:
    """``redact`` applied to every string inside a JSON-like value."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: redact_value(v, redact) for k, v in value.items()}
    if isinstance(value, list):
        return [redact_value(v, redact) for v in value]
    return value
