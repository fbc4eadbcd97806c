"""The run contract between the runner (``python -m akl_core.runner``) and the worker.

One torch-free module that both sides import (docs/architecture.md, "Events"): the event models,
the exit codes, the error codes, the per-step metric names, the one NaN cleaner and the one
events.jsonl reader. The trainer builds every event through ``validate`` (``EventSink.emit``), and
the worker validates each line it reads with the same models, so the two cannot drift; the
database columns and the API's metric schema are tied to ``STEP_METRICS`` by
tests/api/test_run_contract.py.

Every event is a JSON object whose first key is ``type``. Numbers that may be NaN (a loss that
diverged, a statistic a loss does not compute) are written as null: strict JSON has no NaN.
"""

from __future__ import annotations

import io
import json
import math
import os
import stat
from pathlib import Path
from typing import Annotated, Any, Literal, TextIO

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

Event = dict[str, Any]

# -- exit codes of the runner process -------------------------------------------------------------
EXIT_COMPLETED, EXIT_FAILED, EXIT_STOPPED = 0, 1, 3

# -- error codes of an `error` event (the worker adds too_many_attempts on the job row) -----------
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
WORKER_ERROR_CODES = ("too_many_attempts",)

# models.ModelError's "invalid_model" (a directory that is not a loadable causal LM, bad
# config_overrides) has no code of its own in the contract: report it as model_not_found.
CODE_ALIASES = {"invalid_model": "model_not_found"}

# -- metric names ---------------------------------------------------------------------------------
# The per-token statistics a divergence reports (means over a step's valid tokens; NaN when the
# loss does not compute one): AKL's gaps and head weight (Wu et al. 2025, eq. 6-7), FKL and RKL.
STEP_STATS = ("g_head", "g_tail", "w_head", "fkl", "rkl", "head_size")
# The per-step numbers the worker keeps in job_metrics, one column each (api/db/models.py).
STEP_METRICS = ("loss", "ce", "kd", "lr", "grad_norm", "tokens_per_s", *STEP_STATS)
# An `eval` event's numbers (per-seed scores and the teacher's details go to result.json).
EVAL_METRICS = (
    "rouge_l",
    "rouge_l_std",
    "rouge_l_greedy",
    "distinct_1",
    "distinct_2",
    "val_ce",
    "val_kl",
    "teacher_rouge_l",
    "teacher_rouge_l_std",
    "teacher_rouge_l_greedy",
)

Number = float | None  # NaN on the runner's side, null on the wire


class _Event(BaseModel):
    # forbid: a field the contract does not name is a bug on the emitting side, caught at once.
    model_config = ConfigDict(extra="forbid")


class LoadingEvent(_Event):
    type: Literal["loading"] = "loading"
    message: str


class StartedEvent(_Event):
    type: Literal["started"] = "started"
    total_steps: int
    resumed_from_step: int = 0
    num_train_examples: int
    device: str


class StepEvent(_Event):
    type: Literal["step"] = "step"
    time: float | None = None  # unix seconds at the step's end: the metric's timestamp, the ETA
    step: int
    total_steps: int
    epoch: Number
    loss: Number
    ce: Number
    kd: Number
    lr: Number
    grad_norm: Number
    tokens: int  # valid (response) tokens this step, all processes
    trained_tokens: int  # cumulative
    tokens_per_s: Number  # non-padding input tokens per second, all processes
    g_head: Number = None
    g_tail: Number = None
    w_head: Number = None
    fkl: Number = None
    rkl: Number = None
    head_size: Number = None


class EvalEvent(_Event):
    type: Literal["eval"] = "eval"
    step: int
    rouge_l: Number = None
    rouge_l_std: Number = None
    rouge_l_greedy: Number = None
    distinct_1: Number = None
    distinct_2: Number = None
    val_ce: Number = None
    val_kl: Number = None
    teacher_rouge_l: Number = None
    teacher_rouge_l_std: Number = None
    teacher_rouge_l_greedy: Number = None
    num_examples: int | None = None


class CheckpointEvent(_Event):
    type: Literal["checkpoint"] = "checkpoint"
    step: int
    path: str  # relative to OUTPUT_DIR: checkpoints/step-00000010


