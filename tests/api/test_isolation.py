"""Every route but health needs a key, and a tenant never sees another tenant's things."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from api.core.config import Settings
from api.crud import api_keys
from api.db.models import Job, JobCheckpoint
from api.main import create_app
from tests.api.conftest import job_body, upload

PUBLIC = {"/healthz", "/readyz"}


def _routes(settings: Settings) -> list[tuple[str, str]]:
    """(method, path) of every documented route, from the OpenAPI schema."""
    paths = create_app(settings).openapi()["paths"]
    return [(method.upper(), path) for path, ops in paths.items() for method in ops if path not in PUBLIC]


def test_the_route_list_covers_the_api(settings: Settings) -> None:
    routes = set(_routes(settings))
    assert {
        ("POST", "/v1/files"), ("GET", "/v1/files/{file_id}"), ("DELETE", "/v1/files/{file_id}"),
        ("POST", "/v1/jobs"), ("GET", "/v1/jobs/{job_id}"), ("POST", "/v1/jobs/{job_id}/cancel"),
        ("GET", "/v1/jobs/{job_id}/events"), ("GET", "/v1/jobs/{job_id}/metrics"),
        ("GET", "/v1/jobs/{job_id}/evaluations"), ("GET", "/v1/jobs/{job_id}/checkpoints"),
        ("GET", "/v1/jobs/{job_id}/checkpoints/{checkpoint_id}/content"), ("GET", "/v1/jobs/{job_id}/model"),
    } <= routes  # fmt: skip


def test_every_route_needs_a_valid_key(
    client: TestClient, settings: Settings, headers: dict[str, str]
) -> None:
    bad_keys = [
        {},
        {"Authorization": "Bearer nonsense"},
        {"Authorization": "Bearer akl-000000000000-secret"},
        {"Authorization": headers["Authorization"] + "x"},  # right prefix, wrong secret
        {"Authorization": headers["Authorization"].replace("Bearer", "Basic")},
    ]
    for method, path in _routes(settings):
        url = path.format(
            job_id="job-x",
            file_id="file-x",
            checkpoint_id="ckpt-x",
            webhook_id="wh-x",
            model="preset:tiny",
            cache_id="cache-x",
        )
        for bad in bad_keys:
            response = client.request(method, url, headers=bad)
            assert response.status_code == 401, (method, path, bad, response.text)
            assert response.headers["www-authenticate"] == "Bearer"


def test_revoked_keys_are_refused(client: TestClient, headers: dict[str, str], db: Session) -> None:
    assert client.get("/v1/jobs", headers=headers).status_code == 200
    prefix = headers["Authorization"].split("-")[1]
    assert api_keys.revoke_key(session=db, prefix=prefix) is not None
    db.commit()
    assert client.get("/v1/jobs", headers=headers).status_code == 401


@pytest.fixture
def owned(
    client: TestClient, headers: dict[str, str], db: Session, settings: Settings, tmp_path: Path
) -> dict[str, str]:
    """A file, a job, a checkpoint, a webhook and a teacher cache of tenant acme, and a distilled
    model (a succeeded job's)."""
    file_id = upload(client, headers).json()["id"]
    job_id = client.post("/v1/jobs", headers=headers, json=job_body(data={"train": file_id})).json()["id"]
    db.add(JobCheckpoint(id="ckpt-acme", job_id=job_id, step=1, path="final", is_final=True))
    done = Job(
        id="job-acmedone", tenant_id=db.get(Job, job_id).tenant_id, status="succeeded",
        spec=job_body(), queue="cpu", output_dir=str(tmp_path / "done"),
    )  # fmt: skip
    shutil.copytree(settings.models_root / "my-student", tmp_path / "done" / "final")
    db.add(done)
    db.flush()
    db.add(JobCheckpoint(id="ckpt-acmedone", job_id=done.id, step=2, path="final", is_final=True))
    db.commit()
    hook = client.post("/v1/webhooks", headers=headers, json={"url": "https://93.184.216.34/h"}).json()["id"]
    assert client.get("/v1/models/ft:job-acmedone", headers=headers).status_code == 200
    cache = client.post(
        "/v1/teacher_caches", headers=headers, json={"teacher": "preset:tiny", "data": {"train": file_id}}
    )
    assert cache.status_code == 201, cache.text
    return {
        "cache_id": cache.json()["id"],
        "file_id": file_id,
        "job_id": job_id,
        "checkpoint_id": "ckpt-acme",
        "webhook_id": hook,
        "model": "ft:job-acmedone",
    }


def test_another_tenants_ids_are_404_on_every_route(
    client: TestClient,
    settings: Settings,
    headers: dict[str, str],
    make_headers: Callable[[str], dict[str, str]],
    owned: dict[str, str],
) -> None:
    intruder = make_headers("intruder")
    with_ids = [(m, p) for m, p in _routes(settings) if "{" in p]
    assert len(with_ids) >= 10
    for method, path in with_ids:
        response = client.request(method, path.format(**owned), headers=intruder)
        assert response.status_code == 404, (method, path, response.text)
    # Nothing changed for the owner (the intruder's DELETE and cancel did nothing) ...
    assert client.get(f"/v1/files/{owned['file_id']}", headers=headers).status_code == 200
    assert client.get(f"/v1/jobs/{owned['job_id']}", headers=headers).json()["status"] == "queued"
    assert client.get(f"/v1/webhooks/{owned['webhook_id']}", headers=headers).status_code == 200
    cache = client.get(f"/v1/teacher_caches/{owned['cache_id']}", headers=headers).json()
    assert cache["status"] == "queued"
    # ... and the lists show the intruder nothing of acme's.
    for url in ("/v1/jobs", "/v1/files", "/v1/webhooks", "/v1/teacher_caches"):
        assert client.get(url, headers=intruder).json()["data"] == []
        assert len(client.get(url, headers=headers).json()["data"]) == (2 if url == "/v1/jobs" else 1)
    assert client.get("/v1/fine_tuning/jobs", headers=intruder).json()["data"] == []
    models = [m["id"] for m in client.get("/v1/models", headers=intruder).json()["data"]]
    assert "ft:job-acmedone" not in models
    assert "ft:job-acmedone" in [m["id"] for m in client.get("/v1/models", headers=headers).json()["data"]]
