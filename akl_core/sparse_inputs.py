"""The input checks of the sparse divergences (``sparse.compute_sparse``, ``sparse_fused``): the
stored teacher's shapes and dtypes against the student's, and its rows' values."""

from __future__ import annotations

import math

import torch
from torch import Tensor

Teacher = tuple[Tensor, Tensor, Tensor]  # (ids (N, k), log-probs (N, k), tail log-mass (N,))


def flatten_teacher(
    lead: tuple[int, ...],
    vocab: int,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    tail_logmass: Tensor,
    labels: Tensor,
) -> tuple[Teacher, Tensor]:
    """Check the stored teacher's shapes against the student's leading dims; return flat views.

    lead: the student's leading shape, (B, T) or (N,); vocab: V.
    """
    if labels.shape != lead:
        raise ValueError(f"expected labels of shape {lead}, got {tuple(labels.shape)}")
    if topk_ids.dim() != len(lead) + 1 or topk_ids.shape[:-1] != lead:
        raise ValueError(f"expected topk_ids of shape {(*lead, 'k')}, got {tuple(topk_ids.shape)}")
    if topk_logprobs.shape != topk_ids.shape:
        raise ValueError(
            f"topk_logprobs {tuple(topk_logprobs.shape)} must have the shape of topk_ids {tuple(topk_ids.shape)}"
        )
    if tail_logmass.shape != lead:
        raise ValueError(f"expected tail_logmass of shape {lead}, got {tuple(tail_logmass.shape)}")
    if topk_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"topk_ids must be int64 or int32, got {topk_ids.dtype}")
    if not topk_logprobs.is_floating_point() or not tail_logmass.is_floating_point():
        raise ValueError("topk_logprobs and tail_logmass must be floating point")
    k = topk_ids.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(f"top-k size must be in 1..V = {vocab}, got k = {k}")
    teacher = (
        topk_ids.reshape(-1, k),
        topk_logprobs.detach().reshape(-1, k),
        tail_logmass.detach().reshape(-1),
    )
    return teacher, labels.reshape(-1)


def check_teacher_rows(teacher: Teacher, vocab: int, valid: Tensor) -> None:
    """Reject stored rows that would give a silently wrong loss (valid tokens only): ids outside
    the vocabulary or repeated in a row, NaN or +inf log-probabilities."""
    ids, lp, tail = teacher
    if not bool(valid.all()):
        ids, lp, tail = ids[valid], lp[valid], tail[valid]
    if ids.numel() == 0:
        return
    if int(ids.min()) < 0 or int(ids.max()) >= vocab:
        raise ValueError(f"topk_ids must lie in [0, {vocab}), got [{int(ids.min())}, {int(ids.max())}]")
    srt = ids.sort(-1).values
    if bool((srt[:, 1:] == srt[:, :-1]).any()):
        raise ValueError("topk_ids repeats a token within a row; the top-k must be distinct tokens")
    for x, what in ((lp, "topk_logprobs"), (tail, "tail_logmass")):
        if bool((x.isnan() | (x == math.inf)).any()):
            raise ValueError(f"{what} holds NaN or +inf")
