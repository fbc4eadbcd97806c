"""Prometheus metrics (issue 13, section 4), for operators only.

Served by prometheus-client's own HTTP server on ``AKL_METRICS_PORT`` (off when unset), bound to
``AKL_METRICS_HOST``: never on the API's port, never behind a tenant's key. Two kinds:
- read from the database at each scrape (``DatabaseCollector``), so every API process reports the
  same service-wide numbers: jobs by status and queue, queue wait, running jobs' step rate and
  tokens/s, the webhook outbox by status;
- counted in this process: API request latency by route template (``/v1/jobs/{job_id}``, never
  the raw path, so ids cannot blow up the series), and webhook delivery tries by outcome.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import case, func, select
from sqlalchemy.orm import Session
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.core.config import Settings
from api.db.models import (
    JOB_STATUSES,
    QUEUED,
    RUNNING,
    Job,
    JobMetric,
    WebhookDelivery,
    utcnow,
)
from api.db.session import get_engine, session_factory

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
WAIT_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400)
RATE_WINDOW_S = 300  # running jobs' step rate: over the steps recorded in this window
METHODS = {"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"}


class Metrics:
    """The process's registry: request latency, webhook tries, and the database collector."""

    def __init__(self, settings: Settings) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.request_seconds = Histogram(
            "akl_http_request_duration_seconds",
            "API request latency by method, route template and status",
            ["method", "route", "status"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.webhook_tries = Counter(
            "akl_webhook_deliveries",
            "Webhook delivery tries by event and outcome (delivered, retry, failed: no tries left)",
            ["event", "outcome"],
            registry=self.registry,
        )
        self.registry.register(DatabaseCollector(settings.database_url))

    def on_webhook_attempt(self, event: str, outcome: str, _result: Any) -> None:
        self.webhook_tries.labels(event, outcome).inc()


class RequestMetricsMiddleware:
    """Observes each HTTP request's duration, labelled with the route that matched (its template)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = [500]  # an exception that escapes becomes a 500 outside this middleware

        async def send_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = route_template(scope)
            method = scope.get("method", "")
            self.metrics.request_seconds.labels(
                method if method in METHODS else "other", route, str(status[0])
            ).observe(time.perf_counter() - start)


def route_template(scope: Scope) -> str:
    """The matched route's full path template (``/v1/jobs/{job_id}``); ``<unmatched>`` for none.

    Recent FastAPI versions keep included routers nested: ``scope["route"]`` is then the inner route with
    its path relative to the router's prefix, and the full template is in the effective route
    context. Older versions flatten routes, so ``scope["route"].path`` is already the full path."""
    context = (scope.get("fastapi") or {}).get("effective_route_context")
    path = getattr(context, "path", None) or getattr(scope.get("route"), "path", None)
    return path if isinstance(path, str) and path else "<unmatched>"


def _seconds_between(later: Any, earlier: Any, dialect: str) -> Any:
    if dialect == "sqlite":  # UTC text; julianday counts days
        return (func.julianday(later) - func.julianday(earlier)) * 86400.0
    return func.extract("epoch", later - earlier)


class DatabaseCollector(Collector):
    """Service-wide numbers read at scrape time (a few grouped queries)."""

    def __init__(self, database_url: str) -> None:
        self.database_url = database_url

    def describe(self) -> list[Metric]:
        return []  # the families depend on the data; no checks at registration

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("akl_metrics_database_up", "1 when the database answered this scrape")
        try:
            engine = get_engine(self.database_url)
            with session_factory(engine)() as session:
                families = list(self._families(session, engine.dialect.name))
        except Exception:
            log.exception("metrics: could not read the database")
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families

    def _families(self, session: Session, dialect: str) -> Iterator[Metric]:
        now = utcnow()
        jobs = GaugeMetricFamily("akl_jobs", "Jobs by status and queue", labels=["status", "queue"])
        counts: dict[str, dict[str, int]] = {}
        for status, queue, count in session.execute(
            select(Job.status, Job.queue, func.count()).group_by(Job.status, Job.queue)
        ):
            counts.setdefault(queue, dict.fromkeys(JOB_STATUSES, 0))[status] = count
        for queue, by_status in sorted(counts.items()):
            for status, count in by_status.items():
                jobs.add_metric([status, queue], count)
        yield jobs

        oldest = GaugeMetricFamily(
            "akl_queue_oldest_wait_seconds",
            "Time the longest-waiting queued job has waited",
            labels=["queue"],
        )
        entered = func.coalesce(Job.enqueued_at, Job.created_at)
        for queue, first in session.execute(
            select(Job.queue, func.min(entered)).where(Job.status == QUEUED).group_by(Job.queue)
        ):
            oldest.add_metric([queue], max(0.0, (now - _as_utc(first)).total_seconds()) if first else 0.0)
        yield oldest
        yield self._wait_histogram(session, dialect)
        yield from self._running(session, now)

        outbox = GaugeMetricFamily("akl_webhook_outbox", "Webhook deliveries by status", labels=["status"])
        for status, count in session.execute(
            select(WebhookDelivery.status, func.count()).group_by(WebhookDelivery.status)
        ):
            outbox.add_metric([status], count)
        yield outbox

    def _wait_histogram(self, session: Session, dialect: str) -> Metric:
        """Time from submission to first start, over every job that started (a job starts once, so
        the buckets only grow, as a Prometheus histogram's must)."""
        wait = _seconds_between(Job.started_at, Job.created_at, dialect)
        columns = [func.sum(case((wait <= bound, 1), else_=0)) for bound in WAIT_BUCKETS]
        histogram = HistogramMetricFamily(
            "akl_queue_wait_seconds", "Time from submission to a worker's first start", labels=["queue"]
        )
        rows = session.execute(
            select(Job.queue, func.count(), func.sum(wait), *columns)
            .where(Job.started_at.is_not(None))
            .group_by(Job.queue)
        )
        for queue, count, total, *cumulative in rows:
            buckets = [(str(float(b)), int(c or 0)) for b, c in zip(WAIT_BUCKETS, cumulative, strict=True)]
            histogram.add_metric([queue], buckets + [("+Inf", int(count))], sum_value=float(total or 0.0))
        return histogram

    def _running(self, session: Session, now: datetime) -> Iterator[Metric]:
        running = session.execute(
            select(Job.id, Job.queue, Job.current_metrics).where(Job.status == RUNNING)
        ).all()
        tokens = GaugeMetricFamily(
            "akl_job_tokens_per_second", "A running job's latest tokens/s", labels=["job_id", "queue"]
        )
        steps = GaugeMetricFamily(
            "akl_job_steps_per_second",
            f"A running job's optimizer steps per second over the last {RATE_WINDOW_S} s",
            labels=["job_id", "queue"],
        )
        queues = {job_id: queue for job_id, queue, _ in running}
        for job_id, queue, current in running:
            value = (current or {}).get("tokens_per_s")
            if isinstance(value, (int, float)):
                tokens.add_metric([job_id, queue], float(value))
        if queues:
            window = session.execute(
                select(
                    JobMetric.job_id,
                    func.min(JobMetric.step),
                    func.max(JobMetric.step),
                    func.min(JobMetric.created_at),
                    func.max(JobMetric.created_at),
                )
                .where(
                    JobMetric.job_id.in_(list(queues)),
                    JobMetric.created_at >= now - timedelta(seconds=RATE_WINDOW_S),
                )
                .group_by(JobMetric.job_id)
            )
            for job_id, first_step, last_step, first_at, last_at in window:
                span = (_as_utc(last_at) - _as_utc(first_at)).total_seconds() if first_at and last_at else 0
                if span > 0:
                    steps.add_metric([job_id, queues[job_id]], (last_step - first_step) / span)
        yield tokens
        yield steps


def _as_utc(value: Any) -> Any:
    """Aggregates over a UTCDateTime column come back through its type, except on SQLite, where
    ``min``/``max`` may return the stored text."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def serve(metrics: Metrics, settings: Settings) -> Callable[[], None] | None:
    """Start the metrics server when AKL_METRICS_PORT is set; returns its stop function. A port in
    use (a second API process on the machine) is logged, not fatal: the API still serves."""
    if settings.metrics_port is None:
        return None
    try:
        server, thread = start_http_server(
            settings.metrics_port, addr=settings.metrics_host, registry=metrics.registry
        )
    except OSError as exc:
        log.error("metrics: cannot listen on %s:%s (%s)", settings.metrics_host, settings.metrics_port, exc)
        return None
    log.info("metrics on http://%s:%s/metrics", settings.metrics_host, settings.metrics_port)

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(5)

    return stop
