"""Fused lm_head + divergence: the full (N, V) logits never exist at once.

``compute_fused`` takes the student's and teacher's final hidden states and lm_head weights, as
Liger-Kernel's chunked distillation losses do (``fused_linear_distillation.py``). For each chunk of
valid tokens it computes both logits, the divergence (``akl_core.divergences.divergence_chunk``,
the same per-token code as ``compute``), and the gradients wrt the student's hidden states,
lm_head weight and bias, accumulated in fp32 during the forward pass; backward only scales them.
Peak memory: hidden states, weights, their gradients and one chunk of (rows, V) temporaries.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from akl_core.divergences import (
    DivergenceOptions,
    DivergenceOutput,
    Workspace,
    check_name,
    chunk_rows,
    chunk_selectors,
    divergence_chunk,
    finish,
    scaled_once,
    sub_chunk_rows,
)

# Tokens per lm_head matmul when chunk_size is None: about this many logits. Each chunk
# rewrites the whole (V, H) weight gradient, so chunks far smaller than this are slow; the
# divergence itself still runs in its own cache-sized sub-chunks.
_MATMUL_CHUNK_ELEMENTS = 1 << 22


def _logits(hidden: Tensor, weight: Tensor, bias: Tensor | None, out: Tensor) -> Tensor:
    """hidden @ weight.T (+ bias) into a reused (R, V) buffer."""
    if bias is None:
        return torch.mm(hidden, weight.t(), out=out)
    return torch.addmm(bias, hidden, weight.t(), out=out)


def softcap_(logits: Tensor, cap: float | None) -> Tensor:
    """Gemma-2's final logit soft-capping, in place: cap * tanh(logits / cap); None: unchanged."""
    if cap is None:
        return logits
    return logits.div_(cap).tanh_().mul_(cap)


def softcap_grad_(grad: Tensor, capped: Tensor, cap: float | None) -> Tensor:
    """grad wrt the capped logits -> grad wrt the raw ones, in place: times 1 - (capped / cap)**2."""
    if cap is None:
        return grad
    return grad.mul_(1.0 - (capped.float() / cap).square_())


def lm_head_backward(g: Tensor, sel, h_c: Tensor, w32: Tensor | None, grads: tuple) -> None:
    """Accumulate one chunk's lm_head gradients from g, the (R, V) fp32 gradient wrt its logits:
    grad_h[sel] = g @ W, grad_w += g.T @ h, grad_b += g.sum(0) (None entries are skipped)."""
    grad_h, grad_w, grad_b = grads
    if grad_h is not None:
        assert w32 is not None  # made whenever grad_h is
        gh = g @ w32  # (R, H)
        if isinstance(sel, slice):
            grad_h[sel] = gh
        else:
            grad_h.index_copy_(0, sel, gh.to(grad_h.dtype))
    if grad_w is not None:
        grad_w.addmm_(g.t(), h_c.float())  # (V, H)
    if grad_b is not None:
        grad_b += g.sum(0)


def fused_loop(sh, sw, sb, labels, name, opts, need, cap, chunk: Callable):
    """The fused lm_head loop the dense and the sparse fused paths share (Liger-Kernel's pattern:
    one base owns the chunking, each loss supplies its per-chunk divergence).

    For each matmul chunk of valid rows ``sel`` (r rows, ``big`` its Workspace) it computes the
    student's logits (soft-capped by cap), calls ``chunk(sel, r, big)`` for the chunk's divergence
    ``div(a, b, s_logits, need_grad, ws, out) -> (loss, _, stats)`` on rows a:b, and accumulates
    the gradients wrt sh, sw and sb (``need``). Returns (loss_sum, num_tokens, stats sums,
    (grad_h, grad_w, grad_b)), the grads None where not needed.
    """
    need_h, need_w, need_b = need
    need_grad = any(need)
    valid = labels != opts.ignore_index
    grad_h = torch.zeros_like(sh) if need_h else None
    grad_w = torch.zeros(sw.shape, dtype=torch.float32, device=sw.device) if need_w else None
    grad_b = torch.zeros(sb.shape, dtype=torch.float32, device=sb.device) if need_b else None
    grads = (grad_h, grad_w, grad_b)
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
        s_c = softcap_(_logits(h_c, sw, sb, big.get("s_logits", r, sh.dtype)), cap)
        div = chunk(sel, r, big)
        g = big.get("grad", r) if need_grad else None  # (R, V) fp32
        for a in range(0, r, sub_rows):
            b = min(a + sub_rows, r)
            out = None if g is None else g[a:b]
            loss, _, st = div(a, b, s_c[a:b], need_grad, ws, out)
            loss_sum += loss.sum()
            for k, val in st.items():
                stats[k] = stats[k] + val if k in stats else val
        if g is not None:
            softcap_grad_(g, s_c, cap)
            lm_head_backward(g, sel, h_c, w32, grads)
    return loss_sum, int(valid.sum()), stats, grads


