"""The optimizer and the learning-rate schedule of a run."""

from __future__ import annotations

import math

import torch
from torch import nn

from akl_core.spec import JobSpec


def lr_factor(step: int, spec: JobSpec, total: int) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based), nanoGPT-style:
    1) linear warmup that starts above 0 (no wasted first step), 2) cosine / linear decay to 0
    over the remaining steps, or constant."""
    t = spec.training
    if step < t.warmup_steps:
        return (step + 1) / (t.warmup_steps + 1)
    if t.scheduler == "constant":
        return 1.0
    progress = min(1.0, (step - t.warmup_steps) / max(1, total - t.warmup_steps))
    if t.scheduler == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - progress


def make_optimizer(model: nn.Module, spec: JobSpec, total: int, device: torch.device):
    """AdamW with weight decay on matrices only (nanoGPT), and the warmup + decay schedule."""
    t = spec.training
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": t.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=t.learning_rate, betas=(0.9, 0.999), fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, spec, total))
    return optimizer, scheduler
