"""API test fixtures: every test runs against SQLite and PostgreSQL, with a throw-away
filesystem broker under tmp_path (no worker needed: tests read the published messages)."""

from __future__ import annotations

import base64
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session

from api.core.config import Settings
from api.crud import api_keys
from api.db.models import Base
from api.db.session import dispose_engines, get_engine, migrate, session_factory
from api.main import create_app

POSTGRES_URL = os.environ.get("AKL_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")

GOOD_JSONL = b'{"prompt": "Say hi.", "response": "Hi!"}\n{"prompt": "Count to 2.", "response": "1 2"}\n'


def postgres_reachable() -> bool:
    try:
        engine = create_engine(POSTGRES_URL, connect_args={"connect_timeout": 3})
        with engine.connect():
            pass
        engine.dispose()
        return True
    except Exception:
        return False


def _server_url(name: str) -> str:
    return POSTGRES_URL.rsplit("/", 1)[0] + f"/{name}"


def create_postgres_database() -> str:
    """A fresh, randomly named database (so engineers' test runs never collide)."""
    name = f"akl_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
    admin.dispose()
    return _server_url(name)


def drop_postgres_database(url: str) -> None:
    dispose_engines()
    admin = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)')
    admin.dispose()


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated SQLite file, copied for each test (migrating once keeps the suite fast)."""
    path = tmp_path_factory.mktemp("template") / "akl.db"
    migrate(f"sqlite:///{path}")
    dispose_engines()  # closes the connections and checkpoints the WAL into the file
    return path


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    if not postgres_reachable():
        pytest.skip(f"PostgreSQL not reachable at {POSTGRES_URL}")
    url = create_postgres_database()
    try:
        migrate(url)
        yield url
    finally:
        drop_postgres_database(url)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path, sqlite_template: Path) -> Iterator[str]:
    if request.param == "sqlite":
        path = tmp_path / "akl.db"
        shutil.copy(sqlite_template, path)
        yield f"sqlite:///{path}"
        dispose_engines()
        return
    url = request.getfixturevalue("postgres_url")
    tables = ", ".join(table.name for table in Base.metadata.sorted_tables)
    with get_engine(url).begin() as connection:
        connection.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
    yield url


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    models_root = tmp_path / "models"
    (models_root / "my-student").mkdir(parents=True)
    (models_root / "my-student" / "config.json").write_text('{"model_type": "llama", "num_hidden_layers": 2}')
    return Settings(
        _env_file=None,  # type: ignore[call-arg]
        environment="local",
        data_root=tmp_path / "data",
        database_url=database_url,
        broker_url="filesystem://",
        models_root=models_root,
        artifacts_root=tmp_path / "data" / "artifacts",
        files_root=tmp_path / "data" / "files",
        allow_hub=False,
        max_upload_bytes=64 * 1024,
        max_line_bytes=4096,
        default_queue="",
    )


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as test_client:
        yield test_client


@pytest.fixture
def db(settings: Settings) -> Iterator[Session]:
    with session_factory(get_engine(settings.database_url))() as session:
        yield session


@pytest.fixture
def make_headers(settings: Settings) -> Callable[[str], dict[str, str]]:
    """``make_headers("tenant")`` -> Authorization headers with a new key of that tenant."""

    def make(tenant: str = "acme") -> dict[str, str]:
        with session_factory(get_engine(settings.database_url))() as session:
            _, new = api_keys.create_key(session=session, tenant_name=tenant)
            session.commit()
        return {"Authorization": f"Bearer {new.key}"}

    return make


@pytest.fixture
def headers(make_headers: Callable[[str], dict[str, str]]) -> dict[str, str]:
    return make_headers("acme")


def upload(
    client: TestClient,
    headers: dict[str, str],
    content: bytes = GOOD_JSONL,
    purpose: str = "train",
    name: str = "data.jsonl",
) -> Any:
    return client.post(
        "/v1/files", headers=headers, files={"file": (name, content)}, data={"purpose": purpose}
    )


def job_body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "teacher": "preset:tiny",
        "student": {"init": "truncate", "num_layers": 1},
        "data": {"train": "demo:train"},
        "training": {"max_steps": 2},
        "resources": {"device": "cpu"},
    }
    body.update(overrides)
    return body


def broker_messages(settings: Settings) -> list[dict[str, Any]]:
    """Messages in the filesystem broker folder: {"task", "args", "queue"} each."""
    out = []
    for path in sorted((settings.broker_root / "queue").glob("*.msg")):
        message = json.loads(path.read_text())
        args, _kwargs, _embed = json.loads(base64.b64decode(message["body"]))
        queue = path.name.rsplit(".", 2)[-2]
        out.append({"task": message["headers"]["task"], "args": args, "queue": queue})
    return out
