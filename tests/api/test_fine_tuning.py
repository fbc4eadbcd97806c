"""OpenAI's fine-tuning routes over the native job rows (api/routes/fine_tuning.py), in process:
the request -> spec mapping, the shapes, and that both APIs see one store."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient

from tests.api.conftest import broker_messages, upload


def method(**sections: Any) -> dict[str, Any]:
    return {
        "type": "distillation",
        "distillation": {
            "teacher": "preset:tiny",
            "student": {"init": "truncate", "num_layers": 2},
            "training": {"max_steps": 3},
            "resources": {"device": "cpu"},
            **sections,
        },
    }


def test_create_maps_the_request_onto_one_job_spec(
    client: TestClient, headers: dict[str, str], settings
) -> None:
    file_id = upload(client, headers, purpose="fine-tune").json()["id"]
    body = {
        "model": "preset:tiny",
        "training_file": file_id,
        "validation_file": file_id,
        "hyperparameters": {"n_epochs": 3, "batch_size": 8, "learning_rate_multiplier": 2.0},
        "method": method(loss={"name": "fkl"}),
        "seed": 11,
        "suffix": "small",
        "metadata": {"k": "v"},
    }
    response = client.post("/v1/fine_tuning/jobs", headers=headers, json=body)
    assert response.status_code == 200, response.text
    job = response.json()
    assert (job["object"], job["status"], job["model"], job["seed"]) == (
        "fine_tuning.job",
        "queued",
        "preset:tiny",
        11,
    )
    assert job["hyperparameters"] == {"n_epochs": 3, "batch_size": 8, "learning_rate_multiplier": 2.0}
    assert job["training_file"] == job["validation_file"] == file_id
    assert job["user_provided_suffix"] == "small" and job["fine_tuned_model"] is None
    assert job["metadata"] == {"k": "v"} and job["method"]["type"] == "distillation"
    native = client.get(f"/v1/jobs/{job['id']}", headers=headers).json()  # one store, two shapes
    spec = native["spec"]
    assert (
        spec["training"]["epochs"] == 3
        and spec["training"]["batch_size"] == 8
        and spec["training"]["seed"] == 11
    )
    assert spec["training"]["learning_rate"] == 2 * 5e-5 and spec["loss"]["name"] == "fkl"
    assert spec["data"] == {**spec["data"], "train": file_id, "validation": file_id}
    assert [m["args"] for m in broker_messages(settings)] == [[job["id"]]]
    listed = client.get("/v1/fine_tuning/jobs", headers=headers).json()
    assert [j["id"] for j in listed["data"]] == [job["id"]] and listed["has_more"] is False


def test_model_is_the_pretrained_students_start(client: TestClient, headers: dict[str, str]) -> None:
    body = {"model": "my-student", "training_file": "demo:train", "method": method(student=None)}
    body["method"]["distillation"].pop("student")
    job = client.post("/v1/fine_tuning/jobs", headers=headers, json=body).json()
    assert job["model"] == "my-student"
    spec = client.get(f"/v1/jobs/{job['id']}", headers=headers).json()["spec"]
    assert spec["student"]["init"] == "pretrained" and spec["student"]["model"] == "my-student"


def test_errors_name_the_request_fields(client: TestClient, headers: dict[str, str]) -> None:
    def error(body: dict[str, Any], status: int) -> dict[str, Any]:
        response = client.post("/v1/fine_tuning/jobs", headers=headers, json=body)
        assert response.status_code == status, response.text
        return response.json()["error"]

    base = {"model": "preset:tiny", "training_file": "demo:train", "method": method()}
    assert error({**base, "training_file": "file-x"}, 404)["param"] == "training_file"
    assert error({**base, "method": method(training={"max_steps": 0})}, 422)["param"] == (
        "method.distillation.training.max_steps"
    )
    nope = {**base, "model": "preset:nope", "method": method(teacher="preset:nope")}
    assert error(nope, 404)["param"] == "method.distillation.teacher"
    wrong_model = error({**base, "model": "my-student"}, 422)
    assert wrong_model["param"] == "model" and "must name the teacher" in wrong_model["message"]
    missing = {k: v for k, v in base.items() if k != "method"}
    assert error(missing, 422)["param"] == "method"
    assert error({**base, "method": {"type": "supervised"}}, 422)["param"].startswith("method")
    assert error({**base, "method": method(data={"train": "demo:train"})}, 422)["param"] == (
        "method.distillation.data.train"
    )


def test_events_and_checkpoints_of_a_queued_job(client: TestClient, headers: dict[str, str]) -> None:
    body = {"model": "preset:tiny", "training_file": "demo:train", "method": method()}
    job_id = client.post("/v1/fine_tuning/jobs", headers=headers, json=body).json()["id"]
    events = client.get(f"/v1/fine_tuning/jobs/{job_id}/events", headers=headers).json()
    assert [(e["object"], e["level"], e["type"]) for e in events["data"]] == [
        ("fine_tuning.job.event", "info", "message")
    ]
    assert events["data"][0]["id"].startswith("ftevent-") and events["data"][0]["data"]["event"] == "created"
    after = events["data"][0]["id"]
    assert (
        client.get(f"/v1/fine_tuning/jobs/{job_id}/events?after={after}", headers=headers).json()["data"]
        == []
    )
    assert client.get(f"/v1/fine_tuning/jobs/{job_id}/events?after=x", headers=headers).status_code == 400
    assert client.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints", headers=headers).json()["data"] == []
    cancelled = client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel", headers=headers).json()
    assert cancelled["status"] == "cancelled"
    again = client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel", headers=headers)
    assert again.status_code == 409 and again.json()["error"]["type"] == "conflict_error"


def test_another_tenants_job_is_404(client: TestClient, headers: dict[str, str], make_headers) -> None:
    body = {"model": "preset:tiny", "training_file": "demo:train", "method": method()}
    job_id = client.post("/v1/fine_tuning/jobs", headers=headers, json=body).json()["id"]
    other = make_headers("other")
    for path in ("", "/events", "/checkpoints"):
        response = client.get(f"/v1/fine_tuning/jobs/{job_id}{path}", headers=other)
        assert response.status_code == 404 and response.json()["error"]["code"] == "job_not_found"
    assert client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel", headers=other).status_code == 404
    assert client.get("/v1/fine_tuning/jobs", headers=other).json()["data"] == []
