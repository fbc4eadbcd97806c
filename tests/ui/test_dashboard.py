"""The dashboard used as a person would: sign in, read the jobs, open one (its curves are the
API's metrics), compare two, download a checkpoint, submit a job from the form and cancel it."""

from __future__ import annotations

import re
import tarfile
from pathlib import Path

import pytest

from tests.e2e.test_embedded import Embedded
from tests.ui.conftest import XSS, Finished, Page, http
from tests.worker import services

pytestmark = [pytest.mark.ui, pytest.mark.integration]

# What the job page plots, chart by chart (api/ui/static/js/job.js, CHARTS).
CHARTS = {
    "loss": ["loss", "ce", "kd"],
    "gaps": ["g_head", "g_tail", "w_head"],
    "divergences": ["fkl", "rkl"],
    "lr": ["lr"],
    "tokens_per_s": ["tokens_per_s"],
}
MAX_POINTS = 1000  # job.js asks the metrics route for at most this many points

# Every control has an accessible name: its label, aria-label or text.
UNNAMED = """() => [...document.querySelectorAll('button, input, select, textarea, a[href]')]
  .filter((el) => el.offsetParent !== null)
  .filter((el) => !(el.getAttribute('aria-label') || (el.labels && [...el.labels].some((l) => l.textContent.trim()))
                    || el.textContent.trim()))
  .map((el) => el.outerHTML)"""


def _key(service: Embedded) -> str:
    return service.env["AKL_API_KEY"]


def _api_points(service: Embedded, job_id: str) -> list[dict]:
    with http(service) as client:
        response = client.get(f"/v1/jobs/{job_id}/metrics", params={"max_points": MAX_POINTS})
    assert response.status_code == 200
    return response.json()["data"]


def _column(points: list[dict], name: str) -> list:
    return [p[name] if isinstance(p[name], (int, float)) else None for p in points]


def test_sign_in_shows_the_jobs_and_sign_out_forgets_the_key(
    ui: Page, service: Embedded, finished: Finished, screenshots: Path
):
    page = ui.page
    page.goto(f"{ui.url}/ui/")
    page.get_by_label("API key").fill("akl-000000000000-wrong")
    page.get_by_role("button", name="Sign in").click()
    # The API's own message, and the bad key is not kept.
    page.get_by_text("a valid API key is required: Authorization: Bearer <key>").wait_for()
    assert page.evaluate("sessionStorage.getItem('akl.apiKey')") is None

    ui.sign_in(_key(service))
    rows = page.locator("#jobs-table tbody tr[data-job]")
    rows.first.wait_for()
    for job_id, loss in ((finished.akl, "akl"), (finished.fkl, "fkl")):
        row = page.locator(f'tr[data-job="{job_id}"]')
        assert row.get_attribute("data-status") == "succeeded"
        cells = row.locator("td").all_inner_texts()
        assert cells[4] == "4/4" and cells[7] == "preset:tiny → truncate 2L" and cells[8] == loss, cells
        assert row.get_by_role("progressbar").get_attribute("value") == "100"
    assert page.evaluate("sessionStorage.getItem('akl.apiKey')") == _key(service)
    assert _key(service) not in page.url and not any(_key(service) in u for u in ui.requests)
    assert page.locator("#nav-caches").is_visible()  # GET /v1/teacher_caches answers 200

    page.get_by_label("Status").select_option("running")
    page.get_by_text("No jobs yet.").wait_for()
    page.get_by_label("Status").select_option("succeeded")
    page.locator(f'tr[data-job="{finished.akl}"]').wait_for()
    assert page.evaluate(UNNAMED) == []
    page.screenshot(path=screenshots / "jobs.png", full_page=True)

    page.get_by_role("button", name="Sign out").click()
    page.get_by_role("heading", name="Sign in").wait_for()
    assert page.evaluate("sessionStorage.getItem('akl.apiKey')") is None
    page.reload()
    page.get_by_role("heading", name="Sign in").wait_for()


