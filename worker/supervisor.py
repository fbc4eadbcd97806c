"""Run ``akl_core.runner`` in a child process and relay its JSON-lines events.

The child gets its own process group (``start_new_session``) so that a Ctrl-C meant for the worker
does not reach it directly, and so that killing it also kills anything it spawned (torchrun's
ranks, data-loader processes). Stopping is always SIGTERM first - the runner then finishes the
current optimizer step, writes a checkpoint and exits 3 - and SIGKILL only after a grace period.
"""

from __future__ import annotations

import ctypes
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Event = dict[str, Any]

EXIT_COMPLETED, EXIT_FAILED, EXIT_STOPPED = 0, 1, 3
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def parse_event_line(line: str) -> Event:
    """One stdout line -> an event. Lines that are not JSON objects with a ``type`` become ``log``
    events (a stray print in a library must not break the job)."""
    text = line.strip()
    try:
        event = json.loads(text)
    except json.JSONDecodeError:
        event = None
    if isinstance(event, dict) and isinstance(event.get("type"), str):
        return event
    return {"type": "log", "level": "warning", "message": f"runner stdout: {text[:2000]}"}


def read_events(path: Path) -> list[Event]:
    """The events of a runner's events.jsonl (a torn last line, from a kill, is skipped)."""
    events = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(event, dict) and isinstance(event.get("type"), str):
                events.append(event)
    return events


@dataclass
class RunResult:
    """How the child ended. ``stop_reason`` is what we asked for (None if we never asked)."""

    returncode: int
    stop_reason: str | None
    killed: bool
    last_events: dict[str, Event] = field(default_factory=dict)  # type -> newest event of that type
    stderr_tail: str = ""


class Supervisor:
    """Start the child, feed each event to ``on_event``, call ``on_tick`` between events, and stop
    the child when ``should_stop()`` returns a reason (e.g. "cancelled", "shutdown")."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
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
        self.on_event = on_event
        self.should_stop = should_stop
        self.on_tick = on_tick or (lambda: None)
        self.env = env
        self.cwd = cwd
        self.stderr_path = stderr_path
        self.term_grace_s = term_grace_s
        self.poll_s = poll_s
        self.proc: subprocess.Popen[str] | None = None

    def run(self) -> RunResult:
        events: queue.Queue[Event | None] = queue.Queue()
        stderr_file = open(self.stderr_path, "ab") if self.stderr_path else subprocess.DEVNULL  # noqa: SIM115
        try:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=stderr_file,
                env=self.env,
                cwd=self.cwd,
                text=True,
                bufsize=1,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        finally:
            if stderr_file is not subprocess.DEVNULL:
                stderr_file.close()
        reader = threading.Thread(target=self._read, args=(self.proc, events), daemon=True)
        reader.start()
        result = self._loop(self.proc, events)
        reader.join(timeout=5)
        result.stderr_tail = _tail(self.stderr_path)
        return result

    @staticmethod
    def _read(proc: subprocess.Popen[str], events: queue.Queue[Event | None]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.strip():
                events.put(parse_event_line(line))
        events.put(None)  # end of stream

    def _loop(self, proc: subprocess.Popen[str], events: queue.Queue[Event | None]) -> RunResult:
        last: dict[str, Event] = {}
        stop_reason: str | None = None
        term_sent_at: float | None = None
        killed = False
        stream_open = True
        while stream_open or proc.poll() is None:
            try:
                event = events.get(timeout=self.poll_s) if stream_open else None
            except queue.Empty:
                event = None
            else:
                if event is None and stream_open:
                    stream_open = False
            if event is not None:
                last[event["type"]] = event
                self.on_event(event)
            self.on_tick()
            if stop_reason is None and proc.poll() is None:
                stop_reason = self.should_stop()
                if stop_reason is not None:
                    term_sent_at = time.monotonic()
                    proc.send_signal(signal.SIGTERM)
            if term_sent_at is not None and not killed and proc.poll() is None:
                if time.monotonic() - term_sent_at > self.term_grace_s:
                    _signal_group(proc, signal.SIGKILL)
                    killed = True
            if not stream_open and proc.poll() is None:
                time.sleep(self.poll_s)
        # The group may still hold grandchildren (torchrun ranks) if the leader exited first.
        _signal_group(proc, signal.SIGKILL)
        return RunResult(returncode=proc.returncode, stop_reason=stop_reason, killed=killed, last_events=last)

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


def _signal_group(proc: subprocess.Popen[str], sig: signal.Signals) -> None:
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
