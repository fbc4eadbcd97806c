"""schemathesis against the service's own OpenAPI schema, in process (ASGI), with a valid key:
valid and invalid requests on every operation, bounded in examples; the service never answers
500 (a 4xx with a message for bad input, 503 only when a dependency is down), answers only the
statuses each operation documents, and every error body matches the documented schema.

Then what a hostile probe sends (issue 10, section 1), on every operation: a valid request from
schemathesis with one value - a path or query parameter, a header, a JSON leaf, a form field or
the upload's filename - replaced by a lone surrogate (escaped, or raw bytes), an integer beyond
64 bits (up to 5000 digits), NaN / Infinity / 1e400, or nesting 40 to 100 000 deep. Each answer
is strict JSON (UTF-8, no NaN) and a 4xx has the error shape; afterwards every stored job and
file still lists and shows."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote_from_bytes, urlencode

import pytest

pytest.importorskip("schemathesis")
import schemathesis  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    response_schema_conformance,
    status_code_conformance,
)

from api.core.config import Settings  # noqa: E402
from api.crud import api_keys  # noqa: E402
from api.db.session import dispose_engines, get_engine, migrate, session_factory  # noqa: E402
from api.main import create_app  # noqa: E402

MAX_EXAMPLES = 25  # per operation; ~13 operations, well under a minute on a busy machine

_state: dict[str, str] = {}


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory: pytest.TempPathFactory) -> Iterator[schemathesis.BaseSchema]:
    root = tmp_path_factory.mktemp("fuzz")
    (root / "models" / "my-student").mkdir(parents=True)
    url = f"sqlite:///{root / 'akl.db'}"
    migrate(url)
    config = Settings(
        _env_file=None,  # type: ignore[call-arg]
        data_root=root / "data",
        database_url=url,
        broker_url="filesystem://",
        models_root=root / "models",
        max_upload_bytes=64 * 1024,
        max_line_bytes=4096,
    )
    with session_factory(get_engine(url))() as session:
        _, new = api_keys.create_key(session=session, tenant_name="fuzz")
        session.commit()
    _state["key"] = new.key
    app = create_app(config)
    yield schemathesis.openapi.from_asgi("/openapi.json", app)
    dispose_engines()
    assert not list(Path(root / "data").glob("**/*.tmp*"))  # no half-written upload left behind


@pytest.mark.integration
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda m: m.value)
def test_no_operation_answers_500(api_schema: schemathesis.BaseSchema, mode: GenerationMode) -> None:
    headers = {"Authorization": f"Bearer {_state['key']}"}
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 12
    failures: dict[str, str] = {}
    for operation in operations:

        @settings(
            max_examples=MAX_EXAMPLES,
            deadline=None,
            derandomize=True,  # the same examples on every run: a finding is reproducible
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy(generation_mode=mode))
        def fuzz(case) -> None:
            case.call_and_validate(
                headers=headers,
                checks=[not_a_server_error, status_code_conformance, response_schema_conformance],
            )

        try:
            fuzz()
        except Unsatisfiable:  # no invalid request exists (e.g. /healthz takes no input)
            assert mode is GenerationMode.NEGATIVE, operation.label
        except Exception as exc:  # collect every operation's finding, then fail once
            failures[operation.label] = str(exc)[:3000]
    assert not failures, "\n\n".join(f"{label}:\n{text}" for label, text in failures.items())


# Raw JSON for a body leaf, and bytes for a path / query / header / form value or a filename.
HOSTILE_JSON = {
    "escaped surrogate": b'"a\\ud800b"',
    "escaped low surrogate": b'"\\udfff"',
    "raw surrogate bytes": b'"\xed\xa0\x80"',
    "2**63": str(2**63).encode(),
    "2**64": str(2**64).encode(),
    "-2**63-1": str(-(2**63) - 1).encode(),
    "5000 digits": b"9" * 5000,
    "NaN": b"NaN",
    "Infinity": b"Infinity",
    "-Infinity": b"-Infinity",
    "1e400": b"1e400",
    "nested 40": b"[" * 40 + b"]" * 40,
    "nested 100000": b"[" * 100_000 + b"]" * 100_000,
    "surrogate key": b'{"\\ud800": 1}',
}
HOSTILE_TEXT = {
    "raw surrogate bytes": b"\xed\xa0\x80",
    "not UTF-8": b"a\xffb",
    "escaped surrogate as text": b"\\ud800",
    "2**63": str(2**63).encode(),
    "2**64": str(2**64).encode(),
    "5000 digits": b"9" * 5000,
    "NaN": b"NaN",
    "Infinity": b"Infinity",
    "1e400": b"1e400",
    "nested": b"[" * 1000 + b"]" * 1000,
}
PLACEHOLDER = "\x00hostile\x00"
GOOD_JOB = {  # a body that is accepted, so a hostile leaf is the only thing wrong
    "teacher": "preset:tiny",
    "student": {"init": "truncate", "num_layers": 1},
    "data": {"train": "demo:train"},
    "training": {"max_steps": 2},
    "evaluation": {"seeds": [1]},
    "resources": {"device": "cpu"},
    "metadata": {"run": "a"},
}


def _leaves(value: object, at: tuple = ()) -> list[tuple]:
    """Paths to every leaf of a JSON value, containers included (a whole object is a leaf too)."""
    paths = [at]
    if isinstance(value, dict):
        paths += [p for key, child in value.items() for p in _leaves(child, (*at, key))]
    elif isinstance(value, list):
        paths += [p for i, child in enumerate(value) for p in _leaves(child, (*at, i))]
    return paths


def _replace(value: object, at: tuple, new: object) -> object:
    if not at:
        return new
    copy = dict(value) if isinstance(value, dict) else list(value)  # type: ignore[call-overload]
    copy[at[0]] = _replace(copy[at[0]], at[1:], new)
    return copy


def _hostile_json(body: object, at: tuple, fragment: bytes) -> bytes:
    text = json.dumps(_replace(body, at, PLACEHOLDER), allow_nan=False).encode()
    return text.replace(json.dumps(PLACEHOLDER).encode(), fragment)


def _multipart(purpose: bytes, filename: bytes) -> tuple[str, bytes]:
    body = (
        b'--b0\r\nContent-Disposition: form-data; name="purpose"\r\n\r\n' + purpose + b"\r\n"
        b'--b0\r\nContent-Disposition: form-data; name="file"; filename="' + filename + b'"\r\n\r\n'
        b'{"prompt": "a", "response": "b"}\n\r\n--b0--\r\n'
    )
    return "multipart/form-data; boundary=b0", body


def _request(case, place: tuple, token: str) -> dict:
    """The request ``case`` makes, with the value at ``place`` replaced by the hostile ``token``."""
    kind, name = place[0], place[1] if len(place) > 1 else None
    text = HOSTILE_TEXT.get(token, HOSTILE_JSON.get(token, b""))
    path = case.operation.path
    for key, value in (case.path_parameters or {}).items():
        raw = text if (kind, name) == ("path", key) else str(value).encode()
        path = path.replace(f"{{{key}}}", quote_from_bytes(raw, safe=""))
    query = {k: str(v).encode() for k, v in (case.query or {}).items() if not isinstance(v, list)}
    if kind == "query":
        query[name] = text
    url = path + ("?" + urlencode(query) if query else "")
    headers = {"Authorization": f"Bearer {_state['key']}"}
    if kind == "header":
        headers[name] = text  # type: ignore[assignment]  # bytes: sent as they are
    content = None
    if kind == "form" or case.operation.method.upper() == "POST" and case.operation.path == "/v1/files":
        purpose = text if (kind, name) == ("form", "purpose") else b"train"
        filename = text if (kind, name) == ("form", "filename") else b"data.jsonl"
        headers["Content-Type"], content = _multipart(purpose, filename)
    elif kind == "body":
        headers["Content-Type"] = "application/json"
        content = _hostile_json(place[2], place[1], HOSTILE_JSON[token])
    return {"method": case.operation.method.upper(), "url": url, "headers": headers, "content": content}


@st.composite
def _hostile_requests(draw, operation) -> dict:
    case = draw(operation.as_strategy(generation_mode=GenerationMode.POSITIVE))
    parameters = [("path", p.name) for p in operation.path_parameters] + [
        ("query", p.name) for p in operation.query
    ]
    parameters += [("header", p.name) for p in operation.headers if p.name.lower() != "authorization"]
    parameters.append(("query", "undeclared"))  # every route, /healthz too, reads its query string
    if operation.path == "/v1/files" and operation.method.upper() == "POST":
        parameters += [("form", "purpose"), ("form", "filename")]
    if case.media_type == "application/json":
        # the JSON body: schemathesis' valid one, or one the service accepts
        body = draw(st.sampled_from([case.body, GOOD_JOB])) if operation.path == "/v1/jobs" else case.body
        if isinstance(body, (dict, list)):
            parameters += [("body", at, body) for at in _leaves(body)]
    place = draw(st.sampled_from(parameters))
    tokens = sorted(HOSTILE_JSON if place[0] == "body" else HOSTILE_TEXT)
    return _request(case, place, draw(st.sampled_from(tokens)))


def _strict_json(content: bytes) -> object:
    def refuse(name: str) -> None:
        raise ValueError(f"{name} in a response")

    return json.loads(content.decode("utf-8"), parse_constant=refuse)


@pytest.mark.integration
def test_hostile_values_on_every_operation(api_schema: schemathesis.BaseSchema) -> None:
    client = TestClient(api_schema.app, raise_server_exceptions=False)
    documented = {
        (method.upper(), path): {int(code) for code in operation["responses"]}
        for path, item in api_schema.app.openapi()["paths"].items()
        for method, operation in item.items()
    }
    failures: dict[str, str] = {}
    for result in api_schema.get_all_operations():
        operation = result.ok()
        try:
            _hostile_fuzz(client, operation, documented[(operation.method.upper(), operation.path)])()
        except Exception as exc:
            failures[operation.label] = str(exc)[:3000]
    assert not failures, "\n\n".join(f"{label}:\n{text}" for label, text in failures.items())
    _everything_stored_still_shows(client)


def _hostile_fuzz(client: TestClient, operation, allowed: set[int]):
    """A hypothesis test of one operation: no 5xx, only documented statuses, strict JSON."""

    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(request=_hostile_requests(operation))
    def fuzz(request: dict) -> None:
        response = client.request(**request)
        shown = f"{request['method']} {request['url'][:200]} -> {response.status_code} {response.text[:300]}"
        assert response.status_code < 500, shown
        assert response.status_code in allowed, shown
        if response.headers.get("content-type", "").startswith("application/json"):
            body = _strict_json(response.content)
            if response.status_code >= 400:  # OpenAI's error object, and the deprecated alias beside it
                assert set(body) == {"error", "detail"}, shown  # type: ignore[arg-type]
                assert set(body["error"]) == {"message", "type", "param", "code"}, shown  # type: ignore[index]

    return fuzz


def _everything_stored_still_shows(client: TestClient) -> None:
    headers = {"Authorization": f"Bearer {_state['key']}"}
    for route in ("/v1/jobs?limit=100", "/v1/files?limit=1000"):
        page = client.get(route, headers=headers)
        assert page.status_code == 200, page.text
        for item in page.json()["data"]:
            prefix = "/v1/jobs/" if item["object"] == "distillation.job" else "/v1/files/"
            assert client.get(prefix + item["id"], headers=headers).status_code == 200
            if prefix == "/v1/jobs/":
                assert client.get(f"{prefix}{item['id']}/events", headers=headers).status_code == 200
