"""Uploaded JSONL files: bytes under ``{files_root}/{tenant_id}/``, one row each; an upload is
staged as a hidden ``.{file_id}.tmp`` there while it is validated."""

from __future__ import annotations

import os
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from api.core.pagination import newest_first
from api.db.models import File, new_id, utcnow


def staging_path(*, root: Path, tenant_id: int) -> tuple[str, Path]:
    """A new file id and the hidden path its bytes are written to before ``create_file``."""
    file_id = new_id("file")
    folder = root / str(tenant_id)
    folder.mkdir(parents=True, exist_ok=True)
    return file_id, folder / f".{file_id}.tmp"


def create_file(
    *,
    session: Session,
    tenant_id: int,
    file_id: str,
    staged: Path,
    filename: str,
    purpose: str,
    size: int,
    num_examples: int,
) -> File:
    """Publish the staged bytes (already validated and fsynced) and commit their row; when the
    commit fails the bytes are removed again, so no orphan bytes remain."""
    path = staged.with_name(f"{file_id}.jsonl")
    os.replace(staged, path)  # atomic: readers never see a partial file
    row = File(
        id=file_id,
        tenant_id=tenant_id,
        filename=filename,
        purpose=purpose,
        bytes=size,
        num_examples=num_examples,
        path=str(path.resolve()),
    )
    session.add(row)
    try:
        session.commit()
    except Exception:
        session.rollback()
        remove_stored(row)
        raise
    return row


def remove_stored(row: File) -> None:
    Path(row.path).unlink(missing_ok=True)


def get_file(*, session: Session, tenant_id: int, file_id: str) -> File | None:
    """The tenant's live file, or None (another tenant's file is None too)."""
    row = session.get(File, file_id)
    if row is None or row.tenant_id != tenant_id or row.deleted_at is not None:
        return None
    return row


def list_files(
    *,
    session: Session,
    tenant_id: int,
    purpose: str | None = None,
    after: File | None = None,
    limit: int = 100,
) -> tuple[list[File], bool]:
    """Newest first; ``after`` is the last file of the previous page. Returns (page, has_more)."""
    query = select(File).where(File.tenant_id == tenant_id, File.deleted_at.is_(None))
    if purpose is not None:
        query = query.where(File.purpose == purpose)
    return newest_first(session, query, File, after=after, limit=limit)


def delete_file(*, session: Session, row: File) -> None:
    """Mark deleted (the row stays for jobs that name it) and commit; then remove the bytes."""
    row.deleted_at = utcnow()
    session.add(row)
    session.commit()
    remove_stored(row)
