"""The client side: uploads and submission against the real API (in-process, SQLite), and safe
unpacking of downloaded archives."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient

from akl_cli.client import ClientError, check, safe_extract, submit_spec


@pytest.fixture
def http(tmp_path: Path):
    from api.core.config import Settings
    from api.crud import api_keys
    from api.db.session import dispose_engines, get_engine, migrate, session_factory
    from api.main import create_app

    settings = Settings(data_root=tmp_path / "svc")
    migrate(settings.database_url)
    with session_factory(get_engine(settings.database_url))() as session:
        _, key = api_keys.create_key(session=session, tenant_name="client-test")
        session.commit()
    with TestClient(create_app(settings), headers={"Authorization": f"Bearer {key.key}"}) as client:
        yield client
    dispose_engines()


def test_submit_uploads_local_files_and_keeps_other_references(http, tmp_path: Path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text('{"prompt": "a", "response": "b"}\n' * 3)
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump({"teacher": "preset:tiny",
                                    "data": {"train": "data/train.jsonl", "validation": "demo:validation"}}))  # fmt: skip
    job = submit_spec(http, spec, idempotency_key="k1")
    assert job["training_file"].startswith("file-") and job["validation_file"] == "demo:validation"
    uploaded = check(http.get(f"/v1/files/{job['training_file']}"))
    assert uploaded["filename"] == "train.jsonl"


def test_submit_refuses_a_missing_local_file(http, tmp_path: Path):
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump({"teacher": "preset:tiny", "data": {"train": "nope.jsonl"}}))
    with pytest.raises(ClientError, match="nope.jsonl is not a file"):
        submit_spec(http, spec)
    assert check(http.get("/v1/jobs"))["data"] == []


def _tar(path: Path, members: list[tarfile.TarInfo], payload: bytes = b"x") -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for member in members:
            if member.isfile():
                member.size = len(payload)
                tar.addfile(member, io.BytesIO(payload))
            else:
                tar.addfile(member)
    return path


def _info(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info


def test_safe_extract_unpacks_plain_files(tmp_path: Path):
    archive = _tar(tmp_path / "ok.tar.gz", [_info("model", tarfile.DIRTYPE), _info("model/config.json")])
    assert safe_extract(archive, tmp_path / "out") == ["model", "model/config.json"]
    assert (tmp_path / "out/model/config.json").read_bytes() == b"x"


@pytest.mark.parametrize(
    "member",
    [
        _info("/etc/evil"),
        _info("../evil"),
        _info("model/../../evil"),
        _info("model/link", tarfile.SYMTYPE, "/etc/passwd"),
        _info("model/hard", tarfile.LNKTYPE, "model/config.json"),
        _info("model/fifo", tarfile.FIFOTYPE),
    ],
    ids=["absolute", "dotdot", "nested-dotdot", "symlink", "hardlink", "fifo"],
)
def test_safe_extract_refuses_unsafe_members_before_writing_anything(tmp_path: Path, member: tarfile.TarInfo):
    archive = _tar(tmp_path / "bad.tar.gz", [_info("model/config.json"), member])
    with pytest.raises(ClientError, match="refusing"):
        safe_extract(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "evil").exists()


def test_status_shows_the_eta_of_a_running_job():
    from akl_cli.client import _describe

    job = {"id": "job-1", "status": "running", "current_step": 3, "total_steps": 10, "eta_seconds": 3725}
    assert _describe(job).splitlines()[0] == "job-1  running  step 3/10  eta 1h02m"
    assert "eta" not in _describe({**job, "status": "succeeded", "eta_seconds": None})


def _cache_service(statuses: list[str]):
    """A fake /v1/teacher_caches: the POST answers queued, each GET the next status."""
    import httpx

    seen: list[tuple[str, str]] = []
    left = list(statuses)

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.method, request.url.path))
        status = "queued" if request.method == "POST" else left.pop(0)
        body = {"id": "cache-1", "status": status, "progress": 1.0 if status == "succeeded" else 0.5}
        if status == "failed":
            body["error"] = {"code": "teacher_error", "message": "boom"}
        return httpx.Response(201 if request.method == "POST" else 200, json=body)

    return httpx.Client(base_url="http://t", transport=httpx.MockTransport(handler)), seen


def test_build_cache_polls_until_the_build_ends_and_keeps_stdout_clean(capsys):
    from akl_cli.client import build_cache

    http, seen = _cache_service(["running", "succeeded"])
    cache = build_cache(http, {"teacher": "preset:tiny"}, interval=0)
    assert cache["status"] == "succeeded"
    assert seen == [("POST", "/v1/teacher_caches")] + [("GET", "/v1/teacher_caches/cache-1")] * 2
    assert capsys.readouterr().out == ""  # the progress bar is on stderr: scripts capture the id

    http, _ = _cache_service(["failed"])
    with pytest.raises(ClientError, match="teacher_error"):
        build_cache(http, {"teacher": "preset:tiny"}, interval=0)
