"""Celery tasks. The API publishes them by name (``api.queue.RUN_JOB_TASK``), never by import."""

from __future__ import annotations

from api.queue import BUILD_CACHE_TASK, RUN_JOB_TASK
from worker.cache_builds import build_cache as _build_cache
from worker.celery_app import app, context
from worker.jobs import run_job as _run_job


@app.task(name=RUN_JOB_TASK, acks_late=True, ignore_result=True)
def run_job(job_id: str) -> str:
    """Claim and run one job; returns the outcome (see worker/jobs.py)."""
    return _run_job(job_id, context())


@app.task(name=BUILD_CACHE_TASK, acks_late=True, ignore_result=True)
def build_teacher_cache(cache_id: str) -> str:
    """Claim and run one teacher-cache build (see worker/cache_builds.py)."""
    return _build_cache(cache_id, context())
