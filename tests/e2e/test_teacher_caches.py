"""Teacher caches end to end over HTTP, as the README tells a client (issue 12, "How it will be
checked"): PostgreSQL + Redis + a real celery worker + the API, the real cache runner and trainer
on the tiny preset."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import Stack
from tests.reliability.conftest import DEMO

pytestmark = pytest.mark.slow

TRAIN_LINES = 24
LENGTHS = {"max_length": 64, "max_prompt_length": 48}
EVALUATION = {"num_examples": 2, "seeds": [10], "max_new_tokens": 4, "batch_size": 2}


def _upload(http: httpx.Client, name: str, lines: list[str]) -> str:
    response = http.post(
        "/v1/files", files={"file": (name, "".join(lines).encode())}, data={"purpose": "train"}
    )
    assert response.status_code == 201, response.text
    return response.json()["id"]


def _wait(http: httpx.Client, path: str, stack: Stack, timeout: float = 600) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        body = http.get(path).json()
        if body["status"] in ("succeeded", "failed", "cancelled"):
            return body
        assert time.monotonic() < deadline, f"{path} still {body['status']}\n{stack.log_tail()}"
        time.sleep(1)


def _job(cache_id: str, train: str, **training: Any) -> dict[str, Any]:
    return {
        "teacher": f"cache:{cache_id}",
        "student": {"init": "truncate", "num_layers": 2},
        "data": {"train": train, "validation": "demo:validation", "max_validation_examples": 2},
        "loss": {"name": "akl"},
        "training": {"max_steps": 4, "batch_size": 2, "learning_rate": 1e-3, **LENGTHS, **training},
        "evaluation": EVALUATION,
        "resources": {"device": "cpu"},
    }


@pytest.fixture(scope="module")
def built(redis_stack: Stack) -> dict[str, Any]:
    """One tenant's cache of top_k 16 over an uploaded file, built by the worker."""
    key = redis_stack.new_key("cache-owner")
    lines = DEMO.read_text(encoding="utf-8").splitlines(keepends=True)
    with redis_stack.http(key) as http:
        train = _upload(http, "train.jsonl", lines[:TRAIN_LINES])
        other = _upload(http, "other.jsonl", lines[TRAIN_LINES : 2 * TRAIN_LINES])
        body = {
            "teacher": "preset:tiny",
            "data": {"train": train, "validation": "demo:validation", **LENGTHS},
            "top_k": 16,
            "evaluation": EVALUATION,
            "build": {"device": "cpu", "shard_examples": 8},
        }
        created = http.post("/v1/teacher_caches", json=body)
        assert created.status_code == 201, created.text
        cache = _wait(http, f"/v1/teacher_caches/{created.json()['id']}", redis_stack)
        events = http.get(f"/v1/teacher_caches/{cache['id']}/events").json()["data"]
    assert cache["status"] == "succeeded", (cache, redis_stack.log_tail())
    return {"key": key, "cache": cache, "train": train, "other": other, "events": events}


def test_a_built_cache_reports_its_size_per_token(built: dict[str, Any]) -> None:
    cache = built["cache"]
    assert cache["top_k"] == 16 and cache["progress"] == 1.0 and cache["tokens"] > 0
    # k ids (uint16) + k log-probs (fp16) + one fp32 tail per token: 68 bytes, plus offsets
    assert 68 <= cache["bytes_per_token"] < 100, cache
    assert cache["bytes"] == pytest.approx(cache["bytes_per_token"] * cache["tokens"], rel=1e-6)
    assert cache["teacher_eval"] is not None and "rouge_l" in cache["teacher_eval"]
    types = [e["type"] for e in built["events"]]
    assert types[0] == "created" and "started" in types and types[-1] == "succeeded"


def test_another_tenant_gets_404s(redis_stack: Stack, built: dict[str, Any]) -> None:
    cache_id = built["cache"]["id"]
    with redis_stack.http(redis_stack.new_key("stranger")) as http:
        assert http.get(f"/v1/teacher_caches/{cache_id}").status_code == 404
        assert http.delete(f"/v1/teacher_caches/{cache_id}").status_code == 404
        job = http.post("/v1/jobs", json=_job(cache_id, "demo:train"))
        assert job.status_code == 404 and "teacher cache" in job.json()["detail"]


