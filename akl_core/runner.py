"""``python -m akl_core.runner SPEC.json OUTPUT_DIR [--resume/--no-resume]``

Runs ``trainer.distill`` in this process. Every event (akl_core/contract.py) is appended to
OUTPUT_DIR/events.jsonl, the channel the worker reads, and printed as one JSON line on stdout for
a human or a script; logs and library chatter go to stderr. Exit codes (``contract.EXIT_*``): 0
completed, 1 failed (an `error` event was written first), 3 stopped.

SIGTERM asks for a graceful stop: the current optimizer step finishes, a checkpoint is written, a
`stopped` event is printed and the process exits with 3. The death of the parent (the worker) is a
stop request too: PR_SET_PDEATHSIG turns it into SIGTERM on Linux, and a watchdog notices a new
parent pid or a closed stdout pipe elsewhere; events then go on to events.jsonl only, so the next
run resumes from the step this one reached (RELIABILITY.md, "Process supervision"). A lock file in
OUTPUT_DIR makes a resumed run wait until such an orphan has written its checkpoint and exited. With ``resources.processes > 1`` the
runner re-launches itself under ``torch.distributed.run``; rank 0's events pass through and a stop
request reaches every rank through a stop file in OUTPUT_DIR.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import fcntl
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from akl_core.contract import EXIT_COMPLETED, EXIT_FAILED, EXIT_STOPPED, Event, dumps, open_for_append
from akl_core.events import DistillError, classify_error, make_event

EVENTS_FILE = "events.jsonl"
STOP_FILE_ENV = "AKL_STOP_FILE"
CHILD_ENV = "AKL_RUNNER_CHILD"
STOP_FILE = ".stop-requested"
LOCK_FILE = ".runner.lock"
PR_SET_PDEATHSIG = 1  # linux/prctl.h
PARENT_POLL_S = 1.0
LOCK_WAIT_S = 600.0  # an orphan finishing its step and checkpoint; longer means it is stuck

log = logging.getLogger("akl_core.runner")


def _printer(out: TextIO, on_closed: Callable[[], None] = lambda: None):
    """``emit(event)``: one JSON line on ``out``. When the reader is gone (the worker died) the
    first failed write calls ``on_closed`` and later events are dropped here - the sink has
    already written them to events.jsonl, where the next run's recorder finds them."""
    lock = threading.Lock()
    closed = False

    def emit(event: Event) -> None:
        nonlocal closed
        with lock:
            if closed:
                return
            try:
                out.write(dumps(event) + "\n")
                out.flush()
            except (BrokenPipeError, ValueError, OSError) as exc:
                if isinstance(exc, OSError) and exc.errno not in (errno.EPIPE, errno.EBADF, None):
                    raise
                closed = True
                _silence(out)
                log.warning("the worker stopped reading events (%s); stopping at the next step", exc)
                on_closed()

    return emit


def _silence(out: TextIO) -> None:
    """Point ``out`` at /dev/null so that the interpreter's final flush does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, out.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def watch_parent(on_orphaned: Callable[[], None], poll_s: float = PARENT_POLL_S) -> threading.Thread:
    """Ask the kernel for SIGTERM when the parent dies (Linux), and poll ``getppid()`` as the
    fallback for other systems and for a parent that died before the request was made."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        except (OSError, AttributeError):
            pass
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        log.warning("the worker (pid %d) died; stopping at the next step", parent)
        on_orphaned()

    thread = threading.Thread(target=watch, name="akl-parent-watch", daemon=True)
    thread.start()
    return thread


