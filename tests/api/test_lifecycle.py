"""The job lifecycle (api/lifecycle.py), on SQLite and PostgreSQL: each transition, each refused
transition, the terminal hook, and the same machine on another table."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import JSON, Boolean, ForeignKey, Integer, MetaData, String, Text, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from api.db.models import (
    CANCELLED,
    FAILED,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    Job,
    JobEvent,
    Tenant,
    UTCDateTime,
    new_id,
    utcnow,
)
from api.db.session import get_engine, session_factory
from api.lifecycle import JOBS, Lifecycle

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=utcnow().tzinfo)


@pytest.fixture
def sf(settings) -> sessionmaker[Session]:
    return session_factory(get_engine(settings.database_url))


@pytest.fixture
def make_job(sf) -> Any:
    with sf() as session, session.begin():
        tenant = Tenant(name=f"t-{uuid.uuid4().hex[:6]}")
        session.add(tenant)
        session.flush()
        tenant_id = tenant.id

    def make() -> str:
        with sf() as session, session.begin():
            job = Job(id=new_id("job"), tenant_id=tenant_id, spec={}, queue="cpu")
            JOBS.create(session, job)
            return job.id

    return make


def _do(sf, operation, *args, **kwargs):
    with sf() as session, session.begin():
        return operation(session, *args, **kwargs)


def _job(sf, job_id: str) -> Job:
    with sf() as session:
        return session.get_one(Job, job_id)


def _events(sf, job_id: str) -> list[tuple[str, str]]:
    with sf() as session:
        rows = session.execute(
            select(JobEvent.type, JobEvent.level).where(JobEvent.job_id == job_id).order_by(JobEvent.id)
        )
        return [tuple(row) for row in rows]


def test_create_queues_the_job_with_its_event(sf, make_job):
    job_id = make_job()
    job = _job(sf, job_id)
    assert job.status == QUEUED and job.enqueued_at is not None and job.attempts == 0
    assert _events(sf, job_id) == [("created", "info")]


def test_claim_takes_a_queued_job_or_an_expired_lease_only(sf, make_job):
    job_id = make_job()
    first = _do(sf, JOBS.claim, job_id, "a", lease_s=30, now=NOW)
    assert first is not None and (first.status, first.lease_owner, first.attempts) == (RUNNING, "a", 1)
    assert _do(sf, JOBS.claim, job_id, "b", lease_s=30, now=NOW + timedelta(seconds=29)) is None  # live
    second = _do(sf, JOBS.claim, job_id, "b", lease_s=30, now=NOW + timedelta(seconds=31))  # expired
    assert second is not None and (second.lease_owner, second.attempts) == ("b", 2)
    assert second.started_at == NOW  # the first start is kept
    assert _do(sf, JOBS.finish, job_id, "b", SUCCEEDED, message="done")
    assert _do(sf, JOBS.claim, job_id, "c", lease_s=30, now=NOW + timedelta(hours=1)) is None  # finished
    assert _do(sf, JOBS.claim, "job-unknown", "c", lease_s=30) is None
    assert [t for t, _ in _events(sf, job_id)] == ["created", "running", "running", "succeeded"]


def test_concurrent_claims_have_exactly_one_winner(sf, make_job):
    job_id = make_job()
    winners: list[str] = []
    barrier = threading.Barrier(6)

    def claim(owner: str) -> None:
        barrier.wait()
        if _do(sf, JOBS.claim, job_id, owner, lease_s=30) is not None:
            winners.append(owner)

    threads = [threading.Thread(target=claim, args=(f"w{i}",)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(winners) == 1 and _job(sf, job_id).lease_owner == winners[0]


def test_renew_extends_only_our_live_lease_and_reads_cancel(sf, make_job):
    job_id = make_job()
    _do(sf, JOBS.claim, job_id, "a", lease_s=5, now=NOW)
    lease = _do(sf, JOBS.renew, job_id, "a", lease_s=5, now=NOW + timedelta(seconds=3), current_step=7)
    assert lease.held and not lease.cancel_requested
    job = _job(sf, job_id)
    assert job.lease_expires_at == NOW + timedelta(seconds=8) and job.current_step == 7
    assert _do(sf, JOBS.cancel, job_id) == "requested"
    assert _do(sf, JOBS.renew, job_id, "a", lease_s=5).cancel_requested
    lost = _do(sf, JOBS.renew, job_id, "b", lease_s=5, current_step=99)  # not our lease
    assert not lost.held and _job(sf, job_id).current_step == 7


def test_release_requeues_and_counts_only_a_crash(sf, make_job):
    job_id = make_job()
    _do(sf, JOBS.claim, job_id, "a", lease_s=30)
    assert not _do(sf, JOBS.release, job_id, "b", message="not ours")
    assert _do(sf, JOBS.release, job_id, "a", message="shutdown")
    job = _job(sf, job_id)
    assert (job.status, job.lease_owner, job.attempts) == (QUEUED, None, 0)
    _do(sf, JOBS.claim, job_id, "a", lease_s=30)
    assert _do(sf, JOBS.release, job_id, "a", message="crashed", count_attempt=True)
    assert _job(sf, job_id).attempts == 1
    assert not _do(sf, JOBS.release, job_id, "a", message="twice")  # queued now: refused
    assert [t for t, _ in _events(sf, job_id)].count("released") == 2


@pytest.mark.parametrize("status", [SUCCEEDED, FAILED, CANCELLED])
def test_finish_ends_only_our_running_job(sf, make_job, status):
    job_id = make_job()
    with pytest.raises(ValueError, match="terminal"):
        _do(sf, JOBS.finish, job_id, "a", RUNNING, message="no")
    assert not _do(sf, JOBS.finish, job_id, "a", status, message="queued: no lease")
    _do(sf, JOBS.claim, job_id, "a", lease_s=30)
    assert not _do(sf, JOBS.finish, job_id, "b", status, message="not ours")
    code = "nan_loss" if status == FAILED else None
    assert _do(sf, JOBS.finish, job_id, "a", status, message="end", error_code=code, progress=1.0)
    job = _job(sf, job_id)
    assert (job.status, job.lease_owner, job.error_code, job.progress) == (status, None, code, 1.0)
    assert job.finished_at is not None
    assert _events(sf, job_id)[-1] == (status, "error" if status == FAILED else "info")
    assert not _do(sf, JOBS.finish, job_id, "a", status, message="twice")


def test_cancel_a_queued_job_at_once_a_running_one_through_its_worker(sf, make_job):
    queued, running = make_job(), make_job()
    assert _do(sf, JOBS.cancel, queued) == "cancelled"
    assert _job(sf, queued).status == CANCELLED and _job(sf, queued).finished_at is not None
    assert _do(sf, JOBS.cancel, queued) is None  # finished
    _do(sf, JOBS.claim, running, "a", lease_s=30)
    assert _do(sf, JOBS.cancel, running) == "requested"
    assert _do(sf, JOBS.cancel, running) == "requested"  # asked twice: one event
    assert (_job(sf, running).status, _job(sf, running).cancel_requested) == (RUNNING, True)
    assert [t for t, _ in _events(sf, running)] == ["created", "running", "cancel_requested"]
    assert _do(sf, JOBS.cancel, "job-unknown") is None


def test_requeue_an_expired_lease_or_cancel_it_when_asked(sf, make_job):
    dead, cancelled = make_job(), make_job()
    for job_id in (dead, cancelled):
        _do(sf, JOBS.claim, job_id, "gone", lease_s=30, now=NOW)
    _do(sf, JOBS.cancel, cancelled)
    assert _do(sf, JOBS.requeue, dead, now=NOW + timedelta(seconds=10)) is None  # the lease is live
    assert _do(sf, JOBS.requeue, dead, now=NOW + timedelta(minutes=5)) == QUEUED
    assert _do(sf, JOBS.requeue, dead, now=NOW + timedelta(minutes=5)) is None  # done once
    job = _job(sf, dead)
    assert (job.status, job.lease_owner, job.enqueued_at) == (QUEUED, None, NOW + timedelta(minutes=5))
    assert _events(sf, dead)[-1] == ("requeued", "warning")
    assert _do(sf, JOBS.requeue, cancelled, now=NOW + timedelta(minutes=5)) == CANCELLED
    assert _job(sf, cancelled).status == CANCELLED and _events(sf, cancelled)[-1][0] == "cancelled"


def test_republish_only_a_job_nobody_republished_meanwhile(sf, make_job):
    job_id = make_job()
    seen = _job(sf, job_id).enqueued_at
    assert _do(sf, JOBS.republish, job_id, enqueued_at=seen, now=NOW)
    assert not _do(sf, JOBS.republish, job_id, enqueued_at=seen, now=NOW)  # another reconciler did
    assert _job(sf, job_id).enqueued_at == NOW
    _do(sf, JOBS.claim, job_id, "a", lease_s=30)
    assert not _do(sf, JOBS.republish, job_id, enqueued_at=NOW)  # running


def test_expire_leases_of_a_dead_worker(sf, make_job):
    mine, other = make_job(), make_job()
    _do(sf, JOBS.claim, mine, "host:12:abc", lease_s=30)
    _do(sf, JOBS.claim, other, "host:123:abc", lease_s=30)
    assert _do(sf, JOBS.expire_leases, "host:12:", now=NOW) == 1
    assert _job(sf, mine).lease_expires_at == NOW and _job(sf, other).lease_expires_at > NOW


def test_terminal_hooks_run_in_the_transition_transaction(sf, make_job, monkeypatch):
    seen: list[tuple[str, str]] = []

    def hook(session: Session, row: Job, status: str) -> None:
        assert row.status == status  # the row as the transition left it
        seen.append((row.id, status))
        JOBS.add_event(session, row.id, "hooked", status)

    monkeypatch.setattr(JOBS, "_terminal_hooks", [])
    JOBS.on_terminal(hook)
    done, queued, requeued = make_job(), make_job(), make_job()
    _do(sf, JOBS.claim, done, "a", lease_s=30)
    _do(sf, JOBS.renew, done, "a", lease_s=30)
    assert seen == []  # not on claim / renew
    _do(sf, JOBS.finish, done, "a", FAILED, message="boom")
    _do(sf, JOBS.cancel, queued)
    _do(sf, JOBS.claim, requeued, "a", lease_s=30, now=NOW)
    _do(sf, JOBS.requeue, requeued, now=NOW + timedelta(minutes=1))  # back to queued: not terminal
    assert seen == [(done, FAILED), (queued, CANCELLED)]
    assert _events(sf, done)[-1] == ("hooked", "info")

    rolled_back = make_job()  # a transition whose transaction fails leaves no trace, hook included
    with pytest.raises(RuntimeError), sf() as session, session.begin():
        JOBS.cancel(session, rolled_back)
        raise RuntimeError("the caller's commit never happens")
    assert _job(sf, rolled_back).status == QUEUED and _events(sf, rolled_back) == [("created", "info")]


# -- the same machine on another kind of work ------------------------------------------------------
class OtherBase(DeclarativeBase):
    metadata = MetaData()
    type_annotation_map = {datetime: UTCDateTime()}


class Build(OtherBase):
    """A stand-in for another table with the jobs' status and lease columns (a cache build)."""

    __tablename__ = f"lifecycle_test_builds_{uuid.uuid4().hex[:6]}"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    status: Mapped[str] = mapped_column(String(16), default=QUEUED)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(255), default=None)
    lease_expires_at: Mapped[datetime | None] = mapped_column(default=None)
    heartbeat_at: Mapped[datetime | None] = mapped_column(default=None)
    enqueued_at: Mapped[datetime | None] = mapped_column(default=None)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    error_code: Mapped[str | None] = mapped_column(String(64), default=None)
    error_message: Mapped[str | None] = mapped_column(Text, default=None)


