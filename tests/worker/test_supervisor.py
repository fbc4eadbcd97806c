from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from tests.worker import services
from worker.supervisor import Supervisor, parse_event_line


def test_parse_event_line_keeps_events_and_wraps_noise():
    assert parse_event_line('{"type": "step", "step": 3}\n') == {"type": "step", "step": 3}
    noise = parse_event_line("Downloading something...")
    assert noise["type"] == "log" and noise["level"] == "warning" and "Downloading" in noise["message"]
    assert parse_event_line("[1, 2]")["type"] == "log"  # JSON but not an event
    assert parse_event_line('{"no_type": 1}')["type"] == "log"


def _run(tmp_path: Path, fake: dict, should_stop=lambda: None, grace: float = 5.0):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"_fake": fake}))
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    events: list[dict] = []
    ticks = []
    sup = Supervisor(
        [sys.executable, "-m", "tests.worker.fake_runner", str(spec), str(out)],
        on_event=events.append,
        on_tick=lambda: ticks.append(1),
        should_stop=should_stop,
        cwd=services.REPO,
        stderr_path=out / "runner.log",
        term_grace_s=grace,
        poll_s=0.05,
    )
    return sup.run(), events, ticks


def test_relays_every_event_in_order(tmp_path: Path):
    result, events, ticks = _run(tmp_path, {"steps": 5, "noise": True})
    assert result.returncode == 0 and result.stop_reason is None and not result.killed
    types = [e["type"] for e in events]
    assert types == ["log", "started", "step", "step", "step", "step", "step", "eval", "completed"]
    assert [e["step"] for e in events if e["type"] == "step"] == [1, 2, 3, 4, 5]
    assert result.last_events["completed"]["step"] == 5 and ticks


def test_stop_request_sigterms_child_which_checkpoints(tmp_path: Path):
    started = time.monotonic()
    result, events, _ = _run(
        tmp_path,
        {"steps": 10_000, "step_s": 0.02},
        should_stop=lambda: "cancelled" if time.monotonic() - started > 1 else None,
    )
    assert result.returncode == 3 and result.stop_reason == "cancelled" and not result.killed
    stopped = result.last_events["stopped"]
    assert (tmp_path / "out" / stopped["checkpoint"] / "state.json").exists()
    assert time.monotonic() - started < 10


def test_child_ignoring_sigterm_is_killed_after_grace(tmp_path: Path):
    started = time.monotonic()
    result, _, _ = _run(
        tmp_path, {"steps": 10_000, "step_s": 0.02, "ignore_term": True},
        should_stop=lambda: "cancelled" if time.monotonic() - started > 1 else None, grace=1.0,
    )  # fmt: skip
    assert result.killed and result.returncode < 0
    assert time.monotonic() - started < 10
