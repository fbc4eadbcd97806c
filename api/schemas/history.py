"""What a job left behind: events, per-step metrics, evaluations, checkpoints."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, model_validator

from api.db.models import JobCheckpoint
from api.schemas.common import PublicModel


class EventPublic(PublicModel):
    object: Literal["distillation.job.event"] = "distillation.job.event"
    id: int
    created_at: int
    level: str
    type: str
    message: str
    data: dict[str, Any] | None


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


class CheckpointPublic(PublicModel):
    object: Literal["distillation.job.checkpoint"] = "distillation.job.checkpoint"
    id: str
    job_id: str
    step: int
    is_final: bool
    created_at: int
    download_url: str

    @model_validator(mode="before")
    @classmethod
    def _from_row(cls, data: Any) -> Any:
        if isinstance(data, JobCheckpoint):
            return {
                **{name: getattr(data, name) for name in ("id", "job_id", "step", "is_final", "created_at")},
                "download_url": checkpoint_url(data),
            }
        return data


def checkpoint_url(row: JobCheckpoint) -> str:
    return f"/v1/jobs/{row.job_id}/checkpoints/{row.id}/content"
