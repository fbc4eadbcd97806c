"""The run contract (akl_core/contract.py) is the one source of the per-step metric names: the
database columns, the migrated schema, the API's metric schema and the events agree with it."""

from __future__ import annotations

import math

import pytest
from sqlalchemy import Float, inspect
from sqlalchemy.orm import Session

from akl_core import contract
from akl_core.events import make_event, step_event
from api.db.models import JobMetric
from api.db.session import get_engine
from tests.api.conftest import job_body

NOT_METRICS = {"id", "job_id", "step", "trained_tokens", "created_at"}


def test_job_metrics_has_one_float_column_per_contract_metric():
    columns = {c.name: c for c in JobMetric.__table__.columns if c.name not in NOT_METRICS}
    assert sorted(columns) == sorted(contract.STEP_METRICS)
    assert all(isinstance(c.type, Float) for c in columns.values())


def test_the_migrated_schema_has_the_contract_metrics(settings):
    names = {c["name"] for c in inspect(get_engine(settings.database_url)).get_columns("job_metrics")}
    assert set(contract.STEP_METRICS) <= names


def test_step_events_carry_every_contract_metric():
    assert set(contract.STEP_METRICS) <= set(contract.StepEvent.model_fields)
    event = step_event(
        step=1, total_steps=2, epoch=0.5, loss=1.0, ce=1.0, kd=1.0, lr=1e-3, grad_norm=1.0, tokens=3,
        trained_tokens=3, tokens_per_s=9.0, stats={"g_head": 0.5},
    )  # fmt: skip
    assert set(contract.STEP_METRICS) <= set(event)
    assert event["g_head"] == 0.5 and math.isnan(event["rkl"])  # a stat the loss lacks is NaN
    assert contract.dumps(event).count("null") == len(contract.STEP_STATS) - 1


def test_emit_refuses_what_the_contract_does_not_name():
    with pytest.raises(ValueError, match="bogus"):
        make_event("eval", step=1, bogus=2.0)
    with pytest.raises(ValueError):
        make_event("no-such-event", step=1)
    assert make_event("checkpoint", step=2, path="checkpoints/step-00000002") == {
        "type": "checkpoint",
        "step": 2,
        "path": "checkpoints/step-00000002",
    }


def test_the_metrics_route_serves_every_contract_metric(client, headers, db: Session):
    job = client.post("/v1/jobs", headers=headers, json=job_body()).json()
    values = {name: float(i + 1) for i, name in enumerate(contract.STEP_METRICS)}
    db.add(JobMetric(job_id=job["id"], step=1, trained_tokens=10, **values))
    db.commit()
    body = client.get(f"/v1/jobs/{job['id']}/metrics", headers=headers).json()
    assert body["fields"] == ["step", "trained_tokens", *contract.STEP_METRICS, "created_at"]
    (point,) = body["data"]
    assert {name: point[name] for name in contract.STEP_METRICS} == values
    csv = client.get(f"/v1/jobs/{job['id']}/metrics", headers=headers, params={"format": "csv"}).text
    assert csv.splitlines()[0].split(",") == body["fields"]
