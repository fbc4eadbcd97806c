"""The job lifecycle: every change of a job's status, in one place (docs/architecture.md, "Job
lifecycle", has the transition table).

Each operation is one conditional UPDATE - the row must be in the state the transition starts
from, and for a worker's operations hold that worker's lease - plus its event row, in the
caller's transaction: nothing here commits. Two workers that both received a job (a redelivery, a
re-enqueue by the reconciler) can therefore never both run it: the claim succeeds for exactly one,
and a worker whose lease was taken over can no longer write the row. A refused transition
changes nothing and returns False / None.

``Lifecycle`` is generic over the kind of work: any table with the status and lease columns of
``jobs`` (``id, status, cancel_requested, attempts, lease_owner, lease_expires_at, heartbeat_at,
enqueued_at, started_at, finished_at, error_code, error_message``) and an event table with
``(fk, type, level, message, data)`` columns gets the same machine. ``JOBS`` is the jobs' one.

Hooks: ``on_terminal(callback)`` registers ``callback(session, row, status)``, called inside the
transaction of every transition into succeeded, failed or cancelled (e.g. to write a webhook
outbox row that commits, or rolls back, with the status).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Generic, TypeVar, cast

from sqlalchemy import CursorResult, and_, func, literal, or_, select, update
from sqlalchemy.orm import Session

from api.db.models import (
    CANCELLED,
    FAILED,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    TERMINAL_STATUSES,
    Job,
    JobEvent,
    TeacherCache,
    TeacherCacheEvent,
    UTCDateTime,
    utcnow,
)
from api.webhooks.outbox import enqueue_terminal_event

Row = TypeVar("Row")
TerminalHook = Callable[[Session, Any, str], object]  # (session, row, status); the return value is ignored


@dataclass(frozen=True)
class Lease:
    """What a renewal found: ``held`` False means the lease was lost (expired and taken over, or
    the row was finished elsewhere); ``cancel_requested`` is read in the same transaction."""

    held: bool
    cancel_requested: bool


class Lifecycle(Generic[Row]):
    """The state machine of one kind of work. ``model`` holds the rows, ``event_model`` their
    events, linked by the column ``fk`` (``job_id`` for jobs)."""

    def __init__(self, model: type[Row], event_model: type[Any], fk: str, *, noun: str = "job"):
        self.model, self.event_model, self.fk, self.noun = model, event_model, fk, noun
        self._terminal_hooks: list[TerminalHook] = []

    # -- hooks and events --------------------------------------------------------------------
    def on_terminal(self, callback: TerminalHook) -> TerminalHook:
        """Call ``callback(session, row, status)`` in the transaction of every transition into a
        terminal status (usable as a decorator). The row is freshly loaded."""
        self._terminal_hooks.append(callback)
        return callback

    def add_event(
        self,
        session: Session,
        row_id: str,
        type_: str,
        message: str,
        *,
        level: str = "info",
        data: dict[str, Any] | None = None,
    ) -> Any:
        """The one writer of event rows."""
        event = self.event_model(
            **{self.fk: row_id}, type=type_[:32], level=level[:16], message=message, data=data or None
        )
        session.add(event)
        return event

    # -- transitions -------------------------------------------------------------------------
    def create(self, session: Session, row: Row, *, message: str | None = None) -> Row:
        """(new) -> queued. ``row`` is added with ``enqueued_at`` now: it is published right after
        the commit, and if that fails the reconciler republishes it (``republish``)."""
        row.status = QUEUED  # type: ignore[attr-defined]
        row.enqueued_at = utcnow()  # type: ignore[attr-defined]
        session.add(row)
        queue = getattr(row, "queue", None)
        text = message or f"{self.noun} created" + (f" on queue {queue}" if queue else "")
        self.add_event(session, row.id, "created", text)  # type: ignore[attr-defined]
        return row

    def cancel(self, session: Session, row_id: str, *, now: datetime | None = None) -> str | None:
        """queued -> cancelled at once; running -> running with ``cancel_requested`` (its worker
        stops it, or the reconciler cancels it if the worker died). Returns "cancelled",
        "requested", or None when the row is already finished (or unknown)."""
        now = now or utcnow()
        m: Any = self.model
        if self._update(
            session,
            m.id == row_id,
            m.status == QUEUED,
            status=CANCELLED,
            cancel_requested=True,
            finished_at=now,
        ):
            self.add_event(session, row_id, "cancelled", f"{self.noun} cancelled before it started")
            self._terminal(session, row_id, CANCELLED)
            return "cancelled"
        first = m.cancel_requested.is_not(True)
        if self._update(session, m.id == row_id, m.status == RUNNING, first, cancel_requested=True):
            self.add_event(session, row_id, "cancel_requested", "cancellation requested")
            return "requested"
        running = session.scalar(select(m.status).where(m.id == row_id))
        return "requested" if running == RUNNING else None  # asked twice: one event is enough

    def claim(
        self, session: Session, row_id: str, owner: str, *, lease_s: float, now: datetime | None = None
    ) -> Row | None:
        """queued, or running under an expired lease (its worker died) -> running, leased to
        ``owner`` for ``lease_s``; counts an attempt. Returns the row, or None when another
        worker holds a live lease or the row is finished or unknown."""
        now = now or utcnow()
        m: Any = self.model
        expired = or_(m.lease_expires_at.is_(None), m.lease_expires_at < now)
        claimable = or_(m.status == QUEUED, and_(m.status == RUNNING, expired))
        claimed = self._update(
            session,
            m.id == row_id,
            claimable,
            status=RUNNING,
            lease_owner=owner,
            lease_expires_at=now + timedelta(seconds=lease_s),
            heartbeat_at=now,
            attempts=m.attempts + 1,
            started_at=func.coalesce(m.started_at, literal(now, UTCDateTime())),
        )
        if not claimed:
            return None
        row = session.get_one(m, row_id, populate_existing=True)
        self.add_event(session, row_id, "running", f"attempt {row.attempts} on worker {owner}")
        return row

    def renew(
        self,
        session: Session,
        row_id: str,
        owner: str,
        *,
        lease_s: float,
        now: datetime | None = None,
        **values: Any,
    ) -> Lease:
        """running (our lease) -> running, the lease extended by ``lease_s`` from now; ``values``
        (progress, step counters) are written in the same UPDATE. No event row: a heartbeat is
        not news. Also reads ``cancel_requested``."""
        now = now or utcnow()
        m: Any = self.model
        held = self._update_held(
            session,
            row_id,
            owner,
            lease_expires_at=now + timedelta(seconds=lease_s),
            heartbeat_at=now,
            **values,
        )
        cancel = session.scalar(select(m.cancel_requested).where(m.id == row_id))
        return Lease(held=held, cancel_requested=bool(cancel))

    def release(
        self,
        session: Session,
        row_id: str,
        owner: str,
        *,
        message: str,
        count_attempt: bool = False,
        now: datetime | None = None,
    ) -> bool:
        """running (our lease) -> queued, to be published again by the caller. A worker shutdown
        does not count as an attempt (being stopped by a deployment is not the job's fault); a
        crashed run does (``count_attempt``)."""
        now = now or utcnow()
        m: Any = self.model
        released = self._update_held(
            session,
            row_id,
            owner,
            status=QUEUED,
            lease_owner=None,
            lease_expires_at=None,
            enqueued_at=now,
            attempts=m.attempts if count_attempt else m.attempts - 1,
        )
        if released:
            self.add_event(session, row_id, "released", message)
        return released

    def finish(
        self,
        session: Session,
        row_id: str,
        owner: str,
        status: str,
        *,
        message: str,
        error_code: str | None = None,
        error_message: str | None = None,
        now: datetime | None = None,
        **values: Any,
    ) -> bool:
        """running (our lease) -> succeeded, failed or cancelled; drops the lease. False when we
        no longer hold it (then nothing is written)."""
        if status not in TERMINAL_STATUSES:
            raise ValueError(f"finish: {status!r} is not a terminal status {TERMINAL_STATUSES}")
        now = now or utcnow()
        finished = self._update_held(
            session,
            row_id,
            owner,
            status=status,
            finished_at=now,
            lease_owner=None,
            lease_expires_at=None,
            error_code=error_code,
            error_message=error_message,
            **values,
        )
        if finished:
            level = "error" if status == FAILED else "info"
            self.add_event(session, row_id, status, message, level=level)
            self._terminal(session, row_id, status)
        return finished

    def requeue(self, session: Session, row_id: str, *, now: datetime | None = None) -> str | None:
        """running under an expired lease (its worker died or lost the database) -> queued, to be
        published again by the caller; or -> cancelled when a cancellation was asked for (it is
        not run again). Returns the new status, or None if the lease is live or the row moved."""
        now = now or utcnow()
        m: Any = self.model
        expired = (m.id == row_id, m.status == RUNNING, m.lease_expires_at < now)
        gone = {"lease_owner": None, "lease_expires_at": None}
        if self._update(
            session, *expired, m.cancel_requested.is_(True), status=CANCELLED, finished_at=now, **gone
        ):
            why = "cancelled: its worker stopped before it could stop the run"
            self.add_event(session, row_id, "cancelled", why)
            self._terminal(session, row_id, CANCELLED)
            return CANCELLED
        if self._update(session, *expired, status=QUEUED, enqueued_at=now, **gone):
            why = "its worker stopped renewing the lease (the worker died or lost the database)"
            self.add_event(session, row_id, "requeued", f"{why}; back to the queue", level="warning")
            return QUEUED
        return None

    def republish(
        self, session: Session, row_id: str, *, enqueued_at: datetime | None, now: datetime | None = None
    ) -> bool:
        """queued, not picked up since ``enqueued_at`` (message lost, broker restarted without
        persistence, API could not publish) -> queued, ``enqueued_at`` now; the caller publishes
        it again. Conditional on ``enqueued_at`` so that concurrent reconcilers publish it once.
        No event row: the job's state did not change."""
        m: Any = self.model
        same = m.enqueued_at.is_(None) if enqueued_at is None else m.enqueued_at == enqueued_at
        return self._update(session, m.id == row_id, m.status == QUEUED, same, enqueued_at=now or utcnow())

    def expire_leases(self, session: Session, owner_prefix: str, *, now: datetime | None = None) -> int:
        """The leases of a worker known to be dead (owners ``owner_prefix*``) end now, so the
        reconciler's next pass requeues its rows (``requeue``) instead of waiting them out."""
        m: Any = self.model
        stmt = (
            update(m)
            .where(m.status == RUNNING, m.lease_owner.startswith(owner_prefix, autoescape=True))
            .values(lease_expires_at=now or utcnow())
            .execution_options(synchronize_session=False)
        )
        return int(cast(CursorResult[Any], session.execute(stmt)).rowcount)

    # -- helpers -----------------------------------------------------------------------------
    def _update(self, session: Session, *where: Any, **values: Any) -> bool:
        """One conditional UPDATE of one row; True if it applied."""
        stmt = update(self.model).where(*where).values(**values).execution_options(synchronize_session=False)
        return cast(CursorResult[Any], session.execute(stmt)).rowcount == 1

    def _update_held(self, session: Session, row_id: str, owner: str, **values: Any) -> bool:
        """``_update`` of a running row whose lease ``owner`` holds; False when it does not."""
        m: Any = self.model
        return self._update(session, m.id == row_id, m.lease_owner == owner, m.status == RUNNING, **values)

    def _terminal(self, session: Session, row_id: str, status: str) -> None:
        if not self._terminal_hooks:
            return
        row = session.get_one(self.model, row_id, populate_existing=True)
        for hook in self._terminal_hooks:
            hook(session, row, status)


JOBS: Lifecycle[Job] = Lifecycle(Job, JobEvent, "job_id")
# A job that ends notifies its tenant's webhooks: the outbox row is written in the same transaction
# as the terminal UPDATE, so it exists exactly when the job ended (api/webhooks/outbox.py).
JOBS.on_terminal(enqueue_terminal_event)
# Teacher-cache builds (api/routes/teacher_caches.py, worker/cache_builds.py): the same machine.
CACHES: Lifecycle[TeacherCache] = Lifecycle(TeacherCache, TeacherCacheEvent, "cache_id", noun="teacher cache")
CACHES.on_terminal(enqueue_terminal_event)

__all__ = ["CACHES", "CANCELLED", "FAILED", "JOBS", "QUEUED", "RUNNING", "SUCCEEDED", "Lease", "Lifecycle"]
