from __future__ import annotations

import socket

import pytest
from fastapi.testclient import TestClient

from api.core.config import Settings
from api.main import create_app


def test_healthz_needs_no_key(client: TestClient) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


def test_readyz_checks_database_and_broker(client: TestClient) -> None:
    response = client.get("/readyz")
    assert response.status_code == 200, response.text
    assert response.json()["checks"] == {"database": "ok", "broker": "ok"}


def test_readyz_503_when_the_broker_is_down(settings: Settings) -> None:
    down = settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0", "enqueue_timeout_s": 0.5})
    with TestClient(create_app(down)) as client:
        response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["checks"]["database"] == "ok" and response.json()["checks"]["broker"] != "ok"


def test_readyz_503_when_the_database_is_down(settings: Settings, tmp_path) -> None:
    down = settings.model_copy(update={"database_url": "postgresql+psycopg://nobody@127.0.0.1:1/none"})
    with TestClient(create_app(down)) as client:
        response = client.get("/readyz")
        assert response.status_code == 503 and response.json()["checks"]["database"] != "ok"
        jobs = client.get("/v1/jobs", headers={"Authorization": "Bearer akl-000000000000-x"})
        assert jobs.status_code == 503 and "database" in jobs.json()["detail"]  # not a 500


def _redis_up() -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", 6379)) == 0


@pytest.mark.skipif(not _redis_up(), reason="no Redis at 127.0.0.1:6379")
def test_readyz_with_redis(settings: Settings) -> None:
    with TestClient(
        create_app(settings.model_copy(update={"broker_url": "redis://127.0.0.1:6379/15"}))
    ) as client:
        assert client.get("/readyz").status_code == 200
