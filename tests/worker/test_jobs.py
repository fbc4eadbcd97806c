"""``run_job`` end to end against a real database and a real child process (the fake runner)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from sqlalchemy import select

from api.db.models import (
    CANCELLED,
    FAILED,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    Job,
    JobCheckpoint,
    JobEvent,
    JobMetric,
)
from worker import leases
from worker.jobs import run_job


def _job(sf, job_id) -> Job:
    with sf() as session:
        return session.get_one(Job, job_id)


def _steps(sf, job_id):
    with sf() as session:
        return session.scalars(
            select(JobMetric.step).where(JobMetric.job_id == job_id).order_by(JobMetric.step)
        ).all()


def _event_types(sf, job_id):
    with sf() as session:
        return session.scalars(
            select(JobEvent.type).where(JobEvent.job_id == job_id).order_by(JobEvent.id)
        ).all()


def _in_background(job_id, ctx):
    outcome: list[str] = []
    thread = threading.Thread(target=lambda: outcome.append(run_job(job_id, ctx)))
    thread.start()
    return thread, outcome


def _wait_step(sf, job_id, step: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while _job(sf, job_id).current_step < step:
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.1)


def test_success_records_status_history_and_runs_the_resolved_spec(sf, make_job, ctx, tmp_path: Path):
    data = tmp_path / "train.jsonl"
    job_id = make_job({"steps": 30, "checkpoint_every": 10})
    with sf() as session, session.begin():  # the API replaced the file id by its path
        job = session.get_one(Job, job_id)
        job.spec = {"data": {"train": "file-abc"}, "_fake": {"steps": 30, "checkpoint_every": 10}}
        job.resolved_spec = {"data": {"train": str(data)}, "_fake": {"steps": 30, "checkpoint_every": 10}}
    assert run_job(job_id, ctx) == "succeeded"
    job = _job(sf, job_id)
    assert (job.status, job.progress, job.current_step, job.lease_owner, job.attempts) == (
        SUCCEEDED,
        1.0,
        30,
        None,
        1,
    )
    assert job.finished_at is not None and job.error_code is None
    assert _steps(sf, job_id) == list(range(1, 31))
    out = Path(job.output_dir)
    assert out == ctx.settings.artifacts_root.resolve() / job_id
    assert '"train": "' + str(data) in (out / "spec.json").read_text()  # the row's resolved spec
    with sf() as session:
        paths = session.scalars(select(JobCheckpoint.path).where(JobCheckpoint.job_id == job_id)).all()
    assert sorted(paths) == [
        "checkpoints/step-00000010",
        "checkpoints/step-00000020",
        "checkpoints/step-00000030",
        "final",
    ]
    assert run_job(job_id, ctx) == "skipped"  # a redelivered message does not run it again
    assert _event_types(sf, job_id) == ["running", "started", "checkpoint", "checkpoint", "checkpoint", "eval",
                                        "completed", "succeeded"]  # fmt: skip


def test_runner_error_event_fails_the_job_with_its_code(sf, make_job, ctx):
    job_id = make_job({"fail": "nan_loss"})
    assert run_job(job_id, ctx) == "failed"
    job = _job(sf, job_id)
    assert (job.status, job.error_code, job.error_message) == (FAILED, "nan_loss", "fake failure")


def test_a_job_without_a_resolved_spec_fails_with_invalid_spec(sf, make_job, ctx):
    job_id = make_job(resolved_spec=None)
    assert run_job(job_id, ctx) == "failed"
    assert _job(sf, job_id).error_code == "invalid_spec"


def test_cancellation_stops_the_child_within_seconds_and_keeps_a_checkpoint(sf, make_job, ctx):
    job_id = make_job({"steps": 100_000, "step_s": 0.02, "checkpoint_every": 25})
    thread, outcome = _in_background(job_id, ctx)
    _wait_step(sf, job_id, 30)
    asked = time.monotonic()
    with sf() as session, session.begin():
        session.get_one(Job, job_id).cancel_requested = True
    thread.join(timeout=30)
    assert outcome == ["cancelled"] and time.monotonic() - asked < 5
    job = _job(sf, job_id)
    assert job.status == CANCELLED and job.lease_owner is None
    stopped_at = job.current_step
    with sf() as session:
        steps = session.scalars(select(JobCheckpoint.step).where(JobCheckpoint.job_id == job_id)).all()
    assert max(steps) == stopped_at  # the stop checkpoint is kept
    assert (Path(job.output_dir) / f"checkpoints/step-{stopped_at:08d}/state.json").exists()


def test_worker_shutdown_releases_requeues_and_the_next_run_resumes(sf, make_job, ctx):
    job_id = make_job({"steps": 150, "step_s": 0.02, "checkpoint_every": 1000})
    thread, outcome = _in_background(job_id, ctx)
    _wait_step(sf, job_id, 20)
    ctx.shutdown.set()
    thread.join(timeout=30)
    assert outcome == ["released"] and ctx.enqueue == [(job_id, "cpu")]
    job = _job(sf, job_id)
    assert (job.status, job.lease_owner, job.attempts) == (QUEUED, None, 0)
    stopped = job.current_step
    assert _event_types(sf, job_id)[-3:] == ["started", "stopped", "released"]
    ctx.shutdown.clear()
    assert run_job(job_id, ctx) == "succeeded"
    starts = (Path(job.output_dir) / "starts.log").read_text().split()
    assert starts == ["0", str(stopped)]  # resumed from the stop checkpoint
    assert _steps(sf, job_id) == list(range(1, 151))


def test_crashing_job_is_requeued_then_fails_after_max_attempts(sf, make_job, ctx):
    job_id = make_job({"steps": 5, "crash_at": 3})
    assert run_job(job_id, ctx) == "failed"  # exit 7 without an error event
    job = _job(sf, job_id)
    assert job.error_code == "internal_error" and "exited with code 7" in job.error_message
    poison = make_job({"steps": 5})
    with sf() as session, session.begin():
        session.get_one(Job, poison).attempts = ctx.options.max_attempts
    assert run_job(poison, ctx) == "failed"
    assert _job(sf, poison).error_code == "too_many_attempts"


def test_a_worker_whose_lease_was_taken_over_stops_and_writes_nothing_more(sf, make_job, ctx):
    job_id = make_job({"steps": 100_000, "step_s": 0.02})
    thread, outcome = _in_background(job_id, ctx)
    _wait_step(sf, job_id, 5)
    with sf() as session, session.begin():  # what a takeover after an expired lease looks like
        job = session.get_one(Job, job_id)
        job.lease_owner, job.status = "other-worker", RUNNING
    thread.join(timeout=30)
    assert outcome == ["lost"]
    assert _job(sf, job_id).lease_owner == "other-worker"
    assert leases.claim(sf, job_id, "third", lease_s=30) is None


def test_an_unwritable_artifact_root_fails_the_job_instead_of_leaving_it_running(sf, make_job, ctx):
    ctx.settings.artifacts_root.parent.mkdir(parents=True, exist_ok=True)
    ctx.settings.artifacts_root.write_text("not a folder")
    job_id = make_job()
    assert run_job(job_id, ctx) == "failed"
    job = _job(sf, job_id)
    assert (job.status, job.error_code, job.lease_owner) == (FAILED, "internal_error", None)
    assert "could not run the job" in job.error_message
