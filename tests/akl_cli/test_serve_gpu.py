"""`akl serve` tells its API whether a worker can run cuda jobs (AKL_GPU_WORKERS)."""

from __future__ import annotations

import pytest

from akl_cli.serve import gpu_workers, machine_has_gpu


def test_cuda_jobs_are_accepted_only_with_a_gpu_and_a_worker_on_the_gpu_queue() -> None:
    assert gpu_workers("gpu,cpu", "gpu", has_gpu=True) == "true"
    assert gpu_workers("cpu, gpu", "gpu", has_gpu=True) == "true"
    assert gpu_workers("gpu,cpu", "gpu", has_gpu=False) == "false"
    assert gpu_workers("cpu", "gpu", has_gpu=True) == "false"
    assert gpu_workers("gpus", "gpu", has_gpu=True) == "false"


@pytest.mark.parametrize("hidden", ["", "-1"])
def test_hidden_devices_are_no_gpu(hidden: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", hidden)
    assert machine_has_gpu() is False


def test_the_answer_matches_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    """On this machine, with or without a GPU: the device nodes agree with torch.cuda."""
    torch = pytest.importorskip("torch")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    if torch.cuda.is_available():
        assert machine_has_gpu() is True
    else:
        assert machine_has_gpu() is False or torch.version.cuda is None  # a CPU-only torch on a GPU machine
