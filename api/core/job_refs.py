"""Check what a job spec names before it is queued: data files and model references.

The spec (akl_core.spec) already checks the syntax and refuses '..' and absolute paths; here we
check that the names exist for this tenant and this deployment, and produce ``resolved_spec``:
the spec with file ids replaced by the stored paths, which is what the worker runs.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

# The presets and the built-in data splits come from akl_core itself: akl_core.models and
# akl_core.data are torch-free at import (tests/akl_core/test_names.py, tests/api/test_jobs.py).
from akl_core import models
from akl_core.data import BUILTIN_REFS
from akl_core.spec import JobSpec
from api.core.config import Settings
from api.crud import files as files_crud

MAX_CONFIG_BYTES = 1024 * 1024  # a model's config.json is a few KB; more is not a model config
# Where configs of common architectures keep their decoder layer count.
LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


class RefError(Exception):
    """A spec names something that does not exist or is not allowed; carries the HTTP status."""

    def __init__(self, status_code: int, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.status_code = status_code
        self.field = field
        self.message = message


def check_model_ref(ref: str, field: str, settings: Settings) -> int | None:
    """Refuse what the worker would refuse (akl_core.models.resolve_model_ref) without loading
    torch; return the model's decoder layer count when it can be known here (None for hub models).

    Presets are prepared by the worker on demand (README, "The job spec"); one that is neither
    prepared nor preparable on this server is refused here."""
    assert settings.models_root is not None
    root = Path(settings.models_root).resolve()
    if ref.startswith("preset:"):
        name = ref.split(":", 1)[1]
        if name not in models.PRESETS:
            raise RefError(404, field, f"unknown preset {name!r}; known: {', '.join(models.PRESETS)}")
        if (root / name / "config.json").is_file():
            return _layers(_read_config(root / name, ref, field))
        if not models.can_prepare_preset(name):
            raise RefError(
                422,
                field,
                f"preset {name!r} is not prepared on this server and cannot be prepared on demand; "
                f"an operator runs `akl models prepare {name}`",
            )
        return models.PRESET_LAYERS[name]
    if ref.startswith("hf:"):
        if not settings.allow_hub:
            raise RefError(403, field, "hub models are disabled on this server (AKL_ALLOW_HUB=false)")
        return None
    path = (root / ref).resolve()
    if path == root:  # '.', './', 'a/..'
        raise RefError(
            422, field, f"model {ref!r} names the models root itself; name a model directory in it"
        )
    if not path.is_relative_to(root):  # a symbolic link inside the root pointing out of it
        raise RefError(422, field, f"model {ref!r} leads outside the models root; name a directory in it")
    if not path.is_dir():
        raise RefError(404, field, f"model {ref!r} not found under the models root")
    return _layers(_read_config(path, ref, field))


def _read_config(path: Path, ref: str, field: str) -> dict[str, Any]:
    config = path / "config.json"
    if not config.is_file():
        raise RefError(422, field, f"model {ref!r} has no config.json: not a model directory")
    try:
        if config.stat().st_size > MAX_CONFIG_BYTES:
            raise ValueError("larger than 1 MiB")
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise RefError(
            422, field, f"model {ref!r}: config.json is unreadable ({type(exc).__name__})"
        ) from None
    if not isinstance(data, dict):
        raise RefError(422, field, f"model {ref!r}: config.json is not a JSON object")
    return data


def _layers(config: dict[str, Any]) -> int | None:
    """Decoder layers of a config (multimodal configs nest them in text_config); None if unknown."""
    for scope in (config, config.get("text_config")):
        if isinstance(scope, dict):
            for key in LAYER_KEYS:
                value = scope.get(key)
                if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                    return value
    return None


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
    if row.purpose != purpose:
        raise RefError(422, field, f"file {ref!r} was uploaded with purpose {row.purpose!r}, not {purpose!r}")
    return row.path


def resolve_spec(spec: JobSpec, *, session: Session, tenant_id: int, settings: Settings) -> dict[str, Any]:
    """Check every reference in ``spec``; return the resolved spec (JSON-ready). Raises RefError."""
    check_device(spec, settings)
    check_student_layers(spec, check_model_ref(spec.teacher, "teacher", settings))
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
