"""Two CPU processes (torchrun, gloo) give the same run as one process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from akl_core import trainer
from akl_core.events import read_events
from akl_core.spec import load_spec


def run_runner(spec, out, models_root) -> list[dict]:
    """Run ``spec`` through ``python -m akl_core.runner`` (which launches DDP itself); its events."""
    spec_path = out.parent / f"{out.name}-spec.json"
    spec_path.write_text(spec.model_dump_json())
    env = {**os.environ, "AKL_MODELS_ROOT": str(models_root), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "akl_core.runner", str(spec_path), str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=280,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines()]


def spec_for(batch_size: int, processes: int):
    return load_spec(
        {
            "teacher": "preset:tiny",
            "student": {"init": "truncate", "num_layers": 1},
            # 14 examples, global batch 4: the 4th step is short (2 examples), so under DDP one rank
            # gets a fully masked placeholder example there
            "data": {"train": "demo:train", "max_train_examples": 14},
            "loss": {"name": "akl"},
            "training": {
                "max_steps": 4,
                "batch_size": batch_size,
                "grad_accum": 1,
                "learning_rate": 3e-3,
                "max_length": 64,
                "max_prompt_length": 32,
            },
            "evaluation": {"num_examples": 0},
            "resources": {"processes": processes},
        }
    )


@pytest.mark.timeout(300)
def test_two_processes_match_one(models_root, tmp_path):
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    one = tmp_path / "one"
    trainer.distill(spec_for(4, 1), one, models_root=models_root)

    events = run_runner(spec_for(2, 2), tmp_path / "two", models_root)
    assert events[0]["type"] == "loading" and events[1]["type"] == "started"
    assert events[1]["device"] == "cpu x2"
    assert events[-1]["type"] == "completed"
    # rank 0 alone writes: one copy of each event on stdout and in the file
    assert events == read_events(tmp_path / "two" / "events.jsonl")

    ref = [e for e in read_events(one / "events.jsonl") if e["type"] == "step"]
    got = [e for e in events if e["type"] == "step"]
    assert len(got) == len(ref) == 4
    for key in ("loss", "ce", "kd", "grad_norm", "w_head", "g_head", "fkl"):
        assert [e[key] for e in got] == pytest.approx([e[key] for e in ref], rel=1e-4, abs=1e-6), key
    assert [e["tokens"] for e in got] == [e["tokens"] for e in ref]

    from safetensors.torch import load_file

    w1, w2 = load_file(one / "final/model.safetensors"), load_file(tmp_path / "two/final/model.safetensors")
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5)
