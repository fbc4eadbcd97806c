"""Celery tasks. The API publishes them by name (``api.queue.RUN_JOB_TASK``), never by import."""

from __future__ import annotations

from api.queue import RUN_JOB_TASK
from worker.celery_app import app, context
from worker.jobs import run_job as _run_job


@app.task(name=RUN_JOB_TASK, acks_late=True, ignore_result=True)
def run_job(job_id: str) -> str:
    """Claim and run one job; returns the outcome (see worker/jobs.py)."""
    return _run_job(job_id, context())
