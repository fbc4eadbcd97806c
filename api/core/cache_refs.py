"""Check teacher-cache requests, and jobs that distill from a cache, before anything is queued.

Two directions, both without torch:
- building: the teacher and data references are checked as a job's are (``api.core.job_refs``),
  and ``top_k`` must not exceed the teacher's vocabulary (read from its ``config.json``);
- using: a job whose teacher is ``cache:<id>`` must match the cache's manifest - same training
  data (reference and digest), data format and length settings, and a student tokenizer equal to
  the one the cache was built with. Anything else is a 422 that names the job's field.
"""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from akl_core.data import DataError, resolve_data_path  # torch-free at import
from akl_core.spec import JobSpec
from api.core import catalog
from api.core.config import Settings
from api.core.job_refs import (
    RefError,
    check_device,
    check_model_ref,
    check_student_layers,
    resolve_data_ref,
)
from api.crud import teacher_caches as caches_crud
from api.db.models import SUCCEEDED, TeacherCache
from api.schemas.teacher_caches import TeacherCacheCreate


def teacher_vocab(ref: str, settings: Settings) -> int | None:
    """The teacher's vocabulary size from its config.json, or None when it cannot be read here (a
    preset the worker prepares on demand, a hub model): the runner then checks k <= V itself."""
    assert settings.models_root is not None
    root = Path(settings.models_root).resolve()
    if ref.startswith("hf:"):
        return None
    name = ref.split(":", 1)[1] if ref.startswith("preset:") else ref
    path = (root / name).resolve()
    if not (path / "config.json").is_file():
        return None
    try:
        return catalog.vocab_size(catalog.read_config(path))
    except catalog.ConfigError as exc:
        raise RefError(422, "teacher", f"model {ref!r}: {exc}") from None


def resolve_cache_request(
    body: TeacherCacheCreate, *, session: Session, tenant_id: int, settings: Settings
) -> dict[str, Any]:
    """Check a cache build request; return its resolved spec (file ids -> paths). Raises RefError."""
    if body.build.device == "cuda" and not settings.gpu_workers:
        raise RefError(
            422, "build.device", "'cuda' but no worker of this service has a GPU; use 'auto' or 'cpu'"
        )
    check_model_ref(body.teacher, "teacher", settings)
    vocab = teacher_vocab(body.teacher, settings)
    if vocab is not None and body.top_k > vocab:
        raise RefError(422, "top_k", f"{body.top_k} is more than the teacher's vocabulary of {vocab} tokens")
    resolved = copy.deepcopy(body.model_dump(mode="json"))
    data = resolved["data"]
    data["train"] = resolve_data_ref(
        body.data.train, "data.train", "train", session=session, tenant_id=tenant_id
    )
    if body.data.validation is not None:
        data["validation"] = resolve_data_ref(
            body.data.validation, "data.validation", "validation", session=session, tenant_id=tenant_id
        )
    return resolved


def cache_id_of(teacher: str) -> str | None:
    """``cache-...`` for a teacher reference ``cache:cache-...``, else None."""
    if not teacher.startswith(caches_crud.CACHE_REF_PREFIX):
        return None
    return teacher[len(caches_crud.CACHE_REF_PREFIX) :]


def usable_cache(spec: JobSpec, *, session: Session, tenant_id: int) -> TeacherCache:
    """The tenant's built cache that ``spec.teacher`` names. A cache still building (or one that
    failed) is a 409: the job is not queued behind it (README, "Teacher caches")."""
    cache_id = cache_id_of(spec.teacher) or ""
    if not cache_id.startswith("cache-") or "/" in cache_id:
        raise RefError(422, "teacher", "name a teacher cache by its id: cache:cache-...")
    row = caches_crud.get_cache(session=session, tenant_id=tenant_id, cache_id=cache_id)
    if row is None:
        raise RefError(404, "teacher", f"teacher cache {cache_id!r} not found")
    if row.status != SUCCEEDED or not row.manifest:
        raise RefError(
            409,
            "teacher",
            f"teacher cache {cache_id} is {row.status}, not built; submit the job once it has succeeded",
        )
    return row


