"""api/core/uploads.py: the validation pool outlives the request threads that used it."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from akl_core.data import DataError
from api.core import uploads


def _in_thread(fn):
    out: list = []
    thread = threading.Thread(target=lambda: out.append(fn()))
    thread.start()
    thread.join()  # the thread that started the pool is gone afterwards
    return out[0]


def test_the_pool_survives_its_first_thread_and_reports_line_errors(tmp_path: Path) -> None:
    good = tmp_path / "good.jsonl"
    good.write_bytes(b'{"prompt": "p", "response": "r"}\n' * 3)
    assert _in_thread(lambda: uploads.validate_staged(good, max_line_bytes=1000)) == (3, good.stat().st_size)
    pool = uploads._pool
    assert pool is not None
    assert uploads.validate_staged(good, max_line_bytes=1000) == (3, good.stat().st_size)
    assert uploads._pool is pool  # not broken and replaced
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"prompt": "p", "response": "r"}\n{"prompt": 1}\n')
    with pytest.raises(DataError, match="file, line 2: field 'prompt' must be a string"):
        uploads.validate_staged(bad, max_line_bytes=1000)
