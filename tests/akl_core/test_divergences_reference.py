"""A float64 reference for every divergence, written straight from the formulas in docs/method.md.

Sort-based, unchunked, plain autograd: slow and obviously right. The other test files compare
akl_core.divergences and akl_core.fused against ``reference``. The few tests here pin the
reference itself to hand-computed values so it cannot be wrong in the same way as the code.
"""

from __future__ import annotations

import math

import torch


def _kl(x, lx, ly):
    """sum x (log x - log y), 0 where x == 0 (inner wheres keep -inf out of the gradient)."""
    keep = x > 0
    lx, ly = torch.where(keep, lx, 0.0), torch.where(keep, ly, 0.0)
    return torch.where(keep, x * (lx - ly), 0.0).sum(-1)


def _log(m):
    return torch.log(torch.where(m > 0, m, 1.0)).masked_fill(m == 0, -math.inf)


def reference_terms(name, s, t, mu=0.5, temperature=1.0, lam=0.1, beta=0.5):
    """Per-token loss (N,) and AKL stats for (N, V) logits, in float64."""
    s, t = s.double() / temperature, t.double() / temperature
    lq, lp = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    q, p = lq.exp(), lp.exp()
    fkl = _kl(p, lp, lq)
    rkl = _kl(q, lq, lp)
    # head/tail split by sorting p (the authors' algorithm); boundary: c_i > mu is tail.
    p_sorted, order = torch.sort(p, dim=-1, descending=True, stable=True)
    cum = p_sorted.cumsum(-1)
    head_sorted = cum <= mu
    head_sorted[:, 0] = True
    gap_sorted = (p_sorted - q.gather(-1, order)).abs()
    g_head = (gap_sorted * head_sorted).sum(-1).detach()
    g_tail = (gap_sorted * ~head_sorted).sum(-1).detach()
    total = g_head + g_tail
    w_head = torch.where(total > 0, g_head / torch.where(total > 0, total, 1.0), 0.5)
    stats = {
        "fkl": fkl.detach(),
        "rkl": rkl.detach(),
        "g_head": g_head,
        "g_tail": g_tail,
        "w_head": w_head,
        "head_size": head_sorted.sum(-1).double(),
    }
    if name == "fkl":
        loss = fkl
    elif name == "rkl":
        loss = rkl
    elif name == "fkl_rkl":
        loss = 0.5 * fkl + 0.5 * rkl
    elif name == "akl":
        loss = w_head * fkl + (1 - w_head) * rkl
    elif name == "akl_r":
        loss = (1 - w_head) * fkl + w_head * rkl
    elif name == "skl":
        m = lam * p + (1 - lam) * q
        loss = _kl(p, lp, _log(m))
    elif name == "srkl":
        m = (1 - lam) * p + lam * q
        loss = _kl(q, lq, _log(m))
    elif name == "tvd":
        loss = 0.5 * (p - q).abs().sum(-1)
    elif name == "jsd":
        m = beta * p + (1 - beta) * q
        loss = beta * _kl(p, lp, _log(m)) + (1 - beta) * _kl(q, lq, _log(m))
    else:
        raise KeyError(name)
    return loss, stats


def reference(name, student_logits, teacher_logits, labels, ignore_index=-100, **options):
    """(mean loss, loss sum, num_tokens, stats means) over tokens whose label is kept; float64."""
    v = student_logits.shape[-1]
    s, t, y = student_logits.reshape(-1, v), teacher_logits.reshape(-1, v), labels.reshape(-1)
    keep = y != ignore_index
    loss, stats = reference_terms(name, s[keep], t[keep].detach(), **options)
    n = int(keep.sum())
    total = loss.sum()
    return total / max(n, 1), total, n, {k: float(x.sum()) / max(n, 1) for k, x in stats.items()}


def test_reference_pinned_values():
    # p = (0.7, 0.2, 0.1), q = (0.4, 0.4, 0.2): head = {0} (c_0 = 0.7 > mu but top-1 is head).
    p = torch.tensor([[0.7, 0.2, 0.1]], dtype=torch.float64)
    q = torch.tensor([[0.4, 0.4, 0.2]], dtype=torch.float64)
    s, t = q.log(), p.log()
    fkl = sum(a * math.log(a / b) for a, b in zip(p[0].tolist(), q[0].tolist(), strict=True))
    rkl = sum(b * math.log(b / a) for a, b in zip(p[0].tolist(), q[0].tolist(), strict=True))
    loss, st = reference_terms("akl", s, t)
    assert st["head_size"].item() == 1
    assert math.isclose(st["g_head"].item(), 0.3) and math.isclose(st["g_tail"].item(), 0.3)
    assert math.isclose(loss.item(), 0.5 * fkl + 0.5 * rkl)
    tvd, _ = reference_terms("tvd", s, t)
    assert math.isclose(tvd.item(), 0.3)
    # p = (0.3, 0.25, 0.25, 0.2): c = 0.3, 0.55 -> head = {0}; mu = 0.6 -> head = {0, 1}.
    p = torch.tensor([[0.3, 0.25, 0.2, 0.25]], dtype=torch.float64)
    _, st = reference_terms("akl", p.log(), p.log(), mu=0.5)
    assert st["head_size"].item() == 1 and st["w_head"].item() == 0.5
    _, st = reference_terms("akl", p.log(), p.log(), mu=0.6)
    assert st["head_size"].item() == 2
