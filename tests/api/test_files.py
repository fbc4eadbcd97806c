from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from api.core.config import Settings
from api.db.models import File
from tests.api.conftest import GOOD_JSONL, job_body, upload


def _stored(settings: Settings) -> list[str]:
    assert settings.files_root is not None
    return sorted(p.name for p in settings.files_root.rglob("*") if p.is_file())


def test_upload_stores_the_bytes_and_counts_examples(
    client: TestClient, headers: dict[str, str], settings: Settings, db: Session
) -> None:
    response = upload(client, headers, purpose="validation")
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["object"] == "file" and body["id"].startswith("file-")
    assert (body["bytes"], body["num_examples"], body["purpose"]) == (len(GOOD_JSONL), 2, "validation")
    assert body["filename"] == "data.jsonl"
    row = db.get(File, body["id"])
    assert row is not None and open(row.path, "rb").read() == GOOD_JSONL
    assert _stored(settings) == [f"{body['id']}.jsonl"]
    assert client.get(f"/v1/files/{body['id']}", headers=headers).json() == body


def test_filename_is_reduced_to_its_base_name(client: TestClient, headers: dict[str, str]) -> None:
    response = client.post(
        "/v1/files",
        headers=headers,
        files={"file": ("../../x\\evil.jsonl", GOOD_JSONL)},
        data={"purpose": "train"},
    )
    assert response.status_code == 201 and response.json()["filename"] == "evil.jsonl"


BAD_UPLOADS = {
    "bad utf-8": (b'{"prompt": "\xff\xfe", "response": "x"}\n', "UTF-8"),
    "bad json": (b'{"prompt": "a", "response": "b"}\n{"prompt": \n', "line 2"),
    "not an object": (b"[1, 2]\n", "line 1"),
    "unknown format": (b'{"question": "a"}\n', "format"),
    "empty": (b"", "empty"),
    "blank lines only": (b"\n\n  \n", "empty"),
    "huge line": (b'{"prompt": "' + b"a" * 5000 + b'", "response": "b"}\n', "limit"),
}


@pytest.mark.parametrize("case", BAD_UPLOADS)
def test_bad_uploads_are_4xx_with_a_message_and_nothing_is_stored(
    case: str, client: TestClient, headers: dict[str, str], settings: Settings, db: Session
) -> None:
    content, words = BAD_UPLOADS[case]
    response = upload(client, headers, content)
    assert response.status_code == 400, response.text
    assert words in response.json()["detail"]
    assert db.scalar(select(func.count()).select_from(File)) == 0
    assert _stored(settings) == []


def test_oversize_upload_is_413_and_nothing_is_stored(
    client: TestClient, headers: dict[str, str], settings: Settings, db: Session
) -> None:
    line = b'{"prompt": "p", "response": "' + b"r" * 1000 + b'"}\n'
    content = line * (settings.max_upload_bytes // len(line) + 1)
    response = upload(client, headers, content)
    assert response.status_code == 413 and "larger than" in response.json()["detail"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit applies while streaming
        yield b"x" * (settings.max_upload_bytes + 1024 * 1024)

    streamed = client.post(
        "/v1/files", headers={**headers, "Content-Type": "multipart/form-data; boundary=b"}, content=chunks()
    )
    assert streamed.status_code == 413
    assert db.scalar(select(func.count()).select_from(File)) == 0 and _stored(settings) == []


def test_upload_needs_a_valid_purpose_and_a_file(client: TestClient, headers: dict[str, str]) -> None:
    response = upload(client, headers, purpose="batch")
    assert response.status_code == 422 and response.json()["detail"][0]["loc"] == ["body", "purpose"]
    response = client.post("/v1/files", headers=headers, data={"purpose": "train"})
    assert response.status_code == 422 and response.json()["detail"][0]["loc"] == ["body", "file"]


def test_a_file_part_without_a_filename_says_what_to_send(
    client: TestClient, headers: dict[str, str]
) -> None:
    response = client.post(
        "/v1/files", headers=headers, files={"file": ("", GOOD_JSONL)}, data={"purpose": "train"}
    )
    assert response.status_code == 422 and "filename" in response.json()["detail"]
    assert "UploadFile" not in response.text and "Say hi" not in response.text  # no echo of the bytes


def test_json_bodies_are_bounded(client: TestClient, headers: dict[str, str]) -> None:
    body = job_body(metadata={"k": "v" * 2_000_000})
    response = client.post("/v1/jobs", headers=headers, json=body)
    assert response.status_code == 413


def test_list_paginates_and_filters_by_purpose(client: TestClient, headers: dict[str, str]) -> None:
    ids = [upload(client, headers, purpose=p).json()["id"] for p in ("train", "validation", "train")]
    page = client.get("/v1/files", headers=headers, params={"limit": 2}).json()
    assert [f["id"] for f in page["data"]] == ids[:0:-1] and page["has_more"] is True
    rest = client.get("/v1/files", headers=headers, params={"limit": 2, "after": page["last_id"]}).json()
    assert [f["id"] for f in rest["data"]] == ids[:1] and rest["has_more"] is False
    train = client.get("/v1/files", headers=headers, params={"purpose": "train"}).json()
    assert [f["id"] for f in train["data"]] == [ids[2], ids[0]]


def test_delete_removes_the_file_unless_an_active_job_uses_it(
    client: TestClient, headers: dict[str, str], settings: Settings
) -> None:
    used = upload(client, headers).json()["id"]
    free = upload(client, headers).json()["id"]
    job = client.post("/v1/jobs", headers=headers, json=job_body(data={"train": used})).json()
    refused = client.delete(f"/v1/files/{used}", headers=headers)
    assert refused.status_code == 409 and job["id"] in refused.json()["detail"]
    response = client.delete(f"/v1/files/{free}", headers=headers)
    assert response.status_code == 200 and response.json() == {"id": free, "object": "file", "deleted": True}
    assert client.get(f"/v1/files/{free}", headers=headers).status_code == 404
    assert client.delete(f"/v1/files/{free}", headers=headers).status_code == 404
    assert _stored(settings) == [f"{used}.jsonl"]
    assert client.post(f"/v1/jobs/{job['id']}/cancel", headers=headers).status_code == 200
    assert client.delete(f"/v1/files/{used}", headers=headers).status_code == 200
    assert _stored(settings) == []
