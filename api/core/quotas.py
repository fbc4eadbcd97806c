"""Per-tenant budgets: the same AKL_MAX_* settings (api/core/config.py) for every tenant.

What frees up with time (queued plus running jobs, stored bytes) is answered 429; what the request
itself asks for (a job's training and evaluation work, its spec size) is 422, since sending it
again cannot succeed. Every message names the limit's setting and its value. Usage is counted from
existing rows (jobs.status, files.bytes), so there is no table to keep in step.
"""

from __future__ import annotations

import json
import math
from functools import lru_cache
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from akl_core.data import DEMO_DIR
from akl_core.spec import JobSpec
from api.core.config import Settings
from api.crud import files as files_crud
from api.db.models import QUEUED, RUNNING, File, Job


class QuotaError(Exception):
    """A request over a budget; carries the HTTP status (422 or 429) and the message."""

    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message


def json_bytes(value: Any) -> int:
    """Bytes of ``value`` as compact UTF-8 JSON (how it is stored and listed)."""
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode())


def check_spec_size(spec: dict[str, Any], metadata: dict[str, str] | None, settings: Settings) -> None:
    size = json_bytes(spec) + json_bytes(metadata)
    if size > settings.max_spec_bytes:
        raise QuotaError(
            422,
            f"the job spec and metadata are {size} bytes as JSON; the limit (AKL_MAX_SPEC_BYTES) is "
            f"{settings.max_spec_bytes} bytes: shorten config_overrides or metadata",
        )


def check_active_jobs(*, session: Session, tenant_id: int, settings: Settings) -> None:
    active = session.scalar(
        select(func.count())
        .select_from(Job)
        .where(Job.tenant_id == tenant_id, Job.status.in_((QUEUED, RUNNING)))
    )
    if (active or 0) >= settings.max_active_jobs:
        raise QuotaError(
            429,
            f"this tenant has {active} queued or running jobs; the limit (AKL_MAX_ACTIVE_JOBS) is "
            f"{settings.max_active_jobs}: wait for some to finish or cancel some",
        )


def check_stored_bytes(*, session: Session, tenant_id: int, incoming: int, settings: Settings) -> None:
    """Refuse an upload of ``incoming`` bytes that would take the tenant's files past the limit."""
    stored = session.scalar(
        select(func.coalesce(func.sum(File.bytes), 0)).where(
            File.tenant_id == tenant_id, File.deleted_at.is_(None)
        )
    )
    if int(stored or 0) + incoming > settings.max_stored_bytes:
        raise QuotaError(
            429,
            f"this tenant stores {stored} bytes of files and this upload adds {incoming}; the limit "
            f"(AKL_MAX_STORED_BYTES) is {settings.max_stored_bytes} bytes: delete files it no longer needs",
        )


@lru_cache
def _demo_examples(split: str) -> int:
    with open(DEMO_DIR / f"{split}.jsonl", "rb") as fh:
        return sum(1 for line in fh if line.strip())


def count_examples(ref: str, *, session: Session, tenant_id: int) -> int:
    """Examples in a data reference already checked by api.core.job_refs."""
    if ref.startswith("demo:"):
        return _demo_examples(ref.split(":", 1)[1])
    row = files_crud.get_file(session=session, tenant_id=tenant_id, file_id=ref)
    return row.num_examples if row is not None else 0


def train_tokens(spec: JobSpec, train_examples: int) -> tuple[int, int]:
    """(optimizer steps, padded tokens) of a run: the same step count as akl_core.trainer.total_steps,
    times the examples per step (batch_size x grad_accum x processes) and max_length."""
    t = spec.training
    per_step = t.batch_size * t.grad_accum * spec.resources.processes
    examples = min(train_examples, spec.data.max_train_examples or train_examples)
    steps = t.max_steps if t.max_steps is not None else t.epochs * math.ceil(examples / per_step)
    return steps, steps * per_step * t.max_length


def eval_tokens(spec: JobSpec, steps: int) -> int:
    """New tokens the spec asks to generate: evaluations (one per every_steps, the final one, the
    teacher's once) x num_examples x seeds x max_new_tokens. Counted as asked, not as the
    validation data would cut it: the budget reads the spec alone."""
    e = spec.evaluation
    runs = (steps - 1) // e.every_steps + 1 if e.every_steps else 1
    runs += 1 if e.teacher_reference else 0
    return runs * e.num_examples * len(e.seeds) * e.max_new_tokens


def check_job_work(spec: JobSpec, *, session: Session, tenant_id: int, settings: Settings) -> None:
    train = count_examples(spec.data.train, session=session, tenant_id=tenant_id)
    steps, tokens = train_tokens(spec, train)
    if tokens > settings.max_train_tokens:
        raise QuotaError(
            422,
            f"training: {steps} steps x {tokens // steps} tokens per step (batch_size x grad_accum x "
            f"processes x max_length) is {tokens} tokens; the limit (AKL_MAX_TRAIN_TOKENS) is "
            f"{settings.max_train_tokens}: lower max_steps, epochs, batch_size or max_length",
        )
    generated = eval_tokens(spec, steps)
    if generated > settings.max_eval_tokens:
        raise QuotaError(
            422,
            f"evaluation generates {generated} tokens (evaluations x examples x seeds x max_new_tokens); "
            f"the limit (AKL_MAX_EVAL_TOKENS) is {settings.max_eval_tokens}: lower evaluation."
            "num_examples, seeds, max_new_tokens or raise every_steps",
        )


def within_page_budget(items: list[Any], budget: int) -> list[Any]:
    """The longest prefix of ``items`` (at least one) whose JSON stays within ``budget`` bytes, so
    one list page stays bounded even over rows stored before AKL_MAX_SPEC_BYTES existed."""
    total = 0
    for count, item in enumerate(items):
        total += json_bytes(item.model_dump(mode="json"))
        if total > budget and count > 0:
            return items[:count]
    return items