def test_keyboard_alone_opens_a_job(ui: Page, service: Embedded, finished: Finished):
    page = ui.page
    ui.sign_in(_key(service))
    page.locator(f'tr[data-job="{finished.akl}"]').wait_for()
    for _ in range(40):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.textContent") == finished.akl:
            break
    else:
        pytest.fail("Tab never reached the job's link")
    page.keyboard.press("Enter")
    page.wait_for_url(re.compile(f"#/jobs/{finished.akl}$"))
    page.locator('[data-loaded="true"]').wait_for()
    assert page.evaluate("document.activeElement.tagName") == "H1"  # focus moved to the new page


def test_job_page_plots_exactly_the_api_metrics(
    ui: Page, service: Embedded, finished: Finished, screenshots: Path
):
    page = ui.page
    ui.sign_in(_key(service))
    page.goto(f"{ui.url}/ui/#/jobs/{finished.akl}")
    page.locator('[data-loaded="true"]').wait_for()
    page.locator("#evaluations").wait_for()
    points = _api_points(service, finished.akl)
    assert [p["step"] for p in points] == [1, 2, 3, 4]
    charts = page.evaluate("window.akl.charts")
    for chart, fields in CHARTS.items():
        assert charts[chart]["steps"] == [p["step"] for p in points], chart
        for name in fields:
            assert charts[chart]["series"][name] == _column(points, name), (chart, name)
    assert any(f"/v1/jobs/{finished.akl}/metrics?max_points={MAX_POINTS}" in u for u in ui.requests)

    # Hovering a chart shows the values at that step in its legend.
    plot = page.locator("#chart-gaps .u-over")
    box = plot.bounding_box()
    plot.hover(position={"x": box["width"] - 2, "y": box["height"] / 2})
    values = page.locator("#chart-gaps .u-legend .u-series .u-value").all_inner_texts()
    assert values[0] == "4"  # the last step
    for shown, name in zip(values[1:], CHARTS["gaps"], strict=True):
        assert float(shown) == pytest.approx(points[-1][name], rel=1e-3), name

    with http(service) as client:
        evaluation = client.get(f"/v1/jobs/{finished.akl}/evaluations").json()["data"][-1]
        events = client.get(f"/v1/jobs/{finished.akl}/events").json()["data"]
    cells = page.locator("#evaluations tbody tr").last.locator("td").all_inner_texts()
    assert cells[0] == str(evaluation["step"])
    assert float(cells[1].split("±")[0]) == pytest.approx(evaluation["metrics"]["rouge_l"], abs=0.01)
    assert cells[2] != "–"  # the teacher's Rouge-L (teacher_reference)
    assert page.locator(".events li").count() == len(events)
    assert "succeeded" in page.locator(".events").inner_text()
    assert page.locator("#checkpoints tbody tr").count() >= 2
    spec = page.locator("pre.spec").inner_text()
    assert "teacher: preset:tiny" in spec and "name: akl" in spec
    assert page.get_by_role("button", name="Cancel job").count() == 0  # finished: nothing to cancel
    assert f"note={XSS}" in page.locator(".summary").inner_text()  # shown as text, not run
    assert page.evaluate("window.pwned") is None and page.locator(".summary img").count() == 0
    assert page.evaluate(UNNAMED) == []
    page.screenshot(path=screenshots / "job.png", full_page=True)


def test_download_a_checkpoint(ui: Page, service: Embedded, finished: Finished, tmp_path: Path):
    page = ui.page
    ui.sign_in(_key(service))
    page.goto(f"{ui.url}/ui/#/jobs/{finished.fkl}")
    page.locator("#checkpoints").wait_for()
    with page.expect_download() as download:
        page.get_by_role("button", name="Download step 2").click()
    saved = tmp_path / download.value.suggested_filename
    download.value.save_as(saved)
    assert saved.name == f"{finished.fkl}-step-00000002.tar.gz"
    with tarfile.open(saved) as archive:
        names = archive.getnames()
    assert f"{finished.fkl}-step-00000002/config.json" in names, names
    assert any(n.endswith(".safetensors") for n in names), names
    assert not any("/content?" in u and _key(service) in u for u in ui.requests)


