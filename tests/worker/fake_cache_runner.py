"""A stand-in for ``akl_core.cache_runner`` with its contract and no torch:
``python -m tests.worker.fake_cache_runner SPEC.json CACHE_DIR``.

It writes one shard file per ``_fake.shards`` (``shard_s`` seconds each), skips the shards already
on disk (a resumed build does not redo them; ``done.log`` records each one written), emits
``shard`` events (the real builder's names, akl_core/cache_builder.py), writes ``manifest.json`` last and prints ``completed``. SIGTERM: ``stopped``
after the current shard, exit 3. ``fail``: an error event, exit 1.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

TOKENS_PER_SHARD, BYTES_PER_SHARD = 100, 6_400


def emit(out: Path, event: dict) -> None:
    line = json.dumps(event) + "\n"
    with open(out / "events.jsonl", "a") as f:
        f.write(line)
    sys.stdout.write(line)
    sys.stdout.flush()


def main() -> int:
    spec_path, out = Path(sys.argv[1]), Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    spec = json.loads(spec_path.read_text())
    fake = spec.get("_fake", {})
    total, shard_s = int(fake.get("shards", 4)), float(fake.get("shard_s", 0.01))
    stop = {"requested": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(requested=True))
    done = sorted(p.name for p in out.glob("shard-*.bin"))
    emit(out, {"type": "started", "total_shards": total, "resumed_shards": len(done), "device": "cpu"})
    if fake.get("fail"):
        emit(out, {"type": "error", "code": fake["fail"], "message": f"fake failure reading {spec_path}"})
        return 1
    for index in range(total):
        name = f"shard-{index:05d}.bin"
        if (out / name).exists():
            continue
        time.sleep(shard_s)
        (out / name).write_bytes(b"\0" * BYTES_PER_SHARD)
        with open(out / "done.log", "a") as f:
            f.write(name + "\n")
        done_shards = len(list(out.glob("shard-*.bin")))
        event = {"type": "shard", "index": index, "done_shards": done_shards, "total_shards": total}
        emit(out, {**event, "progress": done_shards / total})
        if stop["requested"] and index + 1 < total:
            emit(out, {"type": "stopped", "done_shards": done_shards, "total_shards": total})
            return 3
    tokens, size = total * TOKENS_PER_SHARD, total * BYTES_PER_SHARD
    manifest = {
        "format": "akl-teacher-cache/1",
        "teacher": spec["teacher"],
        "top_k": spec["top_k"],
        "tokens": tokens,
        "examples": total * 10,
        "bytes": size,
        "bytes_per_token": size / tokens,
        "splits": {"train": {"data": spec["data"]["train"]}},
        "teacher_eval": {"rouge_l": 0.3, "num_examples": 4},
    }
    (out / "manifest.json").write_text(json.dumps(manifest))
    emit(out, {"type": "completed", "tokens": tokens, "bytes": size})
    return 0


if __name__ == "__main__":
    sys.exit(main())
