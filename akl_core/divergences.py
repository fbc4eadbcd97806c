"""Token-level distillation divergences: Adaptive KL (AKL) and the paper's baselines.

One entry point, ``compute(name, student_logits, teacher_logits, labels, **options)``. Every
divergence compares the teacher p = softmax(teacher / T) with the student q = softmax(student / T)
per token, over the tokens whose label is not ``ignore_index``. Definitions: ``shared/AKL.md``
(Wu et al., COLING 2025, arXiv 2404.02657).

How it is computed (the same for every name):
- The shared base owns masking, chunking over tokens, the fp32 upcast and normalisation; each
  divergence supplies only a per-token function of p, q and d = log p - log q that returns the
  per-token loss, the gradient with respect to the tempered student logits z = s / T, and its
  statistics.
- Gradients are computed analytically in the forward pass, one chunk at a time, and written into
  one buffer shaped like the student logits (what autograd has to hand back anyway); backward
  scales that buffer in place and returns it. Peak memory is the logits, their gradient and one
  chunk of fp32 temporaries (reused across chunks), never a few (N, V) fp32 tensors as with
  plain autograd. The teacher receives no gradient; the graph can be backpropagated once.
- The fast formulas skip the guards that -inf logits (masked vocabulary) need; a chunk whose
  result holds a NaN is recomputed with the guarded ones.
- AKL's head needs no full-vocabulary sort: it is a prefix of the sorted p, found among the
  tokens of the few vocabulary blocks with the largest logits (see ``head_gap``) or, for a large
  vocabulary, among the tokens above a threshold found from the block maxima (only those sorted),
  and then a full sort for the rows those do not settle.
- Temperature: the loss is the divergence between the tempered distributions, without the
  T**2 factor of Hinton et al.; multiply by T**2 yourself to keep gradient scales across T.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from akl_core.contract import STEP_STATS as STAT_NAMES  # noqa: F401 - kernels/dispatch.py imports it here

NAMES = ("fkl", "rkl", "fkl_rkl", "akl", "akl_r", "skl", "srkl", "tvd", "jsd")

# Tokens (rows of V logits) per chunk when chunk_size is None: about this many fp32 elements.
# On CPU a chunk's few (rows, V) buffers then stay in the L2/L3 caches: 16 rows at V = 32000
# ran FKL 1.3x faster than 64 rows (bench/divergences.py); smaller chunks pay more per-op overhead.
_AUTO_CHUNK_ELEMENTS = {"cpu": 1 << 19, "cuda": 1 << 23}
# AKL's head search is a few dozen small ops per chunk, whatever its rows: on real logits
# (N = 1450, V = 49152, T = 1) AKL / FKL was 2.0x with 10-row chunks, 1.3x with 21, 1.2x with 42
_AUTO_CHUNK_ELEMENTS_HEAD = {"cpu": 1 << 21, "cuda": 1 << 23}
# AKL's head candidates: the 8, then 64, blocks of _BLOCK tokens with the largest logits (head_gap).
# Blocks of 8: their maxima are fine enough for the threshold stage (_head_from_threshold) to
# reach mass mu on real rows at T = 2 (heads of ~1250 tokens); with blocks of 64 it rarely could.
_BLOCK, _BLOCKS = 8, (8, 64)
# with the threshold stage after them (V > _TOPK_LAST) no block stage pays: on real logits the
# threshold stage settles every row the 8-block stage would, for less (bench/divergences.py)
_BLOCK_STAGES_BEFORE_BUCKETS = 0
_TOPK_LAST = 4096  # then the threshold stage (for V > this; see _head_from_threshold), then a full sort
# the threshold stage's histogram of block maxima: buckets of z_max - b (nats), the last open
_BUCKET_WIDTH, _NBUCKETS = 1.0 / 64, 1024
# then a fine histogram of the tokens above that threshold (_head_of_candidates)
_FINE_WIDTH, _NFINE = 1.0 / 256, 4096


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
# Per-token functions. Each takes a _Rows (one chunk of valid tokens) and ``out`` ((R, V) fp32
# or None), writes the gradient wrt z = logits / T into ``out`` when given, and returns
# (loss (R,), stats {name: (R,)}).
# --------------------------------------------------------------------------------------------


class Workspace:
    """(rows, V) fp32 buffers reused from chunk to chunk.

    Fresh multi-megabyte tensors cost page faults on every chunk (measured: up to 10x the
    arithmetic on CPU), so each chunk writes into the same few buffers with ``out=``.
    """

    def __init__(self, rows: int, vocab: int, device: torch.device):
        self.rows, self.vocab, self.device = rows, vocab, device
        self._bufs: dict[tuple[str, torch.dtype], Tensor] = {}

    def get(self, key: str, r: int, dtype: torch.dtype = torch.float32) -> Tensor:
        buf = self._bufs.get((key, dtype))
        if buf is None:
            buf = torch.empty(self.rows, self.vocab, dtype=dtype, device=self.device)
            self._bufs[(key, dtype)] = buf
        return buf[:r]


class _Rows:
    """One chunk of tokens from tempered fp32 logits z_s, z_t (R, V).

    p, q: softmax; lse_t, lse_s: log-sum-exp (R,); c = lse_s - lse_t, so that
    d = log p - log q = (z_t - z_s) + c. The fast formulas work on delta = z_t - z_s and fold c
    in per row (sums of x * d for x in {p, q} are x . delta + c * sum(x)); d itself is built in
    place from delta only when a divergence needs it (``d``; 0 where both are -inf in safe
    mode). log p and log q are built only for the divergences that need them.
    bmax: the teacher's block maxima (R, ceil(V / _BLOCK)) when asked for (AKL's head search;
    see ``_block_max``).
    """

    def __init__(self, z_s: Tensor, z_t: Tensor, safe: bool, ws: Workspace, blocks: bool = False):
        r = z_s.shape[0]
        self.z_s, self.z_t, self.safe, self.ws = z_s, z_t, safe, ws
        self.p = torch.softmax(z_t, -1, out=ws.get("p", r))
        self.q = torch.softmax(z_s, -1, out=ws.get("q", r))
        # max(p) = exp(max(z) - lse): the log-normalisers from two cheap reductions, no log_softmax
        self.p_max = self.p.amax(-1)
        self.bmax = _block_max(z_t) if blocks else None
        z_t_max = self.bmax.amax(-1) if self.bmax is not None else z_t.amax(-1)
        self.lse_t = z_t_max - self.p_max.log()
        self.lse_s = z_s.amax(-1) - self.q.amax(-1).log()
        self.c = self.lse_s - self.lse_t
        self._delta: Tensor | None = torch.sub(z_t, z_s, out=ws.get("d", r))
        self._d: Tensor | None = None

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

    def buf(self, key: str) -> Tensor:
        return self.ws.get(key, self.p.shape[0])

    def dot_d(self, x: Tensor) -> Tensor:
        """Row sums of x * d for x in {p, q}; 0 * -inf counts 0 in safe mode."""
        if self._d is None and not self.safe:  # x . delta + c sum(x): no pass to build d
            return torch.mul(x, self._delta, out=self.buf("xd")).sum(-1) + self.c * x.sum(-1)
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
        """q - p, the FKL gradient; its row L1 norm is g_head + g_tail."""
        return torch.sub(self.q, self.p, out=self.buf("qp") if out is None else out)


def _block_max(z: Tensor) -> Tensor:
    """Largest logit of each block: (R, nb), nb = ceil(V / _BLOCK).

    Block j holds the tokens j, j + nb, ..., j + (_BLOCK - 1) nb (those below V): strided, so
    the maximum runs over a leading dimension, which on CPU measured 10-25x faster than over 8
    adjacent tokens (and as fast as one amax of the row).
    """
    r, v = z.shape
    nb = -(-v // _BLOCK)
    full = v // nb  # complete slabs of nb tokens
    m = z[:, : full * nb].unflatten(1, (full, nb)).amax(1)
    if full * nb < v:  # a short last slab
        tail = z[:, full * nb :]
        torch.maximum(m[:, : tail.shape[1]], tail, out=m[:, : tail.shape[1]])
    return m


def _block_cols(block: Tensor, v: int) -> Tensor:
    """Columns of the tokens of ``block`` (any shape): (..., _BLOCK); those >= V are not tokens."""
    nb = -(-v // _BLOCK)
    return block[..., None] + nb * torch.arange(_BLOCK, device=block.device)


def _softmax_grad(q: Tensor, g: Tensor, out: Tensor) -> None:
    """Gradient wrt z of a loss whose gradient wrt q = softmax(z) is g: q * (g - <q, g>)."""
    g = torch.where(q > 0, g, 0.0)  # entries with q == 0 have no gradient (and may hold inf)
    torch.mul(q, g - (q * g).sum(-1, keepdim=True), out=out)


def _finish_mixed_grad(rows: _Rows, qd: Tensor, rkl: Tensor, w_f, w_r, qp: Tensor) -> None:
    """Turn qd = q * d (the grad buffer) into w_f (q - p) - w_r (q d + q RKL), in place.

    That is w_f * grad FKL + w_r * grad RKL; weights are floats or (R,) constants.
    """
    qd.addcmul_(rows.q, rkl[:, None])
    if isinstance(w_r, Tensor):
        qd.mul_(w_r.neg()[:, None]).addcmul_(qp, w_f[:, None])
    else:
        qd.mul_(-w_r).add_(qp, alpha=w_f)


def head_gap(rows: _Rows, mu: float) -> tuple[Tensor, Tensor]:
    """(g_head, head_size) per row: sum of |p - q| over AKL's head, and the head's size.

    Head (AKL.md): sort p descending, cumulative c_i; token i is in the head when c_i <= mu;
    the top-1 token always is. The head is a prefix of the sorted p, so no full sort is needed:
    split the vocabulary into blocks of _BLOCK tokens (``_block_max``) and take as candidates the blocks with the
    largest teacher logits. Every token above the largest logit of the other blocks is among
    them, so the sorted candidates above that bound are exactly the top of the full sort; a row
    is settled when its boundary (the first c_i > mu) lies in that exact prefix. Stages: rows
    with top-1 p > mu (head = top-1); then (V <= _TOPK_LAST) the top 64 tokens of 8 blocks and
    the top 512 of 64 blocks, or (larger V) the tokens above a threshold from the block maxima
    (``_head_from_threshold``); then a full sort of the rows left.
    """
    n, v = rows.p.shape
    g_head = rows.p.new_zeros(n)
    size = rows.p.new_zeros(n)
    todo = torch.arange(n, device=rows.p.device)
    z = rows.z_t
    nb = -(-v // _BLOCK)
    if nb > _BLOCKS[0]:
        bmax = rows.bmax if rows.bmax is not None else _block_max(z)  # (R, nb)
        todo = _head_of_one(rows, mu, g_head, size, bmax)
        stages = _BLOCKS if v <= _TOPK_LAST else _BLOCKS[:_BLOCK_STAGES_BEFORE_BUCKETS]
        for blocks, keep in zip(stages, (64, 512)[: len(stages)], strict=True):
            if todo.numel() == 0 or nb <= blocks:
                break
            sub = todo.numel() < n
            done = _head_from_blocks(rows, mu, g_head, size, todo, bmax[todo] if sub else bmax, blocks, keep)
            todo = todo[~done]
    if todo.numel() > 0 and v > _TOPK_LAST:  # flat rows: the tokens above a threshold
        done = _head_from_threshold(rows, mu, g_head, size, todo, bmax)
        todo = todo[~done]
    if todo.numel() > 0:  # full sort of what is left
        p_top, idx = rows.p[todo].sort(-1, descending=True)
        _head_of_sorted(p_top, rows.q[todo].gather(-1, idx), mu, g_head, size, todo, None)
    return g_head, size


def _head_of_one(rows: _Rows, mu: float, g_head: Tensor, size: Tensor, bmax: Tensor) -> Tensor:
    """Rows whose top-1 p exceeds mu have a head of one token (most rows of an LLM teacher).

    Its column from the block maxima: the best block, then the best token in it. Returns the
    rows left to do.
    """
    n = rows.p.shape[0]
    one = rows.p_max > mu
    if not bool(one.any()):
        return torch.arange(n, device=one.device)
    block = bmax.argmax(-1, keepdim=True)  # (R, 1)
    # (R, _BLOCK); a short block repeats column V - 1 (below the row's largest logit or it)
    cols = _block_cols(block.squeeze(1), rows.p.shape[1]).clamp_(max=rows.p.shape[1] - 1)
    col = cols.gather(-1, rows.z_t.gather(-1, cols).argmax(-1, keepdim=True))  # (R, 1)
    gap = (rows.p.gather(-1, col) - rows.q.gather(-1, col)).abs_().squeeze(1)
    g_head.copy_(torch.where(one, gap, 0.0))
    size.copy_(one.to(size.dtype))
    return (~one).nonzero().squeeze(1)


def _head_of_sorted(p_top, q_top, mu, g_head, size, rows_idx, exact) -> Tensor:
    """Fill g_head/size of the rows whose boundary lies in the exact prefix; return that mask.

    p_top, q_top: (R, k) sorted by p descending; exact: (R, k) bool, or None for a full sort.
    """
    cum = p_top.cumsum(-1)
    head = cum <= mu
    head[:, 0] = True
    done = torch.ones_like(head[:, 0]) if exact is None else (exact & (cum > mu)).any(-1)
    gap = torch.where(head, (p_top - q_top).abs(), 0.0).sum(-1)
    sel = rows_idx[done]
    g_head[sel] = gap[done].to(g_head.dtype)
    size[sel] = head[done].sum(-1).to(size.dtype)
    return done


def _head_from_threshold(
    rows: _Rows, mu: float, g_head: Tensor, size: Tensor, todo: Tensor, bmax: Tensor
) -> Tensor:
    """Stage of head_gap for flat rows: a logit threshold from the block maxima, then only the
    tokens above it (``_head_of_candidates``).

    The same as the full sort, restricted to a prefix of it: every block maximum b is a distinct
    token with z >= b, so L(tau) = sum of exp(b - lse) over the blocks with b >= tau is at most
    the mass of the tokens with z >= tau. A histogram of the block maxima (buckets of
    _BUCKET_WIDTH nats below the row's largest logit; the last, _NBUCKETS - 1, open) gives the
    first tau with L(tau) > mu; then the tokens with z >= tau, which lie in the blocks with
    b >= tau, are the top of the sorted row and hold the boundary (the first c_i > mu). Only
    those tokens are gathered: from the blocks above tau, or by one compare over the rows when
    most blocks qualify (flat rows, T = 2). Rows whose threshold falls in the open bucket or
    whose sums round the other way are left undone (the full sort).
    Returns the rows settled (a mask over ``todo``).
    """
    r, nb, v = todo.numel(), _NBUCKETS, rows.z_t.shape[1]
    bm = bmax if r == rows.z_t.shape[0] else bmax.index_select(0, todo)  # (r, nblocks)
    lse = rows.lse_t.index_select(0, todo)[:, None]
    ids = (bm.amax(-1, keepdim=True) - bm).mul_(1.0 / _BUCKET_WIDTH).clamp_(0, nb - 1).to(torch.long)
    ids += torch.arange(0, r * nb, nb, device=ids.device)[:, None]
    lower = torch.bincount(ids.flatten(), weights=(bm - lse).exp_().flatten(), minlength=r * nb)
    last = (lower.view(r, nb).cumsum(-1) <= mu).sum(-1, keepdim=True)  # first bucket with L > mu
    ok = (last < nb - 1).squeeze(1)
    inside = ids - torch.arange(0, r * nb, nb, device=ids.device)[:, None] <= last
    tau = bm.masked_fill(~inside, math.inf).amin(-1)  # (r,) L(tau) > mu
    # the candidates: the tokens with z >= tau of the blocks with b >= tau (flat, row by row)
    loc, blk = ((bm >= tau[:, None]) & ok[:, None]).nonzero().unbind(1)  # (Mb,) row in todo, block
    if loc.numel() * _BLOCK * 4 > r * v:  # flat rows (T = 2): one compare over them is cheaper
        z_r = rows.z_t if r == rows.z_t.shape[0] else rows.z_t.index_select(0, todo)
        loc, col = ((z_r >= tau[:, None]) & ok[:, None]).nonzero().unbind(1)
        flat = todo.index_select(0, loc) * v + col
        z = z_r[loc, col]
    else:
        cols = _block_cols(blk, v)  # (Mb, _BLOCK)
        flat = (todo.index_select(0, loc) * v)[:, None] + cols.clamp(max=v - 1)
        z = rows.z_t.take(flat)
        keep = ((z >= tau.index_select(0, loc)[:, None]) & (cols < v)).view(-1).nonzero().squeeze(1)
        loc = loc.index_select(0, keep // _BLOCK)
        flat, z = flat.view(-1).index_select(0, keep), z.view(-1).index_select(0, keep)
    flat_p = rows.p.take(flat)
    e = rows.q.take(flat).sub_(flat_p).abs_()  # |p - q|
    return ok & _head_of_candidates(loc, z, flat_p.double(), e, bm.amax(-1), mu, g_head, size, todo)


def _head_of_candidates(loc, z, p, e, z_max, mu, g_head, size, todo) -> Tensor:
    """Head of rows given every token above a threshold whose mass exceeds mu, flat.

    loc (M,): row (in todo) of each candidate, ascending; z, p (double), e = |p - q|: theirs.
    The same as a sort of the candidates, without it: a fine histogram of z_max - z
    (_FINE_WIDTH nats) gives each bucket's mass; the tokens of the buckets before the one where
    the cumulative mass first exceeds mu are the head, and only that boundary bucket's few
    tokens are sorted and cut by the cumulative rule. Returns the rows settled.
    """
    r, nf = todo.numel(), _NFINE
    b = (z_max.index_select(0, loc) - z).mul_(1.0 / _FINE_WIDTH).clamp_(0, nf - 1).to(torch.long)
    cum = torch.bincount(loc * nf + b, weights=p, minlength=r * nf).view(r, nf).cumsum(-1)
    last = (cum <= mu).sum(-1, keepdim=True)  # (r, 1) the boundary bucket
    ok = (last < nf).squeeze(1)
    last = last.clamp_(max=nf - 1)
    m0 = torch.where(last > 0, cum.gather(-1, (last - 1).clamp_(min=0)), 0.0).squeeze(1)
    b_last = last.squeeze(1).index_select(0, loc)
    before = (b < b_last).to(e.dtype)
    n0 = torch.bincount(loc, weights=before, minlength=r)
    g0 = torch.bincount(loc, weights=before.mul_(e), minlength=r)
    # the boundary bucket's tokens, sorted per row ((r, k) padded with -inf)
    at = (b == b_last).nonzero().squeeze(1)
    loc, z, p, e = (x.index_select(0, at) for x in (loc, z, p, e))
    count = torch.bincount(loc, minlength=r)
    k = max(int(count.max()) if loc.numel() else 0, 1)
    pos = (
        loc * k
        + torch.arange(loc.numel(), device=loc.device)
        - (count.cumsum(0) - count).index_select(0, loc)
    )
    z_s, order = (
        torch.full((r * k,), -math.inf, device=z.device)
        .index_copy_(0, pos, z)
        .view(r, k)
        .sort(-1, descending=True)
    )
    pad = z_s == -math.inf
    p_s = (
        torch.zeros(r * k, dtype=p.dtype, device=p.device).index_copy_(0, pos, p).view(r, k).gather(-1, order)
    )
    e_s = (
        torch.zeros(r * k, dtype=e.dtype, device=e.device).index_copy_(0, pos, e).view(r, k).gather(-1, order)
    )
    c = p_s.cumsum(-1) + m0[:, None]
    head = (c <= mu) & ~pad
    head[:, 0] |= n0 == 0  # the top-1 token is always in the head
    done = ok & ((c > mu) & ~pad).any(-1)
    sel = todo[done]
    g_head[sel] = (g0 + torch.where(head, e_s, 0.0).sum(-1))[done].to(g_head.dtype)
    size[sel] = (n0 + head.sum(-1))[done].to(size.dtype)
    return done


def _head_from_blocks(rows, mu, g_head, size, todo, bmax, blocks: int, keep: int) -> Tensor:
    """One stage of head_gap over rows ``todo``, candidates from the top ``blocks`` blocks."""
    v = rows.p.shape[1]
    everything = todo.numel() == rows.p.shape[0]
    top_b, bidx = bmax.topk(blocks + 1, dim=-1)  # (R, blocks + 1)
    bound = top_b[:, -1:]  # the largest logit outside the candidate blocks
    cols = _block_cols(bidx[:, :-1], v).flatten(1)
    inside = cols < v  # the last block may be short
    cols = cols.clamp_(max=v - 1)

    # gather the candidates straight from the full (R, V) tensors: copying the rows left
    # (rows.p[todo], ...) cost more than the whole search
    def pick(x: Tensor, c: Tensor) -> Tensor:
        return x.gather(-1, c) if everything else x[todo[:, None], c]

    cand = pick(rows.z_t, cols).masked_fill_(~inside, -math.inf)
    cand, order = cand.topk(min(keep, cand.shape[1]), dim=-1)  # sorted; cheaper than a sort
    cols = cols.gather(-1, order)
    pad = cand == -math.inf
    p_c = pick(rows.p, cols).masked_fill_(pad, 0.0)
    q_c = pick(rows.q, cols).masked_fill_(pad, 0.0)
    return _head_of_sorted(p_c, q_c, mu, g_head, size, todo, cand > bound)


def _akl_parts(rows: _Rows, mu: float, out: Tensor | None, swap: bool):
    if rows.safe:
        return _akl_parts_safe(rows, mu, out, swap)
    fkl, rkl = rows.fkl(), rows.rkl()  # from delta, before anything builds d
    gap = torch.sub(rows.q, rows.p, out=rows.buf("abs")).abs_().sum(-1)  # sum |p - q| = g_head + g_tail
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
    g_tail = (gap - g_head).clamp_min_(0.0)
    # p == q gives 0 / 0 in the authors' code; take 0.5 / 0.5 (the loss is 0 there anyway).
    w_head = torch.where(gap > 0, g_head / gap.clamp_min(torch.finfo(gap.dtype).tiny), 0.5)
    w_f = 1.0 - w_head if swap else w_head  # AKL-r swaps the weights
    w_r = 1.0 - w_f
    stats = {"fkl": fkl, "rkl": rkl, "g_head": g_head, "g_tail": g_tail, "w_head": w_head, "head_size": size}
    return w_f, w_r, stats


def _akl_parts_safe(rows: _Rows, mu: float, out: Tensor | None, swap: bool):
    """AKL with the guards -inf logits need (d built, 0 * inf counted 0)."""
    qd = rows.q_times_d(out)
    rkl = -qd.sum(-1)
    fkl = rows.fkl()
    qp = rows.q_minus_p()
    gap = rows.l1(qp)
    g_head, size = head_gap(rows, mu)
    w_f, w_r, stats = _akl_weights(fkl, rkl, gap, g_head, size, swap)
    if out is not None:
        _finish_mixed_grad(rows, qd, rkl, w_f, w_r, qp)
    return w_f * fkl + w_r * rkl, stats


def _fkl(rows: _Rows, opts: DivergenceOptions, out: Tensor | None):
    fkl = rows.fkl()
    if out is not None:
        rows.q_minus_p(out)
    return fkl, {"fkl": fkl}


def _rkl(rows: _Rows, opts: DivergenceOptions, out: Tensor | None):
    qd = rows.q_times_d(out)
    rkl = -qd.sum(-1)
    if out is not None:  # q (log q - log p - RKL) = -(q d + q RKL)
        qd.addcmul_(rows.q, rkl[:, None]).neg_()
    return rkl, {"rkl": rkl}


def _fkl_rkl(rows: _Rows, opts: DivergenceOptions, out: Tensor | None):
    qd = rows.q_times_d(out)
    rkl = -qd.sum(-1)
    fkl = rows.fkl()
    if out is not None:
        _finish_mixed_grad(rows, qd, rkl, 0.5, 0.5, rows.q_minus_p())
    return 0.5 * (fkl + rkl), {"fkl": fkl, "rkl": rkl}


def _akl(rows: _Rows, opts: DivergenceOptions, out: Tensor | None):
    return _akl_parts(rows, opts.mu, out, swap=False)


def _akl_r(rows: _Rows, opts: DivergenceOptions, out: Tensor | None):
    return _akl_parts(rows, opts.mu, out, swap=True)


def _log_mix(lp: Tensor, lq: Tensor, a: float) -> Tensor:
    """log(a p + (1 - a) q), stable when both underflow; -inf only where both are -inf."""
    if a == 0.0:
        return lq
    return torch.logaddexp(lp + math.log(a), lq + math.log1p(-a))


def _kl_terms(x: Tensor, lx: Tensor, ly: Tensor) -> Tensor:
    """x (log x - log y) per entry, 0 where x == 0 (y > 0 wherever x > 0 here)."""
    return torch.where(x > 0, x * (lx - ly), 0.0)


def _skl(rows: _Rows, opts: DivergenceOptions, out: Tensor | None):
    # SKL = KL(p || lam p + (1 - lam) q) (DistiLLM)
    lp = rows.lp
    lm = _log_mix(lp, rows.lq, opts.lam)
    loss = _kl_terms(rows.p, lp, lm).sum(-1)
    if out is not None:  # dL/dq = -(1 - lam) p / m
        ratio = torch.where(rows.p > 0, (lp - lm).exp(), 0.0)
        _softmax_grad(rows.q, ratio.mul_(-(1.0 - opts.lam)), out)
    return loss, {}


def _srkl(rows: _Rows, opts: DivergenceOptions, out: Tensor | None):
    # SRKL = KL(q || (1 - lam) p + lam q) (DistiLLM)
    lq = rows.lq
    lm = _log_mix(lq, rows.lp, opts.lam)
    loss = _kl_terms(rows.q, lq, lm).sum(-1)
    if out is not None:  # dL/dq = log q - log m + 1 - lam q / m (the constant 1 cancels)
        g = lq - lm
        if opts.lam > 0:
            g = g - opts.lam * (lq - lm).exp()
        _softmax_grad(rows.q, g, out)
    return loss, {}


def _tvd(rows: _Rows, opts: DivergenceOptions, out: Tensor | None):
    diff = rows.q_minus_p()
    loss = 0.5 * rows.l1(diff)
    if out is not None:
        _softmax_grad(rows.q, 0.5 * diff.sign(), out)
    return loss, {}


def _jsd(rows: _Rows, opts: DivergenceOptions, out: Tensor | None):
    # Generalized JSD (TRL's GKD): m = beta p + (1 - beta) q; beta KL(p||m) + (1 - beta) KL(q||m)
    b = opts.beta
    lp, lq = rows.lp, rows.lq
    lm = _log_mix(lp, lq, b)
    loss = b * _kl_terms(rows.p, lp, lm).sum(-1) + (1 - b) * _kl_terms(rows.q, lq, lm).sum(-1)
    if out is not None:  # dL/dq = (1 - beta) (log q - log m) + const
        _softmax_grad(rows.q, (lq - lm).mul_(1 - b), out)
    return loss, {}


PerToken = Callable[[_Rows, DivergenceOptions, "Tensor | None"], tuple[Tensor, dict[str, Tensor]]]
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


def chunk_rows(opts: DivergenceOptions, vocab: int, device: torch.device, name: str | None = None) -> int:
    """Tokens per chunk: opts.chunk_size, else about _AUTO_CHUNK_ELEMENTS logits (more with a head search)."""
    if opts.chunk_size is not None:
        return opts.chunk_size
    table = _AUTO_CHUNK_ELEMENTS_HEAD if _needs_head(name, opts) else _AUTO_CHUNK_ELEMENTS
    elements = table.get(device.type, table["cuda"])
    return max(1, elements // max(vocab, 1))


def _needs_head(name: str | None, opts: DivergenceOptions) -> bool:
    return name in ("akl", "akl_r") or opts.all_stats


def _tempered(x: Tensor, t: float, ws: Workspace, key: str) -> Tensor:
    """x / t in fp32; x itself when it already is fp32 and t == 1."""
    if t == 1.0:
        return x if x.dtype == torch.float32 else ws.get(key, x.shape[0]).copy_(x)
    return torch.div(x, t, out=ws.get(key, x.shape[0]))


def divergence_chunk(
    name: str,
    student: Tensor,
    teacher: Tensor,
    opts: DivergenceOptions,
    need_grad: bool,
    ws: Workspace | None = None,
    out: Tensor | None = None,
) -> tuple[Tensor, Tensor | None, dict[str, Tensor]]:
    """Per-token loss (R,), grad wrt the student logits (R, V) fp32 or None, and stats sums.

    student, teacher: (R, V) logits of valid tokens in any float dtype (computed in fp32).
    ws: buffers to reuse across chunks; out: where to write the gradient ((R, V) fp32); without
    it the gradient lives in ``ws`` and is overwritten by the next chunk.
    """
    r, v = student.shape
    ws = ws or Workspace(r, v, student.device)
    t = opts.temperature
    z_s, z_t = _tempered(student, t, ws, "z_s"), _tempered(teacher, t, ws, "z_t")
    if need_grad and out is None:
        out = ws.get("grad", r)
    loss, stats = _per_token(name, z_s, z_t, opts, ws, out if need_grad else None, safe=False)
    if any(bool(x.isnan().any()) for x in (loss, *stats.values())):
        # -inf logits (masked vocabulary) give 0 * inf = nan in the fast formulas, and only
        # there; redo the chunk with the guarded ones rather than pay for guards every time.
        loss, stats = _per_token(name, z_s, z_t, opts, ws, out if need_grad else None, safe=True)
    if need_grad and t != 1.0:
        out.div_(t)
    return loss, (out if need_grad else None), {k: v.sum() for k, v in stats.items()}


def _per_token(name, z_s, z_t, opts, ws, out, safe: bool) -> tuple[Tensor, dict[str, Tensor]]:
    rows = _Rows(z_s, z_t, safe, ws, blocks=_needs_head(name, opts))
    loss, stats = _PER_TOKEN[name](rows, opts, out)
    if opts.all_stats:
        stats = dict(stats)
        if "fkl" not in stats:
            stats["fkl"] = rows.fkl()
        if "rkl" not in stats:
            stats["rkl"] = rows.rkl()
        if "g_head" not in stats:
            gap = rows.l1(rows.q_minus_p())
            g_head, size = head_gap(rows, opts.mu)
            stats["g_head"], stats["g_tail"], stats["head_size"] = (
                g_head,
                (gap - g_head).clamp_min_(0.0),
                size,
            )
            stats["w_head"] = torch.where(gap > 0, g_head / gap.clamp_min(torch.finfo(gap.dtype).tiny), 0.5)
    return loss, stats


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
    all_valid = bool(valid.all())
    grad = None
    if need_grad:
        grad = torch.empty_like(s) if all_valid else torch.zeros_like(s)
    rows = chunk_rows(opts, s.shape[-1], s.device, name)
    ws = Workspace(min(rows, s.shape[0]), s.shape[-1], s.device)
    loss_sum = s.new_zeros((), dtype=torch.float32)
    stats: dict[str, Tensor] = {}
    for sel in chunk_selectors(valid, rows):
        if isinstance(sel, slice):
            s_c, t_c = s[sel], t[sel]
        else:  # gather the valid rows into reused buffers
            r = sel.numel()
            s_c = torch.index_select(s, 0, sel, out=ws.get("s_rows", r, s.dtype))
            t_c = torch.index_select(t, 0, sel, out=ws.get("t_rows", r, t.dtype))
        # write the gradient straight into the result when it is an fp32 slice of it
        direct = grad is not None and isinstance(sel, slice) and grad.dtype == torch.float32
        loss, g, st = divergence_chunk(name, s_c, t_c, opts, need_grad, ws, grad[sel] if direct else None)
        loss_sum += loss.sum()
        for k, v in st.items():
            stats[k] = stats[k] + v if k in stats else v
        if grad is not None and not direct:
            if isinstance(sel, slice):
                grad[sel].copy_(g)
            else:
                grad.index_copy_(0, sel, g if g.dtype == grad.dtype else g.to(grad.dtype))
    return loss_sum, grad, int(valid.sum()), stats


def grad_in_forward(forward: Callable) -> type[torch.autograd.Function]:
    """An autograd Function over ``forward(name, s, t, labels, opts, need_grad)``, which returns
    (loss_sum, grad wrt the student logits, num_tokens, stats): the gradient is made in forward.

    backward hands that buffer back scaled in place, without a copy (the copy of an (N, V)
    gradient was a third of the whole cost on CPU), so the graph can be backpropagated once.
    The chunked torch path and the Triton kernel (akl_core/kernels/dispatch.py) share it.
    """

    class _PrecomputedGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, s, t, labels, name, opts, extras):
            loss_sum, grad, n, stats = forward(name, s, t, labels, opts, need_grad=True)
            ctx.grad = grad
            extras["num_tokens"], extras["stats"] = n, stats
            return loss_sum

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx, grad_output):
            return scaled_once(ctx, "grad", grad_output), None, None, None, None, None

    return _PrecomputedGrad


_ChunkedDivergence = grad_in_forward(_forward)


def scaled_once(ctx, attr: str, grad_output: Tensor) -> Tensor | None:
    """ctx.<attr> * grad_output, in place, releasing it; a second backward raises."""
    if not hasattr(ctx, attr):
        raise RuntimeError(
            "akl_core divergences keep their gradient from the forward pass and can be "
            "backpropagated once; recompute the loss instead of retain_graph=True"
        )
    grad = getattr(ctx, attr)
    delattr(ctx, attr)
    if grad is not None and not bool(grad_output == 1):
        grad.mul_(grad_output.to(grad.dtype))
    return grad


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
    from akl_core.kernels import dispatch  # the Triton kernel on CUDA (akl_core/kernels/)

    if dispatch.wanted(name, s, t):
        return dispatch.compute(name, s, t, labels, opts)
    if torch.is_grad_enabled() and s.requires_grad:
        extras: dict = {}
        loss_sum = _ChunkedDivergence.apply(s, t, labels, name, opts, extras)
        return finish(loss_sum, extras["num_tokens"], extras["stats"])
    loss_sum, _, n, stats = _forward(name, s, t, labels, opts, need_grad=False)
    return finish(loss_sum, n, stats)
