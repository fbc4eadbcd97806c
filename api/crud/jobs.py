"""Jobs: creation (idempotent per tenant and key), listing, cancellation, lifecycle events."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api.core.pagination import newest_first
from api.db.models import QUEUED, RUNNING, Job, JobEvent, new_id
from api.lifecycle import JOBS


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
    return JOBS.add_event(session, job_id, type, message, level=level, data=data)


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
        spec=spec,
        resolved_spec=resolved_spec,
        metadata_=metadata,
        idempotency_key=idempotency_key,
        queue=queue,
        output_dir=f"{artifacts_root.rstrip('/')}/{job_id}",
        total_steps=total_steps,
    )
    JOBS.create(session, job)
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
    """Cancel ``job`` (``JOBS.cancel``: a queued job at once, a running one through its worker)
    and commit. Returns False when the job had already finished."""
    if JOBS.cancel(session, job.id) is None:
        session.rollback()
        return False
    session.commit()
    session.refresh(job)
    return True
