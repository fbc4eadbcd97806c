"""The worker's Celery app: ``celery -A worker.celery_app worker -Q gpu,cpu --pool solo``.

Built from the same ``api.queue.celery_client`` as the API's publisher so both agree on broker,
folders and serialization. Delivery is at-least-once (acks_late, prefetch 1, reject on worker
lost); exactly-once running comes from the lease in the database (api/lifecycle.py).

Run one job per worker process: ``--pool solo`` (the task then runs in the worker's main process
and sees its SIGTERM), and start one worker per GPU. Warm shutdown (SIGTERM) stops the running
child - it checkpoints - gives the job back to the queue and re-enqueues it.
"""

from __future__ import annotations

import logging
import threading
from functools import lru_cache
from typing import Any

from celery import signals
from kombu import Exchange, Queue

from api.core.config import get_settings
from api.db.session import get_engine, session_factory
from api.queue import celery_client, is_filesystem_broker, task_for
from worker.jobs import WorkerContext
from worker.options import WorkerOptions
from worker.reconciler import ReconcilerThread

log = logging.getLogger(__name__)

settings = get_settings()
app = celery_client(settings, name="akl-worker")
app.conf.update(
    task_acks_late=True,
    worker_prefetch_multiplier=1,
    task_reject_on_worker_lost=True,
    broker_connection_retry_on_startup=True,
    # One direct exchange per queue, as the API's publisher declares them (a bare Queue(name)
    # would bind to the default exchange and a gpu job would also land on the cpu queue).
    task_queues=tuple(
        Queue(q, Exchange(q, type="direct"), routing_key=q) for q in (settings.gpu_queue, settings.cpu_queue)
    ),
    task_default_queue=settings.gpu_queue,
    # One job per worker process, run in its main process so it sees the worker's SIGTERM.
    worker_pool="solo",
    worker_concurrency=1,
    worker_hijack_root_logger=False,
    # No result backend: status lives in the jobs table.
    task_ignore_result=True,
    task_store_errors_even_if_ignored=False,
    # The filesystem broker has no fast broadcast; workers do not need to see each other.
    worker_enable_remote_control=not is_filesystem_broker(settings.broker_url),
    include=["worker.tasks"],
)

_shutdown = threading.Event()
_publish_lock = threading.Lock()
_reconciler: ReconcilerThread | None = None


def enqueue(job_id: str, queue: str) -> None:
    """Publish ``akl.run_job(job_id)``, or ``akl.build_teacher_cache`` for a ``cache-...`` id
    (thread-safe: the reconciler thread publishes too)."""
    with _publish_lock:
        app.send_task(task_for(job_id), args=[job_id], queue=queue)


@lru_cache
def context() -> WorkerContext:
    return WorkerContext(
        settings=settings,
        options=WorkerOptions(),
        session_factory=session_factory(get_engine(settings.database_url)),
        enqueue=enqueue,
        shutdown=_shutdown,
    )


@signals.worker_ready.connect
def _start_reconciler(**_: Any) -> None:
    global _reconciler
    ctx = context()
    _reconciler = ReconcilerThread(
        ctx.session_factory,
        enqueue,
        every_s=ctx.options.reconcile_every_s,
        requeue_after_s=ctx.options.requeue_after_s,
    )
    _reconciler.start()
    log.info(
        "akl worker ready: broker %s, artifacts %s",
        settings.broker_url.split("@")[-1],
        settings.artifacts_root,
    )


@signals.worker_shutting_down.connect
def _on_shutdown(**_: Any) -> None:
    # Seen by the running task's supervisor loop: stop the child, release and re-enqueue the job.
    _shutdown.set()
    if _reconciler is not None:
        _reconciler.stop()
