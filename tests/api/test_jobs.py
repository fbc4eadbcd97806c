from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from api.core.config import Settings
from api.db.models import FAILED, RUNNING, SUCCEEDED, Job, JobEvent
from api.main import create_app
from tests.api.conftest import broker_messages, job_body, upload


def test_create_job_stores_it_queued_and_publishes_by_task_name(
    client: TestClient, headers: dict[str, str], settings: Settings, db: Session
) -> None:
    file_id = upload(client, headers).json()["id"]
    response = client.post(
        "/v1/jobs", headers=headers, json=job_body(data={"train": file_id}, metadata={"run": "a"})
    )
    assert response.status_code == 201, response.text
    job = response.json()
    assert job["object"] == "distillation.job" and job["id"].startswith("job-")
    assert job["status"] == "queued" and job["queue"] == "cpu" and job["metadata"] == {"run": "a"}
    assert job["training_file"] == file_id and job["error"] is None and job["started_at"] is None
    assert (
        job["spec"]["training"]["max_steps"] == 2 and job["spec"]["loss"]["name"] == "akl"
    )  # defaults filled
    row = db.get(Job, job["id"])
    assert row is not None and row.status == "queued" and row.enqueued_at is not None
    assert row.resolved_spec["data"]["train"].endswith(f"{file_id}.jsonl")  # file id -> stored path
    assert row.output_dir == str(settings.artifacts_root.resolve() / job["id"])
    assert broker_messages(settings) == [{"task": "akl.run_job", "args": [job["id"]], "queue": "cpu"}]
    events = db.scalars(select(JobEvent.type).where(JobEvent.job_id == job["id"])).all()
    assert events == ["created"]


def test_device_picks_the_queue(client: TestClient, headers: dict[str, str], settings: Settings) -> None:
    for device in ("cuda", "auto"):
        response = client.post("/v1/jobs", headers=headers, json=job_body(resources={"device": device}))
        assert response.json()["queue"] == "gpu"
    assert [m["queue"] for m in broker_messages(settings)] == ["gpu", "gpu"]


def test_broker_down_still_creates_the_queued_job(
    settings: Settings, headers: dict[str, str], db: Session
) -> None:
    down = settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0", "enqueue_timeout_s": 0.5})
    with TestClient(create_app(down)) as client:
        response = client.post("/v1/jobs", headers=headers, json=job_body())
    assert response.status_code == 201, response.text
    row = db.get(Job, response.json()["id"])
    assert row is not None and row.status == "queued"  # the reconciler will publish it


def test_validation_errors_are_422_naming_the_field(client: TestClient, headers: dict[str, str]) -> None:
    cases = [
        (job_body(training={"learning_rate": 5}), ["body", "training", "learning_rate"]),
        (job_body(loss={"name": "nope"}), ["body", "loss", "name"]),
        (job_body(surprise=1), ["body", "surprise"]),
        ({"data": {"train": "demo:train"}}, ["body", "teacher"]),
        (job_body(teacher="../etc"), ["body", "teacher"]),
        (job_body(metadata={f"k{i}": "v" for i in range(17)}), ["body", "metadata"]),
    ]
    for body, loc in cases:
        response = client.post("/v1/jobs", headers=headers, json=body)
        assert response.status_code == 422, (body, response.text)
        assert any(error["loc"] == loc for error in response.json()["detail"]), response.json()
    bad_json = client.post(
        "/v1/jobs", headers={**headers, "Content-Type": "application/json"}, content=b"{nope"
    )
    assert bad_json.status_code == 422


def test_unknown_files_and_models_are_refused_with_a_message(
    client: TestClient,
    headers: dict[str, str],
    make_headers: Callable[[str], dict[str, str]],
    settings: Settings,
) -> None:
    other = upload(client, make_headers("other")).json()["id"]
    validation_file = upload(client, headers, purpose="validation").json()["id"]
    cases = [
        (job_body(data={"train": "file-doesnotexist"}), 404, "data.train"),
        (job_body(data={"train": other}), 404, "data.train"),  # another tenant's file
        (job_body(data={"train": "/etc/passwd"}), 422, "data.train"),
        (job_body(data={"train": validation_file}), 422, "purpose"),
        (job_body(data={"train": "demo:train", "validation": "file-x"}), 404, "data.validation"),
        (job_body(teacher="preset:huge"), 404, "unknown preset"),
        (job_body(teacher="no-such-dir"), 404, "teacher"),
        (job_body(teacher="hf:org/model"), 403, "AKL_ALLOW_HUB"),
        (job_body(student={"init": "pretrained", "model": "missing"}), 404, "student.model"),
    ]
    for body, code, words in cases:
        response = client.post("/v1/jobs", headers=headers, json=body)
        assert response.status_code == code, (body, response.text)
        assert words in response.json()["detail"]
    ok = client.post(
        "/v1/jobs", headers=headers, json=job_body(student={"init": "pretrained", "model": "my-student"})
    )
    assert ok.status_code == 201, ok.text
    assert len(broker_messages(settings)) == 1  # refused jobs were never published


