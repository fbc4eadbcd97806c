"""Teacher caches over HTTP: build requests, the object, tenants, cancel, delete, and jobs whose
teacher is ``cache:<id>`` checked against the cache's manifest (README, "Teacher caches")."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update
from sqlalchemy.orm import Session

from api.core.config import Settings
from api.db.models import RUNNING, SUCCEEDED, Job, TeacherCache
from tests.api.conftest import broker_messages, job_body, upload


def cache_body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "teacher": "preset:tiny",
        "data": {"train": "demo:train", "max_length": 64, "max_prompt_length": 32},
        "top_k": 16,
    }
    body.update(overrides)
    return body


def built(db: Session, cache_id: str, manifest: dict[str, Any] | None = None) -> None:
    """What a worker leaves behind after a successful build (tests/worker covers the worker)."""
    manifest = manifest or {"tokens": 1000, "bytes": 64_000, "bytes_per_token": 64.0}
    db.execute(
        update(TeacherCache)
        .where(TeacherCache.id == cache_id)
        .values(
            status=SUCCEEDED, manifest=manifest, tokens=1000, bytes=64_000, bytes_per_token=64.0, progress=1.0
        )
    )
    db.commit()


def test_create_queues_a_build_and_publishes_the_cache_task(
    client: TestClient, headers: dict[str, str], settings: Settings, db: Session
) -> None:
    file_id = upload(client, headers).json()["id"]
    response = client.post("/v1/teacher_caches", headers=headers, json=cache_body(data={"train": file_id}))
    assert response.status_code == 201, response.text
    cache = response.json()
    assert cache["object"] == "teacher_cache" and cache["id"].startswith("cache-")
    assert (cache["status"], cache["teacher"], cache["top_k"], cache["progress"]) == (
        "queued",
        "preset:tiny",
        16,
        0.0,
    )
    assert cache["tokens"] is None and cache["bytes_per_token"] is None and cache["error"] is None
    assert cache["data"] == {
        "train": file_id, "validation": None, "format": "auto", "max_length": 256, "max_prompt_length": 128,
    }  # fmt: skip
    row = db.get(TeacherCache, cache["id"])
    assert row is not None and row.resolved_spec["data"]["train"].endswith(f"{file_id}.jsonl")
    tenant_dir = Path(row.output_dir).parent
    assert tenant_dir.parent == settings.caches_root.resolve()
    message = {"task": "akl.build_teacher_cache", "args": [cache["id"]], "queue": "gpu"}
    assert broker_messages(settings) == [message]
    assert (
        client.post("/v1/teacher_caches", headers=headers, json={**cache_body(), "top_k": None}).status_code
        == 422
    )
    default = client.post(
        "/v1/teacher_caches", headers=headers, json={k: v for k, v in cache_body().items() if k != "top_k"}
    )
    assert default.json()["top_k"] == 64


@pytest.mark.parametrize("top_k", [0, -1, 1025, 10**6])
def test_top_k_outside_1_to_1024_is_a_422_naming_it(
    client: TestClient, headers: dict[str, str], top_k: int
) -> None:
    response = client.post("/v1/teacher_caches", headers=headers, json=cache_body(top_k=top_k))
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "top_k"]


def test_top_k_above_the_teachers_vocabulary_is_a_422(
    client: TestClient, headers: dict[str, str], settings: Settings
) -> None:
    teacher = settings.models_root / "small-teacher"
    teacher.mkdir()
    (teacher / "config.json").write_text(
        json.dumps({"model_type": "llama", "vocab_size": 100, "num_hidden_layers": 2})
    )
    refused = client.post(
        "/v1/teacher_caches", headers=headers, json=cache_body(teacher="small-teacher", top_k=101)
    )
    assert refused.status_code == 422 and refused.json()["detail"].startswith("top_k: 101 is more than")
    fits = client.post(
        "/v1/teacher_caches", headers=headers, json=cache_body(teacher="small-teacher", top_k=100)
    )
    assert fits.status_code == 201, fits.text


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        (cache_body(teacher="no-such-model"), 404, "teacher: model 'no-such-model' not found"),
        (cache_body(teacher="preset:nope"), 404, "unknown preset"),
        (cache_body(teacher="hf:org/name"), 403, "hub models are disabled"),
        (cache_body(data={"train": "file-missing"}), 404, "data.train: file 'file-missing' not found"),
        (cache_body(data={"train": "notes.txt"}), 422, "data.train: must be a file id"),
    ],
)
def test_teacher_and_data_refs_are_checked_as_a_jobs_are(
    client: TestClient, headers: dict[str, str], body: dict[str, Any], status: int, words: str
) -> None:
    response = client.post("/v1/teacher_caches", headers=headers, json=body)
    assert response.status_code == status and words in response.json()["detail"]


def test_bad_shapes_are_422s_naming_the_field(client: TestClient, headers: dict[str, str]) -> None:
    cases = [
        (cache_body(teacher="../etc"), ["body", "teacher"]),
        (cache_body(teacher="cache:cache-abc"), ["body", "teacher"]),
        (
            cache_body(data={"train": "demo:train", "max_length": 32, "max_prompt_length": 32}),
            ["body", "data"],
        ),
        (cache_body(data={"train": "demo:train", "format": "csv"}), ["body", "data", "format"]),
        ({**cache_body(), "surprise": 1}, ["body", "surprise"]),
    ]
    for body, loc in cases:
        response = client.post("/v1/teacher_caches", headers=headers, json=body)
        assert response.status_code == 422, body
        assert response.json()["detail"][0]["loc"] == loc, response.json()


def test_caches_belong_to_a_tenant(client: TestClient, make_headers: Callable[[str], dict[str, str]]) -> None:
    mine, theirs = make_headers("acme"), make_headers("other")
    cache_id = client.post("/v1/teacher_caches", headers=mine, json=cache_body()).json()["id"]
    for method, path in [
        ("get", f"/v1/teacher_caches/{cache_id}"),
        ("post", f"/v1/teacher_caches/{cache_id}/cancel"),
        ("delete", f"/v1/teacher_caches/{cache_id}"),
        ("get", f"/v1/teacher_caches/{cache_id}/events"),
    ]:
        response = client.request(method, path, headers=theirs)
        assert response.status_code == 404 and "not found" in response.json()["detail"], (method, path)
    assert client.get("/v1/teacher_caches", headers=theirs).json()["data"] == []
    assert [c["id"] for c in client.get("/v1/teacher_caches", headers=mine).json()["data"]] == [cache_id]
    job = client.post("/v1/jobs", headers=theirs, json=job_body(teacher=f"cache:{cache_id}"))
    assert job.status_code == 404 and "teacher cache" in job.json()["detail"]


def test_list_get_cancel_events_and_delete(client: TestClient, headers: dict[str, str], db: Session) -> None:
    first = client.post("/v1/teacher_caches", headers=headers, json=cache_body()).json()
    second = client.post("/v1/teacher_caches", headers=headers, json=cache_body(top_k=8)).json()
    page = client.get("/v1/teacher_caches?limit=1", headers=headers).json()
    assert [c["id"] for c in page["data"]] == [second["id"]] and page["has_more"] is True
    rest = client.get(f"/v1/teacher_caches?after={second['id']}", headers=headers).json()
    assert [c["id"] for c in rest["data"]] == [first["id"]]
    assert client.get("/v1/teacher_caches?after=cache-nope", headers=headers).status_code == 400
    # queued: a delete is refused (cancel first), a cancel ends it at once
    refused = client.delete(f"/v1/teacher_caches/{first['id']}", headers=headers)
    assert refused.status_code == 409 and "cancel the build first" in refused.json()["detail"]
    cancelled = client.post(f"/v1/teacher_caches/{first['id']}/cancel", headers=headers).json()
    assert cancelled["status"] == "cancelled" and cancelled["cancel_requested"] is True
    again = client.post(f"/v1/teacher_caches/{first['id']}/cancel", headers=headers)
    assert again.status_code == 409 and "already cancelled" in again.json()["detail"]
    assert (
        client.get("/v1/teacher_caches?status=cancelled", headers=headers).json()["data"][0]["id"]
        == first["id"]
    )
    events = client.get(f"/v1/teacher_caches/{first['id']}/events", headers=headers).json()["data"]
    assert [e["type"] for e in events] == ["created", "cancelled"]
    after = client.get(f"/v1/teacher_caches/{first['id']}/events?after={events[0]['id']}", headers=headers)
    assert [e["type"] for e in after.json()["data"]] == ["cancelled"]
    # running: cancel asks the worker; delete is refused
    db.execute(update(TeacherCache).where(TeacherCache.id == second["id"]).values(status=RUNNING))
    db.commit()
    asked = client.post(f"/v1/teacher_caches/{second['id']}/cancel", headers=headers).json()
    assert asked["status"] == "running" and asked["cancel_requested"] is True
    assert client.delete(f"/v1/teacher_caches/{second['id']}", headers=headers).status_code == 409
    # finished: deleted, with its folder
    row = db.get(TeacherCache, first["id"])
    Path(row.output_dir).mkdir(parents=True)
    (Path(row.output_dir) / "shard.bin").write_bytes(b"x")
    deleted = client.delete(f"/v1/teacher_caches/{first['id']}", headers=headers)
    assert deleted.json() == {"id": first["id"], "object": "teacher_cache", "deleted": True}
    assert not Path(row.output_dir).exists()
    assert client.get(f"/v1/teacher_caches/{first['id']}", headers=headers).status_code == 404


def test_the_object_shows_size_and_the_teachers_evaluation_once_built(
    client: TestClient, headers: dict[str, str], db: Session
) -> None:
    cache_id = client.post("/v1/teacher_caches", headers=headers, json=cache_body()).json()["id"]
    built(db, cache_id, {"tokens": 1000, "bytes": 64_000, "teacher_eval": {"rouge_l": 12.5}})
    cache = client.get(f"/v1/teacher_caches/{cache_id}", headers=headers).json()
    assert (cache["status"], cache["tokens"], cache["bytes"], cache["bytes_per_token"]) == (
        SUCCEEDED,
        1000,
        64_000,
        64.0,
    )
    assert cache["teacher_eval"] == {"rouge_l": 12.5} and cache["progress"] == 1.0


# -- jobs that distill from a cache ----------------------------------------------------------------
def cache_job(cache_id: str, **overrides: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "teacher": f"cache:{cache_id}",
        "data": {"train": "demo:train"},
        "training": {"max_steps": 2, "max_length": 64, "max_prompt_length": 32},
    }
    return job_body(**{**fields, **overrides})


@pytest.fixture
def ready_cache(client: TestClient, headers: dict[str, str], db: Session) -> str:
    cache_id = client.post("/v1/teacher_caches", headers=headers, json=cache_body()).json()["id"]
    built(db, cache_id)
    return cache_id


def test_a_job_from_a_built_cache_runs_the_cache_path(
    client: TestClient, headers: dict[str, str], ready_cache: str, db: Session, settings: Settings
) -> None:
    response = client.post("/v1/jobs", headers=headers, json=cache_job(ready_cache))
    assert response.status_code == 201, response.text
    job = response.json()
    assert job["teacher"] == f"cache:{ready_cache}"
    row = db.get(Job, job["id"])
    cache = db.get(TeacherCache, ready_cache)
    rel = Path(cache.output_dir).relative_to(settings.caches_root.resolve()).as_posix()
    assert row.resolved_spec["teacher"] == f"cache:{rel}" and rel == f"{cache.tenant_id}/{ready_cache}"
    # deleting the cache while the job is queued: 409 naming the job
    refused = client.delete(f"/v1/teacher_caches/{ready_cache}", headers=headers)
    assert refused.status_code == 409 and job["id"] in refused.json()["detail"]
    client.post(f"/v1/jobs/{job['id']}/cancel", headers=headers)
    assert client.delete(f"/v1/teacher_caches/{ready_cache}", headers=headers).status_code == 200
    gone = client.post("/v1/jobs", headers=headers, json=cache_job(ready_cache))
    assert gone.status_code == 404


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"data": {"train": "jargon:train"}}, "data.train"),
        ({"data": {"train": "demo:train", "format": "dolly"}}, "data.format"),
        ({"data": {"train": "demo:train", "validation": "demo:validation"}}, "data.validation"),
        ({"training": {"max_steps": 2, "max_length": 128, "max_prompt_length": 32}}, "training.max_length"),
        (
            {"training": {"max_steps": 2, "max_length": 64, "max_prompt_length": 16}},
            "training.max_prompt_length",
        ),
    ],
)
def test_a_job_that_does_not_match_the_manifest_is_a_422_naming_the_field(
    client: TestClient, headers: dict[str, str], ready_cache: str, overrides: dict[str, Any], field: str
) -> None:
    response = client.post("/v1/jobs", headers=headers, json=cache_job(ready_cache, **overrides))
    assert response.status_code == 422, response.text
    assert response.json()["detail"].startswith(f"{field}: "), response.json()


def test_a_job_on_a_cache_built_on_other_uploaded_data_is_a_422(
    client: TestClient, headers: dict[str, str], db: Session
) -> None:
    built_on = upload(client, headers).json()["id"]
    other = upload(client, headers, content=b'{"prompt": "a", "response": "b"}\n').json()["id"]
    cache_id = client.post(
        "/v1/teacher_caches",
        headers=headers,
        json=cache_body(data={"train": built_on, "max_length": 64, "max_prompt_length": 32}),
    ).json()["id"]
    built(db, cache_id)
    body = cache_job(cache_id, data={"train": other})
    response = client.post("/v1/jobs", headers=headers, json=body)
    assert response.status_code == 422 and response.json()["detail"].startswith("data.train: ")
    ok = client.post("/v1/jobs", headers=headers, json=cache_job(cache_id, data={"train": built_on}))
    assert ok.status_code == 201, ok.text


def test_a_cache_still_building_or_failed_is_a_409(
    client: TestClient, headers: dict[str, str], db: Session
) -> None:
    cache_id = client.post("/v1/teacher_caches", headers=headers, json=cache_body()).json()["id"]
    for status in ("queued", "running", "failed"):
        db.execute(update(TeacherCache).where(TeacherCache.id == cache_id).values(status=status))
        db.commit()
        response = client.post("/v1/jobs", headers=headers, json=cache_job(cache_id))
        assert response.status_code == 409 and f"is {status}, not built" in response.json()["detail"]


def test_a_cache_ref_must_be_an_id(client: TestClient, headers: dict[str, str]) -> None:
    for teacher in ("cache:1/cache-abc", "cache:something"):
        response = client.post("/v1/jobs", headers=headers, json=job_body(teacher=teacher))
        assert response.status_code == 422 and "by its id" in response.json()["detail"], teacher


def test_the_training_bytes_must_have_the_manifests_digest(
    client: TestClient, headers: dict[str, str], db: Session
) -> None:
    from akl_core.data import resolve_data_path

    digest = hashlib.sha256(resolve_data_path("demo:train").read_bytes()).hexdigest()
    cache_id = client.post("/v1/teacher_caches", headers=headers, json=cache_body()).json()["id"]
    built(db, cache_id, {"splits": {"train": {"data": "demo:train", "sha256": "0" * 64}}})
    response = client.post("/v1/jobs", headers=headers, json=cache_job(cache_id))
    assert response.status_code == 422 and response.json()["detail"].startswith("data.train: its bytes")
    built(db, cache_id, {"splits": {"train": {"data": "demo:train", "sha256": digest}}})
    assert client.post("/v1/jobs", headers=headers, json=cache_job(cache_id)).status_code == 201


def test_a_pretrained_student_with_another_vocabulary_is_a_422(
    client: TestClient, headers: dict[str, str], db: Session, settings: Settings
) -> None:
    cache_id = client.post("/v1/teacher_caches", headers=headers, json=cache_body()).json()["id"]
    built(db, cache_id, {"vocab_size": 512})
    for name, vocab in (("student-512", 512), ("student-999", 999)):
        (settings.models_root / name).mkdir()
        config = {"model_type": "llama", "vocab_size": vocab, "num_hidden_layers": 1}
        (settings.models_root / name / "config.json").write_text(json.dumps(config))
    wrong = cache_job(cache_id, student={"init": "pretrained", "model": "student-999"})
    response = client.post("/v1/jobs", headers=headers, json=wrong)
    assert response.status_code == 422 and response.json()["detail"].startswith(
        "student.model: its vocabulary"
    )
    right = cache_job(cache_id, student={"init": "pretrained", "model": "student-512"})
    assert client.post("/v1/jobs", headers=headers, json=right).status_code == 201
