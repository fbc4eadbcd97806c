"""Each divergence written once, plainly (docs/method.md, "Definitions" and "Baselines").

Per token, on (R, V) tempered logits: the teacher p = softmax(z_t), the student q = softmax(z_s).
``per_token`` is the readable twin of ``rows.per_token``: the same losses, from these formulas
and plain autograd, where rows.py computes them in fewer passes with closed-form gradients
(tests/akl_core/test_divergences.py checks that the two agree). rows.py takes the building
blocks that are not worth rewriting from here: ``head_weight``, ``log_mix``, ``kl_terms`` and
the skewed and mixed KLs.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from akl_core.divergences.head import head_gap_by_sort
from akl_core.divergences.options import DivergenceOptions


def log_mix(lx: Tensor, ly: Tensor, a: float) -> Tensor:
    """log(a x + (1 - a) y) from log x, log y; stable when both underflow, -inf only where both are."""
    if a == 0.0:
        return ly
    return torch.logaddexp(lx + math.log(a), ly + math.log1p(-a))


def kl_terms(x: Tensor, lx: Tensor, ly: Tensor) -> Tensor:
    """x (log x - log y) per entry, 0 where x == 0 (here y > 0 wherever x > 0)."""
    return torch.where(x > 0, x * (lx - ly), 0.0)


def kl(x: Tensor, lx: Tensor, ly: Tensor) -> Tensor:
    """KL(x || y) = sum_v x_v (log x_v - log y_v) per row."""
    return kl_terms(x, lx, ly).sum(-1)


def head_weight(g_head: Tensor, gap: Tensor) -> Tensor:
    """w_head = g_head / (g_head + g_tail), gap = g_head + g_tail = sum_v |p_v - q_v|.

    p == q gives 0 / 0 in the authors' code; take 0.5 (the loss is 0 there anyway).
    """
    return torch.where(gap > 0, g_head / gap.clamp_min(torch.finfo(gap.dtype).tiny), 0.5)


def akl(fkl: Tensor, rkl: Tensor, w_head: Tensor, swap: bool = False) -> Tensor:
    """AKL = w_head FKL + w_tail RKL, w_tail = 1 - w_head; AKL-r (swap) exchanges the weights."""
    w_f = 1.0 - w_head if swap else w_head
    return w_f * fkl + (1.0 - w_f) * rkl


def skl(p: Tensor, lp: Tensor, lq: Tensor, lam: float) -> tuple[Tensor, Tensor]:
    """SKL = KL(p || m), m = lam p + (1 - lam) q (DistiLLM); returns (SKL, log m)."""
    lm = log_mix(lp, lq, lam)
    return kl(p, lp, lm), lm


def srkl(q: Tensor, lq: Tensor, lp: Tensor, lam: float) -> tuple[Tensor, Tensor]:
    """SRKL = KL(q || m), m = (1 - lam) p + lam q (DistiLLM); returns (SRKL, log m)."""
    lm = log_mix(lq, lp, lam)
    return kl(q, lq, lm), lm


def jsd(p: Tensor, q: Tensor, lp: Tensor, lq: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """Generalized JSD (TRL's GKD): beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q;
    returns (JSD, log m)."""
    lm = log_mix(lp, lq, beta)
    return beta * kl(p, lp, lm) + (1 - beta) * kl(q, lq, lm), lm


def tvd(p: Tensor, q: Tensor) -> Tensor:
    """TVD = 0.5 sum_v |p_v - q_v|."""
    return 0.5 * (p - q).abs().sum(-1)


def per_token(
    name: str, z_s: Tensor, z_t: Tensor, opts: DivergenceOptions
) -> tuple[Tensor, dict[str, Tensor]]:
    """(loss (R,), stats {STAT_NAMES: (R,)}) of divergence ``name`` on tempered logits (R, V).

    Differentiable wrt z_s by autograd (the head weights are constants, as in the paper); slow,
    several (R, V) temporaries. Gradients through -inf logits are not guarded here.
    """
    lp, lq = torch.log_softmax(z_t, -1), torch.log_softmax(z_s, -1)
    p, q = lp.exp(), lq.exp()
    fkl, rkl = kl(p, lp, lq), kl(q, lq, lp)
    with torch.no_grad():
        g_head, head_size = head_gap_by_sort(p, q, opts.mu)
        gap = (p - q).abs().sum(-1)
        w_head = head_weight(g_head, gap)
    losses = {
        "fkl": lambda: fkl,
        "rkl": lambda: rkl,
        "fkl_rkl": lambda: 0.5 * (fkl + rkl),
        "akl": lambda: akl(fkl, rkl, w_head),
        "akl_r": lambda: akl(fkl, rkl, w_head, swap=True),
        "skl": lambda: skl(p, lp, lq, opts.lam)[0],
        "srkl": lambda: srkl(q, lq, lp, opts.lam)[0],
        "tvd": lambda: tvd(p, q),
        "jsd": lambda: jsd(p, q, lp, lq, opts.beta)[0],
    }
    stats = {
        "fkl": fkl.detach(),
        "rkl": rkl.detach(),
        "g_head": g_head,
        "g_tail": (gap - g_head).clamp_min(0.0),
        "w_head": w_head,
        "head_size": head_size,
    }
    return losses[name](), stats
