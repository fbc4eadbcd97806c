"""`python -m akl_core.runner`: JSON lines on stdout, exit codes 0 / 1 / 3, SIGTERM -> checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from akl_core.spec import load_spec


def write_spec(path: Path, **training) -> Path:
    spec = load_spec(
        {
            "teacher": "preset:tiny",
            "student": {"init": "truncate", "num_layers": 1},
            "data": {"train": "demo:train", "max_train_examples": 16},
            "training": {
                "max_steps": 3,
                "batch_size": 2,
                "max_length": 64,
                "max_prompt_length": 32,
                **training,
            },
            "evaluation": {"num_examples": 0},
        }
    )
    path.write_text(spec.model_dump_json())
    return path


def runner(
    models_root: Path, *args: str, env_extra: dict[str, str] | None = None, **popen
) -> subprocess.Popen:
    env = {**os.environ, "AKL_MODELS_ROOT": str(models_root), "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "akl_core.runner", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        **popen,
    )


def test_completed_run_prints_json_lines(models_root, tmp_path):
    proc = runner(models_root, str(write_spec(tmp_path / "spec.json")), str(tmp_path / "out"))
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    events = [json.loads(line) for line in out.splitlines()]  # every stdout line is an event
    assert [e["type"] for e in events] == ["loading", "started", "log", "step", "step", "step", "completed"]
    assert events == [json.loads(line) for line in (tmp_path / "out/events.jsonl").read_text().splitlines()]
    assert (tmp_path / "out/final/model.safetensors").is_file()


def test_invalid_spec_exits_1_with_error_event(models_root, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(
        json.dumps(
            {"teacher": "preset:tiny", "data": {"train": "demo:train"}, "training": {"learning_rate": -1}}
        )
    )
    proc = runner(models_root, str(bad), str(tmp_path / "out"))
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1
    (event,) = [json.loads(line) for line in out.splitlines()]
    assert (
        event["type"] == "error" and event["code"] == "invalid_spec" and "learning_rate" in event["message"]
    )


def test_sigterm_checkpoints_and_exits_3(models_root, tmp_path):
    spec = write_spec(tmp_path / "spec.json", max_steps=10_000)
    proc = runner(models_root, str(spec), str(tmp_path / "out"))
    events = []
    assert proc.stdout is not None
    deadline = time.monotonic() + 120
    for line in proc.stdout:
        events.append(json.loads(line))
        if events[-1]["type"] == "step":
            proc.send_signal(signal.SIGTERM)
            break
        assert time.monotonic() < deadline
    rest, _ = proc.communicate(timeout=60)
    events += [json.loads(line) for line in rest.splitlines()]
    assert proc.returncode == 3
    stopped = events[-1]
    assert stopped["type"] == "stopped" and stopped["step"] >= 1
    assert stopped["checkpoint"] == f"checkpoints/step-{stopped['step']:08d}"
    assert (tmp_path / "out" / stopped["checkpoint"] / "state.json").is_file()
    assert [e["step"] for e in events if e["type"] == "step"] == list(range(1, stopped["step"] + 1))


def test_module_help():
    out = subprocess.run([sys.executable, "-m", "akl_core.runner", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--no-resume" in out.stdout


def test_cli_distill_runs_the_tiny_example(models_root, tmp_path, monkeypatch):
    """`akl distill examples/tiny.yaml` (the shipped example) completes and writes the layout."""
    import typer
    from typer.testing import CliRunner

    from akl_core import cli

    app = typer.Typer()
    cli.register(app)
    monkeypatch.setenv("AKL_MODELS_ROOT", str(models_root))
    example = Path(__file__).resolve().parents[2] / "examples" / "tiny.yaml"
    result = CliRunner().invoke(app, ["distill", str(example), "--output", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "out" / "result.json").read_text())["metrics"]
    assert metrics["num_examples"] == 4 and 0.0 <= metrics["distinct_2"] <= 1.0
    assert (tmp_path / "out/final/model.safetensors").is_file()
    assert [p.name for p in sorted((tmp_path / "out/checkpoints").iterdir())] == ["step-00000004"]


def test_demo_example_is_one_epoch_that_a_cache_can_serve():
    """scripts/demo.sh uploads data.max_train_examples / max_validation_examples of examples/demo.yaml,
    builds a cache on them and trains with teacher: cache:<id>; the spec must read exactly one epoch
    of those examples and score the untrained student (evaluation.at_start)."""
    import yaml

    from akl_core.cache_spec import CacheSpec

    raw = yaml.safe_load((Path(__file__).resolve().parents[2] / "examples" / "demo.yaml").read_text())
    spec = load_spec(raw)
    t, d = spec.training, spec.data
    assert d.max_train_examples == t.max_steps * t.batch_size * t.grad_accum
    assert d.max_validation_examples and spec.evaluation.at_start
    CacheSpec.model_validate(  # the cache the demo builds for it is a valid spec
        {
            "teacher": raw["teacher"],
            "data": {"train": "file-x", "validation": "file-y", "max_length": t.max_length,
                     "max_prompt_length": t.max_prompt_length},
            "top_k": 64,
            "evaluation": raw["evaluation"],
        }
    )  # fmt: skip
    load_spec({**raw, "teacher": "cache:cache-0123"})


def test_cuda_without_a_gpu_is_an_error_event_no_gpu(models_root, tmp_path):
    """Fails before the run's event sink exists; the error still reaches stdout and events.jsonl."""
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({**json.loads(write_spec(spec).read_text()), "resources": {"device": "cuda"}}))
    proc = runner(models_root, str(spec), str(tmp_path / "out"), env_extra={"CUDA_VISIBLE_DEVICES": ""})
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    (event,) = [json.loads(line) for line in out.splitlines()]
    assert event["type"] == "error" and event["code"] == "no_gpu"
    assert "resources.device" in event["message"] and "cpu" in event["message"]
    assert [json.loads(line) for line in (tmp_path / "out/events.jsonl").read_text().splitlines()] == [event]


