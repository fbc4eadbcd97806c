"""The dashboard's files at /ui and the spec schema its submit form validates against."""

from __future__ import annotations

import re

from fastapi.testclient import TestClient

from api.schemas.jobs import JobCreate
from api.ui import STATIC

OWN_FILES = [p for p in STATIC.rglob("*") if p.is_file() and "vendor" not in p.parts]


def test_ui_serves_the_page_with_a_same_origin_policy(client: TestClient) -> None:
    redirect = client.get("/ui", follow_redirects=False)
    assert redirect.status_code == 307 and redirect.headers["location"].endswith("/ui/")
    page = client.get("/ui/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert '<script type="module" src="js/app.js">' in page.text
    assert page.headers["content-security-policy"].startswith("default-src 'self';")
    assert page.headers["referrer-policy"] == "no-referrer"
    script = client.get("/ui/js/app.js")
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    assert client.get("/ui/vendor/uplot/uPlot.esm.js").status_code == 200
    assert client.get("/ui/../api/main.py").status_code == 404


def test_ui_needs_no_key_but_its_data_does(client: TestClient) -> None:
    assert client.get("/ui/").status_code == 200
    assert client.get("/v1/spec/schema").status_code == 401


def test_every_vendored_library_ships_its_license() -> None:
    vendor = STATIC / "vendor"
    libraries = [p for p in vendor.iterdir() if p.is_dir()]
    assert {p.name for p in libraries} == {"uplot", "js-yaml", "json-schema"}
    for library in libraries:
        assert "Permission is hereby granted" in (library / "LICENSE").read_text(), library


def test_our_files_make_no_request_to_another_origin() -> None:
    # No CDN, no web fonts: every URL in our markup, styles and scripts is relative.
    external = re.compile(r"""(src|href)=["']https?:|url\(\s*["']?https?:|fetch\(\s*["'`]https?:|@import""")
    assert OWN_FILES
    for path in OWN_FILES:
        assert not external.search(path.read_text()), path


def test_spec_schema_is_the_job_body_schema(client: TestClient, headers: dict[str, str]) -> None:
    response = client.get("/v1/spec/schema", headers=headers)
    assert response.status_code == 200
    schema = response.json()
    assert schema == JobCreate.model_json_schema()
    assert {"teacher", "student", "data", "loss", "training", "metadata"} <= set(schema["properties"])
    assert "data" in schema["required"] and "TrainingSpec" in schema["$defs"]
