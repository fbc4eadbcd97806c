"""A job's history: lifecycle and log events, per-step metrics (JSON or CSV), evaluations."""

from __future__ import annotations

import csv
import io
from typing import Literal

from fastapi import APIRouter, Query, Request, Response

from api.core.errors import error_responses
from api.crud import history as history_crud
from api.db.models import METRIC_FIELDS
from api.deps import JobDep, SessionDep
from api.schemas.common import INT32_MAX, Page, unix
from api.schemas.history import EvaluationPublic, EventPublic, MetricsPublic

router = APIRouter(prefix="/jobs", tags=["jobs"])

CSV_FIELDS = ("step", "trained_tokens", *METRIC_FIELDS, "created_at")  # created_at: unix seconds


@router.get("/{job_id}/events", responses=error_responses(404))
def list_events(
    job: JobDep,
    session: SessionDep,
    after: int | None = Query(
        None, ge=0, le=INT32_MAX, description="the last event id seen; newer events follow"
    ),
    limit: int = Query(100, ge=1, le=1000),
) -> Page[EventPublic]:
    """Lifecycle and log events, oldest first (poll with `after` = the last id seen)."""
    job_id = job.id
    rows, has_more = history_crud.list_events(session=session, job_id=job_id, after=after, limit=limit)
    data = [EventPublic.model_validate(row) for row in rows]
    return Page[EventPublic].of(data, has_more)


@router.get(
    "/{job_id}/metrics",
    response_model=MetricsPublic,
    responses={
        200: {"content": {"text/csv": {}}, "description": "JSON, or CSV with format=csv"},
        **error_responses(404),
    },
)
def get_metrics(
    job: JobDep,
    session: SessionDep,
    request: Request,
    from_step: int | None = Query(None, ge=0, le=INT32_MAX),
    to_step: int | None = Query(None, ge=0, le=INT32_MAX),
    max_points: int = Query(10_000, ge=1, le=100_000, description="down-sample at an even stride"),
    format: Literal["json", "csv"] | None = Query(
        None, description="default: JSON (or CSV for Accept: text/csv)"
    ),
) -> MetricsPublic | Response:
    """Per-step history (loss, lr, tokens/s, g_head, g_tail, w_head, fkl, rkl, ...)."""
    job_id = job.id
    picked, total = history_crud.list_metrics(
        session=session, job_id=job_id, from_step=from_step, to_step=to_step, max_points=max_points
    )
    points = [
        {**{name: getattr(row, name) for name in CSV_FIELDS}, "created_at": unix(row.created_at)}
        for row in picked
    ]
    wants_csv = format == "csv" or (format is None and "text/csv" in request.headers.get("accept", ""))
    if wants_csv:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(points)
        headers = {"Content-Disposition": f'attachment; filename="{job_id}-metrics.csv"'}
        return Response(buffer.getvalue(), media_type="text/csv", headers=headers)
    return MetricsPublic(job_id=job_id, fields=list(CSV_FIELDS), total_points=total, data=points)


@router.get("/{job_id}/evaluations", responses=error_responses(404))
def list_evaluations(job: JobDep, session: SessionDep) -> Page[EvaluationPublic]:
    """Evaluation results (Rouge-L, distinct-n, validation loss) by step."""
    job_id = job.id
    rows = history_crud.list_evaluations(session=session, job_id=job_id)
    return Page[EvaluationPublic](data=[EvaluationPublic.model_validate(row) for row in rows])
