"""The job spec's JSON schema, so that clients (the dashboard's submit form) validate before sending."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from api.deps import CurrentTenant
from api.schemas.jobs import JobCreate

router = APIRouter(prefix="/spec", tags=["jobs"])


@router.get("/schema")
def get_spec_schema(tenant: CurrentTenant) -> dict[str, Any]:
    """The JSON schema (draft 2020-12) of the body of POST /v1/jobs."""
    return JobCreate.model_json_schema()
