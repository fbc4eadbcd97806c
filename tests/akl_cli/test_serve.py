"""``akl serve`` supervises its children (real processes, real SIGKILL): a killed worker is
started again while the API keeps answering and its job resumes from the step it reached; a killed
``akl serve`` leaves no process behind; a port in use is refused before anything starts."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from akl_cli.serve import port_in_use
from tests.reliability.conftest import tiny_job
from tests.worker import services

pytestmark = pytest.mark.integration

AKL = [sys.executable, "-m", "akl_cli.main"]
FAST = {"AKL_WORKER_LEASE_S": "6", "AKL_WORKER_TICK_S": "0.5", "AKL_WORKER_RECONCILE_EVERY_S": "1"}


def _env(root: Path, models_root: Path) -> dict[str, str]:
    env = {**os.environ, "AKL_DATA_ROOT": str(root / "data"), "AKL_MODELS_ROOT": str(models_root), **FAST}
    for name in ("AKL_DATABASE_URL", "AKL_BROKER_URL", "AKL_ARTIFACTS_ROOT", "AKL_API_KEY"):
        env.pop(name, None)
    return env


def _serve(env: dict[str, str], port: int, log: Path) -> subprocess.Popen:
    proc = services.start_group(AKL + ["serve", "--port", str(port)], env=env, log=log)
    url = f"http://127.0.0.1:{port}"
    services.wait_for(lambda: httpx.get(f"{url}/healthz").status_code == 200, 90, "akl serve")
    return proc


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _worker(serve: subprocess.Popen) -> psutil.Process:
    (worker,) = [p for p in psutil.Process(serve.pid).children() if "celery" in " ".join(p.cmdline())]
    return worker


def test_a_second_serve_on_a_port_in_use_refuses_before_starting_anything(tmp_path, models_root):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert port_in_use("127.0.0.1", port)
        done = subprocess.run(
            AKL + ["serve", "--port", str(port)],
            env=_env(tmp_path, models_root),
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 1, done.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr and "--port" in done.stderr
    assert "serving" not in done.stderr
    assert not (tmp_path / "data").exists()  # nothing was started, not even the database


def test_sigkill_of_serve_leaves_no_process_behind(tmp_path, models_root):
    port = services.free_port()
    serve = _serve(_env(tmp_path, models_root), port, tmp_path / "serve.log")
    try:
        children = psutil.Process(serve.pid).children(recursive=True)
        assert len(children) >= 2  # the API and a worker
        os.kill(serve.pid, signal.SIGKILL)
        serve.wait(timeout=10)
        services.wait_for(lambda: not any(_alive(c.pid) for c in children), 60, "the children to exit")
        assert port_in_use("127.0.0.1", port) is None  # a new `akl serve` can start
    finally:
        services.stop_group(serve, signal.SIGKILL)


def test_a_killed_worker_is_restarted_the_api_stays_up_and_the_job_resumes_where_it_was(
    tmp_path, models_root
):
    env, port = _env(tmp_path, models_root), services.free_port()
    serve = _serve(env, port, tmp_path / "serve.log")
    url = f"http://127.0.0.1:{port}"
    try:
        key = subprocess.run(
            AKL + ["keys", "create", "--tenant", "t"], env=env, capture_output=True, text=True, check=True
        ).stdout.strip()
        steps = 200
        spec = tiny_job(tmp_path, steps=steps)  # no periodic checkpoint: only the exit one can exist
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as http:
            with open(spec["data"]["train"], "rb") as f:
                r = http.post("/v1/files", files={"file": ("train.jsonl", f)}, data={"purpose": "train"})
            spec["data"]["train"] = r.json()["id"]
            job_id = http.post("/v1/jobs", json=spec).json()["id"]
            run_events = tmp_path / "data/artifacts" / job_id / "events.jsonl"
            services.wait_for(lambda: services.runner_reached(run_events, 3), 180, "steps")
            old = _worker(serve)
            old.kill()
            deadline, answered = time.monotonic() + 20, 0
            while time.monotonic() < deadline:  # the API keeps answering while the worker is down
                assert http.get("/healthz", timeout=2).status_code == 200
                answered += 1
                time.sleep(0.5)
            assert _worker(serve).pid != old.pid and serve.poll() is None
            services.wait_for(
                lambda: http.get(f"/v1/jobs/{job_id}").json()["status"] == "succeeded", 240, "the resumed job"
            )
            job = http.get(f"/v1/jobs/{job_id}").json()
            history = http.get(f"/v1/jobs/{job_id}/metrics").json()["data"]
            events = http.get(f"/v1/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]
        assert [p["step"] for p in history] == list(range(1, steps + 1))  # no gaps, no duplicates
        run = [json.loads(line) for line in (tmp_path / "data/artifacts" / job_id / "events.jsonl").open()]
        starts = [i for i, e in enumerate(run) if e["type"] == "started"]
        assert len(starts) == 2, [e["type"] for e in run]
        reached = max(e["step"] for e in run[: starts[1]] if e["type"] == "step")
        assert run[starts[1]]["resumed_from_step"] == reached >= 3  # the orphan's exit checkpoint
        assert any(e["type"] == "resumed" and f"step {reached}" in e["message"] for e in events), events
        assert "worker" in next(e["message"] for e in events if e["type"] == "resumed")  # and why
        assert [e["type"] for e in events].count("loading") == 2  # one per run
        assert all(p["created_at"] for p in history)
        completed = next(e for e in events if e["type"] == "completed")
        assert job["finished_at"] - completed["created_at"] <= 2  # succeeded follows the runner at once
    finally:
        services.stop_group(serve, signal.SIGINT, timeout=60)


def test_a_child_that_keeps_dying_is_restarted_with_backoff_then_given_up(tmp_path):
    import typer

    from akl_cli import serve

    deaths: list[int] = []
    child = serve.Child("worker akl-0", [sys.executable, "-c", "raise SystemExit(3)"], dict(os.environ),
                        on_death=deaths.append)  # fmt: skip
    child.start()
    now, delays = time.monotonic(), []
    for _ in range(serve.MAX_QUICK_DEATHS):
        child.proc.wait(timeout=30)
        message = child.check(now)
        assert message is not None and "exited (code 3)" in message
        delays.append(child.restart_at - now)
        assert child.check(now) is None  # not yet due
        now = child.restart_at
        assert "started again" in child.check(now)
    assert delays == list(serve.BACKOFF_S) and len(deaths) == serve.MAX_QUICK_DEATHS
    child.proc.wait(timeout=30)
    with pytest.raises(typer.Exit):
        child.check(now)  # the 7th death in a row within STABLE_S of its start: give up
