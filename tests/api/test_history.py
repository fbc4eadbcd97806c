from __future__ import annotations

import csv
import io
from datetime import datetime, timedelta, timezone

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from api.crud.history import downsample
from api.crud.jobs import add_event
from api.db.models import JobEvaluation, JobMetric
from tests.api.conftest import job_body


@pytest.fixture
def job_id(client: TestClient, headers: dict[str, str]) -> str:
    return client.post("/v1/jobs", headers=headers, json=job_body()).json()["id"]


def _add_metrics(db: Session, job_id: str, steps: range) -> None:
    for step in steps:
        db.add(
            JobMetric(
                job_id=job_id,
                step=step,
                loss=10.0 / step,
                lr=1e-4,
                g_head=0.1 * step,
                trained_tokens=7 * step,
                created_at=datetime(2026, 11, 30, tzinfo=timezone.utc) + timedelta(seconds=step),
            )
        )
    db.commit()


@pytest.mark.parametrize(("count", "max_points"), [(10, 3), (10, 2), (100, 7), (5, 10), (5, 5), (7, 1)])
def test_downsample_keeps_first_and_last_at_an_even_stride(count: int, max_points: int) -> None:
    picked = downsample(count, max_points)
    assert len(picked) == min(count, max_points)
    assert picked[-1] == count - 1 and (max_points == 1 or picked[0] == 0)
    gaps = {b - a for a, b in zip(picked[:-1], picked[1:], strict=True)}
    assert not gaps or max(gaps) - min(gaps) <= 1  # even stride (up to rounding)


def test_events_paginate_oldest_first(
    client: TestClient, headers: dict[str, str], job_id: str, db: Session
) -> None:
    for i in range(4):
        add_event(session=db, job_id=job_id, type="log", message=f"line {i}", data={"i": i})
    db.commit()
    page = client.get(f"/v1/jobs/{job_id}/events", headers=headers, params={"limit": 3}).json()
    assert [e["type"] for e in page["data"]] == ["created", "log", "log"] and page["has_more"] is True
    rest = client.get(f"/v1/jobs/{job_id}/events", headers=headers, params={"after": page["last_id"]}).json()
    assert [e["message"] for e in rest["data"]] == ["line 2", "line 3"] and rest["has_more"] is False
    assert rest["data"][0]["data"] == {"i": 2}


def test_metrics_json_with_step_range_and_downsampling(
    client: TestClient, headers: dict[str, str], job_id: str, db: Session
) -> None:
    _add_metrics(db, job_id, range(1, 101))
    full = client.get(f"/v1/jobs/{job_id}/metrics", headers=headers).json()
    assert full["total_points"] == 100 and [p["step"] for p in full["data"]] == list(range(1, 101))
    assert (
        full["data"][1]["loss"] == 5.0
        and full["data"][1]["trained_tokens"] == 14
        and full["data"][1]["fkl"] is None
    )
    start = int(datetime(2026, 11, 30, tzinfo=timezone.utc).timestamp())
    assert [p["created_at"] - start for p in full["data"][:3]] == [1, 2, 3]  # each point's time
    assert {"loss", "lr", "tokens_per_s", "g_head", "g_tail", "w_head", "fkl", "rkl"} <= set(full["fields"])
    part = client.get(
        f"/v1/jobs/{job_id}/metrics", headers=headers, params={"from_step": 11, "to_step": 20}
    ).json()
    assert [p["step"] for p in part["data"]] == list(range(11, 21))
    few = client.get(f"/v1/jobs/{job_id}/metrics", headers=headers, params={"max_points": 4}).json()
    assert [p["step"] for p in few["data"]] == [1, 34, 67, 100] and few["total_points"] == 100
    bad = client.get(f"/v1/jobs/{job_id}/metrics", headers=headers, params={"max_points": 0})
    assert bad.status_code == 422


def test_metrics_downsample_a_step_range_of_a_long_history(
    client: TestClient, headers: dict[str, str], job_id: str, db: Session
) -> None:
    # Steps with gaps (a resumed run can skip none, but a range can start anywhere): the picked
    # rows are the even-stride choice among the rows in the range, and only they are loaded.
    _add_metrics(db, job_id, range(1, 4001, 2))
    params = {"from_step": 101, "to_step": 3001, "max_points": 10}
    page = client.get(f"/v1/jobs/{job_id}/metrics", headers=headers, params=params).json()
    in_range = list(range(101, 3002, 2))
    assert page["total_points"] == len(in_range)
    assert [p["step"] for p in page["data"]] == [in_range[i] for i in downsample(len(in_range), 10)]
    assert page["data"][-1]["loss"] == 10.0 / 3001


def test_metrics_csv_by_format_or_accept(
    client: TestClient, headers: dict[str, str], job_id: str, db: Session
) -> None:
    _add_metrics(db, job_id, range(1, 4))
    by_format = client.get(f"/v1/jobs/{job_id}/metrics", headers=headers, params={"format": "csv"})
    by_accept = client.get(f"/v1/jobs/{job_id}/metrics", headers={**headers, "Accept": "text/csv"})
    for response in (by_format, by_accept):
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/csv")
        rows = list(csv.DictReader(io.StringIO(response.text)))
        assert [r["step"] for r in rows] == ["1", "2", "3"]
        assert float(rows[1]["loss"]) == 5.0 and rows[1]["fkl"] == "" and rows[2]["trained_tokens"] == "21"


def test_evaluations_by_step(client: TestClient, headers: dict[str, str], job_id: str, db: Session) -> None:
    db.add(JobEvaluation(job_id=job_id, step=20, metrics={"rouge_l": 0.3}))
    db.add(JobEvaluation(job_id=job_id, step=10, metrics={"rouge_l": 0.2, "teacher_rouge_l": None}))
    db.commit()
    data = client.get(f"/v1/jobs/{job_id}/evaluations", headers=headers).json()["data"]
    assert [(e["step"], e["metrics"]["rouge_l"]) for e in data] == [(10, 0.2), (20, 0.3)]
