"""The official ``openai`` package drives the service unchanged, only ``base_url`` and ``api_key``
set (issue 13): files, fine-tuning jobs, events, checkpoints, models, typed errors, tenants.

One live stack for the module: ``akl serve`` (uvicorn and a real worker process, SQLite and the
file-system broker) on a free port, with its own data root and models root.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.reliability.conftest import DEMO
from tests.worker import services

pytestmark = pytest.mark.integration

AKL = [sys.executable, "-m", "akl_cli.main"]
TRAIN = b"".join(DEMO.read_bytes().splitlines(keepends=True)[:32])


class Live:
    def __init__(self, root: Path, models_root: Path) -> None:
        self.port = services.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "AKL_DATA_ROOT": str(root / "data"), "AKL_MODELS_ROOT": str(models_root),
                    "AKL_WORKER_CANCEL_POLL_S": "1"}  # fmt: skip
        for name in ("AKL_DATABASE_URL", "AKL_BROKER_URL", "AKL_ARTIFACTS_ROOT", "AKL_API_KEY"):
            self.env.pop(name, None)
        self.log = root / "serve.log"
        self.proc = services.start_group(
            AKL + ["serve", "--port", str(self.port)], env=self.env, log=self.log
        )
        services.wait_for(lambda: httpx.get(f"{self.url}/healthz").status_code == 200, 90, "akl serve")

    def key(self, tenant: str) -> str:
        done = subprocess.run(
            AKL + ["keys", "create", "--tenant", tenant],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    def client(self, key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def live(models_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    root = tmp_path_factory.mktemp("openai")
    own_models = root / "models"  # its own: distilled copies land in it (api/core/distilled.py)
    shutil.copytree(models_root / "tiny", own_models / "tiny")
    service = Live(root, own_models)
    try:
        yield service
    finally:
        services.stop_group(service.proc, signal.SIGINT, timeout=60)


@pytest.fixture(scope="module")
def acme(live: Live) -> openai.OpenAI:
    return live.client(live.key("acme"))


@pytest.fixture(scope="module")
def other(live: Live) -> openai.OpenAI:
    return live.client(live.key("other"))


def distillation(teacher: str = "preset:tiny", layers: int = 2, steps: int = 4, **sections) -> dict:
    """A cpu distillation on the tiny preset: a few steps, a checkpoint every 2, tiny evaluation."""
    return {
        "type": "distillation",
        "distillation": {
            "teacher": teacher,
            "student": {"init": "truncate", "num_layers": layers},
            "data": {"max_validation_examples": 2},
            "training": {"max_steps": steps, "learning_rate": 1e-3, "max_length": 64, "max_prompt_length": 48},
            "evaluation": {"num_examples": 2, "seeds": [10], "max_new_tokens": 4, "batch_size": 2,
                           "teacher_reference": False},
            "checkpointing": {"every_steps": 2, "keep": 2},
            "resources": {"device": "cpu"},
            **sections,
        },
    }  # fmt: skip


def wait_done(client: openai.OpenAI, job_id: str, timeout: float = 240) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.5)
    raise TimeoutError(f"job {job_id} still {job.status}")


def test_files_create_retrieve_list_content_delete(acme: openai.OpenAI) -> None:
    created = acme.files.create(file=("train.jsonl", TRAIN), purpose="fine-tune")
    assert (created.object, created.purpose, created.bytes, created.filename) == (
        "file", "fine-tune", len(TRAIN), "train.jsonl"
    )  # fmt: skip
    assert created.status == "processed" and created.created_at > 0
    assert acme.files.retrieve(created.id).id == created.id
    assert created.id in [f.id for f in acme.files.list()]
    assert acme.files.content(created.id).content == TRAIN
    native = acme.files.create(file=("val.jsonl", TRAIN), purpose="validation")  # our purposes stay
    assert native.purpose == "validation"
    deleted = acme.files.delete(created.id)
    assert deleted.deleted and deleted.id == created.id
    with pytest.raises(openai.NotFoundError, match=created.id):
        acme.files.retrieve(created.id)


def test_a_missing_or_wrong_key_is_401_on_every_v1_path(live: Live) -> None:
    for key in ("akl-000000000000-wrong", "nonsense"):  # the SDK itself refuses to send no key
        client = live.client(key)
        for call in (client.files.list, client.models.list, client.fine_tuning.jobs.list):
            with pytest.raises(openai.AuthenticationError) as err:
                call()
            assert "a valid API key is required" in err.value.message
            assert err.value.type == "authentication_error"
        with pytest.raises(openai.AuthenticationError):
            client.fine_tuning.jobs.retrieve("job-doesnotexist")
    paths = ("/v1/files", "/v1/models", "/v1/nothing-here", "/v1", "/v1/fine_tuning/jobs/x/unknown")
    for path in paths:  # known and unknown, no key or a wrong one, whatever the body
        for headers in ({}, {"Authorization": "Bearer akl-000000000000-wrong"}):
            response = httpx.post(f"{live.url}{path}", content=b"{not json", headers=headers)
            assert response.status_code == 401, (path, response.text)
            assert response.json()["error"]["type"] == "authentication_error"


def test_typed_errors_carry_our_message(acme: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        acme.fine_tuning.jobs.retrieve("job-000000000000000000000000")
    assert "job 'job-000000000000000000000000' not found" in err.value.message
    with pytest.raises(openai.NotFoundError) as err:
        acme.fine_tuning.jobs.create(model="preset:tiny", training_file="file-nope", method=distillation())
    assert err.value.param == "training_file" and "file 'file-nope' not found" in err.value.message
    with pytest.raises(openai.UnprocessableEntityError) as err:  # an invalid spec
        acme.fine_tuning.jobs.create(
            model="preset:tiny", training_file="demo:train", method=distillation(loss={"name": "nope"})
        )
    assert err.value.param == "method.distillation.loss.name"
    with pytest.raises(openai.UnprocessableEntityError) as err:
        acme.fine_tuning.jobs.create(
            model="preset:tiny", training_file="demo:train", method=distillation(layers=9)
        )
    assert "9 is more than the teacher's 4 layers" in err.value.message
    with pytest.raises(openai.UnprocessableEntityError, match="must name the teacher"):
        acme.fine_tuning.jobs.create(model="other-model", training_file="demo:train", method=distillation())
    with pytest.raises(openai.NotFoundError):
        acme.models.retrieve("ft:job-000000000000000000000000")


def test_models_lists_presets_with_their_facts(acme: openai.OpenAI) -> None:
    models = {m.id: m for m in acme.models.list()}
    tiny = models["preset:tiny"]
    assert (tiny.object, tiny.owned_by) == ("model", "system")
    facts = tiny.model_dump()
    assert facts["num_layers"] == 4 and facts["vocab_size"] == 768 and facts["prepared"] is True
    assert facts["parameters"] == 246_336 and facts["architecture"] == "LlamaForCausalLM"
    assert facts["roles"] == ["teacher", "student"] and len(facts["tokenizer_digest"]) == 16
    assert models["preset:smollm2-135m-instruct"].model_dump()["num_layers"] == 30
    assert acme.models.retrieve("preset:tiny").model_dump()["parameters"] == 246_336


def test_cancel_and_a_second_cancel_conflicts(acme: openai.OpenAI) -> None:
    job = acme.fine_tuning.jobs.create(
        model="preset:tiny", training_file="demo:train", method=distillation(steps=5000)
    )
    assert job.object == "fine_tuning.job" and job.status in ("queued", "running")
    cancelled = acme.fine_tuning.jobs.cancel(job.id)
    assert cancelled.id == job.id
    assert wait_done(acme, job.id, timeout=120).status == "cancelled"
    with pytest.raises(openai.ConflictError, match="already cancelled"):
        acme.fine_tuning.jobs.cancel(job.id)


@pytest.mark.slow
def test_a_distilled_model_serves_a_second_job(live: Live, acme: openai.OpenAI, other: openai.OpenAI) -> None:
    train = acme.files.create(file=("train.jsonl", TRAIN), purpose="fine-tune")
    first = acme.fine_tuning.jobs.create(
        model="preset:tiny",
        training_file=train.id,
        validation_file=train.id,  # a fine-tune file serves as either
        hyperparameters={"batch_size": 2, "learning_rate_multiplier": 2.0},
        method=distillation(),
        seed=7,
        suffix="mini",
        metadata={"team": "search"},
    )
    assert first.model == "preset:tiny" and first.training_file == train.id and first.seed == 7
    assert first.hyperparameters.batch_size == 2 and first.metadata == {"team": "search"}
    done = wait_done(acme, first.id)
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model == f"ft:{first.id}:mini" and done.finished_at
    every = [job.id for job in acme.fine_tuning.jobs.list(limit=50)]
    page = acme.fine_tuning.jobs.list(limit=1)
    assert first.id in every and len(page.data) == 1 and page.has_more == (len(every) > 1)
    assert [job.id for job in acme.fine_tuning.jobs.list(limit=1)] == every  # the SDK follows `after`

    events = acme.fine_tuning.jobs.list_events(first.id, limit=100).data
    assert events and all(e.object == "fine_tuning.job.event" for e in events)
    assert events[0].created_at >= events[-1].created_at  # newest first
    older = acme.fine_tuning.jobs.list_events(first.id, after=events[0].id, limit=100).data
    assert [e.id for e in older] == [e.id for e in events[1:]]

    checkpoints = acme.fine_tuning.jobs.checkpoints.list(first.id).data
    assert checkpoints[0].fine_tuned_model_checkpoint == done.fine_tuned_model  # the final model first
    assert checkpoints[0].step_number == 4
    assert {"g_head", "g_tail", "w_head", "train_loss"} <= checkpoints[0].metrics.model_dump().keys()
    assert isinstance(checkpoints[0].metrics.model_dump()["g_head"], float)

    model = acme.models.retrieve(done.fine_tuned_model).model_dump()
    assert (model["num_layers"], model["vocab_size"], model["owned_by"]) == (2, 768, "user")
    assert model["tokenizer_digest"] == acme.models.retrieve("preset:tiny").model_dump()["tokenizer_digest"]
    assert done.fine_tuned_model in [m.id for m in acme.models.list()]
    archive = httpx.get(
        f"{live.url}{model['download_url']}", headers={"Authorization": f"Bearer {acme.api_key}"}
    )
    assert archive.status_code == 200
    with tarfile.open(fileobj=io.BytesIO(archive.content)) as tar:
        assert any(name.endswith("config.json") for name in tar.getnames())

    # Another tenant sees none of it.
    for call in (lambda: other.fine_tuning.jobs.retrieve(first.id), lambda: other.files.retrieve(train.id),
                 lambda: other.models.retrieve(done.fine_tuned_model),
                 lambda: other.fine_tuning.jobs.list_events(first.id)):  # fmt: skip
        with pytest.raises(openai.NotFoundError):
            call()
    assert done.fine_tuned_model not in [m.id for m in other.models.list()]
    with pytest.raises(openai.NotFoundError, match="no succeeded job of yours"):
        other.fine_tuning.jobs.create(
            model=done.fine_tuned_model,
            training_file="demo:train",
            method=distillation(done.fine_tuned_model, 1),
        )

    # The distilled model teaches a second job.
    second = acme.fine_tuning.jobs.create(
        model=done.fine_tuned_model,
        training_file=train.id,
        validation_file="demo:validation",
        method=distillation(teacher=done.fine_tuned_model, layers=1, steps=2),
    )
    assert second.model == done.fine_tuned_model
    finished = wait_done(acme, second.id)
    assert finished.status == "succeeded", finished.error
    assert acme.models.retrieve(finished.fine_tuned_model).model_dump()["num_layers"] == 1
