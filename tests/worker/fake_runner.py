"""A stand-in for ``akl_core.runner`` with the same contract (docs/architecture.md#job-run) and no
torch: ``python -m tests.worker.fake_runner SPEC.json OUTPUT_DIR``.

Behaviour comes from the spec's ``_fake`` section: ``steps``, ``step_s`` (seconds per step),
``checkpoint_every``, ``fail`` (an error code: print an error event and exit 1), ``crash_at``
(exit 7 without an event at that step), ``stdout_only`` (the error event reaches stdout only, as
with a full disk), ``ignore_term`` (ignore SIGTERM: the supervisor must
SIGKILL), ``noise`` (print a non-JSON line first). It resumes from its newest checkpoint.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

OUT: Path | None = None


def emit(event: dict, stdout_only: bool = False) -> None:
    """Like the real runner: every event to events.jsonl in OUTPUT_DIR, and to stdout."""
    line = json.dumps(event) + "\n"
    if OUT is not None and not stdout_only:
        with open(OUT / "events.jsonl", "a") as f:
            f.write(line)
    sys.stdout.write(line)
    sys.stdout.flush()


def newest_checkpoint(out: Path) -> int:
    steps = [
        int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*") if (p / "state.json").exists()
    ]
    return max(steps, default=0)


def save_checkpoint(out: Path, step: int) -> str:
    rel = f"checkpoints/step-{step:08d}"
    (out / rel).mkdir(parents=True, exist_ok=True)
    (out / rel / "state.json").write_text(json.dumps({"step": step}))
    return rel


def main() -> int:
    global OUT
    spec_path, out = Path(sys.argv[1]), Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    OUT = out
    fake = json.loads(spec_path.read_text()).get("_fake", {})
    total, step_s = int(fake.get("steps", 10)), float(fake.get("step_s", 0.01))
    every = int(fake.get("checkpoint_every", 0))
    stop = {"requested": False}
    if fake.get("ignore_term"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, lambda *_: stop.update(requested=True))
    if fake.get("noise"):
        print("some library chatter that is not JSON", flush=True)
    start = newest_checkpoint(out)
    (out / "starts.log").open("a").write(f"{start}\n")
    emit(
        {
            "type": "started",
            "total_steps": total,
            "resumed_from_step": start,
            "num_train_examples": 8,
            "device": "cpu",
        }
    )
    if fake.get("fail"):
        emit(
            {"type": "error", "code": fake["fail"], "message": "fake failure"}, fake.get("stdout_only", False)
        )
        return 1
    tokens = start * 10
    for step in range(start + 1, total + 1):
        time.sleep(step_s)
        if fake.get("crash_at") == step:
            return 7
        tokens += 10
        emit({
            "type": "step", "step": step, "total_steps": total, "epoch": step / total, "loss": 1.0 / step,
            "ce": 0.5, "kd": 0.5, "lr": 1e-3, "grad_norm": 1.0, "tokens": 10, "trained_tokens": tokens,
            "tokens_per_s": 100.0, "g_head": 0.1 * step, "g_tail": 0.2, "w_head": 0.3, "fkl": 0.4,
            "rkl": 0.5, "head_size": 3.0,
        })  # fmt: skip
        if every and step % every == 0:
            emit({"type": "checkpoint", "step": step, "path": save_checkpoint(out, step)})
        if stop["requested"]:
            emit({"type": "stopped", "step": step, "checkpoint": save_checkpoint(out, step)})
            return 3
    emit(
        {
            "type": "eval",
            "step": total,
            "rouge_l": 0.25,
            "rouge_l_std": 0.01,
            "distinct_1": 0.5,
            "distinct_2": 0.6,
            "val_ce": 1.0,
            "val_kl": float("nan"),
            "teacher_rouge_l": None,
            "num_examples": 4,
        }
    )
    (out / "final").mkdir(parents=True, exist_ok=True)
    emit({"type": "completed", "step": total, "final_path": "final", "metrics": {"rouge_l": 0.25}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
