"""Uploaded JSONL files (validated on upload, size-limited)."""

from __future__ import annotations

from pathlib import PurePath
from typing import Annotated

from fastapi import APIRouter, Form, HTTPException, Query, UploadFile, status

from akl_core.data import validate_jsonl_bytes
from api.core.errors import error_responses
from api.crud import files as files_crud
from api.crud import jobs as jobs_crud
from api.db.models import File
from api.deps import CurrentTenant, SessionDep, SettingsDep
from api.schemas.common import Deleted, Page
from api.schemas.files import FilePublic, FilePurpose

router = APIRouter(prefix="/files", tags=["files"])


@router.post("", status_code=status.HTTP_201_CREATED, responses=error_responses(413, 429))
def upload_file(
    tenant: CurrentTenant,
    session: SessionDep,
    settings: SettingsDep,
    file: UploadFile,
    purpose: Annotated[FilePurpose, Form()],
) -> FilePublic:
    """Upload a JSONL file of examples (multipart: `file`, `purpose` = train or validation)."""
    data = file.file.read(settings.max_upload_bytes + 1)
    if len(data) > settings.max_upload_bytes:
        raise HTTPException(413, f"file larger than {settings.max_upload_bytes} bytes")
    if not data.strip():
        raise HTTPException(400, "file is empty")
    try:
        num_examples = validate_jsonl_bytes(data, settings.max_line_bytes, name="file")
    except (ValueError, UnicodeDecodeError) as exc:
        raise HTTPException(400, f"invalid JSONL: {exc}") from None
    except RecursionError:  # json's decoder on a line nested thousands deep; a 500 otherwise
        raise HTTPException(400, "invalid JSONL: a line is nested too deeply to be an example") from None
    if num_examples < 1:
        raise HTTPException(400, "file has no examples")
    filename = PurePath((file.filename or "upload.jsonl").replace("\\", "/")).name[:255] or "upload.jsonl"
    assert settings.files_root is not None
    row = files_crud.create_file(
        session=session,
        tenant_id=tenant.id,
        filename=filename,
        purpose=purpose,
        data=data,
        num_examples=num_examples,
        root=settings.files_root,
    )
    try:
        session.commit()
    except Exception:
        session.rollback()
        files_crud.remove_stored(row)
        raise
    return FilePublic.from_row(row)


@router.get("")
def list_files(
    tenant: CurrentTenant,
    session: SessionDep,
    purpose: FilePurpose | None = None,
    after: str | None = Query(None, max_length=64, description="the last file id of the previous page"),
    limit: int = Query(100, ge=1, le=1000),
) -> Page[FilePublic]:
    """List this tenant's files, newest first."""
    cursor = None
    if after is not None:
        cursor = files_crud.get_file(session=session, tenant_id=tenant.id, file_id=after)
        if cursor is None:
            raise HTTPException(400, f"after: unknown file {after!r}")
    rows, has_more = files_crud.list_files(
        session=session, tenant_id=tenant.id, purpose=purpose, after=cursor, limit=limit
    )
    data = [FilePublic.from_row(row) for row in rows]
    return Page[FilePublic].of(data, has_more)


def _get_or_404(session: SessionDep, tenant: CurrentTenant, file_id: str) -> File:
    row = files_crud.get_file(session=session, tenant_id=tenant.id, file_id=file_id)
    if row is None:
        raise HTTPException(404, f"file {file_id!r} not found")
    return row


@router.get("/{file_id}", responses=error_responses(404))
def get_file(file_id: str, tenant: CurrentTenant, session: SessionDep) -> FilePublic:
    """Get one file."""
    return FilePublic.from_row(_get_or_404(session, tenant, file_id))


@router.delete("/{file_id}", responses=error_responses(404, 409, s409="a queued or running job uses it"))
def delete_file(file_id: str, tenant: CurrentTenant, session: SessionDep) -> Deleted:
    """Delete a file (refused while a queued or running job uses it)."""
    row = _get_or_404(session, tenant, file_id)
    users = jobs_crud.active_jobs_using_file(session=session, tenant_id=tenant.id, file_id=file_id)
    if users:
        raise HTTPException(409, f"file {file_id!r} is used by active job {users[0].id}; cancel it first")
    files_crud.delete_file(session=session, row=row)
    session.commit()
    files_crud.remove_stored(row)
    return Deleted(id=file_id, object="file")
