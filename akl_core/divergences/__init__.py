"""Token-level distillation divergences: Adaptive KL (AKL) and the paper's baselines.

One entry point, ``compute(name, student_logits, teacher_logits, labels, **options)``. Every
divergence compares the teacher p = softmax(teacher / T) with the student q = softmax(student / T)
per token, over the tokens whose label is not ``ignore_index``. Definitions: docs/method.md
(Wu et al., COLING 2025, arXiv 2404.02657).

Where things are:
- ``options``: the names, ``DivergenceOptions`` (validated when built), ``DivergenceOutput``.
- ``definitions``: each formula written once, plainly, with a plain-autograd ``per_token``.
- ``head``: AKL's head; ``head_gap_by_sort`` is the definition ("sort, cumsum, keep <= mu"),
  ``head_gap`` the same without the full sort.
- ``rows``: the same losses on one chunk of tokens, in few passes, with closed-form gradients.
- ``chunked``: chunking, fp32 upcast, temperature, and the autograd Function whose gradient is
  made in the forward pass (peak memory: the logits, their gradient and one chunk).

Temperature: the loss is the divergence between the tempered distributions, without the T**2
factor of Hinton et al.; multiply by T**2 yourself to keep gradient scales across T.
"""

from __future__ import annotations

import torch
from torch import Tensor

from akl_core.divergences.chunked import (
    ChunkedDivergence,
    ChunkFn,
    Workspace,
    chunk_loop,
    chunk_rows,
    chunk_selectors,
    dense_forward,
    divergence_chunk,
    finish,
    flatten,
    grad_in_forward,
    rows_forward,
    scaled_once,
    sub_chunk_rows,
)
from akl_core.divergences.head import head_gap, head_gap_by_sort
from akl_core.divergences.options import NAMES, STAT_NAMES, DivergenceOptions, DivergenceOutput, check_name

__all__ = [
    "NAMES",
    "STAT_NAMES",
    "ChunkFn",
    "DivergenceOptions",
    "DivergenceOutput",
    "Workspace",
    "check_name",
    "chunk_loop",
    "chunk_rows",
    "chunk_selectors",
    "compute",
    "divergence_chunk",
    "finish",
    "flatten",
    "grad_in_forward",
    "head_gap",
    "head_gap_by_sort",
    "rows_forward",
    "scaled_once",
    "sub_chunk_rows",
]


def compute(
    name: str, student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, **options
) -> DivergenceOutput:
    """Divergence ``name`` between teacher and student over the tokens whose label is kept.

    student_logits, teacher_logits: (B, T, V) or (N, V), any float dtype (computed in fp32).
    labels: (B, T) or (N,), already aligned with the logits (no shift here); ``ignore_index``
        marks tokens that do not count.
    options: see ``DivergenceOptions`` (mu, temperature, ignore_index, lam, beta, chunk_size,
        all_stats).
    The gradient flows to ``student_logits`` only; the teacher is treated as a constant.
    """
    check_name(name)
    opts = DivergenceOptions.build(options)
    s, t, labels = flatten(student_logits, teacher_logits, labels)
    t = t.detach()
    from akl_core.kernels import dispatch  # the Triton kernel on CUDA (akl_core/kernels/)

    if dispatch.wanted(name, s, t):
        return dispatch.compute(name, s, t, labels, opts)
    if torch.is_grad_enabled() and s.requires_grad:
        loss_sum, n, stats = ChunkedDivergence.apply(s, t, labels, name, opts)
        return finish(loss_sum, n, stats)
    loss_sum, _, n, stats = dense_forward(name, s, t, labels, opts, need_grad=False)
    return finish(loss_sum, n, stats)
