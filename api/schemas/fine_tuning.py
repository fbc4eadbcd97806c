"""OpenAI's fine-tuning shapes over our job rows (README, "The OpenAI SDK"): one lifecycle, one
store, two shapes. A ``fine_tuning.job`` is a distillation job read another way.

Request -> spec: ``model`` is the student's starting model, ``method.distillation`` carries the
teacher and any section of the job spec, ``hyperparameters`` and ``seed`` land in ``training``.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from akl_core.spec import MODEL_REF_PATTERN, TrainingSpec
from api.core import distilled
from api.core.progress import eta_seconds
from api.db.models import METRIC_FIELDS, Job, JobCheckpoint, JobEvent, JobMetric
from api.schemas.common import PublicModel, unix
from api.schemas.jobs import JobStatus, bounded_metadata, job_error

DEFAULT_LEARNING_RATE: float = TrainingSpec.model_fields["learning_rate"].default
# Sections of the job spec that method.distillation may carry beside the teacher.
SPEC_SECTIONS = ("student", "data", "loss", "training", "evaluation", "checkpointing", "resources")
EVENT_ID_PREFIX = "ftevent-"
# FineTuningJobPublic's fields that are the job row's columns of the same name.
ROW_FIELDS = (
    "id", "created_at", "finished_at", "status", "trained_tokens", "current_step", "total_steps", "progress",
)  # fmt: skip


class FieldError(ValueError):
    """Two fields of a request disagree; ``param`` names the one to change."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Hyperparameters(_Strict):
    """OpenAI's hyperparameters; "auto" (or leaving one out) keeps the spec's value."""

    n_epochs: Annotated[int, Field(ge=1, le=1000)] | Literal["auto"] | None = Field(
        None, description="training.epochs"
    )
    batch_size: Annotated[int, Field(ge=1, le=4096)] | Literal["auto"] | None = Field(
        None, description="training.batch_size"
    )
    learning_rate_multiplier: Annotated[float, Field(gt=0, le=1000)] | Literal["auto"] | None = Field(
        None, description=f"training.learning_rate = multiplier x {DEFAULT_LEARNING_RATE}"
    )


class Distillation(BaseModel):
    """The teacher, and any section of the job spec (akl_core.spec.JobSpec)."""

    model_config = ConfigDict(extra="forbid")

    teacher: str = Field(..., max_length=512, pattern=MODEL_REF_PATTERN)
    hyperparameters: Hyperparameters | None = Field(None, description="as OpenAI's method objects carry them")
    student: dict[str, Any] | None = None
    data: dict[str, Any] | None = Field(
        None, description="format and limits; the files come from training_file"
    )
    loss: dict[str, Any] | None = None
    training: dict[str, Any] | None = None
    evaluation: dict[str, Any] | None = None
    checkpointing: dict[str, Any] | None = None
    resources: dict[str, Any] | None = None


class Method(_Strict):
    type: Literal["distillation"] = Field(description="this service distills: a teacher is required")
    distillation: Distillation


class FineTuningJobCreate(_Strict):
    model: str = Field(
        ..., max_length=512, pattern=MODEL_REF_PATTERN, description="the student's starting model"
    )
    training_file: str = Field(..., min_length=1, max_length=512)
    validation_file: str | None = Field(None, min_length=1, max_length=512)
    hyperparameters: Hyperparameters | None = None
    method: Method
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    suffix: str | None = Field(None, pattern=distilled.SUFFIX_PATTERN)
    metadata: dict[str, str] | None = None
    integrations: list[Any] | None = Field(None, max_length=0, description="not supported")

    @model_validator(mode="after")
    def _bounded_metadata(self) -> FineTuningJobCreate:
        bounded_metadata(self.metadata)  # the same bounds as POST /v1/jobs
        return self

    def spec_dict(self) -> dict[str, Any]:
        """The job spec this request asks for (validated afterwards as a JobSpec); FieldError
        when two of its fields disagree."""
        method = self.method.distillation
        for key, name in (("train", "training_file"), ("validation", "validation_file")):
            if key in (method.data or {}):
                raise FieldError(f"method.distillation.data.{key}", f"name the file with {name} instead")
        spec: dict[str, Any] = {"teacher": method.teacher}
        for section in SPEC_SECTIONS:
            value = getattr(method, section)
            if value is not None:
                spec[section] = dict(value)
        spec["student"] = self._student(spec.get("student"))
        data = spec.setdefault("data", {})
        data["train"] = self.training_file
        if self.validation_file is not None:
            data["validation"] = self.validation_file
        training = spec.setdefault("training", {})
        hp = method.hyperparameters or self.hyperparameters or Hyperparameters.model_validate({})
        if isinstance(hp.n_epochs, int):
            training["epochs"] = hp.n_epochs
        if isinstance(hp.batch_size, int):
            training["batch_size"] = hp.batch_size
        if isinstance(hp.learning_rate_multiplier, float | int):
            base = training.get("learning_rate", DEFAULT_LEARNING_RATE)
            if isinstance(base, float | int):
                training["learning_rate"] = base * hp.learning_rate_multiplier
        if self.seed is not None:
            training["seed"] = self.seed
        return spec

    def _student(self, student: dict[str, Any] | None) -> dict[str, Any]:
        """``model`` starts the student: loaded as is (init=pretrained), or, for a student built
        from the teacher (init=truncate or config), ``model`` must name that teacher."""
        if student is None:
            return {"init": "pretrained", "model": self.model}
        if student.get("init", "truncate") == "pretrained":
            return {**student, "model": student.get("model") or self.model}
        if self.model != self.method.distillation.teacher:
            raise FieldError(
                "model",
                f"with student.init={student.get('init', 'truncate')!r} the student is built from "
                f"the teacher, so model must name the teacher ({self.method.distillation.teacher!r}); "
                "or use student.init='pretrained' to start from model",
            )
        return student


