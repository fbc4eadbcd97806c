"""The broker is not the source of truth: Redis here keeps nothing on disk, so a restart loses
every message. Queued jobs are announced again by the workers' reconciler, a job is never run by
two workers at once, and the API and the workers ride out the outage without a restart."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest

from api.core.config import Settings
from api.queue import celery_client, enqueue_job
from tests.reliability.conftest import Stack, tiny_job
from tests.worker import services

pytestmark = [pytest.mark.integration, pytest.mark.postgres]


def _started(output_dir: str) -> int:
    lines = (Path(output_dir) / "events.jsonl").read_text().splitlines()
    return sum(json.loads(line).get("type") == "started" for line in lines if line.strip())


def _readyz(stack: Stack) -> tuple[int, dict]:
    r = httpx.get(f"{stack.url}/readyz", timeout=15)
    return r.status_code, r.json()


def test_lost_messages_are_reenqueued_and_each_job_runs_exactly_once(stack: Stack, tmp_path: Path):
    http = stack.http(stack.new_key("alice"))
    ids = [stack.submit(http, tiny_job(tmp_path, steps=2, examples=8 + i)) for i in range(3)]
    redis = stack.redis.client()
    services.wait_for(lambda: redis.llen("cpu") == 3, 10, "the three messages in Redis")

    stack.redis.kill()  # no persistence: the messages are gone
    stack.redis.start()
    assert stack.redis.client().llen("cpu") == 0
    # The first job comes back three times over (a redelivery, reconcilers on other machines):
    # harmless by the lease. The other two have no message left: only the reconciler finds them.
    publisher = celery_client(Settings(_env_file=None, data_root=tmp_path, broker_url=stack.redis.url))
    for _ in range(3):
        assert enqueue_job(publisher, job_id=ids[0], queue="cpu")

    stack.start_worker("w1")
    stack.start_worker("w2")  # two workers compete for every message
    for job_id in ids:
        job = stack.wait_job(job_id, lambda j: j.status == "succeeded", 240, "the re-enqueued job")
        assert job.attempts == 1 and _started(job.output_dir) == 1  # claimed and run exactly once
        assert stack.metric_steps(job_id) == [1, 2]
        events = [e["type"] for e in http.get(f"/v1/jobs/{job_id}/events").json()["data"]]
        assert events.count("running") == 1, events
    http.close()


def test_redis_restart_readyz_503_then_recovers_and_workers_reconnect(stack: Stack, tmp_path: Path):
    worker = stack.start_worker("steady")
    api_pid = stack.api.pid
    assert _readyz(stack) == (200, {"status": "ok", "checks": {"database": "ok", "broker": "ok"}})

    stack.redis.kill()
    status, body = _readyz(stack)
    assert status == 503 and body["checks"]["broker"] != "ok" and body["checks"]["database"] == "ok"

    # The database is the source of truth: a job submitted meanwhile is accepted, and queued.
    with stack.http(stack.new_key("bob")) as http:
        started = time.monotonic()
        job_id = stack.submit(http, tiny_job(tmp_path, steps=2))
        assert time.monotonic() - started < 15
        assert http.get(f"/v1/jobs/{job_id}").json()["status"] == "queued"

        stack.redis.start()
        services.wait_for(lambda: _readyz(stack)[0] == 200, 30, "/readyz to recover")
        job = stack.wait_job(
            job_id, lambda j: j.status == "succeeded", 180, "the job submitted during the outage"
        )
        assert job.attempts == 1
        # A job submitted after the restart is delivered by the broker, run by the same worker.
        again = stack.submit(http, tiny_job(tmp_path, steps=2))
        stack.wait_job(again, lambda j: j.status == "succeeded", 180, "a job after the restart")
    assert worker.poll() is None and stack.api.pid == api_pid and stack.api.poll() is None
