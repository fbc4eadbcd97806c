"""Per-tenant budgets (api/core/quotas.py): 429 for what frees up with time, 422 for what the
request itself asks. Each refusal: status, a message naming the limit and its value, nothing stored."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from api.core.config import Settings
from api.db.models import SUCCEEDED, File, Job
from api.main import create_app
from tests.api.conftest import GOOD_JSONL, broker_messages, job_body, upload


@pytest.fixture
def limited(settings: Settings) -> Settings:
    return settings.model_copy(
        update={
            "max_active_jobs": 2,
            "max_train_tokens": 1536,
            "max_eval_tokens": 10_000,
            "max_stored_bytes": 3 * len(GOOD_JSONL),
            "max_spec_bytes": 4096,
        }
    )


@pytest.fixture
def client(limited: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(limited)) as test_client:
        yield test_client


def small_job(**overrides: Any) -> dict[str, Any]:
    """Within every limit above: 2 steps x 1 example x 256 tokens; 1 x 1 x 1 x 8 new tokens x 2."""
    body = job_body(
        training={"max_steps": 2, "batch_size": 1},
        evaluation={"num_examples": 1, "seeds": [1], "max_new_tokens": 8},
    )
    body.update(overrides)
    return body


def job_count(db: Session) -> int:
    db.expire_all()
    return db.scalar(select(func.count()).select_from(Job)) or 0


def refused(client: TestClient, headers: dict[str, str], body: dict[str, Any], status: int) -> str:
    response = client.post("/v1/jobs", headers=headers, json=body)
    assert response.status_code == status, response.text
    return response.json()["detail"]


def test_queued_plus_running_jobs_are_capped_per_tenant(
    client: TestClient,
    headers: dict[str, str],
    make_headers: Callable[[str], dict[str, str]],
    limited: Settings,
    db: Session,
) -> None:
    ids = [client.post("/v1/jobs", headers=headers, json=small_job()).json()["id"] for _ in range(2)]
    detail = refused(client, headers, small_job(), 429)
    assert detail == (
        "this tenant has 2 queued or running jobs; the limit (AKL_MAX_ACTIVE_JOBS) is 2: "
        "wait for some to finish or cancel some"
    )
    assert job_count(db) == 2 and len(broker_messages(limited)) == 2  # nothing stored for the refusal
    # another tenant has its own budget
    assert client.post("/v1/jobs", headers=make_headers("other"), json=small_job()).status_code == 201
    # a finished job and a cancelled one free their places
    db.execute(update(Job).where(Job.id == ids[0]).values(status=SUCCEEDED))
    db.commit()
    assert client.post(f"/v1/jobs/{ids[1]}/cancel", headers=headers).status_code == 200
    for _ in range(2):
        assert client.post("/v1/jobs", headers=headers, json=small_job()).status_code == 201
    assert client.post("/v1/jobs", headers=headers, json=small_job()).status_code == 429


def test_a_replay_at_the_limit_answers_with_its_job(
    client: TestClient, headers: dict[str, str], db: Session
) -> None:
    keyed = {**headers, "Idempotency-Key": "k1"}
    created = client.post("/v1/jobs", headers=keyed, json=small_job())
    client.post("/v1/jobs", headers=headers, json=small_job())
    replay = client.post("/v1/jobs", headers=keyed, json=small_job())
    assert replay.status_code == 201 and replay.headers["Idempotent-Replayed"] == "true"
    assert replay.json()["id"] == created.json()["id"] and job_count(db) == 2


def test_training_work_over_the_limit_is_422(
    client: TestClient, headers: dict[str, str], limited: Settings, db: Session
) -> None:
    file_id = upload(client, headers).json()["id"]  # 2 examples
    # 3 epochs x 2 examples / batch 1 = 6 steps x 256 tokens = 1536: exactly the limit
    at_limit = small_job(data={"train": file_id}, training={"epochs": 3, "batch_size": 1})
    assert client.post("/v1/jobs", headers=headers, json=at_limit).status_code == 201
    over = small_job(data={"train": file_id}, training={"epochs": 3, "batch_size": 1, "max_length": 257})
    assert refused(client, headers, over, 422) == (
        "training: 6 steps x 257 tokens per step (batch_size x grad_accum x processes x max_length) "
        "is 1542 tokens; the limit (AKL_MAX_TRAIN_TOKENS) is 1536: lower max_steps, epochs, "
        "batch_size or max_length"
    )
    hostile = small_job(
        training={"max_steps": 10**7, "batch_size": 4096, "max_length": 32768, "max_prompt_length": 128},
        resources={"device": "cpu", "processes": 64},
    )
    assert "AKL_MAX_TRAIN_TOKENS" in refused(client, headers, hostile, 422)
    assert job_count(db) == 1 and len(broker_messages(limited)) == 1


def test_evaluation_work_over_the_limit_is_422(
    client: TestClient, headers: dict[str, str], limited: Settings, db: Session
) -> None:
    # (1 final + 1 teacher) x 5 examples x 2 seeds x 500 new tokens = 10 000: exactly the limit
    at_limit = small_job(evaluation={"num_examples": 5, "seeds": [1, 2], "max_new_tokens": 500})
    assert client.post("/v1/jobs", headers=headers, json=at_limit).status_code == 201
    # every step of 2: one more evaluation
    over = small_job(evaluation={"num_examples": 5, "seeds": [1, 2], "max_new_tokens": 500, "every_steps": 1})
    assert refused(client, headers, over, 422) == (
        "evaluation generates 15000 tokens (evaluations x examples x seeds x max_new_tokens); the "
        "limit (AKL_MAX_EVAL_TOKENS) is 10000: lower evaluation.num_examples, seeds, max_new_tokens "
        "or raise every_steps"
    )
    hostile = small_job(
        evaluation={"num_examples": 100_000, "seeds": list(range(16)), "max_new_tokens": 4096}
    )
    assert "AKL_MAX_EVAL_TOKENS" in refused(client, headers, hostile, 422)
    assert job_count(db) == 1 and len(broker_messages(limited)) == 1


def test_a_spec_over_the_size_limit_is_422(
    client: TestClient, headers: dict[str, str], limited: Settings, db: Session
) -> None:
    body = small_job(metadata={f"k{i}": "x" * 500 for i in range(9)})  # ~4.6 KB of metadata
    detail = refused(client, headers, body, 422)
    assert detail.startswith("the job spec and metadata are ") and detail.endswith(
        "bytes as JSON; the limit (AKL_MAX_SPEC_BYTES) is 4096 bytes: shorten config_overrides or metadata"
    )
    assert job_count(db) == 0 and broker_messages(limited) == []


def test_stored_bytes_are_capped_per_tenant(
    client: TestClient,
    headers: dict[str, str],
    make_headers: Callable[[str], dict[str, str]],
    limited: Settings,
    db: Session,
) -> None:
    ids = [upload(client, headers).json()["id"] for _ in range(3)]  # exactly the limit
    response = upload(client, headers)
    assert response.status_code == 429, response.text
    n = len(GOOD_JSONL)
    assert response.json()["detail"] == (
        f"this tenant stores {3 * n} bytes of files and this upload adds {n}; the limit "
        f"(AKL_MAX_STORED_BYTES) is {3 * n} bytes: delete files it no longer needs"
    )
    db.expire_all()
    assert db.scalar(select(func.count()).select_from(File)) == 3
    assert len(list(limited.files_root.rglob("*"))) == 4  # the tenant's folder and its 3 files
    assert upload(client, make_headers("other")).status_code == 201  # a budget per tenant
    assert client.delete(f"/v1/files/{ids[0]}", headers=headers).status_code == 200
    assert upload(client, headers).status_code == 201  # a deleted file frees its bytes


def test_a_list_page_stops_at_the_byte_budget(
    settings: Settings, headers: dict[str, str], db: Session
) -> None:
    """Rows stored before AKL_MAX_SPEC_BYTES (a 900 KB spec each) still list in bounded pages."""
    with TestClient(create_app(settings.model_copy(update={"max_list_bytes": 50_000}))) as client:
        ids = [client.post("/v1/jobs", headers=headers, json=job_body()).json()["id"] for _ in range(5)]
        for job_id in ids:  # as an old row: a 20 KB spec
            row = db.get(Job, job_id)
            assert row is not None
            row.spec = {**row.spec, "padding": "x" * 20_000}
        db.commit()
        seen, after, sizes = [], None, []
        while True:
            response = client.get(
                "/v1/jobs", headers=headers, params={"limit": 100, **({"after": after} if after else {})}
            )
            page = response.json()
            sizes.append(len(response.content))
            seen += [job["id"] for job in page["data"]]
            if not page["has_more"]:
                break
            after = page["last_id"]
    assert seen == ids[::-1]  # every job once, newest first
    assert len(sizes) == 3 and max(sizes) < 50_000 + 1000  # 2 + 2 + 1 jobs of ~21 KB
