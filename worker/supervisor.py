"""Run ``akl_core.runner`` in a child process and follow its events in OUTPUT_DIR/events.jsonl.

events.jsonl is the one channel from the runner to the worker: it survives a worker restart (the
next worker reads what an orphaned runner wrote there), and every line is checked against the run
contract (akl_core/contract.py). The runner's stdout is drained and ignored, with one documented
exception: when the run failed and events.jsonl holds no `error` event - its disk was full, so
the runner could only print it - the last `error` line seen on stdout is used.

The child gets its own process group (``start_new_session``) so that a Ctrl-C meant for the worker
does not reach it directly, and so that killing it also kills anything it spawned (torchrun's
ranks, data-loader processes). Stopping is always SIGTERM first - the runner then finishes the
current optimizer step, writes a checkpoint and exits 3 - and SIGKILL only after a grace period.
"""

from __future__ import annotations

import ctypes
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pydantic

from akl_core.contract import EXIT_FAILED, Event, parse_line, validate

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def checked(line: bytes | str) -> Event:
    """One events.jsonl line -> its event, validated. What the contract refuses becomes a
    warning ``log`` event (a bad line must not break the job, and the user should see it)."""
    event = parse_line(line)
    if event is None:
        text = line.decode("utf-8", "replace") if isinstance(line, bytes) else line
        return {"type": "log", "level": "warning", "message": f"unreadable runner event: {text[:2000]}"}
    try:
        return validate(event)
    except pydantic.ValidationError as exc:
        return {
            "type": "log",
            "level": "warning",
            "message": f"runner event refused by the contract: {exc}"[:4000],
        }


class EventTail:
    """The complete lines appended to events.jsonl since this tail was made (earlier lines are
    an earlier run's). Only a regular file is read (never a device a path may point at)."""

    def __init__(self, path: Path, check: Callable[[bytes | str], Event] = checked):
        self.path = path
        self.check = check
        self.offset = self._size()
        self.partial = b""

    def _size(self) -> int:
        try:
            st = os.stat(self.path)
        except OSError:
            return 0
        return st.st_size if stat.S_ISREG(st.st_mode) else 0

    def read(self) -> list[Event]:
        size = self._size()
        if size < self.offset:  # the file was replaced: read the new one from its start
            self.offset, self.partial = 0, b""
        if size == self.offset:
            return []
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read(size - self.offset)
        except OSError:
            return []
        self.offset += len(data)
        *lines, self.partial = (self.partial + data).split(b"\n")
        return [self.check(line) for line in lines if line.strip()]


@dataclass
class RunResult:
    """How the child ended. ``stop_reason`` is what we asked for (None if we never asked)."""

    returncode: int
    stop_reason: str | None
    last_events: dict[str, Event] = field(default_factory=dict)  # type -> newest event of that type
    stderr_tail: str = ""


class Supervisor:
    """Start the child, feed each event it appends to ``events_path`` to ``on_event``, call
    ``on_tick`` after each read (every ``poll_s``), and stop the child when ``should_stop()``
    returns a reason (e.g. "cancelled", "shutdown")."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        events_path: Path,
        check: Callable[[bytes | str], Event] = checked,
        on_event: Callable[[Event], None],
        should_stop: Callable[[], str | None],
        on_tick: Callable[[], None] | None = None,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        stderr_path: Path | None = None,
        term_grace_s: float = 10.0,
        poll_s: float = 0.25,
    ):
        self.argv = list(argv)
        self.events_path = events_path
        self.check = (
            check  # a line -> its event (a teacher-cache build's lines differ: worker/cache_builds.py)
        )
        self.on_event = on_event
        self.should_stop = should_stop
        self.on_tick = on_tick or (lambda: None)
        self.env = env
        self.cwd = cwd
        self.stderr_path = stderr_path
        self.term_grace_s = term_grace_s
        self.poll_s = poll_s
        self.proc: subprocess.Popen[bytes] | None = None

    def run(self) -> RunResult:
        tail = EventTail(self.events_path, self.check)  # before the child starts: its events come after
        stderr_file = open(self.stderr_path, "ab") if self.stderr_path else subprocess.DEVNULL  # noqa: SIM115
        try:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,  # drained, so a closed pipe tells the runner we died
                stderr=stderr_file,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        finally:
            if not isinstance(stderr_file, int):  # DEVNULL is an int
                stderr_file.close()
        stdout_errors: list[Event] = []
        drain = threading.Thread(target=_drain, args=(self.proc, stdout_errors), daemon=True)
        drain.start()
        result = self._loop(self.proc, tail)
        drain.join(timeout=5)
        if result.returncode == EXIT_FAILED and "error" not in result.last_events and stdout_errors:
            self._deliver(stdout_errors[-1], result.last_events)  # the disk-full case
        result.stderr_tail = _tail(self.stderr_path)
        return result

    def _deliver(self, event: Event, last: dict[str, Event]) -> None:
        last[event["type"]] = event
        self.on_event(event)

    def _loop(self, proc: subprocess.Popen[bytes], tail: EventTail) -> RunResult:
        last: dict[str, Event] = {}
        stop_reason: str | None = None
        term_sent_at: float | None = None
        while True:
            for event in tail.read():
                self._deliver(event, last)
            self.on_tick()
            if proc.poll() is not None:
                break
            if stop_reason is None:
                stop_reason = self.should_stop()
                if stop_reason is not None:
                    term_sent_at = time.monotonic()
                    proc.send_signal(signal.SIGTERM)
            elif term_sent_at is not None and time.monotonic() - term_sent_at > self.term_grace_s:
                _signal_group(proc, signal.SIGKILL)
                term_sent_at = None
            time.sleep(self.poll_s)
        for event in tail.read():  # what it wrote just before it exited
            self._deliver(event, last)
        # The group may still hold grandchildren (torchrun ranks) if the leader exited first.
        _signal_group(proc, signal.SIGKILL)
        return RunResult(returncode=proc.returncode, stop_reason=stop_reason, last_events=last)

    def terminate(self) -> None:
        """Stop the child at once (used when the supervising task itself is being torn down)."""
        if self.proc is not None and self.proc.poll() is None:
            _signal_group(self.proc, signal.SIGKILL)


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM when the worker dies (Linux), so a killed worker
    leaves no orphan run behind - the runner checkpoints and exits, well before the job's lease
    expires and another worker resumes it."""
    if sys.platform != "linux":
        return
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


def _drain(proc: subprocess.Popen[bytes], errors: list[Event]) -> None:
    """Read the runner's stdout to its end, keeping only its `error` events."""
    assert proc.stdout is not None
    for line in proc.stdout:
        event = parse_line(line)
        if event is not None and event["type"] == "error":
            errors.append(checked(line))


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _tail(path: Path | None, max_bytes: int = 4000) -> str:
    if path is None or not path.exists():
        return ""
    with open(path, "rb") as f:
        f.seek(max(0, f.seek(0, os.SEEK_END) - max_bytes))
        return f.read().decode("utf-8", errors="replace")
