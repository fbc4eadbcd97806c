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
import logging
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from akl_core.events import Event
from akl_core.runner import (
    EXIT_COMPLETED,
    EXIT_FAILED,
    EXIT_STOPPED,
    _lock,
    read_spec_file,
    run_process,
    watch_parent,
)

log = logging.getLogger("akl_core.cache_runner")


def load_cache_spec_file(path: Path):
    """CacheSpec from a JSON (or YAML) file; raises DistillError('invalid_spec') with the reason."""
    from akl_core.cache_spec import load_cache_spec

    return read_spec_file(path, load_cache_spec, "cache spec")


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
    return run_process(
        lambda emit, record, events_out, stop: _build(args, emit, stop),
        print_events=True,
        events_file=None,  # build_cache's own sink writes OUT_DIR/events.jsonl
        logger=log,
        failure="cache build failed",
    )


def _build(args: argparse.Namespace, emit: Callable[[Event], None], stop: threading.Event) -> int:
    """Load the spec and build the cache; any exception means failure (``run_process`` prints it)."""
    spec = load_cache_spec_file(args.spec)
    lock = _lock(args.output_dir, emit)  # noqa: F841 - held (open) until this process exits
    if lock is None:
        return EXIT_FAILED
    watch_parent(stop.set)
    from transformers.utils import logging as hf_logging

    from akl_core.cache_builder import build_cache

    hf_logging.disable_progress_bar()
    result = build_cache(spec, args.output_dir, on_event=emit, should_stop=stop.is_set, resume=args.resume)
    return EXIT_STOPPED if result["status"] == "stopped" else EXIT_COMPLETED


if __name__ == "__main__":
    import os

    code = main()
    logging.shutdown()
    sys.stderr.flush()
    os._exit(code)  # skip the interpreter's teardown (seconds with torch loaded)
