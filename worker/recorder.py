"""Turn a run's events into database rows, inside the transaction of a supervisor tick.

``SupervisorTick`` (worker/tick.py) hands each batch of events to ``job_values`` (what the job row
gets: progress, step counters, latest metrics; written by the lease renewal's UPDATE) and to
``write`` (the history):
- ``step`` events become ``job_metrics`` rows (the gap history); a step already recorded is skipped
  (ON CONFLICT DO NOTHING), and a run that resumes from an older checkpoint first deletes the rows
  after that checkpoint, so the history never has gaps or duplicates.
- ``eval`` events become ``job_evaluations``; ``checkpoint`` / ``stopped`` / ``completed`` become
  ``job_checkpoints`` (rows whose directory the runner has since pruned are dropped).
- everything but ``step`` is also kept in ``job_events`` (the job's log).
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from akl_core.contract import STEP_METRICS, Event, finite, read_events
from api.db.models import Job, JobCheckpoint, JobEvaluation, JobEvent, JobMetric, utcnow
from api.lifecycle import JOBS
from worker.redact import Redact, redact_value

# The events that say why a job went back to the queue (worker/jobs.py, api/lifecycle.py).
RESUME_REASONS = ("released", "requeued")
LOGGED_TYPES = ("loading", "started", "eval", "checkpoint", "log", "completed", "stopped", "error")


class EventRecorder:
    def __init__(self, job_id: str, output_dir: Path, *, redact: Redact | None = None):
        self.redact: Redact = redact or (lambda text: text)  # server paths out of what tenants read
        self.job_id = job_id
        self.output_dir = output_dir
        self.previous_step: int | None = None  # the job's current_step when this run started
        self._last_step: tuple[int, float] | None = None  # (step, time) of the previous step event
        self._seconds_per_step: float | None = None

    def job_values(self, session: Session, events: list[Event]) -> tuple[dict[str, Any], dict[str, Any]]:
        """(column values, current_metrics update) for the job row after ``events``."""
        values: dict[str, Any] = {}
        metrics: dict[str, Any] = {}
        for event in events:
            kind = event.get("type")
            if kind == "started":
                self.previous_step = _int(
                    session.scalar(select(Job.current_step).where(Job.id == self.job_id))
                )
                values["total_steps"] = int(event.get("total_steps") or 0) or None
                values["current_step"] = int(event.get("resumed_from_step") or 0)
            elif kind == "step":
                step, total = int(event["step"]), int(event.get("total_steps") or 0)
                values.update(current_step=step, trained_tokens=int(event.get("trained_tokens") or 0))
                if total:
                    values.update(total_steps=total, progress=min(1.0, step / total))
                metrics.update(_current(event), **self._pace(event))
            elif kind == "eval":
                metrics.update({f"eval_{k}": _float(v) for k, v in _numbers(event).items() if k != "step"})
            elif kind == "completed":
                values["progress"] = 1.0
                values["current_step"] = int(event.get("step") or 0)
        return values, metrics

    def write(self, session: Session, events: list[Event], metrics: dict[str, Any]) -> None:
        """The history rows of ``events``; ``metrics`` merged into the job's current_metrics."""
        if metrics:
            job = session.get_one(Job, self.job_id)
            job.current_metrics = {**(job.current_metrics or {}), **metrics}
        self._write(session, events)

    def _write(self, session: Session, events: list[Event]) -> None:
        steps: dict[int, dict[str, Any]] = {}
        for event in events:
            kind = event.get("type")
            if kind == "started":
                self._flush_steps(session, steps)
                steps = {}
                resumed = int(event.get("resumed_from_step") or 0)
                self._truncate_after(session, resumed)
                if resumed or self.previous_step:
                    self._resumed_event(session, resumed)
                if resumed:
                    self._backfill(session, resumed)
            elif kind == "step":
                steps[int(event["step"])] = event
            elif kind == "eval":
                self._record_eval(session, event)
            elif kind == "checkpoint":
                self._record_checkpoint(session, int(event["step"]), str(event["path"]), is_final=False)
            elif kind == "stopped" and event.get("checkpoint"):
                self._record_checkpoint(
                    session, int(event.get("step") or 0), str(event["checkpoint"]), is_final=False
                )
            elif kind == "completed":
                self._record_checkpoint(
                    session,
                    int(event.get("step") or 0),
                    str(event.get("final_path") or "final"),
                    is_final=True,
                )
            if kind in LOGGED_TYPES:
                _job_event(session, self.job_id, event, self.redact)
        self._flush_steps(session, steps)
        if any(e.get("type") in ("started", "checkpoint", "stopped", "completed") for e in events):
            self._prune_checkpoints(session)

    def _pace(self, event: Event) -> dict[str, float]:
        """``seconds_per_step`` (a moving average over this run's steps) for the job's ETA."""
        at, step = _float(event.get("time")), int(event["step"])
        last, self._last_step = self._last_step, (step, at) if at is not None else None
        if at is None or last is None or step <= last[0]:
            return {} if self._seconds_per_step is None else {"seconds_per_step": self._seconds_per_step}
        pace = (at - last[1]) / (step - last[0])
        previous = self._seconds_per_step
        self._seconds_per_step = pace if previous is None else 0.8 * previous + 0.2 * pace
        return {"seconds_per_step": self._seconds_per_step}

    def _resumed_event(self, session: Session, step: int) -> None:
        """Why this run starts where it does: the last hand-back's reason, and the steps that
        are trained again when the previous run got further than its last checkpoint."""
        why = session.scalar(
            select(JobEvent.message)
            .where(JobEvent.job_id == self.job_id, JobEvent.type.in_(RESUME_REASONS))
            .order_by(JobEvent.id.desc())
            .limit(1)
        )
        message = f"resumed from step {step}" if step else "started again from step 0 (no checkpoint)"
        message += f": {why}" if why else ""
        before = self.previous_step or 0
        if before > step:
            message += f"; steps {step + 1}..{before} are trained again (no checkpoint after step {step})"
        data = {"step": step, "previous_step": before, "reason": why}
        JOBS.add_event(session, self.job_id, "resumed", message, data=data)

    def _truncate_after(self, session: Session, step: int) -> None:
        """A (re)started run continues from ``step``: history beyond it will be written again."""
        for model in (JobMetric, JobEvaluation):
            session.execute(delete(model).where(model.job_id == self.job_id, model.step > step))
        session.execute(
            delete(JobCheckpoint).where(JobCheckpoint.job_id == self.job_id, JobCheckpoint.step > step)
        )

    def _backfill(self, session: Session, step: int) -> None:
        """Fill in history up to ``step`` that never reached the database: the events a killed
        worker still held, and those its orphaned runner printed while stopping (it checkpoints
        on the way out, and the next run resumes there). The runner's events.jsonl has them all;
        for a step seen twice the later line wins (a run that resumed replaces the abandoned one)."""
        path = self.output_dir / "events.jsonl"
        if not path.exists():
            return
        steps: dict[int, Event] = {}
        evals: dict[int, Event] = {}
        checkpoints: dict[str, int] = {}
        for event in read_events(path):
            kind, at = event.get("type"), event.get("step")
            if not isinstance(at, int) or at > step:
                continue
            if kind == "step":
                steps[at] = event
            elif kind == "eval":
                evals[at] = event
            elif kind == "checkpoint" and event.get("path"):
                checkpoints[str(event["path"])] = at
            elif kind == "stopped" and event.get("checkpoint"):
                checkpoints[str(event["checkpoint"])] = at
        self._flush_steps(session, steps)
        have = set(session.scalars(select(JobEvaluation.step).where(JobEvaluation.job_id == self.job_id)))
        for at, event in evals.items():
            if at not in have:
                self._record_eval(session, event)
        for rel, at in checkpoints.items():
            self._record_checkpoint(session, at, rel, is_final=False)

    def _flush_steps(self, session: Session, steps: dict[int, dict[str, Any]]) -> None:
        if not steps:
            return
        rows = [
            {
                "job_id": self.job_id,
                "step": step,
                "trained_tokens": _int(e.get("trained_tokens")),
                "created_at": _time(e),
                **_step_metrics(e),
            }
            for step, e in sorted(steps.items())
        ]
        insert = postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert
        stmt = insert(JobMetric).values(rows).on_conflict_do_nothing(index_elements=["job_id", "step"])
        session.execute(stmt)

    def _record_eval(self, session: Session, event: Event) -> None:
        step = int(event.get("step") or 0)
        session.execute(
            delete(JobEvaluation).where(JobEvaluation.job_id == self.job_id, JobEvaluation.step == step)
        )
        metrics = finite({k: v for k, v in event.items() if k not in ("type", "step")})
        session.add(JobEvaluation(job_id=self.job_id, step=step, metrics=metrics))

    def _record_checkpoint(self, session: Session, step: int, path: str, *, is_final: bool) -> None:
        existing = session.scalar(
            select(JobCheckpoint).where(JobCheckpoint.job_id == self.job_id, JobCheckpoint.path == path)
        )
        if existing is None:
            session.add(JobCheckpoint(job_id=self.job_id, step=step, path=path, is_final=is_final))
        else:
            existing.step, existing.is_final = step, is_final
        session.flush()

    def _prune_checkpoints(self, session: Session) -> None:
        rows = session.scalars(select(JobCheckpoint).where(JobCheckpoint.job_id == self.job_id)).all()
        for row in rows:
            if not (self.output_dir / row.path).is_dir():
                session.delete(row)


