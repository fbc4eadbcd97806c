"""Token-level distillation divergences: Adaptive KL (AKL) and the paper's baselines.

One entry point, ``compute(name, student_logits, teacher_logits, labels, **options)``. Every
divergence compares the teacher p = softmax(teacher / T) with the student q = softmax(student / T)
per token, over the tokens whose label is not ``ignore_index``. Definitions: ``shared/AKL.md``
(Wu et al., COLING 2025, arXiv 2404.02657).

How it is computed (the same for every name):
- The shared base owns masking, chunking over tokens, the fp32 upcast and normalisation; each
  divergence supplies only a per-token function of (log p, log q) that returns the per-token loss,
  the gradient with respect to the tempered student logits z = s / T, and its statistics.
- Gradients are computed analytically in the forward pass, one chunk at a time, and written into
  one buffer shaped like the student logits (what autograd has to hand back anyway), so peak
  memory is the logits, their gradient and one chunk of fp32 temporaries, never a few (N, V)
  fp32 tensors as with plain autograd. The teacher receives no gradient.
- AKL's head needs no full-vocabulary sort: the head is a prefix of the top-k of p; rows whose
  head does not end inside the top-k retry with a larger k, up to a full sort.
- Temperature: the loss is the divergence between the tempered distributions, without the
  T**2 factor of Hinton et al.; multiply by T**2 yourself to keep gradient scales across T.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
from torch import Tensor

NAMES = ("fkl", "rkl", "fkl_rkl", "akl", "akl_r", "skl", "srkl", "tvd", "jsd")
STAT_NAMES = ("fkl", "rkl", "g_head", "g_tail", "w_head", "head_size")

# Tokens (rows of V logits) per chunk when chunk_size is None: about this many fp32 elements.
_AUTO_CHUNK_ELEMENTS = {"cpu": 1 << 19, "cuda": 1 << 25}
_TOPK = 64  # first top-k tried for AKL's head; grows x16 per retry for rows it does not cover


@dataclass(frozen=True)
class DivergenceOutput:
    """Result of ``compute``.

    loss: differentiable scalar, ``loss_sum / max(num_tokens, 1)`` (mean over valid tokens).
    loss_sum: differentiable scalar, the sum over valid tokens; under gradient accumulation a
        trainer sums these and divides once by the global count of valid tokens.
    num_tokens: number of tokens whose label is not ``ignore_index``.
    stats: plain floats, means over valid tokens (empty when there are none).
    """

    loss: Tensor
    loss_sum: Tensor
    num_tokens: int
    stats: dict[str, float]


@dataclass(frozen=True)
class DivergenceOptions:
    """Options shared by every divergence; validated when built.

    mu: AKL's head mass (paper: 0.5), in (0, 1).
    temperature: T > 0; p and q are softmax(logits / T).
    ignore_index: label value of masked tokens.
    lam: skew of SKL / SRKL (DistiLLM: 0.1), in [0, 1).
    beta: mixture weight of the generalized JSD (TRL's GKD), in (0, 1).
    chunk_size: tokens per chunk; None picks one from the vocabulary size and device.
    all_stats: also compute fkl, rkl and AKL's head statistics for divergences that do not
        need them (for monitoring; costs about one more pass).
    """

    mu: float = 0.5
    temperature: float = 1.0
    ignore_index: int = -100
    lam: float = 0.1
    beta: float = 0.5
    chunk_size: int | None = None
    all_stats: bool = False

    def __post_init__(self) -> None:
        if not 0.0 < self.mu < 1.0:
            raise ValueError(f"mu must be in (0, 1), got {self.mu}")
        if not self.temperature > 0.0 or not math.isfinite(self.temperature):
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature}")
        if not 0.0 <= self.lam < 1.0:
            raise ValueError(f"lam must be in [0, 1), got {self.lam}")
        if not 0.0 < self.beta < 1.0:
            raise ValueError(f"beta must be in (0, 1) (beta 0 / 1 are fkl / rkl), got {self.beta}")
        if self.chunk_size is not None and (isinstance(self.chunk_size, bool) or self.chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive int or None, got {self.chunk_size}")

    @classmethod
    def build(cls, options: dict) -> DivergenceOptions:
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ValueError(f"unknown option(s) {unknown}; choose from {known}")
        return cls(**options)


def check_name(name: str) -> str:
    if name not in NAMES:
        raise ValueError(f"unknown divergence {name!r}; choose from {list(NAMES)}")
    return name


# --------------------------------------------------------------------------------------------
# Per-token functions. Each takes a _Rows (one chunk of valid tokens) and returns
# (loss (R,), grad wrt z = logits / T (R, V) or None, stats {name: (R,)}).
# --------------------------------------------------------------------------------------------


class _Rows:
    """One chunk of tokens: log p, log q (fp32, (R, V)) and the quantities derived from them."""

    def __init__(self, lp: Tensor, lq: Tensor, safe: bool):
        self.lp, self.lq, self.safe = lp, lq, safe
        self.p, self.q = lp.exp(), lq.exp()
        self._d: Tensor | None = None

    @property
    def d(self) -> Tensor:
        """log p - log q, with 0 where both are -inf (masked vocabulary entries)."""
        if self._d is None:
            d = self.lp - self.lq
            if self.safe:
                d = torch.nan_to_num_(d, nan=0.0, posinf=math.inf, neginf=-math.inf)
            self._d = d
        return self._d

    def fkl(self) -> Tensor:
        terms = self.p * self.d
        if self.safe:  # 0 * -inf where p == 0 < q must count 0
            terms = torch.where(self.p > 0, terms, 0.0)
        return terms.sum(-1)

    def rkl(self) -> Tensor:
        terms = self.q * self.d
        if self.safe:
            terms = torch.where(self.q > 0, terms, 0.0)
        return -terms.sum(-1)

    def abs_gap(self) -> Tensor:
        """sum_v |p_v - q_v| = g_head + g_tail."""
        return (self.p - self.q).abs_().sum(-1)


def _softmax_grad(q: Tensor, g: Tensor) -> Tensor:
    """Gradient wrt z of a loss whose gradient wrt q = softmax(z) is g: q * (g - <q, g>)."""
    g = torch.where(q > 0, g, 0.0)  # entries with q == 0 have no gradient (and may hold inf)
    return q * (g - (q * g).sum(-1, keepdim=True))


def _rkl_grad(rows: _Rows, rkl: Tensor) -> Tensor:
    # d/dz sum q (log q - log p) = q * (log q - log p - RKL)
    grad = rows.q * (rows.d + rkl[:, None]).neg_()
    if rows.safe:
        grad = torch.where(rows.q > 0, grad, 0.0)
    return grad


def head_gap(rows: _Rows, mu: float) -> tuple[Tensor, Tensor]:
    """(g_head, head_size) per row: sum of |p - q| over AKL's head, and the head's size.

    Head (AKL.md): sort p descending, cumulative c_i; token i is in the head when c_i <= mu;
    the top-1 token always is. It is a prefix of the top-k of p, so take a top-k and grow k
    only for rows whose boundary lies beyond it (c_{k-1} <= mu); k = V is the full sort.
    """
    n, v = rows.p.shape
    g_head = rows.p.new_zeros(n)
    size = rows.p.new_zeros(n)
    todo = torch.arange(n, device=rows.p.device)
    k = min(_TOPK, v)
    while todo.numel() > 0:
        lp, lq = (rows.lp, rows.lq) if todo.numel() == n else (rows.lp[todo], rows.lq[todo])
        top_lp, idx = lp.topk(k, dim=-1)  # (R, k), sorted descending
        p_top, q_top = top_lp.exp(), lq.gather(-1, idx).exp()
        cum = p_top.cumsum(-1)
        head = cum <= mu
        head[:, 0] = True
        done = cum[:, -1] > mu if k < v else torch.ones_like(head[:, 0])
        gap = torch.where(head, (p_top - q_top).abs(), 0.0).sum(-1)
        g_head[todo[done]] = gap[done]
        size[todo[done]] = head[done].sum(-1).to(size.dtype)
        todo = todo[~done]
        k = min(k * 16, v)
    return g_head, size


def _akl_parts(rows: _Rows, mu: float, need_grad: bool, swap: bool):
    fkl, rkl = rows.fkl(), rows.rkl()
    g_head, size = head_gap(rows, mu)
    g_tail = (rows.abs_gap() - g_head).clamp_min_(0.0)
    total = g_head + g_tail
    # p == q gives 0 / 0 in the authors' code; take 0.5 / 0.5 (the loss is 0 there anyway).
    w_head = torch.where(total > 0, g_head / total.clamp_min(torch.finfo(total.dtype).tiny), 0.5)
    w_f = 1.0 - w_head if swap else w_head  # AKL-r swaps the weights
    w_r = 1.0 - w_f
    loss = w_f * fkl + w_r * rkl
    stats = {"fkl": fkl, "rkl": rkl, "g_head": g_head, "g_tail": g_tail, "w_head": w_head, "head_size": size}
    grad = None
    if need_grad:  # weights are constants: w_f (q - p) + w_r q (log q - log p - RKL)
        grad = _rkl_grad(rows, rkl).mul_(w_r[:, None])
        grad.add_((rows.q - rows.p).mul_(w_f[:, None]))
    return loss, grad, stats


def _fkl(rows: _Rows, opts: DivergenceOptions, need_grad: bool):
    fkl = rows.fkl()
    return fkl, (rows.q - rows.p if need_grad else None), {"fkl": fkl}


def _rkl(rows: _Rows, opts: DivergenceOptions, need_grad: bool):
    rkl = rows.rkl()
    return rkl, (_rkl_grad(rows, rkl) if need_grad else None), {"rkl": rkl}


def _fkl_rkl(rows: _Rows, opts: DivergenceOptions, need_grad: bool):
    fkl, rkl = rows.fkl(), rows.rkl()
    grad = None
    if need_grad:
        grad = _rkl_grad(rows, rkl).add_(rows.q - rows.p).mul_(0.5)
    return 0.5 * (fkl + rkl), grad, {"fkl": fkl, "rkl": rkl}


def _akl(rows: _Rows, opts: DivergenceOptions, need_grad: bool):
    return _akl_parts(rows, opts.mu, need_grad, swap=False)


def _akl_r(rows: _Rows, opts: DivergenceOptions, need_grad: bool):
    return _akl_parts(rows, opts.mu, need_grad, swap=True)


def _log_mix(lp: Tensor, lq: Tensor, a: float) -> Tensor:
    """log(a p + (1 - a) q), stable when both underflow; -inf only where both are -inf."""
    if a == 0.0:
        return lq
    return torch.logaddexp(lp + math.log(a), lq + math.log1p(-a))


def _kl_terms(x: Tensor, lx: Tensor, ly: Tensor) -> Tensor:
    """x (log x - log y) per entry, 0 where x == 0 (y > 0 wherever x > 0 here)."""
    return torch.where(x > 0, x * (lx - ly), 0.0)


def _skl(rows: _Rows, opts: DivergenceOptions, need_grad: bool):
    # SKL = KL(p || lam p + (1 - lam) q) (DistiLLM)
    lm = _log_mix(rows.lp, rows.lq, opts.lam)
    loss = _kl_terms(rows.p, rows.lp, lm).sum(-1)
    grad = None
    if need_grad:  # dL/dq = -(1 - lam) p / m
        ratio = torch.where(rows.p > 0, (rows.lp - lm).exp(), 0.0)
        grad = _softmax_grad(rows.q, ratio.mul_(-(1.0 - opts.lam)))
    return loss, grad, {}


def _srkl(rows: _Rows, opts: DivergenceOptions, need_grad: bool):
    # SRKL = KL(q || (1 - lam) p + lam q) (DistiLLM)
    lm = _log_mix(rows.lq, rows.lp, opts.lam)
    loss = _kl_terms(rows.q, rows.lq, lm).sum(-1)
    grad = None
    if need_grad:  # dL/dq = log q - log m + 1 - lam q / m (the constant 1 cancels)
        g = rows.lq - lm
        if opts.lam > 0:
            g = g - opts.lam * (rows.lq - lm).exp()
        grad = _softmax_grad(rows.q, g)
    return loss, grad, {}


def _tvd(rows: _Rows, opts: DivergenceOptions, need_grad: bool):
    diff = rows.q - rows.p
    loss = 0.5 * diff.abs().sum(-1)
    grad = _softmax_grad(rows.q, 0.5 * diff.sign()) if need_grad else None
    return loss, grad, {}


def _jsd(rows: _Rows, opts: DivergenceOptions, need_grad: bool):
    # Generalized JSD (TRL's GKD): m = beta p + (1 - beta) q; beta KL(p||m) + (1 - beta) KL(q||m)
    b = opts.beta
    lm = _log_mix(rows.lp, rows.lq, b)
    loss = b * _kl_terms(rows.p, rows.lp, lm).sum(-1) + (1 - b) * _kl_terms(rows.q, rows.lq, lm).sum(-1)
    grad = None
    if need_grad:  # dL/dq = (1 - beta) (log q - log m) + const
        grad = _softmax_grad(rows.q, (rows.lq - lm).mul_(1 - b))
    return loss, grad, {}


PerToken = Callable[[_Rows, DivergenceOptions, bool], tuple[Tensor, "Tensor | None", dict[str, Tensor]]]
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
# The shared base: one chunk of logits -> loss sum, gradient wrt the student logits, stats.
# --------------------------------------------------------------------------------------------


def chunk_rows(opts: DivergenceOptions, vocab: int, device: torch.device) -> int:
    if opts.chunk_size is not None:
        return opts.chunk_size
    elements = _AUTO_CHUNK_ELEMENTS.get(device.type, _AUTO_CHUNK_ELEMENTS["cuda"])
    return max(1, elements // max(vocab, 1))


def divergence_chunk(
    name: str, student: Tensor, teacher: Tensor, opts: DivergenceOptions, need_grad: bool
) -> tuple[Tensor, Tensor | None, dict[str, Tensor]]:
    """Per-token loss (R,), grad wrt the student logits (R, V) fp32 or None, and stats sums.

    student, teacher: (R, V) logits of valid tokens in any float dtype (computed in fp32).
    """
    t = opts.temperature
    z_s, z_t = student.float(), teacher.float()
    if t != 1.0:
        z_s, z_t = z_s / t, z_t / t
    # -inf logits (masked vocabulary) need the guarded formulas; plain ones skip them.
    safe = bool((z_s.amin() == -math.inf) | (z_t.amin() == -math.inf))
    rows = _Rows(torch.log_softmax(z_t, -1), torch.log_softmax(z_s, -1), safe)
    del z_s, z_t
    loss, grad, stats = _PER_TOKEN[name](rows, opts, need_grad)
    if opts.all_stats:
        stats = dict(stats)
        for key in ("fkl", "rkl"):
            if key not in stats:
                stats[key] = getattr(rows, key)()
        if "g_head" not in stats:
            g_head, size = head_gap(rows, opts.mu)
            g_tail = (rows.abs_gap() - g_head).clamp_min_(0.0)
            total = g_head + g_tail
            stats["g_head"], stats["g_tail"], stats["head_size"] = g_head, g_tail, size
            stats["w_head"] = torch.where(total > 0, g_head / total.clamp_min(1e-38), 0.5)
    if grad is not None and t != 1.0:
        grad.div_(t)
    return loss, grad, {k: v.sum() for k, v in stats.items()}


def flatten(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Check shapes; return (N, V), (N, V), (N,) views."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student and teacher logits must have the same shape, got {tuple(student_logits.shape)} "
            f"and {tuple(teacher_logits.shape)} (cut a padded vocabulary to the shared size first)"
        )
    if student_logits.dim() not in (2, 3) or labels.shape != student_logits.shape[:-1]:
        raise ValueError(
            f"expected logits (B, T, V) or (N, V) and labels (B, T) or (N,), got "
            f"{tuple(student_logits.shape)} and {tuple(labels.shape)}"
        )
    if not student_logits.is_floating_point() or not teacher_logits.is_floating_point():
        raise ValueError("logits must be floating point")
    v = student_logits.shape[-1]
    return student_logits.reshape(-1, v), teacher_logits.reshape(-1, v), labels.reshape(-1)


def chunk_selectors(valid: Tensor, rows: int) -> list[Tensor | slice]:
    """Row selectors over the valid tokens: slices when every token is valid (no copies)."""
    n = valid.numel()
    if bool(valid.all()):
        return [slice(i, min(i + rows, n)) for i in range(0, n, rows)]
    idx = valid.nonzero().squeeze(1)
    return list(idx.split(rows)) if idx.numel() > 0 else []


def _forward(
    name: str, s: Tensor, t: Tensor, labels: Tensor, opts: DivergenceOptions, need_grad: bool
) -> tuple[Tensor, Tensor | None, int, dict[str, Tensor]]:
    valid = labels != opts.ignore_index
    grad = None
    if need_grad:
        grad = torch.empty_like(s) if bool(valid.all()) else torch.zeros_like(s)
    loss_sum = s.new_zeros((), dtype=torch.float32)
    stats: dict[str, Tensor] = {}
    for sel in chunk_selectors(valid, chunk_rows(opts, s.shape[-1], s.device)):
        loss, g, st = divergence_chunk(name, s[sel], t[sel], opts, need_grad)
        loss_sum += loss.sum()
        for k, v in st.items():
            stats[k] = stats[k] + v if k in stats else v
        if grad is not None:
            if isinstance(sel, slice):
                grad[sel] = g
            else:
                grad.index_copy_(0, sel, g.to(grad.dtype))
    return loss_sum, grad, int(valid.sum()), stats


class _ChunkedDivergence(torch.autograd.Function):
    """loss_sum of one divergence; the gradient wrt the student logits is made in forward."""

    @staticmethod
    def forward(ctx, s, t, labels, name, opts, extras):
        loss_sum, grad, n, stats = _forward(name, s, t, labels, opts, need_grad=True)
        ctx.save_for_backward(grad)
        extras["num_tokens"], extras["stats"] = n, stats
        return loss_sum

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return grad * grad_output.to(grad.dtype), None, None, None, None, None


def finish(loss_sum: Tensor, n: int, stats: dict[str, Tensor]) -> DivergenceOutput:
    denom = max(n, 1)
    out_stats = {k: float(v) / denom for k, v in stats.items()} if n > 0 else {}
    return DivergenceOutput(loss=loss_sum / denom, loss_sum=loss_sum, num_tokens=n, stats=out_stats)


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
    if torch.is_grad_enabled() and s.requires_grad:
        extras: dict = {}
        loss_sum = _ChunkedDivergence.apply(s, t, labels, name, opts, extras)
        return finish(loss_sum, extras["num_tokens"], extras["stats"])
    loss_sum, _, n, stats = _forward(name, s, t, labels, opts, need_grad=False)
    return finish(loss_sum, n, stats)
