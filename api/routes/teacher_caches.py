"""Teacher caches: build (a worker job), list, get, cancel, delete, events."""

from __future__ import annotations

from fastapi import APIRouter, BackgroundTasks, HTTPException, Query, status

from api.core.cache_refs import resolve_cache_request
from api.core.errors import error_responses
from api.core.job_refs import RefError
from api.crud import teacher_caches as caches_crud
from api.db.models import TeacherCache
from api.deps import CeleryDep, CurrentTenant, SessionDep, SettingsDep
from api.queue import enqueue_job, queue_for
from api.schemas.common import INT32_MAX, Deleted, Page
from api.schemas.teacher_caches import CacheEventPublic, CacheStatus, TeacherCacheCreate, TeacherCachePublic

router = APIRouter(prefix="/teacher_caches", tags=["teacher caches"])


def get_cache_or_404(session: SessionDep, tenant: CurrentTenant, cache_id: str) -> TeacherCache:
    row = caches_crud.get_cache(session=session, tenant_id=tenant.id, cache_id=cache_id)
    if row is None:
        raise HTTPException(404, f"teacher cache {cache_id!r} not found")
    return row


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    responses=error_responses(403, 404, s404="a file or model it names"),
)
def create_cache(
    body: TeacherCacheCreate,
    tenant: CurrentTenant,
    session: SessionDep,
    settings: SettingsDep,
    celery: CeleryDep,
    background: BackgroundTasks,
) -> TeacherCachePublic:
    """Build a teacher cache: the teacher's top-k distribution over the data, stored once."""
    try:
        resolved = resolve_cache_request(body, session=session, tenant_id=tenant.id, settings=settings)
    except RefError as exc:
        raise HTTPException(exc.status_code, f"{exc.field}: {exc.message}") from None
    assert settings.caches_root is not None
    queue = queue_for(body.build.device, settings)  # auto: the gpu queue, as a job's
    row = caches_crud.create_cache(
        session=session,
        tenant_id=tenant.id,
        spec=body.model_dump(mode="json"),
        resolved_spec=resolved,
        queue=queue,
        caches_root=settings.caches_root,
    )
    background.add_task(enqueue_job, celery, job_id=row.id, queue=queue)
    return TeacherCachePublic.from_row(row)


@router.get("")
def list_caches(
    tenant: CurrentTenant,
    session: SessionDep,
    status: CacheStatus | None = None,
    after: str | None = Query(None, max_length=64, description="the last cache id of the previous page"),
    limit: int = Query(20, ge=1, le=100),
) -> Page[TeacherCachePublic]:
    """List this tenant's teacher caches, newest first."""
    cursor = None
    if after is not None:
        cursor = caches_crud.get_cache(session=session, tenant_id=tenant.id, cache_id=after)
        if cursor is None:
            raise HTTPException(400, f"after: unknown teacher cache {after!r}")
    rows, has_more = caches_crud.list_caches(
        session=session, tenant_id=tenant.id, status=status, after=cursor, limit=limit
    )
    return Page[TeacherCachePublic].of([TeacherCachePublic.from_row(row) for row in rows], has_more)


@router.get("/{cache_id}", responses=error_responses(404))
def get_cache(cache_id: str, tenant: CurrentTenant, session: SessionDep) -> TeacherCachePublic:
    """Get a teacher cache: status, progress, tokens, bytes, bytes per token, error."""
    return TeacherCachePublic.from_row(get_cache_or_404(session, tenant, cache_id))


@router.post("/{cache_id}/cancel", responses=error_responses(404, 409, s409="the build already finished"))
def cancel_cache(cache_id: str, tenant: CurrentTenant, session: SessionDep) -> TeacherCachePublic:
    """Cancel a build: a queued one at once, a running one within seconds (finished shards stay)."""
    row = get_cache_or_404(session, tenant, cache_id)
    if not caches_crud.request_cancel(session=session, row=row):
        session.refresh(row)
        raise HTTPException(409, f"teacher cache {cache_id} already {row.status}")
    return TeacherCachePublic.from_row(row)


@router.delete(
    "/{cache_id}",
    responses=error_responses(404, 409, s409="a queued or running job uses it, or it is still building"),
)
def delete_cache(cache_id: str, tenant: CurrentTenant, session: SessionDep) -> Deleted:
    """Delete a cache and its files (refused while it builds or a queued or running job uses it)."""
    row = get_cache_or_404(session, tenant, cache_id)
    users = caches_crud.active_jobs_using_cache(session=session, tenant_id=tenant.id, cache_id=cache_id)
    if users:
        raise HTTPException(
            409, f"teacher cache {cache_id!r} is used by active job {users[0].id}; cancel it first"
        )
    if not caches_crud.delete_cache(session=session, row=row):
        raise HTTPException(
            409, f"teacher cache {cache_id!r} is {row.status}; cancel the build first (POST .../cancel)"
        )
    session.commit()
    caches_crud.remove_stored(row)
    return Deleted(id=cache_id, object="teacher_cache")


@router.get("/{cache_id}/events", responses=error_responses(404))
def list_events(
    cache_id: str,
    tenant: CurrentTenant,
    session: SessionDep,
    after: int | None = Query(None, ge=0, le=INT32_MAX, description="the last event id seen"),
    limit: int = Query(100, ge=1, le=1000),
) -> Page[CacheEventPublic]:
    """A build's lifecycle and log events, oldest first (poll with `after`)."""
    get_cache_or_404(session, tenant, cache_id)
    rows, has_more = caches_crud.list_events(session=session, cache_id=cache_id, after=after, limit=limit)
    return Page[CacheEventPublic].of([CacheEventPublic.from_row(row) for row in rows], has_more)
