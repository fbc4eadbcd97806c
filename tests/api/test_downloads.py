from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from api.db.models import SUCCEEDED, Job, JobCheckpoint
from tests.api.conftest import job_body

MODEL_FILES = {
    "config.json": b'{"model_type": "llama"}',
    "model.safetensors": os.urandom(300_000),
    "tokenizer/tokenizer.json": b"{}",
}


def _write(folder: Path, files: dict[str, bytes]) -> None:
    for name, content in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(content)


@pytest.fixture
def job(client: TestClient, headers: dict[str, str], db: Session) -> Job:
    job_id = client.post("/v1/jobs", headers=headers, json=job_body()).json()["id"]
    row = db.get(Job, job_id)
    assert row is not None and row.output_dir
    out = Path(row.output_dir)
    _write(out / "final", MODEL_FILES)
    _write(out / "checkpoints" / "step-00000010", {"config.json": b"{}", "trainer_state.pt": b"state"})
    row.status = SUCCEEDED
    db.add(JobCheckpoint(id="ckpt-10", job_id=job_id, step=10, path="checkpoints/step-00000010"))
    db.add(JobCheckpoint(id="ckpt-final", job_id=job_id, step=20, path="final", is_final=True))
    db.commit()
    return row


def _unpack(content: bytes, mode: str) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(content), mode=mode) as tar:
        members = tar.getmembers()
        assert all(m.isfile() for m in members)
        return {m.name: tar.extractfile(m).read() for m in members}  # type: ignore[union-attr]


def test_list_checkpoints_final_last(client: TestClient, headers: dict[str, str], job: Job) -> None:
    data = client.get(f"/v1/jobs/{job.id}/checkpoints", headers=headers).json()["data"]
    assert [(c["id"], c["step"], c["is_final"]) for c in data] == [
        ("ckpt-10", 10, False),
        ("ckpt-final", 20, True),
    ]
    assert data[0]["download_url"] == f"/v1/jobs/{job.id}/checkpoints/ckpt-10/content"
    assert client.get(f"/v1/jobs/{job.id}", headers=headers).json()["model_url"] == f"/v1/jobs/{job.id}/model"


def test_model_download_unpacks_to_the_same_bytes(
    client: TestClient, headers: dict[str, str], job: Job
) -> None:
    response = client.get(f"/v1/jobs/{job.id}/model", headers=headers)
    assert response.status_code == 200 and response.headers["content-type"] == "application/gzip"
    assert f'filename="{job.id}-final.tar.gz"' in response.headers["content-disposition"]
    files = _unpack(response.content, "r:gz")
    assert files == {f"{job.id}-final/{name}": content for name, content in MODEL_FILES.items()}
    plain = client.get(f"/v1/jobs/{job.id}/model", headers=headers, params={"format": "tar"})
    assert plain.headers["content-type"] == "application/x-tar" and _unpack(plain.content, "r:") == files
    assert len(plain.content) % tarfile.RECORDSIZE == 0


def test_checkpoint_download(client: TestClient, headers: dict[str, str], job: Job) -> None:
    response = client.get(f"/v1/jobs/{job.id}/checkpoints/ckpt-10/content", headers=headers)
    assert response.status_code == 200
    prefix = f"{job.id}-step-00000010"
    assert _unpack(response.content, "r:gz") == {
        f"{prefix}/config.json": b"{}",
        f"{prefix}/trainer_state.pt": b"state",
    }
    missing = client.get(f"/v1/jobs/{job.id}/checkpoints/ckpt-nope/content", headers=headers)
    assert missing.status_code == 404


def test_archives_never_follow_links_out_of_the_artifact_dir(
    client: TestClient, headers: dict[str, str], job: Job, tmp_path: Path
) -> None:
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "key.txt").write_bytes(b"top secret")
    final = Path(job.output_dir or "") / "final"
    os.symlink(secret / "key.txt", final / "linked.txt")
    os.symlink(secret, final / "linked_dir")
    files = _unpack(client.get(f"/v1/jobs/{job.id}/model", headers=headers).content, "r:gz")
    assert set(files) == {f"{job.id}-final/{name}" for name in MODEL_FILES}
    assert b"top secret" not in b"".join(files.values())


def test_checkpoint_dir_that_is_a_link_or_gone_is_404(
    client: TestClient, headers: dict[str, str], job: Job, db: Session, tmp_path: Path
) -> None:
    step_dir = Path(job.output_dir or "") / "checkpoints" / "step-00000010"
    for path in step_dir.iterdir():
        path.unlink()
    step_dir.rmdir()
    gone = client.get(f"/v1/jobs/{job.id}/checkpoints/ckpt-10/content", headers=headers)
    assert gone.status_code == 404 and "no longer available" in gone.json()["detail"]
    os.symlink(tmp_path, step_dir)  # a checkpoint dir replaced by a link out of the artifacts
    linked = client.get(f"/v1/jobs/{job.id}/checkpoints/ckpt-10/content", headers=headers)
    assert linked.status_code == 404
    db.add(JobCheckpoint(id="ckpt-escape", job_id=job.id, step=1, path="../../.."))
    db.commit()
    assert (
        client.get(f"/v1/jobs/{job.id}/checkpoints/ckpt-escape/content", headers=headers).status_code == 404
    )


def test_model_download_before_the_job_finished_is_404(client: TestClient, headers: dict[str, str]) -> None:
    job_id = client.post("/v1/jobs", headers=headers, json=job_body()).json()["id"]
    response = client.get(f"/v1/jobs/{job_id}/model", headers=headers)
    assert response.status_code == 404 and "queued" in response.json()["detail"]


@pytest.mark.slow  # imports torch and transformers (several seconds)
def test_downloaded_model_loads_with_from_pretrained(
    client: TestClient, headers: dict[str, str], db: Session, tmp_path: Path, database_url: str
) -> None:
    if not database_url.startswith("sqlite"):
        pytest.skip("the archive does not depend on the database; once is enough")
    transformers = pytest.importorskip("transformers")
    job_id = client.post("/v1/jobs", headers=headers, json=job_body()).json()["id"]
    row = db.get(Job, job_id)
    assert row is not None and row.output_dir
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=32,
    )  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(Path(row.output_dir) / "final", safe_serialization=True)
    row.status = SUCCEEDED
    db.add(JobCheckpoint(job_id=job_id, step=1, path="final", is_final=True))
    db.commit()
    response = client.get(f"/v1/jobs/{job_id}/model", headers=headers)
    with tarfile.open(fileobj=io.BytesIO(response.content), mode="r:gz") as tar:
        tar.extractall(tmp_path / "unpacked", filter="data")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "unpacked" / f"{job_id}-final")
    for name, tensor in model.state_dict().items():
        assert (loaded.state_dict()[name] == tensor).all(), name
