"""The embedded default: ``akl serve`` (SQLite + file-system broker) and the ``akl`` client."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml
from sqlalchemy import select

from tests.e2e.conftest import load_and_generate, tiny_spec
from tests.worker import services

pytestmark = pytest.mark.integration

AKL = [sys.executable, "-m", "akl_cli.main"]


def _akl(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 180) -> str:
    done = subprocess.run(AKL + args, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"akl {args} -> {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _serve(env: dict[str, str], port: int, log: Path) -> subprocess.Popen:
    proc = services.start_group(AKL + ["serve", "--port", str(port)], env=env, log=log)
    url = f"http://127.0.0.1:{port}"
    services.wait_for(lambda: httpx.get(f"{url}/healthz").status_code == 200, 90, "akl serve")
    return proc


def _job_row(data_root: Path, job_id: str):
    from api.db.models import Job
    from api.db.session import make_engine, session_factory

    engine = make_engine(f"sqlite:///{data_root / 'akl.db'}")
    try:
        with session_factory(engine)() as session:
            return session.scalar(select(Job).where(Job.id == job_id))
    finally:
        engine.dispose()


class Embedded:
    """`akl serve` on a free port with its own data root; ``proc`` is the current serve process."""

    def __init__(self, models_root: Path, root: Path):
        self.root, self.data_root, self.port = root, root / "data", services.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "AKL_DATA_ROOT": str(self.data_root), "AKL_MODELS_ROOT": str(models_root),
                    "AKL_URL": self.url, "AKL_WORKER_TICK_S": "1"}  # fmt: skip
        for name in ("AKL_DATABASE_URL", "AKL_BROKER_URL", "AKL_ARTIFACTS_ROOT", "AKL_API_KEY"):
            self.env.pop(name, None)
        self.starts = 0
        self.proc = self.start()
        self.env["AKL_API_KEY"] = _akl(["keys", "create", "--tenant", "embedded"], self.env, root).strip()

    def start(self) -> subprocess.Popen:
        self.starts += 1
        self.log = self.root / f"serve{self.starts}.log"
        self.proc = _serve(self.env, self.port, self.log)
        return self.proc

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.env['AKL_API_KEY']}"})


@pytest.fixture(scope="module")
def embedded(models_root: Path, tmp_path_factory: pytest.TempPathFactory):
    service = Embedded(models_root, tmp_path_factory.mktemp("embedded"))
    try:
        yield service
    finally:
        services.stop_group(service.proc, signal.SIGINT, timeout=60)


def test_akl_serve_runs_a_job_submitted_with_the_cli(embedded: Embedded, tmp_path: Path):
    env = embedded.env
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(tiny_spec(tmp_path, steps=4, checkpoint_every=2)))
    out = _akl(["submit", "job.yaml", "--watch"], env, tmp_path)
    job_id = out.split()[0]
    assert job_id.startswith("job-") and "succeeded" in out and "g_head=" in out, out
    assert "succeeded  step 4/4" in _akl(["status", job_id], env, tmp_path)
    assert job_id in _akl(["status"], env, tmp_path)
    model_dir = Path(_akl(["download", job_id, "--output", "models-out"], env, tmp_path).strip())
    assert load_and_generate(tmp_path / model_dir)


def test_cuda_jobs_are_refused_when_the_machine_has_no_gpu(embedded: Embedded):
    """`akl serve` tells its API whether its workers can run cuda jobs (akl_cli/serve.py)."""
    from akl_cli.serve import machine_has_gpu

    body = {"teacher": "preset:tiny", "student": {"init": "truncate", "num_layers": 1},
            "data": {"train": "demo:train"}, "training": {"max_steps": 1}, "resources": {"device": "cuda"}}  # fmt: skip
    with embedded.http() as http:
        response = http.post("/v1/jobs", json=body)
        if machine_has_gpu():
            assert response.status_code == 201, response.text
            http.post(f"/v1/jobs/{response.json()['id']}/cancel")
        else:
            assert response.status_code == 422, response.text
            assert "AKL_GPU_WORKERS=false" in response.json()["detail"]
            jobs = http.get("/v1/jobs").json()["data"]
            assert all(job["spec"]["resources"]["device"] != "cuda" for job in jobs)  # none stored


def test_ctrl_c_hands_a_running_job_back_and_the_next_serve_resumes_it(embedded: Embedded, tmp_path: Path):
    env, data_root = embedded.env, embedded.data_root
    (tmp_path / "long.yaml").write_text(yaml.safe_dump(tiny_spec(tmp_path, steps=400, checkpoint_every=1000)))
    long_id = _akl(["submit", "long.yaml"], env, tmp_path).split()[0]
    services.wait_for(
        lambda: (_job_row(data_root, long_id).current_step or 0) >= 2, 90, "the long job to run"
    )
    os.killpg(embedded.proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
    assert embedded.proc.wait(timeout=60) == 0, embedded.log.read_text()[-3000:]
    job = _job_row(data_root, long_id)
    assert (job.status, job.lease_owner, job.attempts) == ("queued", None, 0), embedded.log.read_text()[
        -3000:
    ]
    stopped_at = job.current_step
    assert (Path(job.output_dir) / f"checkpoints/step-{stopped_at:08d}").is_dir()

    # Started again, the worker takes the job from the broker folder and resumes from the checkpoint.
    embedded.start()
    services.wait_for(lambda: (_job_row(data_root, long_id).current_step or 0) > stopped_at, 90, "the resume")
    with embedded.http() as http:
        assert http.post(f"/v1/jobs/{long_id}/cancel").status_code == 200
        services.wait_for(
            lambda: http.get(f"/v1/jobs/{long_id}").json()["status"] == "cancelled", 30, "cancel"
        )
        steps = [p["step"] for p in http.get(f"/v1/jobs/{long_id}/metrics").json()["data"]]
    assert steps == list(range(1, steps[-1] + 1))  # resumed history: no gaps, no duplicates
    assert steps[-1] > stopped_at
    events = (Path(job.output_dir) / "events.jsonl").read_text()
    assert f'"resumed_from_step":{stopped_at}' in events.replace(" ", "")
