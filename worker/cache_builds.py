"""One teacher-cache build, start to end: claim the row, run ``akl_core.cache_runner`` under
supervision, record progress and events, settle its status. The jobs' lifecycle
(``api.lifecycle.CACHES``, the same machine as ``JOBS``): a lease renewed by the supervisor's
tick, cancel within seconds, a shutdown or a crash gives the build back to the queue, and the
next run resumes in the same directory without redoing the shards already written (the runner's
own guarantee, given the same OUT_DIR). The reconciler requeues expired leases of both kinds.

Outcomes: ``skipped``, ``succeeded``, ``failed``, ``cancelled``, ``released``, ``lost``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from akl_core.contract import Event, finite, parse_line
from api.db.models import CANCELLED, FAILED, SUCCEEDED
from api.lifecycle import CACHES
from worker.jobs import WorkerContext, back_to_queue, runner_argv, runner_env, runner_failure
from worker.leases import SessionFactory, new_owner, transact
from worker.redact import redact_value
from worker.supervisor import RunResult, Supervisor

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
SPEC_FILE = "build_spec.json"  # the resolved request the runner reads (file ids -> paths)
URGENT = ("loading", "started", "completed", "stopped", "error")
QUIET = ("progress", "shard")  # counted on the row, not stored one by one


def check_cache_line(line: bytes | str) -> Event:
    """One line of a cache build's events.jsonl (akl_core/cache_builder.py lists them). A line
    that is not a JSON object with a ``type`` becomes a warning ``log`` event."""
    event = parse_line(line)
    if event is None:
        text = line.decode("utf-8", "replace") if isinstance(line, bytes) else line
        return {"type": "log", "level": "warning", "message": f"unreadable runner event: {text[:2000]}"}
    return finite(event)


def build_cache(cache_id: str, ctx: WorkerContext) -> str:
    owner = new_owner()
    row = _claim(ctx.session_factory, cache_id, owner, lease_s=ctx.options.lease_s)
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
        result, stop = _supervise(cache_id, owner, spec_path, output_dir, ctx)
    except OSError as exc:
        log.exception("cache %s: could not run", cache_id)
        message = f"the worker could not run the build: {exc}"
        return _end(ctx, cache_id, owner, FAILED, message, error_code="internal_error")
    return _settle(cache_id, row["queue"], owner, output_dir, result, stop, ctx)


def _claim(sf: SessionFactory, cache_id: str, owner: str, *, lease_s: float) -> dict[str, Any] | None:
    with sf() as session, session.begin():
        row = CACHES.claim(session, cache_id, owner, lease_s=lease_s)
        if row is None:
            return None
        return {
            "attempts": row.attempts,
            "queue": row.queue,
            "spec": dict(row.resolved_spec or row.spec),
            "cancel_requested": bool(row.cancel_requested),
            "output_dir": row.output_dir,
        }


class _Tick:
    """The build's one timer: each tick is one transaction that renews the lease (carrying the
    progress), writes the events read since the last tick and reads ``cancel_requested``."""

    def __init__(self, sf: SessionFactory, cache_id: str, owner: str, ctx: WorkerContext):
        self.sf, self.cache_id, self.owner, self.ctx = sf, cache_id, owner, ctx
        self.buffer: list[Event] = []
        self.last_run = time.monotonic()
        self.lease_lost = self.cancel_requested = False

    def add(self, event: Event) -> None:
        self.buffer.append(event)
        if event.get("type") in URGENT or len(self.buffer) >= self.ctx.options.flush_max_events:
            self.run()

    def __call__(self) -> None:
        if time.monotonic() - self.last_run >= self.ctx.options.tick_s:
            self.run()

    def run(self) -> bool:
        self.last_run = time.monotonic()
        if self.lease_lost:
            return True
        events, self.buffer = self.buffer, []
        values: dict[str, Any] = {}
        for event in events:
            done = _progress(event)
            if done is not None:
                values["progress"] = done
        try:
            with self.sf() as session, session.begin():
                lease = CACHES.renew(
                    session, self.cache_id, self.owner, lease_s=self.ctx.options.lease_s, **values
                )
                if not lease.held:
                    self.lease_lost = True
                    return True
                for event in events:
                    if event.get("type") not in QUIET:
                        self._record(session, event)
                self.cancel_requested = self.cancel_requested or lease.cancel_requested
        except SQLAlchemyError as exc:
            log.warning("cache %s: tick failed, %d events kept (%s)", self.cache_id, len(events), exc)
            self.buffer = events + self.buffer
            return False
        return True

    def _record(self, session: Any, event: Event) -> None:
        kind = str(event.get("type"))
        level = "error" if kind == "error" else str(event.get("level") or "info")
        message = self.ctx.redact(str(event.get("message") or kind))
        data = redact_value(
            {k: v for k, v in event.items() if k not in ("type", "level", "message")}, self.ctx.redact
        )
        CACHES.add_event(session, self.cache_id, kind, message, level=level, data=data or None)


def _progress(event: Event) -> float | None:
    """The fraction done: a ``shard`` event's ``progress``, or ``done_shards / total_shards``."""
    if isinstance(event.get("progress"), (int, float)):
        return max(0.0, min(1.0, float(event["progress"])))
    done, total = event.get("done_shards"), event.get("total_shards")
    if isinstance(done, (int, float)) and isinstance(total, (int, float)) and total > 0:
        return max(0.0, min(1.0, done / total))
    return 1.0 if event.get("type") == "completed" else None