def test_a_job_on_other_data_or_lengths_is_a_422_naming_the_field(
    redis_stack: Stack, built: dict[str, Any]
) -> None:
    cache_id = built["cache"]["id"]
    with redis_stack.http(built["key"]) as http:
        other = http.post("/v1/jobs", json=_job(cache_id, built["other"]))
        assert other.status_code == 422 and other.json()["detail"].startswith("data.train: ")
        longer = http.post("/v1/jobs", json=_job(cache_id, built["train"], max_length=96))
        assert longer.status_code == 422 and longer.json()["detail"].startswith("training.max_length: ")


def test_distill_from_the_cache_with_akl_then_delete_it(redis_stack: Stack, built: dict[str, Any]) -> None:
    cache_id = built["cache"]["id"]
    with redis_stack.http(built["key"]) as http:
        created = http.post("/v1/jobs", json=_job(cache_id, built["train"]))
        assert created.status_code == 201, created.text
        job_id = created.json()["id"]
        busy = http.delete(f"/v1/teacher_caches/{cache_id}")
        assert busy.status_code == 409 and job_id in busy.json()["detail"]
        job = _wait(http, f"/v1/jobs/{job_id}", redis_stack)
        assert job["status"] == "succeeded", (job, redis_stack.log_tail())
        rows = http.get(f"/v1/jobs/{job_id}/metrics").json()["data"]  # the gap history
        assert [row["step"] for row in rows] == [1, 2, 3, 4]
        for row in rows:
            assert row["g_head"] is not None and row["g_tail"] is not None and 0.0 <= row["w_head"] <= 1.0
        # the teacher's line comes from the cache (same evaluation settings), not a teacher forward
        evaluation = http.get(f"/v1/jobs/{job_id}/evaluations").json()["data"][-1]["metrics"]
        assert evaluation["teacher_rouge_l"] == pytest.approx(built["cache"]["teacher_eval"]["rouge_l"])
        assert evaluation["val_kl"] is not None
        deleted = http.delete(f"/v1/teacher_caches/{cache_id}")
        assert deleted.json() == {"id": cache_id, "object": "teacher_cache", "deleted": True}
        assert http.get(f"/v1/teacher_caches/{cache_id}").status_code == 404
        assert http.post("/v1/jobs", json=_job(cache_id, built["train"])).status_code == 404


def test_a_truncated_shard_fails_the_job_with_invalid_cache(
    redis_stack: Stack, built: dict[str, Any]
) -> None:
    with redis_stack.http(built["key"]) as http:
        body = {
            "teacher": "preset:tiny",
            "data": {"train": built["train"], **LENGTHS},
            "top_k": 4,
            "evaluation": {"num_examples": 0},
            "build": {"device": "cpu", "shard_examples": 8},
        }
        cache = _wait(
            http, f"/v1/teacher_caches/{http.post('/v1/teacher_caches', json=body).json()['id']}", redis_stack
        )
        assert cache["status"] == "succeeded", cache
        folders = list((Path(redis_stack.env["AKL_DATA_ROOT"]) / "caches").glob(f"*/{cache['id']}"))
        assert len(folders) == 1
        shard = sorted(folders[0].glob("*.safetensors"))[0]
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # cut short on disk
        spec = _job(cache["id"], built["train"])
        spec["data"].pop("validation")
        spec["data"].pop("max_validation_examples")
        spec["evaluation"] = {"num_examples": 0}
        job = http.post("/v1/jobs", json=spec)
        assert job.status_code == 201, job.text
        failed = _wait(http, f"/v1/jobs/{job.json()['id']}", redis_stack)
        assert failed["status"] == "failed" and failed["error"]["code"] == "invalid_cache", failed


def test_top_k_below_1_or_above_the_vocabulary_is_a_422(redis_stack: Stack, built: dict[str, Any]) -> None:
    config = Path(redis_stack.env["AKL_MODELS_ROOT"]) / "tiny" / "config.json"
    vocab = json.loads(config.read_text())["vocab_size"]  # 768 < 1024: the vocabulary is the bound
    body = {"teacher": "preset:tiny", "data": {"train": built["train"], **LENGTHS}}
    with redis_stack.http(built["key"]) as http:
        for top_k in (0, vocab + 1, 1025):
            response = http.post("/v1/teacher_caches", json={**body, "top_k": top_k})
            assert response.status_code == 422, (top_k, response.text)
        above = http.post("/v1/teacher_caches", json={**body, "top_k": vocab + 1}).json()["detail"]
        assert above == f"top_k: {vocab + 1} is more than the teacher's vocabulary of {vocab} tokens"
