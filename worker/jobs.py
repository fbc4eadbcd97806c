"""One job, start to end: claim it, run the runner under supervision, record, settle its status.

``run_job`` is what the Celery task calls; it takes everything it needs in a ``WorkerContext`` so
tests can call it directly. Outcomes (returned for logs and tests):
``skipped`` (not ours to run), ``succeeded``, ``failed``, ``cancelled``, ``released`` (given back
to the queue: worker shutdown or a crashed child), ``lost`` (another worker took the lease over).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from akl_core.contract import EXIT_FAILED, EXIT_STOPPED
from api.core.config import Settings
from api.db.models import CANCELLED, FAILED, SUCCEEDED
from api.lifecycle import JOBS
from worker import leases
from worker.leases import ClaimedJob, SessionFactory, transact
from worker.options import WorkerOptions
from worker.recorder import EventRecorder
from worker.redact import Redact, make_redactor
from worker.supervisor import RunResult, Supervisor
from worker.tick import SupervisorTick

log = logging.getLogger(__name__)

Enqueue = Callable[[str, str], None]  # (job_id, queue)


@dataclass
class WorkerContext:
    settings: Settings
    options: WorkerOptions
    session_factory: SessionFactory
    enqueue: Enqueue
    shutdown: threading.Event = field(default_factory=threading.Event)
    redact: Redact = field(init=False)

    def __post_init__(self) -> None:
        self.redact = make_redactor(self.settings)


def run_job(job_id: str, ctx: WorkerContext) -> str:
    owner = leases.new_owner()
    job = leases.claim(ctx.session_factory, job_id, owner, lease_s=ctx.options.lease_s)
    if job is None:
        log.info("job %s: not claimable (finished, or another worker holds it)", job_id)
        return "skipped"
    if job.cancel_requested:
        return _end(ctx, job_id, owner, CANCELLED, "cancelled before it started")
    if job.attempts > ctx.options.max_attempts:
        message = (
            f"the job was started {job.attempts - 1} times and never finished (its worker died or was "
            f"killed each time); giving up after {ctx.options.max_attempts} attempts"
        )
        return _end(ctx, job_id, owner, FAILED, message, error_code="too_many_attempts")
    if job.resolved_spec is None or job.output_dir is None:  # the API sets both at submission
        message = "the job has no resolved spec or output directory (it was not submitted through the API)"
        return _end(ctx, job_id, owner, FAILED, message, error_code="invalid_spec")
    output_dir = Path(job.output_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        spec_path = output_dir / "spec.json"
        spec_path.write_text(json.dumps(job.resolved_spec, indent=2), encoding="utf-8")
        result, stop = _supervise(job, owner, spec_path, output_dir, ctx)
    except OSError as exc:  # the artifacts root is not writable, the runner cannot start, ...
        log.exception("job %s: could not run", job_id)
        return _end(
            ctx,
            job_id,
            owner,
            FAILED,
            f"the worker could not run the job: {exc}",
            error_code="internal_error",
        )
    return _settle(job, owner, result, stop, ctx)


def runner_argv(spec_path: Path, output_dir: Path, module: str) -> list[str]:
    """``python -m akl_core.runner SPEC OUTPUT_DIR``; the runner itself starts torchrun when the
    spec asks for several processes, and relays a stop request to every rank."""
    return [sys.executable, "-m", module, str(spec_path), str(output_dir)]


def runner_env(settings: Settings) -> dict[str, str]:
    env = dict(os.environ)
    env["AKL_MODELS_ROOT"] = str(Path(settings.models_root or "models").resolve())
    env["AKL_ALLOW_HUB"] = "1" if settings.allow_hub else "0"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _supervise(
    job: ClaimedJob, owner: str, spec_path: Path, output_dir: Path, ctx: WorkerContext
) -> tuple[RunResult, str | None]:
    opts = ctx.options
    tick = SupervisorTick(
        ctx.session_factory, job.id, owner, EventRecorder(job.id, output_dir, redact=ctx.redact),
        lease_s=opts.lease_s, every_s=opts.tick_s, max_events=opts.flush_max_events,
    )  # fmt: skip

    def should_stop() -> str | None:
        if tick.lease_lost:
            return "lease_lost"
        if tick.cancel_requested:
            return "cancelled"
        if ctx.shutdown.is_set():
            return "shutdown"
        return None

    supervisor = Supervisor(
        runner_argv(spec_path, output_dir, opts.runner_module),
        events_path=output_dir / "events.jsonl",
        on_event=tick.add,
        on_tick=tick,
        should_stop=should_stop,
        env=runner_env(ctx.settings),
        stderr_path=output_dir / "runner.log",
        term_grace_s=opts.term_grace_s,
    )
    try:
        result = supervisor.run()
    finally:
        supervisor.terminate()
    for _ in range(10):  # the last events (completed / error / stopped) matter most
        if tick.run():
            break
        time.sleep(3)
    return result, should_stop() if result.stop_reason is None else result.stop_reason


def _settle(job: ClaimedJob, owner: str, result: RunResult, stop: str | None, ctx: WorkerContext) -> str:
    # The runner prints `completed` only after final/ and result.json are on disk, so the job is
    # done even if a shutdown signal reached the runner while its interpreter was exiting
    # (RELIABILITY.md, defect 10).
    completed = "completed" in result.last_events
    if stop == "lease_lost" and not completed:
        log.warning("job %s: lease lost; another worker owns it now", job.id)
        return "lost"
    if completed:
        return _end(ctx, job.id, owner, SUCCEEDED, "succeeded", progress=1.0)
    if stop == "cancelled":
        return _end(ctx, job.id, owner, CANCELLED, f"cancelled at step {_step(result)}")
    requeue = back_to_queue(stop, result)
    if requeue is not None:
        # Stopped from outside (worker shutdown, or a signal such as the OOM killer): requeue; the
        # runner resumes from its newest checkpoint. Only a crash counts as an attempt.
        crashed, why = requeue
        message = f"back to the queue at step {_step(result)}: {why}"
        if transact(ctx.session_factory, JOBS.release, job.id, owner, message=message, count_attempt=crashed):
            try:
                ctx.enqueue(job.id, job.queue)
            except Exception:  # the reconciler re-enqueues it later
                log.exception("job %s: could not re-enqueue", job.id)
        return "released"
    code, message = runner_failure(result, "runner")
    return _end(ctx, job.id, owner, FAILED, message, error_code=code)


def back_to_queue(stop: str | None, result: RunResult) -> tuple[bool, str] | None:
    """``(crashed, why)`` when the run was stopped from outside (worker shutdown, a signal) and goes
    back to the queue, else None; only a crash counts as an attempt (shared with cache builds)."""
    if not (stop == "shutdown" or result.returncode == EXIT_STOPPED or result.returncode < 0):
        return None
    crashed = stop != "shutdown" and result.returncode != EXIT_STOPPED
    why = "the worker is shutting down" if not crashed else f"the runner was killed ({result.returncode})"
    return crashed, why


def runner_failure(result: RunResult, runner: str) -> tuple[str, str]:
    """``(error_code, message)`` of a failed run: the runner's `error` event, else its exit code
    and the tail of its stderr (shared with cache builds)."""
    error = result.last_events.get("error")
    if result.returncode == EXIT_FAILED and error is not None:
        return str(error.get("code") or "internal_error"), str(error.get("message") or "")
    message = f"the {runner} exited with code {result.returncode}" + (
        f"; last output:\n{result.stderr_tail[-2000:]}" if result.stderr_tail else ""
    )
    return "internal_error", message


def _step(result: RunResult) -> int:
    steps = [int(e.get("step") or 0) for e in result.last_events.values() if isinstance(e.get("step"), int)]
    return max(steps, default=0)


def _end(ctx: WorkerContext, job_id: str, owner: str, status: str, message: str, **values: Any) -> str:
    """Finish the job (``JOBS.finish``: the status and its event row, retried through a
    database blip)."""
    error_code = values.pop("error_code", None)
    message = ctx.redact(message)
    transact(
        ctx.session_factory, JOBS.finish, job_id, owner, status,
        message=message, error_code=error_code, error_message=message if error_code else None, **values,
    )  # fmt: skip
    return status
