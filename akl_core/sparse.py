"""Sparse divergences: distil from a stored top-k teacher (issue 12, section 4).

One entry point, ``compute_sparse(name, student_logits, topk_ids, topk_logprobs, tail_logmass,
labels, **options)``, the twin of ``akl_core.divergences.compute`` for a teacher stored as its
top-k token ids K, their log-probabilities log p_i at T = 1, and the log of the leftover mass
log P_r = log(1 - sum_K p_i). Definitions: ``docs/method.md``, "On a stored top-k teacher".

What it computes: the divergence ``name`` between teacher and student coarse-grained to k + 1
outcomes, the k tokens of K and one bucket r holding the rest of each distribution:
    P = (p_K, P_r),  Q = (q_K, Q_r),  Q_r = 1 - sum_K q_i = sum of q over the tokens outside K.
Q_r is the student's full softmax outside K, taken as a log-sum-exp of its logits there, so it
stays exact when sum_K q_i -> 1. Then Q = softmax(zc) of k + 1 "coarse logits"
zc = (z_K, logsumexp_{j not in K} z_j), and every divergence is the dense formula applied to
(P, Q). Its gradient wrt the student logits follows from the gradient a wrt zc: a_i on the tokens
of K and u_j a_r off K, where u = softmax of the logits outside K (the student's distribution
inside its bucket). With K the whole vocabulary (P_r = Q_r = 0) it is the dense divergence; with
fewer tokens each f-divergence (FKL, RKL, SKL, SRKL, JSD, TVD) can only shrink (data-processing
inequality).

Temperature T: the student is tempered as in the dense path, q = softmax(s / T). The cache holds
only T = 1 log-probabilities, so the teacher is re-tempered over the k + 1 outcomes, the bucket
treated as one outcome: P = softmax((log p_K, log P_r) / T). At T = 1 that is the stored
distribution (renormalised, which absorbs fp16 / bf16 rounding of the cache); with K the whole
vocabulary it is exactly softmax(teacher_logits / T). Otherwise it is an approximation: the true
tempered bucket mass is sum_{j not in K} p_j ** (1 / T) / Z, which the cache cannot give (it is
larger than P_r ** (1 / T) / Z for T > 1, smaller for T < 1), so the tempered top-k tokens get
slightly too much (T > 1) or too little (T < 1) mass relative to the bucket; their ratios to each
other are exact. As in the dense path there is no T ** 2 factor.

AKL: the head is the teacher's top tokens inside K up to cumulative (tempered) mass mu, by the
dense boundary rule (a token whose own cumulative mass exceeds mu is tail; the top-1 always is
head); the bucket is never head. When sum_K p_i < mu the boundary lies outside K: the head is all
of K, and the stat ``head_truncated`` (a mean over valid tokens like every stat: the fraction of
such tokens; times num_tokens for the count) says how often. g_tail includes the bucket's
|P_r - Q_r|, so g_head + g_tail = 2 TVD(P, Q).

Memory: chunks of rows as in the dense path (``chunk_rows``); per chunk two (rows, V) fp32
buffers (tempered logits with K masked out, then their softmax, which becomes the gradient) and
(rows, k + 1) temporaries; the gradient wrt the student logits is made in the forward pass and
handed back once (``grad_in_forward``), as in the dense path.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

# The dense package's names this module builds on (the chunk loop, the workspace, the result).
from akl_core.divergences import (
    STAT_NAMES,
    DivergenceOptions,
    DivergenceOutput,
    Workspace,
    check_name,
    finish,
    grad_in_forward,
    rows_forward,
)
from akl_core.sparse_inputs import Teacher, check_teacher_rows, flatten_teacher

SPARSE_STAT_NAMES = (*STAT_NAMES, "head_truncated")


# --------------------------------------------------------------------------------------------
# The two coarse-grained distributions of one chunk, and the per-token functions on them. Each
# returns (loss (R,), a = gradient wrt the coarse student logits zc (R, k + 1) or None, stats).
# --------------------------------------------------------------------------------------------


class _Coarse:
    """Teacher and student over the k + 1 outcomes (the top-k, then the bucket), fp32.

    lp, lq: log-probs (R, k + 1); p, q: probs. Entries may be -inf (probability 0).
    """

    def __init__(self, lp: Tensor, lq: Tensor):
        self.lp, self.lq = lp, lq
        self.p, self.q = lp.exp(), lq.exp()

    def fkl(self) -> Tensor:
        return _kl_terms(self.p, self.lp, self.lq).sum(-1)

    def rkl(self) -> Tensor:
        return _kl_terms(self.q, self.lq, self.lp).sum(-1)

    def rkl_grad(self, rkl: Tensor) -> Tensor:
        """Gradient of RKL wrt zc: q (log q - log p - RKL), 0 where q == 0."""
        return torch.where(self.q > 0, self.q * (self.lq - self.lp - rkl[:, None]), 0.0)


def _kl_terms(x: Tensor, lx: Tensor, ly: Tensor) -> Tensor:
    """x (log x - log y) per entry, 0 where x == 0."""
    return torch.where(x > 0, x * (lx - ly), 0.0)


def _log_mix(lx: Tensor, ly: Tensor, a: float) -> Tensor:
    """log(a x + (1 - a) y), stable when both underflow; -inf only where both are -inf."""
    if a == 0.0:
        return ly
    return torch.logaddexp(lx + math.log(a), ly + math.log1p(-a))


def _softmax_grad(q: Tensor, g: Tensor) -> Tensor:
    """Gradient wrt zc of a loss whose gradient wrt q = softmax(zc) is g: q (g - <q, g>)."""
    g = torch.where(q > 0, g, 0.0)  # entries with q == 0 have no gradient (and may hold inf)
    return q * (g - (q * g).sum(-1, keepdim=True))


def head_gap(c: _Coarse, mu: float) -> dict[str, Tensor]:
    """AKL's head inside the top-k: g_head, g_tail, w_head, head_size, head_truncated (R,).

    The dense rule on the sorted teacher top-k (c_i <= mu is head, top-1 always); the bucket is
    tail. Rows whose top-k holds less than mu are head_truncated: their head is all of K.
    """
    p_k, order = c.p[:, :-1].sort(dim=-1, descending=True, stable=True)  # (R, k)
    gaps = (p_k - c.q[:, :-1].gather(-1, order)).abs()
    cum = p_k.cumsum(-1)
    head = cum <= mu
    head[:, 0] = True
    g_head = torch.where(head, gaps, 0.0).sum(-1)
    g_tail = torch.where(head, 0.0, gaps).sum(-1) + (c.p[:, -1] - c.q[:, -1]).abs()
    gap = g_head + g_tail
    # p == q: 0 / 0; take 0.5 / 0.5 as the dense path does (the loss is 0 there anyway)
    w_head = torch.where(gap > 0, g_head / gap.clamp_min(torch.finfo(gap.dtype).tiny), 0.5)
    return {
        "g_head": g_head,
        "g_tail": g_tail,
        "w_head": w_head,
        "head_size": head.sum(-1).to(gap.dtype),
        "head_truncated": (cum[:, -1] < mu).to(gap.dtype),
    }


def _fkl(c: _Coarse, opts: DivergenceOptions, need: bool):
    fkl = c.fkl()
    return fkl, (c.q - c.p if need else None), {"fkl": fkl}


def _rkl(c: _Coarse, opts: DivergenceOptions, need: bool):
    rkl = c.rkl()
    return rkl, (c.rkl_grad(rkl) if need else None), {"rkl": rkl}


def _mixed(c: _Coarse, w_f, w_r, need: bool, stats: dict[str, Tensor]):
    """w_f FKL + w_r RKL, weights floats or (R,) constants."""
    fkl, rkl = c.fkl(), c.rkl()
    stats = {"fkl": fkl, "rkl": rkl, **stats}
    a = None
    if need:
        wf = w_f[:, None] if isinstance(w_f, Tensor) else w_f
        wr = w_r[:, None] if isinstance(w_r, Tensor) else w_r
        a = wf * (c.q - c.p) + wr * c.rkl_grad(rkl)
    return w_f * fkl + w_r * rkl, a, stats


def _fkl_rkl(c: _Coarse, opts: DivergenceOptions, need: bool):
    return _mixed(c, 0.5, 0.5, need, {})


def _akl_parts(c: _Coarse, opts: DivergenceOptions, need: bool, swap: bool):
    head = head_gap(c, opts.mu)
    w_f = 1.0 - head["w_head"] if swap else head["w_head"]  # AKL-r swaps the weights
    return _mixed(c, w_f, 1.0 - w_f, need, head)


def _akl(c: _Coarse, opts: DivergenceOptions, need: bool):
    return _akl_parts(c, opts, need, swap=False)


def _akl_r(c: _Coarse, opts: DivergenceOptions, need: bool):
    return _akl_parts(c, opts, need, swap=True)


def _skl(c: _Coarse, opts: DivergenceOptions, need: bool):
    # SKL = KL(P || lam P + (1 - lam) Q) (DistiLLM); dL/dQ = -(1 - lam) P / M
    lm = _log_mix(c.lp, c.lq, opts.lam)
    loss = _kl_terms(c.p, c.lp, lm).sum(-1)
    a = None
    if need:
        ratio = torch.where(c.p > 0, (c.lp - lm).exp(), 0.0)
        a = _softmax_grad(c.q, ratio * -(1.0 - opts.lam))
    return loss, a, {}


def _srkl(c: _Coarse, opts: DivergenceOptions, need: bool):
    # SRKL = KL(Q || (1 - lam) P + lam Q) (DistiLLM); dL/dQ = log Q - log M - lam Q / M (+ 1)
    lm = _log_mix(c.lq, c.lp, opts.lam)
    loss = _kl_terms(c.q, c.lq, lm).sum(-1)
    a = None
    if need:
        a = _softmax_grad(c.q, c.lq - lm - opts.lam * (c.lq - lm).exp())
    return loss, a, {}


def _tvd(c: _Coarse, opts: DivergenceOptions, need: bool):
    diff = c.q - c.p
    loss = 0.5 * diff.abs().sum(-1)
    return loss, (_softmax_grad(c.q, 0.5 * diff.sign()) if need else None), {}


def _jsd(c: _Coarse, opts: DivergenceOptions, need: bool):
    # generalized JSD (TRL's GKD): M = beta P + (1 - beta) Q; beta KL(P||M) + (1 - beta) KL(Q||M)
    b = opts.beta
    lm = _log_mix(c.lp, c.lq, b)
    loss = b * _kl_terms(c.p, c.lp, lm).sum(-1) + (1 - b) * _kl_terms(c.q, c.lq, lm).sum(-1)
    return loss, (_softmax_grad(c.q, (1 - b) * (c.lq - lm)) if need else None), {}


PerToken = Callable[[_Coarse, DivergenceOptions, bool], tuple[Tensor, "Tensor | None", dict[str, Tensor]]]
_PER_TOKEN: dict[str, PerToken] = {
    "fkl": _fkl,
    "rkl": _rkl,
    "fkl_rkl": _fkl_rkl,
    "akl": _akl,
    "akl_r": _akl_r,
    "skl": _skl,
    "srkl": _srkl,
    "tvd": _tvd,
    "jsd": _jsd,
}


# --------------------------------------------------------------------------------------------
# One chunk of rows: student logits (R, V) and the stored teacher -> loss, gradient, stats.
# --------------------------------------------------------------------------------------------


def teacher_log_probs(logprobs: Tensor, tail: Tensor, temperature: float) -> Tensor:
    """The stored T = 1 teacher re-tempered over the k + 1 outcomes, the bucket as one outcome:
    log_softmax((log p_K, log P_r) / T), (R, k + 1) fp32 (module docstring: exact at T = 1 up to
    renormalisation, and for k = V; otherwise the bucket's tempered mass is approximate)."""
    lp = torch.cat([logprobs.float(), tail.float()[:, None]], 1)
    return torch.log_softmax(lp / temperature if temperature != 1.0 else lp, -1)


def _student_bucket(z: Tensor, ids: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
    """(z_K (R, k), log-sum-exp of z outside K (R,)); z is overwritten with -inf on K and u
    receives softmax of what is left (0 on K; 0 on rows with nothing left)."""
    z_k = z.gather(1, ids)
    z.scatter_(1, ids, -math.inf)  # the bucket: every token outside the top-k
    torch.softmax(z, -1, out=u)
    z_max = z.amax(-1)
    # max(u) = exp(max(z) - lse): the normaliser from two reductions, without a log_softmax pass
    lse_out = z_max - u.amax(-1).log()
    empty = z_max == -math.inf  # K covers every finite logit (k = V): the bucket is empty
    if bool(empty.any()):
        lse_out = torch.where(empty, -math.inf, lse_out)
        u.masked_fill_(empty[:, None], 0.0)
    return z_k, lse_out


def sparse_chunk(
    name: str,
    student: Tensor,
    ids: Tensor,
    logprobs: Tensor,
    tail: Tensor,
    opts: DivergenceOptions,
    need_grad: bool,
    ws: Workspace | None = None,
    out: Tensor | None = None,
) -> tuple[Tensor, Tensor | None, dict[str, Tensor]]:
    """Per-token loss (R,), grad wrt the student logits (R, V) fp32 or None, and stats sums.

    student: (R, V) logits of valid tokens, any float dtype (computed in fp32).
    ids: (R, k) int; logprobs: (R, k) and tail: (R,) float, the stored T = 1 teacher.
    ws: buffers to reuse across chunks; out: where to write the gradient ((R, V) fp32); without
    it the gradient lives in ``ws`` and is overwritten by the next chunk.
    """
    r, v = student.shape
    ws = ws or Workspace(r, v, student.device)
    t = opts.temperature
    z = ws.get("z", r)
    if t == 1.0:
        z.copy_(student)
    else:
        torch.div(student, t, out=z)
    ids = ids.long()
    u = ws.get("u", r)
    z_k, lse_out = _student_bucket(z, ids, u)
    lq = torch.log_softmax(torch.cat([z_k, lse_out[:, None]], 1), -1)  # (R, k + 1)
    coarse = _Coarse(teacher_log_probs(logprobs, tail, t), lq)
    loss, a, stats = _PER_TOKEN[name](coarse, opts, need_grad)
    if opts.all_stats:
        stats = dict(stats)
        stats.setdefault("fkl", coarse.fkl())
        stats.setdefault("rkl", coarse.rkl())
        if "g_head" not in stats:
            stats.update(head_gap(coarse, opts.mu))
    if need_grad:
        assert a is not None
        # d zc_r / d z_j = u_j off K: the bucket's gradient spread in proportion to q_j
        if out is None:
            out = u.mul_(a[:, -1:])
        else:
            torch.mul(u, a[:, -1:], out=out)
        out.scatter_(1, ids, a[:, :-1])
        if t != 1.0:
            out.div_(t)
    return loss, (out if need_grad else None), {k: x.sum() for k, x in stats.items()}


# --------------------------------------------------------------------------------------------
# Chunking, autograd (the input checks are in ``sparse_inputs``): as in the dense ``compute``.
# --------------------------------------------------------------------------------------------


def _forward(
    name: str, s: Tensor, teacher: Teacher, labels: Tensor, opts: DivergenceOptions, need_grad: bool
) -> tuple[Tensor, Tensor | None, int, dict[str, Tensor]]:
    ids, lp, tail = teacher

    def divergence(chunk: tuple[Tensor, ...], ws: Workspace, out: Tensor | None):
        s_c, ids_c, lp_c, tail_c = chunk
        return sparse_chunk(name, s_c, ids_c, lp_c, tail_c, opts, need_grad, ws, out)

    return rows_forward(name, (s, ids, lp, tail), labels, opts, need_grad, divergence)


# the teacher travels as one tuple argument (no gradient), in the dense Function's teacher slot
_ChunkedSparse = grad_in_forward(_forward)


def compute_sparse(
    name: str,
    student_logits: Tensor,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    tail_logmass: Tensor,
    labels: Tensor,
    **options,
) -> DivergenceOutput:
    """Divergence ``name`` between a stored top-k teacher and the student, coarse-grained to the
    k teacher tokens plus one bucket (module docstring), over the tokens whose label is kept.

    student_logits: (B, T, V) or (N, V), any float dtype (computed in fp32).
    topk_ids: (B, T, k) or (N, k), int64 or int32, distinct tokens per row (any order).
    topk_logprobs: (B, T, k) or (N, k), the teacher's log-probabilities at T = 1, any float dtype.
    tail_logmass: (B, T) or (N,), log(1 - sum of the top-k probabilities); -inf when none is left.
    labels: (B, T) or (N,), aligned with the logits; ``ignore_index`` marks tokens that do not
        count (their teacher rows are not read).
    options: see ``DivergenceOptions``; ``temperature`` re-tempers the cache (module docstring).
    Returns ``DivergenceOutput`` as ``compute`` does; AKL's stats add ``head_truncated``.
    The gradient flows to ``student_logits`` only.
    """
    check_name(name)
    opts = DivergenceOptions.build(options)
    if student_logits.dim() not in (2, 3) or not student_logits.is_floating_point():
        raise ValueError(
            f"expected float student logits (B, T, V) or (N, V), got {tuple(student_logits.shape)}"
        )
    v = student_logits.shape[-1]
    teacher, labels = flatten_teacher(
        tuple(student_logits.shape[:-1]), v, topk_ids, topk_logprobs, tail_logmass, labels
    )
    s = student_logits.reshape(-1, v)
    check_teacher_rows(teacher, v, labels != opts.ignore_index)
    if torch.is_grad_enabled() and s.requires_grad:
        loss_sum, n, stats = _ChunkedSparse.apply(s, teacher, labels, name, opts)
        return finish(loss_sum, n, stats)
    loss_sum, _, n, stats = _forward(name, s, teacher, labels, opts, need_grad=False)
    return finish(loss_sum, n, stats)
