"""Hostile input (issue 10, section 1): each example the outside probe found, against the real app
on SQLite and PostgreSQL. Each is a 4xx naming where the bad value is, never a 500 or a dropped
connection, and nothing is stored; rows stored with a surrogate before (an older version) still
list and show."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update
from sqlalchemy.orm import Session

from api.core.input_checks import json_body_problem
from api.db.models import Job, JobEvent
from tests.api.conftest import job_body, upload

JSON = {"Content-Type": "application/json"}
RAW_SURROGATE = b"\xed\xa0\x80"  # U+D800 encoded as if it were a character (CESU-8)


def _raw(body: dict[str, Any], placeholder: str, fragment: bytes) -> bytes:
    """``body`` as JSON bytes with the string ``placeholder`` replaced by a raw JSON ``fragment``."""
    return json.dumps(body).encode().replace(json.dumps(placeholder).encode(), fragment)


def _post_job(client: TestClient, headers: dict[str, str], content: bytes) -> Any:
    return client.post("/v1/jobs", headers={**headers, **JSON}, content=content)


def _nothing_stored(client: TestClient, headers: dict[str, str]) -> None:
    assert client.get("/v1/jobs", headers=headers).json()["data"] == []


SURROGATE_PLACES = {
    "metadata value": (job_body(metadata={"run": "X"}), ["body", "metadata", "run"]),
    "metadata key": (job_body(metadata={"X": "v"}), ["body", "metadata"]),
    "teacher": (job_body(teacher="X"), ["body", "teacher"]),
    "data reference": (job_body(data={"train": "X"}), ["body", "data", "train"]),
    "student model": (job_body(student={"init": "pretrained", "model": "X"}), ["body", "student", "model"]),
}


@pytest.mark.parametrize("escape", ["\\ud800", "\\udfff", "a\\ud83d", "\\ude00b"])
@pytest.mark.parametrize("place", SURROGATE_PLACES)
def test_escaped_lone_surrogates_are_422_naming_the_field(
    place: str, escape: str, client: TestClient, headers: dict[str, str]
) -> None:
    body, loc = SURROGATE_PLACES[place]
    response = _post_job(client, headers, _raw(body, "X", f'"{escape}"'.encode()))
    assert response.status_code == 422, response.text
    issue = response.json()["detail"][0]
    assert issue["type"] == "lone_surrogate" and issue["loc"][: len(loc)] == loc
    assert "surrogate" in issue["msg"] and "\\ud" in issue["input"]  # shown escaped, not raw
    _nothing_stored(client, headers)


@pytest.mark.parametrize("place", SURROGATE_PLACES)
def test_raw_surrogate_bytes_are_400_naming_the_byte(
    place: str, client: TestClient, headers: dict[str, str]
) -> None:
    body, _ = SURROGATE_PLACES[place]
    content = _raw(body, "X", b'"' + RAW_SURROGATE + b'"')
    response = _post_job(client, headers, content)
    assert response.status_code == 400, response.text
    detail = response.json()["detail"]
    assert f"byte {content.index(RAW_SURROGATE)}" in detail and "surrogate" in detail
    _nothing_stored(client, headers)


def test_a_surrogate_pair_is_a_character_and_accepted(client: TestClient, headers: dict[str, str]) -> None:
    content = _raw(job_body(metadata={"emoji": "X"}), "X", b'"\\ud83d\\ude00"')
    response = _post_job(client, headers, content)
    assert response.status_code == 201, response.text
    assert response.json()["metadata"] == {"emoji": "\U0001f600"}


def test_json_in_utf16_is_400(client: TestClient, headers: dict[str, str]) -> None:
    response = _post_job(client, headers, json.dumps(job_body()).encode("utf-16"))
    assert response.status_code == 400 and "UTF-8" in response.json()["detail"]
    _nothing_stored(client, headers)


def test_rows_stored_with_surrogates_still_list_and_show(
    client: TestClient, headers: dict[str, str], db: Session
) -> None:
    """What an older version let in: lone surrogates in JSON columns (metadata, spec, event data)."""
    job_id = client.post("/v1/jobs", headers=headers, json=job_body(metadata={"run": "a"})).json()["id"]
    spec = client.get(f"/v1/jobs/{job_id}", headers=headers).json()["spec"]
    db.execute(
        update(Job)
        .where(Job.id == job_id)
        .values(metadata_={"run": "a\ud800", "\udfffkey": "v"}, spec={**spec, "teacher": "\ud800"})
    )
    db.add(JobEvent(job_id=job_id, type="log", message="m", data={"path": "x\udc80y"}))
    db.commit()
    shown = client.get(f"/v1/jobs/{job_id}", headers=headers)
    assert shown.status_code == 200, shown.text
    assert shown.json()["metadata"] == {"run": "a\ufffd", "\ufffdkey": "v"}
    assert shown.json()["teacher"] == "\ufffd"
    listed = client.get("/v1/jobs", headers=headers)
    assert listed.status_code == 200 and listed.json()["data"][0]["metadata"]["run"] == "a\ufffd"
    events = client.get(f"/v1/jobs/{job_id}/events", headers=headers)
    assert events.status_code == 200 and events.json()["data"][-1]["data"] == {"path": "x\ufffdy"}
    cancelled = client.post(f"/v1/jobs/{job_id}/cancel", headers=headers)
    assert cancelled.status_code == 200, cancelled.text


HUGE = {
    "2**31": str(2**31),
    "2**63": str(2**63),
    "2**64": str(2**64),
    "5000 digits": "9" * 5000,
    "-2**63-1": str(-(2**63) - 1),
}
QUERY_INTS = [
    ("/v1/jobs/{job}/events", "after"),
    ("/v1/jobs/{job}/metrics", "from_step"),
    ("/v1/jobs/{job}/metrics", "to_step"),
    ("/v1/jobs/{job}/metrics", "max_points"),
    ("/v1/jobs", "limit"),
    ("/v1/files", "limit"),
    ("/v1/jobs/{job}/events", "limit"),
]


@pytest.mark.parametrize("value", HUGE)
@pytest.mark.parametrize(("route", "param"), QUERY_INTS, ids=[f"{r[6:]}?{p}" for r, p in QUERY_INTS])
def test_huge_integers_in_queries_are_422_naming_the_parameter(
    route: str, param: str, value: str, client: TestClient, headers: dict[str, str]
) -> None:
    job_id = client.post("/v1/jobs", headers=headers, json=job_body()).json()["id"]
    response = client.get(route.format(job=job_id), headers=headers, params={param: HUGE[value]})
    assert response.status_code == 422, response.text
    issue = response.json()["detail"][0]
    assert issue["loc"] == ["query", param]
    assert len(issue["input"]) < 300  # a 5000-digit input is shortened, not echoed whole
    assert "bounds" in issue["msg"] or "than or equal to" in issue["msg"]


@pytest.mark.parametrize("param", ["after", "from_step", "to_step"])
def test_the_largest_int32_is_still_a_valid_cursor(
    param: str, client: TestClient, headers: dict[str, str]
) -> None:
    job_id = client.post("/v1/jobs", headers=headers, json=job_body()).json()["id"]
    route = "events" if param == "after" else "metrics"
    response = client.get(f"/v1/jobs/{job_id}/{route}", headers=headers, params={param: 2**31 - 1})
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    ("seeds", "status"), [([2**64], 422), ([2**32], 422), ([-1], 422), ([0, 2**32 - 1], 201)]
)
def test_evaluation_seeds_are_32_bit(
    seeds: list[int], status: int, client: TestClient, headers: dict[str, str]
) -> None:
    response = client.post("/v1/jobs", headers=headers, json=job_body(evaluation={"seeds": seeds}))
    assert response.status_code == status, response.text
    if status == 422:
        assert response.json()["detail"][0]["loc"][:3] == ["body", "evaluation", "seeds"]


NUMBERS = {
    "5000 digits": ("9" * 5000, "int_out_of_range", "64 bits"),
    "2**64": (str(2**64), "int_out_of_range", "64 bits"),
    "NaN": ("NaN", "finite_number", "finite"),
    "Infinity": ("Infinity", "finite_number", "finite"),
    "-Infinity": ("-Infinity", "finite_number", "finite"),
    "1e400": ("1e400", "finite_number", "finite"),
}


@pytest.mark.parametrize("case", NUMBERS)
def test_numbers_no_field_can_take_are_422_naming_the_field(
    case: str, client: TestClient, headers: dict[str, str]
) -> None:
    literal, kind, words = NUMBERS[case]
    body = job_body(training={"max_steps": 2, "batch_size": "X"})
    response = _post_job(client, headers, _raw(body, "X", literal.encode()))
    assert response.status_code == 422, response.text
    issue = response.json()["detail"][0]
    assert issue["type"] == kind and issue["loc"] == ["body", "training", "batch_size"]
    assert words in issue["msg"] and "error parsing the body" not in response.text
    _nothing_stored(client, headers)


@pytest.mark.parametrize("depth", [40, 1000, 100_000])
def test_deep_nesting_is_422(depth: int, client: TestClient, headers: dict[str, str]) -> None:
    nested = b"[" * depth + b"]" * depth
    response = _post_job(client, headers, _raw(job_body(metadata={"k": "X"}), "X", nested))
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["type"] == "json_too_deep"
    _nothing_stored(client, headers)


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("/v1/jobs?after=%ED%A0%80", "query parameter 'after'"),
        ("/v1/files?limit=1&after=a%FFb", "query parameter 'after'"),
        ("/v1/jobs?%ED%A0%80=1", "query parameter name"),
        ("/v1/jobs/%ED%A0%80", "path"),
        ("/v1/jobs/job-1/events?after=%C0%AF", "query parameter 'after'"),
    ],
)
def test_urls_that_are_not_utf8_are_400_naming_where(
    url: str, words: str, client: TestClient, headers: dict[str, str]
) -> None:
    response = client.get(url, headers=headers)
    assert response.status_code == 400, response.text
    assert response.json()["detail"].startswith(words) and "UTF-8" in response.json()["detail"]


def _multipart(charset: str, filename: bytes, purpose: bytes) -> tuple[dict[str, str], bytes]:
    content_type = f"multipart/form-data; boundary=xyz; charset={charset}"
    body = (
        b'--xyz\r\nContent-Disposition: form-data; name="purpose"\r\n\r\n' + purpose + b"\r\n"
        b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="' + filename + b'"\r\n'
        b"Content-Type: application/octet-stream\r\n\r\n"
        b'{"prompt": "a", "response": "b"}\n\r\n--xyz--\r\n'
    )
    return {"Content-Type": content_type}, body


@pytest.mark.parametrize("charset", ["unicode_escape", "raw-unicode-escape", "utf-7", "utf-16"])
def test_form_charsets_that_decode_to_surrogates_are_400(
    charset: str, client: TestClient, headers: dict[str, str]
) -> None:
    extra, body = _multipart(charset, b"\\ud800.jsonl", b"train")
    response = client.post("/v1/files", headers={**headers, **extra}, content=body)
    assert response.status_code == 400, response.text
    assert "charset" in response.json()["detail"]
    assert client.get("/v1/files", headers=headers).json()["data"] == []


def test_a_utf8_form_is_accepted(client: TestClient, headers: dict[str, str]) -> None:
    extra, body = _multipart("utf-8", "caf\u00e9.jsonl".encode(), b"train")
    response = client.post("/v1/files", headers={**headers, **extra}, content=body)
    assert response.status_code == 201, response.text
    assert response.json()["filename"] == "caf\u00e9.jsonl"


def test_an_empty_upload_filename_says_what_to_send(client: TestClient, headers: dict[str, str]) -> None:
    response = upload(client, headers, name="")
    assert response.status_code == 422, response.text
    assert "Expected UploadFile" not in response.text
    detail = response.json()["detail"]  # the route's own message (a string), or a validation issue
    assert "filename" in (detail if isinstance(detail, str) else detail[0]["msg"])


def test_idempotency_keys_are_visible_ascii(client: TestClient, headers: dict[str, str]) -> None:
    key = {"Idempotency-Key": "caf\u00e9".encode("latin-1")}
    response = client.post("/v1/jobs", headers={**headers, **key}, json=job_body())
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"] == ["header", "idempotency-key"]
    assert "ASCII" in response.json()["detail"][0]["msg"]
    _nothing_stored(client, headers)


def test_a_content_length_of_5000_digits_is_413(client: TestClient, headers: dict[str, str]) -> None:
    response = client.post(
        "/v1/jobs", headers={**headers, **JSON, "Content-Length": "9" * 5000}, content=b"{}"
    )
    assert response.status_code == 413, response.text


@pytest.mark.parametrize(
    ("text", "refused"),
    [
        (r'["\u00e9\udc00"]', True),  # a low surrogate after another escape
        (r'["\ud83d\ude00\udc00"]', True),  # a pair, then a lone low one
        (r'{"\ud800": 1}', True),
        (r'["\ud83d\ude00", "\u00e9"]', False),
        (r'["\\ud800"]', False),  # an escaped backslash, then the letters "ud800"
        ('["NaN", "Infinity", "12345678901234567890"]', False),  # text, not numbers
        ("[-9223372036854775808, 9223372036854775807, 1e308, -0.0]", False),
        ("[-9223372036854775809]", True),
        ("[1.7976931348623159e308]", True),  # rounds to infinity
        ("[" * 32 + "]" * 32, False),
        ("[" * 33 + "]" * 33, True),
        ('{"a": ' * 33 + "1" + "}" * 33, True),
    ],
)
def test_json_body_checks_refuse_exactly_what_no_field_can_take(text: str, refused: bool) -> None:
    assert (json_body_problem(text.encode()) is not None) is refused