def check_against_manifest(spec: JobSpec, row: TeacherCache, settings: Settings) -> None:
    """The job must train on what the cache holds: same data, format and lengths, same tokenizer."""
    built = row.spec["data"]
    manifest = row.manifest or {}
    same = (
        ("data.train", spec.data.train, built["train"]),
        ("data.format", spec.data.format, built.get("format", "auto")),
        ("training.max_length", spec.training.max_length, built["max_length"]),
        ("training.max_prompt_length", spec.training.max_prompt_length, built["max_prompt_length"]),
    )
    for field, wanted, cached in same:
        if wanted != cached:
            raise RefError(
                422, field, f"{wanted!r} differs from teacher cache {row.id}, built with {cached!r}"
            )
    if spec.data.validation is not None and spec.data.validation != built.get("validation"):
        raise RefError(
            422,
            "data.validation",
            f"{spec.data.validation!r} differs from teacher cache {row.id}, built with "
            f"{built.get('validation')!r}; omit it or name the cache's",
        )
    check_student_tokenizer(spec, row, manifest, settings)


def check_student_tokenizer(
    spec: JobSpec, row: TeacherCache, manifest: dict[str, Any], settings: Settings
) -> None:
    """truncate and config students take the cache's teacher's tokenizer. A pretrained student's
    vocabulary size must be the cache's (read from config.json, without torch); its full
    tokenizer digest is compared with the manifest's when the trainer loads it (tokenizer_mismatch)."""
    if spec.student.init != "pretrained" or spec.student.model is None:
        return
    wanted = manifest.get("vocab_size")
    got = teacher_vocab(spec.student.model, settings)
    if isinstance(wanted, int) and got is not None and wanted != got:
        raise RefError(
            422,
            "student.model",
            f"its vocabulary has {got} tokens but teacher cache {row.id} stores ids of a {wanted}-token "
            "vocabulary; the student must share the cache's tokenizer",
        )


def check_data_digest(resolved_train: str, manifest: dict[str, Any], row: TeacherCache) -> None:
    """The training file's bytes are the ones the cache was built on (sha256 in the manifest)."""
    splits = manifest.get("splits")
    train = splits.get("train") if isinstance(splits, dict) else None
    wanted = train.get("sha256") if isinstance(train, dict) else None
    if not isinstance(wanted, str):
        return
    try:
        got = hashlib.sha256(resolve_data_path(resolved_train).read_bytes()).hexdigest()
    except (OSError, DataError):
        raise RefError(404, "data.train", "the training file is gone") from None
    if got != wanted:
        raise RefError(
            422,
            "data.train",
            f"its bytes (sha256 {got[:12]}) are not those teacher cache {row.id} was built on",
        )


def resolve_cache_job(
    spec: JobSpec, *, session: Session, tenant_id: int, settings: Settings
) -> tuple[dict[str, Any], TeacherCache]:
    """``api.core.job_refs.resolve_spec`` for a job whose teacher is ``cache:<id>``: the resolved
    spec's teacher is ``cache:<path under the caches root>``, what the trainer reads."""
    check_device(spec, settings)
    row = usable_cache(spec, session=session, tenant_id=tenant_id)
    check_against_manifest(spec, row, settings)
    train = resolve_data_ref(spec.data.train, "data.train", "train", session=session, tenant_id=tenant_id)
    check_data_digest(train, row.manifest or {}, row)
    check_student_layers(spec, _layers_or_none(row.teacher, settings))
    if spec.student.model is not None:
        check_model_ref(spec.student.model, "student.model", settings)
    resolved = copy.deepcopy(spec.model_dump(mode="json"))
    assert settings.caches_root is not None
    resolved["teacher"] = caches_crud.relative_ref(row, settings.caches_root)
    built = (row.resolved_spec or row.spec)["data"]  # the paths the cache was built on
    resolved["data"]["train"] = built["train"]
    if spec.data.validation is not None:
        resolved["data"]["validation"] = built["validation"]
    return resolved, row


def _layers_or_none(teacher: str, settings: Settings) -> int | None:
    try:
        return check_model_ref(teacher, "teacher", settings)
    except RefError:  # the cache's teacher may be gone: a config student then fails in the worker
        return None