def test_compare_two_jobs(ui: Page, service: Embedded, finished: Finished, screenshots: Path):
    page = ui.page
    ui.sign_in(_key(service))
    compare = page.get_by_role("button", name=re.compile(r"Compare selected"))
    assert compare.is_disabled()
    page.get_by_label(f"select {finished.akl} for comparison").check()
    page.get_by_label(f"select {finished.fkl} for comparison").check()
    compare.click()
    page.get_by_role("heading", name="Compare 2 jobs").wait_for()
    page.locator("#compare-evaluations").wait_for()
    charts = page.evaluate("window.akl.charts")
    for name in ("loss", "kd", "g_head", "g_tail", "w_head"):
        chart = charts[f"compare-{name}"]
        assert set(chart["series"]) == {finished.akl, finished.fkl}
        for job_id in (finished.akl, finished.fkl):
            points = _api_points(service, job_id)
            assert chart["steps"] == [p["step"] for p in points]
            assert chart["series"][job_id] == _column(points, name), (name, job_id)
    header = page.locator("#compare-evaluations thead th").all_inner_texts()
    assert header[1:] == [finished.akl, finished.fkl]
    rows = page.locator("#compare-evaluations tbody tr")
    rouge = rows.filter(has=page.locator("th", has_text=re.compile(r"^Rouge-L \(student\)$"))).locator("td")
    assert rouge.count() == 2 and "±" in rouge.first.inner_text()
    assert page.evaluate(UNNAMED) == []
    page.screenshot(path=screenshots / "compare.png", full_page=True)


def test_submit_from_the_form_then_cancel_it(
    ui: Page, service: Embedded, finished: Finished, tmp_path: Path, screenshots: Path
):
    page = ui.page
    ui.sign_in(_key(service))
    page.get_by_role("link", name="Submit").click()
    editor = page.get_by_label("Job spec")
    editor.wait_for()
    page.get_by_text("The spec matches the schema.").wait_for()

    # The JSONL upload puts the file's id into data.train.
    train = tmp_path / "train.jsonl"
    demo = Path(__file__).resolve().parents[2] / "akl_core/datasets/demo/train.jsonl"
    train.write_text(
        "".join(demo.read_text(encoding="utf-8").splitlines(keepends=True)[:16]), encoding="utf-8"
    )
    page.get_by_label("JSONL file").set_input_files(str(train))
    page.get_by_role("button", name="Upload").click()
    file_id = page.locator("#upload-result[data-file-id]").get_attribute("data-file-id")
    assert file_id.startswith("file-") and f"train: {file_id}" in editor.input_value()
    good = (
        editor.input_value()
        .replace("max_steps: 20", "max_steps: 400")
        .replace("every_steps: 10", "every_steps: 1000")
    )

    # The schema catches a bad value before anything is sent.
    editor.fill(good.replace("learning_rate: 0.001", "learning_rate: -1"))
    check = page.locator("#spec-check")
    check.get_by_text("training.learning_rate").wait_for()
    posts = len([u for u in ui.requests if u.endswith("/v1/jobs")])
    page.get_by_role("button", name="Submit job").click()
    assert check.get_attribute("data-valid") == "false"
    assert page.evaluate(UNNAMED) == []
    page.screenshot(path=screenshots / "submit-invalid.png", full_page=True)

    # A spec the schema accepts but the server refuses: the API's own message is shown.
    missing = good.replace(f"train: {file_id}", "train: file-doesnotexist")
    with http(service) as client:
        import yaml

        expected = client.post("/v1/jobs", json=yaml.safe_load(missing)).json()["detail"]
    editor.fill(missing)
    page.get_by_text("The spec matches the schema.").wait_for()
    page.get_by_role("button", name="Submit job").click()
    page.locator("#alert").get_by_text(expected, exact=True).wait_for()
    assert len([u for u in ui.requests if u.endswith("/v1/jobs")]) == posts + 1  # only the valid one

    editor.fill(good)
    page.get_by_text("The spec matches the schema.").wait_for()
    page.get_by_role("button", name="Submit job").click()
    page.wait_for_url(re.compile(r"#/jobs/job-[0-9a-f]+$"))
    job_id = page.url.rsplit("/", 1)[1]
    with http(service) as client:
        submitted = client.get(f"/v1/jobs/{job_id}").json()
    assert submitted["spec"]["data"]["train"] == file_id and submitted["spec"]["training"]["max_steps"] == 400

    # Cancel it once it runs: the button asks first, then the worker stops it.
    page.locator(".view-head .badge", has_text="running").wait_for(timeout=180_000)
    page.get_by_role("button", name="Cancel job").click()
    page.get_by_role("button", name="Yes, cancel it").click()
    page.locator(".view-head .badge", has_text="cancelled").wait_for(timeout=90_000)
    with http(service) as client:
        assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "cancelled"
    assert page.get_by_role("button", name="Cancel job").count() == 0
    page.screenshot(path=screenshots / "cancelled.png", full_page=True)


