"""The deliverer: threads in the API process that send due outbox rows (``api/webhooks/outbox.py``).

A poller lists due deliveries and claims each one (a lease in the database) when a sender thread
is free; the sender checks the URL again (``addresses.check``: the name is resolved now and the
try connects to that address), signs and sends it (``sender.send``) and records the try. All
state is in the database, so any number of API processes may run deliverers side by side, and a
restart (or a SIGKILL) loses nothing: a lease left behind expires and the row is claimed again.
Started by ``api/main.py`` unless ``AKL_WEBHOOKS_DELIVER=false``.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from api.core.config import Settings
from api.db.models import DELIVERY_PENDING
from api.db.session import get_engine, session_factory
from api.webhooks import outbox
from api.webhooks.addresses import AddressRefused, Resolver, check, system_resolver
from api.webhooks.sender import Outcome, send, signed_headers

log = logging.getLogger(__name__)

# (event type, outcome) for each try: outcome is delivered, retry or failed (no tries left).
OnAttempt = Callable[[str, str, outbox.Result], None]


def new_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Deliverer:
    """One poller thread claims due deliveries, at most ``webhooks_concurrency`` at a time, and a
    thread pool sends them. ``start()``, ``stop()``; ``run_once()`` sends inline (tests)."""

    def __init__(
        self,
        settings: Settings,
        *,
        factory: sessionmaker[Session] | None = None,
        on_attempt: OnAttempt | None = None,
        resolver: Resolver = system_resolver,
    ) -> None:
        self.settings = settings
        self.factory = factory or session_factory(get_engine(settings.database_url))
        self.on_attempt = on_attempt
        self.resolver = resolver
        self.owner = new_owner()
        self._stop = threading.Event()
        # A delivery is claimed only when a sender is free, so its lease never runs while it waits.
        self._slots = threading.BoundedSemaphore(settings.webhooks_concurrency)
        self._pool: ThreadPoolExecutor | None = None
        self._poller: threading.Thread | None = None
        self._in_flight: set[Future[None]] = set()
        self._lock = threading.Lock()  # guards _in_flight (the poller adds, senders remove)

    def start(self) -> None:
        self._pool = ThreadPoolExecutor(self.settings.webhooks_concurrency, thread_name_prefix="webhooks")
        self._poller = threading.Thread(target=self._poll, name="webhooks-poller", daemon=True)
        self._poller.start()
        log.info("webhook deliverer %s started", self.owner)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop claiming; wait up to ``timeout`` for tries in flight (a try left unfinished keeps
        its lease, and another deliverer sends it once the lease expires)."""
        self._stop.set()
        if self._poller is not None:
            self._poller.join(timeout)
        with self._lock:
            in_flight = list(self._in_flight)
        wait(in_flight, timeout=timeout)
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                dispatched = self._dispatch()
            except SQLAlchemyError:  # the database is down: try again after the poll interval
                log.exception("webhook deliverer: database error")
                dispatched = 0
            except Exception:  # never let the thread die: deliveries would stop silently
                log.exception("webhook deliverer: unexpected error")
                dispatched = 0
            if not dispatched:
                self._stop.wait(self.settings.webhooks_poll_s)

    def _dispatch(self) -> int:
        assert self._pool is not None
        dispatched = 0
        for delivery_id in outbox.due(self.factory, limit=2 * self.settings.webhooks_concurrency):
            while not self._slots.acquire(timeout=0.5):
                if self._stop.is_set():
                    return dispatched
            claimed = None
            try:
                claimed = self._claim(delivery_id)
            finally:
                if claimed is None:
                    self._slots.release()
            if claimed is None:  # another deliverer (thread or process) took it
                continue
            future = self._pool.submit(self._deliver, claimed)
            with self._lock:
                self._in_flight.add(future)
            future.add_done_callback(self._done)
            dispatched += 1
        return dispatched

    def _done(self, future: Future[None]) -> None:
        with self._lock:
            self._in_flight.discard(future)
        self._slots.release()
        if future.exception() is not None:
            log.error("webhook delivery failed unexpectedly", exc_info=future.exception())

    def _claim(self, delivery_id: str) -> outbox.Claimed | None:
        if self._stop.is_set():
            return None
        return outbox.claim(self.factory, delivery_id, self.owner, lease_s=self.settings.webhooks_lease_s)

    def run_once(self, limit: int = 10) -> int:
        """Claim and send due deliveries one at a time, in this thread; the number sent."""
        sent = 0
        for delivery_id in outbox.due(self.factory, limit=limit):
            claimed = self._claim(delivery_id)
            if claimed is not None:
                self._deliver(claimed)
                sent += 1
        return sent

    def _deliver(self, claimed: outbox.Claimed) -> None:
        settings = self.settings
        body = claimed.body.encode()
        try:
            target = check(claimed.url, allow_private=settings.webhooks_allow_private, resolver=self.resolver)
        except AddressRefused as exc:  # DNS may have changed since registration
            outcome = Outcome(status_code=None, error=f"refused: {exc}", duration_ms=0)
        else:
            headers = signed_headers(claimed.secret, claimed.id, body)
            outcome = send(target, body, headers, timeout_s=settings.webhooks_timeout_s)
        result = outbox.Result(outcome.succeeded, outcome.status_code, outcome.error, outcome.duration_ms)
        status = outbox.record(
            self.factory,
            claimed,
            self.owner,
            result,
            max_attempts=settings.webhooks_max_attempts,
            base_s=settings.webhooks_backoff_s,
            max_s=settings.webhooks_backoff_max_s,
        )
        if status is None:
            log.warning("webhook delivery %s: lease lost before its try was recorded", claimed.id)
            return
        if not outcome.succeeded:
            log.info("webhook delivery %s try %d: %s", claimed.id, claimed.attempts + 1, outcome.error)
        if self.on_attempt is not None:
            outcome_name = "retry" if status == DELIVERY_PENDING else status
            self.on_attempt(claimed.event_type, outcome_name, result)
