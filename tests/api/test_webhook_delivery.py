"""Webhook delivery end to end: the outbox, the deliverer and a real HTTP receiver on loopback that
verifies every signature with the standardwebhooks package (tests/api/webhook_receiver.py).

A receiver that is down and comes back gets every event exactly once by webhook-id; a 500 is
retried; a delivery that never succeeds fails after AKL_WEBHOOKS_MAX_ATTEMPTS tries; several
deliverers at once never send one event twice; a lease left by a dead deliverer is taken over; the
guard is applied again at delivery time; and (integration) the outbox survives SIGKILL of the API.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from api.core.config import Settings
from api.db.models import (
    CANCELLED,
    DELIVERY_DELIVERED,
    DELIVERY_FAILED,
    FAILED,
    QUEUED,
    SUCCEEDED,
    Job,
    Tenant,
    WebhookAttempt,
    WebhookDelivery,
    new_id,
)
from api.db.session import get_engine, session_factory
from api.lifecycle import JOBS
from api.main import create_app
from api.webhooks import outbox
from api.webhooks.deliverer import Deliverer
from tests.api.webhook_receiver import Receiver
from tests.worker import services
from worker import leases


def fast(settings: Settings, **overrides: object) -> Settings:
    """Loopback allowed (the receiver), short backoff and polling; no deliverer in the app."""
    values = {
        "webhooks_allow_private": True,
        "webhooks_deliver": False,
        "webhooks_backoff_s": 0.1,
        "webhooks_backoff_max_s": 0.3,
        "webhooks_poll_s": 0.05,
        "webhooks_timeout_s": 2.0,
        "webhooks_lease_s": 10.0,
        "webhooks_max_attempts": 50,
    }
    return settings.model_copy(update={**values, **overrides})


def register(settings: Settings, headers: dict[str, str], receiver: Receiver, **body: object) -> dict:
    with TestClient(create_app(settings)) as client:
        answer = client.post("/v1/webhooks", headers=headers, json={"url": receiver.url(), **body})
    assert answer.status_code == 201, answer.text
    receiver.secrets.append(answer.json()["secret"])
    return answer.json()


def finish_jobs(settings: Settings, statuses: list[str], tenant: str = "acme") -> list[str]:
    """Jobs of ``tenant`` ended the way a worker ends them (claim, then finish)."""
    factory = session_factory(get_engine(settings.database_url))
    with factory() as session:
        tenant_id = session.scalar(select(Tenant.id).where(Tenant.name == tenant))
        ids = [new_id("job") for _ in statuses]
        for job_id in ids:
            session.add(Job(id=job_id, tenant_id=tenant_id, status=QUEUED, spec={}, queue="cpu"))
        session.commit()
    for job_id, status in zip(ids, statuses, strict=True):
        assert leases.claim(factory, job_id, "worker-1", lease_s=60) is not None
        assert leases.transact(factory, JOBS.finish, job_id, "worker-1", status, message="ended")
    return ids


def rows(settings: Settings) -> list[WebhookDelivery]:
    with session_factory(get_engine(settings.database_url))() as session:
        return list(session.scalars(select(WebhookDelivery)))


def attempts(settings: Settings) -> list[WebhookAttempt]:
    with session_factory(get_engine(settings.database_url))() as session:
        return list(session.scalars(select(WebhookAttempt).order_by(WebhookAttempt.id)))


def failed_tries(settings: Settings) -> int:
    with session_factory(get_engine(settings.database_url))() as session:
        return session.scalar(select(func.count()).where(WebhookAttempt.succeeded.is_(False))) or 0


@pytest.fixture
def running() -> Iterator[list[Deliverer]]:
    """Deliverers started by a test, always stopped."""
    started: list[Deliverer] = []
    yield started
    for deliverer in started:
        deliverer.stop()


def start(settings: Settings, running: list[Deliverer], **kwargs: object) -> Deliverer:
    deliverer = Deliverer(settings, **kwargs)  # type: ignore[arg-type]
    deliverer.start()
    running.append(deliverer)
    return deliverer


def test_a_receiver_that_was_down_gets_every_event_exactly_once(
    settings: Settings, headers: dict[str, str], running: list[Deliverer]
) -> None:
    config = fast(settings)
    receiver = Receiver()  # not listening yet: connections are refused
    hook = register(config, headers, receiver)
    jobs = finish_jobs(config, [SUCCEEDED, FAILED, CANCELLED, SUCCEEDED, FAILED, CANCELLED])
    start(config, running)
    services.wait_for(lambda: failed_tries(config) >= 2 * len(jobs), 30, "tries while the receiver is down")
    with receiver:
        services.wait_for(lambda: len(receiver.accepted) == len(jobs), 30, "every event after the comeback")
        time.sleep(1.0)  # a duplicate, if any were sent, would arrive now
    assert receiver.bad_signatures == 0
    assert set(receiver.accepted_counts.values()) == {1}
    deliveries = {row.id: row for row in rows(config)}
    assert set(receiver.accepted) == set(deliveries)  # webhook-id is the outbox row's id
    assert {row.status for row in deliveries.values()} == {DELIVERY_DELIVERED}
    by_job = {payload["data"]["id"]: payload for payload in receiver.accepted.values()}
    assert set(by_job) == set(jobs)
    for job_id, status in zip(jobs, [SUCCEEDED, FAILED, CANCELLED] * 2, strict=True):
        assert by_job[job_id]["type"] == f"job.{status}" and by_job[job_id]["data"]["status"] == status
    for delivery_id in deliveries:
        tries = [a for a in attempts(config) if a.delivery_id == delivery_id]
        assert [a.attempt for a in tries] == list(range(1, len(tries) + 1)) and len(tries) >= 2
        assert all(a.status_code is None and "ConnectError" in (a.error or "") for a in tries[:-1])
        assert tries[-1].succeeded and tries[-1].status_code == 200 and tries[-1].webhook_id == hook["id"]


def test_a_500_is_retried_and_the_attempts_show_it(
    settings: Settings, headers: dict[str, str], running: list[Deliverer]
) -> None:
    config = fast(settings)
    outcomes: list[tuple[str, str]] = []
    with Receiver(fail_first=2) as receiver:
        hook = register(config, headers, receiver, events=["job.failed"])
        finish_jobs(config, [FAILED, SUCCEEDED])  # the success is not subscribed to
        start(config, running, on_attempt=lambda event, outcome, result: outcomes.append((event, outcome)))
        services.wait_for(lambda: len(receiver.accepted) == 1, 30, "the third try")
        time.sleep(0.5)
    [message_id] = receiver.accepted
    assert receiver.tries == [(message_id, 500), (message_id, 500), (message_id, 200)]
    assert outcomes == [("job.failed", "retry"), ("job.failed", "retry"), ("job.failed", "delivered")]
    with TestClient(create_app(config)) as client:
        listed = client.get(f"/v1/webhooks/{hook['id']}/attempts", headers=headers).json()["data"]
    assert [(a["attempt"], a["status"], a["response_status_code"]) for a in listed] == [
        (3, "succeeded", 200),
        (2, "failed", 500),
        (1, "failed", 500),
    ]
    assert {a["message_id"] for a in listed} == {message_id} and listed[0]["created_at"] > 0


def test_a_delivery_fails_after_max_attempts(
    settings: Settings, headers: dict[str, str], running: list[Deliverer]
) -> None:
    config = fast(settings, webhooks_max_attempts=3)
    with Receiver(always_fail=True) as receiver:
        register(config, headers, receiver)
        finish_jobs(config, [SUCCEEDED])
        start(config, running)
        services.wait_for(lambda: rows(config)[0].status == DELIVERY_FAILED, 30, "the delivery to fail")
        time.sleep(0.5)
    assert [status for _, status in receiver.tries] == [500, 500, 500]
    assert [a.attempt for a in attempts(config)] == [1, 2, 3]
    assert rows(config)[0].attempts == 3 and rows(config)[0].finished_at is not None


def test_several_deliverers_at_once_never_send_an_event_twice(
    settings: Settings, headers: dict[str, str], running: list[Deliverer], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = fast(settings, webhooks_concurrency=4)
    events, lost = 40, []
    claim = outbox.claim

    def counting_claim(*args: object, **kwargs: object) -> outbox.Claimed | None:
        claimed = claim(*args, **kwargs)  # type: ignore[arg-type]
        if claimed is None:
            lost.append(args[1])
        return claimed

    monkeypatch.setattr(outbox, "claim", counting_claim)
    with Receiver(delay_s=0.02) as receiver:
        register(config, headers, receiver)
        register(config, headers, receiver, events=["job.succeeded"])  # a second subscriber
        finish_jobs(config, [SUCCEEDED, CANCELLED] * (events // 2))
        expected = events + events // 2
        for _ in range(3):  # each with its own owner id, like three API processes
            start(config, running)
        services.wait_for(lambda: len(receiver.accepted) == expected, 60, f"{expected} deliveries")
        time.sleep(1.0)
    assert lost, "the deliverers never raced for a row: the test proved nothing"
    assert len(receiver.tries) == expected and set(receiver.accepted_counts.values()) == {1}
    assert len(attempts(config)) == expected and receiver.bad_signatures == 0


def test_a_lease_is_exclusive_until_it_expires(settings: Settings, headers: dict[str, str]) -> None:
    config = fast(settings)
    receiver = Receiver()
    register(config, headers, receiver)
    finish_jobs(config, [SUCCEEDED])
    factory = session_factory(get_engine(config.database_url))
    [delivery_id] = outbox.due(factory)
    first = outbox.claim(factory, delivery_id, "api-1", lease_s=0.5)
    assert first is not None and first.url == receiver.url() and first.secret == receiver.secrets[0]
    assert outbox.claim(factory, delivery_id, "api-2", lease_s=0.5) is None  # held
    assert outbox.due(factory) == []
    time.sleep(0.7)  # api-1 died mid-try: its lease runs out
    second = outbox.claim(factory, delivery_id, "api-2", lease_s=30)
    assert second is not None
    result = outbox.Result(succeeded=True, status_code=200, error=None, duration_ms=3)
    assert outbox.record(factory, first, "api-1", result, max_attempts=5, base_s=1, max_s=1) is None  # lost
    assert outbox.record(factory, second, "api-2", result, max_attempts=5, base_s=1, max_s=1) == "delivered"
    assert outbox.claim(factory, delivery_id, "api-3", lease_s=30) is None  # delivered: never again
    assert len(attempts(config)) == 1


def test_backoff_doubles_up_to_its_cap() -> None:
    waits = [outbox.backoff_s(n, base_s=5, max_s=60, jitter=0) for n in range(1, 7)]
    assert waits == [5, 10, 20, 40, 60, 60]
    jittered = [outbox.backoff_s(3, base_s=5, max_s=60) for _ in range(200)]
    assert 16 <= min(jittered) < max(jittered) <= 24


def test_the_guard_runs_again_at_delivery(
    settings: Settings, headers: dict[str, str], running: list[Deliverer]
) -> None:
    config = fast(settings, webhooks_max_attempts=2)
    with Receiver() as receiver:
        register(config, headers, receiver)  # registered while loopback was allowed
        finish_jobs(config, [SUCCEEDED])
        start(config.model_copy(update={"webhooks_allow_private": False}), running)
        services.wait_for(lambda: rows(config)[0].status == DELIVERY_FAILED, 30, "the refusal")
    assert receiver.tries == []
    assert all("refused" in (a.error or "") and "loopback" in (a.error or "") for a in attempts(config))


def _api(env: dict[str, str], port: int, log: Path):
    argv = [sys.executable, "-m", "uvicorn", "api.main:app", "--host", "127.0.0.1", "--port", str(port)]
    proc = services.start_group(argv, env=env, log=log)
    services.wait_for(
        lambda: httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200, 60, "the API"
    )
    return proc


@pytest.mark.integration
def test_the_outbox_survives_sigkill_of_the_api(tmp_path: Path) -> None:
    """Two real API processes (uvicorn) in turn: the first tries while the receiver is down and is
    SIGKILLed; the second, started after the receiver, delivers everything, each event once."""
    database_url = services.sqlite_database(tmp_path / "akl.db")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(services.REPO), os.environ.get("PYTHONPATH", "")]),
        "AKL_DATA_ROOT": str(tmp_path / "data"),
        "AKL_DATABASE_URL": database_url,
        "AKL_BROKER_URL": "filesystem://",
        "AKL_WEBHOOKS_ALLOW_PRIVATE": "true",
        "AKL_WEBHOOKS_BACKOFF_S": "0.1",
        "AKL_WEBHOOKS_BACKOFF_MAX_S": "0.3",
        "AKL_WEBHOOKS_POLL_S": "0.05",
        "AKL_WEBHOOKS_TIMEOUT_S": "1",
        "AKL_WEBHOOKS_LEASE_S": "4",
        "AKL_WEBHOOKS_MAX_ATTEMPTS": "50",
    }
    settings = Settings(_env_file=None, database_url=database_url, data_root=tmp_path / "data")  # type: ignore[call-arg]
    factory = session_factory(get_engine(database_url))
    from api.crud import api_keys

    with factory() as session:
        _, key = api_keys.create_key(session=session, tenant_name="acme")
        session.commit()
    headers = {"Authorization": f"Bearer {key.key}"}
    receiver = Receiver()
    port = services.free_port()
    first = _api(env, port, tmp_path / "api-1.log")
    try:
        hook = httpx.post(
            f"http://127.0.0.1:{port}/v1/webhooks", headers=headers, json={"url": receiver.url()}, timeout=10
        )
        assert hook.status_code == 201, hook.text
        receiver.secrets.append(hook.json()["secret"])
        jobs = finish_jobs(settings, [SUCCEEDED, FAILED, CANCELLED, SUCCEEDED])
        services.wait_for(lambda: failed_tries(settings) >= 8, 30, "tries while the receiver is down")
    finally:
        services.stop_group(first, signal.SIGKILL)
    assert first.wait(10) == -signal.SIGKILL
    pending = [row for row in rows(settings) if row.status == "pending"]
    assert len(pending) == len(jobs)
    with receiver:
        second = _api(env, services.free_port(), tmp_path / "api-2.log")
        try:
            services.wait_for(lambda: len(receiver.accepted) == len(jobs), 30, "every event from the new API")
            time.sleep(1.0)
        finally:
            services.stop_group(second)
    assert set(receiver.accepted_counts.values()) == {1} and receiver.bad_signatures == 0
    assert {p["data"]["id"] for p in receiver.accepted.values()} == set(jobs)
    assert {row.status for row in rows(settings)} == {DELIVERY_DELIVERED}
