"""A worker dies or is stopped mid-training: the job resumes from its checkpoint elsewhere, its
history has every step exactly once, and a job that keeps killing its workers is given up."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from akl_core.contract import read_events
from tests.reliability.conftest import Stack, crash, tiny_job
from tests.worker import services

pytestmark = [pytest.mark.integration, pytest.mark.postgres]


def _first_run_last_step(output_dir: str) -> int:
    """The last step the killed run trained (its events.jsonl lines before the second start)."""
    last, starts = 0, 0
    for event in read_events(Path(output_dir) / "events.jsonl"):
        starts += event.get("type") == "started"
        if starts == 1 and event.get("type") == "step":
            last = event["step"]
    return last


def _started_events(output_dir: str) -> list[int]:
    events = read_events(Path(output_dir) / "events.jsonl")  # skips a line torn by a kill
    return [e["resumed_from_step"] for e in events if e.get("type") == "started"]


def _wait_runner_step(stack: Stack, job_id: str, step: int, timeout: float) -> str:
    """Wait until the runner itself has reached ``step`` (``services.runner_reached``); return the
    output directory."""
    job = stack.wait_job(job_id, lambda j: j.status == "running" and bool(j.output_dir), timeout, "a claim")
    events = Path(job.output_dir) / "events.jsonl"
    try:
        services.wait_for(
            lambda: services.runner_reached(events, step), timeout, f"step {step}", interval=0.02
        )
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n{stack.log_tail()}") from None
    return job.output_dir


def test_sigkill_mid_training_resumes_from_the_last_checkpoint_without_gaps_or_duplicates(
    stack: Stack, tmp_path: Path
):
    steps, every = 200, 10
    with stack.http(stack.new_key("alice")) as http:
        job_id = stack.submit(http, tiny_job(tmp_path, steps=steps, checkpoint_every=every))
        doomed = stack.start_worker("doomed")
        # Past a periodic checkpoint, with steps recorded after it that the resumed run repeats.
        _wait_runner_step(stack, job_id, every + 2, 120)
        crash(doomed)
        assert stack.job(job_id).status == "running" and stack.job(job_id).lease_owner is not None

        stack.start_worker("survivor")
        job = stack.wait_job(job_id, lambda j: j.status == "succeeded", 180, "the resumed run")
        assert (job.current_step, job.total_steps, job.progress, job.attempts) == (steps, steps, 1.0, 2)

        resumed = _started_events(job.output_dir)
        assert resumed[0] == 0 and len(resumed) == 2, resumed
        killed_at = _first_run_last_step(job.output_dir)  # the database may lag the runner a little
        assert every <= resumed[1] <= killed_at and resumed[1] % every == 0, (resumed, killed_at)

        history = http.get(f"/v1/jobs/{job_id}/metrics").json()["data"]
        assert [p["step"] for p in history] == list(range(1, steps + 1))  # no gaps, no duplicates
        tokens = [p["trained_tokens"] for p in history]
        assert all(a < b for a, b in zip(tokens, tokens[1:], strict=False)), tokens
        assert stack.metric_steps(job_id) == list(range(1, steps + 1))
        checkpoints = http.get(f"/v1/jobs/{job_id}/checkpoints").json()["data"]
        assert checkpoints[-1]["is_final"] and checkpoints[-1]["step"] == steps


def test_sigterm_checkpoints_hands_the_job_back_and_exits(stack: Stack, tmp_path: Path):
    steps = 200
    with stack.http(stack.new_key("bob")) as http:
        job_id = stack.submit(http, tiny_job(tmp_path, steps=steps, checkpoint_every=0))
        worker = stack.start_worker("deployed")
        _wait_runner_step(stack, job_id, 3, 120)
        os.kill(worker.pid, signal.SIGTERM)  # a deployment stopping the worker (warm shutdown)
        assert worker.wait(timeout=60) == 0, stack.log_tail()

        job = stack.job(job_id)
        assert (job.status, job.lease_owner, job.attempts) == ("queued", None, 0), stack.log_tail()
        stopped_at = job.current_step
        assert stopped_at >= 3
        # The stop checkpoint is complete on disk and listed by the API.
        assert (Path(job.output_dir) / f"checkpoints/step-{stopped_at:08d}/state.json").is_file()
        listed = http.get(f"/v1/jobs/{job_id}/checkpoints").json()["data"]
        assert [c["step"] for c in listed] == [stopped_at]
        events = http.get(f"/v1/jobs/{job_id}/events", params={"limit": 100}).json()["data"]
        assert any(e["type"] == "released" for e in events), events

        stack.start_worker("next")  # it finds the message the stopped worker re-published
        job = stack.wait_job(job_id, lambda j: j.status == "succeeded", 180, "the resumed run")
        assert job.attempts == 1 and _started_events(job.output_dir) == [0, stopped_at]
        assert stack.metric_steps(job_id) == list(range(1, steps + 1))


def test_a_job_that_kills_every_worker_fails_after_max_attempts(stack: Stack, tmp_path: Path):
    """A poison job (its worker dies each time, e.g. the kernel's OOM killer) is not retried forever."""
    attempts = 2
    with stack.http(stack.new_key("carol")) as http:
        job_id = stack.submit(http, tiny_job(tmp_path, steps=500))
        for attempt in range(1, attempts + 1):
            worker = stack.start_worker(f"victim{attempt}", AKL_WORKER_MAX_ATTEMPTS=str(attempts))
            stack.wait_job(
                job_id, lambda j, a=attempt: j.status == "running" and j.attempts == a, 90, f"claim {attempt}"
            )
            crash(worker)
        stack.start_worker("last", AKL_WORKER_MAX_ATTEMPTS=str(attempts))
        job = stack.wait_job(job_id, lambda j: j.status == "failed", 90, "the poison job to fail")
        body = http.get(f"/v1/jobs/{job_id}").json()
    assert job.error_code == "too_many_attempts" and job.attempts == attempts + 1
    assert body["error"]["code"] == "too_many_attempts" and "attempts" in body["error"]["message"]
