"""Jobs that cannot succeed end ``failed`` once, with a stable error code and a message a user
can act on: a broken model, a teacher that makes the loss NaN, a model that asks to run its own
code or to be unpickled (neither is ever done), a full disk (a real ENOSPC from /dev/full), and a
cuda job on a worker without a GPU."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest

from akl_core.events import ERROR_CODES
from tests.reliability.conftest import Stack, tiny_job

pytestmark = [pytest.mark.integration, pytest.mark.postgres]


class _Payload:
    """Unpickling this creates ``path``: proof that someone loaded a pickle."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture
def models_root(models_root: Path, tmp_path: Path) -> Path:
    """The tiny preset plus four bad models, in a models root of this test's own."""
    import torch
    from safetensors.torch import load_file, save_file

    root = tmp_path / "models"
    tiny = root / "tiny"
    shutil.copytree(models_root / "tiny", tiny)

    # A config.json that is not JSON is refused at submission now (tests/api/test_job_refs.py);
    # weights that are not safetensors pass that check and fail in the worker.
    broken = root / "broken"
    shutil.copytree(tiny, broken)
    (broken / "model.safetensors").write_bytes(b"this is not a safetensors file")

    nan = root / "nan-teacher"
    shutil.copytree(tiny, nan)
    weights = load_file(nan / "model.safetensors")
    weights = {k: torch.full_like(v, float("nan")) if "lm_head" in k else v for k, v in weights.items()}
    save_file(weights, nan / "model.safetensors", metadata={"format": "pt"})

    code = root / "evil-code"
    shutil.copytree(tiny, code)
    config = json.loads((tiny / "config.json").read_text())
    config.update(model_type="evil", architectures=["EvilForCausalLM"],
                  auto_map={"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilForCausalLM"})  # fmt: skip
    (code / "config.json").write_text(json.dumps(config))
    (code / "evil.py").write_text(f"open({str(tmp_path / 'pwned-by-code')!r}, 'w').close()\n")

    pickled = root / "evil-pickle"
    shutil.copytree(tiny, pickled)
    (pickled / "model.safetensors").unlink()
    (pickled / "pytorch_model.bin").write_bytes(
        pickle.dumps({"model": _Payload(tmp_path / "pwned-by-pickle")})
    )
    return root


def test_failing_jobs_end_failed_once_with_a_stable_code_and_an_actionable_message(
    stack: Stack, tmp_path: Path
):
    http = stack.http(stack.new_key("alice"))
    cases = {
        "broken": tiny_job(tmp_path, steps=3, teacher="broken"),
        "nan": tiny_job(tmp_path, steps=3, teacher="nan-teacher"),
        "code": tiny_job(tmp_path, steps=3, teacher="evil-code"),
        "pickle": tiny_job(tmp_path, steps=3, teacher="evil-pickle"),
        "disk": tiny_job(tmp_path, steps=3),
        "gpu": tiny_job(tmp_path, steps=3, resources={"device": "cuda"}),
    }
    ids = {name: stack.submit(http, spec) for name, spec in cases.items()}
    # Disk full: the run's event log is /dev/full, so its first write fails with ENOSPC.
    disk_dir = Path(stack.job(ids["disk"]).output_dir)
    disk_dir.mkdir(parents=True)
    os.symlink("/dev/full", disk_dir / "events.jsonl")

    # after the set-up above: no job could start before it; with no GPU visible even on a GPU machine
    stack.start_worker("w", CUDA_VISIBLE_DEVICES="")
    try:
        jobs = {n: stack.wait_job(i, lambda j: j.status == "failed", 120, n) for n, i in ids.items()}
    finally:
        (disk_dir / "events.jsonl").unlink()  # reading /dev/full never ends: leave no trap behind
    codes = {name: job.error_code for name, job in jobs.items()}
    assert codes == {
        "broken": "model_not_found",
        "nan": "nan_loss",
        "code": "model_not_found",
        "pickle": "model_not_found",
        "disk": "disk_full",
        "gpu": "no_gpu",  # failed before the runner's event sink existed: once internal_error
    }, {n: (j.error_code, j.error_message) for n, j in jobs.items()}
    for name, job in jobs.items():
        body = http.get(f"/v1/jobs/{ids[name]}").json()
        assert body["error"] == {"code": job.error_code, "message": job.error_message}
        assert job.error_code in ERROR_CODES and job.attempts == 1  # a failure is final, not retried
        assert 10 < len(job.error_message) < 2000 and "Traceback" not in job.error_message, job.error_message
    assert "learning_rate" in jobs["nan"].error_message  # says what to change
    assert "no space left" in jobs["disk"].error_message.lower()
    assert "resources.device" in jobs["gpu"].error_message
    for name in ("broken", "code", "pickle"):
        assert cases[name]["teacher"] in jobs[name].error_message  # names the model
    # ... but not where the server keeps it (RELIABILITY.md #8): roots read as <models>, <data>
    roots = {stack.env["AKL_MODELS_ROOT"], stack.env["AKL_DATA_ROOT"], str(tmp_path)}
    roots |= {os.path.realpath(r) for r in roots}
    for name, job in jobs.items():
        events = http.get(f"/v1/jobs/{ids[name]}/events").json()
        texts = [job.error_message, json.dumps(events)]
        assert not [r for r in roots for t in texts if r in t], (name, texts)
    assert "<models>/broken" in jobs["broken"].error_message  # the loader quoted its path
    assert not (tmp_path / "pwned-by-code").exists()  # trust_remote_code is never on
    assert not (tmp_path / "pwned-by-pickle").exists()  # safetensors only: no pickle is loaded
    http.close()