def _supervise(
    cache_id: str, owner: str, spec_path: Path, output_dir: Path, ctx: WorkerContext
) -> tuple[RunResult, str | None]:
    tick = _Tick(ctx.session_factory, cache_id, owner, ctx)

    def should_stop() -> str | None:
        if tick.lease_lost:
            return "lease_lost"
        if tick.cancel_requested:
            return "cancelled"
        return "shutdown" if ctx.shutdown.is_set() else None

    env = runner_env(ctx.settings)
    env["AKL_CACHES_ROOT"] = str(Path(ctx.settings.caches_root or "caches").resolve())
    supervisor = Supervisor(
        runner_argv(spec_path, output_dir, ctx.options.cache_runner_module),
        events_path=output_dir / "events.jsonl",
        check=check_cache_line,
        on_event=tick.add,
        on_tick=tick,
        should_stop=should_stop,
        env=env,
        stderr_path=output_dir / "runner.log",
        term_grace_s=ctx.options.term_grace_s,
    )
    try:
        result = supervisor.run()
    finally:
        supervisor.terminate()
    for _ in range(10):
        if tick.run():
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
            manifest = read_manifest(output_dir)
        except (OSError, ValueError) as exc:
            message = f"the build completed but its manifest is unreadable: {exc}"
            return _end(ctx, cache_id, owner, FAILED, message, error_code="invalid_cache")
        return _end(ctx, cache_id, owner, SUCCEEDED, "succeeded", **_sizes(manifest, ctx))
    if stop == "cancelled":
        return _end(
            ctx, cache_id, owner, CANCELLED, "cancelled; the shards written so far are kept until deleted"
        )
    requeue = back_to_queue(stop, result)
    if requeue is not None:
        crashed, why = requeue
        message = f"back to the queue: {why}"
        if transact(
            ctx.session_factory, CACHES.release, cache_id, owner, message=message, count_attempt=crashed
        ):
            try:
                ctx.enqueue(cache_id, queue)
            except Exception:
                log.exception("cache %s: could not re-enqueue", cache_id)
        return "released"
    code, message = runner_failure(result, "cache runner")
    return _end(ctx, cache_id, owner, FAILED, message, error_code=code)


def read_manifest(output_dir: Path) -> dict[str, Any]:
    manifest = json.loads((output_dir / MANIFEST).read_text(encoding="utf-8"))
    if not isinstance(manifest, dict):
        raise ValueError(f"{MANIFEST} is not a JSON object")
    return manifest


def _sizes(manifest: dict[str, Any], ctx: WorkerContext) -> dict[str, Any]:
    """The row's columns from the manifest (server paths in it redacted)."""
    tokens, size = _int(manifest.get("tokens")), _int(manifest.get("bytes"))
    per_token = manifest.get("bytes_per_token")
    if not isinstance(per_token, (int, float)) and tokens and size is not None:
        per_token = size / tokens
    return {
        "progress": 1.0,
        "tokens": tokens,
        "examples": _int(manifest.get("examples")),
        "bytes": size,
        "bytes_per_token": float(per_token) if isinstance(per_token, (int, float)) else None,
        "manifest": redact_value(finite(manifest), ctx.redact),
    }


def _int(value: Any) -> int | None:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _end(ctx: WorkerContext, cache_id: str, owner: str, status: str, message: str, **values: Any) -> str:
    error_code = values.pop("error_code", None)
    message = ctx.redact(message)
    transact(
        ctx.session_factory, CACHES.finish, cache_id, owner, status,
        message=message, error_code=error_code, error_message=message if error_code else None, **values,
    )  # fmt: skip
    return status
