"""Fault-injection fixtures: the production shape as real processes that a test may kill.

Each test gets its own stack: a throw-away PostgreSQL database, a private ``redis-server`` on a
free port (nothing on disk, so a restart loses every message), the API under uvicorn and Celery
workers running the real ``akl_core.runner`` on the tiny preset. The API and the workers can reach
PostgreSQL through a loopback TCP proxy that the test cuts and restores (``Stack.db_proxy``), so a
dropped database connection is injected without touching the shared server. Every process is
started in its own process group and killed in the finalizer.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.engine import make_url

from tests.worker import services

DEMO = services.REPO / "akl_core" / "datasets" / "demo" / "train.jsonl"
TERMINAL = ("succeeded", "failed", "cancelled")

# Short timings so that faults play out in seconds (defaults: 30 s lease, 20 s reconcile, 300 s requeue).
FAST_WORKER = {
    "AKL_WORKER_LEASE_S": "6",
    "AKL_WORKER_TICK_S": "0.5",
    "AKL_WORKER_RECONCILE_EVERY_S": "1",
    "AKL_WORKER_REQUEUE_AFTER_S": "3",
    "AKL_WORKER_TERM_GRACE_S": "30",
}


def tiny_job(
    workdir: Path, *, steps: int, checkpoint_every: int = 0, examples: int = 32, **extra: Any
) -> dict:
    """A cpu job on the tiny preset; its training data is an uploaded file (see ``Stack.submit``)."""
    train = workdir / "train.jsonl"
    lines = DEMO.read_text(encoding="utf-8").splitlines(keepends=True)[:examples]
    train.write_text("".join(lines), encoding="utf-8")
    spec = {
        "teacher": "preset:tiny",
        "student": {"init": "truncate", "num_layers": 2},
        "data": {"train": str(train), "validation": "demo:validation", "max_validation_examples": 2},
        "loss": {"name": "akl"},
        "training": {"max_steps": steps, "batch_size": 2, "learning_rate": 1e-3, "max_length": 64,
                     "max_prompt_length": 48},
        "evaluation": {"num_examples": 2, "seeds": [10], "max_new_tokens": 4, "batch_size": 2,
                       "teacher_reference": False},
        "checkpointing": {"every_steps": checkpoint_every, "keep": 2},
        "resources": {"device": "cpu"},
    }  # fmt: skip
    for section, values in extra.items():
        spec[section] = {**spec.get(section, {}), **values} if isinstance(values, dict) else values
    return spec


class RedisServer:
    """A private redis-server on a fixed free port that can be killed and started again."""

    def __init__(self, log: Path, password: str | None = None):
        self.port = services.free_port()
        self.log = log
        self.password = password
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def client(self):
        import redis

        return redis.Redis(port=self.port, password=self.password, socket_timeout=3, socket_connect_timeout=3)

    def start(self) -> None:
        auth = ["--requirepass", self.password] if self.password else []
        self.proc = services.start_group(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--daemonize", "no", *auth],
            log=self.log,
        )  # fmt: skip
        services.wait_for(lambda: self.client().ping(), 15, "redis-server")

    def kill(self) -> None:
        """SIGKILL: with no persistence every queued message is gone."""
        if self.proc is not None:
            services.stop_group(self.proc, signal.SIGKILL)
            self.proc = None


class TcpProxy:
    """A loopback TCP proxy to ``target_port``. ``cut()`` closes the listening socket and every
    open connection (clients see a dropped connection, then 'connection refused');
    ``restore()`` listens again on the same port."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.port = services.free_port()
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._server: socket.socket | None = None

    def restore(self) -> None:
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", self.port))
        server.listen(128)
        self._server = server
        threading.Thread(target=self._accept, args=(server,), daemon=True).start()

    def cut(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        with self._lock:
            conns, self._conns = self._conns, set()
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return  # cut
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._server is not server:  # cut while connecting
                    client.close()
                    upstream.close()
                    continue
                self._conns.update((client, upstream))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class Stack:
    """PostgreSQL (direct URL for the test, proxied URL for the services) + Redis + API + workers."""

    def __init__(self, root: Path, db_url: str, models_root: Path, redis: RedisServer, proxy: TcpProxy):
        self.root, self.db_url, self.redis, self.db_proxy = root, db_url, redis, proxy
        self.service_db_url = (
            make_url(db_url).set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
        )
        self.env = {
            **os.environ,
            "AKL_ENVIRONMENT": "production",
            "AKL_DATA_ROOT": str(root / "data"),
            "AKL_DATABASE_URL": self.service_db_url,
            "AKL_BROKER_URL": redis.url,
            "AKL_MODELS_ROOT": str(models_root),
            "AKL_ENQUEUE_TIMEOUT_S": "2",
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": str(services.REPO),
            **FAST_WORKER,
        }
        self.procs: list[subprocess.Popen] = []
        self.api: subprocess.Popen | None = None
        self.url = ""
        self._engine = None

    # -- processes -------------------------------------------------------------------------
    def start_api(self) -> None:
        port = services.free_port()
        self.api = self._start(
            [sys.executable, "-m", "uvicorn", "api.main:app", "--host", "127.0.0.1", "--port", str(port)],
            self.env, "api",
        )  # fmt: skip
        self.url = f"http://127.0.0.1:{port}"
        services.wait_for(lambda: httpx.get(f"{self.url}/healthz").status_code == 200, 60, "the API")

    def start_worker(self, name: str, **env: str) -> subprocess.Popen:
        argv = [
            sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "-Q", "gpu,cpu",
            "--pool", "solo", "-n", f"{name}-{uuid.uuid4().hex[:6]}@%h", "--without-gossip",
            "--without-mingle", "--without-heartbeat", "--loglevel", "INFO",
        ]  # fmt: skip
        return self._start(argv, {**self.env, **env}, name)

    def _start(self, argv: list[str], env: dict[str, str], name: str) -> subprocess.Popen:
        proc = services.start_group(argv, env=env, log=self.root / f"{name}.log")
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            children = _descendants(proc.pid) if proc.poll() is None else []
            services.stop_group(proc, signal.SIGKILL, timeout=5)
            for child in children:  # runners live in their own session, outside the group
                _kill(child)

    def log_tail(self, chars: int = 2500) -> str:
        logs = sorted(self.root.glob("*.log"))
        return "\n".join(f"== {p.name}\n{p.read_text(errors='replace')[-chars:]}" for p in logs)

    # -- database (direct, not through the proxy) -----------------------------------------
    @property
    def engine(self):
        if self._engine is None:
            from api.db.session import make_engine

            self._engine = make_engine(self.db_url)
        return self._engine

    def job(self, job_id: str):
        from api.db.models import Job
        from api.db.session import session_factory

        with session_factory(self.engine)() as session:
            return session.get_one(Job, job_id)

    def metric_steps(self, job_id: str) -> list[int]:
        from api.db.models import JobMetric
        from api.db.session import session_factory

        with session_factory(self.engine)() as session:
            return list(
                session.scalars(
                    select(JobMetric.step).where(JobMetric.job_id == job_id).order_by(JobMetric.step)
                )
            )

    def new_key(self, tenant: str) -> str:
        from api.crud import api_keys
        from api.db.session import session_factory

        with session_factory(self.engine)() as session:
            _, new = api_keys.create_key(session=session, tenant_name=tenant)
            session.commit()
        return new.key

    # -- client ----------------------------------------------------------------------------
    def http(self, key: str) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {key}"}, timeout=30)

    def submit(self, http: httpx.Client, spec: dict, **headers: str) -> str:
        """Upload the spec's local train file, submit the job; returns its id."""
        spec = json.loads(json.dumps(spec))
        train = Path(spec["data"]["train"])
        if train.is_file():
            with open(train, "rb") as f:
                r = http.post("/v1/files", files={"file": (train.name, f)}, data={"purpose": "train"})
            assert r.status_code == 201, r.text
            spec["data"]["train"] = r.json()["id"]
        r = http.post("/v1/jobs", json=spec, headers=headers)
        assert r.status_code == 201, r.text
        return r.json()["id"]

    def wait_job(self, job_id: str, check, timeout: float, what: str):
        """Poll the job row until ``check(job)``; fail with the logs when it ends otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if check(job):
                return job
            if job.status in TERMINAL or time.monotonic() > deadline:
                raise AssertionError(
                    f"{what}: job {job_id} is {job.status} at step {job.current_step} "
                    f"({job.error_code}: {job.error_message})\n{self.log_tail()}"
                )
            time.sleep(0.2)

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()


def _descendants(pid: int) -> list[int]:
    try:
        import psutil

        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except Exception:
        return []


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def runner_pids(worker: subprocess.Popen) -> list[int]:
    """The ``akl_core.runner`` processes a worker supervises."""
    import psutil

    pids = []
    for child in psutil.Process(worker.pid).children(recursive=True):
        try:
            if "akl_core.runner" in " ".join(child.cmdline()):
                pids.append(child.pid)
        except psutil.Error:
            pass
    return pids


def crash(worker: subprocess.Popen) -> None:
    """The worker's machine dies: freeze the worker (so it cannot react), SIGKILL its runner and
    then the worker. No checkpoint on the way out, the lease is left behind in the database."""
    os.kill(worker.pid, signal.SIGSTOP)
    for pid in runner_pids(worker):
        _kill(pid)
    os.killpg(worker.pid, signal.SIGKILL)
    worker.wait(timeout=10)


@contextlib.contextmanager
def running_stack(
    root: Path,
    models_root: Path,
    redis: RedisServer | None = None,
    configure: Callable[[Stack], None] | None = None,
) -> Iterator[Stack]:
    """Our own Redis, a fresh PostgreSQL database behind a proxy that can be cut, and the API
    (``configure`` edits the stack's environment first); no worker yet. Torn down on exit."""
    redis = redis or RedisServer(root / "redis.log")
    redis.start()
    try:
        with services.postgres_database() as db_url:
            proxy = TcpProxy(make_url(db_url).port or 5432)
            proxy.restore()
            s = Stack(root, db_url, models_root, redis, proxy)
            if configure is not None:
                configure(s)
            try:
                s.start_api()
                yield s
            finally:
                s.stop_all()
                s.close()
                proxy.cut()
    finally:
        redis.kill()


@pytest.fixture
def stack(models_root: Path, tmp_path: Path) -> Iterator[Stack]:
    """A fresh stack with the API up and no worker yet (tests start and kill their workers)."""
    if not services.postgres_available():
        pytest.skip("PostgreSQL is not reachable at AKL_TEST_POSTGRES_URL")
    with running_stack(tmp_path, models_root) as s:
        yield s
