from __future__ import annotations

import threading
from datetime import timedelta

from api.db.models import CANCELLED, QUEUED, RUNNING, SUCCEEDED, Job, utcnow
from worker import leases


def _job(sf, job_id) -> Job:
    with sf() as session:
        return session.get_one(Job, job_id)


def test_claim_is_exclusive_until_the_lease_expires(sf, make_job):
    job_id = make_job()
    now = utcnow()
    first = leases.claim(sf, job_id, "a", lease_s=30, now=now)
    assert first is not None and first.attempts == 1
    assert leases.claim(sf, job_id, "b", lease_s=30, now=now + timedelta(seconds=29)) is None
    row = _job(sf, job_id)
    assert (row.status, row.lease_owner, row.started_at) == (RUNNING, "a", now)
    # Worker "a" died: after the lease expires another worker may take the job over.
    second = leases.claim(sf, job_id, "b", lease_s=30, now=now + timedelta(seconds=31))
    assert second is not None and second.attempts == 2
    row = _job(sf, job_id)
    assert row.lease_owner == "b" and row.started_at == now  # started_at kept from the first claim
    # "a" comes back: it can neither renew nor finish.
    assert not leases.renew(sf, job_id, "a", lease_s=30).held
    assert not leases.finish(sf, job_id, "a", SUCCEEDED)
    assert leases.renew(sf, job_id, "b", lease_s=30).held
    assert leases.finish(sf, job_id, "b", SUCCEEDED)
    assert leases.claim(sf, job_id, "c", lease_s=30, now=now + timedelta(hours=1)) is None


def _race(sf, job_id: str, workers: int = 8) -> list[str]:
    barrier = threading.Barrier(workers)
    wins: list[str] = []

    def race(owner: str) -> None:
        barrier.wait()
        if leases.claim(sf, job_id, owner, lease_s=30) is not None:
            wins.append(owner)

    threads = [threading.Thread(target=race, args=(f"w{i}",)) for i in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return wins


def test_concurrent_claims_have_one_winner(sf, make_job):
    """Eight threads, each with its own session and connection, race for the same jobs."""
    for _ in range(5):
        job_id = make_job()
        wins = _race(sf, job_id)
        assert len(wins) == 1
        row = _job(sf, job_id)
        assert row.lease_owner == wins[0] and row.attempts == 1


def test_release_gives_the_job_back_without_counting_the_attempt(sf, make_job):
    job_id = make_job()
    assert leases.claim(sf, job_id, "a", lease_s=30)
    assert leases.release(sf, job_id, "a")
    row = _job(sf, job_id)
    assert (row.status, row.lease_owner, row.attempts) == (QUEUED, None, 0)
    assert row.enqueued_at is not None
    assert leases.claim(sf, job_id, "a", lease_s=30)
    assert leases.release(sf, job_id, "a", count_attempt=True)
    assert _job(sf, job_id).attempts == 1


def test_renew_reports_cancellation_and_expired_cancelled_jobs_end_cancelled(sf, make_job):
    job_id = make_job()
    now = utcnow()
    assert leases.claim(sf, job_id, "a", lease_s=5, now=now)
    with sf() as session, session.begin():
        session.get_one(Job, job_id).cancel_requested = True
    beat = leases.renew(sf, job_id, "a", lease_s=5, now=now)
    assert beat.held and beat.cancel_requested
    assert not leases.cancel_expired(sf, job_id, now=now + timedelta(seconds=4))  # lease still live
    assert leases.cancel_expired(sf, job_id, now=now + timedelta(seconds=60))
    assert _job(sf, job_id).status == CANCELLED
