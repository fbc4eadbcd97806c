"""Production shape: PostgreSQL, Redis, a real Celery worker and the API, all through HTTP."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from akl_cli.client import check, download_archive, submit_spec
from tests.e2e.conftest import Stack, load_and_generate, tiny_spec

pytestmark = [pytest.mark.integration, pytest.mark.postgres]


def _wait_status(http, job_id: str, want: str, timeout: float, stack: Stack) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = check(http.get(f"/v1/jobs/{job_id}"))
        if job["status"] == want:
            return job
        assert job["status"] not in {"succeeded", "failed", "cancelled"} - {want}, (job, stack.log_tail())
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} not {want} after {timeout} s: {job}\n{stack.log_tail()}")


def _submit(http, tmp_path: Path, **spec_args) -> str:
    import yaml

    spec_file = tmp_path / "job.yaml"
    spec_file.write_text(yaml.safe_dump(tiny_spec(tmp_path, **spec_args)))
    job = submit_spec(http, spec_file)
    assert job["status"] == "queued" and job["training_file"].startswith("file-")  # uploaded, replaced
    return job["id"]


def test_tiny_job_end_to_end_and_tenant_isolation(redis_stack: Stack, tmp_path: Path):
    key = redis_stack.new_key("alice")
    with redis_stack.http(key) as http:
        job_id = _submit(http, tmp_path, steps=6, checkpoint_every=3)
        job = _wait_status(http, job_id, "succeeded", 120, redis_stack)
        assert (job["current_step"], job["total_steps"], job["progress"]) == (6, 6, 1.0)
        assert job["attempts"] == 1 and job["error"] is None

        history = check(http.get(f"/v1/jobs/{job_id}/metrics"))
        assert [p["step"] for p in history["data"]] == [1, 2, 3, 4, 5, 6]  # no gaps, no duplicates
        for point in history["data"]:
            assert point["g_head"] >= 0 and point["g_tail"] >= 0 and 0 <= point["w_head"] <= 1
            assert point["loss"] > 0
        evaluations = check(http.get(f"/v1/jobs/{job_id}/evaluations"))["data"]
        assert evaluations and "rouge_l" in evaluations[-1]["metrics"]
        checkpoints = check(http.get(f"/v1/jobs/{job_id}/checkpoints"))["data"]
        assert checkpoints[-1]["is_final"] and any(not c["is_final"] for c in checkpoints)

        model_dir = download_archive(http, job_id, None, tmp_path / "download")
        assert (model_dir / "config.json").exists() and (model_dir / "model.safetensors").exists()
        assert load_and_generate(model_dir)
        step3 = next(c for c in checkpoints if not c["is_final"])
        ckpt_dir = download_archive(http, job_id, step3["id"], tmp_path / "ckpt")
        assert (ckpt_dir / "config.json").exists()

    # Another tenant sees nothing of it.
    with redis_stack.http(redis_stack.new_key("mallory")) as other:
        for path in ("", "/metrics", "/checkpoints", "/model", "/evaluations", "/events"):
            assert other.get(f"/v1/jobs/{job_id}{path}").status_code == 404, path
        assert other.post(f"/v1/jobs/{job_id}/cancel").status_code == 404
        assert check(other.get("/v1/jobs"))["data"] == []


def test_cancelling_a_running_job_stops_it_and_keeps_its_checkpoint(redis_stack: Stack, tmp_path: Path):
    with redis_stack.http(redis_stack.new_key("carol")) as http:
        job_id = _submit(http, tmp_path, steps=5000, checkpoint_every=1000)
        deadline = time.monotonic() + 90
        while check(http.get(f"/v1/jobs/{job_id}"))["current_step"] < 2:
            assert time.monotonic() < deadline, redis_stack.log_tail()
            time.sleep(0.3)
        asked = time.monotonic()
        assert check(http.post(f"/v1/jobs/{job_id}/cancel"))["cancel_requested"]
        job = _wait_status(http, job_id, "cancelled", 30, redis_stack)
        assert time.monotonic() - asked < 20
        checkpoints = check(http.get(f"/v1/jobs/{job_id}/checkpoints"))["data"]
        assert [c["step"] for c in checkpoints] == [job["current_step"]]  # the stop checkpoint
        assert load_and_generate(download_archive(http, job_id, checkpoints[0]["id"], tmp_path / "stopped"))
        assert http.post(f"/v1/jobs/{job_id}/cancel").status_code == 409
