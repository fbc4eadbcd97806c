"""Run events as the trainer emits them: plain dicts checked against the run contract
(akl_core/contract.py: the models, the codes, the names), a JSON-lines writer, error mapping.

Every event is a dict whose first key is ``type``; numbers are plain Python floats/ints so that
``json.dumps`` never meets a tensor. The sink writes each event to ``events.jsonl`` (appending, so
a resumed run continues the file) and hands it to an optional callback.
"""

from __future__ import annotations

import errno
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from akl_core.contract import (  # noqa: F401 - re-exported: the trainer and the CLI import them here
    CODE_ALIASES,
    ERROR_CODES,
    STEP_STATS,
    Event,
    dumps,
    open_for_append,
    read_events,
    validate,
)
from akl_core.contract import finite as json_safe  # noqa: F401


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
    """An event dict with ``type`` first and plain values, validated against the contract
    (akl_core/contract.py): a field it does not name raises pydantic.ValidationError."""
    return validate({"type": type_, **{k: _plain(v) for k, v in fields.items()}})


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


class EventSink:
    """Writes events to a JSON-lines file and forwards them to a callback. Either may be None
    (non-zero DDP ranks get a sink with neither)."""

    def __init__(
        self,
        path: Path | None = None,
        callback: Callable[[Event], None] | None = None,
        *,
        check: Callable[[Event], Event] = validate,
    ):
        self.path = path
        self.callback = callback
        self.check = check  # the contract's validate; a cache build's validate_cache_event
        self._file = None
        if path is not None:
            self._file = open_for_append(path)  # closed in close()

    def __call__(self, event: Event) -> None:
        if self._file is not None:
            self._file.write(dumps(event) + "\n")
            self._file.flush()
        if self.callback is not None:
            self.callback(event)

    def emit(self, type_: str, **fields: Any) -> Event:
        event = self.check({"type": type_, **{k: _plain(v) for k, v in fields.items()}})
        self(event)
        return event

    def log(self, message: str, level: str = "info") -> None:
        self.emit("log", level=level, message=message)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


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
