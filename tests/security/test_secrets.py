"""API keys are stored only as hashes and compared in constant time; every route of the app (not
only those in the OpenAPI schema) needs a key; and no secret - API key, Redis password, database
password - reaches a log, an event or an error body, also while the database is down."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from sqlalchemy import select, text
from sqlalchemy.engine import make_url

import api.core.security as security
from api.core.config import Settings
from api.db.models import JobEvent
from api.db.session import get_engine
from api.deps import get_current_tenant
from api.main import create_app
from tests.reliability.conftest import RedisServer, Stack, running_stack, tiny_job
from tests.worker import services

PUBLIC = {"/healthz", "/readyz", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}


def _secret(key: str) -> str:
    return key.split("-", 2)[2]


def test_keys_are_stored_only_as_hashes(
    client: TestClient, make_key: Callable[[str], str], settings: Settings
):
    key = make_key("acme")
    assert client.get("/v1/jobs", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    with get_engine(settings.database_url).connect() as connection:
        rows = connection.execute(text("SELECT * FROM api_keys")).all()
        dump = "\n".join(str(tuple(row)) for table in ("api_keys", "tenants", "job_events")
                         for row in connection.execute(text(f"SELECT * FROM {table}")))  # fmt: skip
    assert len(rows) == 1 and security.hash_key(key) in str(rows[0])
    assert _secret(key) not in dump and key not in dump
    db_bytes = b"".join(p.read_bytes() for p in Path(settings.database_url[10:]).parent.glob("akl.db*"))
    assert _secret(key).encode() not in db_bytes


def test_key_check_is_constant_time(client: TestClient, make_key: Callable[[str], str], monkeypatch):
    """Every verdict on a well-formed key of a known prefix goes through hmac.compare_digest."""
    calls: list[tuple[str, str]] = []
    real = security.hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(security.hmac, "compare_digest", spy)
    key = make_key("acme")
    for candidate, status in (
        (key, 200),
        (key[:-1] + ("A" if key[-1] != "A" else "B"), 401),
        (key + "x", 401),
    ):
        calls.clear()
        response = client.get("/v1/jobs", headers={"Authorization": f"Bearer {candidate}"})
        assert response.status_code == status
        assert calls == [(security.hash_key(candidate), security.hash_key(key))]
        assert _secret(candidate) not in response.text


def _api_routes(routes, prefix: str = "", inherited: tuple = ()) -> Iterator[tuple[str, APIRoute, tuple]]:
    """(full path, route, dependencies added at include time) of every APIRoute, hidden or not.
    Walks nested routers whether FastAPI flattens them (older) or keeps them nested (>= 0.16x)."""
    for route in routes:
        if isinstance(route, APIRoute):
            yield prefix + route.path, route, inherited
        elif hasattr(route, "original_router"):
            ctx = route.include_context
            deps = tuple(getattr(d, "dependency", d) for d in (ctx.dependencies or ()))
            yield from _api_routes(
                route.original_router.routes, prefix + (ctx.prefix or ""), inherited + deps
            )
        elif hasattr(route, "routes"):  # a Mount
            yield from _api_routes(route.routes, prefix + getattr(route, "path", ""), inherited)


def test_every_route_of_the_app_needs_a_key(settings: Settings, client: TestClient) -> None:
    """Walks the app's routers (hidden routes included) rather than the OpenAPI schema, and checks
    both the dependency and the answer without a key."""
    app = create_app(settings)
    routes = [(path, r, deps) for path, r, deps in _api_routes(app.routes) if path not in PUBLIC]
    assert len(routes) >= 12
    documented = set(app.openapi()["paths"])

    def needs_tenant(dependant) -> bool:
        return any(d.call is get_current_tenant or needs_tenant(d) for d in dependant.dependencies)

    for path, route, inherited in routes:
        assert get_current_tenant in inherited or needs_tenant(route.dependant), f"{path} needs no API key"
        # OpenAPI writes a path convertor ({model:path}) as the plain parameter ({model})
        plain = re.sub(r"\{(\w+):\w+\}", r"{\1}", path)
        assert plain in documented, f"{path} is hidden from the schema (and so from tests/api)"
        url = plain.format(**{name: "x" for name in route.param_convertors})
        for method in route.methods - {"HEAD"}:
            assert client.request(method, url).status_code == 401, (method, path)


# -- a running stack ---------------------------------------------------------------------------
REDIS_PASSWORD = "redis-pw-3c1e6b0a9f"
DB_PASSWORD = "db-pw-7d52e8c4aa"


@pytest.fixture
def secret_stack(models_root: Path, tmp_path: Path) -> Iterator[Stack]:
    """The stack of tests/reliability with a Redis password and a database password (PostgreSQL
    trusts loopback here, so the password is sent but not checked)."""
    if not services.postgres_available():
        pytest.skip("PostgreSQL is not reachable at AKL_TEST_POSTGRES_URL")

    def with_db_password(stack: Stack) -> None:
        stack.service_db_url = (
            make_url(stack.service_db_url).set(password=DB_PASSWORD).render_as_string(hide_password=False)
        )
        stack.env["AKL_DATABASE_URL"] = stack.service_db_url

    redis = RedisServer(tmp_path / "redis-server.out", password=REDIS_PASSWORD)
    with running_stack(tmp_path, models_root, redis, configure=with_db_password) as stack:
        yield stack


@pytest.mark.integration
@pytest.mark.postgres
def test_no_secret_in_logs_events_or_error_bodies(secret_stack: Stack, tmp_path: Path) -> None:
    stack = secret_stack
    key = stack.new_key("alice")
    wrong = key[:-6] + "zzzzzz"
    stack.start_worker("worker")
    bodies = []
    with stack.http(key) as http:
        job_id = stack.submit(http, tiny_job(tmp_path, steps=2))
        for candidate in (wrong, key + "x", "akl-" + _secret(key)):
            r = httpx.get(f"{stack.url}/v1/jobs", headers={"Authorization": f"Bearer {candidate}"})
            assert r.status_code == 401
            bodies.append(r.text)
        stack.db_proxy.cut()  # errors are where connection strings usually leak
        time.sleep(2)
        bodies += [http.get(f"/v1/jobs/{job_id}").text, httpx.get(f"{stack.url}/readyz").text]
        stack.db_proxy.restore()
        job = stack.wait_job(job_id, lambda j: j.status == "succeeded", 180, "the job")

    logs = {p.name: p.read_text(errors="replace") for p in stack.root.glob("*.log")}
    logs.update({f"{p.parent.name}/{p.name}": p.read_text(errors="replace")
                 for p in Path(job.output_dir).glob("*") if p.suffix in (".log", ".jsonl", ".json")})  # fmt: skip
    assert job_id in logs["worker.log"] and "401" in logs["api.log"]  # the logs we read are the right ones
    assert "database error" in logs["api.log"]  # the outage was logged ...
    with stack.engine.connect() as connection:
        events = [f"{e.message} {e.data}" for e in connection.execute(select(JobEvent))]
    for secret in (_secret(key), _secret(wrong), REDIS_PASSWORD, DB_PASSWORD):  # ... without a secret
        for name, content in [*logs.items(), ("events", "\n".join(events)), ("bodies", "\n".join(bodies))]:
            assert secret not in content, f"{secret[:8]}... found in {name}"
