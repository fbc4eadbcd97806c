"""Which examples each optimizer step sees, and the padded tensors of its micro-batches.

The data order is a seeded permutation per epoch; the run's position in it is
(epoch, index within the epoch), saved in every checkpoint so a resumed run sees the same batches.
"""

from __future__ import annotations

import torch

from akl_core import checkpoint as ckpt
from akl_core.data import IGNORE_INDEX
from akl_core.ddp import DistInfo
from akl_core.spec import JobSpec

Row = dict[str, list[int]]  # one tokenized example: input_ids and labels
Batch = dict[str, torch.Tensor]  # input_ids, attention_mask, labels: each (B, T)


class DataOrder:
    """A seeded permutation per epoch; the run's position is (epoch, index within the epoch)."""

    def __init__(self, num_examples: int, seed: int):
        self.n = num_examples
        self.seed = seed
        self._cache: tuple[int, list[int]] | None = None

    def permutation(self, epoch: int) -> list[int]:
        if self._cache is None or self._cache[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._cache = (epoch, torch.randperm(self.n, generator=g).tolist())
        return self._cache[1]

    def take(self, state: ckpt.TrainState, count: int) -> list[int]:
        """The next ``count`` example indices (fewer at the end of an epoch); advances ``state``."""
        if state.index >= self.n:
            state.epoch, state.index = state.epoch + 1, 0
        ids = self.permutation(state.epoch)[state.index : state.index + count]
        state.index += len(ids)
        return ids


def micro_batches(ids: list[int], batch_size: int, grad_accum: int, info: DistInfo) -> list[list[int]]:
    """This process's micro-batches of a step: micro m of rank r holds slot (m * world + r), so
    the union over ranks is the same global batch whatever the process count. Empty slots (end
    of an epoch) stay empty lists; the caller fills them with a fully masked example."""
    out = []
    for m in range(grad_accum):
        slot = m * info.world_size + info.rank
        out.append(ids[slot * batch_size : (slot + 1) * batch_size])
    return out


def collate(batch: list[Row], pad_id: int) -> Batch:
    """Right-pad a batch: input_ids (B, T), attention_mask (B, T), labels (B, T) with -100 on padding."""
    width = max(len(item["input_ids"]) for item in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    for row, item in enumerate(batch):
        n = len(item["input_ids"])
        input_ids[row, :n] = torch.tensor(item["input_ids"], dtype=torch.long)
        attention_mask[row, :n] = 1
        labels[row, :n] = torch.tensor(item["labels"], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def micro_batch(rows: list[Row], ids: list[int], pad_id: int, device: torch.device) -> Batch:
    """The tensors of the examples ``ids`` on ``device``, and ``example_ids`` (B,) (a teacher
    cache reads its rows by them). An empty slot at the end of an epoch becomes one fully masked
    example (id -1): it keeps DDP in lock-step and adds no token."""
    if ids:
        chosen = [rows[i] for i in ids]
    else:
        chosen = [{"input_ids": rows[0]["input_ids"], "labels": [IGNORE_INDEX] * len(rows[0]["input_ids"])}]
    batch = collate(chosen, pad_id)
    batch["example_ids"] = torch.tensor(ids or [-1], dtype=torch.long)
    return {k: v.to(device) for k, v in batch.items()}


def next_step_batches(
    order: DataOrder,
    state: ckpt.TrainState,
    rows: list[Row],
    pad_id: int,
    spec: JobSpec,
    info: DistInfo,
    device: torch.device,
) -> list[Batch]:
    """This process's micro-batches of the next optimizer step; advances ``state``'s position."""
    t = spec.training
    ids = order.take(state, t.batch_size * t.grad_accum * info.world_size)  # the global batch
    return [
        micro_batch(rows, mb, pad_id, device) for mb in micro_batches(ids, t.batch_size, t.grad_accum, info)
    ]
