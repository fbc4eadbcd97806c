"""Checkpoints: the student (save_pretrained, safetensors) + tokenizer + optimizer, scheduler, RNG and
data position, so a resumed run continues exactly.

Layout (docs/architecture.md): ``OUTPUT_DIR/checkpoints/step-00000010/`` holding the model files,
``trainer_state.pt`` and ``state.json``. A checkpoint is written into a hidden temporary directory
and renamed into place; ``state.json`` is its last file, so a directory with ``state.json`` is
complete. The newest ``keep`` complete checkpoints are kept.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

CHECKPOINTS = "checkpoints"
STATE_FILE = "state.json"
TRAINER_STATE = "trainer_state.pt"


@dataclass
class TrainState:
    """Where a run stands after ``step`` optimizer steps."""

    step: int = 0
    epoch: int = 0  # current epoch of the data order
    index: int = 0  # next position within that epoch's permutation
    trained_tokens: int = 0


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        # plain types + a tensor, so the state loads with torch.load(weights_only=True)
        np_state = np.random.get_state(legacy=True)
        assert isinstance(np_state, tuple), "the global RandomState is an MT19937 (legacy tuple)"
        name, keys, pos, has_gauss, cached = np_state
        state["numpy"] = (
            str(name),
            torch.from_numpy(keys.astype(np.int64)),
            int(pos),
            int(has_gauss),
            float(cached),
        )
    except ImportError:  # pragma: no cover
        pass
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2), encoding="utf-8")
    os.replace(tmp, path)


def save_checkpoint(
    output_dir: Path,
    state: TrainState,
    *,
    model: torch.nn.Module,
    tokenizer: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    keep: int,
) -> Path:
    """Write ``checkpoints/step-N`` atomically, rotate old ones; return the path relative to
    ``output_dir``. ``model`` is the bare (unwrapped) model."""
    root = Path(output_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    name = step_dir_name(state.step)
    final = root / name
    tmp = root / f".tmp-{name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    # torch types Module.__getattr__ as Tensor | Module; model is a transformers/PEFT model here
    model.save_pretrained(tmp, safe_serialization=True)  # type: ignore[operator]
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": rng_state(),
            "train_state": asdict(state),
        },
        tmp / TRAINER_STATE,
    )
    _write_json_atomic(tmp / STATE_FILE, asdict(state))  # last file written
    if final.exists():  # a re-run of the same step (e.g. stop right after a periodic checkpoint)
        shutil.rmtree(final)
    os.replace(tmp, final)
    rotate_checkpoints(output_dir, keep)
    return final.relative_to(output_dir)


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints (with state.json), oldest first."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if p.is_dir() and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-", 1)[1]))


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = complete_checkpoints(output_dir)
    return found[-1] if found else None


def rotate_checkpoints(output_dir: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints, and leftovers of torn writes."""
    for old in complete_checkpoints(output_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    root = Path(output_dir) / CHECKPOINTS
    for torn in root.glob(".tmp-step-*"):
        shutil.rmtree(torn, ignore_errors=True)


def load_trainer_state(checkpoint: Path) -> dict[str, Any]:
    """The optimizer/scheduler/RNG/data-position dict saved with a checkpoint."""
    # weights_only: a checkpoint directory is data, never code (no arbitrary unpickling)
    blob = torch.load(Path(checkpoint) / TRAINER_STATE, map_location="cpu", weights_only=True)
    blob["train_state"] = TrainState(**blob["train_state"])
    return blob
