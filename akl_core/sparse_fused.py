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

# The dense modules' public names, all imported here (akl_core/divergences.py may become a package).
from akl_core.divergences import (
    DivergenceOptions,
    DivergenceOutput,
    Workspace,
    check_name,
    chunk_rows,
    chunk_selectors,
    finish,
)
from akl_core.fused import fused_grad_in_forward, softcap_, softcap_grad_
from akl_core.sparse import Teacher, check_teacher_rows, flatten_teacher, sparse_chunk

# Tokens per lm_head matmul when chunk_size is None: about this many logits, as in the dense
# fused path (each chunk rewrites the whole (V, H) weight gradient, so small chunks are slow).
_MATMUL_CHUNK_ELEMENTS = 1 << 22


def _logits(hidden: Tensor, weight: Tensor, bias: Tensor | None, out: Tensor) -> Tensor:
    """hidden @ weight.T (+ bias) into a reused (R, V) buffer."""
    if bias is None:
        return torch.mm(hidden, weight.t(), out=out)
    return torch.addmm(bias, hidden, weight.t(), out=out)


def _fused_forward(sh, sw, sb, teacher: Teacher, _tw, _tb, labels, name, opts, need, caps):
    """Loss sum, num_tokens, stats sums, and the grads (None where not needed).

    The signature of the dense fused forward (``fused_grad_in_forward``): the stored teacher
    (ids, log-probs, tail) rides in the teacher-hidden slot, the teacher weight and bias are None,
    and caps[0] is the student's final logit soft-capping.
    """
    ids, lp, tail = teacher
    need_h, need_w, need_b = need
    need_grad = any(need)
    valid = labels != opts.ignore_index
    grad_h = torch.zeros_like(sh) if need_h else None
    grad_w = torch.zeros(sw.shape, dtype=torch.float32, device=sw.device) if need_w else None
    grad_b = torch.zeros(sb.shape, dtype=torch.float32, device=sb.device) if need_b else None
    w32 = sw.float() if need_h else None
    loss_sum = sh.new_zeros((), dtype=torch.float32)
    stats: dict[str, Tensor] = {}
    v = sw.shape[0]
    sub_rows = chunk_rows(opts, v, sh.device, name)  # the divergence's cache-sized chunk
    rows = sub_rows if opts.chunk_size else max(sub_rows, _MATMUL_CHUNK_ELEMENTS // max(v, 1))
    rows = min(rows, max(sh.shape[0], 1))
    big = Workspace(rows, v, sh.device)  # logits and their gradient for one matmul chunk
    ws = Workspace(min(sub_rows, rows), v, sh.device)
    for sel in chunk_selectors(valid, rows):
        h_c = sh[sel]
        r = h_c.shape[0]
        s_c = softcap_(_logits(h_c, sw, sb, big.get("s_logits", r, sh.dtype)), caps[0])
        ids_c, lp_c, tail_c = ids[sel], lp[sel], tail[sel]
        g = big.get("grad", r) if need_grad else None  # (R, V) fp32
        for a in range(0, r, sub_rows):
            b = min(a + sub_rows, r)
            out = None if g is None else g[a:b]
            loss, _, st = sparse_chunk(
                name, s_c[a:b], ids_c[a:b], lp_c[a:b], tail_c[a:b], opts, need_grad, ws, out
            )
            loss_sum += loss.sum()
            for k, val in st.items():
                stats[k] = stats[k] + val if k in stats else val
        if g is None:  # no gradient wanted (need_grad is False)
            continue
        softcap_grad_(g, s_c, caps[0])
        if grad_h is not None:  # need_h
            assert w32 is not None  # made with grad_h
            gh = g @ w32  # (R, H)
            if isinstance(sel, slice):
                grad_h[sel] = gh
            else:
                grad_h.index_copy_(0, sel, gh.to(grad_h.dtype))
        if grad_w is not None:  # need_w
            grad_w.addmm_(g.t(), h_c.float())  # (V, H)
        if grad_b is not None:  # need_b
            grad_b += g.sum(0)
    return loss_sum, int(valid.sum()), stats, (grad_h, grad_w, grad_b)


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
