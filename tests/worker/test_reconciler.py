from __future__ import annotations

from datetime import timedelta

from api.db.models import CANCELLED, QUEUED, RUNNING, Job, utcnow
from tests.worker.conftest import Enqueued
from worker import leases
from worker.reconciler import reconcile


def _status(sf, job_id):
    with sf() as session:
        job = session.get_one(Job, job_id)
        return job.status, job.lease_owner


def test_reconcile_requeues_expired_leases_and_forgotten_jobs(sf, make_job):
    now = utcnow()
    old = now - timedelta(minutes=30)
    dead = make_job(created_at=old)
    alive = make_job(created_at=old)
    cancelled = make_job(created_at=old)
    forgotten = make_job(created_at=old, enqueued_at=old)
    fresh = make_job(created_at=now, enqueued_at=now)
    recently_enqueued = make_job(created_at=old, enqueued_at=now - timedelta(seconds=10))
    assert leases.claim(sf, dead, "w-dead", lease_s=30, now=now - timedelta(minutes=5))
    assert leases.claim(sf, alive, "w-alive", lease_s=30, now=now)
    assert leases.claim(sf, cancelled, "w-dead", lease_s=30, now=now - timedelta(minutes=5))
    with sf() as session, session.begin():
        session.get_one(Job, cancelled).cancel_requested = True

    sent = Enqueued()
    report = reconcile(sf, sent, now, requeue_after_s=300)
    assert report.expired == [dead] and report.cancelled == [cancelled]
    assert report.requeued == [forgotten]
    assert sorted(sent) == sorted([(dead, "cpu"), (forgotten, "cpu")])
    assert _status(sf, dead) == (QUEUED, None)
    assert _status(sf, alive) == (RUNNING, "w-alive")
    assert _status(sf, cancelled) == (CANCELLED, None)
    assert _status(sf, fresh)[0] == QUEUED and _status(sf, recently_enqueued)[0] == QUEUED

    # A second pass right after finds nothing: enqueued_at moved on, leases are gone.
    again = Enqueued()
    report = reconcile(sf, again, now + timedelta(seconds=1), requeue_after_s=300)
    assert not again and not report.expired and not report.requeued
    # The re-enqueued dead job is claimable again and counts a second attempt.
    job = leases.claim(sf, dead, "w-new", lease_s=30)
    assert job is not None and job.attempts == 2


def test_reconcile_survives_a_broker_that_is_down(sf, make_job):
    now = utcnow()
    job_id = make_job(created_at=now - timedelta(hours=1))

    def broken(job_id: str, queue: str) -> None:
        raise ConnectionError("broker down")

    report = reconcile(sf, broken, now, requeue_after_s=60)
    assert report.requeued == []
    sent = Enqueued()
    assert reconcile(sf, sent, now + timedelta(seconds=61), requeue_after_s=60).requeued == [job_id]