def lock_output_dir(output_dir: Path, timeout_s: float = LOCK_WAIT_S):
    """An exclusive lock on OUTPUT_DIR for this run's lifetime (released by the kernel when the
    process ends, however it ends). Waits for an orphaned run of the same job to checkpoint and
    exit first; returns the open lock file, or None when it stays held past ``timeout_s``."""
    output_dir.mkdir(parents=True, exist_ok=True)
    handle = open(output_dir / LOCK_FILE, "a")  # noqa: SIM115 - held until the process exits
    deadline = time.monotonic() + timeout_s
    waited = False
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return handle
        except BlockingIOError:
            if time.monotonic() > deadline:
                handle.close()
                return None
            if not waited:
                log.warning("waiting for an earlier run of this job to checkpoint and exit")
                waited = True
            time.sleep(0.5)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m akl_core.runner", description=__doc__.split("\n\n")[0])
    parser.add_argument("spec", type=Path, help="job spec as JSON")
    parser.add_argument("output_dir", type=Path)
    parser.add_argument(
        "--resume",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="continue from the newest complete checkpoint in OUTPUT_DIR (default)",
    )
    return parser.parse_args(argv)


def load_spec_file(path: Path):
    """JobSpec from a JSON (or YAML) file; raises DistillError('invalid_spec') with the reason."""
    from akl_core.spec import load_spec

    return read_spec_file(path, load_spec, "spec")


def read_spec_file(path: Path, load: Callable[[dict[str, Any]], Any], noun: str):
    """``load(mapping)`` of a JSON (or YAML) file; raises DistillError('invalid_spec') with the
    reason (shared with ``cache_runner.load_cache_spec_file``)."""
    import pydantic

    try:
        text = Path(path).read_text(encoding="utf-8")
        if Path(path).suffix in (".yaml", ".yml"):
            import yaml

            raw = yaml.safe_load(text)
        else:
            raw = json.loads(text)
        if not isinstance(raw, dict):
            raise ValueError(f"the {noun} must be a JSON/YAML object")
        return load(raw)
    except (OSError, ValueError, pydantic.ValidationError) as exc:  # JSONDecodeError is a ValueError
        raise DistillError("invalid_spec", f"invalid {noun} {path}: {exc}") from exc


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    is_child = os.environ.get(CHILD_ENV) == "1"
    rank = int(os.environ.get("RANK", "0"))
    return run_process(
        lambda emit, record, events_out, stop: _run(args, emit, record, events_out, is_child, stop),
        print_events=rank == 0,
        events_file=args.output_dir / EVENTS_FILE if rank == 0 else None,
        logger=log,
        failure="run failed",
    )


def run_process(
    body: Callable[[Callable[[Event], None], Callable[[Event], None], TextIO, threading.Event], int],
    *,
    print_events: bool,
    events_file: Path | None,
    logger: logging.Logger,
    failure: str,
) -> int:
    """The process wrapper of this runner and ``cache_runner``: events as JSON lines on the real
    stdout (library prints and logs go to stderr), SIGTERM and a closed stdout set the stop flag,
    and any exception is a failure whose `error` event is written unless one already was.
    ``body(emit, record, events_out, stop)`` returns the exit code; ``record`` also appends the
    event to ``events_file`` (events the body's own sink is not there to write to disk)."""
    events_out = sys.stdout
    sys.stdout = sys.stderr  # stray prints from libraries must not corrupt the JSON-lines stream
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    # A closed stdout means the worker died: stop as on SIGTERM (checkpoint, then exit).
    printer = _printer(events_out, on_closed=stop.set) if print_events else (lambda event: None)
    errors: list[Event] = []

    def emit(event: Event) -> None:
        if event.get("type") == "error":
            errors.append(event)
        printer(event)

    def record(event: Event) -> None:
        emit(event)
        if events_file is not None:
            append_event(events_file, event)

    try:
        return body(emit, record, events_out, stop)
    except Exception as exc:  # noqa: BLE001 - the contract: every failure is an error event
        # A DistillError normally arrives with its event already printed; one raised before the
        # run's event sink existed (a worker without CUDA, say) has not been (RELIABILITY.md).
        if not errors:
            code, message = classify_error(exc)
            record(make_event("error", code=code, message=message))
        if not isinstance(exc, DistillError):
            logger.exception(failure)
        return EXIT_FAILED


def append_event(path: Path, event: Event) -> None:
    """Append one event to events.jsonl, the worker's channel. A full disk leaves it on stdout only,
    the one case the worker reads stdout for (worker/supervisor.py)."""
    with contextlib.suppress(OSError), open_for_append(path) as f:
        f.write(dumps(event) + "\n")


