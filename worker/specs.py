"""The spec the runner gets: the job's spec with uploaded file ids replaced by absolute paths."""

from __future__ import annotations

import copy
from pathlib import PurePosixPath
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from api.db.models import SUCCEEDED, File, TeacherCache
from worker.leases import ClaimedJob, SessionFactory

FILE_ID_PREFIX = "file-"
CACHE_ID_REF = "cache:cache-"  # a teacher cache named by its id (the API resolves it at submission)
DATA_FILE_FIELDS = ("train", "validation")


class SpecError(ValueError):
    """The job cannot run as submitted; ``code`` is a stable error code for the job row."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def resolve_spec(session_factory: SessionFactory, job: ClaimedJob) -> dict[str, Any]:
    """``resolved_spec`` when the API stored one, else ``spec``; any file id left is looked up
    in the files table (same tenant, not deleted) and replaced by the file's path, and a teacher
    ``cache:<id>`` by ``cache:<path under the caches root>``."""
    spec = copy.deepcopy(job.resolved_spec or job.spec)
    data = spec.get("data") or {}
    with session_factory() as session:
        for field in DATA_FILE_FIELDS:
            ref = data.get(field)
            if not (isinstance(ref, str) and ref.startswith(FILE_ID_PREFIX)):
                continue
            path = session.scalar(
                select(File.path).where(
                    File.id == ref, File.tenant_id == job.tenant_id, File.deleted_at.is_(None)
                )
            )
            if path is None:
                raise SpecError("invalid_data", f"data.{field}: file {ref} does not exist or was deleted")
            data[field] = path
        teacher = spec.get("teacher")
        if isinstance(teacher, str) and teacher.startswith(CACHE_ID_REF):
            spec["teacher"] = _cache_ref(session, job, teacher[len("cache:") :])
    return spec


def _cache_ref(session: Session, job: ClaimedJob, cache_id: str) -> str:
    """``cache:<id>`` -> ``cache:<tenant>/<id>``, the cache's folder under the caches root (what
    the trainer reads); the tenant's cache must be built and not deleted."""
    row = session.get(TeacherCache, cache_id)
    if row is None or row.tenant_id != job.tenant_id or row.deleted_at is not None:
        raise SpecError("invalid_cache", f"teacher: cache {cache_id} does not exist or was deleted")
    if row.status != SUCCEEDED or not row.output_dir:
        raise SpecError("invalid_cache", f"teacher: cache {cache_id} is {row.status}, not built")
    return "cache:" + "/".join(PurePosixPath(row.output_dir).parts[-2:])  # {tenant_id}/{id}
