"""Teacher caches over HTTP: the build request, the public object, its events."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from akl_core.spec import MODEL_REF_PATTERN, check_model_ref
from api.db.models import TeacherCache, TeacherCacheEvent
from api.schemas.common import PublicModel, unix

CacheStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
MIN_TOP_K, MAX_TOP_K, DEFAULT_TOP_K = 1, 1024, 64


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CacheData(_Strict):
    """The data the teacher reads: file ids or built-in splits, exactly as a job's ``data``; the
    length settings are the ones a job that trains from the cache must use."""

    train: str = Field(..., min_length=1, max_length=512)
    validation: str | None = Field(None, min_length=1, max_length=512)
    format: Literal["auto", "dolly", "prompt_response", "messages"] = "auto"
    max_length: int = Field(256, ge=8, le=32768)
    max_prompt_length: int = Field(128, ge=1, le=32768)

    @model_validator(mode="after")
    def _lengths(self) -> CacheData:
        if self.max_prompt_length >= self.max_length:
            raise ValueError("data.max_prompt_length must be smaller than data.max_length")
        return self


class TeacherCacheCreate(_Strict):
    """``POST /v1/teacher_caches``: the teacher's top-k distribution over ``data``, stored once."""

    teacher: str = Field(..., max_length=512, pattern=MODEL_REF_PATTERN)
    data: CacheData
    top_k: int = Field(
        DEFAULT_TOP_K, ge=MIN_TOP_K, le=MAX_TOP_K, description="teacher tokens kept per position"
    )

    @field_validator("teacher")
    @classmethod
    def _no_traversal(cls, v: str) -> str:
        if v.startswith("cache:"):
            raise ValueError("teacher: a cache is built from a model, not from another cache")
        return check_model_ref(v, "teacher")


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
            status=row.status,  # type: ignore[arg-type]
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