def _run(
    args: argparse.Namespace,
    emit: Callable[[Event], None],
    record: Callable[[Event], None],
    events_out: TextIO,
    is_child: bool,
    stop: threading.Event,
) -> int:
    """Load the spec and run it; any exception means failure (``main`` prints its error event)."""
    spec = load_spec_file(args.spec)
    lock = None
    if not is_child:
        lock = _lock(args.output_dir, record)  # held (open) until this process exits
        if lock is None:
            return EXIT_FAILED
        watch_parent(stop.set)
    if spec.resources.processes > 1 and "WORLD_SIZE" not in os.environ:
        return _launch_distributed(args, spec.resources.processes, events_out, stop)

    stop_file = os.environ.get(STOP_FILE_ENV)

    def should_stop() -> bool:
        return stop.is_set() or (stop_file is not None and os.path.exists(stop_file))

    from transformers.utils import logging as hf_logging

    from akl_core.trainer import distill

    hf_logging.disable_progress_bar()  # per-shard tqdm bars would flood the worker's log
    result = distill(spec, args.output_dir, on_event=emit, should_stop=should_stop, resume=args.resume)
    if result["status"] == "stopped":
        return EXIT_COMPLETED if is_child else EXIT_STOPPED  # under torchrun the parent decides
    return EXIT_COMPLETED


def _lock(output_dir: Path, emit: Callable[[Event], None]):
    """The output directory's lock, or None after an `error` event when it stays held."""
    handle = lock_output_dir(output_dir)
    if handle is None:
        message = f"another run of this job still holds {LOCK_FILE} after {LOCK_WAIT_S:.0f} s"
        emit(make_event("error", code="internal_error", message=message))
    return handle


def _launch_distributed(
    args: argparse.Namespace, processes: int, events_out: TextIO, stop: threading.Event
) -> int:
    """Re-run this module under torch.distributed.run; pass rank 0's events through."""
    args.output_dir.mkdir(parents=True, exist_ok=True)
    stop_file = args.output_dir / STOP_FILE
    stop_file.unlink(missing_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={processes}",
        "-m",
        "akl_core.runner",
        str(args.spec),
        str(args.output_dir),
        "--resume" if args.resume else "--no-resume",
    ]
    env = {**os.environ, CHILD_ENV: "1", STOP_FILE_ENV: str(stop_file)}
    signal.signal(signal.SIGTERM, lambda signum, frame: stop_file.touch())
    if stop.is_set():  # orphaned before the ranks started
        stop_file.touch()
    threading.Thread(target=lambda: stop.wait() and stop_file.touch(), daemon=True).start()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    last: dict[str, Any] = {}
    assert proc.stdout is not None
    for line in proc.stdout:
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            sys.stderr.write(line)  # not an event: a worker's stray output
            continue
        last = event if isinstance(event, dict) else last
        if not stop.is_set():  # after the worker died, rank 0's events.jsonl is the record
            try:
                events_out.write(line if line.endswith("\n") else line + "\n")
                events_out.flush()
            except (BrokenPipeError, OSError, ValueError):
                _silence(events_out)
                stop.set()
    rc = proc.wait()
    stop_file.unlink(missing_ok=True)
    kind = last.get("type")
    if kind == "completed":
        return EXIT_COMPLETED
    if kind == "stopped":
        return EXIT_STOPPED
    if kind != "error":
        message = f"torch.distributed.run exited with code {rc} before the run finished"
        error = make_event("error", code="internal_error", message=message)
        append_event(args.output_dir / EVENTS_FILE, error)
        with contextlib.suppress(OSError, ValueError):
            events_out.write(dumps(error) + "\n")
            events_out.flush()
    return EXIT_FAILED


if __name__ == "__main__":
    code = main()
    # Skip the interpreter's teardown (seconds with torch loaded): the events are flushed and the
    # files written, and the worker marks the job succeeded as soon as this process is gone.
    logging.shutdown()
    sys.stderr.flush()
    os._exit(code)
