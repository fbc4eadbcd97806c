from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from tests.worker import services
from worker.supervisor import EventTail, Supervisor, checked


def test_checked_keeps_contract_events_and_turns_the_rest_into_warnings():
    assert checked(b'{"type": "checkpoint", "step": 3, "path": "p"}') == {
        "type": "checkpoint",
        "step": 3,
        "path": "p",
    }
    torn = checked(b'{"type": "st')
    assert torn["type"] == "log" and torn["level"] == "warning" and "unreadable" in torn["message"]
    refused = checked(b'{"type": "checkpoint", "step": "three", "path": "p"}')
    assert refused["type"] == "log" and "step" in refused["message"]
    assert checked(b'{"type": "no-such-event"}')["type"] == "log"


def test_tail_reads_only_new_complete_lines(tmp_path: Path):
    path = tmp_path / "events.jsonl"
    path.write_text('{"type": "log", "message": "an earlier run"}\n')
    tail = EventTail(path)
    assert tail.read() == []
    with open(path, "a") as f:
        f.write('{"type": "log", "message": "one"}\n{"type": "log", "mess')
    assert [e["message"] for e in tail.read()] == ["one"]
    with open(path, "a") as f:
        f.write('age": "two"}\n')
    assert [e["message"] for e in tail.read()] == ["two"]
    path.write_text('{"type": "log", "message": "replaced"}\n')  # shorter: a new file
    assert [e["message"] for e in tail.read()] == ["replaced"]


def test_tail_never_reads_a_device(tmp_path: Path):
    path = tmp_path / "events.jsonl"
    os.symlink("/dev/zero", path)  # endless: reading it would never return
    assert EventTail(path).read() == []


def _run(tmp_path: Path, fake: dict, should_stop=lambda: None, grace: float = 5.0):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"_fake": fake}))
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    events: list[dict] = []
    ticks = []
    sup = Supervisor(
        [sys.executable, "-m", "tests.worker.fake_runner", str(spec), str(out)],
        events_path=out / "events.jsonl",
        on_event=events.append,
        on_tick=lambda: ticks.append(1),
        should_stop=should_stop,
        cwd=services.REPO,
        stderr_path=out / "runner.log",
        term_grace_s=grace,
        poll_s=0.05,
    )
    return sup.run(), events, ticks


def test_relays_every_event_of_this_run_in_order(tmp_path: Path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "events.jsonl").write_text('{"type": "log", "message": "an earlier run"}\n')
    result, events, ticks = _run(tmp_path, {"steps": 5, "noise": True})  # noise: stdout is ignored
    assert result.returncode == 0 and result.stop_reason is None
    types = [e["type"] for e in events]
    assert types == ["started", "step", "step", "step", "step", "step", "eval", "completed"]
    assert [e["step"] for e in events if e["type"] == "step"] == [1, 2, 3, 4, 5]
    assert result.last_events["completed"]["step"] == 5 and ticks


def test_an_error_that_reached_only_stdout_is_used(tmp_path: Path):
    """The disk-full case: events.jsonl could not take the error event, stdout did."""
    result, events, _ = _run(tmp_path, {"fail": "disk_full", "stdout_only": True})
    assert result.returncode == 1
    assert result.last_events["error"]["code"] == "disk_full" and events[-1]["type"] == "error"


def test_stop_request_sigterms_child_which_checkpoints(tmp_path: Path):
    started = time.monotonic()
    result, events, _ = _run(
        tmp_path,
        {"steps": 10_000, "step_s": 0.02},
        should_stop=lambda: "cancelled" if time.monotonic() - started > 1 else None,
    )
    assert result.returncode == 3 and result.stop_reason == "cancelled"
    stopped = result.last_events["stopped"]
    assert (tmp_path / "out" / stopped["checkpoint"] / "state.json").exists()
    assert time.monotonic() - started < 10


def test_child_ignoring_sigterm_is_killed_after_grace(tmp_path: Path):
    started = time.monotonic()
    result, _, _ = _run(
        tmp_path, {"steps": 10_000, "step_s": 0.02, "ignore_term": True},
        should_stop=lambda: "cancelled" if time.monotonic() - started > 1 else None, grace=1.0,
    )  # fmt: skip
    assert result.returncode < 0  # SIGKILL
    assert time.monotonic() - started < 10
