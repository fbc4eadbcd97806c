"""``python -m akl_core.cache_runner SPEC.json OUT_DIR [--resume/--no-resume]``

Builds a teacher cache (``cache_builder.build_cache``) into OUT_DIR and prints every event as
one JSON line on stdout, as ``akl_core.runner`` does for jobs: the worker runs both the same way.
Events also go to OUT_DIR/events.jsonl; logs to stderr. Exit codes: 0 completed, 1 failed (an
`error` event was printed first), 3 stopped. SIGTERM, the parent's death and a closed stdout are
stop requests: the shard being computed is dropped, the finished ones stay, a `stopped` event is
printed; the next run (``--resume``, the default) starts at the first missing shard.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from pathlib import Path

from akl_core.events import DistillError, Event, classify_error, make_event
from akl_core.runner import EXIT_COMPLETED, EXIT_FAILED, EXIT_STOPPED, _lock, _printer, watch_parent

log = logging.getLogger("akl_core.cache_runner")


def load_cache_spec_file(path: Path):
    """CacheSpec from a JSON (or YAML) file; raises DistillError('invalid_spec') with the reason."""
    import pydantic

    from akl_core.cache_spec import load_cache_spec

    try:
        text = Path(path).read_text(encoding="utf-8")
        if Path(path).suffix in (".yaml", ".yml"):
            import yaml

            raw = yaml.safe_load(text)
        else:
            raw = json.loads(text)
        if not isinstance(raw, dict):
            raise ValueError("the cache spec must be a JSON/YAML object")
        return load_cache_spec(raw)
    except (OSError, ValueError, pydantic.ValidationError) as exc:
        raise DistillError("invalid_spec", f"invalid cache spec {path}: {exc}") from exc


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m akl_core.cache_runner", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("spec", type=Path, help="cache spec as JSON")
    parser.add_argument("output_dir", type=Path, help="the cache directory")
    parser.add_argument(
        "--resume",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="keep the finished shards of an interrupted build (default)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    events_out = sys.stdout
    sys.stdout = sys.stderr  # stray prints from libraries must not corrupt the JSON-lines stream
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    printer = _printer(events_out, on_closed=stop.set)
    errors: list[Event] = []

    def emit(event: Event) -> None:
        if event.get("type") == "error":
            errors.append(event)
        printer(event)

    try:
        spec = load_cache_spec_file(args.spec)
        lock = _lock(args.output_dir, emit)  # noqa: F841 - held (open) until this process exits
        if lock is None:
            return EXIT_FAILED
        watch_parent(stop.set)
        from transformers.utils import logging as hf_logging

        from akl_core.cache_builder import build_cache

        hf_logging.disable_progress_bar()
        result = build_cache(
            spec, args.output_dir, on_event=emit, should_stop=stop.is_set, resume=args.resume
        )
        return EXIT_STOPPED if result["status"] == "stopped" else EXIT_COMPLETED
    except Exception as exc:  # noqa: BLE001 - the contract: every failure is an error event
        if not errors:
            code, message = classify_error(exc)
            emit(make_event("error", code=code, message=message))
        if not isinstance(exc, DistillError):
            log.exception("cache build failed")
        return EXIT_FAILED


if __name__ == "__main__":
    import os

    code = main()
    logging.shutdown()
    sys.stderr.flush()
    os._exit(code)  # skip the interpreter's teardown (seconds with torch loaded)