class FineTuningError(PublicModel):
    code: str
    message: str
    param: str | None = None


class FineTuningJobPublic(PublicModel):
    """OpenAI's ``fine_tuning.job`` over a job row, plus our progress fields."""

    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    id: str
    created_at: int
    finished_at: int | None
    status: JobStatus
    model: str = Field(description="the student's starting model")
    fine_tuned_model: str | None = Field(description="ft:<job id>[:suffix], once the job succeeded")
    training_file: str
    validation_file: str | None
    hyperparameters: dict[str, Any]
    method: dict[str, Any]
    seed: int
    trained_tokens: int | None
    error: FineTuningError | None
    estimated_finish: int | None
    organization_id: str
    result_files: list[str] = []
    integrations: list[Any] | None = None
    metadata: dict[str, str] | None
    user_provided_suffix: str | None
    current_step: int
    total_steps: int | None
    progress: float

    @model_validator(mode="before")
    @classmethod
    def _from_row(cls, row: Any) -> Any:
        if not isinstance(row, Job):
            return row
        spec = row.spec
        training, student = spec.get("training", {}), spec.get("student", {})
        error = job_error(row)
        eta = eta_seconds(row)
        return {
            **{name: getattr(row, name) for name in ROW_FIELDS},
            "model": student.get("model") if student.get("init") == "pretrained" else spec.get("teacher"),
            "fine_tuned_model": distilled.model_id(row) if row.status == "succeeded" else None,
            "training_file": spec.get("data", {}).get("train", ""),
            "validation_file": spec.get("data", {}).get("validation"),
            "hyperparameters": {
                "n_epochs": training.get("epochs"),
                "batch_size": training.get("batch_size"),
                "learning_rate_multiplier": training.get("learning_rate", DEFAULT_LEARNING_RATE)
                / DEFAULT_LEARNING_RATE,
            },
            "method": {"type": "distillation", "distillation": spec},
            "seed": training.get("seed", 0),
            "error": None if error is None else {"code": error.code, "message": error.message},
            "estimated_finish": None if eta is None else int(datetime.now(timezone.utc).timestamp()) + eta,
            "organization_id": f"org-{row.tenant_id}",
            "metadata": row.metadata_,
            "user_provided_suffix": row.suffix,
        }


class FineTuningEventPublic(PublicModel):
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    id: str
    created_at: int
    level: Literal["info", "warn", "error"]
    message: str
    type: Literal["message", "metrics"]
    data: dict[str, Any]

    @model_validator(mode="before")
    @classmethod
    def _from_row(cls, row: Any) -> Any:
        if not isinstance(row, JobEvent):
            return row
        level = {"warning": "warn", "error": "error"}.get(row.level, "info")
        return {
            "id": f"{EVENT_ID_PREFIX}{row.id}",
            "created_at": row.created_at,
            "level": level,
            "message": row.message,
            "type": "metrics" if row.type == "step" else "message",
            "data": {"event": row.type, **(row.data or {})},
        }


def event_cursor(after: str) -> int | None:
    """The event id in an ``after`` cursor ("ftevent-123", or plain "123"); None if malformed."""
    text = after.removeprefix(EVENT_ID_PREFIX)
    return int(text) if text.isdigit() and len(text) <= 10 else None


class FineTuningCheckpointPublic(PublicModel):
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    id: str
    created_at: int
    fine_tuning_job_id: str
    fine_tuned_model_checkpoint: str = Field(description="the final one: the job's fine_tuned_model")
    step_number: int
    metrics: dict[str, float | int | None]
    download_url: str


def checkpoint_public(job: Job, row: JobCheckpoint, metric: JobMetric | None) -> FineTuningCheckpointPublic:
    """A checkpoint with the per-step figures of its step (loss, g_head, g_tail, w_head, ...)."""
    figures: dict[str, float | int | None] = {"step": row.step}
    if metric is not None:
        figures["train_loss"] = metric.loss
        figures.update({name: getattr(metric, name) for name in METRIC_FIELDS})
        figures["trained_tokens"] = metric.trained_tokens
    return FineTuningCheckpointPublic(
        id=row.id,
        created_at=unix(row.created_at) or 0,
        fine_tuning_job_id=job.id,
        fine_tuned_model_checkpoint=distilled.model_id(job) if row.is_final else f"{job.id}:step-{row.step}",
        step_number=row.step,
        metrics=figures,
        download_url=f"/v1/jobs/{job.id}/checkpoints/{row.id}/content",
    )
