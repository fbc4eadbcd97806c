"""Teacher caches over HTTP: the build request, the public object, its events."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from akl_core.cache_spec import CacheSpec
from api.db.models import TeacherCache, TeacherCacheEvent
from api.schemas.common import PublicModel, unix

CacheStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class TeacherCacheCreate(CacheSpec):
    """``POST /v1/teacher_caches``: the cache spec (akl_core.cache_spec.CacheSpec). ``data.train``
    and ``data.validation`` are file ids or built-in splits, as in a job; the length settings are
    the ones a job that trains from the cache must use."""


class CacheError(PublicModel):
    code: str
    message: str


class TeacherCachePublic(PublicModel):
    object: Literal["teacher_cache"] = "teacher_cache"
    id: str
    status: CacheStatus
    created_at: int
    started_at: int | None
    finished_at: int | None
    teacher: str
    top_k: int
    data: dict[str, Any]
    progress: float
    tokens: int | None = Field(description="response tokens stored (once built)")
    examples: int | None
    bytes: int | None = Field(description="bytes on disk, shards and manifest")
    bytes_per_token: float | None
    teacher_eval: dict[str, Any] | None = Field(
        description="the teacher's evaluation line (Rouge-L), computed when the cache was built"
    )
    error: CacheError | None
    cancel_requested: bool
    attempts: int

    @classmethod
    def from_row(cls, row: TeacherCache) -> TeacherCachePublic:
        error = None
        if row.error_code or row.error_message:
            error = CacheError(code=row.error_code or "internal_error", message=row.error_message or "")
        manifest = row.manifest or {}
        teacher_eval = manifest.get("teacher_eval")
        return cls(
            id=row.id,
            status=row.status,
            created_at=unix(row.created_at) or 0,
            started_at=unix(row.started_at),
            finished_at=unix(row.finished_at),
            teacher=row.teacher,
            top_k=row.top_k,
            data=row.spec.get("data", {}),
            progress=row.progress,
            tokens=row.tokens,
            examples=row.examples,
            bytes=row.bytes,
            bytes_per_token=row.bytes_per_token,
            teacher_eval=teacher_eval if isinstance(teacher_eval, dict) else None,
            error=error,
            cancel_requested=row.cancel_requested,
            attempts=row.attempts,
        )


class CacheEventPublic(PublicModel):
    object: Literal["teacher_cache.event"] = "teacher_cache.event"
    id: int
    created_at: int
    level: str
    type: str
    message: str
    data: dict[str, Any] | None

    @classmethod
    def from_row(cls, row: TeacherCacheEvent) -> CacheEventPublic:
        return cls(
            id=row.id,
            created_at=unix(row.created_at) or 0,
            level=row.level,
            type=row.type,
            message=row.message,
            data=row.data,
        )
