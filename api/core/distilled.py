"""Distilled models: a succeeded job's final model, named ``ft:<job id>[:<suffix>]`` (OpenAI's
``fine_tuned_model``), listed by /v1/models, downloadable, and usable by a later job as its
teacher or its student's starting model.

Only the owning tenant sees or uses one (another tenant's id is a 404, like an unknown one).
The runner resolves model references under the models root only (akl_core/models.py refuses
absolute paths), so a job that names a distilled model runs on a copy of it made of hard links
under ``<models root>/.distilled/<job id>``: no bytes are copied where the two roots share a file
system. Hidden folders of the models root are never a tenant's reference (api/core/job_refs.py).
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from api.core import catalog
from api.core.archives import UnsafePath, safe_directory
from api.crud import history as history_crud
from api.db.models import SUCCEEDED, Job, JobCheckpoint

PREFIX = "ft:"
DISTILLED_DIR = ".distilled"
FT_ID = re.compile(r"^ft:(?P<job>job-[A-Za-z0-9_-]+)(?::(?P<suffix>[A-Za-z0-9._-]+))?$")
SUFFIX_PATTERN = r"^[A-Za-z0-9._-]{1,64}$"


def model_id(job: Job) -> str:
    return f"{PREFIX}{job.id}:{job.suffix}" if job.suffix else f"{PREFIX}{job.id}"


def final_dir(job: Job, checkpoint: JobCheckpoint | None) -> Path | None:
    """The final model's directory, if it is still there."""
    if checkpoint is None or not job.output_dir:
        return None
    try:
        return safe_directory(Path(job.output_dir), checkpoint.path)
    except UnsafePath:
        return None


def find(ref: str, *, session: Session, tenant_id: int) -> tuple[Job, Path] | None:
    """The tenant's succeeded job that ``ref`` names and its final model directory, or None."""
    match = FT_ID.match(ref)
    if match is None:
        return None
    job = session.get(Job, match["job"])
    if job is None or job.tenant_id != tenant_id or job.status != SUCCEEDED:
        return None
    if match["suffix"] is not None and match["suffix"] != job.suffix:
        return None
    folder = final_dir(job, history_crud.final_checkpoint(session=session, job_id=job.id))
    return None if folder is None else (job, folder)


def describe(job: Job, folder: Path) -> catalog.ModelFacts:
    facts = catalog.describe(folder, model_id(job), "distilled")
    facts.created = int((job.finished_at or job.created_at).timestamp())
    return facts


def tenant_models(*, session: Session, tenant_id: int) -> list[catalog.ModelFacts]:
    """The tenant's distilled models, newest first (jobs whose final model is gone are left out)."""
    rows = session.execute(
        select(Job, JobCheckpoint)
        .join(JobCheckpoint, JobCheckpoint.job_id == Job.id)
        .where(Job.tenant_id == tenant_id, Job.status == SUCCEEDED, JobCheckpoint.is_final.is_(True))
        .order_by(Job.finished_at.desc(), Job.id.desc())
    )
    found: dict[str, catalog.ModelFacts] = {}
    for job, checkpoint in rows:
        folder = final_dir(job, checkpoint)
        if job.id in found or folder is None:
            continue
        try:
            found[job.id] = describe(job, folder)
        except catalog.ConfigError:
            continue
    return list(found.values())


def materialize(folder: Path, *, models_root: Path, job_id: str) -> str:
    """A reference under the models root to a copy of ``folder`` made of hard links (a plain copy
    across file systems); made once, atomically (a temp folder renamed into place)."""
    ref = f"{DISTILLED_DIR}/{job_id}"
    target = models_root / ref
    if (target / "config.json").is_file():
        return ref
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".tmp-{job_id}-{secrets.token_hex(4)}"
    try:
        shutil.copytree(folder, tmp, symlinks=False, copy_function=_link_or_copy)
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "config.json").is_file():  # not another request's copy: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ref


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
