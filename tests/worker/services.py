"""Real services for worker and end-to-end tests: a private Redis, a throw-away PostgreSQL
database, migrated SQLite files, and child processes that are always stopped (process groups)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
POSTGRES_URL = os.environ.get("AKL_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check: Callable[[], bool], timeout: float, what: str, interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def runner_reached(events: Path, step: int) -> bool:
    """Whether a run's own events.jsonl has a step event at ``step`` or later. Tests that signal a
    worker mid-run wait on this, not on the job row: the database lags the runner by up to a
    supervisor tick (2 s), in which a tiny job trains dozens of steps (it could end first)."""
    from akl_core.contract import read_events

    return events.is_file() and any(
        e.get("type") == "step" and e["step"] >= step for e in read_events(events)
    )


def start_group(
    argv: list[str], *, env: dict[str, str] | None = None, log: Path | None = None, cwd: Path = REPO
):
    """A child in its own process group (so ``stop_group`` also stops what it spawned)."""
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115
    try:
        return subprocess.Popen(
            argv, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    finally:
        if log:
            out.close()


def stop_group(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int | None:
    """Signal the group, wait, then SIGKILL whatever is left; returns the leader's exit code."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait(timeout=10)
    return proc.returncode


@contextmanager
def redis_server() -> Iterator[str]:
    """A private redis-server on a free port, nothing on disk; yields its URL (skips the test
    when redis-server is not installed)."""
    if shutil.which("redis-server") is None:
        import pytest

        pytest.skip("redis-server is not installed")
    port = free_port()
    proc = start_group(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--daemonize", "no"]
    )  # fmt: skip
    try:
        import redis

        client = redis.Redis(port=port)
        wait_for(lambda: client.ping(), 10, "redis-server")
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        stop_group(proc)


def postgres_available() -> bool:
    try:
        import psycopg

        with psycopg.connect(_plain(POSTGRES_URL), connect_timeout=3):
            return True
    except Exception:
        return False


def _plain(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://")


@contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh, randomly named database on the test server, migrated; dropped afterwards."""
    import psycopg

    from api.db.session import dispose_engines, migrate

    name = f"akl_test_{uuid.uuid4().hex[:10]}"
    admin = _plain(POSTGRES_URL)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = POSTGRES_URL.rsplit("/", 1)[0] + f"/{name}"
    try:
        migrate(url)
        yield url
    finally:
        dispose_engines()
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def sqlite_database(path: Path) -> str:
    from api.db.session import migrate

    url = f"sqlite:///{path}"
    migrate(url)
    return url
