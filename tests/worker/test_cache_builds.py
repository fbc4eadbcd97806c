"""``build_cache`` end to end against a real database and a real child (the fake cache runner)."""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, update

from api.db.models import (
    CANCELLED,
    FAILED,
    QUEUED,
    SUCCEEDED,
    TeacherCache,
    TeacherCacheEvent,
    new_id,
    utcnow,
)
from api.lifecycle import CACHES
from worker.cache_builds import build_cache
from worker.reconciler import reconcile

FAKE_CACHE_RUNNER = "tests.worker.fake_cache_runner"


@pytest.fixture
def cache_ctx(ctx):
    ctx.options.cache_runner_module = FAKE_CACHE_RUNNER
    return ctx


@pytest.fixture
def make_cache(sf, tenant_id, cache_ctx):
    root = cache_ctx.settings.caches_root

    def make(fake: dict | None = None, **values) -> str:
        cache_id = new_id("cache")
        spec = {
            "teacher": "preset:tiny",
            "data": {"train": "demo:train", "format": "auto", "max_length": 64, "max_prompt_length": 32},
            "top_k": 16,
            "_fake": fake or {},
        }
        with sf() as session, session.begin():
            session.add(
                TeacherCache(
                    id=cache_id, tenant_id=tenant_id, status=QUEUED, teacher="preset:tiny", top_k=16,
                    spec=spec, resolved_spec=spec, queue="cpu",
                    output_dir=str(root / str(tenant_id) / cache_id), **values,
                )
            )  # fmt: skip
        return cache_id

    return make


def _row(sf, cache_id) -> TeacherCache:
    with sf() as session:
        return session.get_one(TeacherCache, cache_id)


def _events(sf, cache_id) -> list[str]:
    with sf() as session:
        return list(
            session.scalars(
                select(TeacherCacheEvent.type)
                .where(TeacherCacheEvent.cache_id == cache_id)
                .order_by(TeacherCacheEvent.id)
            )
        )


def test_a_build_succeeds_and_records_size_manifest_and_events(sf, make_cache, cache_ctx) -> None:
    cache_id = make_cache({"shards": 3})
    assert build_cache(cache_id, cache_ctx) == SUCCEEDED
    row = _row(sf, cache_id)
    assert (row.status, row.progress, row.attempts) == (SUCCEEDED, 1.0, 1)
    assert (row.tokens, row.bytes, row.examples) == (300, 3 * 6400, 30)
    assert row.bytes_per_token == pytest.approx(64.0)
    assert row.manifest["teacher_eval"]["rouge_l"] == 0.3
    assert row.lease_owner is None and row.finished_at is not None
    assert _events(sf, cache_id) == ["running", "started", "completed", SUCCEEDED]  # progress not logged
    assert build_cache(cache_id, cache_ctx) == "skipped"  # a redelivery does nothing


def test_a_failed_build_keeps_the_runner_code_without_server_paths(sf, make_cache, cache_ctx) -> None:
    cache_id = make_cache({"fail": "invalid_data"})
    assert build_cache(cache_id, cache_ctx) == FAILED
    row = _row(sf, cache_id)
    assert row.error_code == "invalid_data"
    assert "fake failure reading <caches>/" in row.error_message  # the spec path, redacted


def test_cancel_while_running_stops_the_child(sf, make_cache, cache_ctx) -> None:
    cache_id = make_cache({"shards": 200, "shard_s": 0.05})
    outcome: list[str] = []
    thread = threading.Thread(target=lambda: outcome.append(build_cache(cache_id, cache_ctx)))
    thread.start()
    deadline = time.monotonic() + 20
    while _row(sf, cache_id).progress == 0.0:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    with sf() as session, session.begin():
        session.execute(update(TeacherCache).where(TeacherCache.id == cache_id).values(cancel_requested=True))
    thread.join(30)
    assert outcome == [CANCELLED]
    row = _row(sf, cache_id)
    assert row.status == CANCELLED and 0.0 < row.progress < 1.0


