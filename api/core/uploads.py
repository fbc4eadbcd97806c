"""Validate staged uploads in a separate process, so the API's threads keep the GIL for requests.

Checking a 100 MiB JSONL file is ~1e5 ``json.loads`` calls; in a thread of the API process they
compete for the interpreter lock with every other request, and three at once pushed the p99 of
unrelated routes far past 200 ms (RELIABILITY.md, "Uploads in bounded memory"). A small pool of
spawned processes does the parsing; each reads the staged file line by line (memory: one line).
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from concurrent.futures import Executor, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from akl_core.data import validate_jsonl_stream

_lock = threading.Lock()
_pool: Executor | None = None


def validate_staged(path: Path, *, max_line_bytes: int, name: str = "file") -> tuple[int, int]:
    """(examples, bytes) of the JSONL file at ``path``; raises akl_core.data.DataError."""
    try:
        return _executor().submit(_validate, str(path), max_line_bytes, name).result()
    except BrokenProcessPool:  # a pool process was killed (OOM killer): start a new pool, check here
        _reset()
        return _validate(str(path), max_line_bytes, name)


def _validate(path: str, max_line_bytes: int, name: str) -> tuple[int, int]:
    with open(path, "rb") as source:
        return validate_jsonl_stream(source, max_line_bytes=max_line_bytes, name=name)


def _executor() -> Executor:
    global _pool
    with _lock:
        if _pool is None:
            workers = max(1, min(2, os.cpu_count() or 1))
            context = multiprocessing.get_context("spawn")  # no fork of a threaded server
            _pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_die_with_parent)
        return _pool


def _reset() -> None:
    global _pool
    with _lock:
        if _pool is not None:
            _pool.shutdown(wait=False, cancel_futures=True)
        _pool = None


def _die_with_parent() -> None:
    """A pool process ends with the API, however the API ends. Not PR_SET_PDEATHSIG: that fires
    when the *thread* that started the process exits, and the request threads come and go."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="akl-upload-parent-watch", daemon=True).start()
