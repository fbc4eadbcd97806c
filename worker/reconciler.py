"""Repair what the broker lost: the database says which jobs should be running or waiting.

``reconcile`` (every ~20 s in each worker, see ``ReconcilerThread``):
- a running job whose lease expired (its worker died) goes back to queued and is re-enqueued -
  or ends cancelled if a cancellation was asked for;
- a queued job that nobody claimed for ``requeue_after_s`` (message lost, broker restarted
  without persistence, API could not publish) is re-enqueued.
Every change is a conditional UPDATE, so several workers reconciling at once do no harm, and a
duplicate delivery is harmless anyway: only one worker can claim a job.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import Update, and_, or_, select, update

from api.db.models import QUEUED, RUNNING, Job, JobEvent, utcnow
from worker import leases
from worker.cache_builds import reconcile_caches
from worker.leases import SessionFactory

log = logging.getLogger(__name__)

Enqueue = Callable[[str, str], None]  # (job_id, queue)


@dataclass
class ReconcileReport:
    expired: list[str] = field(default_factory=list)  # leases expired -> re-enqueued
    cancelled: list[str] = field(default_factory=list)  # leases expired with cancel requested
    requeued: list[str] = field(default_factory=list)  # queued but not picked up


def reconcile(
    session_factory: SessionFactory,
    enqueue: Enqueue,
    now: datetime | None = None,
    *,
    requeue_after_s: float = 300.0,
    limit: int = 100,
) -> ReconcileReport:
    """One pass. ``enqueue(job_id, queue)`` publishes (e.g. ``celery_enqueue(celery_app)``)."""
    now = now or utcnow()
    report = ReconcileReport()
    with session_factory() as session:
        expired = session.execute(
            select(Job.id, Job.cancel_requested)
            .where(Job.status == RUNNING, Job.lease_expires_at < now)
            .limit(limit)
        ).all()
        stale_before = now - timedelta(seconds=requeue_after_s)
        stale = session.execute(
            select(Job.id, Job.enqueued_at)
            .where(
                Job.status == QUEUED,
                or_(Job.enqueued_at.is_(None), Job.enqueued_at < stale_before),
                Job.created_at < stale_before,
            )
            .order_by(Job.created_at)
            .limit(limit)
        ).all()
    for job_id, cancel_requested in expired:
        if cancel_requested:
            if leases.cancel_expired(session_factory, job_id, now=now):
                report.cancelled.append(job_id)
        elif _requeue_expired(session_factory, job_id, now, enqueue):
            report.expired.append(job_id)
    for job_id, enqueued_at in stale:
        if _requeue_stale(session_factory, job_id, enqueued_at, now, enqueue):
            report.requeued.append(job_id)
    # Teacher-cache builds live on the same lifecycle (worker/cache_builds.py); their ids start "cache-".
    expired_caches, cancelled_caches, requeued_caches = reconcile_caches(
        session_factory, enqueue, now, requeue_after_s=requeue_after_s, limit=limit
    )
    report.expired += expired_caches
    report.cancelled += cancelled_caches
    report.requeued += requeued_caches
    return report


def _requeue_expired(session_factory: SessionFactory, job_id: str, now: datetime, enqueue: Enqueue) -> bool:
    stmt = (
        update(Job)
        .where(Job.id == job_id, Job.status == RUNNING, Job.lease_expires_at < now)
        .values(status=QUEUED, lease_owner=None, lease_expires_at=None, enqueued_at=now)
        .execution_options(synchronize_session=False)
    )
    why = "its worker stopped renewing the lease (the worker died or lost the database); back to the queue"
    return _update_and_enqueue(session_factory, stmt, job_id, enqueue, note=why)


def _requeue_stale(
    session_factory: SessionFactory,
    job_id: str,
    enqueued_at: datetime | None,
    now: datetime,
    enqueue: Enqueue,
) -> bool:
    unchanged = Job.enqueued_at.is_(None) if enqueued_at is None else Job.enqueued_at == enqueued_at
    stmt = (
        update(Job)
        .where(and_(Job.id == job_id, Job.status == QUEUED, unchanged))
        .values(enqueued_at=now)
        .execution_options(synchronize_session=False)
    )
    return _update_and_enqueue(session_factory, stmt, job_id, enqueue)


def _update_and_enqueue(
    session_factory: SessionFactory, stmt: Update, job_id: str, enqueue: Enqueue, note: str | None = None
) -> bool:
    with session_factory() as session, session.begin():
        if session.execute(stmt).rowcount != 1:
            return False  # another reconciler or a worker got there first
        if note is not None:
            session.add(JobEvent(job_id=job_id, type="requeued", level="warning", message=note))
        queue = session.scalar(select(Job.queue).where(Job.id == job_id)) or "gpu"
    try:
        enqueue(job_id, queue)
    except Exception:  # broker down: enqueued_at moved on, the next pass after requeue_after_s retries
        log.exception("reconciler: could not enqueue %s", job_id)
        return False
    return True


class ReconcilerThread(threading.Thread):
    """Runs ``reconcile`` every ``every_s`` seconds until ``stop()``."""

    def __init__(
        self, session_factory: SessionFactory, enqueue: Enqueue, *, every_s: float, requeue_after_s: float
    ):
        super().__init__(name="akl-reconciler", daemon=True)
        self.session_factory, self.enqueue = session_factory, enqueue
        self.every_s, self.requeue_after_s = every_s, requeue_after_s
        self._stop_event = threading.Event()

    def run(self) -> None:
        # The first pass runs at once: after a restart of the only worker (embedded `akl serve`),
        # the jobs it was running when it died are picked up without waiting a period.
        delay = 0.0
        while not self._stop_event.wait(delay):
            delay = self.every_s
            try:
                report = reconcile(self.session_factory, self.enqueue, requeue_after_s=self.requeue_after_s)
            except Exception:
                log.exception("reconciler pass failed")
                continue
            if report.expired or report.requeued or report.cancelled:
                log.info("reconciler: %s", report)

    def stop(self) -> None:
        self._stop_event.set()
