"""Prometheus metrics (api/metrics.py): a real scrape of the metrics port, checked against values
computed here from the rows the test wrote; the API port never serves them."""

from __future__ import annotations

import socket
from datetime import timedelta

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select
from sqlalchemy.orm import Session

from api.core.config import Settings
from api.db.models import (
    QUEUED,
    RUNNING,
    SUCCEEDED,
    Job,
    JobMetric,
    Tenant,
    new_id,
    utcnow,
)
from api.main import create_app
from api.metrics import Metrics, serve
from api.webhooks.deliverer import Deliverer
from tests.api.webhook_receiver import Receiver
from tests.worker.services import free_port


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _job(db: Session, tenant_id: int, status: str, queue: str, **values: object) -> str:
    job_id = new_id("job")
    db.add(Job(id=job_id, tenant_id=tenant_id, status=status, spec={}, queue=queue, **values))
    db.commit()
    return job_id


def test_a_real_scrape(settings: Settings, headers: dict[str, str], db: Session) -> None:
    port = free_port()
    config = settings.model_copy(
        update={"metrics_port": port, "webhooks_deliver": False, "webhooks_allow_private": True}
    )
    tenant_id = db.scalar(select(Tenant.id).where(Tenant.name == "acme"))
    now = utcnow()
    ago = lambda s: now - timedelta(seconds=s)  # noqa: E731
    queued = [
        _job(db, tenant_id, QUEUED, "cpu", created_at=ago(100), enqueued_at=ago(100)),
        _job(db, tenant_id, QUEUED, "cpu", created_at=ago(40), enqueued_at=ago(30)),
    ]
    to_cancel = _job(db, tenant_id, QUEUED, "cpu", created_at=ago(5), enqueued_at=ago(5))
    running = _job(
        db,
        tenant_id,
        RUNNING,
        "gpu",
        created_at=ago(400),
        started_at=ago(390),  # waited 10 s
        current_metrics={"loss": 2.0, "tokens_per_s": 123.5},
    )
    _job(db, tenant_id, SUCCEEDED, "cpu", created_at=ago(1000), started_at=ago(750))  # waited 250 s
    # Steps 10..20 over the last 30 s (3 s apart) count; an old step outside the window does not.
    db.add(JobMetric(job_id=running, step=1, loss=9.0, created_at=ago(2000)))
    for i, step in enumerate(range(10, 21)):
        db.add(JobMetric(job_id=running, step=step, loss=2.0, created_at=ago(30 - 3 * i)))
    db.commit()

    with Receiver() as receiver, TestClient(create_app(config)) as client:
        hook = client.post("/v1/webhooks", headers=headers, json={"url": receiver.url()}).json()
        receiver.secrets.append(hook["secret"])
        assert client.post(f"/v1/jobs/{to_cancel}/cancel", headers=headers).status_code == 200
        deliverer = Deliverer(config, on_attempt=client.app.state.metrics.on_webhook_attempt)
        assert deliverer.run_once() == 1 and len(receiver.accepted) == 1
        for job_id in queued:
            assert client.get(f"/v1/jobs/{job_id}", headers=headers).status_code == 200
        assert client.get("/v1/jobs/job-unknown", headers=headers).status_code == 404
        assert client.get("/no/such/path").status_code == 404
        assert client.get("/metrics").status_code == 404  # never on the API port
        assert client.get("/v1/metrics", headers=headers).status_code == 404
        samples = scrape(port)

    def value(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted(labels.items())))]

    assert value("akl_metrics_database_up") == 1
    assert value("akl_jobs", status="queued", queue="cpu") == 2
    assert value("akl_jobs", status="cancelled", queue="cpu") == 1
    assert value("akl_jobs", status="succeeded", queue="cpu") == 1
    assert value("akl_jobs", status="running", queue="gpu") == 1
    assert value("akl_jobs", status="queued", queue="gpu") == 0
    assert value("akl_queue_oldest_wait_seconds", queue="cpu") == pytest.approx(100, abs=10)
    # Queue wait of started jobs: 250 s on cpu, 10 s on gpu.
    assert value("akl_queue_wait_seconds_count", queue="cpu") == 1
    assert value("akl_queue_wait_seconds_sum", queue="cpu") == pytest.approx(250, abs=1)
    assert value("akl_queue_wait_seconds_bucket", queue="cpu", le="120.0") == 0
    assert value("akl_queue_wait_seconds_bucket", queue="cpu", le="300.0") == 1
    assert value("akl_queue_wait_seconds_bucket", queue="gpu", le="5.0") == 0
    assert value("akl_queue_wait_seconds_bucket", queue="gpu", le="15.0") == 1
    assert value("akl_queue_wait_seconds_bucket", queue="gpu", le="+Inf") == 1
    assert value("akl_job_tokens_per_second", job_id=running, queue="gpu") == 123.5
    assert value("akl_job_steps_per_second", job_id=running, queue="gpu") == pytest.approx(10 / 30, rel=1e-3)
    # Latency by route template: two ids, one series; the three unmatched paths share one.
    route = {"method": "GET", "route": "/v1/jobs/{job_id}"}
    assert value("akl_http_request_duration_seconds_count", **route, status="200") == 2
    assert value("akl_http_request_duration_seconds_count", **route, status="404") == 1
    assert (
        value("akl_http_request_duration_seconds_count", method="GET", route="<unmatched>", status="404") == 3
    )
    post = {"method": "POST", "route": "/v1/webhooks", "status": "201"}
    assert value("akl_http_request_duration_seconds_count", **post) == 1
    assert value("akl_http_request_duration_seconds_sum", **post) > 0
    assert not [labels for _, labels in samples if any("job-" in v for k, v in labels if k == "route")]
    # Webhook tries (this process) and the outbox (the database).
    assert value("akl_webhook_deliveries_total", event="job.cancelled", outcome="delivered") == 1
    assert value("akl_webhook_outbox", status="delivered") == 1


def test_metrics_are_off_by_default_and_a_busy_port_does_not_stop_the_api(settings: Settings) -> None:
    assert Settings(_env_file=None).metrics_port is None  # type: ignore[call-arg]
    assert serve(Metrics(settings), settings) is None
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = settings.model_copy(update={"metrics_port": taken.getsockname()[1], "webhooks_deliver": False})
        assert serve(Metrics(busy), busy) is None
        with TestClient(create_app(busy)) as client:
            assert client.get("/healthz").status_code == 200


def test_the_scrape_reports_a_database_that_is_down(tmp_path) -> None:
    port = free_port()
    down = Settings(  # type: ignore[call-arg]
        _env_file=None,
        data_root=tmp_path,
        database_url=f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/nothing",  # nobody listens
        metrics_port=port,
    )
    stop = serve(Metrics(down), down)
    assert stop is not None
    try:
        samples = scrape(port)
    finally:
        stop()
    assert samples[("akl_metrics_database_up", ())] == 0
    assert not [name for name, _ in samples if name.startswith("akl_jobs")]
