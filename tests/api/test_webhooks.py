"""Webhook routes (register, list, get, delete, attempts), tenant isolation, and the outbox rows
that terminal transitions write (api/webhooks/outbox.py), on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import typing
from collections.abc import Callable
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from api.core.config import Settings
from api.db.models import (
    CANCELLED,
    FAILED,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    Job,
    TeacherCache,
    Tenant,
    WebhookAttempt,
    WebhookDelivery,
    new_id,
    utcnow,
)
from api.db.session import get_engine, session_factory
from api.lifecycle import CACHES, JOBS
from api.main import create_app
from api.schemas.webhooks import EventType
from api.webhooks.outbox import CACHE_EVENTS, EVENT_TYPES, JOB_EVENTS, enqueue_terminal_event
from worker import leases

PUBLIC_URL = "https://93.184.216.34/hooks"  # a global literal: no DNS lookup in tests


@pytest.fixture
def no_deliverer(settings: Settings) -> Settings:
    """These tests read the outbox as written: no deliverer may send (and change) it meanwhile."""
    return settings.model_copy(update={"webhooks_deliver": False})


@pytest.fixture
def client(no_deliverer: Settings) -> typing.Iterator[TestClient]:
    with TestClient(create_app(no_deliverer)) as test_client:
        yield test_client


def _tenant_id(db: Session, name: str) -> int:
    return db.scalar(select(Tenant.id).where(Tenant.name == name))


def _job(db: Session, tenant_id: int, status: str = QUEUED, **values: object) -> Job:
    job = Job(
        id=new_id("job"),
        tenant_id=tenant_id,
        status=status,
        spec={"teacher": "preset:tiny", "data": {"train": "demo:train"}},
        queue="cpu",
        metadata_={"run": "a"},
        **values,
    )
    db.add(job)
    db.commit()
    return job


def _deliveries(db: Session) -> list[WebhookDelivery]:
    db.expire_all()
    return list(db.scalars(select(WebhookDelivery).order_by(WebhookDelivery.created_at)))


def test_event_names_are_one_list() -> None:
    assert typing.get_args(EventType) == EVENT_TYPES == (*JOB_EVENTS.values(), *CACHE_EVENTS.values())


def test_register_shows_the_secret_once_and_lists_without_it(
    client: TestClient, headers: dict[str, str]
) -> None:
    created = client.post("/v1/webhooks", headers=headers, json={"url": PUBLIC_URL, "events": ["job.failed"]})
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["object"] == "webhook" and body["url"] == PUBLIC_URL and body["events"] == ["job.failed"]
    assert body["secret"].startswith("whsec_") and len(body["secret"]) > 40
    shown = client.get(f"/v1/webhooks/{body['id']}", headers=headers).json()
    assert "secret" not in shown and shown["id"] == body["id"]
    listed = client.get("/v1/webhooks", headers=headers).json()
    assert [w["id"] for w in listed["data"]] == [body["id"]] and "secret" not in listed["data"][0]
    assert body["secret"] not in client.get("/v1/webhooks", headers=headers).text
    default = client.post("/v1/webhooks", headers=headers, json={"url": PUBLIC_URL}).json()
    assert default["events"] == list(EVENT_TYPES)


def test_delete_and_another_tenants_webhook_is_404(
    client: TestClient, make_headers: Callable[[str], dict[str, str]]
) -> None:
    acme, other = make_headers("acme"), make_headers("other")
    hook = client.post("/v1/webhooks", headers=acme, json={"url": PUBLIC_URL}).json()["id"]
    for method, path in [
        ("get", f"/v1/webhooks/{hook}"),
        ("get", f"/v1/webhooks/{hook}/attempts"),
        ("delete", f"/v1/webhooks/{hook}"),
    ]:
        answer = client.request(method, path, headers=other)
        assert answer.status_code == 404 and answer.json()["detail"] == f"webhook {hook!r} not found"
        assert answer.json()["error"]["message"] == f"webhook {hook!r} not found"
    assert client.get("/v1/webhooks", headers=other).json()["data"] == []
    assert client.delete(f"/v1/webhooks/{hook}", headers=acme).json() == {
        "id": hook,
        "object": "webhook",
        "deleted": True,
    }
    assert client.get(f"/v1/webhooks/{hook}", headers=acme).status_code == 404
    assert client.get("/v1/webhooks", headers=acme).json()["data"] == []
    assert client.get("/v1/webhooks").status_code == 401


@pytest.mark.parametrize(
    "body, loc, words",
    [
        ({"url": "http://127.0.0.1:8080/"}, ["body", "url"], "loopback"),
        ({"url": "http://169.254.169.254/latest/meta-data/"}, ["body", "url"], "link-local"),
        ({"url": "http://[::ffff:10.0.0.1]/"}, ["body", "url"], "private"),
        ({"url": "http://2130706433/"}, ["body", "url"], "loopback"),
        ({"url": "ftp://93.184.216.34/"}, ["body", "url"], "https://"),
        (
            {"url": PUBLIC_URL, "events": ["teacher_cache.ready"]},
            ["body", "events", 0],
            "teacher_cache.failed",
        ),
        ({"url": PUBLIC_URL, "events": ["job.started"]}, ["body", "events", 0], "job.succeeded"),
        ({"url": PUBLIC_URL, "events": []}, ["body", "events"], "at least 1"),
        ({"url": PUBLIC_URL, "secret": "mine"}, ["body", "secret"], "not permitted"),
    ],
)
def test_invalid_registrations_are_422_naming_the_field(
    client: TestClient, headers: dict[str, str], body: dict, loc: list, words: str
) -> None:
    answer = client.post("/v1/webhooks", headers=headers, json=body)
    assert answer.status_code == 422, answer.text
    issue = answer.json()["detail"][0]
    assert issue["loc"] == loc and words in issue["msg"], issue
    assert client.get("/v1/webhooks", headers=headers).json()["data"] == []


def test_allow_private_admits_loopback(settings: Settings, headers: dict[str, str]) -> None:
    allowed = settings.model_copy(update={"webhooks_allow_private": True, "webhooks_deliver": False})
    with TestClient(create_app(allowed)) as client:
        answer = client.post("/v1/webhooks", headers=headers, json={"url": "http://127.0.0.1:9/x"})
        assert answer.status_code == 201
        link_local = client.post("/v1/webhooks", headers=headers, json={"url": "http://169.254.169.254/"})
        assert link_local.status_code == 422


def test_a_tenant_has_at_most_max_webhooks(settings: Settings, headers: dict[str, str]) -> None:
    capped = settings.model_copy(update={"max_webhooks": 2, "webhooks_deliver": False})
    with TestClient(create_app(capped)) as client:
        for _ in range(2):
            assert client.post("/v1/webhooks", headers=headers, json={"url": PUBLIC_URL}).status_code == 201
        refused = client.post("/v1/webhooks", headers=headers, json={"url": PUBLIC_URL})
        assert refused.status_code == 429 and "at most 2" in refused.json()["detail"]


def test_cancelling_a_queued_job_writes_one_row_per_subscribed_webhook(
    client: TestClient, make_headers: Callable[[str], dict[str, str]], db: Session
) -> None:
    acme, other = make_headers("acme"), make_headers("other")
    all_events = client.post("/v1/webhooks", headers=acme, json={"url": PUBLIC_URL}).json()["id"]
    client.post("/v1/webhooks", headers=acme, json={"url": PUBLIC_URL, "events": ["job.succeeded"]})
    client.post("/v1/webhooks", headers=other, json={"url": PUBLIC_URL})  # another tenant's
    job = _job(db, _tenant_id(db, "acme"))
    assert client.post(f"/v1/jobs/{job.id}/cancel", headers=acme).status_code == 200
    rows = _deliveries(db)
    assert [(r.webhook_id, r.event_type, r.subject_id, r.status) for r in rows] == [
        (all_events, "job.cancelled", job.id, "pending")
    ]
    body = json.loads(rows[0].body)
    assert body["type"] == "job.cancelled" and body["timestamp"].endswith("Z")
    assert body["data"]["id"] == job.id and body["data"]["status"] == "cancelled"
    assert body["data"]["finished_at"] is not None and body["data"]["metadata"] == {"run": "a"}
    # Cancelling again changes nothing and writes nothing.
    client.post(f"/v1/jobs/{job.id}/cancel", headers=acme)
    assert len(_deliveries(db)) == 1


@pytest.mark.parametrize("status", [SUCCEEDED, FAILED, CANCELLED])
def test_the_workers_finish_writes_the_event_in_its_transaction(
    client: TestClient, headers: dict[str, str], db: Session, settings: Settings, status: str
) -> None:
    hook = client.post("/v1/webhooks", headers=headers, json={"url": PUBLIC_URL}).json()["id"]
    job = _job(db, _tenant_id(db, "acme"))
    factory = session_factory(get_engine(settings.database_url))
    assert leases.claim(factory, job.id, "w1", lease_s=60) is not None
    assert _deliveries(db) == []
    assert not leases.transact(
        factory, JOBS.finish, job.id, "someone-else", status, message="ended"
    )  # not ours: no transition, no row
    assert _deliveries(db) == []
    error = {"error_code": "nan_loss", "error_message": "the loss became NaN"} if status == FAILED else {}
    assert leases.transact(factory, JOBS.finish, job.id, "w1", status, message="ended", **error)
    [row] = _deliveries(db)
    data = json.loads(row.body)["data"]
    assert (row.webhook_id, row.event_type) == (hook, JOB_EVENTS[status])
    assert data["status"] == status
    assert data["error"] == ({"code": "nan_loss", "message": "the loss became NaN"} if error else None)


def test_an_expired_lease_with_cancel_requested_ends_cancelled_with_its_event(
    client: TestClient, headers: dict[str, str], db: Session, settings: Settings
) -> None:
    client.post("/v1/webhooks", headers=headers, json={"url": PUBLIC_URL, "events": ["job.cancelled"]})
    past = utcnow() - timedelta(minutes=5)
    job = _job(
        db,
        _tenant_id(db, "acme"),
        status=RUNNING,
        cancel_requested=True,
        lease_owner="dead",
        lease_expires_at=past,
    )
    factory = session_factory(get_engine(settings.database_url))
    assert leases.transact(factory, JOBS.requeue, job.id) == CANCELLED
    assert [r.event_type for r in _deliveries(db)] == ["job.cancelled"]


@pytest.mark.parametrize("status", [SUCCEEDED, FAILED, CANCELLED])
def test_a_teacher_cache_build_that_ends_writes_its_event(
    client: TestClient, headers: dict[str, str], db: Session, settings: Settings, status: str
) -> None:
    """Cache builds run on the same lifecycle: their terminal transitions reach the outbox too,
    only for webhooks subscribed to teacher_cache.* events."""
    client.post("/v1/webhooks", headers=headers, json={"url": PUBLIC_URL, "events": ["job.succeeded"]})
    hook = client.post(
        "/v1/webhooks", headers=headers, json={"url": PUBLIC_URL, "events": list(CACHE_EVENTS.values())}
    ).json()["id"]
    cache = TeacherCache(
        id=new_id("cache"), tenant_id=_tenant_id(db, "acme"), teacher="preset:tiny", top_k=16, spec={}
    )
    factory = session_factory(get_engine(settings.database_url))
    leases.transact(factory, CACHES.create, cache)
    assert _deliveries(db) == []
    if status == CANCELLED:  # a queued build cancelled at once
        assert leases.transact(factory, CACHES.cancel, cache.id) == "cancelled"
    else:
        assert leases.transact(factory, CACHES.claim, cache.id, "w1", lease_s=60) is not None
        assert leases.transact(factory, CACHES.finish, cache.id, "w1", status, message="ended", tokens=384)
    [row] = _deliveries(db)
    body = json.loads(row.body)
    assert (row.webhook_id, row.event_type, row.subject_id) == (hook, CACHE_EVENTS[status], cache.id)
    assert body["type"] == CACHE_EVENTS[status] and body["data"]["object"] == "teacher_cache"
    assert body["data"]["status"] == status and body["data"]["top_k"] == 16
    assert body["data"]["tokens"] == (None if status == CANCELLED else 384)


def test_enqueue_writes_nothing_if_the_transition_rolls_back(
    client: TestClient, headers: dict[str, str], db: Session
) -> None:
    client.post("/v1/webhooks", headers=headers, json={"url": PUBLIC_URL})
    job = _job(db, _tenant_id(db, "acme"))
    db.execute(update(Job).where(Job.id == job.id).values(status=SUCCEEDED))
    assert enqueue_terminal_event(db, job.id, SUCCEEDED) == 1
    db.rollback()
    assert _deliveries(db) == []
    with pytest.raises(ValueError, match="not a terminal"):
        enqueue_terminal_event(db, job, RUNNING)


def test_attempts_list_newest_first_with_cursor(
    client: TestClient, headers: dict[str, str], db: Session
) -> None:
    hook = client.post("/v1/webhooks", headers=headers, json={"url": PUBLIC_URL}).json()["id"]
    job = _job(db, _tenant_id(db, "acme"))
    client.post(f"/v1/jobs/{job.id}/cancel", headers=headers)
    [delivery] = _deliveries(db)
    for n, code in enumerate([500, None, 200], start=1):
        db.add(
            WebhookAttempt(
                webhook_id=hook,
                delivery_id=delivery.id,
                event_type="job.cancelled",
                attempt=n,
                succeeded=code == 200,
                status_code=code,
                error=None if code == 200 else "answered 500" if code else "ConnectError: refused",
                duration_ms=5,
            )
        )
    db.commit()
    first = client.get(f"/v1/webhooks/{hook}/attempts?limit=2", headers=headers).json()
    assert [a["attempt"] for a in first["data"]] == [3, 2] and first["has_more"]
    assert first["data"][0]["status"] == "succeeded" and first["data"][0]["response_status_code"] == 200
    assert first["data"][1]["response_status_code"] is None and "refused" in first["data"][1]["error"]
    assert first["data"][0]["message_id"] == delivery.id and first["data"][0]["event"] == "job.cancelled"
    rest = client.get(f"/v1/webhooks/{hook}/attempts?after={first['last_id']}", headers=headers).json()
    assert [a["attempt"] for a in rest["data"]] == [1] and not rest["has_more"]
    assert rest["data"][0]["response_status_code"] == 500
    # Deleting the webhook drops its deliveries and their tries.
    client.delete(f"/v1/webhooks/{hook}", headers=headers)
    assert _deliveries(db) == [] and db.scalars(select(WebhookAttempt)).all() == []
