"""Run events: plain dicts (see docs/architecture.md, "Events"), a JSON-lines writer, error codes.

Every event is a dict whose first key is ``type``; numbers are plain Python floats/ints so that
``json.dumps`` never meets a tensor. The sink writes each event to ``events.jsonl`` (appending, so
a resumed run continues the file) and hands it to an optional callback.
"""

from __future__ import annotations

import errno
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

Event = dict[str, Any]

ERROR_CODES = (
    "invalid_spec",
    "model_not_found",
    "tokenizer_mismatch",
    "invalid_data",
    "out_of_memory",
    "disk_full",
    "nan_loss",
    "no_gpu",
    "invalid_cache",  # a teacher cache that is corrupt, truncated, or built for other data / settings
    "internal_error",
)

# models.ModelError's "invalid_model" (a directory that is not a loadable causal LM, bad
# config_overrides) has no code of its own in the contract: report it as model_not_found.
CODE_ALIASES = {"invalid_model": "model_not_found"}

STEP_STATS = ("g_head", "g_tail", "w_head", "fkl", "rkl", "head_size")


class DistillError(RuntimeError):
    """A run failed; ``code`` is one of ERROR_CODES. The `error` event has already been emitted."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def _plain(value: Any) -> Any:
    """Tensors / numpy scalars -> Python numbers; non-finite floats stay floats (json writes NaN)."""
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return float(value)


def make_event(type_: str, **fields: Any) -> Event:
    """An event dict with ``type`` first and plain values."""
    return {"type": type_, **{k: _plain(v) for k, v in fields.items()}}


def step_event(
    *,
    step: int,
    total_steps: int,
    epoch: float,
    loss: float,
    ce: float,
    kd: float,
    lr: float,
    grad_norm: float,
    tokens: int,
    trained_tokens: int,
    tokens_per_s: float,
    stats: dict[str, float],
) -> Event:
    """The per-optimizer-step event, with the AKL gap history (missing stats are NaN)."""
    gaps = {k: float(stats.get(k, math.nan)) for k in STEP_STATS}
    return make_event(
        "step",
        time=time.time(),  # unix seconds: the metric point's timestamp and the job's ETA
        step=int(step),
        total_steps=int(total_steps),
        epoch=float(epoch),
        loss=float(loss),
        ce=float(ce),
        kd=float(kd),
        lr=float(lr),
        grad_norm=float(grad_norm),
        tokens=int(tokens),
        trained_tokens=int(trained_tokens),
        tokens_per_s=float(tokens_per_s),
        **gaps,
    )


def dumps(event: Event) -> str:
    """One JSON line (no newline). NaN is written as null so that strict JSON readers accept it."""
    return json.dumps(json_safe(event), separators=(",", ":"), allow_nan=False)


def json_safe(value: Any) -> Any:
    """Non-finite floats -> None, recursively (strict JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value


class EventSink:
    """Writes events to a JSON-lines file and forwards them to a callback. Either may be None
    (non-zero DDP ranks get a sink with neither)."""

    def __init__(self, path: Path | None = None, callback: Callable[[Event], None] | None = None):
        self.path = path
        self.callback = callback
        self._file = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def __call__(self, event: Event) -> None:
        if self._file is not None:
            self._file.write(dumps(event) + "\n")
            self._file.flush()
        if self.callback is not None:
            self.callback(event)

    def emit(self, type_: str, **fields: Any) -> Event:
        event = make_event(type_, **fields)
        self(event)
        return event

    def log(self, message: str, level: str = "info") -> None:
        self.emit("log", level=level, message=message)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_events(path: Path) -> list[Event]:
    """All events of an events.jsonl file (a torn last line, from a crash, is skipped)."""
    events = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return events


def classify_error(exc: BaseException) -> tuple[str, str]:
    """Map an exception to (stable error code, message for the user)."""
    if isinstance(exc, DistillError):
        return exc.code, exc.message
    code = getattr(exc, "code", None)
    code = CODE_ALIASES.get(code, code) if isinstance(code, str) else code
    if isinstance(code, str) and code in ERROR_CODES:
        return code, str(exc)
    try:
        import pydantic

        if isinstance(exc, pydantic.ValidationError):
            return "invalid_spec", str(exc)
    except ImportError:  # pragma: no cover
        pass
    try:
        import torch

        if isinstance(exc, torch.OutOfMemoryError):
            return (
                "out_of_memory",
                f"out of memory: {exc}. Lower training.batch_size or max_length, "
                "raise grad_accum, or enable gradient_checkpointing / loss.fused.",
            )
    except (ImportError, AttributeError):  # pragma: no cover
        pass
    if isinstance(exc, MemoryError):
        return "out_of_memory", "out of host memory; lower training.batch_size or max_length"
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return "disk_full", f"no space left on device: {exc}"
    return "internal_error", f"{type(exc).__name__}: {exc}"
