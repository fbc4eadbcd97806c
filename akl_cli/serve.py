"""``akl serve``: the embedded default in one command.

SQLite and a file-system Celery broker under the data root, the API (uvicorn) and Celery workers
as child processes. Ctrl-C / SIGTERM stops them cleanly: each worker stops its running job (the
runner writes a checkpoint), gives it back to the queue, and the next ``akl serve`` resumes it.

Supervision (RELIABILITY.md, "Process supervision"): a child that dies is started again after a
backoff (1, 2, 4 ... 30 s) while the others keep running; a child that keeps dying at once ends
the service. The children get SIGTERM from the kernel when ``akl serve`` dies, even of SIGKILL
(PR_SET_PDEATHSIG), so none is left behind. A port that is in use is refused before anything
starts.
"""

from __future__ import annotations

import ctypes
import functools
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import typer

STOP_TIMEOUT_S = 45.0  # a worker's job gets term_grace_s (10 s) to checkpoint, plus start-up slack
PR_SET_PDEATHSIG = 1  # linux/prctl.h
BACKOFF_S = (1.0, 2.0, 4.0, 8.0, 15.0, 30.0)
STABLE_S = 60.0  # a child that ran this long starts again with the shortest backoff
MAX_QUICK_DEATHS = len(BACKOFF_S)  # in a row, each within STABLE_S of its start: give up
INSTANCE_ENV = "AKL_SERVE_INSTANCE"  # /healthz echoes it: the API that answers is the one we started


def service_env(data_root: Path) -> dict[str, str]:
    """The children's environment: an absolute data root, so they agree whatever their cwd."""
    return {**os.environ, "AKL_DATA_ROOT": str(data_root.resolve()), "PYTHONUNBUFFERED": "1"}


def machine_has_gpu() -> bool:
    """Whether a CUDA (or ROCm) device is visible here. Torch-free, from the device nodes: without
    one torch.cuda cannot be available, and importing torch would cost `akl serve` seconds."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", "unset").strip() in ("", "-1"):
        return False
    dev = Path("/dev")
    return any(dev.glob("nvidia[0-9]*")) or (dev / "kfd").exists()


def gpu_workers(queues: str, gpu_queue: str, has_gpu: bool) -> str:
    """AKL_GPU_WORKERS for the children: the embedded workers serve the gpu queue with a GPU only
    when both hold; otherwise the API refuses resources.device=cuda at submission (422) instead
    of queueing a job that can only fail (api/core/job_refs.py)."""
    served = gpu_queue in [q.strip() for q in queues.split(",")]
    return "true" if served and has_gpu else "false"


def api_argv(host: str, port: int) -> list[str]:
    return [sys.executable, "-m", "uvicorn", "api.main:app", "--host", host, "--port", str(port)]


def worker_argv(index: int, queues: str) -> list[str]:
    return [
        sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "-Q", queues,
        "--pool", "solo", "-n", f"akl-{index}@%h", "--without-gossip", "--without-mingle",
        "--without-heartbeat", "--loglevel", "INFO",
    ]  # fmt: skip


def port_in_use(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be bound (another `akl serve` or program has it), or None. Binds
    the way uvicorn does (SO_REUSEADDR), so a port in TIME_WAIT is not refused."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        return f"cannot resolve {host}: {exc.strerror}"
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            return exc.strerror or str(exc)
    return None


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when `akl serve` dies (Linux). A worker then stops its
    job with a checkpoint and hands it back; the API shuts down."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def _start(argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    # Own session: a Ctrl-C in the terminal reaches only `akl serve`, which stops the children in
    # order (a worker must get exactly one SIGTERM for a warm shutdown).
    return subprocess.Popen(argv, env=env, start_new_session=True, preexec_fn=_die_with_parent)


@dataclass
class Child:
    """One supervised process: started again after a backoff when it dies."""

    name: str
    argv: list[str]
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    quick_deaths: int = 0  # deaths in a row, each soon after a start
    restart_at: float | None = None
    restarts: int = field(default=0)
    on_death: Callable[[int], None] = field(default=lambda pid: None)

    def start(self) -> None:
        self.proc = _start(self.argv, self.env)
        self.started_at, self.restart_at = time.monotonic(), None

    def check(self, now: float) -> str | None:
        """Notice a death and schedule the restart; start it when due. Returns a message to
        print, or raises typer.Exit when the child keeps dying at once."""
        if self.restart_at is not None:
            if now >= self.restart_at:
                self.restarts += 1
                self.start()
                return f"{self.name}: started again (restart {self.restarts})"
            return None
        if self.proc is None or self.proc.poll() is None:
            return None
        code = self.proc.returncode
        self.on_death(self.proc.pid)
        self.quick_deaths = self.quick_deaths + 1 if now - self.started_at < STABLE_S else 1
        if self.quick_deaths > MAX_QUICK_DEATHS:
            typer.echo(
                f"error: {self.name} died {self.quick_deaths} times in a row (code {code}); stopping",
                err=True,
            )
            raise typer.Exit(1)
        delay = BACKOFF_S[min(self.quick_deaths, len(BACKOFF_S)) - 1]
        self.restart_at = now + delay
        return f"{self.name} exited (code {code}); starting it again in {delay:.0f} s"


def _wait_healthy(url: str, proc: subprocess.Popen[bytes], instance: str, timeout: float = 60.0) -> bool:
    """True once /healthz answers with our instance token: an API left over from an earlier
    `akl serve` on the same port answers too, but not with this token."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            r = httpx.get(f"{url}/healthz", timeout=2)
            if r.status_code == 200 and r.json().get("instance") == instance:
                return True
        except (httpx.HTTPError, ValueError, AttributeError):
            pass
        time.sleep(0.3)
    return False


