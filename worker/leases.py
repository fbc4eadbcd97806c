"""The worker's side of the job lifecycle (api/lifecycle.py): its lease owner name, the snapshot
of a job it claimed, and each lifecycle operation in a transaction of its own.

The database decides which worker runs a job; the broker only delivers. See ``api.lifecycle`` for
why two workers can never both run one job.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker
from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_exponential

from api.lifecycle import JOBS

SessionFactory = sessionmaker[Session]
T = TypeVar("T")


def new_owner() -> str:
    """``hostname:pid:random`` - unique per task execution, readable in the jobs table."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


@dataclass(frozen=True)
class ClaimedJob:
    """What the worker needs of a job it holds (a plain snapshot, no live ORM object)."""

    id: str
    tenant_id: int
    attempts: int
    queue: str
    resolved_spec: dict[str, Any] | None  # what the runner runs: file ids already replaced by paths
    output_dir: str | None
    cancel_requested: bool
    current_step: int


def claim(
    session_factory: SessionFactory, job_id: str, owner: str, *, lease_s: float, now: datetime | None = None
) -> ClaimedJob | None:
    """``JOBS.claim`` in its own transaction; None when the job is not ours to run."""
    with session_factory() as session, session.begin():
        job = JOBS.claim(session, job_id, owner, lease_s=lease_s, now=now)
        if job is None:
            return None
        return ClaimedJob(
            id=job.id,
            tenant_id=job.tenant_id,
            attempts=job.attempts,
            queue=job.queue,
            resolved_spec=dict(job.resolved_spec) if job.resolved_spec else None,
            output_dir=job.output_dir,
            cancel_requested=bool(job.cancel_requested),
            current_step=job.current_step or 0,
        )


def transact(
    session_factory: SessionFactory,
    operation: Callable[..., T],
    *args: Any,
    retry_s: float = 60,
    **kwargs: Any,
) -> T:
    """``operation(session, *args, **kwargs)`` in a transaction of its own, retried through a
    database blip for up to ``retry_s`` (the end of a run must reach the database)."""
    for attempt in Retrying(
        retry=retry_if_exception_type(OperationalError),
        stop=stop_after_delay(retry_s),
        wait=wait_exponential(max=5),
        reraise=True,
    ):
        with attempt, session_factory() as session, session.begin():
            return operation(session, *args, **kwargs)
    raise AssertionError("unreachable: Retrying returns or raises")  # pragma: no cover
