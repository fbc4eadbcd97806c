"""One teacher-cache build, start to end: claim the row, run ``akl_core.cache_runner`` under
supervision, record progress and events, settle its status. The same lifecycle as a job
(worker/jobs.py): a lease renewed by heartbeats, cancel within seconds, a shutdown or a crash gives
the build back to the queue, and the next run resumes in the same directory without redoing the
shards already written (the runner's own guarantee, given the same OUT_DIR).

Every state change is one conditional UPDATE on ``teacher_caches`` plus its event row, as in
worker/leases.py. Outcomes: ``skipped``, ``succeeded``, ``failed``, ``cancelled``, ``released``, ``lost``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import and_, func, literal, or_, select, update
from sqlalchemy.exc import SQLAlchemyError

from api.db.models import (
    CANCELLED,
    FAILED,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    TeacherCache,
    TeacherCacheEvent,
    UTCDateTime,
    utcnow,
)
from worker.jobs import WorkerContext, _retrying, runner_argv, runner_env
from worker.leases import SessionFactory, new_owner
from worker.redact import redact_value
from worker.supervisor import EXIT_FAILED, EXIT_STOPPED, RunResult, Supervisor

log = logging.getLogger(__name__)

CACHE_RUNNER = "akl_core.cache_runner"
MANIFEST = "manifest.json"
SPEC_FILE = "build_spec.json"  # the resolved request the runner reads (file ids -> paths)
URGENT = ("loading", "started", "completed", "stopped", "error")
QUIET = ("progress", "shard")  # counted on the row, not stored one by one


# -- lease transitions (the jobs' rules, on teacher_caches) ---------------------------------------
def _where_held(cache_id: str, owner: str) -> Any:
    model = TeacherCache
    return and_(model.id == cache_id, model.lease_owner == owner, model.status == RUNNING)


def claim(sf: SessionFactory, cache_id: str, owner: str, *, lease_s: float) -> dict[str, Any] | None:
    """Take the build if it is queued, or running under an expired lease; a snapshot or None."""
    now, model = utcnow(), TeacherCache
    claimable = or_(
        model.status == QUEUED,
        and_(model.status == RUNNING, or_(model.lease_expires_at.is_(None), model.lease_expires_at < now)),
    )
    stmt = (
        update(model)
        .where(model.id == cache_id, model.deleted_at.is_(None), claimable)
        .values(
            status=RUNNING,
            lease_owner=owner,
            lease_expires_at=now + timedelta(seconds=lease_s),
            heartbeat_at=now,
            attempts=model.attempts + 1,
            started_at=func.coalesce(model.started_at, literal(now, UTCDateTime())),
        )
        .execution_options(synchronize_session=False)
    )
    with sf() as session, session.begin():
        if session.execute(stmt).rowcount != 1:
            return None
        row = session.get_one(model, cache_id)
        return {
            "id": row.id,
            "attempts": row.attempts,
            "queue": row.queue,
            "spec": dict(row.resolved_spec or row.spec),
            "cancel_requested": bool(row.cancel_requested),
            "output_dir": row.output_dir,
        }


def renew(sf: SessionFactory, cache_id: str, owner: str, *, lease_s: float) -> tuple[bool, bool]:
    """(still held, cancel requested)."""
    now = utcnow()
    stmt = (
        update(TeacherCache)
        .where(_where_held(cache_id, owner))
        .values(lease_expires_at=now + timedelta(seconds=lease_s), heartbeat_at=now)
        .execution_options(synchronize_session=False)
    )
    with sf() as session, session.begin():
        held = session.execute(stmt).rowcount == 1
        cancel = session.scalar(select(TeacherCache.cancel_requested).where(TeacherCache.id == cache_id))
    return held, bool(cancel)


def release(sf: SessionFactory, cache_id: str, owner: str, *, count_attempt: bool) -> bool:
    model = TeacherCache
    stmt = (
        update(model)
        .where(_where_held(cache_id, owner))
        .values(
            status=QUEUED,
            lease_owner=None,
            lease_expires_at=None,
            enqueued_at=utcnow(),
            attempts=model.attempts if count_attempt else model.attempts - 1,
        )
        .execution_options(synchronize_session=False)
    )
    with sf() as session, session.begin():
        return session.execute(stmt).rowcount == 1


def finish(sf: SessionFactory, cache_id: str, owner: str, status: str, **values: Any) -> bool:
    stmt = (
        update(TeacherCache)
        .where(_where_held(cache_id, owner))
        .values(status=status, finished_at=utcnow(), lease_owner=None, lease_expires_at=None, **values)
        .execution_options(synchronize_session=False)
    )
    with sf() as session, session.begin():
        return session.execute(stmt).rowcount == 1


def note(
    sf: SessionFactory, cache_id: str, type_: str, message: str, level: str = "info", data: Any = None
) -> None:
    try:
        with sf() as session, session.begin():
            session.add(
                TeacherCacheEvent(cache_id=cache_id, type=type_, level=level, message=message, data=data)
            )
    except SQLAlchemyError:
        log.exception("cache %s: could not record the %s event", cache_id, type_)


# -- the build ------------------------------------------------------------------------------------
def build_cache(cache_id: str, ctx: WorkerContext) -> str:
    owner = new_owner()
    sf = ctx.session_factory
    row = claim(sf, cache_id, owner, lease_s=ctx.options.lease_s)
    if row is None:
        log.info("cache %s: not claimable (finished, deleted, or another worker holds it)", cache_id)
        return "skipped"
    if row["cancel_requested"]:
        return _end(ctx, cache_id, owner, CANCELLED, "cancelled before it started")
    if row["attempts"] > ctx.options.max_attempts:
        message = (
            f"the build was started {row['attempts'] - 1} times and never finished; "
            f"giving up after {ctx.options.max_attempts} attempts"
        )
        return _end(ctx, cache_id, owner, FAILED, message, error_code="too_many_attempts")
    output_dir = Path(row["output_dir"])
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        spec_path = output_dir / SPEC_FILE
        spec_path.write_text(json.dumps(row["spec"], indent=2), encoding="utf-8")
        note(sf, cache_id, "running", f"attempt {row['attempts']} on worker {owner}")
        result, stop = _supervise(cache_id, owner, spec_path, output_dir, ctx)
    except OSError as exc:
        log.exception("cache %s: could not run", cache_id)
        message = f"the worker could not run the build: {exc}"
        return _end(ctx, cache_id, owner, FAILED, message, error_code="internal_error")
    return _settle(cache_id, row["queue"], owner, output_dir, result, stop, ctx)


class _Heartbeat(threading.Thread):
    """Renews the lease every ``heartbeat_s`` and reports a cancellation request."""

    def __init__(self, sf: SessionFactory, cache_id: str, owner: str, ctx: WorkerContext):
        super().__init__(name=f"heartbeat-{cache_id}", daemon=True)
        self.sf, self.cache_id, self.owner, self.options = sf, cache_id, owner, ctx.options
        self.cancel_requested, self.lost, self._halt = threading.Event(), threading.Event(), threading.Event()

    def run(self) -> None:
        poll_s = min(self.options.cancel_poll_s, self.options.heartbeat_s)
        while not self._halt.wait(poll_s):
            try:
                held, cancel = renew(self.sf, self.cache_id, self.owner, lease_s=self.options.lease_s)
            except Exception:  # a database blip: the lease covers it
                log.exception("heartbeat for cache %s failed", self.cache_id)
                continue
            if not held:
                self.lost.set()
            if cancel:
                self.cancel_requested.set()

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)


class _Recorder:
    """Batches the runner's events: progress onto the row, the rest into teacher_cache_events;
    each flush is conditional on our lease."""

    def __init__(self, sf: SessionFactory, cache_id: str, owner: str, ctx: WorkerContext):
        self.sf, self.cache_id, self.owner, self.ctx = sf, cache_id, owner, ctx
        self.buffer: list[dict[str, Any]] = []
        self.last_flush = time.monotonic()
        self.lease_lost = False

    def add(self, event: dict[str, Any]) -> None:
        self.buffer.append(event)
        if event.get("type") in URGENT or len(self.buffer) >= self.ctx.options.flush_max_events:
            self.flush()

    def tick(self) -> None:
        if self.buffer and time.monotonic() - self.last_flush >= self.ctx.options.flush_interval_s:
            self.flush()

    def flush(self) -> bool:
        self.last_flush = time.monotonic()
        if not self.buffer or self.lease_lost:
            return True
        events, self.buffer = self.buffer, []
        values: dict[str, Any] = {"heartbeat_at": utcnow()}
        for event in events:
            done = _progress(event)
            if done is not None:
                values["progress"] = done
        try:
            with self.sf() as session, session.begin():
                stmt = update(TeacherCache).where(_where_held(self.cache_id, self.owner)).values(**values)
                if session.execute(stmt.execution_options(synchronize_session=False)).rowcount != 1:
                    self.lease_lost = True
                    return True
                for event in events:
                    if event.get("type") not in QUIET:
                        session.add(self._row(event))
        except SQLAlchemyError as exc:
            log.warning("cache %s: could not record %d events (%s)", self.cache_id, len(events), exc)
            self.buffer = events + self.buffer
            return False
        return True

    def _row(self, event: dict[str, Any]) -> TeacherCacheEvent:
        kind = str(event.get("type"))
        level = "error" if kind == "error" else str(event.get("level") or "info")
        message = self.ctx.redact(str(event.get("message") or kind))
        data = {k: v for k, v in event.items() if k not in ("type", "level", "message")}
        data = redact_value(_finite(data), self.ctx.redact)
        return TeacherCacheEvent(
            cache_id=self.cache_id, type=kind[:32], level=level[:16], message=message, data=data or None
        )


def _progress(event: dict[str, Any]) -> float | None:
    """A fraction done from ``progress``, or ``done`` / ``total`` style counters."""
    if isinstance(event.get("progress"), (int, float)):
        return max(0.0, min(1.0, float(event["progress"])))
    for done, total in (
        ("examples_done", "examples_total"),
        ("shards_done", "shards_total"),
        ("done", "total"),
    ):
        a, b = event.get(done), event.get(total)
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b > 0:
            return max(0.0, min(1.0, a / b))
    if event.get("type") == "completed":
        return 1.0
    return None


def _finite(value: Any) -> Any:
    if isinstance(value, float) and value != value or value in (float("inf"), float("-inf")):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _supervise(
    cache_id: str, owner: str, spec_path: Path, output_dir: Path, ctx: WorkerContext
) -> tuple[RunResult, str | None]:
    recorder = _Recorder(ctx.session_factory, cache_id, owner, ctx)
    heartbeat = _Heartbeat(ctx.session_factory, cache_id, owner, ctx)

    def should_stop() -> str | None:
        if recorder.lease_lost or heartbeat.lost.is_set():
            return "lease_lost"
        if heartbeat.cancel_requested.is_set():
            return "cancelled"
        return "shutdown" if ctx.shutdown.is_set() else None

    env = runner_env(ctx.settings)
    env["AKL_CACHES_ROOT"] = str(Path(ctx.settings.caches_root or "caches").resolve())
    supervisor = Supervisor(
        runner_argv(spec_path, output_dir, ctx.options.cache_runner_module),
        on_event=recorder.add,
        on_tick=recorder.tick,
        should_stop=should_stop,
        env=env,
        stderr_path=output_dir / "runner.log",
        term_grace_s=ctx.options.term_grace_s,
    )
    heartbeat.start()
    try:
        result = supervisor.run()
    finally:
        supervisor.terminate()
        heartbeat.stop()
    for _ in range(10):
        if recorder.flush():
            break
        time.sleep(3)
    return result, should_stop() if result.stop_reason is None else result.stop_reason


def _settle(
    cache_id: str,
    queue: str,
    owner: str,
    output_dir: Path,
    result: RunResult,
    stop: str | None,
    ctx: WorkerContext,
) -> str:
    completed = "completed" in result.last_events
    if stop == "lease_lost" and not completed:
        return "lost"
    if completed:
        try:
            return _succeed(cache_id, owner, output_dir, result.last_events["completed"], ctx)
        except (OSError, ValueError, KeyError) as exc:
            message = f"the build completed but its manifest is unreadable: {exc}"
            return _end(ctx, cache_id, owner, FAILED, message, error_code="invalid_cache")
    if stop == "cancelled":
        return _end(
            ctx, cache_id, owner, CANCELLED, "cancelled; the shards written so far are kept until deleted"
        )
    if stop == "shutdown" or result.returncode == EXIT_STOPPED or result.returncode < 0:
        crashed = stop != "shutdown" and result.returncode != EXIT_STOPPED
        why = "the worker is shutting down" if not crashed else f"the runner was killed ({result.returncode})"
        if _retrying(release, ctx.session_factory, cache_id, owner, count_attempt=crashed):
            note(ctx.session_factory, cache_id, "released", f"back to the queue: {why}")
            try:
                ctx.enqueue(cache_id, queue)
            except Exception:
                log.exception("cache %s: could not re-enqueue", cache_id)
        return "released"
    error = result.last_events.get("error")
    if result.returncode == EXIT_FAILED and error is not None:
        code, message = str(error.get("code") or "internal_error"), str(error.get("message") or "")
    else:
        code = "internal_error"
        message = f"the cache runner exited with code {result.returncode}" + (
            f"; last output:\n{result.stderr_tail[-2000:]}" if result.stderr_tail else ""
        )
    return _end(ctx, cache_id, owner, FAILED, message, error_code=code)


def read_manifest(output_dir: Path) -> dict[str, Any]:
    manifest = json.loads((output_dir / MANIFEST).read_text(encoding="utf-8"))
    if not isinstance(manifest, dict):
        raise ValueError(f"{MANIFEST} is not a JSON object")
    return manifest


def _succeed(cache_id: str, owner: str, output_dir: Path, event: dict[str, Any], ctx: WorkerContext) -> str:
    manifest = read_manifest(output_dir)
    tokens = _int(manifest.get("tokens"))
    size = _int(manifest.get("bytes"))
    per_token = manifest.get("bytes_per_token")
    if not isinstance(per_token, (int, float)) and tokens and size is not None:
        per_token = size / tokens
    values = {
        "progress": 1.0,
        "tokens": tokens,
        "examples": _int(manifest.get("examples")),
        "bytes": size,
        "bytes_per_token": float(per_token) if isinstance(per_token, (int, float)) else None,
        "manifest": redact_value(_finite(manifest), ctx.redact),
    }
    del event
    return _end(ctx, cache_id, owner, SUCCEEDED, "succeeded", **values)


def _int(value: Any) -> int | None:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _end(ctx: WorkerContext, cache_id: str, owner: str, status: str, message: str, **values: Any) -> str:
    error_code = values.pop("error_code", None)
    message = ctx.redact(message)
    if _retrying(
        finish, ctx.session_factory, cache_id, owner, status,
        error_code=error_code, error_message=message if error_code else None, **values,
    ):  # fmt: skip
        note(ctx.session_factory, cache_id, status, message, level="error" if status == FAILED else "info")
    return status


# -- the reconciler's share (worker/reconciler.py calls it) -----------------------------------------
def reconcile_caches(
    sf: SessionFactory, enqueue: Any, now: datetime, *, requeue_after_s: float, limit: int = 100
) -> tuple[list[str], list[str], list[str]]:
    """Expired leases back to the queue (or cancelled, when asked), stale queued builds
    re-published. Returns (expired, cancelled, requeued) cache ids."""
    model = TeacherCache
    expired_ids, cancelled_ids, requeued_ids = [], [], []
    stale_before = now - timedelta(seconds=requeue_after_s)
    with sf() as session:
        expired = session.execute(
            select(model.id, model.cancel_requested, model.queue)
            .where(model.status == RUNNING, model.lease_expires_at < now)
            .limit(limit)
        ).all()
        stale = session.execute(
            select(model.id, model.enqueued_at, model.queue)
            .where(
                model.status == QUEUED,
                model.deleted_at.is_(None),
                or_(model.enqueued_at.is_(None), model.enqueued_at < stale_before),
                model.created_at < stale_before,
            )
            .limit(limit)
        ).all()
    running_expired = and_(model.status == RUNNING, model.lease_expires_at < now)
    for cache_id, cancel_requested, queue in expired:
        if cancel_requested:
            values: dict[str, Any] = {"status": CANCELLED, "finished_at": now}
            why, bucket = "its worker died after a cancellation was asked for", cancelled_ids
        else:
            values = {"status": QUEUED, "enqueued_at": now}
            why, bucket = "its worker stopped renewing the lease; back to the queue", expired_ids
        stmt = update(model).where(model.id == cache_id, running_expired)
        stmt = stmt.values(lease_owner=None, lease_expires_at=None, **values)
        if _apply(sf, stmt, cache_id, why) and (cancel_requested or _publish(enqueue, cache_id, queue)):
            bucket.append(cache_id)
    for cache_id, enqueued_at, queue in stale:
        unchanged = model.enqueued_at.is_(None) if enqueued_at is None else model.enqueued_at == enqueued_at
        stmt = (
            update(model)
            .where(model.id == cache_id, model.status == QUEUED, unchanged)
            .values(enqueued_at=now)
        )
        if _apply(sf, stmt, cache_id, None) and _publish(enqueue, cache_id, queue):
            requeued_ids.append(cache_id)
    return expired_ids, cancelled_ids, requeued_ids


def _apply(sf: SessionFactory, stmt: Any, cache_id: str, why: str | None) -> bool:
    with sf() as session, session.begin():
        if session.execute(stmt.execution_options(synchronize_session=False)).rowcount != 1:
            return False
        if why is not None:
            session.add(TeacherCacheEvent(cache_id=cache_id, type="requeued", level="warning", message=why))
    return True


def _publish(enqueue: Any, cache_id: str, queue: str) -> bool:
    try:
        enqueue(cache_id, queue)
    except Exception:
        log.exception("reconciler: could not enqueue %s", cache_id)
        return False
    return True