def test_usable_at_phone_width(phone: Page, service: Embedded, finished: Finished, screenshots: Path):
    page = phone.page
    phone.sign_in(_key(service))
    page.locator(f'tr[data-job="{finished.akl}"]').wait_for()
    # Wide tables scroll inside their own box; the page itself never scrolls sideways.
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    page.get_by_role("link", name=finished.akl).click()
    page.locator('[data-loaded="true"]').wait_for()
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    width = page.locator("#chart-loss canvas").bounding_box()["width"]
    assert 200 < width <= 390
    page.screenshot(path=screenshots / "phone-job.png", full_page=True)


def test_a_long_history_is_drawn_from_max_points(ui: Page, service: Embedded, tmp_path: Path):
    """50,000 recorded steps: the page asks for 1000 evenly spaced points and draws them quickly."""
    import math
    import time

    from sqlalchemy import insert

    from api.db.models import JobMetric
    from api.db.session import make_engine, session_factory
    from tests.reliability.conftest import tiny_job

    with http(service) as client:
        job_id = client.post(
            "/v1/jobs", json=tiny_job(tmp_path, steps=4, data={"train": "demo:train"})
        ).json()["id"]
        client.post(f"/v1/jobs/{job_id}/cancel")
        services.wait_for(
            lambda: client.get(f"/v1/jobs/{job_id}").json()["status"] == "cancelled", 120, "cancel"
        )
    rows = [
        {
            "job_id": job_id,
            "step": step,
            "loss": 3 + math.sin(step / 900),
            "g_head": 0.3,
            "g_tail": 0.5,
            "w_head": 0.4,
        }
        for step in range(1000, 51_000)
    ]
    engine = make_engine(f"sqlite:///{service.data_root / 'akl.db'}")
    try:
        with session_factory(engine)() as session:
            session.execute(insert(JobMetric), rows)
            session.commit()
    finally:
        engine.dispose()

    page = ui.page
    ui.sign_in(_key(service))
    started = time.monotonic()
    page.goto(f"{ui.url}/ui/#/jobs/{job_id}")
    page.locator('[data-loaded="true"]').wait_for()
    page.locator("#chart-loss canvas").wait_for()
    seconds = time.monotonic() - started
    with http(service) as client:
        api_started = time.monotonic()
        metrics = client.get(f"/v1/jobs/{job_id}/metrics", params={"max_points": MAX_POINTS}).json()
        api_seconds = time.monotonic() - api_started
    points = metrics["data"]
    charts = page.evaluate("window.akl.charts")
    assert (
        metrics["total_points"] >= len(rows)
        and len(points) == MAX_POINTS
        and charts["loss"]["steps"] == [p["step"] for p in points]
    )
    assert charts["loss"]["series"]["loss"] == _column(points, "loss")
    assert page.locator(".charts").get_attribute("data-total-points") == str(metrics["total_points"])
    print(
        f"\n{len(rows)} steps: job page drawn in {seconds:.2f} s, the metrics call alone {api_seconds:.2f} s"
    )
    assert seconds < 15