def _fused_forward(sh, sw, sb, th, tw, tb, labels, name, opts, need, caps=(None, None)):
    """Loss sum, num_tokens, stats sums, and the grads (None where not needed).

    caps: the student's and teacher's final logit soft-capping (Gemma-2), or None.
    """

    inner = sub_chunk_rows(opts, tw.shape[0], th.device)  # AKL: element-wise chunks of a group

    def chunk(sel, r, big):
        t_c = softcap_(_logits(th[sel], tw, tb, big.get("t_logits", r, th.dtype)), caps[1])
        return lambda a, b, s, need_grad, ws, out: divergence_chunk(
            name, s, t_c[a:b], opts, need_grad, ws, out, inner
        )

    return fused_loop(sh, sw, sb, labels, name, opts, need, caps[0], chunk)


def fused_grad_in_forward(forward: Callable) -> type[torch.autograd.Function]:
    """An autograd Function over ``forward(sh, sw, sb, th, tw, tb, labels, name, opts, need, caps)``,
    which returns (loss_sum, num_tokens, stats, (grad_h, grad_w, grad_b)): the gradients wrt the
    student's hidden states, lm_head weight and bias are made in forward and handed back once
    (``scaled_once``). ``apply(sh, sw, sb, th, tw, tb, labels, name, opts, caps)`` returns
    (loss_sum, num_tokens, stats). The torch path and the Triton kernel
    (akl_core/kernels/dispatch.py) share it."""

    class _FusedGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, sh, sw, sb, th, tw, tb, labels, name, opts, caps):
            need = (sh.requires_grad, sw.requires_grad, sb is not None and sb.requires_grad)
            loss_sum, n, stats, grads = forward(sh, sw, sb, th, tw, tb, labels, name, opts, need, caps)
            grad_h, grad_w, grad_b = grads
            ctx.grad_h = grad_h
            ctx.grad_w = None if grad_w is None else grad_w.to(sw.dtype)
            ctx.grad_b = None if grad_b is None else grad_b.to(sb.dtype)
            return loss_sum, n, stats

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx, grad_output, *_):
            grads = [scaled_once(ctx, attr, grad_output) for attr in ("grad_h", "grad_w", "grad_b")]
            return (*grads, None, None, None, None, None, None, None)

    return _FusedGrad


_FusedDivergence = fused_grad_in_forward(_fused_forward)


def compute_fused(
    name: str,
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    labels: Tensor,
    *,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
    **options,
) -> DivergenceOutput:
    """``compute(name, h_s @ W_s.T + b_s, h_t @ W_t.T + b_t, labels, **options)`` without the logits.

    student_hidden: (B, T, H) or (N, H); student_weight: (V, H); student_bias: (V,) or None.
    teacher_hidden: (B, T, H') or (N, H'); teacher_weight: (V, H'); teacher_bias: (V,) or None.
    student_softcap, teacher_softcap: Gemma-2's final_logit_softcapping c (logits become
        c * tanh(logits / c) after the head), or None.
    labels: (B, T) or (N,), aligned with the hidden states. Options as ``compute``.
    Gradients reach student_hidden, student_weight and student_bias; the teacher is constant.
    """
    check_name(name)
    opts = DivergenceOptions.build(options)
    if student_weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError(
            f"student and teacher vocabularies differ: {student_weight.shape[0]} vs {teacher_weight.shape[0]}"
        )
    if student_hidden.shape[:-1] != labels.shape or teacher_hidden.shape[:-1] != labels.shape:
        raise ValueError(
            f"hidden states {tuple(student_hidden.shape)} / {tuple(teacher_hidden.shape)} do not match "
            f"labels {tuple(labels.shape)}"
        )
    if (
        student_hidden.shape[-1] != student_weight.shape[1]
        or teacher_hidden.shape[-1] != teacher_weight.shape[1]
    ):
        raise ValueError("hidden size does not match the lm_head weight's second dimension")
    sh = student_hidden.reshape(-1, student_hidden.shape[-1])
    th = teacher_hidden.reshape(-1, teacher_hidden.shape[-1]).detach()
    tw = teacher_weight.detach()
    tb = None if teacher_bias is None else teacher_bias.detach()
    labels = labels.reshape(-1)
    sb = student_bias
    caps = (student_softcap, teacher_softcap)
    for cap in caps:
        if cap is not None and not cap > 0:
            raise ValueError(f"soft-capping must be a number > 0 or None, got {cap}")
    from akl_core.kernels import dispatch  # the Triton kernel on CUDA (akl_core/kernels/)

    if dispatch.wanted(name, sh, student_weight, th, tw):
        return dispatch.compute_fused(name, sh, student_weight, sb, th, tw, tb, labels, opts, caps)
    wants_grad = sh.requires_grad or student_weight.requires_grad or (sb is not None and sb.requires_grad)
    if torch.is_grad_enabled() and wants_grad:
        loss_sum, n, stats = _FusedDivergence.apply(
            sh, student_weight, sb, th, tw, tb, labels, name, opts, caps
        )
        return finish(loss_sum, n, stats)
    with torch.no_grad():
        loss_sum, n, stats, _ = _fused_forward(
            sh, student_weight, sb, th, tw, tb, labels, name, opts, (False, False, False), caps
        )
    return finish(loss_sum, n, stats)
