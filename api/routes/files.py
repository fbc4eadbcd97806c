"""Uploaded JSONL files (validated on upload, size-limited)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path, PurePath
from typing import Annotated

import fastapi
from fastapi import APIRouter, Form, HTTPException, Query, UploadFile, status
from fastapi.responses import FileResponse

from akl_core.data import DataError
from api.core import quotas
from api.core.config import Settings
from api.core.errors import ApiError, error_responses
from api.core.pagination import cursor_row
from api.core.uploads import validate_staged
from api.crud import files as files_crud
from api.crud import jobs as jobs_crud
from api.deps import CurrentTenant, FileDep, SessionDep, SettingsDep
from api.schemas.common import Deleted, Page
from api.schemas.files import FilePublic, FilePurpose

router = APIRouter(prefix="/files", tags=["files"])
COPY_CHUNK = 1024 * 1024


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    responses=error_responses(413, 429, s429="the tenant's stored files would pass AKL_MAX_STORED_BYTES"),
)
def upload_file(
    tenant: CurrentTenant,
    session: SessionDep,
    settings: SettingsDep,
    file: Annotated[UploadFile | str, fastapi.File(description="the JSONL file, sent with a filename")],
    purpose: Annotated[FilePurpose, Form()],
) -> FilePublic:
    """Upload a JSONL file of examples (multipart: `file`, `purpose` = train, validation or
    fine-tune, OpenAI's, for either)."""
    if isinstance(file, str):  # a part without a filename arrives as a plain form field
        raise HTTPException(
            422,
            'file: send it as a file part with a filename (Content-Disposition: form-data; name="file"; '
            'filename="train.jsonl"); this part had no filename',
        )
    # A plain `def`: FastAPI runs it in a worker thread; the multipart parser has already spooled
    # the upload to a temporary file, and the parsing happens in a pool process (api/core/uploads.py).
    assert settings.files_root is not None
    file_id, staged = files_crud.staging_path(root=settings.files_root, tenant_id=tenant.id)
    try:
        num_examples, size = _stage(file, staged, settings)
        try:
            quotas.check_stored_bytes(session=session, tenant_id=tenant.id, incoming=size, settings=settings)
        except quotas.QuotaError as exc:
            raise HTTPException(exc.status_code, exc.message) from None
        row = files_crud.create_file(
            session=session,
            tenant_id=tenant.id,
            file_id=file_id,
            staged=staged,
            filename=_base_name(file.filename),
            purpose=purpose,
            size=size,
            num_examples=num_examples,
        )
    finally:
        staged.unlink(missing_ok=True)  # refused, or renamed already
    return FilePublic.model_validate(row)


def _stage(file: UploadFile, staged: Path, settings: Settings) -> tuple[int, int]:
    """Copy the upload to ``staged`` and validate it line by line in a pool process."""
    file.file.seek(0, os.SEEK_END)
    size = file.file.tell()
    if size > settings.max_upload_bytes:
        raise HTTPException(413, f"file larger than {settings.max_upload_bytes} bytes")
    if size == 0:
        raise HTTPException(400, "file is empty")
    file.file.seek(0)
    with open(staged, "wb") as out:
        shutil.copyfileobj(file.file, out, COPY_CHUNK)
        out.flush()
        os.fsync(out.fileno())
    try:
        return validate_staged(staged, max_line_bytes=settings.max_line_bytes)
    except DataError as exc:
        detail = "file is empty (no examples)" if str(exc).endswith("(the file is empty)") else str(exc)
        raise HTTPException(400, f"invalid JSONL: {detail}") from None


def _base_name(filename: str | None) -> str:
    """The client's name without folders (never a storage path: ids name the stored bytes)."""
    return PurePath((filename or "upload.jsonl").replace("\\", "/")).name[:255] or "upload.jsonl"


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
        found = files_crud.get_file(session=session, tenant_id=tenant.id, file_id=after)
        cursor = cursor_row(found, after, "file")
    rows, has_more = files_crud.list_files(
        session=session, tenant_id=tenant.id, purpose=purpose, after=cursor, limit=limit
    )
    data = [FilePublic.model_validate(row) for row in rows]
    return Page[FilePublic].of(data, has_more)


@router.get("/{file_id}", responses=error_responses(404))
def get_file(row: FileDep) -> FilePublic:
    """Get one file."""
    return FilePublic.model_validate(row)


@router.get(
    "/{file_id}/content",
    response_class=FileResponse,
    responses={
        200: {"content": {"application/jsonl": {}}, "description": "the uploaded bytes"},
        **error_responses(404),
    },
)
def get_file_content(row: FileDep) -> FileResponse:
    """The uploaded bytes, as sent."""
    if not Path(row.path).is_file():
        raise ApiError(404, f"the bytes of file {row.id!r} are no longer stored", code="file_not_found")
    return FileResponse(row.path, media_type="application/jsonl", filename=row.filename)


@router.delete("/{file_id}", responses=error_responses(404, 409, s409="a queued or running job uses it"))
def delete_file(row: FileDep, tenant: CurrentTenant, session: SessionDep) -> Deleted:
    """Delete a file (refused while a queued or running job uses it)."""
    users = jobs_crud.active_jobs_using_file(session=session, tenant_id=tenant.id, file_id=row.id)
    if users:
        raise ApiError(
            409, f"file {row.id!r} is used by active job {users[0].id}; cancel it first", code="file_in_use"
        )
    files_crud.delete_file(session=session, row=row)
    return Deleted(id=row.id, object="file")
