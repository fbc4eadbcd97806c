"""Fused lm_head + sparse divergence: the student's (N, V) logits never exist at once.

``compute_sparse_fused`` is to ``akl_core.sparse.compute_sparse`` what ``akl_core.fused.compute_fused``
is to the dense ``compute``: for each chunk of valid tokens it computes the student's logits from
its final hidden states and lm_head, the divergence against the stored top-k teacher
(``sparse_chunk``, the same per-token code as ``compute_sparse``), and the gradients wrt the
hidden states, lm_head weight and bias, accumulated in fp32 during the forward pass; backward
only scales them. Peak memory: hidden states, weight, their gradients and one chunk of (rows, V)
temporaries. There is no teacher forward: the teacher is the cache.
"""

from __future__ import annotations

import torch
from torch import Tensor

# What the dense paths share: the options and result, and the fused lm_head loop.
from akl_core.divergences import DivergenceOptions, DivergenceOutput, check_name, finish
from akl_core.fused import fused_grad_in_forward, fused_loop
from akl_core.sparse import sparse_chunk
from akl_core.sparse_inputs import Teacher, check_teacher_rows, flatten_teacher


def _fused_forward(sh, sw, sb, teacher: Teacher, _tw, _tb, labels, name, opts, need, caps):
    """Loss sum, num_tokens, stats sums, and the grads (None where not needed).

    The signature of the dense fused forward (``fused_grad_in_forward``): the stored teacher
    (ids, log-probs, tail) rides in the teacher-hidden slot, the teacher weight and bias are None,
    and caps[0] is the student's final logit soft-capping. The loop is the dense one
    (``fused_loop``); only the per-chunk divergence differs.
    """
    ids, lp, tail = teacher

    def chunk(sel, _r, _big):
        ids_c, lp_c, tail_c = ids[sel], lp[sel], tail[sel]
        return lambda a, b, s, need_grad, ws, out: sparse_chunk(
            name, s, ids_c[a:b], lp_c[a:b], tail_c[a:b], opts, need_grad, ws, out
        )

    return fused_loop(sh, sw, sb, labels, name, opts, need, caps[0], chunk)


_FusedSparse = fused_grad_in_forward(_fused_forward)


def compute_sparse_fused(
    name: str,
    student_hidden: Tensor,
    student_weight: Tensor,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    tail_logmass: Tensor,
    labels: Tensor,
    *,
    student_bias: Tensor | None = None,
    student_softcap: float | None = None,
    **options,
) -> DivergenceOutput:
    """``compute_sparse(name, h @ W.T + b, topk_ids, topk_logprobs, tail_logmass, labels, **options)``
    without the logits.

    student_hidden: (B, T, H) or (N, H); student_weight: (V, H); student_bias: (V,) or None.
    student_softcap: Gemma-2's final_logit_softcapping c (logits become c * tanh(logits / c)),
        or None.
    topk_ids, topk_logprobs: (B, T, k) or (N, k); tail_logmass, labels: (B, T) or (N,); as
        ``compute_sparse``. Options as ``compute``.
    Gradients reach student_hidden, student_weight and student_bias.
    """
    check_name(name)
    opts = DivergenceOptions.build(options)
    if student_hidden.dim() not in (2, 3) or student_hidden.shape[-1] != student_weight.shape[1]:
        raise ValueError(
            f"hidden size does not match the lm_head weight's second dimension: "
            f"{tuple(student_hidden.shape)} vs {tuple(student_weight.shape)}"
        )
    if student_softcap is not None and not student_softcap > 0:
        raise ValueError(f"soft-capping must be a number > 0 or None, got {student_softcap}")
    v = student_weight.shape[0]
    teacher, labels = flatten_teacher(
        tuple(student_hidden.shape[:-1]), v, topk_ids, topk_logprobs, tail_logmass, labels
    )
    check_teacher_rows(teacher, v, labels != opts.ignore_index)
    sh = student_hidden.reshape(-1, student_hidden.shape[-1])
    sw, sb = student_weight, student_bias
    caps = (student_softcap, None)
    wants_grad = sh.requires_grad or sw.requires_grad or (sb is not None and sb.requires_grad)
    if torch.is_grad_enabled() and wants_grad:
        loss_sum, n, stats = _FusedSparse.apply(sh, sw, sb, teacher, None, None, labels, name, opts, caps)
        return finish(loss_sum, n, stats)
    with torch.no_grad():
        loss_sum, n, stats, _ = _fused_forward(
            sh, sw, sb, teacher, None, None, labels, name, opts, (False, False, False), caps
        )
    return finish(loss_sum, n, stats)
