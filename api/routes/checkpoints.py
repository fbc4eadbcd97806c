"""Checkpoints and the final model, downloaded as archives streamed on the fly."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from fastapi import APIRouter, HTTPException, Query
from fastapi.responses import StreamingResponse

from api.core.archives import UnsafePath, safe_directory, stream_directory
from api.core.errors import error_responses
from api.crud import history as history_crud
from api.db.models import Job, JobCheckpoint
from api.deps import JobDep, SessionDep
from api.schemas.common import Page
from api.schemas.history import CheckpointPublic

router = APIRouter(prefix="/jobs", tags=["checkpoints"])

ArchiveFormat = Literal["tar.gz", "tar"]
ARCHIVE_RESPONSES = {
    200: {"content": {"application/gzip": {}, "application/x-tar": {}}, "description": "the archive"},
    **error_responses(404),
}


@router.get("/{job_id}/checkpoints", responses=error_responses(404))
def list_checkpoints(job: JobDep, session: SessionDep) -> Page[CheckpointPublic]:
    """Saved checkpoints by step; the final model (`is_final`) last."""
    rows = history_crud.list_checkpoints(session=session, job_id=job.id)
    return Page[CheckpointPublic](data=[CheckpointPublic.model_validate(row) for row in rows])


def archive(
    job: Job, checkpoint: JobCheckpoint, name: str, archive_format: ArchiveFormat
) -> StreamingResponse:
    if not job.output_dir:
        raise HTTPException(404, f"job {job.id} has no artifacts")
    try:
        folder = safe_directory(Path(job.output_dir), checkpoint.path)
    except UnsafePath:
        raise HTTPException(404, f"the files of checkpoint {checkpoint.id} are no longer available") from None
    compress = archive_format == "tar.gz"
    filename = f"{job.id}-{name}.{archive_format}"
    return StreamingResponse(
        stream_directory(folder, f"{job.id}-{name}", compress=compress),
        media_type="application/gzip" if compress else "application/x-tar",
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )


@router.get(
    "/{job_id}/checkpoints/{checkpoint_id}/content",
    response_class=StreamingResponse,
    responses=ARCHIVE_RESPONSES,
)
def download_checkpoint(
    job: JobDep,
    checkpoint_id: str,
    session: SessionDep,
    archive_format: ArchiveFormat = Query("tar.gz", alias="format"),
) -> StreamingResponse:
    """Download a checkpoint directory as a tar.gz (or tar) archive."""
    checkpoint = history_crud.get_checkpoint(session=session, job_id=job.id, checkpoint_id=checkpoint_id)
    if checkpoint is None:
        raise HTTPException(404, f"checkpoint {checkpoint_id!r} not found")
    name = "final" if checkpoint.is_final else f"step-{checkpoint.step:08d}"
    return archive(job, checkpoint, name, archive_format)


@router.get("/{job_id}/model", response_class=StreamingResponse, responses=ARCHIVE_RESPONSES)
def download_model(
    job: JobDep,
    session: SessionDep,
    archive_format: ArchiveFormat = Query("tar.gz", alias="format"),
) -> StreamingResponse:
    """Download the final model (loads with AutoModelForCausalLM.from_pretrained once unpacked)."""
    checkpoint = history_crud.final_checkpoint(session=session, job_id=job.id)
    if checkpoint is None:
        raise HTTPException(404, f"job {job.id} has no final model (status {job.status})")
    return archive(job, checkpoint, "final", archive_format)
