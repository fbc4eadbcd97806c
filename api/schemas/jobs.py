from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from akl_core.spec import JobSpec
from api.core.progress import eta_seconds
from api.db.models import Job
from api.schemas.common import PublicModel

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]

MAX_METADATA_PAIRS = 16


def bounded_metadata(value: dict[str, str] | None) -> dict[str, str] | None:
    """Up to 16 pairs, keys of 1..64 characters, values of at most 512 (OpenAI's bounds)."""
    if value is None:
        return None
    if len(value) > MAX_METADATA_PAIRS:
        raise ValueError(f"at most {MAX_METADATA_PAIRS} metadata pairs")
    for key, item in value.items():
        if not 1 <= len(key) <= 64 or len(item) > 512:
            raise ValueError("metadata keys are 1..64 characters and values at most 512")
    return value


class JobCreate(JobSpec):
    """The job spec (akl_core.spec.JobSpec) plus optional metadata: up to 16 string pairs."""

    metadata: dict[str, str] | None = Field(None, description="up to 16 pairs; keys <= 64, values <= 512")

    @field_validator("metadata")
    @classmethod
    def _bounded(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        return bounded_metadata(value)

    def spec(self) -> JobSpec:
        return JobSpec.model_validate(self.model_dump(exclude={"metadata"}))


class JobError(PublicModel):
    code: str
    message: str


class JobPublic(PublicModel):
    object: Literal["distillation.job"] = "distillation.job"
    id: str
    status: JobStatus
    created_at: int
    started_at: int | None
    finished_at: int | None
    teacher: str
    training_file: str
    validation_file: str | None
    spec: dict[str, Any]
    metadata: dict[str, str] | None
    queue: str
    progress: float
    current_step: int
    total_steps: int | None = Field(
        description="planned at submission; the runner confirms it when it starts"
    )
    eta_seconds: int | None = Field(description="a running job's time left, from its recent seconds per step")
    trained_tokens: int
    metrics: dict[str, Any] | None = Field(description="the latest step's metrics")
    error: JobError | None
    cancel_requested: bool
    attempts: int
    model_url: str | None = Field(description="download of the final model, once the job succeeded")

    @model_validator(mode="before")
    @classmethod
    def _from_row(cls, row: Any) -> Any:
        """Built with ``JobPublic.model_validate(job_row)``: the row's columns plus what derives from them."""
        if not isinstance(row, Job):
            return row
        data = row.spec.get("data", {})
        return {
            **{name: getattr(row, name) for name in ROW_FIELDS},
            "teacher": row.spec.get("teacher", ""),
            "training_file": data.get("train", ""),
            "validation_file": data.get("validation"),
            "metadata": row.metadata_,
            "eta_seconds": eta_seconds(row),
            "metrics": row.current_metrics,
            "error": job_error(row),
            "model_url": f"/v1/jobs/{row.id}/model" if row.status == "succeeded" else None,
        }


# JobPublic's fields that are the job row's columns of the same name.
ROW_FIELDS = (
    "id", "status", "created_at", "started_at", "finished_at", "spec", "queue", "progress",
    "current_step", "total_steps", "trained_tokens", "cancel_requested", "attempts",
)  # fmt: skip


def job_error(row: Job) -> JobError | None:
    if not (row.error_code or row.error_message):
        return None
    return JobError(code=row.error_code or "internal_error", message=row.error_message or "")
