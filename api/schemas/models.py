"""The model catalog's entries: OpenAI's model object plus what a distillation needs to know."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from api.core.catalog import ModelFacts
from api.schemas.common import PublicModel

ModelRole = Literal["teacher", "student"]


class ModelPublic(PublicModel):
    object: Literal["model"] = "model"
    id: str = Field(
        description="a model reference a job spec takes: preset:NAME, a directory, ft:JOB[:SUFFIX]"
    )
    created: int
    owned_by: str = Field(description="system (presets, the models root) or user (your distilled models)")
    source: Literal["preset", "local", "distilled"]
    prepared: bool = Field(description="false for a preset the worker builds on first use")
    architecture: str | None
    num_layers: int | None
    vocab_size: int | None
    parameters: int | None = Field(description="estimated from config.json (Llama-shaped decoders)")
    tokenizer_digest: str | None = Field(
        description="sha256 (16 hex) of the tokenizer files; equal vocabularies, equal digests"
    )
    roles: list[ModelRole] = Field(description="teacher needs a tokenizer; any causal LM can be a student")
    download_url: str | None = Field(None, description="a distilled model's archive")

    @model_validator(mode="before")
    @classmethod
    def _from_facts(cls, facts: Any) -> Any:
        if not isinstance(facts, ModelFacts):
            return facts
        mine = facts.source == "distilled"
        return {
            **{name: getattr(facts, name) for name in FACT_FIELDS},
            "owned_by": "user" if mine else "system",
            "download_url": f"/v1/models/{facts.id}/content" if mine else None,
        }


FACT_FIELDS = (
    "id", "created", "source", "prepared", "architecture", "num_layers", "vocab_size", "parameters",
    "tokenizer_digest", "roles",
)  # fmt: skip
