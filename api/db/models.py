"""SQLAlchemy 2 models: the database is the source of truth (docs/architecture.md#database).

The broker only delivers work; everything a job is (status, lease, progress, history) lives here.
The worker imports these models and ``api.db.session``; nothing here imports torch.
"""

from __future__ import annotations

import secrets
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from akl_core.contract import STEP_METRICS

# Job states. A job is created queued; the worker moves it to running and to one terminal state.
QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
JOB_STATUSES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED)
TERMINAL_STATUSES = (SUCCEEDED, FAILED, CANCELLED)

FILE_PURPOSES = ("train", "validation", "fine-tune")  # fine-tune (OpenAI): train or validation


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def new_id(prefix: str) -> str:
    """Public ids: "job-3f2a...", "file-...", "ckpt-..." (96 random bits, not guessable)."""
    return f"{prefix}-{secrets.token_hex(12)}"


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC in and out on every backend (SQLite stores naive UTC text)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime; use api.db.models.utcnow()")
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


# Deterministic constraint names so Alembic migrations and the models agree on both backends.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSON()}


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ApiKey(Base):
    """Keys look like ``akl-<prefix>-<secret>``; only sha256(key) is stored, looked up by prefix."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    prefix: Mapped[str] = mapped_column(String(32), unique=True)
    key_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)


class File(Base):
    """An uploaded JSONL file, stored at ``path`` (absolute) under the files root."""

    __tablename__ = "files"
    __table_args__ = (Index("ix_files_tenant_id_created_at", "tenant_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True, default=lambda: new_id("file"))
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    filename: Mapped[str] = mapped_column(String(255))
    purpose: Mapped[str] = mapped_column(String(16))
    bytes: Mapped[int] = mapped_column(BigInteger)
    num_examples: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    deleted_at: Mapped[datetime | None] = mapped_column(default=None)


class LeasedRun:
    """The columns a worker-run row (a job, a teacher cache build) shares: its failure, the
    cancel request, and the lease the worker holding it renews with heartbeats (the reconciler
    re-enqueues queued rows and reclaims expired leases; the database is the source of truth)."""

    error_code: Mapped[str | None] = mapped_column(String(64), default=None)
    error_message: Mapped[str | None] = mapped_column(Text, default=None)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(255), default=None)
    lease_expires_at: Mapped[datetime | None] = mapped_column(default=None)
    heartbeat_at: Mapped[datetime | None] = mapped_column(default=None)
    enqueued_at: Mapped[datetime | None] = mapped_column(default=None)
    output_dir: Mapped[str | None] = mapped_column(Text, default=None)


class Job(LeasedRun, Base):
    """A distillation job. ``spec`` is what the client sent (validated, defaults filled);
    ``resolved_spec`` is what the worker runs (file ids replaced by paths), set at enqueue time."""

    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("tenant_id", "idempotency_key"),
        Index("ix_jobs_tenant_id_created_at", "tenant_id", "created_at"),
        Index("ix_jobs_status", "status"),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True, default=lambda: new_id("job"))
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    status: Mapped[str] = mapped_column(String(16), default=QUEUED)
    spec: Mapped[dict[str, Any]] = mapped_column()
    resolved_spec: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    metadata_: Mapped[dict[str, Any] | None] = mapped_column("metadata", default=None)
    idempotency_key: Mapped[str | None] = mapped_column(String(255), default=None)
    queue: Mapped[str] = mapped_column(String(32), default="gpu")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    current_step: Mapped[int] = mapped_column(Integer, default=0)
    total_steps: Mapped[int | None] = mapped_column(Integer, default=None)
    trained_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    current_metrics: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    # The suffix of the distilled model's id, ft:<job id>:<suffix> (OpenAI's `suffix`); the
    # table's last column, after LeasedRun's (sort_order), as in the migrations.
    suffix: Mapped[str | None] = mapped_column(String(64), default=None, sort_order=1)


class JobEvent(Base):
    """Lifecycle and log events, in insertion order (``id`` is the pagination cursor)."""

    __tablename__ = "job_events"
    __table_args__ = (Index("ix_job_events_job_id_id", "job_id", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    level: Mapped[str] = mapped_column(String(16), default="info")
    type: Mapped[str] = mapped_column(String(32))
    message: Mapped[str] = mapped_column(Text, default="")
    data: Mapped[dict[str, Any] | None] = mapped_column(default=None)


# Per-step numbers recorded by the worker from "step" events: one column each below, checked
# against the run contract by tests/api/test_run_contract.py.
METRIC_FIELDS = STEP_METRICS


class JobMetric(Base):
    __tablename__ = "job_metrics"
    __table_args__ = (UniqueConstraint("job_id", "step"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    step: Mapped[int] = mapped_column(Integer)
    loss: Mapped[float | None] = mapped_column(Float, default=None)
    ce: Mapped[float | None] = mapped_column(Float, default=None)
    kd: Mapped[float | None] = mapped_column(Float, default=None)
    lr: Mapped[float | None] = mapped_column(Float, default=None)
    grad_norm: Mapped[float | None] = mapped_column(Float, default=None)
    tokens_per_s: Mapped[float | None] = mapped_column(Float, default=None)
    g_head: Mapped[float | None] = mapped_column(Float, default=None)
    g_tail: Mapped[float | None] = mapped_column(Float, default=None)
    w_head: Mapped[float | None] = mapped_column(Float, default=None)
    fkl: Mapped[float | None] = mapped_column(Float, default=None)
    rkl: Mapped[float | None] = mapped_column(Float, default=None)
    head_size: Mapped[float | None] = mapped_column(Float, default=None)
    trained_tokens: Mapped[int | None] = mapped_column(BigInteger, default=None)
    created_at: Mapped[datetime | None] = mapped_column(default=None)  # when the step ended


class JobEvaluation(Base):
    __tablename__ = "job_evaluations"
    __table_args__ = (Index("ix_job_evaluations_job_id_step", "job_id", "step"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    step: Mapped[int] = mapped_column(Integer)
    metrics: Mapped[dict[str, Any]] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class JobCheckpoint(Base):
    """A saved model directory; ``path`` is relative to the job's ``output_dir``."""

    __tablename__ = "job_checkpoints"
    __table_args__ = (UniqueConstraint("job_id", "path"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True, default=lambda: new_id("ckpt"))
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    step: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    is_final: Mapped[bool] = mapped_column(Boolean, default=False)


# Webhooks (issue 13, section 3; api/webhooks/). A terminal job writes one outbox row per
# subscribed webhook in its own transaction; the deliverer in the API claims rows with a lease.
DELIVERY_PENDING, DELIVERY_DELIVERED, DELIVERY_FAILED = "pending", "delivered", "failed"


class Webhook(Base):
    """A tenant's endpoint. ``secret`` (``whsec_...``) signs every delivery, so it is stored as is;
    the API shows it once, at creation."""

    __tablename__ = "webhooks"
    __table_args__ = (Index("ix_webhooks_tenant_id_created_at", "tenant_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True, default=lambda: new_id("wh"))
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    url: Mapped[str] = mapped_column(Text)
    events: Mapped[list[str]] = mapped_column(JSON)
    secret: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class WebhookDelivery(Base):
    """One event for one webhook (the outbox row). ``id`` is the ``webhook-id`` header, the same on
    every attempt; ``body`` is the exact JSON signed and sent."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        Index("ix_webhook_deliveries_status_next_attempt_at", "status", "next_attempt_at"),
        Index("ix_webhook_deliveries_webhook_id", "webhook_id"),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True, default=lambda: new_id("msg"))
    webhook_id: Mapped[str] = mapped_column(ForeignKey("webhooks.id", ondelete="CASCADE"))
    event_type: Mapped[str] = mapped_column(String(64))
    subject_id: Mapped[str] = mapped_column(String(64))  # the job (later: the teacher cache)
    body: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), default=DELIVERY_PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    lease_owner: Mapped[str | None] = mapped_column(String(255), default=None)
    lease_expires_at: Mapped[datetime | None] = mapped_column(default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)


class WebhookAttempt(Base):
    """One HTTP try of a delivery: ``status_code`` is None when no answer came (refused, timeout)."""

    __tablename__ = "webhook_attempts"
    __table_args__ = (
        Index("ix_webhook_attempts_webhook_id_id", "webhook_id", "id"),
        Index("ix_webhook_attempts_delivery_id", "delivery_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    webhook_id: Mapped[str] = mapped_column(ForeignKey("webhooks.id", ondelete="CASCADE"))
    delivery_id: Mapped[str] = mapped_column(ForeignKey("webhook_deliveries.id", ondelete="CASCADE"))
    event_type: Mapped[str] = mapped_column(String(64))
    attempt: Mapped[int] = mapped_column(Integer)
    succeeded: Mapped[bool] = mapped_column(Boolean)
    status_code: Mapped[int | None] = mapped_column(Integer, default=None)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    duration_ms: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class TeacherCache(LeasedRun, Base):
    """A stored top-k teacher distribution (akl_core.teacher_cache), built by a worker on the same
    lifecycle as a job (status, lease, attempts, events). ``spec`` is the request as validated;
    ``resolved_spec`` has file ids replaced by paths (what the cache runner reads). ``output_dir``
    is the cache directory, ``{caches_root}/{tenant_id}/{id}``; ``manifest`` is its manifest once
    built. A deleted cache keeps its row (jobs name it) with ``deleted_at`` set."""

    __tablename__ = "teacher_caches"
    __table_args__ = (
        Index("ix_teacher_caches_tenant_id_created_at", "tenant_id", "created_at"),
        Index("ix_teacher_caches_status", "status"),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True, default=lambda: new_id("cache"))
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    status: Mapped[str] = mapped_column(String(16), default=QUEUED)
    teacher: Mapped[str] = mapped_column(String(512))
    top_k: Mapped[int] = mapped_column(Integer)
    spec: Mapped[dict[str, Any]] = mapped_column()
    resolved_spec: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    queue: Mapped[str] = mapped_column(String(32), default="gpu")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    deleted_at: Mapped[datetime | None] = mapped_column(default=None)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    tokens: Mapped[int | None] = mapped_column(BigInteger, default=None)
    examples: Mapped[int | None] = mapped_column(BigInteger, default=None)
    bytes: Mapped[int | None] = mapped_column(BigInteger, default=None)
    bytes_per_token: Mapped[float | None] = mapped_column(Float, default=None)
    manifest: Mapped[dict[str, Any] | None] = mapped_column(default=None)


class TeacherCacheEvent(Base):
    """A cache build's lifecycle and log events (``id`` is the pagination cursor)."""

    __tablename__ = "teacher_cache_events"
    __table_args__ = (Index("ix_teacher_cache_events_cache_id_id", "cache_id", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    cache_id: Mapped[str] = mapped_column(ForeignKey("teacher_caches.id", ondelete="CASCADE"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    level: Mapped[str] = mapped_column(String(16), default="info")
    type: Mapped[str] = mapped_column(String(32))
    message: Mapped[str] = mapped_column(Text, default="")
    data: Mapped[dict[str, Any] | None] = mapped_column(default=None)
