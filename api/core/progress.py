"""What a user sees of a job's progress before and while it runs: its planned steps from
submission, and an ETA from the worker's measured pace (RELIABILITY.md, "Progress a user can trust")."""

from __future__ import annotations

from functools import cache

from sqlalchemy.orm import Session

from akl_core.data import DEMO_SPLITS, resolve_data_path
from akl_core.spec import JobSpec, total_steps
from api.crud import files as files_crud
from api.db.models import RUNNING, Job


def planned_steps(spec: JobSpec, *, session: Session, tenant_id: int) -> int | None:
    """The run's optimizer steps as the runner will count them (akl_core.spec.total_steps), or
    None when the number of examples is unknown. The runner's `started` event has the last word."""
    if spec.training.max_steps is not None:
        return spec.training.max_steps
    examples = _train_examples(spec.data.train, session=session, tenant_id=tenant_id)
    if examples is None:
        return None
    if spec.data.max_train_examples is not None:
        examples = min(examples, spec.data.max_train_examples)
    return total_steps(spec, max(examples, 1), spec.resources.processes)


def _train_examples(ref: str, *, session: Session, tenant_id: int) -> int | None:
    if ref in {f"demo:{split}" for split in DEMO_SPLITS}:
        return _demo_examples(ref)
    row = files_crud.get_file(session=session, tenant_id=tenant_id, file_id=ref)
    return row.num_examples if row is not None else None


@cache
def _demo_examples(ref: str) -> int:
    with open(resolve_data_path(ref), "rb") as f:
        return sum(1 for line in f if line.strip())


def eta_seconds(job: Job) -> int | None:
    """Seconds left for a running job: steps to go times the recent seconds per step."""
    pace = (job.current_metrics or {}).get("seconds_per_step")
    if job.status != RUNNING or not job.total_steps or not isinstance(pace, (int, float)) or pace < 0:
        return None
    return round(max(0, job.total_steps - job.current_step) * pace)
