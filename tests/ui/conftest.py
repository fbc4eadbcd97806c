"""The dashboard in a real headless Chromium (Debian's ``chromium`` package, never a browser
download) driven by playwright, against a live ``akl serve`` running tiny-preset jobs.

Screenshots go to AKL_UI_SCREENSHOTS (default: a ``ui-screenshots`` folder under pytest's
temporary directory, printed at the end of the run)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.e2e.test_embedded import Embedded
from tests.reliability.conftest import tiny_job
from tests.worker import services

TERMINAL = ("succeeded", "failed", "cancelled")
XSS = "<img src=x onerror=window.pwned=1>"  # job text the page must show as text


def chromium_path() -> str | None:
    return os.environ.get("AKL_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


def http(service: Embedded) -> httpx.Client:
    """The service's client with a timeout for a loaded machine (httpx's default is 5 s)."""
    client = service.http()
    client.timeout = httpx.Timeout(60)
    return client


@dataclass
class Finished:
    """Two jobs of a small loss sweep (AKL and FKL) that ran to the end with checkpoints."""

    akl: str
    fkl: str


@dataclass
class Page:
    """A fresh browser context and page; every request it made is kept (``requests``)."""

    page: object
    url: str
    requests: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def sign_in(self, key: str) -> None:
        page = self.page
        page.goto(f"{self.url}/ui/")
        page.get_by_label("API key").fill(key)
        page.get_by_label("API key").press("Enter")
        page.wait_for_selector("#jobs-table")


@pytest.fixture(scope="module")
def service(models_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Embedded]:
    """`akl serve` (SQLite + file-system broker + API + one worker) with an API key."""
    served = Embedded(models_root, tmp_path_factory.mktemp("ui-serve"))
    try:
        yield served
    finally:
        services.stop_group(served.proc, timeout=60)


@pytest.fixture(scope="module")
def finished(service: Embedded, tmp_path_factory: pytest.TempPathFactory) -> Finished:
    workdir = tmp_path_factory.mktemp("ui-jobs")
    ids = {}
    with http(service) as client:
        for loss in ("akl", "fkl"):
            spec = tiny_job(
                workdir, steps=4, checkpoint_every=2, data={"train": "demo:train", "max_train_examples": 16},
                loss={"name": loss}, evaluation={"teacher_reference": True},
            )  # fmt: skip
            spec["metadata"] = {"sweep": "loss", "note": XSS}
            response = client.post("/v1/jobs", json=spec)
            assert response.status_code == 201, response.text
            ids[loss] = response.json()["id"]
        for job_id in ids.values():
            services.wait_for(
                lambda job_id=job_id: client.get(f"/v1/jobs/{job_id}").json()["status"] in TERMINAL,
                240, f"job {job_id}", interval=0.5,
            )  # fmt: skip
            status = client.get(f"/v1/jobs/{job_id}").json()["status"]
            assert status == "succeeded", f"{job_id} {status}\n{service.log.read_text()[-3000:]}"
    return Finished(**ids)


@pytest.fixture(scope="module")
def browser():
    executable = chromium_path()
    if executable is None:
        pytest.skip("no chromium binary: apt-get install -y chromium (bash run.sh test does it as root)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the dev extra)")
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=executable, args=["--no-sandbox", "--disable-dev-shm-usage"]
        )
        yield launched
        launched.close()


@pytest.fixture(scope="session")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = os.environ.get("AKL_UI_SCREENSHOTS")
    path = Path(folder) if folder else tmp_path_factory.getbasetemp() / "ui-screenshots"
    path.mkdir(parents=True, exist_ok=True)
    return path


def open_page(browser, service: Embedded, **context) -> Iterator[Page]:
    ctx = browser.new_context(accept_downloads=True, **context)
    page = ctx.new_page()
    page.set_default_timeout(30_000)
    opened = Page(page=page, url=service.url)
    page.on("request", lambda request: opened.requests.append(request.url))
    page.on("pageerror", lambda error: opened.errors.append(str(error)))
    # A resource the Content-Security-Policy blocked is logged on the console, not raised.
    page.on(
        "console",
        lambda message: "Content Security Policy" in message.text and opened.errors.append(message.text),
    )
    try:
        yield opened
    finally:
        ctx.close()
    # No CDN, no web fonts: the page talked to its own origin only, and never threw.
    assert all(u.startswith(service.url) or u.startswith(("blob:", "data:")) for u in opened.requests), [
        u for u in opened.requests if not u.startswith(service.url)
    ]
    assert not opened.errors, opened.errors


@pytest.fixture
def ui(browser, service: Embedded) -> Iterator[Page]:
    """A 1280x800 page."""
    yield from open_page(browser, service, viewport={"width": 1280, "height": 800})


@pytest.fixture
def phone(browser, service: Embedded) -> Iterator[Page]:
    """A phone-sized page (390x844, touch)."""
    yield from open_page(
        browser, service, viewport={"width": 390, "height": 844}, has_touch=True, is_mobile=True
    )
