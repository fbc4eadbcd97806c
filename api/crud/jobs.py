"""Jobs: creation (idempotent per tenant and key), listing, cancellation, lifecycle events."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api.core.pagination import newest_first
from api.db.models import CANCELLED, QUEUED, RUNNING, Job, JobEvent, new_id, utcnow


class IdempotencyConflict(Exception):
    """The Idempotency-Key was used before with a different request body."""

    def __init__(self, job: Job) -> None:
        super().__init__(job.id)
        self.job = job


def add_event(
    *,
    session: Session,
    job_id: str,
    type: str,
    message: str,
    level: str = "info",
    data: dict[str, Any] | None = None,
) -> JobEvent:
    event = JobEvent(job_id=job_id, type=type, message=message, level=level, data=data)
    session.add(event)
    return event


def get_job(*, session: Session, tenant_id: int, job_id: str) -> Job | None:
    """The tenant's job, or None (another tenant's job is None too)."""
    job = session.get(Job, job_id)
    if job is None or job.tenant_id != tenant_id:
        return None
    return job


def get_by_idempotency_key(*, session: Session, tenant_id: int, key: str) -> Job | None:
    return session.scalar(select(Job).where(Job.tenant_id == tenant_id, Job.idempotency_key == key))


def _same_request(job: Job, spec: dict[str, Any], metadata: dict[str, str] | None) -> bool:
    return job.spec == spec and (job.metadata_ or None) == (metadata or None)


def create_job(
    *,
    session: Session,
    tenant_id: int,
    spec: dict[str, Any],
    resolved_spec: dict[str, Any],
    metadata: dict[str, str] | None,
    queue: str,
    artifacts_root: str,
    idempotency_key: str | None = None,
    total_steps: int | None = None,
) -> tuple[Job, bool]:
    """Insert and commit a queued job. Returns (job, created); with an idempotency key already
    used for the same body, returns the existing job and created=False; a different body raises
    IdempotencyConflict. Concurrent requests with one key meet at the unique constraint."""
    if idempotency_key is not None:
        existing = get_by_idempotency_key(session=session, tenant_id=tenant_id, key=idempotency_key)
        if existing is not None:
            return replay(existing, spec, metadata)
    job_id = new_id("job")
    job = Job(
        id=job_id,
        tenant_id=tenant_id,
        status=QUEUED,
        spec=spec,
        resolved_spec=resolved_spec,
        metadata_=metadata,
        idempotency_key=idempotency_key,
        queue=queue,
        # Published right after the commit; if that fails the reconciler republishes it once
        # enqueued_at is older than its requeue delay.
        enqueued_at=utcnow(),
        output_dir=f"{artifacts_root.rstrip('/')}/{job_id}",
        total_steps=total_steps,
    )
    session.add(job)
    add_event(session=session, job_id=job_id, type="created", message=f"job created on queue {queue}")
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        if idempotency_key is None:
            raise
        existing = get_by_idempotency_key(session=session, tenant_id=tenant_id, key=idempotency_key)
        if existing is None:  # the constraint that failed was not the idempotency one
            raise
        return replay(existing, spec, metadata)
    return job, True


def replay(existing: Job, spec: dict[str, Any], metadata: dict[str, str] | None) -> tuple[Job, bool]:
    """(existing, False) when the request repeats the one that made ``existing``; else conflict."""
    if not _same_request(existing, spec, metadata):
        raise IdempotencyConflict(existing)
    return existing, False


def find_replay(
    *, session: Session, tenant_id: int, key: str, spec: dict[str, Any], metadata: dict[str, str] | None
) -> Job | None:
    """The job an earlier request with Idempotency-Key ``key`` made, when this request repeats it;
    None for a new key; IdempotencyConflict when the key came with another body. A replay answers
    with the job even if its files are gone since, so routes ask this before any other check."""
    existing = get_by_idempotency_key(session=session, tenant_id=tenant_id, key=key)
    return None if existing is None else replay(existing, spec, metadata)[0]


def set_suffix(*, session: Session, job: Job, suffix: str | None) -> None:
    """Name the job's distilled model ft:<job id>:<suffix> (set once, right after creation)."""
    if suffix is None or job.suffix == suffix:
        return
    session.execute(update(Job).where(Job.id == job.id, Job.suffix.is_(None)).values(suffix=suffix))
    session.commit()
    session.refresh(job)


def list_jobs(
    *, session: Session, tenant_id: int, status: str | None = None, after: Job | None = None, limit: int = 20
) -> tuple[list[Job], bool]:
    """Newest first; ``after`` is the last job of the previous page. Returns (page, has_more)."""
    query = select(Job).where(Job.tenant_id == tenant_id)
    if status is not None:
        query = query.where(Job.status == status)
    return newest_first(session, query, Job, after=after, limit=limit)


def active_jobs_using_file(*, session: Session, tenant_id: int, file_id: str) -> list[Job]:
    """Queued or running jobs whose spec names ``file_id`` (checked in Python: JSON queries differ
    between SQLite and PostgreSQL, and a tenant has few active jobs)."""
    rows = session.scalars(select(Job).where(Job.tenant_id == tenant_id, Job.status.in_((QUEUED, RUNNING))))
    return [
        job for job in rows if file_id in (job.spec["data"].get("train"), job.spec["data"].get("validation"))
    ]


def request_cancel(*, session: Session, job: Job) -> bool:
    """Cancel ``job``: a queued job is cancelled at once; a running job gets ``cancel_requested``
    and the worker stops it. Conditional updates make this safe against the worker claiming the
    job at the same moment. Returns False when the job had already finished."""
    now = utcnow()
    already_requested = job.cancel_requested  # read first: the updates below refresh ``job``
    cancelled = session.execute(
        update(Job)
        .where(Job.id == job.id, Job.status == QUEUED)
        .values(status=CANCELLED, cancel_requested=True, finished_at=now)
    )
    if cancelled.rowcount == 1:
        add_event(session=session, job_id=job.id, type="cancelled", message="job cancelled before it started")
    else:
        flagged = session.execute(
            update(Job).where(Job.id == job.id, Job.status == RUNNING).values(cancel_requested=True)
        )
        if flagged.rowcount != 1:
            session.rollback()
            return False
        if not already_requested:  # asked twice: one event is enough
            add_event(
                session=session, job_id=job.id, type="cancel_requested", message="cancellation requested"
            )
    session.commit()
    session.refresh(job)
    return True
