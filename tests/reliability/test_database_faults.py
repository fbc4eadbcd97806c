"""PostgreSQL connections dropped mid-run: the API answers 503 meanwhile (never 500), and it and
the worker reconnect by themselves; the running job loses no history."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from tests.reliability.conftest import Stack, tiny_job
from tests.worker import services

pytestmark = [pytest.mark.integration, pytest.mark.postgres]

OUTAGE_S = 8.0


def test_dropped_database_connections_503_then_recovery_without_restart(stack: Stack, tmp_path: Path):
    steps = 40
    key = stack.new_key("alice")
    # A lease well above the outage: a blip must not hand a healthy run to another worker.
    worker = stack.start_worker("steady", AKL_WORKER_LEASE_S="40", AKL_WORKER_TICK_S="2")
    api_pid = stack.api.pid
    with stack.http(key) as http:
        job_id = stack.submit(http, tiny_job(tmp_path, steps=steps, checkpoint_every=10))
        stack.wait_job(job_id, lambda j: (j.current_step or 0) >= 3, 120, "training")

        stack.db_proxy.cut()  # every open connection of the API and the worker drops; new ones are refused
        cut_at = time.monotonic()
        ready = httpx.get(f"{stack.url}/readyz", timeout=15)
        assert ready.status_code == 503 and ready.json()["checks"]["database"] != "ok", ready.text
        assert ready.json()["checks"]["broker"] == "ok"
        for method, path in (
            ("GET", f"/v1/jobs/{job_id}"),
            ("GET", "/v1/jobs"),
            ("POST", f"/v1/jobs/{job_id}/cancel"),
        ):
            r = http.request(method, path)
            assert r.status_code == 503 and "database" in r.json()["detail"], (method, path, r.text)
        time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - cut_at)))  # the runner trains on meanwhile

        stack.db_proxy.restore()
        services.wait_for(
            lambda: httpx.get(f"{stack.url}/readyz").status_code == 200, 30, "/readyz to recover"
        )
        assert http.get(f"/v1/jobs/{job_id}").status_code == 200

    job = stack.wait_job(job_id, lambda j: j.status == "succeeded", 180, "the job to finish after the outage")
    assert job.attempts == 1 and job.current_step == steps  # the same run went on: no hand-over
    assert stack.metric_steps(job_id) == list(range(1, steps + 1))  # buffered steps were written after
    assert worker.poll() is None and stack.api.pid == api_pid and stack.api.poll() is None
