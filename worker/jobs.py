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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import update

from api.core.config import Settings
from api.db.models import CANCELLED, FAILED, SUCCEEDED, Job
from worker import leases
from worker.leases import ClaimedJob, SessionFactory
from worker.options import WorkerOptions
from worker.recorder import EventRecorder
from worker.specs import SpecError, resolve_spec
from worker.supervisor import EXIT_COMPLETED, EXIT_FAILED, RunResult, Supervisor

log = logging.getLogger(__name__)

Enqueue = Callable[[str, str], None]  # (job_id, queue)


@dataclass
class WorkerContext:
    settings: Settings
    options: WorkerOptions
    session_factory: SessionFactory
    enqueue: Enqueue
    shutdown: threading.Event = field(default_factory=threading.Event)


def run_job(job_id: str, ctx: WorkerContext) -> str:
    owner = leases.new_owner()
    job = leases.claim(ctx.session_factory, job_id, owner, lease_s=ctx.options.lease_s)
    if job is None:
        log.info("job %s: not claimable (finished, or another worker holds it)", job_id)
        return "skipped"
    if job.cancel_requested:
        leases.finish(ctx.session_factory, job_id, owner, CANCELLED)
        return "cancelled"
    if job.attempts > ctx.options.max_attempts:
        message = (
            f"the job was started {job.attempts - 1} times and never finished (its worker died or was "
            f"killed each time); giving up after {ctx.options.max_attempts} attempts"
        )
        leases.finish(ctx.session_factory, job_id, owner, FAILED, error_code="too_many_attempts", error_message=message)
        return "failed"
    output_dir = Path(ctx.settings.artifacts_root or "artifacts").resolve() / job_id
    try:
        spec = resolve_spec(ctx.session_factory, job)
    except SpecError as exc:
        leases.finish(ctx.session_factory, job_id, owner, FAILED, error_code=exc.code, error_message=exc.message)
        return "failed"
    output_dir.mkdir(parents=True, exist_ok=True)
    spec_path = output_dir / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=2), encoding="utf-8")
    _set_output_dir(ctx.session_factory, job_id, owner, output_dir)
    result, stop = _supervise(job, owner, spec_path, output_dir, ctx)
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


class Heartbeat(threading.Thread):
    """Renews the lease every ``heartbeat_s`` and polls ``cancel_requested`` every ``poll_s``."""

    def __init__(self, session_factory: SessionFactory, job_id: str, owner: str, options: WorkerOptions):
        super().__init__(name=f"heartbeat-{job_id}", daemon=True)
        self.session_factory, self.job_id, self.owner, self.options = session_factory, job_id, owner, options
        self.cancel_requested = threading.Event()
        self.lost = threading.Event()
        self._stop_event = threading.Event()

    def run(self) -> None:
        poll_s = min(self.options.cancel_poll_s, self.options.heartbeat_s)
        beats = max(1, round(self.options.heartbeat_s / poll_s))
        tick = 0
        while not self._stop_event.wait(poll_s):
            tick += 1
            try:
                if tick % beats == 0:
                    beat = leases.renew(self.session_factory, self.job_id, self.owner, lease_s=self.options.lease_s)
                    if not beat.held:
                        self.lost.set()
                    cancel = beat.cancel_requested
                else:
                    cancel = _cancel_requested(self.session_factory, self.job_id)
            except Exception:  # the database may be briefly unreachable; the lease covers that
                log.exception("heartbeat for job %s failed", self.job_id)
                continue
            if cancel:
                self.cancel_requested.set()

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=5)


def _cancel_requested(session_factory: SessionFactory, job_id: str) -> bool:
    from sqlalchemy import select

    with session_factory() as session:
        return bool(session.scalar(select(Job.cancel_requested).where(Job.id == job_id)))


def _supervise(
    job: ClaimedJob, owner: str, spec_path: Path, output_dir: Path, ctx: WorkerContext
) -> tuple[RunResult, str | None]:
    opts = ctx.options
    recorder = EventRecorder(
        ctx.session_factory, job.id, owner, output_dir,
        flush_interval_s=opts.flush_interval_s, flush_max_events=opts.flush_max_events,
    )  # fmt: skip
    heartbeat = Heartbeat(ctx.session_factory, job.id, owner, opts)

    def should_stop() -> str | None:
        if recorder.lease_lost or heartbeat.lost.is_set():
            return "lease_lost"
        if heartbeat.cancel_requested.is_set():
            return "cancelled"
        if ctx.shutdown.is_set():
            return "shutdown"
        return None

    supervisor = Supervisor(
        runner_argv(spec_path, output_dir, opts.runner_module),
        on_event=recorder.add,
        on_tick=recorder.tick,
        should_stop=should_stop,
        env=runner_env(ctx.settings),
        stderr_path=output_dir / "runner.log",
        term_grace_s=opts.term_grace_s,
    )
    heartbeat.start()
    try:
        result = supervisor.run()
    finally:
        supervisor.terminate()
        heartbeat.stop()
    recorder.flush()
    return result, should_stop() if result.stop_reason is None else result.stop_reason


def _settle(job: ClaimedJob, owner: str, result: RunResult, stop: str | None, ctx: WorkerContext) -> str:
    sf = ctx.session_factory
    completed = result.returncode == EXIT_COMPLETED and "completed" in result.last_events
    if stop == "lease_lost" and not completed:
        log.warning("job %s: lease lost; another worker owns it now", job.id)
        return "lost"
    if completed:
        leases.finish(sf, job.id, owner, SUCCEEDED, progress=1.0)
        return "succeeded"
    if stop == "cancelled":
        leases.finish(sf, job.id, owner, CANCELLED)
        return "cancelled"
    if stop == "shutdown" or result.returncode == 3 or result.returncode < 0:
        # Stopped from outside (worker shutdown, or a signal such as the OOM killer): requeue; the
        # runner resumes from its newest checkpoint. Only a crash counts as an attempt.
        crashed = stop != "shutdown" and result.returncode != 3
        if leases.release(sf, job.id, owner, count_attempt=crashed):
            ctx.enqueue(job.id, job.queue)
        return "released"
    error = result.last_events.get("error")
    if result.returncode == EXIT_FAILED and error is not None:
        code, message = str(error.get("code") or "internal_error"), str(error.get("message") or "")
    else:
        code = "internal_error"
        message = f"the runner exited with code {result.returncode}" + (
            f"; last output:\n{result.stderr_tail[-2000:]}" if result.stderr_tail else ""
        )
    leases.finish(sf, job.id, owner, FAILED, error_code=code, error_message=message)
    return "failed"


def _set_output_dir(session_factory: SessionFactory, job_id: str, owner: str, output_dir: Path) -> None:
    with session_factory() as session, session.begin():
        session.execute(
            update(Job)
            .where(Job.id == job_id, Job.lease_owner == owner)
            .values(output_dir=str(output_dir))
            .execution_options(synchronize_session=False)
        )



