"""Repair what the broker lost: the database says which jobs should be running or waiting.

``reconcile`` (every ~20 s in each worker, see ``ReconcilerThread``):
- a running job whose lease expired (its worker died) goes back to queued and is re-enqueued -
  or ends cancelled if a cancellation was asked for;
- a queued job that nobody claimed for ``requeue_after_s`` (message lost, broker restarted
  without persistence, API could not publish) is re-enqueued.
Every change is a lifecycle operation (api/lifecycle.py: one conditional UPDATE), so several
workers reconciling at once do no harm, and a duplicate delivery is harmless anyway: only one
worker can claim a job.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from api.db.models import CANCELLED, QUEUED, RUNNING, utcnow
from api.lifecycle import CACHES, JOBS, Lifecycle
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
    """One pass over jobs and teacher-cache builds (the same lifecycle; ``enqueue`` picks the
    task by the id, ``api.queue.task_for``)."""
    now = now or utcnow()
    report = ReconcileReport()
    for lifecycle in (JOBS, CACHES):
        _reconcile(lifecycle, session_factory, enqueue, now, requeue_after_s, limit, report)
    return report


def _reconcile(
    lifecycle: Lifecycle[Any],
    session_factory: SessionFactory,
    enqueue: Enqueue,
    now: datetime,
    requeue_after_s: float,
    limit: int,
    report: ReconcileReport,
) -> None:
    m: Any = lifecycle.model
    with session_factory() as session:
        expired = session.scalars(
            select(m.id).where(m.status == RUNNING, m.lease_expires_at < now).limit(limit)
        ).all()
        stale_before = now - timedelta(seconds=requeue_after_s)
        stale = session.execute(
            select(m.id, m.enqueued_at)
            .where(
                m.status == QUEUED,
                or_(m.enqueued_at.is_(None), m.enqueued_at < stale_before),
                m.created_at < stale_before,
            )
            .order_by(m.created_at)
            .limit(limit)
        ).all()
    for row_id in expired:
        with session_factory() as session, session.begin():
            status = lifecycle.requeue(session, row_id, now=now)
            queue = _queue(session, m, row_id)
        if status == CANCELLED:
            report.cancelled.append(row_id)
        elif status == QUEUED and _publish(enqueue, row_id, queue):
            report.expired.append(row_id)
    for row_id, enqueued_at in stale:
        with session_factory() as session, session.begin():
            republished = lifecycle.republish(session, row_id, enqueued_at=enqueued_at, now=now)
            queue = _queue(session, m, row_id)
        if republished and _publish(enqueue, row_id, queue):
            report.requeued.append(row_id)


def _queue(session: Session, model: Any, row_id: str) -> str:
    return session.scalar(select(model.queue).where(model.id == row_id)) or "gpu"


def _publish(enqueue: Enqueue, job_id: str, queue: str) -> bool:
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
