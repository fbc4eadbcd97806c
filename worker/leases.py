"""Job leases: the database decides which worker runs a job; the broker only delivers.

Every state change a worker makes is one conditional UPDATE, so two workers that both received the
same job (a redelivery, a re-enqueue by the reconciler) can never both run it: the claim succeeds
for exactly one of them, and a worker whose lease was taken over can no longer write the job.
"""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, literal, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from api.db.models import CANCELLED, QUEUED, RUNNING, Job, UTCDateTime, utcnow
from api.webhooks.outbox import enqueue_terminal_event

SessionFactory = sessionmaker[Session]


def new_owner() -> str:
    """``hostname:pid:random`` - unique per task execution, readable in the jobs table."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


@dataclass(frozen=True)
class ClaimedJob:
    """What the worker needs of a job it holds (a plain snapshot, no live ORM object)."""

    id: str
    tenant_id: int
    attempts: int
    queue: str
    spec: dict[str, Any]
    resolved_spec: dict[str, Any] | None
    cancel_requested: bool
    current_step: int


def claim(
    session_factory: SessionFactory, job_id: str, owner: str, *, lease_s: float, now: datetime | None = None
) -> ClaimedJob | None:
    """Atomically take the job if it is queued, or running under an expired lease (its worker died).

    Returns None when another worker holds a live lease or the job is finished / unknown.
    """
    now = now or utcnow()
    claimable = or_(
        Job.status == QUEUED,
        and_(Job.status == RUNNING, or_(Job.lease_expires_at.is_(None), Job.lease_expires_at < now)),
    )
    stmt = (
        update(Job)
        .where(Job.id == job_id, claimable)
        .values(
            status=RUNNING,
            lease_owner=owner,
            lease_expires_at=now + timedelta(seconds=lease_s),
            heartbeat_at=now,
            attempts=Job.attempts + 1,
            started_at=_coalesce_time(Job.started_at, now),
        )
        .execution_options(synchronize_session=False)
    )
    with session_factory() as session, session.begin():
        if session.execute(stmt).rowcount != 1:
            return None
        job = session.get_one(Job, job_id)
        return ClaimedJob(
            id=job.id,
            tenant_id=job.tenant_id,
            attempts=job.attempts,
            queue=job.queue,
            spec=dict(job.spec),
            resolved_spec=dict(job.resolved_spec) if job.resolved_spec else None,
            cancel_requested=bool(job.cancel_requested),
            current_step=job.current_step or 0,
        )


def _coalesce_time(column: Any, now: datetime) -> Any:
    from sqlalchemy import func

    return func.coalesce(column, literal(now, UTCDateTime()))


@dataclass(frozen=True)
class Heartbeat:
    held: bool  # False: the lease was lost (expired and taken over, or the job was finished elsewhere)
    cancel_requested: bool


def renew(
    session_factory: SessionFactory, job_id: str, owner: str, *, lease_s: float, now: datetime | None = None
) -> Heartbeat:
    """Extend our lease and report whether a cancellation was requested."""
    now = now or utcnow()
    stmt = (
        update(Job)
        .where(Job.id == job_id, Job.lease_owner == owner, Job.status == RUNNING)
        .values(lease_expires_at=now + timedelta(seconds=lease_s), heartbeat_at=now)
        .execution_options(synchronize_session=False)
    )
    with session_factory() as session, session.begin():
        held = session.execute(stmt).rowcount == 1
        cancel = session.scalar(select(Job.cancel_requested).where(Job.id == job_id))
    return Heartbeat(held=held, cancel_requested=bool(cancel))


def release(
    session_factory: SessionFactory,
    job_id: str,
    owner: str,
    *,
    count_attempt: bool = False,
    now: datetime | None = None,
) -> bool:
    """Give the job back to the queue. A worker shutdown does not count as an attempt (being
    stopped by a deployment is not the job's fault); a crashed run does (``count_attempt``)."""
    now = now or utcnow()
    stmt = (
        update(Job)
        .where(Job.id == job_id, Job.lease_owner == owner, Job.status == RUNNING)
        .values(
            status=QUEUED,
            lease_owner=None,
            lease_expires_at=None,
            enqueued_at=now,
            attempts=Job.attempts if count_attempt else Job.attempts - 1,
        )
        .execution_options(synchronize_session=False)
    )
    with session_factory() as session, session.begin():
        return session.execute(stmt).rowcount == 1


def finish(
    session_factory: SessionFactory,
    job_id: str,
    owner: str,
    status: str,
    *,
    error_code: str | None = None,
    error_message: str | None = None,
    now: datetime | None = None,
    **values: Any,
) -> bool:
    """Move our job to a terminal status and drop the lease; False if we no longer hold it."""
    now = now or utcnow()
    stmt = (
        update(Job)
        .where(Job.id == job_id, Job.lease_owner == owner, Job.status == RUNNING)
        .values(
            status=status,
            finished_at=now,
            lease_owner=None,
            lease_expires_at=None,
            error_code=error_code,
            error_message=error_message,
            **values,
        )
        .execution_options(synchronize_session=False)
    )
    with session_factory() as session, session.begin():
        return session.execute(stmt).rowcount == 1 and enqueue_terminal_event(session, job_id, status) >= 0


def cancel_expired(session_factory: SessionFactory, job_id: str, *, now: datetime | None = None) -> bool:
    """A job whose worker died after a cancellation was asked for ends cancelled, not re-run."""
    now = now or utcnow()
    stmt = (
        update(Job)
        .where(
            Job.id == job_id,
            Job.status == RUNNING,
            Job.cancel_requested.is_(True),
            Job.lease_expires_at < now,
        )
        .values(status=CANCELLED, finished_at=now, lease_owner=None, lease_expires_at=None)
        .execution_options(synchronize_session=False)
    )
    with session_factory() as session, session.begin():
        return session.execute(stmt).rowcount == 1 and enqueue_terminal_event(session, job_id, CANCELLED) >= 0