def test_hub_refs_allowed_when_the_operator_says_so(settings: Settings, headers: dict[str, str]) -> None:
    with TestClient(create_app(settings.model_copy(update={"allow_hub": True}))) as client:
        response = client.post("/v1/jobs", headers=headers, json=job_body(teacher="hf:org/model"))
    assert response.status_code == 201, response.text


def test_list_jobs_paginates_newest_first_and_filters(
    client: TestClient, headers: dict[str, str], db: Session
) -> None:
    ids = [client.post("/v1/jobs", headers=headers, json=job_body()).json()["id"] for _ in range(5)]
    seen, after = [], None
    while True:
        params = {"limit": 2, **({"after": after} if after else {})}
        page = client.get("/v1/jobs", headers=headers, params=params).json()
        seen += [job["id"] for job in page["data"]]
        assert page["object"] == "list" and len(page["data"]) <= 2
        if not page["has_more"]:
            break
        after = page["last_id"]
    assert seen == ids[::-1]
    db.execute(update(Job).where(Job.id == ids[1]).values(status=FAILED))
    db.commit()
    failed = client.get("/v1/jobs", headers=headers, params={"status": "failed"}).json()
    assert [job["id"] for job in failed["data"]] == [ids[1]] and failed["has_more"] is False
    assert client.get("/v1/jobs", headers=headers, params={"status": "weird"}).status_code == 422
    assert client.get("/v1/jobs", headers=headers, params={"limit": 0}).status_code == 422
    assert client.get("/v1/jobs", headers=headers, params={"after": "job-nope"}).status_code == 400


def test_get_job_reports_progress_metrics_and_error(
    client: TestClient, headers: dict[str, str], db: Session
) -> None:
    job_id = client.post("/v1/jobs", headers=headers, json=job_body()).json()["id"]
    db.execute(
        update(Job)
        .where(Job.id == job_id)
        .values(status=FAILED, progress=0.5, current_step=1, total_steps=2, trained_tokens=123,
                current_metrics={"loss": 1.5}, error_code="nan_loss", error_message="loss is NaN at step 1")
    )  # fmt: skip
    db.commit()
    job = client.get(f"/v1/jobs/{job_id}", headers=headers).json()
    assert (job["status"], job["progress"], job["current_step"], job["total_steps"]) == ("failed", 0.5, 1, 2)
    assert job["trained_tokens"] == 123 and job["metrics"] == {"loss": 1.5}
    assert job["error"] == {"code": "nan_loss", "message": "loss is NaN at step 1"}
    assert isinstance(job["created_at"], int) and job["model_url"] is None


def test_cancel_queued_running_and_finished(client: TestClient, headers: dict[str, str], db: Session) -> None:
    queued, running, done = (
        client.post("/v1/jobs", headers=headers, json=job_body()).json()["id"] for _ in range(3)
    )
    db.execute(update(Job).where(Job.id == running).values(status=RUNNING))
    db.execute(update(Job).where(Job.id == done).values(status=SUCCEEDED))
    db.commit()
    response = client.post(f"/v1/jobs/{queued}/cancel", headers=headers)
    assert response.status_code == 200
    assert response.json()["status"] == "cancelled" and response.json()["finished_at"] is not None
    response = client.post(f"/v1/jobs/{running}/cancel", headers=headers)
    assert response.status_code == 200
    assert response.json()["status"] == "running" and response.json()["cancel_requested"] is True
    assert client.post(f"/v1/jobs/{running}/cancel", headers=headers).status_code == 200  # asked twice
    events = client.get(f"/v1/jobs/{running}/events", headers=headers).json()["data"]
    assert [event["type"] for event in events] == ["created", "cancel_requested"]
    response = client.post(f"/v1/jobs/{done}/cancel", headers=headers)
    assert response.status_code == 409 and "succeeded" in response.json()["detail"]
    again = client.post(f"/v1/jobs/{queued}/cancel", headers=headers)
    assert again.status_code == 409
    events = client.get(f"/v1/jobs/{queued}/events", headers=headers).json()["data"]
    assert [event["type"] for event in events] == ["created", "cancelled"]