def test_a_killed_build_is_requeued_and_resumes_without_redoing_shards(sf, make_cache, cache_ctx) -> None:
    """The worker dies mid-build (its lease expires): the reconciler requeues the row, the next
    run keeps the shards on disk and writes only the missing ones."""
    cache_id = make_cache({"shards": 5})
    out = Path(_row(sf, cache_id).output_dir)
    out.mkdir(parents=True)
    for index in range(3):  # what the killed run had written
        (out / f"shard-{index:05d}.bin").write_bytes(b"\0" * 6400)
    owner = "dead-worker"
    with sf() as session, session.begin():
        assert CACHES.claim(session, cache_id, owner, lease_s=30) is not None
    with sf() as session, session.begin():  # the dead worker's lease runs out
        session.execute(
            update(TeacherCache)
            .where(TeacherCache.id == cache_id)
            .values(lease_expires_at=utcnow() - timedelta(seconds=1))
        )
    report = reconcile(sf, cache_ctx.enqueue, requeue_after_s=300)
    assert cache_id in report.expired and cache_ctx.enqueue == [(cache_id, "cpu")]
    assert _row(sf, cache_id).status == QUEUED
    assert build_cache(cache_id, cache_ctx) == SUCCEEDED
    assert (out / "done.log").read_text().split() == ["shard-00003.bin", "shard-00004.bin"]
    assert _row(sf, cache_id).attempts == 2
    assert "requeued" in _events(sf, cache_id)


def test_an_expired_lease_with_a_cancel_request_ends_cancelled(sf, make_cache, cache_ctx) -> None:
    cache_id = make_cache()
    with sf() as session, session.begin():
        assert CACHES.claim(session, cache_id, "dead", lease_s=30) is not None
    with sf() as session, session.begin():
        session.execute(
            update(TeacherCache)
            .where(TeacherCache.id == cache_id)
            .values(cancel_requested=True, lease_expires_at=utcnow() - timedelta(seconds=1))
        )
    report = reconcile(sf, cache_ctx.enqueue, requeue_after_s=300)
    assert report.cancelled == [cache_id] and cache_ctx.enqueue == []
    assert _row(sf, cache_id).status == CANCELLED


def test_a_stale_queued_build_is_published_again(sf, make_cache, cache_ctx) -> None:
    old = utcnow() - timedelta(minutes=10)
    cache_id = make_cache(created_at=old, enqueued_at=old)
    report = reconcile(sf, cache_ctx.enqueue, requeue_after_s=300)
    assert report.requeued == [cache_id] and cache_ctx.enqueue == [(cache_id, "cpu")]
    assert _row(sf, cache_id).status == QUEUED


def test_a_shutdown_gives_the_build_back(sf, make_cache, cache_ctx) -> None:
    cache_id = make_cache({"shards": 200, "shard_s": 0.05})
    outcome: list[str] = []
    thread = threading.Thread(target=lambda: outcome.append(build_cache(cache_id, cache_ctx)))
    thread.start()
    deadline = time.monotonic() + 20
    while _row(sf, cache_id).progress == 0.0:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    cache_ctx.shutdown.set()
    thread.join(30)
    assert outcome == ["released"]
    row = _row(sf, cache_id)
    assert (row.status, row.attempts, row.lease_owner) == (QUEUED, 0, None)
    assert cache_ctx.enqueue == [(cache_id, "cpu")]
    assert _events(sf, cache_id)[-2:] == ["stopped", "released"]


def test_cache_build_lines_are_read_with_the_cache_contract() -> None:
    from akl_core.contract import validate_cache_event
    from worker.cache_builds import check_cache_line

    shard = check_cache_line(b'{"type": "shard", "done_shards": 1, "total_shards": 2, "progress": NaN}')
    assert shard == {"type": "shard", "done_shards": 1, "total_shards": 2, "progress": None}
    torn = check_cache_line(b'{"type": "sha')
    assert torn["type"] == "log" and torn["level"] == "warning"
    assert validate_cache_event({"type": "completed", "tokens": 5, "bytes": 340})["tokens"] == 5
    with pytest.raises(ValueError, match="unknown cache build event type 'step'"):
        validate_cache_event({"type": "step", "step": 1})
    with pytest.raises(ValueError):  # an error event is the runner contract's, code and message
        validate_cache_event({"type": "error", "code": "invalid_cache"})
