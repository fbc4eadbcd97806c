"""The model catalog (OpenAI's /v1/models): presets, the models root, your distilled models."""

from __future__ import annotations

import re
from pathlib import Path

from fastapi import APIRouter, Query
from fastapi.responses import StreamingResponse

from akl_core import models as presets
from akl_core.spec import MODEL_REF_PATTERN
from api.core import catalog, distilled
from api.core.errors import ApiError, error_responses
from api.crud import history as history_crud
from api.deps import CurrentTenant, SessionDep, SettingsDep
from api.routes.checkpoints import ARCHIVE_RESPONSES, ArchiveFormat, archive
from api.schemas.common import Page
from api.schemas.models import ModelPublic

router = APIRouter(prefix="/models", tags=["models"])
MAX_REF_CHARS = 512  # as a job spec takes them


@router.get("")
def list_models(tenant: CurrentTenant, session: SessionDep, settings: SettingsDep) -> Page[ModelPublic]:
    """Every model a job can name: presets (prepared or not), the models root, your distilled models."""
    assert settings.models_root is not None
    root = Path(settings.models_root).resolve()
    facts = [catalog.preset(name, root) for name in presets.PRESETS]
    facts += catalog.local_models(root)
    facts += distilled.tenant_models(session=session, tenant_id=tenant.id)
    return Page[ModelPublic].of([ModelPublic.model_validate(f) for f in facts], False)


def find_model(
    model: str, *, session: SessionDep, tenant_id: int, settings: SettingsDep
) -> catalog.ModelFacts:
    """The catalog entry of ``model``; 404 when there is none (another tenant's ft: model too)."""
    assert settings.models_root is not None
    root = Path(settings.models_root).resolve()
    not_found = ApiError(404, f"model {model!r} not found", param="model", code="model_not_found")
    if model.startswith(distilled.PREFIX):
        found = distilled.find(model, session=session, tenant_id=tenant_id)
        if found is None:
            raise not_found
        return distilled.describe(*found)
    if model.startswith("preset:"):
        name = model.split(":", 1)[1]
        if name not in presets.PRESETS:
            raise not_found
        return catalog.preset(name, root)
    parts = model.split("/")
    if not re.match(MODEL_REF_PATTERN, model) or len(model) > MAX_REF_CHARS:
        raise not_found
    if any(part in ("", ".", "..") or part.startswith(".") for part in parts):
        raise not_found
    try:
        path = (root / model).resolve()
        if not path.is_relative_to(root) or not path.is_dir():
            raise not_found
        return catalog.describe(path, model, "local")
    except (catalog.ConfigError, OSError):  # OSError: a name longer than the file system takes
        raise not_found from None


@router.get("/{model:path}/content", response_class=StreamingResponse, responses=ARCHIVE_RESPONSES)
def download_model(
    model: str,
    tenant: CurrentTenant,
    session: SessionDep,
    archive_format: ArchiveFormat = Query("tar.gz", alias="format"),
) -> StreamingResponse:
    """Download one of your distilled models (ft:...) as a tar.gz (or tar) archive."""
    found = distilled.find(model, session=session, tenant_id=tenant.id)
    if found is None:
        raise ApiError(404, f"model {model!r} not found among your distilled models", param="model")
    job = found[0]
    checkpoint = history_crud.final_checkpoint(session=session, job_id=job.id)
    assert checkpoint is not None  # distilled.find found its directory
    return archive(job, checkpoint, "final", archive_format)


@router.get("/{model:path}", responses=error_responses(404))
def get_model(model: str, tenant: CurrentTenant, session: SessionDep, settings: SettingsDep) -> ModelPublic:
    """One model: architecture, layers, vocabulary, parameters, tokenizer digest, roles."""
    return ModelPublic.model_validate(
        find_model(model, session=session, tenant_id=tenant.id, settings=settings)
    )