class LogEvent(_Event):
    type: Literal["log"] = "log"
    level: Literal["info", "warning", "error"] = "info"
    message: str


class CompletedEvent(_Event):
    type: Literal["completed"] = "completed"
    step: int
    final_path: str = "final"
    metrics: dict[str, Any] = Field(default_factory=dict)


class StoppedEvent(_Event):
    type: Literal["stopped"] = "stopped"
    step: int
    checkpoint: str | None = None


class ErrorEvent(_Event):
    type: Literal["error"] = "error"
    code: str  # one of ERROR_CODES (an older runner's unknown code is kept, not refused)
    message: str


RunEvent = Annotated[
    LoadingEvent
    | StartedEvent
    | StepEvent
    | EvalEvent
    | CheckpointEvent
    | LogEvent
    | CompletedEvent
    | StoppedEvent
    | ErrorEvent,
    Field(discriminator="type"),
]
EVENT_MODELS: dict[str, type[_Event]] = {
    model.model_fields["type"].default: model
    for model in (
        LoadingEvent,
        StartedEvent,
        StepEvent,
        EvalEvent,
        CheckpointEvent,
        LogEvent,
        CompletedEvent,
        StoppedEvent,
        ErrorEvent,
    )
}
EVENT_TYPES = tuple(EVENT_MODELS)
# What ends a run; the worker writes them to the database at once.
TERMINAL_EVENTS = ("completed", "stopped", "error")
_ADAPTER: TypeAdapter[Any] = TypeAdapter(RunEvent)


def validate(event: Event) -> Event:
    """``event`` checked against its model (a pydantic.ValidationError names the field) and
    returned as a plain dict, ``type`` first, fields in the model's order, only those it had."""
    return _ADAPTER.validate_python(event).model_dump(exclude_unset=True)


def finite(value: Any) -> Any:
    """NaN / inf -> None, recursively through dicts, lists and tuples: strict JSON (events.jsonl,
    PostgreSQL's JSON columns) has no NaN. The one NaN cleaner."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def dumps(event: Event) -> str:
    """One JSON line (no newline); NaN written as null."""
    return json.dumps(finite(event), separators=(",", ":"), allow_nan=False)


def parse_line(line: str | bytes) -> Event | None:
    """One events.jsonl line -> the event dict, or None for what is not a JSON object with a
    ``type`` (a line torn by a kill, a blank line)."""
    try:
        event = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return event if isinstance(event, dict) and isinstance(event.get("type"), str) else None


def open_for_append(path: Path) -> TextIO:
    """events.jsonl opened for appending (a resumed run continues the file). When its last line
    was torn by a kill, a newline first, so that the torn line does not swallow the next event."""
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a+b")  # noqa: SIM115 - the caller closes it
    try:
        size = f.seek(0, 2)
        if size and stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            f.seek(size - 1)
            if f.read(1) != b"\n":
                f.write(b"\n")
                f.flush()
    except OSError:
        f.close()
        raise
    return io.TextIOWrapper(f, encoding="utf-8", write_through=True)


def read_events(path: Path) -> list[Event]:
    """All events of an events.jsonl file, as written (a torn line, from a crash, is skipped)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        return [event for line in f if (event := parse_line(line)) is not None]


# -- a teacher-cache build's events (akl_core/cache_builder.py documents their fields) ------------
# The cache runner shares the job runner's process contract (exit codes, events.jsonl, `error`),
# with events of its own: its `started` / `completed` / `stopped` count shards, not steps.
CACHE_EVENT_TYPES = ("loading", "started", "shard", "teacher_eval", "log", "completed", "stopped", "error")


def validate_cache_event(event: Event) -> Event:
    """A cache build's event: a known ``type`` first, NaN as None (ValueError otherwise)."""
    kind = event.get("type")
    if kind not in CACHE_EVENT_TYPES:
        raise ValueError(f"unknown cache build event type {kind!r}; known: {', '.join(CACHE_EVENT_TYPES)}")
    if kind == "error":
        return validate(event)
    return finite({"type": kind, **{k: v for k, v in event.items() if k != "type"}})
