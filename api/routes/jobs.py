"""Distillation jobs: submit (idempotent), list, get, cancel."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, BackgroundTasks, Header, HTTPException, Query, Response, status

from api.core import quotas
from api.core.cache_refs import cache_id_of, resolve_cache_job
from api.core.errors import error_responses
from api.core.job_refs import RefError, resolve_spec
from api.core.progress import planned_steps
from api.crud import jobs as jobs_crud
from api.db.models import Job
from api.deps import CeleryDep, CurrentTenant, SessionDep, SettingsDep
from api.queue import enqueue_job, queue_for
from api.schemas.common import Page
from api.schemas.jobs import JobCreate, JobPublic, JobStatus

router = APIRouter(prefix="/jobs", tags=["jobs"])


def get_job_or_404(session: SessionDep, tenant: CurrentTenant, job_id: str) -> Job:
    job = jobs_crud.get_job(session=session, tenant_id=tenant.id, job_id=job_id)
    if job is None:
        raise HTTPException(404, f"job {job_id!r} not found")
    return job


def _conflict(exc: jobs_crud.IdempotencyConflict) -> HTTPException:
    return HTTPException(
        409, f"Idempotency-Key already used for job {exc.job.id} with a different request body"
    )


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    responses=error_responses(
        403,
        404,
        409,
        413,
        429,
        s404="a file, model or teacher cache it names",
        s409="Idempotency-Key reused, or its teacher cache is not built (yet)",
        s429="the tenant's queued plus running jobs are at AKL_MAX_ACTIVE_JOBS",
    ),
)
def create_job(
    body: JobCreate,
    tenant: CurrentTenant,
    session: SessionDep,
    settings: SettingsDep,
    celery: CeleryDep,
    background: BackgroundTasks,
    response: Response,
    idempotency_key: Annotated[str | None, Header(min_length=1, max_length=255, pattern=r"^[!-~]+$")] = None,
) -> JobPublic:
    """Submit a distillation job; the same Idempotency-Key never creates a second job."""
    spec = body.spec()
    spec_json = spec.model_dump(mode="json")
    try:
        if idempotency_key is not None:  # a replay answers with the job even if its files are gone since
            existing = jobs_crud.get_by_idempotency_key(
                session=session, tenant_id=tenant.id, key=idempotency_key
            )
            if existing is not None:
                response.headers["Idempotent-Replayed"] = "true"
                return JobPublic.from_row(jobs_crud.replay(existing, spec_json, body.metadata)[0])
        quotas.check_spec_size(spec_json, body.metadata, settings)
        if cache_id_of(spec.teacher) is not None:  # distill from a stored teacher (README, "Teacher caches")
            resolved, _ = resolve_cache_job(spec, session=session, tenant_id=tenant.id, settings=settings)
        else:
            resolved = resolve_spec(spec, session=session, tenant_id=tenant.id, settings=settings)
        quotas.check_job_work(spec, session=session, tenant_id=tenant.id, settings=settings)
        # Last: a 429 says "later", which must not hide a 422 that no retry can fix.
        quotas.check_active_jobs(session=session, tenant_id=tenant.id, settings=settings)
    except RefError as exc:
        raise HTTPException(exc.status_code, f"{exc.field}: {exc.message}") from None
    except quotas.QuotaError as exc:
        raise HTTPException(exc.status_code, exc.message) from None
    except jobs_crud.IdempotencyConflict as exc:
        raise _conflict(exc) from None
    queue = queue_for(spec.resources.device, settings)
    assert settings.artifacts_root is not None
    try:
        job, created = jobs_crud.create_job(
            session=session,
            tenant_id=tenant.id,
            spec=spec_json,
            resolved_spec=resolved,
            metadata=body.metadata,
            queue=queue,
            artifacts_root=str(settings.artifacts_root.resolve()),
            idempotency_key=idempotency_key,
            total_steps=planned_steps(spec, session=session, tenant_id=tenant.id),
        )
    except jobs_crud.IdempotencyConflict as exc:
        raise _conflict(exc) from None
    if created:
        # After the response; if the broker is down the reconciler publishes it later.
        background.add_task(enqueue_job, celery, job_id=job.id, queue=queue)
    else:
        response.headers["Idempotent-Replayed"] = "true"
    return JobPublic.from_row(job)


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
        cursor = jobs_crud.get_job(session=session, tenant_id=tenant.id, job_id=after)
        if cursor is None:
            raise HTTPException(400, f"after: unknown job {after!r}")
    rows, has_more = jobs_crud.list_jobs(
        session=session, tenant_id=tenant.id, status=status, after=cursor, limit=limit
    )
    data = [JobPublic.from_row(row) for row in rows]
    page = quotas.within_page_budget(data, settings.max_list_bytes)
    return Page[JobPublic].of(page, has_more or len(page) < len(data))


@router.get("/{job_id}", responses=error_responses(404))
def get_job(job_id: str, tenant: CurrentTenant, session: SessionDep) -> JobPublic:
    """Get a job: status, times, progress, current metrics, error."""
    return JobPublic.from_row(get_job_or_404(session, tenant, job_id))


@router.post("/{job_id}/cancel", responses=error_responses(404, 409, s409="the job already finished"))
def cancel_job(job_id: str, tenant: CurrentTenant, session: SessionDep) -> JobPublic:
    """Cancel a job: a queued job at once, a running one at its next step."""
    job = get_job_or_404(session, tenant, job_id)
    if not jobs_crud.request_cancel(session=session, job=job):
        session.refresh(job)
        raise HTTPException(409, f"job {job_id} already {job.status}")
    return JobPublic.from_row(job)
