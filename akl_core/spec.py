"""The distillation job spec, shared by the CLI, the API and the worker.

No torch import here nor in ``akl_core/__init__.py``: the API validates specs without loading torch.
Every field has a default and a bound; pydantic names the offending field in its errors.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from akl_core.names import LossName

# A model reference: "preset:NAME" (tiny, smollm2-135m-instruct), a local directory (resolved under
# the models root), "hf:ORG/NAME" (a hub id, refused unless the operator allows hub downloads), or
# "ft:JOB_ID[:SUFFIX]", a model distilled by the service (the API resolves it; api/core/catalog.py).
MODEL_REF_PATTERN = (
    r"^(preset:[A-Za-z0-9._-]+|hf:[A-Za-z0-9._-]+/[A-Za-z0-9._-]+|ft:[A-Za-z0-9_-]+(:[A-Za-z0-9._-]+)?"
    r"|[A-Za-z0-9._/-]+)$"
)
# A job's teacher may also be a teacher cache: "cache:NAME" under the caches root (CLI) or
# "cache:ID" (API). Such a job never runs the teacher forward (akl_core/cache_spec.py).
TEACHER_REF_PATTERN = r"^(cache:[A-Za-z0-9._/-]+|" + MODEL_REF_PATTERN[2:]


# A student is smaller than its teacher: no size field of a real LLM config exceeds this, and a
# larger one would only make a job that fails (out of memory) on every attempt.
MAX_OVERRIDE = 65_536
FORBIDDEN_OVERRIDES = frozenset({"vocab_size", "model_type", "architectures"})


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


class StudentSpec(_Strict):
    """How the student starts."""

    init: Literal["pretrained", "truncate", "config"] = Field(
        "truncate",
        description="pretrained: load `model`; truncate: keep `num_layers` evenly spaced layers of "
        "the teacher; config: random init from the teacher's config with `config_overrides`.",
    )
    model: str | None = Field(
        None, max_length=512, pattern=MODEL_REF_PATTERN, description="Model reference (init=pretrained)."
    )
    num_layers: int | None = Field(None, ge=1, le=256, description="Layers kept (truncate / config).")
    config_overrides: dict[str, int | float | str | bool] = Field(
        default_factory=dict, description="Config fields changed for init=config, e.g. hidden_size."
    )

    @model_validator(mode="after")
    def _check_init(self) -> StudentSpec:
        if self.init == "pretrained" and not self.model:
            raise ValueError("student.model is required when student.init is 'pretrained'")
        if self.init == "truncate" and self.num_layers is None:
            raise ValueError("student.num_layers is required when student.init is 'truncate'")
        if len(self.config_overrides) > 64:
            raise ValueError("student.config_overrides has more than 64 entries")
        for key, value in self.config_overrides.items():
            if key in FORBIDDEN_OVERRIDES:
                raise ValueError(
                    f"student.config_overrides.{key} cannot be changed: the student shares the teacher's vocabulary and architecture"
                )
            if (
                isinstance(value, (int, float))
                and not isinstance(value, bool)
                and not -MAX_OVERRIDE <= value <= MAX_OVERRIDE
            ):
                raise ValueError(f"student.config_overrides.{key} must lie within +-{MAX_OVERRIDE}")
        return self


class DataSpec(_Strict):
    """Training and validation data: JSONL paths (CLI), file ids (API), or a built-in split ("demo:SPLIT", "jargon:SPLIT")."""

    train: str = Field(..., min_length=1, max_length=512)
    validation: str | None = Field(None, min_length=1, max_length=512)
    format: Literal["auto", "dolly", "prompt_response", "messages"] = "auto"
    max_train_examples: int | None = Field(None, ge=1, le=10_000_000)
    max_validation_examples: int | None = Field(None, ge=1, le=1_000_000)


class LossSpec(_Strict):
    name: LossName = "akl"
    kd_ratio: float = Field(0.5, ge=0.0, le=1.0, description="total = (1-r)*CE + r*divergence")
    mu: float = Field(0.5, gt=0.0, lt=1.0, description="AKL head mass")
    # below 0.01 logits / T overflow fp32 and the loss turns NaN within a step or two
    temperature: float = Field(1.0, ge=0.01, le=100.0)
    lam: float = Field(0.1, gt=0.0, lt=1.0, description="skew for skl / srkl")
    beta: float = Field(0.5, gt=0.0, lt=1.0, description="generalized JSD mix")
    chunk_size: int | None = Field(None, ge=1, le=1_048_576, description="tokens per loss chunk")
    fused: bool = Field(False, description="fused lm_head + loss: full logits never materialised")

    @model_validator(mode="after")
    def _sft_ratio(self) -> LossSpec:
        if self.name == "sft":
            self.kd_ratio = 0.0
        return self


class TrainingSpec(_Strict):
    epochs: int = Field(1, ge=1, le=1000)
    max_steps: int | None = Field(None, ge=1, le=10_000_000, description="optimizer steps; wins over epochs")
    batch_size: int = Field(4, ge=1, le=4096, description="examples per micro-batch per process")
    grad_accum: int = Field(1, ge=1, le=1024)
    learning_rate: float = Field(5e-5, gt=0.0, le=1.0)
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0, le=1_000_000)
    weight_decay: float = Field(0.0, ge=0.0, le=1.0)
    max_grad_norm: float = Field(1.0, ge=0.0, le=1e6, description="0 disables clipping")
    max_length: int = Field(256, ge=8, le=32768)
    max_prompt_length: int = Field(128, ge=1, le=32768)
    seed: int = Field(42, ge=0, le=2**31 - 1)
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 autocast on CUDA")
    teacher_dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    gradient_checkpointing: bool = False

    @model_validator(mode="after")
    def _lengths(self) -> TrainingSpec:
        if self.max_prompt_length >= self.max_length:
            raise ValueError("training.max_prompt_length must be smaller than training.max_length")
        return self


class EvaluationSpec(_Strict):
    every_steps: int = Field(0, ge=0, le=10_000_000, description="0: only at the end")
    at_start: bool = Field(False, description="also evaluate the untrained student (an eval at step 0)")
    num_examples: int = Field(32, ge=0, le=100_000, description="0 disables Rouge-L evaluation")
    # 2**64 passed here and failed the job with internal_error after training, in
    # torch.manual_seed (issue 10); 32 bits is what every common generator takes (numpy's too).
    seeds: list[Annotated[int, Field(ge=0, le=2**32 - 1)]] = Field(
        default_factory=lambda: [10, 20, 30, 40, 50], min_length=1, max_length=16
    )
    max_new_tokens: int = Field(64, ge=1, le=4096)
    temperature: float = Field(1.0, ge=0.0, le=10.0, description="0: greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, le=100_000)
    batch_size: int = Field(8, ge=1, le=1024)
    teacher_reference: bool = Field(True, description="also score the teacher once")
    greedy: bool = Field(True, description="also score one greedy decode (rouge_l_greedy)")


class CheckpointSpec(_Strict):
    every_steps: int = Field(0, ge=0, le=10_000_000, description="0: only the final model")
    keep: int = Field(2, ge=1, le=100)


class ResourceSpec(_Strict):
    device: Literal["auto", "cpu", "cuda"] = "auto"
    processes: int = Field(1, ge=1, le=64, description="DDP processes (torchrun) on one machine")


class JobSpec(_Strict):
    """A distillation job: teacher, student, data, loss, hyper-parameters."""

    teacher: str = Field(..., max_length=512, pattern=TEACHER_REF_PATTERN)
    student: StudentSpec = Field(default_factory=lambda: StudentSpec(num_layers=2))
    data: DataSpec
    loss: LossSpec = Field(default_factory=LossSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    checkpointing: CheckpointSpec = Field(default_factory=CheckpointSpec)
    resources: ResourceSpec = Field(default_factory=ResourceSpec)

    @field_validator("teacher")
    @classmethod
    def _no_traversal(cls, v: str) -> str:
        return check_model_ref(v, "teacher")

    @model_validator(mode="after")
    def _student_ref(self) -> JobSpec:
        if self.student.model is not None:
            check_model_ref(self.student.model, "student.model")
        return self


def check_model_ref(ref: str, field: str) -> str:
    """Refuse references that could escape the models (or caches) root ('..', absolute paths)."""
    body = ref.split(":", 1)[1] if ref.startswith(("preset:", "hf:", "cache:")) else ref
    if ref.startswith("/") or body.startswith("/") or any(part == ".." for part in body.split("/")):
        root = "caches root" if ref.startswith("cache:") else "models root"
        raise ValueError(
            f"{field}: '..' and absolute paths are not allowed; name a directory under the {root}"
        )
    return ref


def load_spec(data: dict[str, Any]) -> JobSpec:
    """Validate a plain dict (from YAML or JSON) into a JobSpec."""
    return JobSpec.model_validate(data)


def total_steps(spec: JobSpec, num_examples: int, world_size: int) -> int:
    """Optimizer steps of a run: ``max_steps``, or ``epochs`` passes over ``num_examples`` in
    global batches. Here, without torch, so the API can show it from submission."""
    t = spec.training
    if t.max_steps is not None:
        return t.max_steps
    return t.epochs * math.ceil(num_examples / (t.batch_size * t.grad_accum * world_size))