def test_a_failure_without_an_error_event_gets_one(tmp_path, monkeypatch):
    """The runner's own guarantee: whatever raises before (or without) an event, one error event."""
    import io

    from akl_core import runner as runner_module
    from akl_core import trainer
    from akl_core.events import DistillError

    def fails_silently(*args, **kwargs):
        raise DistillError("no_gpu", "no CUDA here")

    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(trainer, "distill", fails_silently)
    assert runner_module.main([str(write_spec(tmp_path / "spec.json")), str(tmp_path / "out")]) == 1
    assert [json.loads(line) for line in out.getvalue().splitlines()] == [
        {"type": "error", "code": "no_gpu", "message": "no CUDA here"}
    ]


# A stand-in for the worker: starts the runner with a stdout pipe, prints its pid and a line per step.
PARENT = """
import subprocess, sys
proc = subprocess.Popen(sys.argv[1:], stdout=subprocess.PIPE, text=True)
print(proc.pid, flush=True)
for line in proc.stdout:
    if '"type":"step"' in line:
        print("step", flush=True)
"""


def _gone(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_a_runner_whose_worker_dies_checkpoints_the_step_it_reached_and_exits(models_root, tmp_path):
    spec = write_spec(tmp_path / "spec.json", max_steps=10_000)
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "akl_core.runner", str(spec), str(out)]
    env = {**os.environ, "AKL_MODELS_ROOT": str(models_root), "PYTHONUNBUFFERED": "1"}
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, *argv], stdout=subprocess.PIPE, text=True, env=env
    )
    assert parent.stdout is not None
    pid = int(parent.stdout.readline())
    assert parent.stdout.readline().strip() == "step"
    parent.kill()  # SIGKILL: the worker cannot tell its runner anything
    parent.wait()
    deadline = time.monotonic() + 90
    while not _gone(pid):
        assert time.monotonic() < deadline, "the orphaned runner did not exit"
        time.sleep(0.2)
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    stopped = events[-1]
    steps = [e["step"] for e in events if e["type"] == "step"]
    assert stopped["type"] == "stopped" and stopped["step"] == steps[-1] >= 1, events[-3:]
    assert (out / stopped["checkpoint"] / "state.json").is_file()
    assert steps == list(range(1, stopped["step"] + 1))


def test_the_output_lock_waits_for_an_earlier_run(tmp_path):
    from akl_core.runner import lock_output_dir

    held = lock_output_dir(tmp_path / "out")
    assert held is not None
    assert lock_output_dir(tmp_path / "out", timeout_s=0.3) is None  # an orphan still running
    held.close()  # it exited
    assert lock_output_dir(tmp_path / "out", timeout_s=0.3) is not None
