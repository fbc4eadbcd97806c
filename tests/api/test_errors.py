"""The one error shape (api/core/errors.py): the handlers never fail, whatever the input they
echo, and every route's OpenAPI entry lists the statuses it answers with the error schema."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from fastapi import FastAPI, HTTPException
from fastapi.exceptions import RequestValidationError
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st

from api.core.config import Settings
from api.core.errors import ErrorBody, error_response, install_error_handlers, safe_json
from api.main import create_app


def _strict_json(body: bytes) -> Any:
    """What a strict client reads: UTF-8 with no surrogate, and no NaN / Infinity literal."""

    def refuse(name: str) -> None:
        raise ValueError(name)

    return json.loads(body.decode("utf-8"), parse_constant=refuse)


surrogates = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF, exclude_categories=())
any_text = st.text(st.characters(exclude_categories=()) | surrogates, max_size=20)
hostile = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.sampled_from([20, -20, 5000, -5000]).map(lambda n: 10 ** abs(n) * (1 if n > 0 else -1))
    | st.floats(allow_nan=True, allow_infinity=True)
    | any_text
    | st.binary(max_size=20)
    | st.builds(object),
    lambda children: (
        st.lists(children, max_size=5)
        | st.dictionaries(any_text, children, max_size=5)
        | st.tuples(children, children)
    ),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None, database=None, derandomize=True)
@given(detail=hostile)
def test_any_detail_makes_a_strict_json_error_body(detail: Any) -> None:
    response = error_response(422, detail)
    assert response.status_code == 422
    body = _strict_json(response.body)
    assert set(body) == {"error", "detail"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("a\ud800b", "a\\ud800b"),
        (float("nan"), "nan"),
        (-math.inf, "-inf"),
        (10**5000, "<an integer of 16610 bits>"),
        (b"\xff\xfeA", "\\xff\\xfeA"),
        ("x" * 5000, "x" * 2000 + "... (5000 characters)"),
        (object(), "<object>"),
    ],
    ids=["surrogate", "nan", "-inf", "5000 digits", "bytes", "long text", "object"],
)
def test_safe_json_shows_what_a_strict_encoder_refuses(value: Any, shown: Any) -> None:
    assert safe_json(value) == shown


def test_safe_json_cuts_deep_nesting_and_long_lists() -> None:
    deep: Any = "x"
    for _ in range(1000):
        deep = [deep]
    assert "..." in json.dumps(safe_json(deep))
    assert len(safe_json(list(range(10_000)))) == 50


@pytest.fixture
def tiny_app() -> TestClient:
    """An app with only the error handlers and routes that raise what a route could."""
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/invalid")
    def invalid() -> None:
        inputs = [b"\xed\xa0\x80", "\udfff", float("nan"), 10**5000, {"k": object()}]
        raise RequestValidationError(
            [{"type": "t", "loc": ("body", i), "msg": "m", "input": v} for i, v in enumerate(inputs)]
        )

    @app.get("/http")
    def http() -> None:
        raise HTTPException(401, "key \ud800 refused", headers={"WWW-Authenticate": "Bearer"})

    @app.get("/bug")
    def bug() -> None:
        raise RuntimeError("/secret/path \ud800")

    return TestClient(app, raise_server_exceptions=False)


def test_handlers_answer_hostile_echoes_with_strict_json(tiny_app: TestClient) -> None:
    invalid = tiny_app.get("/invalid")
    assert invalid.status_code == 422
    issues = _strict_json(invalid.content)["detail"]
    assert [issue["input"] for issue in issues[:3]] == ["\\xed\\xa0\\x80", "\\udfff", "nan"]
    ErrorBody.model_validate(_strict_json(invalid.content))
    http = tiny_app.get("/http")
    assert http.status_code == 401 and http.headers["www-authenticate"] == "Bearer"
    assert _strict_json(http.content) == {
        "error": {
            "message": "key \\ud800 refused",
            "type": "authentication_error",
            "param": None,
            "code": "invalid_api_key",
        },
        "detail": "key \\ud800 refused",
    }
    bug = tiny_app.get("/bug")
    assert bug.status_code == 500
    assert _strict_json(bug.content) == {
        "error": {"message": "internal error", "type": "server_error", "param": None, "code": None},
        "detail": "internal error",
    }


def test_a_validation_error_names_its_first_parameter(tiny_app: TestClient) -> None:
    error = tiny_app.get("/invalid").json()["error"]
    assert error["param"] == "0" and error["code"] == "invalid_value"
    assert error["message"].startswith("body.0: m; body.1: m")


# What each route may answer beyond the statuses every /v1 route lists (400, 401, 422, 503).
ROUTE_ERRORS = {
    ("post", "/v1/files"): {413, 429},
    ("get", "/v1/files"): set(),
    ("get", "/v1/files/{file_id}"): {404},
    ("get", "/v1/files/{file_id}/content"): {404},
    ("delete", "/v1/files/{file_id}"): {404, 409},
    ("post", "/v1/jobs"): {403, 404, 409, 413, 429},
    ("get", "/v1/jobs"): set(),
    ("get", "/v1/jobs/{job_id}"): {404},
    ("post", "/v1/jobs/{job_id}/cancel"): {404, 409},
    ("get", "/v1/jobs/{job_id}/events"): {404},
    ("get", "/v1/jobs/{job_id}/metrics"): {404},
    ("get", "/v1/jobs/{job_id}/evaluations"): {404},
    ("get", "/v1/jobs/{job_id}/checkpoints"): {404},
    ("get", "/v1/jobs/{job_id}/checkpoints/{checkpoint_id}/content"): {404},
    ("get", "/v1/jobs/{job_id}/model"): {404},
    ("get", "/v1/spec/schema"): set(),
    ("post", "/v1/webhooks"): {413, 429},
    ("get", "/v1/webhooks"): set(),
    ("get", "/v1/webhooks/{webhook_id}"): {404},
    ("delete", "/v1/webhooks/{webhook_id}"): {404},
    ("get", "/v1/webhooks/{webhook_id}/attempts"): {404},
    ("post", "/v1/teacher_caches"): {403, 404},
    ("get", "/v1/teacher_caches"): set(),
    ("get", "/v1/teacher_caches/{cache_id}"): {404},
    ("post", "/v1/teacher_caches/{cache_id}/cancel"): {404, 409},
    ("delete", "/v1/teacher_caches/{cache_id}"): {404, 409},
    ("get", "/v1/teacher_caches/{cache_id}/events"): {404},
    ("get", "/v1/models"): set(),
    ("get", "/v1/models/{model}"): {404},
    ("get", "/v1/models/{model}/content"): {404},
    ("post", "/v1/fine_tuning/jobs"): {403, 404, 409, 413, 429},
    ("get", "/v1/fine_tuning/jobs"): set(),
    ("get", "/v1/fine_tuning/jobs/{job_id}"): {404},
    ("post", "/v1/fine_tuning/jobs/{job_id}/cancel"): {404, 409},
    ("get", "/v1/fine_tuning/jobs/{job_id}/events"): {404},
    ("get", "/v1/fine_tuning/jobs/{job_id}/checkpoints"): {404},
}


def test_every_route_lists_its_error_statuses_with_the_error_schema(settings: Settings) -> None:
    schema = create_app(settings).openapi()
    error_ref = "#/components/schemas/ErrorBody"
    operations = {
        (method, path): operation
        for path, item in schema["paths"].items()
        if path.startswith("/v1")
        for method, operation in item.items()
    }
    assert set(operations) == set(ROUTE_ERRORS)  # a new route must say what it answers here
    for key, operation in operations.items():
        errors = {int(code) for code in operation["responses"] if int(code) >= 400}
        assert errors == {400, 401, 422, 503} | ROUTE_ERRORS[key], key
        for code in errors:
            content = operation["responses"][str(code)]["content"]["application/json"]
            assert content["schema"] == {"$ref": error_ref}, (key, code)
    detail = schema["components"]["schemas"]["ErrorBody"]["properties"]["detail"]
    assert {"type": "string"} in detail["anyOf"]
    for path in ("/healthz", "/readyz"):  # a query string that is not UTF-8
        assert schema["paths"][path]["get"]["responses"]["400"]["content"]["application/json"]
    readyz = schema["paths"]["/readyz"]["get"]["responses"]["503"]
    assert readyz["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Readiness"}
