"""What a job left behind: events, per-step metrics, evaluations, checkpoints."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel

from api.db.models import JobCheckpoint, JobEvaluation, JobEvent
from api.schemas.common import PublicModel, unix


class EventPublic(PublicModel):
    object: Literal["distillation.job.event"] = "distillation.job.event"
    id: int
    created_at: int
    level: str
    type: str
    message: str
    data: dict[str, Any] | None

    @classmethod
    def from_row(cls, row: JobEvent) -> EventPublic:
        return cls(
            id=row.id,
            created_at=unix(row.created_at) or 0,
            level=row.level,
            type=row.type,
            message=row.message,
            data=row.data,
        )


class MetricsPublic(BaseModel):
    """Numbers only (its job id comes from the path): not a PublicModel, whose walk over up to
    100 000 points would cost more than the query."""

    object: Literal["distillation.job.metrics"] = "distillation.job.metrics"
    job_id: str
    fields: list[str]
    total_points: int
    data: list[dict[str, float | int | None]]


class EvaluationPublic(PublicModel):
    object: Literal["distillation.job.evaluation"] = "distillation.job.evaluation"
    step: int
    created_at: int
    metrics: dict[str, Any]

    @classmethod
    def from_row(cls, row: JobEvaluation) -> EvaluationPublic:
        return cls(step=row.step, created_at=unix(row.created_at) or 0, metrics=row.metrics)


class CheckpointPublic(PublicModel):
    object: Literal["distillation.job.checkpoint"] = "distillation.job.checkpoint"
    id: str
    job_id: str
    step: int
    is_final: bool
    created_at: int
    download_url: str

    @classmethod
    def from_row(cls, row: JobCheckpoint) -> CheckpointPublic:
        return cls(
            id=row.id,
            job_id=row.job_id,
            step=row.step,
            is_final=row.is_final,
            created_at=unix(row.created_at) or 0,
            download_url=f"/v1/jobs/{row.job_id}/checkpoints/{row.id}/content",
        )
