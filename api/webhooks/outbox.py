"""The webhook outbox: event names, enqueueing in the caller's transaction, and the delivery
state machine (claim with a lease, then record the try), each transition one conditional UPDATE.

pending --(claim: lease)--> pending, leased --(2xx)--> delivered
                                            --(else, tries left)--> pending, next_attempt_at later
                                            --(else, no tries left)--> failed
A lease that expires (its API process died mid-try) makes the row claimable again, so a delivery
outlives any process: at least once, and exactly once while every try ends inside its lease.
Torch-free and HTTP-free: the worker imports ``enqueue_terminal_event``.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import CursorResult, and_, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from api.db.models import (
    CANCELLED,
    DELIVERY_DELIVERED,
    DELIVERY_FAILED,
    DELIVERY_PENDING,
    FAILED,
    SUCCEEDED,
    Job,
    TeacherCache,
    Webhook,
    WebhookAttempt,
    WebhookDelivery,
    new_id,
    utcnow,
)

# Event types a webhook may subscribe to: a job's and a teacher cache's terminal statuses (both
# run on api.lifecycle, whose on_terminal hook calls enqueue_terminal_event).
JOB_EVENTS = {SUCCEEDED: "job.succeeded", FAILED: "job.failed", CANCELLED: "job.cancelled"}
CACHE_EVENTS = {
    SUCCEEDED: "teacher_cache.succeeded",
    FAILED: "teacher_cache.failed",
    CANCELLED: "teacher_cache.cancelled",
}
EVENT_TYPES = (*JOB_EVENTS.values(), *CACHE_EVENTS.values())


def job_data(job: Any) -> dict[str, Any]:
    """The ``data`` of a job event: what a receiver needs to act without calling back first."""
    error = {"code": job.error_code, "message": job.error_message} if job.error_code else None
    return {
        "id": job.id,
        "object": "job",
        "status": job.status,
        "queue": job.queue,
        "created_at": _unix(job.created_at),
        "started_at": _unix(job.started_at),
        "finished_at": _unix(job.finished_at),
        "current_step": job.current_step,
        "total_steps": job.total_steps,
        "trained_tokens": job.trained_tokens,
        "error": error,
        "metadata": job.metadata_ or {},
    }


def cache_data(cache: Any) -> dict[str, Any]:
    """The ``data`` of a teacher-cache event (the fields of ``GET /v1/teacher_caches/{id}``)."""
    error = {"code": cache.error_code, "message": cache.error_message} if cache.error_code else None
    return {
        "id": cache.id,
        "object": "teacher_cache",
        "status": cache.status,
        "teacher": cache.teacher,
        "top_k": cache.top_k,
        "tokens": cache.tokens,
        "bytes": cache.bytes,
        "bytes_per_token": cache.bytes_per_token,
        "created_at": _unix(cache.created_at),
        "started_at": _unix(cache.started_at),
        "finished_at": _unix(cache.finished_at),
        "error": error,
    }


def _unix(value: datetime | None) -> int | None:
    return None if value is None else int(value.timestamp())


def enqueue_terminal_event(session: Session, row: Job | TeacherCache | str, status: str) -> int:
    """Write one outbox row per webhook of the row's tenant subscribed to this terminal ``status``
    of a job or a teacher cache, in the caller's transaction (no commit: the rows exist if and
    only if the transition does). ``row`` is the job or cache row, or a job id; it is read back
    here, so values the caller just UPDATEd count. Returns the number of rows written."""
    model: type[Job] | type[TeacherCache] = TeacherCache if isinstance(row, TeacherCache) else Job
    events, to_data = (CACHE_EVENTS, cache_data) if model is TeacherCache else (JOB_EVENTS, job_data)
    event_type = events.get(status)
    if event_type is None:
        raise ValueError(f"{status!r} is not a terminal status")
    row_id = row if isinstance(row, str) else row.id
    found = session.execute(select(model).where(model.id == row_id).execution_options(populate_existing=True))
    current = cast(Job | TeacherCache, found.scalar_one())  # select(model): a row of that model
    hooks = session.scalars(select(Webhook).where(Webhook.tenant_id == current.tenant_id)).all()
    now = utcnow()
    written = 0
    for hook in hooks:
        if event_type not in hook.events:
            continue
        message_id = new_id("msg")
        body = {
            "type": event_type,
            "timestamp": now.isoformat().replace("+00:00", "Z"),
            "data": to_data(current),
        }
        session.add(
            WebhookDelivery(
                id=message_id,
                webhook_id=hook.id,
                event_type=event_type,
                subject_id=current.id,
                body=json.dumps(body, separators=(",", ":"), ensure_ascii=False),
                status=DELIVERY_PENDING,
                next_attempt_at=now,
                created_at=now,
            )
        )
        written += 1
    return written


@dataclass(frozen=True)
class Claimed:
    """A delivery this deliverer holds until ``lease_expires_at``."""

    id: str
    webhook_id: str
    event_type: str
    body: str
    attempts: int  # tries before this one
    url: str
    secret: str


def due(session_factory: sessionmaker[Session], *, now: datetime | None = None, limit: int = 20) -> list[str]:
    """Ids of deliveries whose next try is due and that no live lease holds, oldest due first."""
    now = now or utcnow()
    with session_factory() as session:
        return list(
            session.scalars(
                select(WebhookDelivery.id)
                .where(_claimable(now))
                .order_by(WebhookDelivery.next_attempt_at)
                .limit(limit)
            )
        )


def _claimable(now: datetime) -> Any:
    return and_(
        WebhookDelivery.status == DELIVERY_PENDING,
        WebhookDelivery.next_attempt_at <= now,
        or_(WebhookDelivery.lease_expires_at.is_(None), WebhookDelivery.lease_expires_at < now),
    )


def claim(
    session_factory: sessionmaker[Session],
    delivery_id: str,
    owner: str,
    *,
    lease_s: float,
    now: datetime | None = None,
) -> Claimed | None:
    """Take the delivery if it is still due and unleased (one conditional UPDATE: of several
    deliverers racing for it, exactly one gets it). None when another one won."""
    now = now or utcnow()
    stmt = (
        update(WebhookDelivery)
        .where(WebhookDelivery.id == delivery_id, _claimable(now))
        .values(lease_owner=owner, lease_expires_at=now + timedelta(seconds=lease_s))
        .execution_options(synchronize_session=False)
    )
    with session_factory() as session, session.begin():
        if cast(CursorResult[Any], session.execute(stmt)).rowcount != 1:
            return None
        row = session.execute(
            select(WebhookDelivery, Webhook.url, Webhook.secret)
            .join(Webhook, Webhook.id == WebhookDelivery.webhook_id)
            .where(WebhookDelivery.id == delivery_id)
        ).one_or_none()
        if row is None:  # the webhook was deleted meanwhile (its deliveries go with it)
            return None
        delivery, url, secret = row
        return Claimed(
            id=delivery.id,
            webhook_id=delivery.webhook_id,
            event_type=delivery.event_type,
            body=delivery.body,
            attempts=delivery.attempts,
            url=url,
            secret=secret,
        )


def backoff_s(tries: int, *, base_s: float, max_s: float, jitter: float = 0.2) -> float:
    """Wait after the ``tries``-th failed try: base, 2 x base, 4 x base, ... capped at ``max_s``,
    each within +-``jitter`` so the retries of a receiver that was down do not all land at once."""
    wait = min(max_s, base_s * 2 ** (tries - 1))
    return wait * (1 + random.uniform(-jitter, jitter))


@dataclass(frozen=True)
class Result:
    succeeded: bool
    status_code: int | None
    error: str | None
    duration_ms: int


def record(
    session_factory: sessionmaker[Session],
    claimed: Claimed,
    owner: str,
    result: Result,
    *,
    max_attempts: int,
    base_s: float,
    max_s: float,
    now: datetime | None = None,
) -> str | None:
    """Record one try and move the delivery on; the new status, or None when the lease was lost
    (the webhook was deleted, or the lease expired and another deliverer owns the row now)."""
    now = now or utcnow()
    tries = claimed.attempts + 1
    if result.succeeded:
        values: dict[str, Any] = {"status": DELIVERY_DELIVERED, "finished_at": now}
    elif tries >= max_attempts:
        values = {"status": DELIVERY_FAILED, "finished_at": now}
    else:
        wait = backoff_s(tries, base_s=base_s, max_s=max_s)
        values = {"status": DELIVERY_PENDING, "next_attempt_at": now + timedelta(seconds=wait)}
    stmt = (
        update(WebhookDelivery)
        .where(WebhookDelivery.id == claimed.id, WebhookDelivery.lease_owner == owner)
        .values(attempts=tries, lease_owner=None, lease_expires_at=None, **values)
        .execution_options(synchronize_session=False)
    )
    with session_factory() as session, session.begin():
        if cast(CursorResult[Any], session.execute(stmt)).rowcount != 1:
            return None
        session.add(
            WebhookAttempt(
                webhook_id=claimed.webhook_id,
                delivery_id=claimed.id,
                event_type=claimed.event_type,
                attempt=tries,
                succeeded=result.succeeded,
                status_code=result.status_code,
                error=result.error,
                duration_ms=result.duration_ms,
                created_at=now,
            )
        )
    return str(values["status"])