def stop_all(procs: list[subprocess.Popen[bytes]], timeout: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM each child once, wait, then SIGKILL the process groups that are left."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for proc in procs:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()


def serve(
    host: Annotated[str, typer.Option(help="address the API listens on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="API port")] = 8000,
    workers_concurrency: Annotated[
        int, typer.Option(min=1, max=64, help="worker processes (each runs one job at a time)")
    ] = 1,
    queues: Annotated[str, typer.Option(help="queues the workers consume")] = "gpu,cpu",
) -> None:
    """Run the API and a worker with SQLite and a file-system broker under AKL_DATA_ROOT."""
    from api.core.config import Settings
    from api.db.session import migrate

    busy = port_in_use(host, port)
    if busy is not None:
        typer.echo(
            f"error: cannot listen on {host}:{port}: {busy}. Another `akl serve` (or another program) "
            "may be using it; stop it or pass --port.",
            err=True,
        )
        raise typer.Exit(1)
    settings = Settings()
    data_root = settings.data_root.resolve()
    data_root.mkdir(parents=True, exist_ok=True)
    migrate(settings.database_url)
    instance = secrets.token_hex(8)
    env = {**service_env(data_root), INSTANCE_ENV: instance}
    if "gpu_workers" not in settings.model_fields_set:  # the operator's own AKL_GPU_WORKERS wins
        env["AKL_GPU_WORKERS"] = gpu_workers(queues, settings.gpu_queue, machine_has_gpu())
    stopping = {"signal": 0}

    def on_signal(signum: int, _frame: object) -> None:
        stopping["signal"] = signum

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    api = Child("the API", api_argv(host, port), env)
    release = functools.partial(expire_leases_of, settings.database_url)
    workers = [
        Child(f"worker akl-{i}", worker_argv(i, queues), env, on_death=release)
        for i in range(workers_concurrency)
    ]
    children = [api, *workers]
    for child in children:
        child.start()
    url = f"http://{host}:{port}"
    try:
        assert api.proc is not None
        if not _wait_healthy(url, api.proc, instance) and not stopping["signal"]:
            typer.echo(f"error: the API did not come up at {url}", err=True)
            raise typer.Exit(1)
        typer.echo(
            f"akl-distill is serving at {url} (data root {data_root}, database {settings.database_url})\n"
            f"Create a key:  AKL_DATA_ROOT={data_root} akl keys create --tenant NAME\n"
            f"Then:          export AKL_URL={url} AKL_API_KEY=...; akl submit examples/tiny.yaml --watch\n"
            "Stop with Ctrl-C.",
            err=True,
        )
        _supervise(children, stopping)
    finally:
        typer.echo("stopping: workers checkpoint and hand their jobs back ...", err=True)
        stop_all([c.proc for c in [*workers, api] if c.proc is not None])


def expire_leases_of(database_url: str, pid: int) -> None:
    """End the leases of a worker that died (owner ``host:pid:*``, ``JOBS.expire_leases``) now
    rather than when they run out: the restarted worker's reconciler takes its job at its first pass,
    and the resumed runner waits on the output lock for the orphan's exit checkpoint."""
    from api.db.session import make_engine, session_factory
    from api.lifecycle import CACHES, JOBS

    engine = make_engine(database_url)
    try:
        with session_factory(engine)() as session, session.begin():
            for lifecycle in (JOBS, CACHES):  # its job or its teacher-cache build
                lifecycle.expire_leases(session, f"{socket.gethostname()}:{pid}:")
    except Exception as exc:  # the lease then runs out by itself
        typer.echo(f"warning: could not release the jobs of worker pid {pid}: {exc}", err=True)
    finally:
        engine.dispose()


def _supervise(children: list[Child], stopping: dict[str, int]) -> None:
    """Until a signal: restart children that died (the others keep serving)."""
    while not stopping["signal"]:
        now = time.monotonic()
        for child in children:
            message = child.check(now)
            if message:
                typer.echo(message, err=True)
        time.sleep(0.5)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `akl` app."""
    app.command("serve")(serve)
