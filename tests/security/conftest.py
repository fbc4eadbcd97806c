"""In-process API fixtures for the security tests: a migrated SQLite file per test, a filesystem
broker, small upload limits, and a models root with one real directory and one link that
escapes it."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.core.config import Settings
from api.crud import api_keys
from api.db.session import dispose_engines, get_engine, migrate, session_factory
from api.main import create_app


@pytest.fixture(scope="session")
def sqlite_migrated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("security-template") / "akl.db"
    migrate(f"sqlite:///{path}")
    dispose_engines()
    return path


@pytest.fixture
def settings(tmp_path: Path, sqlite_migrated: Path) -> Iterator[Settings]:
    shutil.copy(sqlite_migrated, tmp_path / "akl.db")
    models_root = tmp_path / "models"
    (models_root / "my-student").mkdir(parents=True)
    (models_root / "escape").symlink_to(tmp_path / "outside", target_is_directory=True)
    (tmp_path / "outside").mkdir()
    yield Settings(
        _env_file=None,  # type: ignore[call-arg]
        data_root=tmp_path / "data",
        database_url=f"sqlite:///{tmp_path / 'akl.db'}",
        broker_url="filesystem://",
        models_root=models_root,
        files_root=tmp_path / "data" / "files",
        max_upload_bytes=64 * 1024,
        max_line_bytes=4096,
    )
    dispose_engines()


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    # raise_server_exceptions=False: a bug must show up as the 500 a user would get, not a raise.
    with TestClient(create_app(settings), raise_server_exceptions=False) as test_client:
        yield test_client


@pytest.fixture
def make_key(settings: Settings) -> Callable[[str], str]:
    def make(tenant: str = "acme") -> str:
        with session_factory(get_engine(settings.database_url))() as session:
            _, new = api_keys.create_key(session=session, tenant_name=tenant)
            session.commit()
        return new.key

    return make


@pytest.fixture
def headers(make_key: Callable[[str], str]) -> dict[str, str]:
    return {"Authorization": f"Bearer {make_key('acme')}"}
