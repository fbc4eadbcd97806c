"""Several processes: the process group torchrun describes, and the model wrapper for it.

Started by torchrun (RANK / WORLD_SIZE / LOCAL_RANK in the environment) a run uses
DistributedDataParallel over gloo (CPU) or nccl (CUDA); rank 0 alone writes files and events.
With one process every helper here is a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from akl_core.events import DistillError


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def all_reduce(self, values: list[float], device: torch.device) -> list[float]:
        """Sum plain numbers over processes (float64 so token counts stay exact)."""
        if not self.enabled:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def init_distributed(device_pref: str) -> tuple[DistInfo, torch.device]:
    """Join the process group torchrun describes (if any) and pick this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    info = DistInfo(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
    use_cuda = device_pref == "cuda" or (device_pref == "auto" and torch.cuda.is_available())
    if device_pref == "cuda" and not torch.cuda.is_available():
        raise DistillError(
            "no_gpu",
            "resources.device is 'cuda' but this worker has no usable CUDA device; submit with "
            "resources.device 'auto' or 'cpu', or run a GPU worker on the gpu queue",
        )
    if use_cuda and info.local_rank >= torch.cuda.device_count():
        raise DistillError(
            "no_gpu",
            f"resources.processes asks for {info.world_size} processes but this worker has "
            f"{torch.cuda.device_count()} CUDA devices; lower resources.processes",
        )
    device = torch.device("cuda", info.local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if info.enabled and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return info, device


def wrap(module: nn.Module, info: DistInfo, device: torch.device) -> nn.Module:
    """``module`` under DistributedDataParallel when there are several processes, else itself."""
    if not info.enabled:
        return module
    return nn.parallel.DistributedDataParallel(
        module, device_ids=[device.index] if device.type == "cuda" else None
    )


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (or ``module`` itself)."""
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module
