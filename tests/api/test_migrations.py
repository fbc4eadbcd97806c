"""The Alembic migrations build exactly the models' schema, on SQLite and on PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from api.db.models import Base
from api.db.session import alembic_config, dispose_engines, get_engine, migrate
from tests.api.conftest import create_postgres_database, drop_postgres_database, postgres_reachable


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def empty_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'empty.db'}"
        dispose_engines()
        return
    if not postgres_reachable():
        pytest.skip("PostgreSQL not reachable")
    url = create_postgres_database()
    try:
        yield url
    finally:
        drop_postgres_database(url)


def _diffs(url: str) -> list:
    with get_engine(url).connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        return compare_metadata(context, Base.metadata)


def test_upgrade_head_matches_the_models(empty_url: str) -> None:
    migrate(empty_url)
    assert _diffs(empty_url) == []
    tables = set(inspect(get_engine(empty_url)).get_table_names())
    assert {t.name for t in Base.metadata.sorted_tables} | {"alembic_version"} == tables
    migrate(empty_url)  # a second upgrade is a no-op


def test_drift_is_seen_and_downgrade_removes_every_table(empty_url: str) -> None:
    migrate(empty_url)
    with get_engine(empty_url).begin() as connection:
        connection.exec_driver_sql("DROP INDEX ix_jobs_status")
    diffs = _diffs(empty_url)
    assert [d[0] for d in diffs] == ["add_index"] and diffs[0][1].name == "ix_jobs_status"
    with get_engine(empty_url).begin() as connection:
        connection.exec_driver_sql("CREATE INDEX ix_jobs_status ON jobs (status)")
        config = alembic_config(empty_url)
        config.attributes["connection"] = connection
        command.downgrade(config, "base")
    assert set(inspect(get_engine(empty_url)).get_table_names()) <= {"alembic_version"}


def test_sqlite_runs_in_wal_with_foreign_keys(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'sub' / 'akl.db'}"
    migrate(url)  # also creates the missing folder
    with get_engine(url).connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 1000
    dispose_engines()