def test_idempotency_key_replays_and_conflicts(
    client: TestClient,
    headers: dict[str, str],
    make_headers: Callable[[str], dict[str, str]],
    settings: Settings,
) -> None:
    key = {"Idempotency-Key": "submit-1"}
    first = client.post("/v1/jobs", headers={**headers, **key}, json=job_body())
    again = client.post("/v1/jobs", headers={**headers, **key}, json=job_body())
    assert first.status_code == 201 and again.status_code == 201
    assert again.json()["id"] == first.json()["id"] and again.headers["Idempotent-Replayed"] == "true"
    conflict = client.post("/v1/jobs", headers={**headers, **key}, json=job_body(training={"max_steps": 3}))
    assert conflict.status_code == 409 and first.json()["id"] in conflict.json()["detail"]
    too_long = client.post("/v1/jobs", headers={**headers, "Idempotency-Key": "k" * 256}, json=job_body())
    assert too_long.status_code == 422 and too_long.json()["detail"][0]["loc"] == [
        "header",
        "idempotency-key",
    ]
    other_tenant = client.post("/v1/jobs", headers={**make_headers("other"), **key}, json=job_body())
    assert (
        other_tenant.status_code == 201 and other_tenant.json()["id"] != first.json()["id"]
    )  # keys are per tenant
    assert len(broker_messages(settings)) == 2  # a replay publishes nothing


def test_idempotency_under_concurrency(settings: Settings, headers: dict[str, str], db: Session) -> None:
    app = create_app(settings)
    threads, results, barrier = 6, [], threading.Barrier(6)

    def submit() -> None:
        with TestClient(app) as client:
            barrier.wait()
            response = client.post(
                "/v1/jobs", headers={**headers, "Idempotency-Key": "race"}, json=job_body()
            )
            results.append((response.status_code, response.json().get("id")))

    workers = [threading.Thread(target=submit) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
    assert len(results) == threads and {code for code, _ in results} == {201}, results
    assert len({job_id for _, job_id in results}) == 1
    assert db.scalar(select(func.count()).select_from(Job)) == 1
    assert len(broker_messages(settings)) == 1


def test_the_api_never_imports_torch() -> None:
    code = (
        "import sys, tempfile\n"
        "from api.core.config import Settings\n"
        "from api.main import create_app\n"
        "from fastapi.testclient import TestClient\n"
        "client = TestClient(create_app(Settings(_env_file=None, data_root=tempfile.mkdtemp())))\n"
        "assert client.get('/healthz').status_code == 200\n"
        "assert client.get('/docs').status_code == 200\n"
        "print('torch' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_replay_answers_even_after_the_file_is_gone(client: TestClient, headers: dict[str, str]) -> None:
    file_id = upload(client, headers).json()["id"]
    key = {**headers, "Idempotency-Key": "with-file"}
    first = client.post("/v1/jobs", headers=key, json=job_body(data={"train": file_id})).json()
    assert client.post(f"/v1/jobs/{first['id']}/cancel", headers=headers).status_code == 200
    assert client.delete(f"/v1/files/{file_id}", headers=headers).status_code == 200
    again = client.post("/v1/jobs", headers=key, json=job_body(data={"train": file_id}))
    assert (
        again.status_code == 201
        and again.json()["id"] == first["id"]
        and again.json()["status"] == "cancelled"
    )
    fresh = client.post("/v1/jobs", headers=headers, json=job_body(data={"train": file_id}))
    assert fresh.status_code == 404  # without the key it is a new job, and the file is gone


@pytest.mark.parametrize(
    ("overrides", "steps"),
    [
        ({"training": {"max_steps": 7}}, 7),
        ({"training": {"epochs": 2, "batch_size": 4, "grad_accum": 2}}, None),  # from the demo's size
        (
            {
                "data": {"train": "demo:train", "max_train_examples": 10},
                "training": {"epochs": 3, "batch_size": 4},
            },
            9,
        ),
        ({"training": {"batch_size": 2}, "resources": {"device": "cpu", "processes": 2}}, None),
    ],
)
def test_total_steps_is_known_from_submission(
    overrides: dict, steps: int | None, client: TestClient, headers: dict[str, str]
) -> None:
    from akl_core.data import read_examples

    demo = len(read_examples("demo:train"))
    expected = steps
    if expected is None:
        t, processes = overrides["training"], overrides.get("resources", {}).get("processes", 1)
        global_batch = t["batch_size"] * t.get("grad_accum", 1) * processes
        expected = t.get("epochs", 1) * -(-demo // global_batch)
    job = client.post("/v1/jobs", headers=headers, json=job_body(**overrides)).json()
    assert (job["total_steps"], job["current_step"], job["eta_seconds"]) == (expected, 0, None)


def test_a_running_job_has_an_eta_from_its_pace(
    client: TestClient, headers: dict[str, str], db: Session
) -> None:
    job_id = client.post("/v1/jobs", headers=headers, json=job_body(training={"max_steps": 100})).json()["id"]
    db.execute(
        update(Job).where(Job.id == job_id)
        .values(status=RUNNING, current_step=40, current_metrics={"loss": 1.0, "seconds_per_step": 0.5})
    )  # fmt: skip
    db.commit()
    assert client.get(f"/v1/jobs/{job_id}", headers=headers).json()["eta_seconds"] == 30  # 60 steps x 0.5 s
