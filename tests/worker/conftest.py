from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from api.core.config import Settings
from api.db.models import QUEUED, Job, Tenant, new_id
from api.db.session import dispose_engines, make_engine, session_factory
from tests.worker import services
from worker.jobs import WorkerContext
from worker.options import WorkerOptions

FAKE_RUNNER = "tests.worker.fake_runner"


def artifacts_root(tmp_path: Path) -> Path:
    return (tmp_path / "data" / "artifacts").resolve()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield services.sqlite_database(tmp_path / "akl.db")
        dispose_engines()
        return
    if not services.postgres_available():
        pytest.skip("PostgreSQL is not reachable at AKL_TEST_POSTGRES_URL")
    with services.postgres_database() as url:
        yield url


@pytest.fixture
def sf(db_url: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(db_url)
    yield session_factory(engine)
    engine.dispose()


@pytest.fixture
def tenant_id(sf: sessionmaker[Session]) -> int:
    with sf() as session, session.begin():
        tenant = Tenant(name=f"t-{uuid.uuid4().hex[:6]}")
        session.add(tenant)
        session.flush()
        return tenant.id


@pytest.fixture
def make_job(sf: sessionmaker[Session], tenant_id: int, tmp_path: Path):
    """A queued job as the API leaves it: its resolved spec and output directory set."""

    def make(fake: dict | None = None, **values) -> str:
        spec = {"teacher": "preset:tiny", "data": {"train": "demo:train"}, "_fake": fake or {}}
        job_id = new_id("job")
        values = {"resolved_spec": spec, "output_dir": str(artifacts_root(tmp_path) / job_id), **values}
        with sf() as session, session.begin():
            session.add(Job(id=job_id, tenant_id=tenant_id, status=QUEUED, spec=spec, queue="cpu", **values))
        return job_id

    return make


class Enqueued(list):
    def __call__(self, job_id: str, queue: str) -> None:
        self.append((job_id, queue))


@pytest.fixture
def ctx(
    sf: sessionmaker[Session], tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> WorkerContext:
    monkeypatch.setenv("PYTHONPATH", str(services.REPO))  # the runner child imports tests.worker
    settings = Settings(data_root=tmp_path / "data", database_url=db_url)
    options = WorkerOptions(
        lease_s=4, tick_s=0.2, term_grace_s=3,
        runner_module=FAKE_RUNNER, max_attempts=3,
    )  # fmt: skip
    return WorkerContext(settings=settings, options=options, session_factory=sf, enqueue=Enqueued())