def _time(event: Event) -> datetime:
    """When the step ended (the runner's clock); the time it reached us for older runners."""
    at = _float(event.get("time"))
    return datetime.fromtimestamp(at, tz=timezone.utc) if at is not None else utcnow()


def _step_metrics(event: Event) -> dict[str, float | None]:
    return {name: _float(event.get(name)) for name in STEP_METRICS}


def _current(event: Event) -> dict[str, Any]:
    return {"step": _int(event.get("step")), "epoch": _float(event.get("epoch")), **_step_metrics(event)}


def _numbers(event: Event) -> dict[str, float]:
    return {k: v for k, v in event.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _float(value: Any) -> float | None:
    """A number as a finite float, else None (NaN, inf, null, or not a number)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return finite(float(value))


def _int(value: Any) -> int | None:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _job_event(session: Session, job_id: str, event: Event, redact: Redact) -> None:
    kind = str(event.get("type"))
    level = "error" if kind == "error" else str(event.get("level") or "info")
    message = redact(str(event.get("message") or _summary(event)))
    data = finite({k: v for k, v in event.items() if k not in ("type", "level", "message")})
    data = redact_value(data, redact)
    JOBS.add_event(session, job_id, kind, message, level=level, data=data)


def _summary(event: Event) -> str:
    kind = event.get("type")
    if kind == "started":
        return f"started: {event.get('total_steps')} steps, resumed from step {event.get('resumed_from_step', 0)}"
    if kind == "checkpoint":
        return f"checkpoint at step {event.get('step')}: {event.get('path')}"
    if kind == "eval":
        return f"evaluation at step {event.get('step')}: rouge_l={event.get('rouge_l')}"
    if kind == "completed":
        return f"completed at step {event.get('step')}"
    if kind == "stopped":
        return f"stopped at step {event.get('step')}"
    return str(kind)
