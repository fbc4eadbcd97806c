"""What a job left behind, read for the API: events, metrics, evaluations, checkpoints."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from api.db.models import JobCheckpoint, JobEvaluation, JobEvent, JobMetric


def list_events(
    *, session: Session, job_id: str, after: int | None = None, limit: int = 100
) -> tuple[list[JobEvent], bool]:
    """Oldest first, so a client can poll with ``after`` = the last id it saw."""
    query = select(JobEvent).where(JobEvent.job_id == job_id)
    if after is not None:
        query = query.where(JobEvent.id > after)
    rows = list(session.scalars(query.order_by(JobEvent.id).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def list_events_newest_first(
    *, session: Session, job_id: str, before: int | None = None, limit: int = 20
) -> tuple[list[JobEvent], bool]:
    """Newest first, as OpenAI lists a fine-tuning job's events: ``before`` is the last id seen."""
    query = select(JobEvent).where(JobEvent.job_id == job_id)
    if before is not None:
        query = query.where(JobEvent.id < before)
    rows = list(session.scalars(query.order_by(JobEvent.id.desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def metric_at(*, session: Session, job_id: str, step: int) -> JobMetric | None:
    """The metrics of ``step``, or of the last step before it that has some."""
    query = select(JobMetric).where(JobMetric.job_id == job_id, JobMetric.step <= step)
    return session.scalars(query.order_by(JobMetric.step.desc()).limit(1)).first()


def list_metrics(
    *,
    session: Session,
    job_id: str,
    from_step: int | None = None,
    to_step: int | None = None,
    max_points: int | None = None,
) -> tuple[list[JobMetric], int]:
    """At most ``max_points`` rows at an even stride (``downsample``), and how many there are.

    The steps are read first and only the picked rows are loaded: a 50,000-step history plotted
    at 1000 points builds 1000 ORM rows, not 50,000 (the dashboard's charts ask for 1000)."""
    where = [JobMetric.job_id == job_id]
    if from_step is not None:
        where.append(JobMetric.step >= from_step)
    if to_step is not None:
        where.append(JobMetric.step <= to_step)
    steps = list(session.scalars(select(JobMetric.step).where(*where).order_by(JobMetric.step)))
    picked = downsample(len(steps), max_points or len(steps) or 1)
    if len(picked) < len(steps):
        where.append(JobMetric.step.in_([steps[i] for i in picked]))
    rows = list(session.scalars(select(JobMetric).where(*where).order_by(JobMetric.step)))
    return rows, len(steps)


def downsample(count: int, max_points: int) -> list[int]:
    """Indices of at most ``max_points`` of ``count`` rows at an even stride, first and last kept."""
    if count <= max_points:
        return list(range(count))
    if max_points == 1:
        return [count - 1]
    return sorted({round(i * (count - 1) / (max_points - 1)) for i in range(max_points)})


def list_evaluations(*, session: Session, job_id: str) -> list[JobEvaluation]:
    query = select(JobEvaluation).where(JobEvaluation.job_id == job_id)
    return list(session.scalars(query.order_by(JobEvaluation.step, JobEvaluation.id)))


def list_checkpoints(*, session: Session, job_id: str) -> list[JobCheckpoint]:
    """By step, the final model last."""
    query = select(JobCheckpoint).where(JobCheckpoint.job_id == job_id)
    return list(session.scalars(query.order_by(JobCheckpoint.is_final, JobCheckpoint.step, JobCheckpoint.id)))


def get_checkpoint(*, session: Session, job_id: str, checkpoint_id: str) -> JobCheckpoint | None:
    row = session.get(JobCheckpoint, checkpoint_id)
    return row if row is not None and row.job_id == job_id else None


def final_checkpoint(*, session: Session, job_id: str) -> JobCheckpoint | None:
    query = select(JobCheckpoint).where(JobCheckpoint.job_id == job_id, JobCheckpoint.is_final.is_(True))
    return session.scalars(query.order_by(JobCheckpoint.step.desc())).first()
