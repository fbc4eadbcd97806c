"""``akl serve``: the embedded default in one command.

SQLite and a file-system Celery broker under the data root, the API (uvicorn) and Celery workers
as child processes. Ctrl-C / SIGTERM stops them cleanly: each worker stops its running job (the
runner writes a checkpoint), gives it back to the queue, and the next ``akl serve`` resumes it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

STOP_TIMEOUT_S = 45.0  # a worker's job gets term_grace_s (10 s) to checkpoint, plus start-up slack


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


def _start(argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    # Own session: a Ctrl-C in the terminal reaches only `akl serve`, which stops the children in
    # order (a worker must get exactly one SIGTERM for a warm shutdown).
    return subprocess.Popen(argv, env=env, start_new_session=True)


def _wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> bool:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return True
        except httpx.HTTPError:
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
    port: Annotated[int, typer.Option(help="API port")] = 8000,
    workers_concurrency: Annotated[
        int, typer.Option(min=1, max=64, help="worker processes (each runs one job at a time)")
    ] = 1,
    queues: Annotated[str, typer.Option(help="queues the workers consume")] = "gpu,cpu",
) -> None:
    """Run the API and a worker with SQLite and a file-system broker under AKL_DATA_ROOT."""
    from api.core.config import Settings
    from api.db.session import migrate

    settings = Settings()
    data_root = settings.data_root.resolve()
    data_root.mkdir(parents=True, exist_ok=True)
    migrate(settings.database_url)
    env = service_env(data_root)
    if "gpu_workers" not in settings.model_fields_set:  # the operator's own AKL_GPU_WORKERS wins
        env["AKL_GPU_WORKERS"] = gpu_workers(queues, settings.gpu_queue, machine_has_gpu())
    stopping = {"signal": 0}

    def on_signal(signum: int, _frame: object) -> None:
        stopping["signal"] = signum

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    api = _start(api_argv(host, port), env)
    workers = [_start(worker_argv(i, queues), env) for i in range(workers_concurrency)]
    procs = [api, *workers]
    url = f"http://{host}:{port}"
    try:
        if not _wait_healthy(url, api) and not stopping["signal"]:
            typer.echo(f"error: the API did not come up at {url}", err=True)
            raise typer.Exit(1)
        typer.echo(
            f"akl-distill is serving at {url} (data root {data_root}, database {settings.database_url})\n"
            f"Create a key:  AKL_DATA_ROOT={data_root} akl keys create --tenant NAME\n"
            f"Then:          export AKL_URL={url} AKL_API_KEY=...; akl submit examples/tiny.yaml --watch\n"
            "Stop with Ctrl-C.",
            err=True,
        )
        while not stopping["signal"]:
            exited = [p for p in procs if p.poll() is not None]
            if exited:
                typer.echo(
                    f"error: a service process exited (code {exited[0].returncode}); stopping", err=True
                )
                raise typer.Exit(1)
            time.sleep(0.5)
    finally:
        typer.echo("stopping: workers checkpoint and hand their jobs back ...", err=True)
        stop_all([*workers, api])


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `akl` app."""
    app.command("serve")(serve)
