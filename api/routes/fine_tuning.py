"""OpenAI's fine-tuning jobs API (``client.fine_tuning.jobs``) over the same job rows and the same
submission path as /v1/jobs: create, list, retrieve, cancel, events, checkpoints."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, status
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from akl_core.spec import JobSpec
from api.core.errors import ApiError, error_responses
from api.core.pagination import cursor_row
from api.core.submission import SubmitDep
from api.crud import history as history_crud
from api.crud import jobs as jobs_crud
from api.deps import CurrentTenant, JobDep, SessionDep
from api.routes.jobs import SUBMIT_ERRORS, cancel
from api.schemas.common import Page
from api.schemas.fine_tuning import (
    FieldError,
    FineTuningCheckpointPublic,
    FineTuningEventPublic,
    FineTuningJobCreate,
    FineTuningJobPublic,
    checkpoint_public,
    event_cursor,
)

router = APIRouter(prefix="/fine_tuning/jobs", tags=["fine-tuning (OpenAI)"])

# Where a spec field came from in the OpenAI request, for error locations and params.
REQUEST_FIELDS = {
    "teacher": "method.distillation.teacher",
    "student.model": "model",
    "data.train": "training_file",
    "data.validation": "validation_file",
}


def _request_field(field: str) -> str:
    return REQUEST_FIELDS.get(field, f"method.distillation.{field}")


def _spec(body: FineTuningJobCreate) -> JobSpec:
    """The JobSpec the request asks for; a 422 names the request's own fields."""
    try:
        return JobSpec.model_validate(body.spec_dict())
    except FieldError as exc:
        raise ApiError(422, str(exc), param=exc.param, code="invalid_value") from None
    except ValidationError as exc:
        errors = []
        for error in exc.errors():
            field = ".".join(str(part) for part in error["loc"])
            errors.append({**error, "loc": ("body", *_request_field(field).split("."))})
        raise RequestValidationError(errors) from None


@router.post("", status_code=status.HTTP_200_OK, responses=SUBMIT_ERRORS)
def create_fine_tuning_job(body: FineTuningJobCreate, submission: SubmitDep) -> FineTuningJobPublic:
    """Create a distillation job the OpenAI way (method.type = distillation)."""
    spec = _spec(body)
    try:
        job = submission.submit(spec, body.metadata)
    except ApiError as exc:
        if exc.param is not None:
            field = _request_field(exc.param)
            exc.detail = f"{field}{str(exc.detail).removeprefix(exc.param)}"
            exc.param = field
        raise
    jobs_crud.set_suffix(session=submission.session, job=job, suffix=body.suffix)
    return FineTuningJobPublic.model_validate(job)


@router.get("")
def list_fine_tuning_jobs(
    tenant: CurrentTenant,
    session: SessionDep,
    after: str | None = Query(None, max_length=64, description="the last job id of the previous page"),
    limit: int = Query(20, ge=1, le=100),
) -> Page[FineTuningJobPublic]:
    """This tenant's jobs, newest first (native and OpenAI-made alike)."""
    cursor = None
    if after is not None:
        cursor = cursor_row(
            jobs_crud.get_job(session=session, tenant_id=tenant.id, job_id=after), after, "job"
        )
    rows, has_more = jobs_crud.list_jobs(session=session, tenant_id=tenant.id, after=cursor, limit=limit)
    return Page[FineTuningJobPublic].of([FineTuningJobPublic.model_validate(row) for row in rows], has_more)


@router.get("/{job_id}", responses=error_responses(404))
def retrieve_fine_tuning_job(job: JobDep) -> FineTuningJobPublic:
    """One job, OpenAI's shape."""
    return FineTuningJobPublic.model_validate(job)


@router.post("/{job_id}/cancel", responses=error_responses(404, 409, s409="the job already finished"))
def cancel_fine_tuning_job(job: JobDep, session: SessionDep) -> FineTuningJobPublic:
    """Cancel: a queued job at once, a running one at its next step."""
    cancel(job, session)
    return FineTuningJobPublic.model_validate(job)


@router.get("/{job_id}/events", responses=error_responses(404))
def list_fine_tuning_events(
    job: JobDep,
    session: SessionDep,
    after: str | None = Query(None, max_length=64, description="the last event id seen; older events follow"),
    limit: int = Query(20, ge=1, le=1000),
) -> Page[FineTuningEventPublic]:
    """The job's events, newest first (OpenAI's order)."""
    before = None
    if after is not None:
        before = event_cursor(after)
        if before is None:
            raise ApiError(400, f"after: not an event id: {after!r}", param="after", code="invalid_cursor")
    rows, has_more = history_crud.list_events_newest_first(
        session=session, job_id=job.id, before=before, limit=limit
    )
    return Page[FineTuningEventPublic].of([FineTuningEventPublic.model_validate(r) for r in rows], has_more)


@router.get("/{job_id}/checkpoints", responses=error_responses(404))
def list_fine_tuning_checkpoints(
    job: JobDep,
    session: SessionDep,
    after: str | None = Query(None, max_length=64, description="the last checkpoint id of the previous page"),
    limit: int = Query(10, ge=1, le=100),
) -> Page[FineTuningCheckpointPublic]:
    """Saved checkpoints, newest first (the final model first), with the metrics of their step."""
    rows = list(reversed(history_crud.list_checkpoints(session=session, job_id=job.id)))
    if after is not None:
        ids = [row.id for row in rows]
        if after not in ids:
            raise ApiError(400, f"after: unknown checkpoint {after!r}", param="after", code="invalid_cursor")
        rows = rows[ids.index(after) + 1 :]
    page: list[Any] = rows[:limit]
    data = [
        checkpoint_public(job, row, history_crud.metric_at(session=session, job_id=job.id, step=row.step))
        for row in page
    ]
    return Page[FineTuningCheckpointPublic].of(data, len(rows) > limit)
