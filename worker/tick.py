"""The one timer of a running job: each tick is one transaction that renews the lease, writes the
events read since the last tick, and reads ``cancel_requested``.

The supervisor calls the tick between its reads of events.jsonl (``Supervisor(on_tick=...)``); a
tick runs every ``every_s`` seconds, and at once when a lifecycle event arrives (the user sees a
run start or end without waiting) or when ``max_events`` are buffered. The renewal is the write:
its conditional UPDATE (``JOBS.renew``) carries the job's progress, so a worker whose lease was
taken over writes nothing more, and one transaction per tick, not per step, keeps a fast run's
database load flat.
"""

from __future__ import annotations

import logging
import time

from sqlalchemy.exc import SQLAlchemyError

from akl_core.contract import Event
from api.lifecycle import JOBS
from worker.leases import SessionFactory
from worker.recorder import EventRecorder

log = logging.getLogger(__name__)

URGENT = ("loading", "started", "completed", "stopped", "error")


class SupervisorTick:
    def __init__(
        self,
        session_factory: SessionFactory,
        job_id: str,
        owner: str,
        recorder: EventRecorder,
        *,
        lease_s: float,
        every_s: float,
        max_events: int = 200,
    ):
        self.session_factory, self.job_id, self.owner, self.recorder = (
            session_factory,
            job_id,
            owner,
            recorder,
        )
        self.lease_s, self.every_s, self.max_events = lease_s, every_s, max_events
        self.buffer: list[Event] = []
        self.last_run = time.monotonic()
        self.lease_lost = False  # another worker holds the job now: stop writing, stop the run
        self.cancel_requested = False
        self.flushes = 0  # transactions that wrote events (tests check batching)

    def add(self, event: Event) -> None:
        self.buffer.append(event)
        if event.get("type") in URGENT or len(self.buffer) >= self.max_events:
            self.run()

    def __call__(self) -> None:
        if time.monotonic() - self.last_run >= self.every_s:
            self.run()

    def run(self) -> bool:
        """One tick now. A database error keeps the events for the next tick (a blip must not
        kill a run that is hours in; the lease covers it) and returns False."""
        self.last_run = time.monotonic()
        if self.lease_lost:
            return True
        events, self.buffer = self.buffer, []
        try:
            with self.session_factory() as session, session.begin():
                values, metrics = self.recorder.job_values(session, events)
                lease = JOBS.renew(session, self.job_id, self.owner, lease_s=self.lease_s, **values)
                if not lease.held:
                    self.lease_lost = True
                    return True
                self.recorder.write(session, events, metrics)
                self.cancel_requested = self.cancel_requested or lease.cancel_requested
        except SQLAlchemyError as exc:
            log.warning("job %s: tick failed, %d events kept (%s)", self.job_id, len(events), exc)
            self.buffer = events + self.buffer
            return False
        self.flushes += bool(events)
        return True
