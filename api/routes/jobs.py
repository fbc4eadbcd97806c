"""Distillation jobs: submit (idempotent), list, get, cancel."""

from __future__ import annotations

from fastapi import APIRouter, Query, status

from api.core import quotas
from api.core.errors import ApiError, error_responses
from api.core.pagination import cursor_row
from api.core.submission import SubmitDep
from api.crud import jobs as jobs_crud
from api.deps import CurrentTenant, JobDep, SessionDep, SettingsDep
from api.schemas.common import Page
from api.schemas.jobs import JobCreate, JobPublic, JobStatus

router = APIRouter(prefix="/jobs", tags=["jobs"])

SUBMIT_ERRORS = error_responses(
    403,
    404,
    409,
    413,
    429,
    s404="a file, model or teacher cache it names",
    s409="Idempotency-Key reused, or its teacher cache is not built (yet)",
    s429="the tenant's queued plus running jobs are at AKL_MAX_ACTIVE_JOBS",
)


@router.post("", status_code=status.HTTP_201_CREATED, responses=SUBMIT_ERRORS)
def create_job(body: JobCreate, submission: SubmitDep) -> JobPublic:
    """Submit a distillation job; the same Idempotency-Key never creates a second job."""
    return JobPublic.model_validate(submission.submit(body.spec(), body.metadata))


@router.get("")
def list_jobs(
    tenant: CurrentTenant,
    session: SessionDep,
    settings: SettingsDep,
    status: JobStatus | None = None,
    after: str | None = Query(None, max_length=64, description="the last job id of the previous page"),
    limit: int = Query(20, ge=1, le=100),
) -> Page[JobPublic]:
    """List this tenant's jobs, newest first (cursor pagination with `after`; a page also ends
    early, with has_more, once it passes AKL_MAX_LIST_BYTES)."""
    cursor = None
    if after is not None:
        cursor = cursor_row(
            jobs_crud.get_job(session=session, tenant_id=tenant.id, job_id=after), after, "job"
        )
    rows, has_more = jobs_crud.list_jobs(
        session=session, tenant_id=tenant.id, status=status, after=cursor, limit=limit
    )
    data = [JobPublic.model_validate(row) for row in rows]
    page = quotas.within_page_budget(data, settings.max_list_bytes)
    return Page[JobPublic].of(page, has_more or len(page) < len(data))


@router.get("/{job_id}", responses=error_responses(404))
def get_job(job: JobDep) -> JobPublic:
    """Get a job: status, times, progress, current metrics, error."""
    return JobPublic.model_validate(job)


@router.post("/{job_id}/cancel", responses=error_responses(404, 409, s409="the job already finished"))
def cancel_job(job: JobDep, session: SessionDep) -> JobPublic:
    """Cancel a job: a queued job at once, a running one at its next step."""
    cancel(job, session)
    return JobPublic.model_validate(job)


def cancel(job: JobDep, session: SessionDep) -> None:
    """Request the cancellation (api/crud/jobs.py); 409 once the job has finished."""
    if not jobs_crud.request_cancel(session=session, job=job):
        session.refresh(job)
        raise ApiError(409, f"job {job.id} already {job.status}", code="job_finished")
