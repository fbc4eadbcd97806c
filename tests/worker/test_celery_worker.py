"""A real ``celery worker`` process on a private Redis, running the fake runner."""

from __future__ import annotations

import os
import signal
import sys
import time
import uuid
from pathlib import Path

import pytest

from api.core.config import Settings
from api.db.models import CANCELLED, QUEUED, SUCCEEDED, Job
from api.queue import celery_client, enqueue_job
from tests.worker import services
from tests.worker.conftest import FAKE_RUNNER

pytestmark = pytest.mark.integration


@pytest.fixture
def redis_url():
    with services.redis_server() as url:
        yield url


@pytest.fixture
def worker_env(db_url: str, redis_url: str, tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        "AKL_DATA_ROOT": str(tmp_path / "data"),
        "AKL_DATABASE_URL": db_url,
        "AKL_BROKER_URL": redis_url,
        "AKL_WORKER_RUNNER_MODULE": FAKE_RUNNER,
        "AKL_WORKER_TICK_S": "0.5",
        "AKL_WORKER_LEASE_S": "6",
        "PYTHONPATH": str(services.REPO),
    }


def start_worker(env: dict[str, str], log: Path):
    argv = [
        sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "-Q", "cpu", "--pool", "solo",
        "--without-gossip", "--without-mingle", "--without-heartbeat", "-n", f"w{uuid.uuid4().hex[:6]}@%h",
        "--loglevel", "INFO",
    ]  # fmt: skip
    return services.start_group(argv, env=env, log=log)


def _job(sf, job_id) -> Job:
    with sf() as session:
        return session.get_one(Job, job_id)


def _publish(worker_env, job_id) -> None:
    settings = Settings(data_root=Path(worker_env["AKL_DATA_ROOT"]), broker_url=worker_env["AKL_BROKER_URL"])
    assert enqueue_job(celery_client(settings), job_id=job_id, queue="cpu")


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_worker_runs_cancels_and_hands_back_jobs_on_shutdown(sf, make_job, worker_env, tmp_path: Path):
    log = tmp_path / "worker.log"
    proc = start_worker(worker_env, log)
    try:
        # 1. A job runs to the end.
        done = make_job({"steps": 20})
        _publish(worker_env, done)
        services.wait_for(lambda: _job(sf, done).status == SUCCEEDED, 60, "job to succeed")
        assert _job(sf, done).current_step == 20

        # 2. Cancelling a running job stops it within seconds.
        cancelled = make_job({"steps": 100_000, "step_s": 0.02, "checkpoint_every": 50})
        _publish(worker_env, cancelled)
        services.wait_for(lambda: _job(sf, cancelled).current_step > 10, 30, "job to run")
        with sf() as session, session.begin():
            session.get_one(Job, cancelled).cancel_requested = True
        asked = time.monotonic()
        services.wait_for(lambda: _job(sf, cancelled).status == CANCELLED, 20, "job to be cancelled", 0.05)
        assert time.monotonic() - asked < 8

        # 3. Warm shutdown (SIGTERM to the worker alone): the job goes back to the queue.
        handed_back = make_job({"steps": 100_000, "step_s": 0.02})
        _publish(worker_env, handed_back)
        services.wait_for(lambda: _job(sf, handed_back).current_step > 10, 30, "job to run")
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        job = _job(sf, handed_back)
        assert (job.status, job.lease_owner) == (QUEUED, None), log.read_text()[-3000:]
        assert (Path(job.output_dir) / f"checkpoints/step-{job.current_step:08d}/state.json").exists()
    finally:
        services.stop_group(proc)

    # The re-enqueued message is picked up by the next worker, which resumes from the checkpoint.
    with sf() as session, session.begin():
        session.get_one(Job, handed_back).resolved_spec = {"_fake": {"steps": job.current_step + 20}}
    proc = start_worker(worker_env, tmp_path / "worker2.log")
    try:
        services.wait_for(
            lambda: _job(sf, handed_back).status == SUCCEEDED, 60, "job to finish on the new worker"
        )
    finally:
        services.stop_group(proc)
    starts = (Path(job.output_dir) / "starts.log").read_text().split()
    assert starts == ["0", str(job.current_step)]


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_killed_worker_job_is_reclaimed_by_another_worker_and_resumed(
    sf, make_job, worker_env, tmp_path: Path
):
    env = {
        **worker_env,
        "AKL_WORKER_LEASE_S": "4",
        "AKL_WORKER_RECONCILE_EVERY_S": "1",
    }
    doomed = start_worker(env, tmp_path / "doomed.log")
    survivor = None
    try:
        job_id = make_job({"steps": 150, "step_s": 0.02, "checkpoint_every": 20})
        _publish(worker_env, job_id)
        services.wait_for(lambda: _job(sf, job_id).current_step > 45, 30, "job to run")
        os.kill(doomed.pid, signal.SIGKILL)  # no warm shutdown: the lease is left behind
        doomed.wait(timeout=10)
        assert _job(sf, job_id).status == "running"
        survivor = start_worker(env, tmp_path / "survivor.log")
        services.wait_for(lambda: _job(sf, job_id).status == SUCCEEDED, 60, "the survivor to finish the job")
    finally:
        services.stop_group(doomed)
        if survivor is not None:
            services.stop_group(survivor)
    job = _job(sf, job_id)
    assert job.attempts == 2 and job.current_step == 150
    starts = [int(s) for s in (Path(job.output_dir) / "starts.log").read_text().split()]
    # The orphaned runner got SIGTERM with its worker (a stop checkpoint); the survivor resumed there.
    assert starts[0] == 0 and starts[1] >= 40, starts
    with sf() as session:
        from sqlalchemy import select

        from api.db.models import JobMetric

        steps = session.scalars(
            select(JobMetric.step).where(JobMetric.job_id == job_id).order_by(JobMetric.step)
        ).all()
    assert steps == list(range(1, 151))
