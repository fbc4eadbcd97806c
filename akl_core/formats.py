"""The formats of one line of JSONL training data, parsed into an ``Example``.

Three formats, one JSON object per line (``auto`` detects the format from the first line):
- dolly:            {"instruction": str, "context": str (optional), "response": str}
- prompt_response:  {"prompt": str, "response": str}   ("completion" is accepted for "response")
- messages:         {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]},
                    the last message from the assistant.
Other keys are ignored. Prompts are used verbatim (Dolly through the fixed template below).

No torch or transformers import: the API validates uploads with this module.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

FORMATS = ("auto", "dolly", "prompt_response", "messages")
ROLES = ("system", "user", "assistant")
# The Dolly prompt of MiniLLM / DistiLLM, which the AKL paper's experiments follow.
DOLLY_TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes "
    "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
DOLLY_CONTEXT_TEMPLATE = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{context}\n\n### Response:\n"
)


class DataError(ValueError):
    """Invalid training data; the message names the file, the line and the field."""

    code = "invalid_data"


@dataclass
class Example:
    """One example: either ``prompt`` + ``response`` or chat ``messages``."""

    prompt: str | None = None
    response: str | None = None
    messages: list[dict[str, str]] | None = None
    line: int = 0  # 1-based line in the source file, for messages

    @property
    def is_chat(self) -> bool:
        return self.messages is not None


def as_chat(ex: Example) -> Example:
    """A prompt/response example as a two-turn chat: the prompt (trailing whitespace dropped: the
    template ends the turn) as the user's message, the response as the assistant's. For a chat
    model's own format; a chat example is returned as it is. Used by the demo (scripts/demo.sh)."""
    if ex.is_chat:
        return ex
    assert ex.prompt is not None and ex.response is not None
    messages = [
        {"role": "user", "content": ex.prompt.rstrip()},
        {"role": "assistant", "content": ex.response},
    ]
    return Example(messages=messages, line=ex.line)


class LineParser:
    """One JSONL line -> an Example (None for a blank line); the format is detected from the
    first example unless given. Shared by ``data.parse_jsonl`` and ``data.validate_jsonl_stream``."""

    def __init__(self, name: str, format: str, max_line_bytes: int | None):
        if format not in FORMATS:
            raise DataError(f"{name}: unknown format '{format}'; use one of {', '.join(FORMATS)}")
        self.name, self.max_line_bytes = name, max_line_bytes
        self.detected = None if format == "auto" else format

    def parse(self, raw: bytes, number: int) -> Example | None:
        where = f"{self.name}, line {number}"
        if self.max_line_bytes is not None and len(raw) > self.max_line_bytes:
            raise DataError(
                f"{where}: line is {len(raw)} bytes, more than the limit of {self.max_line_bytes}"
            )
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"{where}: not valid UTF-8 (byte {exc.start})") from None
        if not text.strip():
            return None
        try:
            row = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: invalid JSON: {exc.msg} (column {exc.colno})") from None
        except RecursionError:  # json's decoder on a line nested thousands deep
            raise DataError(f"{where}: nested too deeply to be an example") from None
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
        if self.detected is None:
            self.detected = detect_format(row, where)
        return _parse_row(row, self.detected, where, number)


def detect_format(row: dict[str, Any], where: str = "data") -> str:
    if "messages" in row:
        return "messages"
    if "instruction" in row:
        return "dolly"
    if "prompt" in row:
        return "prompt_response"
    raise DataError(
        f"{where}: cannot detect the format from keys {sorted(row)[:8]}; expected 'messages', "
        "'instruction' + 'response' (Dolly) or 'prompt' + 'response'"
    )


def _string(
    row: dict[str, Any], key: str, where: str, *, required: bool = True, empty_ok: bool = False
) -> str | None:
    value = row.get(key)
    if value is None:
        if required:
            raise DataError(f"{where}: field '{key}' is missing")
        return None
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{key}' must be a string, got {type(value).__name__}")
    _check_unicode(value, f"{where}: field '{key}'")
    if not empty_ok and not value.strip():
        raise DataError(f"{where}: field '{key}' is empty")
    return value


def _check_unicode(value: str, where: str) -> None:
    """Refuse lone UTF-16 surrogates: JSON lets "\\ud800" through, but no tokenizer, database or
    file can encode the text (UTF-8 has no such character)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise DataError(
            f"{where} holds a lone UTF-16 surrogate (\\u{ord(value[exc.start]):04x} at character "
            f"{exc.start}); escape a character outside the BMP as a surrogate pair, or write it as UTF-8"
        ) from None


def _parse_row(row: dict[str, Any], fmt: str, where: str, number: int) -> Example:
    if fmt == "messages":
        return Example(messages=_parse_messages(row.get("messages"), where), line=number)
    if fmt == "dolly":
        instruction = _string(row, "instruction", where)
        context = _string(row, "context", where, required=False, empty_ok=True)
        template = DOLLY_CONTEXT_TEMPLATE if context and context.strip() else DOLLY_TEMPLATE
        dolly_prompt = template.format(instruction=instruction, context=context)
        return Example(prompt=dolly_prompt, response=_string(row, "response", where), line=number)
    # prompt_response
    prompt = _string(row, "prompt", where, empty_ok=True)
    key = "response" if "response" in row or "completion" not in row else "completion"
    return Example(prompt=prompt, response=_string(row, key, where), line=number)


def _parse_messages(messages: Any, where: str) -> list[dict[str, str]]:
    if messages is None:
        raise DataError(f"{where}: field 'messages' is missing")
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: field 'messages' must be a non-empty list")
    out = []
    for i, msg in enumerate(messages):
        at = f"{where}: messages[{i}]"
        if not isinstance(msg, dict):
            raise DataError(f"{at} must be an object with 'role' and 'content'")
        role = msg.get("role")
        if role not in ROLES:
            raise DataError(f"{at}.role must be one of {', '.join(ROLES)}, got {role!r}")
        content = msg.get("content")
        if not isinstance(content, str):
            raise DataError(f"{at}.content must be a string, got {type(content).__name__}")
        _check_unicode(content, f"{at}.content")
        out.append({"role": role, "content": content})
    if out[-1]["role"] != "assistant":
        raise DataError(f"{where}: field 'messages': the last message must have role 'assistant'")
    if not out[-1]["content"].strip():
        raise DataError(f"{where}: field 'messages': the last (assistant) message is empty")
    return out
