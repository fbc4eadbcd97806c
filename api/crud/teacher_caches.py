"""Teacher caches: creation, listing, cancellation, deletion, events (rows in ``teacher_caches``).

A cache's bytes live in ``output_dir`` = ``{caches_root}/{tenant_id}/{id}``; deleting a cache
marks its row (jobs that name it keep a readable history) and removes the folder after the commit.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, cast

from sqlalchemy import CursorResult, select, update
from sqlalchemy.orm import Session

from api.core.pagination import newest_first
from api.db.models import QUEUED, RUNNING, Job, TeacherCache, TeacherCacheEvent, new_id, utcnow
from api.lifecycle import CACHES

CACHE_REF_PREFIX = "cache:"  # a job's teacher "cache:<id>"


def cache_dir(caches_root: Path, tenant_id: int, cache_id: str) -> Path:
    return caches_root.resolve() / str(tenant_id) / cache_id


def relative_ref(row: TeacherCache, caches_root: Path) -> str:
    """``cache:<path under the caches root>``: the teacher reference the trainer reads."""
    rel = Path(row.output_dir or "").resolve().relative_to(caches_root.resolve())
    return f"{CACHE_REF_PREFIX}{rel.as_posix()}"


def get_cache(*, session: Session, tenant_id: int, cache_id: str) -> TeacherCache | None:
    """The tenant's live cache, or None (another tenant's cache is None too)."""
    row = session.get(TeacherCache, cache_id)
    if row is None or row.tenant_id != tenant_id or row.deleted_at is not None:
        return None
    return row


def create_cache(
    *,
    session: Session,
    tenant_id: int,
    spec: dict[str, Any],
    resolved_spec: dict[str, Any],
    queue: str,
    caches_root: Path,
) -> TeacherCache:
    """Insert and commit a queued cache build (published right after; the reconciler republishes
    it if that fails)."""
    cache_id = new_id("cache")
    row = TeacherCache(
        id=cache_id,
        tenant_id=tenant_id,
        teacher=spec["teacher"],
        top_k=spec["top_k"],
        spec=spec,
        resolved_spec=resolved_spec,
        queue=queue,
        output_dir=str(cache_dir(caches_root, tenant_id, cache_id)),
    )
    CACHES.create(session, row)
    session.commit()
    return row


def list_caches(
    *,
    session: Session,
    tenant_id: int,
    status: str | None = None,
    after: TeacherCache | None = None,
    limit: int = 20,
) -> tuple[list[TeacherCache], bool]:
    """Newest first; ``after`` is the last cache of the previous page. Returns (page, has_more)."""
    model = TeacherCache
    query = select(model).where(model.tenant_id == tenant_id, model.deleted_at.is_(None))
    if status is not None:
        query = query.where(model.status == status)
    return newest_first(session, query, model, after=after, limit=limit)


def list_events(
    *, session: Session, cache_id: str, after: int | None = None, limit: int = 100
) -> tuple[list[TeacherCacheEvent], bool]:
    """Oldest first, so a client can poll with ``after`` = the last id it saw."""
    query = select(TeacherCacheEvent).where(TeacherCacheEvent.cache_id == cache_id)
    if after is not None:
        query = query.where(TeacherCacheEvent.id > after)
    rows = list(session.scalars(query.order_by(TeacherCacheEvent.id).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def active_jobs_using_cache(*, session: Session, tenant_id: int, cache_id: str) -> list[Job]:
    """Queued or running jobs whose teacher is ``cache:<cache_id>`` (checked in Python, as
    ``api.crud.jobs.active_jobs_using_file`` does)."""
    rows = session.scalars(select(Job).where(Job.tenant_id == tenant_id, Job.status.in_((QUEUED, RUNNING))))
    return [job for job in rows if job.spec.get("teacher") == f"{CACHE_REF_PREFIX}{cache_id}"]


def request_cancel(*, session: Session, row: TeacherCache) -> bool:
    """Cancel a build (``CACHES.cancel``: a queued one at once, a running one through its worker,
    which keeps the shards it finished) and commit. False when it had already finished."""
    if CACHES.cancel(session, row.id) is None:
        session.rollback()
        return False
    session.commit()
    session.refresh(row)
    return True


def delete_cache(*, session: Session, row: TeacherCache) -> bool:
    """Mark a finished cache deleted (conditional: a build that started meanwhile is not);
    the caller commits, then ``remove_stored``. False when the cache is queued or running."""
    stmt = (
        update(TeacherCache)
        .where(TeacherCache.id == row.id, TeacherCache.status.not_in((QUEUED, RUNNING)))
        .values(deleted_at=utcnow())
    )
    done = cast(CursorResult[Any], session.execute(stmt))  # an UPDATE: a cursor result
    if done.rowcount != 1:
        session.rollback()
        return False
    CACHES.add_event(session, row.id, "deleted", "teacher cache deleted")
    return True


def remove_stored(row: TeacherCache) -> None:
    if row.output_dir:
        shutil.rmtree(row.output_dir, ignore_errors=True)
