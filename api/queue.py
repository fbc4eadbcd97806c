"""Publishing jobs to the broker by task name: the API never imports worker code or torch.

The database is the source of truth: a job row is committed first, then announced here. When the
broker is down the job stays queued and the worker's reconciler announces it later. The worker
builds its Celery app from ``celery_client`` / ``broker_transport_options`` so both sides agree.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from celery import Celery

from api.core.config import Settings

log = logging.getLogger(__name__)

RUN_JOB_TASK = "akl.run_job"
BUILD_CACHE_TASK = "akl.build_teacher_cache"
CACHE_ID_PREFIX = "cache-"  # teacher cache ids; everything else the queues carry is a job id
# Long jobs: with acks_late a Redis message is redelivered after the visibility timeout. Leases in
# the database make a redelivery harmless, but keep it well above the usual run time.
REDIS_VISIBILITY_TIMEOUT_S = 12 * 3600


def is_filesystem_broker(url: str) -> bool:
    return url.startswith("filesystem:")


def broker_folders(settings: Settings) -> dict[str, Path]:
    """The embedded broker's folders: one shared folder for messages in and out."""
    root = settings.broker_root
    return {"queue": root / "queue", "processed": root / "processed", "control": root / "control"}


def broker_transport_options(settings: Settings) -> dict[str, Any]:
    if is_filesystem_broker(settings.broker_url):
        folders = broker_folders(settings)
        for folder in folders.values():
            folder.mkdir(parents=True, exist_ok=True)
        return {
            "data_folder_in": str(folders["queue"]),
            "data_folder_out": str(folders["queue"]),
            "processed_folder": str(folders["processed"]),
            "control_folder": str(folders["control"]),
            "store_processed": False,
        }
    return {
        "visibility_timeout": REDIS_VISIBILITY_TIMEOUT_S,
        "socket_connect_timeout": settings.enqueue_timeout_s,
        "socket_timeout": settings.enqueue_timeout_s,
    }


def celery_client(settings: Settings, name: str = "akl") -> Celery:
    """A Celery app configured for ``settings.broker_url`` (no tasks registered, no result backend)."""
    url = settings.broker_url
    if is_filesystem_broker(url) and url.rstrip("/") == "filesystem:":
        url = "filesystem://localhost/"  # same transport; kombu warns about a missing host otherwise
    app = Celery(name, broker=url, set_as_current=False)
    app.conf.update(
        broker_transport_options=broker_transport_options(settings),
        broker_connection_timeout=settings.enqueue_timeout_s,
        broker_connection_retry_on_startup=True,
        task_default_queue=settings.gpu_queue,
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
    )
    return app


def queue_for(device: str, settings: Settings) -> str:
    """cpu jobs go to the cpu queue; cuda and auto jobs to the gpu queue (AKL_DEFAULT_QUEUE for auto)."""
    if device == "cpu":
        return settings.cpu_queue
    if device == "cuda":
        return settings.gpu_queue
    return settings.default_queue or settings.gpu_queue


def task_for(row_id: str) -> str:
    """The task that runs a row: a cache build for ``cache-...``, else a distillation job."""
    return BUILD_CACHE_TASK if row_id.startswith(CACHE_ID_PREFIX) else RUN_JOB_TASK


def enqueue_job(client: Celery, *, job_id: str, queue: str) -> bool:
    """Announce a job or a cache build (by its id); False (and a warning) when the broker cannot
    be reached."""
    try:
        client.send_task(task_for(job_id), args=[job_id], queue=queue, retry=False)
    except Exception as exc:  # broker down or misconfigured: the reconciler retries later
        log.warning("could not enqueue %s on %s: %s", job_id, queue, type(exc).__name__)
        return False
    return True
