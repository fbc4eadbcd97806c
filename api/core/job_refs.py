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

# The presets and the built-in data splits come from akl_core itself: akl_core.models and
# akl_core.data are torch-free at import (tests/akl_core/test_names.py, tests/api/test_jobs.py).
from akl_core import models
from akl_core.data import BUILTIN_REFS
from akl_core.spec import JobSpec
from api.core import catalog, distilled
from api.core.config import Settings
from api.crud import files as files_crud

# A file uploaded with OpenAI's purpose serves as training or validation data alike.
ANY_PURPOSE = "fine-tune"


class RefError(Exception):
    """A spec names something that does not exist or is not allowed; carries the HTTP status."""

    def __init__(self, status_code: int, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.status_code = status_code
        self.field = field
        self.message = message


def check_model_ref(
    ref: str, field: str, settings: Settings, *, session: Session | None = None, tenant_id: int | None = None
) -> int | None:
    """Refuse what the worker would refuse (akl_core.models.resolve_model_ref) without loading
    torch; return the model's decoder layer count when it can be known here (None for hub models),
    as the model catalog (api/core/catalog.py, GET /v1/models) reports it.

    Presets are prepared by the worker on demand (README, "The job spec"); one that is neither
    prepared nor preparable on this server is refused here. A distilled model (``ft:``) must be a
    succeeded job of this tenant's with its final model still stored."""
    assert settings.models_root is not None
    root = Path(settings.models_root).resolve()
    if ref.startswith(distilled.PREFIX):
        found = None if session is None else distilled.find(ref, session=session, tenant_id=tenant_id or 0)
        if found is None:
            raise RefError(
                404, field, f"model {ref!r} not found: no succeeded job of yours with that final model"
            )
        return _layers(found[1], ref, field)
    if ref.startswith("preset:"):
        name = ref.split(":", 1)[1]
        if name not in models.PRESETS:
            raise RefError(404, field, f"unknown preset {name!r}; known: {', '.join(models.PRESETS)}")
        if (root / name / "config.json").is_file():
            return _layers(root / name, ref, field)
        if not models.can_prepare_preset(name):
            raise RefError(
                422,
                field,
                f"preset {name!r} is not prepared on this server and cannot be prepared on demand; "
                f"an operator runs `akl models prepare {name}`",
            )
        return catalog.preset(name, root).num_layers
    if ref.startswith("hf:"):
        if not settings.allow_hub:
            raise RefError(403, field, "hub models are disabled on this server (AKL_ALLOW_HUB=false)")
        return None
    if any(part.startswith(".") and part not in (".", "..") for part in ref.split("/")):
        # .distilled/ and .hub-cache/ hold copies the service makes; tenants name models by id.
        raise RefError(404, field, f"model {ref!r} not found under the models root")
    path = (root / ref).resolve()
    if path == root:  # '.', './', 'a/..'
        raise RefError(
            422, field, f"model {ref!r} names the models root itself; name a model directory in it"
        )
    if not path.is_relative_to(root):  # a symbolic link inside the root pointing out of it
        raise RefError(422, field, f"model {ref!r} leads outside the models root; name a directory in it")
    try:
        is_dir = path.is_dir()
    except OSError:  # a name longer than the file system takes (ENAMETOOLONG): a 500 before
        is_dir = False
    if not is_dir:
        raise RefError(404, field, f"model {ref!r} not found under the models root")
    return _layers(path, ref, field)


def _layers(folder: Path, ref: str, field: str) -> int | None:
    try:
        return catalog.num_layers(catalog.read_config(folder))
    except catalog.ConfigError as exc:
        raise RefError(422, field, f"model {ref!r}: {exc}") from None


def check_device(spec: JobSpec, settings: Settings) -> None:
    """A cuda job where no worker has a GPU would wait on the gpu queue and fail there (no_gpu)."""
    if spec.resources.device == "cuda" and not settings.gpu_workers:
        raise RefError(
            422,
            "resources.device",
            "'cuda' but no worker of this service has a GPU (AKL_GPU_WORKERS=false); use 'auto' or 'cpu'",
        )


def check_student_layers(spec: JobSpec, teacher_layers: int | None) -> None:
    """truncate keeps num_layers of the teacher's layers; config builds a smaller copy of it."""
    wanted = spec.student.num_layers
    if spec.student.init == "pretrained" or wanted is None or teacher_layers is None:
        return
    if wanted > teacher_layers:
        raise RefError(
            422,
            "student.num_layers",
            f"{wanted} is more than the teacher's {teacher_layers} layers; choose 1..{teacher_layers}",
        )


def resolve_data_ref(ref: str, field: str, purpose: str, *, session: Session, tenant_id: int) -> str:
    """The path the worker reads for ``ref`` (a tenant's file id or a built-in split)."""
    if ref in BUILTIN_REFS:
        return ref
    if not ref.startswith("file-"):
        raise RefError(422, field, f"must be a file id (file-...) or one of {', '.join(BUILTIN_REFS)}")
    row = files_crud.get_file(session=session, tenant_id=tenant_id, file_id=ref)
    if row is None:
        raise RefError(404, field, f"file {ref!r} not found")
    if row.purpose not in (purpose, ANY_PURPOSE):
        raise RefError(422, field, f"file {ref!r} was uploaded with purpose {row.purpose!r}, not {purpose!r}")
    return row.path


def resolve_spec(spec: JobSpec, *, session: Session, tenant_id: int, settings: Settings) -> dict[str, Any]:
    """Check every reference in ``spec``; return the resolved spec (JSON-ready). Raises RefError."""
    check_device(spec, settings)
    teacher_layers = check_model_ref(spec.teacher, "teacher", settings, session=session, tenant_id=tenant_id)
    check_student_layers(spec, teacher_layers)
    if spec.student.model is not None:
        check_model_ref(spec.student.model, "student.model", settings, session=session, tenant_id=tenant_id)
    resolved = copy.deepcopy(spec.model_dump(mode="json"))
    resolved["teacher"] = _runnable(spec.teacher, session=session, tenant_id=tenant_id, settings=settings)
    if spec.student.model is not None:
        resolved["student"]["model"] = _runnable(
            spec.student.model, session=session, tenant_id=tenant_id, settings=settings
        )
    data = resolved["data"]
    data["train"] = resolve_data_ref(
        spec.data.train, "data.train", "train", session=session, tenant_id=tenant_id
    )
    if spec.data.validation is not None:
        data["validation"] = resolve_data_ref(
            spec.data.validation, "data.validation", "validation", session=session, tenant_id=tenant_id
        )
    return resolved


def _runnable(ref: str, *, session: Session, tenant_id: int, settings: Settings) -> str:
    """The reference the runner loads: a distilled model's copy under the models root, else ``ref``."""
    if not ref.startswith(distilled.PREFIX):
        return ref
    found = distilled.find(ref, session=session, tenant_id=tenant_id)
    assert found is not None and settings.models_root is not None  # checked by check_model_ref
    job, folder = found
    return distilled.materialize(folder, models_root=Path(settings.models_root).resolve(), job_id=job.id)
