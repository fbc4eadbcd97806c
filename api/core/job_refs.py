"""Check what a job spec names before it is queued: data files and model references.

The spec (akl_core.spec) already checks the syntax and refuses '..' and absolute paths; here we
check that the names exist for this tenant and this deployment, and produce ``resolved_spec``:
the spec with file ids replaced by the stored paths, which is what the worker runs.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from akl_core.data import BUILTIN_REFS  # torch-free at import
from akl_core.spec import JobSpec
from api.core.config import Settings
from api.crud import files as files_crud

# The presets akl_core.models knows (docs/architecture.md#model-references); kept here because
# akl_core.models imports torch, which the API must not.
KNOWN_PRESETS = ("tiny", "smollm2-135m-instruct")


class RefError(Exception):
    """A spec names something that does not exist or is not allowed; carries the HTTP status."""

    def __init__(self, status_code: int, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.status_code = status_code
        self.field = field
        self.message = message


def check_model_ref(ref: str, field: str, settings: Settings) -> None:
    if ref.startswith("preset:"):
        name = ref.split(":", 1)[1]
        if name not in KNOWN_PRESETS:
            raise RefError(404, field, f"unknown preset {name!r}; known: {', '.join(KNOWN_PRESETS)}")
        return
    if ref.startswith("hf:"):
        if not settings.allow_hub:
            raise RefError(403, field, "hub models are disabled on this server (AKL_ALLOW_HUB=false)")
        return
    assert settings.models_root is not None
    root = Path(settings.models_root).resolve()
    path = (root / ref).resolve()
    if not path.is_relative_to(root):  # a symbolic link inside the root pointing out of it
        raise RefError(422, field, f"model {ref!r} leads outside the models root; name a directory in it")
    if not path.is_dir():
        raise RefError(404, field, f"model {ref!r} not found under the models root")


def resolve_data_ref(ref: str, field: str, purpose: str, *, session: Session, tenant_id: int) -> str:
    """The path the worker reads for ``ref`` (a tenant's file id or a built-in split)."""
    if ref in BUILTIN_REFS:
        return ref
    if not ref.startswith("file-"):
        raise RefError(422, field, f"must be a file id (file-...) or one of {', '.join(BUILTIN_REFS)}")
    row = files_crud.get_file(session=session, tenant_id=tenant_id, file_id=ref)
    if row is None:
        raise RefError(404, field, f"file {ref!r} not found")
    if row.purpose != purpose:
        raise RefError(422, field, f"file {ref!r} was uploaded with purpose {row.purpose!r}, not {purpose!r}")
    return row.path


def resolve_spec(spec: JobSpec, *, session: Session, tenant_id: int, settings: Settings) -> dict[str, Any]:
    """Check every reference in ``spec``; return the resolved spec (JSON-ready). Raises RefError."""
    check_model_ref(spec.teacher, "teacher", settings)
    if spec.student.model is not None:
        check_model_ref(spec.student.model, "student.model", settings)
    resolved = copy.deepcopy(spec.model_dump(mode="json"))
    data = resolved["data"]
    data["train"] = resolve_data_ref(
        spec.data.train, "data.train", "train", session=session, tenant_id=tenant_id
    )
    if spec.data.validation is not None:
        data["validation"] = resolve_data_ref(
            spec.data.validation, "data.validation", "validation", session=session, tenant_id=tenant_id
        )
    return resolved
