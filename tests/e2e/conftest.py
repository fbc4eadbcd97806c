"""The whole service as separate processes: PostgreSQL + a private Redis + ``celery worker`` +
uvicorn, or ``akl serve``; jobs run the real runner on the tiny preset."""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.reliability.conftest import tiny_job
from tests.worker import services


def tiny_spec(workdir: Path, *, steps: int = 6, checkpoint_every: int = 3) -> dict:
    """The reliability suite's tiny job (data from a local file the client uploads), with longer
    sequences and a little more validation and generation."""
    return tiny_job(
        workdir,
        steps=steps,
        checkpoint_every=checkpoint_every,
        data={"max_validation_examples": 4},
        training={"max_length": 96, "max_prompt_length": 64},
        evaluation={"max_new_tokens": 8},
    )


def load_and_generate(model_dir: Path) -> str:
    """The downloaded model loads with plain transformers and generates."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    inputs = tokenizer("Continue the passage:", return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] > inputs["input_ids"].shape[1]
    return tokenizer.decode(out[0])


@dataclass
class Stack:
    url: str
    database_url: str
    env: dict[str, str]
    logs: Path

    def http(self, key: str) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {key}"}, timeout=60)

    def new_key(self, tenant: str) -> str:
        from api.crud import api_keys
        from api.db.session import get_engine, session_factory

        with session_factory(get_engine(self.database_url))() as session:
            _, new = api_keys.create_key(session=session, tenant_name=tenant)
            session.commit()
        return new.key

    def log_tail(self) -> str:
        return "\n".join(
            f"== {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(self.logs.glob("*.log"))
        )


@pytest.fixture(scope="module")
def redis_stack(models_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """PostgreSQL + Redis + one celery worker + the API, all real processes."""
    if not services.postgres_available():
        pytest.skip("PostgreSQL is not reachable at AKL_TEST_POSTGRES_URL")
    root = tmp_path_factory.mktemp("stack")
    with services.redis_server() as redis_url, services.postgres_database() as db_url:
        port = services.free_port()
        env = {
            **os.environ,
            "AKL_DATA_ROOT": str(root / "data"),
            "AKL_DATABASE_URL": db_url,
            "AKL_BROKER_URL": redis_url,
            "AKL_MODELS_ROOT": str(models_root),
            "AKL_WORKER_TICK_S": "1",
        }
        worker = services.start_group(
            [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "-Q", "gpu,cpu", "--pool",
             "solo", "-n", f"e2e-{uuid.uuid4().hex[:6]}@%h", "--without-gossip", "--without-mingle",
             "--without-heartbeat", "--loglevel", "INFO"],
            env=env, log=root / "worker.log",
        )  # fmt: skip
        api = services.start_group(
            [sys.executable, "-m", "uvicorn", "api.main:app", "--host", "127.0.0.1", "--port", str(port)],
            env=env, log=root / "api.log",
        )  # fmt: skip
        try:
            url = f"http://127.0.0.1:{port}"
            services.wait_for(lambda: httpx.get(f"{url}/healthz").status_code == 200, 60, "the API")
            yield Stack(url=url, database_url=db_url, env=env, logs=root)
        finally:
            services.stop_group(api)
            services.stop_group(worker, timeout=30)
