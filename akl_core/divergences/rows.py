"""Per-row math: one chunk of tokens -> per-token loss, gradient wrt the tempered student logits,
statistics.

Each divergence here is the same as its definition in definitions.py, computed in fewer passes
over (R, V) and with its gradient in closed form, written into ``out``. The fast formulas skip
the guards that -inf logits (masked vocabulary) need; ``safe=True`` adds them (chunked.py
redoes a chunk with them when a result holds a NaN).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from akl_core.divergences import definitions
from akl_core.divergences.head import block_max, head_gap, head_tokens, n_blocks, row_sums_at, take
from akl_core.divergences.options import DivergenceOptions

if TYPE_CHECKING:
    from akl_core.divergences.chunked import Workspace


def tempered(x: Tensor, t: float, ws: Workspace, key: str) -> Tensor:
    """x / t in fp32 (into ``ws`` buffer ``key``); x itself when it already is fp32 and t == 1."""
    if t == 1.0:
        return x if x.dtype == torch.float32 else ws.get(key, x.shape[0]).copy_(x)
    return torch.div(x, t, out=ws.get(key, x.shape[0]))


class Rows:
    """One chunk of tokens from tempered fp32 logits z_s, z_t (R, V).

    p, q: softmax; lse_t, lse_s: log-sum-exp (R,); c = lse_s - lse_t, so that
    d = log p - log q = (z_t - z_s) + c. The fast formulas work on delta = z_t - z_s and fold c
    in per row (sums of x * d for x in {p, q} are x . delta + c * sum(x)); d itself is built in
    place from delta only when a divergence needs it (``d``; 0 where both are -inf in safe
    mode). log p and log q are built only for the divergences that need them.
    bmax: the teacher's block maxima (R, ceil(V / _BLOCK)) when asked for (AKL's head search;
    see ``head.block_max``).
    """

    t = 1.0  # z_t is tempered already (``GroupRows`` keeps the untempered logits and T)

    def __init__(
        self,
        z_s: Tensor,
        z_t: Tensor,
        safe: bool,
        ws: Workspace,
        blocks: bool = False,
    ):
        r = z_s.shape[0]
        self.z_s, self.z_t, self.safe, self.ws = z_s, z_t, safe, ws
        self.p = torch.softmax(z_t, -1, out=ws.get("p", r))
        self.q = torch.softmax(z_s, -1, out=ws.get("q", r))
        # max(p) = exp(max(z) - lse): the log-normalisers from two cheap reductions, no log_softmax
        self.p_max = self.p.amax(-1)
        self.bmax = block_max(z_t) if blocks else None
        z_t_max = self.bmax.amax(-1) if self.bmax is not None else z_t.amax(-1)
        self.lse_t = z_t_max - self.p_max.log()
        self.lse_s = z_s.amax(-1) - self.q.amax(-1).log()
        self.c = self.lse_s - self.lse_t
        self._delta: Tensor | None = torch.sub(z_t, z_s, out=ws.get("d", r))
        self._d: Tensor | None = None
        self._qp: Tensor | None = None

    @property
    def d(self) -> Tensor:
        """log p - log q, built in place of delta (which is gone afterwards)."""
        if self._d is None:
            assert self._delta is not None
            d = self._delta.add_(self.c[:, None])
            if self.safe:
                d.nan_to_num_(nan=0.0, posinf=math.inf, neginf=-math.inf)
            self._d, self._delta = d, None
        return self._d

    @property
    def delta(self) -> Tensor:
        """z_t - z_s (before ``d`` is built)."""
        assert self._delta is not None, "delta is gone once d is built"
        return self._delta

    @property
    def lp(self) -> Tensor:
        return self.z_t - self.lse_t[:, None]

    @property
    def lq(self) -> Tensor:
        return self.z_s - self.lse_s[:, None]

    def z_take(self, flat: Tensor) -> Tensor:
        """The tempered teacher logits at the flat indices ``flat``."""
        return take(self.z_t, flat)

    def buf(self, key: str) -> Tensor:
        return self.ws.get(key, self.p.shape[0])

    def dot_d(self, x: Tensor) -> Tensor:
        """Row sums of x * d for x in {p, q}; 0 * -inf counts 0 in safe mode."""
        if self._d is None and not self.safe:  # x . delta + c sum(x): no pass to build d
            return torch.mul(x, self.delta, out=self.buf("xd")).sum(-1) + self.c * x.sum(-1)
        terms = torch.mul(x, self.d, out=self.buf("xd"))
        if self.safe:
            terms.nan_to_num_(nan=0.0, posinf=math.inf, neginf=-math.inf)
        return terms.sum(-1)

    def fkl(self) -> Tensor:
        return self.dot_d(self.p)

    def q_times_d(self, out: Tensor | None) -> Tensor:
        """q * d (into out); -sum of it is RKL. 0 where q == 0."""
        qd = torch.mul(self.q, self.d, out=self.buf("qd") if out is None else out)
        if self.safe:
            qd.nan_to_num_(nan=0.0, posinf=math.inf, neginf=-math.inf)
        return qd

    def rkl(self) -> Tensor:
        return -self.dot_d(self.q)

    def l1(self, x: Tensor) -> Tensor:
        """Row sums of |x| (vector_norm(ord=1) measured 5x slower on CPU)."""
        return torch.abs(x, out=self.buf("abs")).sum(-1)

    def q_minus_p(self, out: Tensor | None = None) -> Tensor:
        """q - p (into out, else the "qp" buffer), the FKL gradient; its row L1 norm is
        g_head + g_tail. Kept as ``qp``."""
        self._qp = torch.sub(self.q, self.p, out=self.buf("qp") if out is None else out)
        return self._qp

    @property
    def qp(self) -> Tensor:
        """q - p, built once (``q_minus_p``)."""
        return self._qp if self._qp is not None else self.q_minus_p()

    def gap(self) -> Tensor:
        """Row sums of |p - q| = g_head + g_tail (AKL's head search then reads ``qp``)."""
        return self.l1(self.qp)


def _softmax_grad(q: Tensor, g: Tensor, out: Tensor) -> None:
    """Gradient wrt z of a loss whose gradient wrt q = softmax(z) is g: q * (g - <q, g>)."""
    g = torch.where(q > 0, g, 0.0)  # entries with q == 0 have no gradient (and may hold inf)
    torch.mul(q, g - (q * g).sum(-1, keepdim=True), out=out)


def _finish_mixed_grad(rows: Rows, qd: Tensor, rkl: Tensor, w_f, w_r, qp: Tensor) -> None:
    """Turn qd = q * d (the grad buffer) into w_f (q - p) - w_r (q d + q RKL), in place.

    That is w_f * grad FKL + w_r * grad RKL; weights are floats or (R,) constants.
    """
    qd.addcmul_(rows.q, rkl[:, None])
    if isinstance(w_r, Tensor):
        qd.mul_(w_r.neg()[:, None]).addcmul_(qp, w_f[:, None])
    else:
        qd.mul_(-w_r).add_(qp, alpha=w_f)


# --------------------------------------------------------------------------------------------
# Per-token functions. Each takes a Rows (one chunk of valid tokens), the options and ``out``
# ((R, V) fp32 or None), writes the gradient wrt z = logits / T into ``out`` when given, and
# returns (loss (R,), stats {name: (R,)}).
# --------------------------------------------------------------------------------------------


def _akl_parts(rows: Rows, mu: float, out: Tensor | None, swap: bool):
    if rows.safe:
        return _akl_parts_safe(rows, mu, out, swap)
    fkl, rkl = rows.fkl(), rows.rkl()  # from delta, before anything builds d
    gap = rows.gap()
    g_head, size = head_gap(rows, mu)
    w_f, w_r, stats = _akl_weights(fkl, rkl, gap, g_head, size, swap)
    if out is not None:  # weights are constants:
        # w_f (q - p) - w_r q (d + rkl) = q (a - w_r delta) - w_f p, a = w_f - w_r (rkl + c)
        # in place on delta (cache-resident), one write into out
        a = w_f - w_r * (rkl + rows.c)
        x = rows.delta.mul_(w_r.neg()[:, None]).add_(a[:, None]).mul_(rows.q)
        torch.addcmul(x, rows.p, w_f.neg()[:, None], out=out)
    return w_f * fkl + w_r * rkl, stats


def _akl_weights(fkl, rkl, gap, g_head, size, swap: bool):
    """(w_f, w_r, stats): the weights of FKL and RKL (definitions.akl), constants per row."""
    stats = {"fkl": fkl, "rkl": rkl, **_head_stats(gap, g_head, size)}
    w_head = stats["w_head"]
    w_f = 1.0 - w_head if swap else w_head  # AKL-r swaps the weights
    w_r = 1.0 - w_f
    return w_f, w_r, stats


def _w_head(g_head: Tensor, gap: Tensor, out: Tensor | None = None) -> Tensor:
    """``definitions.head_weight`` (into ``out`` when given) in two ops: g_head / gap, and 0.5
    where gap == 0 (then g_head == 0 too: 0 / 0 is the only NaN). For a subnormal gap
    (< 1.2e-38, a loss of ~0) it is the plain ratio, where head_weight divides by the clamped
    gap."""
    return torch.div(g_head, gap, out=out).nan_to_num_(nan=0.5)


def _head_stats(gap: Tensor, g_head: Tensor, size: Tensor) -> dict[str, Tensor]:
    """g_head, g_tail, w_head, head_size from gap = sum |p - q| = g_head + g_tail."""
    g_tail = (gap - g_head).clamp_min_(0.0)
    return {"g_head": g_head, "g_tail": g_tail, "w_head": _w_head(g_head, gap), "head_size": size}


def _akl_parts_safe(rows: Rows, mu: float, out: Tensor | None, swap: bool):
    """AKL with the guards -inf logits need (d built, 0 * inf counted 0)."""
    qd = rows.q_times_d(out)
    rkl = -qd.sum(-1)
    fkl = rows.fkl()
    gap = rows.gap()
    g_head, size = head_gap(rows, mu)
    w_f, w_r, stats = _akl_weights(fkl, rkl, gap, g_head, size, swap)
    if out is not None:
        _finish_mixed_grad(rows, qd, rkl, w_f, w_r, rows.qp)
    return w_f * fkl + w_r * rkl, stats


class GroupRows:
    """What AKL's head search (``head.head_tokens``) reads of a group of chunks, from the teacher
    alone (``_teacher_pass``): per row max(p), the log-normaliser and the block maxima (the
    fields of a ``Rows`` it reads), p itself (kept for the chunk pass), and the teacher's logits
    z_t untempered, with T: the few tokens the search looks at are tempered as they are
    gathered."""

    def __init__(self, z_t: Tensor, t: float, p: Tensor, p_max: Tensor, lse_t: Tensor, bmax: Tensor, ws):
        self.z_t, self.t, self.p = z_t, t, p
        self.p_max, self.lse_t, self.bmax, self.ws = p_max, lse_t, bmax, ws

    def z_take(self, flat: Tensor) -> Tensor:
        """Gathered logits / T in fp32: the values ``tempered`` gives the chunks."""
        z = take(self.z_t, flat)
        return (z if self.t == 1.0 else z / self.t).float()


def _teacher_pass(teacher: Tensor, t: float, sub_rows: int, ws: Workspace, inner: Workspace):
    """Per row of a group: (lse_t, max p, block maxima, p) of the tempered teacher logits, a
    chunk of ``sub_rows`` rows at a time (the head search's inputs, before any student value;
    p, (G, V), is kept for the chunk pass).

    lse_t = max - log(max p) from a softmax, as ``Rows`` takes it: torch's softmax measured
    1.5x faster than ``exp`` alone on CPU (its exponential is a faster vectorised one), and the
    chunk pass takes p from the same softmax, so both see the same normaliser.
    """
    g, v = teacher.shape
    bmax = ws.get("bmax", g, tail=(n_blocks(v),))
    lse_t, p_max = bmax.new_empty((2, g)).unbind(0)
    p_all = ws.get("p_t", g)
    for a in range(0, g, sub_rows):
        b = min(a + sub_rows, g)
        z = tempered(teacher[a:b], t, inner, "z_t")
        m = block_max(z, out=bmax[a:b]).amax(-1)
        p = torch.softmax(z, -1, out=p_all[a:b])
        torch.amax(p, -1, out=p_max[a:b])
        torch.sub(m, p_max[a:b].log(), out=lse_t[a:b])
    return lse_t, p_max, bmax, p_all


def akl_group(
    student: Tensor,
    teacher: Tensor,
    mu: float,
    swap: bool,
    ws: Workspace,
    out: Tensor | None,
    sub_rows: int,
    t: float = 1.0,
) -> tuple[Tensor, dict[str, Tensor]] | None:
    """AKL (AKL-r: swap) over a group of G rows of logits at temperature t, the same as
    ``_akl_parts`` on the tempered rows, with the element-wise passes in chunks of ``sub_rows`` rows
    and one head search for the group.

    On CPU a chunk's (rows, V) buffers stay in cache only when it is small (a few rows at V =
    49152), while the head search is a few dozen small ops whatever its rows, so it pays per
    group. The head depends on the teacher alone, so it comes first:

    1. the teacher pass (``_teacher_pass``): per chunk, the block maxima, p (a softmax, into a
       (G, V) buffer kept for step 3), max p and lse_t;
    2. the head search of the group (``head.head_tokens``): its head tokens, by flat index;
    3. the chunk pass: per chunk, q (a softmax), delta = z_t - z_s (log p - log q = delta + c,
       c = lse_s - lse_t per row), the FKL, RKL and |p - q| sums, g_head (a gather of |p - q| at
       the chunk's head tokens), the weights, and the gradient
       (w_f (q - p) - w_r q (d + rkl)) / t written once into ``out``, wrt the untempered logits.

    Softmaxes, not exponentials: torch's CPU softmax measured 1.5x faster than ``exp`` alone on
    the same rows (real logits, V = 49152), so p and q each cost one softmax and no log-softmax.
    Returns (loss (G,), stats {name: (G,)}), or None when
    the teacher's normaliser or a chunk's sums hold a NaN or an inf (-inf logits: redo the group
    with the guarded formulas; ``out`` is then rewritten whole).
    """
    g, v = student.shape
    inner = ws.sub(sub_rows)
    # the teacher pass keeps 1 (rows, V) buffer live, not ~7: chunks of half the rows (measured
    # ~15 % faster on an Intel CPU with a 2 MiB L2; the same on an AMD EPYC with 1 MiB)
    lse_t, p_max, bmax, p_all = _teacher_pass(teacher, t, max(1, sub_rows // 2), ws, inner)
    if not bool(lse_t.isfinite().all()):
        return None
    heads = head_tokens(GroupRows(teacher, t, p_all, p_max, lse_t, bmax, ws), mu)
    size = heads.size
    starts = list(range(0, g, sub_rows))
    chunk_heads = heads.by_chunks(v, [*starts, g])
    parts = lse_t.new_empty((9, g))
    # in the loop: what the gradient needs; the loss and g_tail for the group after it (per-row
    # ops on a chunk's few rows cost their dispatch, not their arithmetic)
    fkl, rkl, gap, g_head, w_head, c, sum_p, loss, g_tail = parts.unbind(0)
    inv_t = 1.0 / t
    for a, (head_flat, head_row) in zip(starts, chunk_heads, strict=True):
        b = min(a + sub_rows, g)
        r = b - a
        z_s = tempered(student[a:b], t, inner, "z_s")
        # softmaxes, not exp of log-softmaxes: torch's softmax measured 1.5x faster than exp
        # alone on CPU; log q - log p folds into delta = z_t - z_s and c per row (``Rows``)
        q = torch.softmax(z_s, -1, out=inner.get("q", r))
        p = p_all[a:b]
        c_ = torch.sub(z_s.amax(-1), q.amax(-1).log_(), out=c[a:b]).sub_(lse_t[a:b])  # lse_s - lse_t
        # t delta = teacher - t z_s (delta = z_t - z_s, the 1 / t folded into the sums);
        # d = log p - log q = delta + c
        delta = torch.sub(teacher[a:b], z_s, alpha=t, out=inner.get("d", r))
        x = inner.get("x", r)
        torch.sum(torch.mul(p, delta, out=x), -1, out=fkl[a:b])  # t (p . delta), finished below
        torch.sum(p, -1, out=sum_p[a:b])
        qd = torch.mul(q, delta, out=x)  # t q delta, kept for the gradient
        rkl_ = torch.sum(qd, -1, out=rkl[a:b])
        if t != 1.0:
            rkl_.mul_(inv_t)
        rkl_.addcmul_(c_, q.sum(-1)).neg_()
        qp = torch.sub(q, p, out=inner.get("qp", r))
        g_head[a:b] = row_sums_at(qp, head_flat, head_row)  # |q - p| at the chunk's head tokens
        gap_ = torch.sum(torch.abs(qp, out=inner.get("abs", r)), -1, out=gap[a:b])
        w_f = _w_head(g_head[a:b], gap_, w_head[a:b])
        if swap:  # AKL-r swaps the weights
            w_f = 1.0 - w_f
        if out is not None:
            # (w_f (q - p) - w_r q (delta + c + rkl)) / t, in three passes over the chunk
            w_r = 1.0 - w_f
            o = torch.mul(qp, (w_f if t == 1.0 else w_f * inv_t)[:, None], out=out[a:b])
            o.addcmul_(qd, w_r[:, None], value=-(inv_t * inv_t))
            o.addcmul_(q, (rkl_ + c_).mul_(w_r)[:, None], value=-inv_t)
    if t != 1.0:
        fkl.mul_(inv_t)
    fkl.addcmul_(c, sum_p)
    w_f = 1.0 - w_head if swap else w_head
    torch.add(w_f * fkl, (1.0 - w_f) * rkl, out=loss)
    torch.sub(gap, g_head, out=g_tail).clamp_min_(0.0)
    if not bool(parts[:4].isfinite().all()) or not bool(loss.isfinite().all()):
        return None
    return loss, {
        "fkl": fkl,
        "rkl": rkl,
        "g_head": g_head,
        "g_tail": g_tail,
        "w_head": w_head,
        "head_size": size,
    }


def _fkl(rows: Rows, opts: DivergenceOptions, out: Tensor | None):
    fkl = rows.fkl()
    if out is not None:
        rows.q_minus_p(out)
    return fkl, {"fkl": fkl}


def _rkl(rows: Rows, opts: DivergenceOptions, out: Tensor | None):
    qd = rows.q_times_d(out)
    rkl = -qd.sum(-1)
    if out is not None:  # q (log q - log p - RKL) = -(q d + q RKL)
        qd.addcmul_(rows.q, rkl[:, None]).neg_()
    return rkl, {"rkl": rkl}


def _fkl_rkl(rows: Rows, opts: DivergenceOptions, out: Tensor | None):
    qd = rows.q_times_d(out)
    rkl = -qd.sum(-1)
    fkl = rows.fkl()
    if out is not None:
        _finish_mixed_grad(rows, qd, rkl, 0.5, 0.5, rows.q_minus_p())
    return 0.5 * (fkl + rkl), {"fkl": fkl, "rkl": rkl}


def _akl(rows: Rows, opts: DivergenceOptions, out: Tensor | None):
    return _akl_parts(rows, opts.mu, out, swap=False)


def _akl_r(rows: Rows, opts: DivergenceOptions, out: Tensor | None):
    return _akl_parts(rows, opts.mu, out, swap=True)


# The rarely used losses keep closed-form gradients too: autograd through definitions.py (per
# chunk, then torch.autograd.grad) measured slower, fwd + bwd at N = 1024, V = 32000, 1 thread
# (issue 11): skl 1.91x, srkl 2.21x, tvd 1.71x, jsd 2.60x the closed forms.


def _skl(rows: Rows, opts: DivergenceOptions, out: Tensor | None):
    lp = rows.lp
    loss, lm = definitions.skl(rows.p, lp, rows.lq, opts.lam)
    if out is not None:  # dL/dq = -(1 - lam) p / m
        ratio = torch.where(rows.p > 0, (lp - lm).exp(), 0.0)
        _softmax_grad(rows.q, ratio.mul_(-(1.0 - opts.lam)), out)
    return loss, {}


def _srkl(rows: Rows, opts: DivergenceOptions, out: Tensor | None):
    lq = rows.lq
    loss, lm = definitions.srkl(rows.q, lq, rows.lp, opts.lam)
    if out is not None:  # dL/dq = log q - log m + 1 - lam q / m (the constant 1 cancels)
        g = lq - lm
        if opts.lam > 0:
            g = g - opts.lam * (lq - lm).exp()
        _softmax_grad(rows.q, g, out)
    return loss, {}


def _tvd(rows: Rows, opts: DivergenceOptions, out: Tensor | None):
    diff = rows.q_minus_p()
    loss = 0.5 * rows.l1(diff)  # definitions.tvd, in reused buffers
    if out is not None:
        _softmax_grad(rows.q, 0.5 * diff.sign(), out)
    return loss, {}


def _jsd(rows: Rows, opts: DivergenceOptions, out: Tensor | None):
    b = opts.beta
    lq = rows.lq
    loss, lm = definitions.jsd(rows.p, rows.q, rows.lp, lq, b)
    if out is not None:  # dL/dq = (1 - beta) (log q - log m) + const
        _softmax_grad(rows.q, (lq - lm).mul_(1 - b), out)
    return loss, {}


PerToken = Callable[[Rows, DivergenceOptions, "Tensor | None"], tuple[Tensor, dict[str, Tensor]]]
PER_TOKEN: dict[str, PerToken] = {
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


def needs_head(name: str | None, opts: DivergenceOptions) -> bool:
    """Whether the divergence (or the options' all_stats) needs AKL's head search."""
    return name in ("akl", "akl_r") or opts.all_stats


def per_token(
    name: str,
    z_s: Tensor,
    z_t: Tensor,
    opts: DivergenceOptions,
    ws: Workspace,
    out: Tensor | None,
    safe: bool,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token loss (R,) and stats {name: (R,)} of ``name`` on tempered fp32 logits (R, V);
    the gradient wrt z_s into ``out`` when given. ``definitions.per_token``, faster."""
    rows = Rows(z_s, z_t, safe, ws, blocks=needs_head(name, opts))
    loss, stats = PER_TOKEN[name](rows, opts, out)
    if opts.all_stats:
        stats = dict(stats)
        if "fkl" not in stats:
            stats["fkl"] = rows.fkl()
        if "rkl" not in stats:
            stats["rkl"] = rows.rkl()
        if "g_head" not in stats:
            stats.update(_head_stats(rows.gap(), *head_gap(rows, opts.mu)))
    return loss, stats
