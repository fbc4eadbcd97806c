"""``python -m akl_core.runner SPEC.json OUTPUT_DIR [--resume/--no-resume]``

Runs ``trainer.distill`` in this process and prints every event as one JSON line on stdout (the
worker's contract, docs/architecture.md); logs and library chatter go to stderr. Exit codes: 0
completed, 1 failed (an `error` event was printed first), 3 stopped.

SIGTERM asks for a graceful stop: the current optimizer step finishes, a checkpoint is written, a
`stopped` event is printed and the process exits with 3. With ``resources.processes > 1`` the
runner re-launches itself under ``torch.distributed.run``; rank 0's events pass through and a stop
request reaches every rank through a stop file in OUTPUT_DIR.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from akl_core.events import DistillError, Event, classify_error, dumps, make_event

EXIT_COMPLETED, EXIT_FAILED, EXIT_STOPPED = 0, 1, 3
STOP_FILE_ENV = "AKL_STOP_FILE"
CHILD_ENV = "AKL_RUNNER_CHILD"
STOP_FILE = ".stop-requested"

log = logging.getLogger("akl_core.runner")


def _printer(out: TextIO):
    lock = threading.Lock()

    def emit(event: Event) -> None:
        with lock:
            out.write(dumps(event) + "\n")
            out.flush()

    return emit


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
    import pydantic

    from akl_core.spec import load_spec

    try:
        text = Path(path).read_text(encoding="utf-8")
        if Path(path).suffix in (".yaml", ".yml"):
            import yaml

            raw = yaml.safe_load(text)
        else:
            raw = json.loads(text)
        if not isinstance(raw, dict):
            raise ValueError("the spec must be a JSON/YAML object")
        return load_spec(raw)
    except (OSError, ValueError, pydantic.ValidationError) as exc:  # JSONDecodeError is a ValueError
        raise DistillError("invalid_spec", f"invalid spec {path}: {exc}") from exc


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    events_out = sys.stdout
    sys.stdout = sys.stderr  # stray prints from libraries must not corrupt the JSON-lines stream
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s")
    is_child = os.environ.get(CHILD_ENV) == "1"
    rank = int(os.environ.get("RANK", "0"))
    printer = _printer(events_out) if rank == 0 else (lambda event: None)
    errors: list[Event] = []

    def emit(event: Event) -> None:
        if event.get("type") == "error":
            errors.append(event)
        printer(event)

    try:
        return _run(args, emit, events_out, is_child)
    except Exception as exc:  # noqa: BLE001 - the contract: every failure is an error event
        # A DistillError normally arrives with its event already printed; one raised before the
        # run's event sink existed (a worker without CUDA, say) has not been (RELIABILITY.md).
        if not errors:
            code, message = classify_error(exc)
            emit(make_event("error", code=code, message=message))
        if not isinstance(exc, DistillError):
            log.exception("run failed")
        return EXIT_FAILED


def _run(args: argparse.Namespace, emit: Callable[[Event], None], events_out: TextIO, is_child: bool) -> int:
    """Load the spec and run it; any exception means failure (``main`` prints its error event)."""
    spec = load_spec_file(args.spec)
    if spec.resources.processes > 1 and "WORLD_SIZE" not in os.environ:
        return _launch_distributed(args, spec.resources.processes, events_out)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
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


def _launch_distributed(args: argparse.Namespace, processes: int, events_out: TextIO) -> int:
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
        events_out.write(line if line.endswith("\n") else line + "\n")
        events_out.flush()
    rc = proc.wait()
    stop_file.unlink(missing_ok=True)
    kind = last.get("type")
    if kind == "completed":
        return EXIT_COMPLETED
    if kind == "stopped":
        return EXIT_STOPPED
    if kind != "error":
        message = f"torch.distributed.run exited with code {rc} before the run finished"
        events_out.write(dumps(make_event("error", code="internal_error", message=message)) + "\n")
        events_out.flush()
    return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
