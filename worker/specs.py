"""The spec the runner gets: the job's spec with uploaded file ids replaced by absolute paths."""

from __future__ import annotations

import copy
from typing import Any

from sqlalchemy import select

from api.db.models import File
from worker.leases import ClaimedJob, SessionFactory

FILE_ID_PREFIX = "file-"
DATA_FILE_FIELDS = ("train", "validation")


class SpecError(ValueError):
    """The job cannot run as submitted; ``code`` is a stable error code for the job row."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def resolve_spec(session_factory: SessionFactory, job: ClaimedJob) -> dict[str, Any]:
    """``resolved_spec`` when the API stored one, else ``spec``; any file id left is looked up
    in the files table (same tenant, not deleted) and replaced by the file's path."""
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
    return spec