class BuildEvent(OtherBase):
    __tablename__ = f"{Build.__tablename__}_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    build_id: Mapped[str] = mapped_column(ForeignKey(f"{Build.__tablename__}.id"))
    type: Mapped[str] = mapped_column(String(32))
    level: Mapped[str] = mapped_column(String(16))
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)


@pytest.fixture
def builds(settings) -> Iterator[sessionmaker[Session]]:
    engine = get_engine(settings.database_url)
    OtherBase.metadata.create_all(engine)
    yield session_factory(engine)
    OtherBase.metadata.drop_all(engine)


def test_the_lifecycle_runs_another_table_with_the_same_columns(builds):
    machine: Lifecycle[Build] = Lifecycle(Build, BuildEvent, "build_id", noun="build")
    ended: list[str] = []
    machine.on_terminal(lambda session, row, status: ended.append(f"{row.id}:{status}"))
    _do(builds, machine.create, Build(id="b1"))
    assert _do(builds, machine.claim, "b1", "w", lease_s=30).attempts == 1
    assert _do(builds, machine.claim, "b1", "v", lease_s=30) is None
    assert _do(builds, machine.renew, "b1", "w", lease_s=30).held
    assert _do(builds, machine.finish, "b1", "w", SUCCEEDED, message="built")
    assert ended == ["b1:succeeded"] and JOBS._terminal_hooks is not machine._terminal_hooks
    with builds() as session:
        types = session.scalars(select(BuildEvent.type).order_by(BuildEvent.id)).all()
        messages = session.scalars(select(BuildEvent.message).order_by(BuildEvent.id)).all()
    assert types == ["created", "running", "succeeded"] and messages[0] == "build created"
