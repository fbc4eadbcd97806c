"""AKL's head: which tokens are the head, and the gap |p - q| summed over them.

The definition (docs/method.md): sort p descending, cumulative sums c_i; token i is in the head
when c_i <= mu, and the top-1 token always is. ``head_gap_by_sort`` is that definition, plainly.
``head_tokens`` finds the same heads without the sort of the whole vocabulary: the head is a
prefix of the sorted p, so it is enough to sort (or bucket) the few tokens that can precede the
boundary. It reads the teacher alone and returns the head tokens by flat index, so a caller can
find the heads before it has the student's q (``rows.akl_group``); ``head_gap`` sums |p - q|
over them (tests/akl_core/test_divergences*.py compare these with the sort row by row).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:
    from typing import TypeAlias

    from akl_core.divergences.rows import GroupRows, Rows

    HeadRows: TypeAlias = Rows | GroupRows  # what the head search reads: a chunk or a group of them

# AKL's head candidates: the 8, then 64, blocks of _BLOCK tokens with the largest logits (head_gap).
# Blocks of 8: their maxima are fine enough for the threshold stage (_head_from_threshold) to
# reach mass mu on real rows at T = 2 (heads of ~1250 tokens); with blocks of 64 it rarely could.
_BLOCK, _BLOCKS = 8, (8, 64)
# with the threshold stage after them (V > _TOPK_LAST) no block stage pays: on real logits the
# threshold stage settles every row the 8-block stage would, for less (bench/divergences.py)
_BLOCK_STAGES_BEFORE_BUCKETS = 0
_TOPK_LAST = 4096  # then the threshold stage (for V > this; see _head_from_threshold), then a full sort
# for V > _TOPK_LAST, before the threshold stage: the 32 best blocks of 8 among the 32 best blocks
# of 64 (``_head_from_pyramid``), their tokens' top _PYRAMID_KEEP kept. It settles the rows whose
# head is short (real logits at T = 1: median 3 tokens, p90 29) with ops on (R, 768) and (R, 256)
# instead of the threshold stage's (R, 6144) at V = 49152 (bench/divergences.py).
_PYRAMID_BLOCKS, _PYRAMID_KEEP = 32, 64
# the threshold stage's histogram of block maxima: buckets of z_max - b (nats), the last open
_BUCKET_WIDTH, _NBUCKETS = 1.0 / 64, 1024
# its candidates, the tokens above the threshold: gathered from the blocks above it, or found by
# one compare over the rows when the blocks' tokens are over 1 / _COMPARE_OVER_GATHER of them (a
# gathered token costs several int64 ops, a compared one a read; real logits at T = 2: ~1400 of
# 6144 blocks, ~1600 tokens per row)
_COMPARE_OVER_GATHER = 32
# then a fine histogram of the tokens above that threshold (_head_of_candidates)
_FINE_WIDTH = 1.0 / 256
# masks (and compares, gathers) of more entries than this go through numpy on CPU (``flat_nonzero``,
# ``ge_rows``, ``take``, ``floor_div``); smaller ones through torch
_NUMPY_NONZERO_OVER = 4096
_LOG2E = 1.0 / math.log(2.0)


def n_blocks(v: int) -> int:
    """Blocks of a row of V tokens (``block_max``); also blocks of blocks: n_blocks(nb)."""
    return -(-v // _BLOCK)


def block_max(z: Tensor, out: Tensor | None = None) -> Tensor:
    """Largest logit of each block: (R, nb), nb = ceil(V / _BLOCK) (into ``out`` when given).

    Block j holds the tokens j, j + nb, ..., j + (_BLOCK - 1) nb (those below V): strided, so
    the maximum runs over a leading dimension, which on CPU measured 10-25x faster than over 8
    adjacent tokens (and as fast as one amax of the row).
    """
    r, v = z.shape
    nb = n_blocks(v)
    full = v // nb  # complete slabs of nb tokens
    part = z[:, : full * nb].unflatten(1, (full, nb))
    m = part.amax(1) if out is None else torch.amax(part, 1, out=out)
    if full * nb < v:  # a short last slab
        tail = z[:, full * nb :]
        torch.maximum(m[:, : tail.shape[1]], tail, out=m[:, : tail.shape[1]])
    return m


def block_cols(block: Tensor, v: int) -> Tensor:
    """Columns of the tokens of ``block`` (any shape): (..., _BLOCK); those >= V are not tokens."""
    nb = n_blocks(v)
    return block[..., None] + nb * torch.arange(_BLOCK, device=block.device)


class Heads:
    """What the head search found: the flat indices (into the rows' (R, V) layout) of every head
    token of the rows settled, and each row's head size.

    Each stage adds the tokens of the rows it settled row by row (``add``: ascending rows), so
    the parts are each sorted by row, though not by flat index, and the stages interleave rows.
    """

    def __init__(self, n: int, like: Tensor):
        self.size = like.new_zeros(n)
        self.parts: list[Tensor] = []

    def add(self, flat: Tensor) -> None:
        """Head tokens of settled rows (flat indices, any shape, rows ascending row-major)."""
        if flat.numel():
            self.parts.append(flat.reshape(-1))

    def flat(self) -> Tensor:
        """Every head token found, by flat index (grouped by stage)."""
        return self._cat(self.parts)

    def by_rows(self, v: int, starts: list[int]) -> list[Tensor]:
        """The head tokens of the rows [starts[i], starts[i + 1]) for each i (the last start is
        the row count), flat: one binary search per part, no sort."""
        bounds = torch.tensor(starts, device=self.size.device)
        cuts = [torch.searchsorted(floor_div(part, v), bounds).tolist() for part in self.parts]
        return [
            self._cat([part[c[i] : c[i + 1]] for part, c in zip(self.parts, cuts, strict=True)])
            for i in range(len(starts) - 1)
        ]

    def by_chunks(self, v: int, starts: list[int]) -> list[tuple[Tensor, Tensor]]:
        """Per chunk of rows [starts[i], starts[i + 1]) (the last start is the row count): its
        head tokens as (flat index into the chunk's (rows, V) layout, row in the chunk), made
        for all chunks at once so that a loop over the chunks gets them without an op."""
        pieces = self.by_rows(v, starts)
        flat = self._cat(pieces)
        row = floor_div(flat, v)
        first = torch.tensor(starts[:-1], device=flat.device)
        a = first.index_select(0, torch.searchsorted(first, row, right=True) - 1)
        local_row = row - a
        local = flat - a * v
        counts = [x.numel() for x in pieces]
        return list(zip(local.split(counts), local_row.split(counts), strict=True))

    def _cat(self, pieces: list[Tensor]) -> Tensor:
        pieces = [x for x in pieces if x.numel()]
        if not pieces:
            return torch.zeros(0, dtype=torch.long, device=self.size.device)
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def head_tokens(rows: HeadRows, mu: float) -> Heads:
    """Every head token of every row by flat index into the rows' (R, V) layout, and each row's
    head size (``Heads``): the heads of ``head_by_sort(rows.p, mu)``,
    without the full sort. The head depends on the teacher alone, so this reads no student
    values: its g_head = sum of |p - q| over the head is a gather (``head_gap``).

    The head is a prefix of the sorted p. Split the vocabulary into blocks of _BLOCK tokens
    (``block_max``) and take as candidates the blocks with the largest teacher logits: every
    token above the largest logit of the other blocks is among them, so the sorted candidates
    above that bound are exactly the top of the full sort, and a row is settled when its
    boundary (the first c_i > mu) lies in that exact prefix. Stages: rows with top-1 p > mu
    (head = top-1); then (V <= _TOPK_LAST) the top 64 tokens of 8 blocks and the top 512 of 64
    blocks, or (larger V) the tokens of the best blocks of the best groups of blocks (short
    heads: ``_head_from_pyramid``), then the tokens above a threshold from the block maxima
    (``_head_from_threshold``); then the full sort (``head_by_sort``) on the rows left.

    rows: a ``rows.Rows`` (one chunk) or ``rows.GroupRows`` (a group of chunks, teacher only);
    the search reads its z_t (through ``z_take``), p, p_max, lse_t and bmax, only a few tokens
    of each row but for the compare of flat rows at T = 2.
    """
    n, v = rows.z_t.shape
    heads = Heads(n, rows.lse_t)
    todo = torch.arange(n, device=rows.z_t.device)
    z = rows.z_t
    nb = n_blocks(v)
    if nb > _BLOCKS[0]:
        bmax = rows.bmax if rows.bmax is not None else block_max(z)  # (R, nb)
        todo = _head_of_one(rows, mu, heads, bmax)
        stages = _BLOCKS if v <= _TOPK_LAST else _BLOCKS[:_BLOCK_STAGES_BEFORE_BUCKETS]
        for blocks, keep in zip(stages, (64, 512)[: len(stages)], strict=True):
            if todo.numel() == 0 or nb <= blocks:
                break
            sub = todo.numel() < n
            done = _head_from_blocks(rows, mu, heads, todo, bmax[todo] if sub else bmax, blocks, keep)
            todo = todo[~done]
    if todo.numel() > 0 and v > _TOPK_LAST and not rows.ws.hints.get("no_pyramid"):
        # short heads: the best blocks of the best groups of blocks. On flat rows (real logits at
        # T = 2: heads of ~1300 tokens) it settles almost none, so a chunk where it settled under
        # a quarter of its rows turns it off for the chunks after it (the result is the same)
        done = _head_from_pyramid(rows, mu, heads, todo, bmax)
        if 4 * int(done.sum()) < todo.numel():
            rows.ws.hints["no_pyramid"] = True
        todo = todo[~done]
    if todo.numel() > 0 and v > _TOPK_LAST:  # flat rows: the tokens above a threshold
        done = _head_from_threshold(rows, mu, heads, todo, bmax)
        todo = todo[~done]
    if todo.numel() > 0:  # the rows left: the definition itself
        idx, head = head_by_sort(rows.p[todo], mu)
        heads.add((idx + (todo * v)[:, None])[head])
        heads.size[todo] = head.sum(-1).to(heads.size.dtype)
    return heads


def head_gap(rows: Rows, mu: float) -> tuple[Tensor, Tensor]:
    """(g_head, head_size) per row: the same as ``head_gap_by_sort(rows.p, rows.q, mu)``
    (``head_tokens``, then |p - q| = |rows.qp| summed over them)."""
    heads = head_tokens(rows, mu)
    return row_sums_at(rows.qp, heads.flat()), heads.size


def row_sums_at(x: Tensor, flat: Tensor, row: Tensor | None = None) -> Tensor:
    """Per row of x (R, V), the sum of |x| at the flat indices ``flat`` (their rows ``row``,
    flat // V, when the caller has them already)."""
    r, v = x.shape
    e = take(x, flat).abs_().double()  # bincount adds in order: in double, as exact as a pairwise sum
    return torch.bincount(floor_div(flat, v) if row is None else row, weights=e, minlength=r).to(x.dtype)


def _head_of_one(rows: HeadRows, mu: float, heads: Heads, bmax: Tensor) -> Tensor:
    """Rows whose top-1 p exceeds mu have a head of one token (most rows of an LLM teacher).

    Its column from the block maxima: the best block, then the best token in it. Returns the
    rows left to do.
    """
    n, v = rows.z_t.shape
    one = rows.p_max > mu
    if not bool(one.any()):
        return torch.arange(n, device=one.device)
    idx = one.nonzero().squeeze(1)
    block = bmax.index_select(0, idx).argmax(-1)  # (k,): argmax over these rows only
    # (k, _BLOCK) flat; a short block repeats column V - 1 (below the row's largest logit or it)
    cols = block_cols(block, v).clamp_(max=v - 1).add_((idx * v)[:, None])
    col = cols.gather(-1, rows.z_take(cols).argmax(-1, keepdim=True))  # (k, 1)
    heads.add(col)
    heads.size[idx] = 1.0
    return (~one).nonzero().squeeze(1)


def _head_of_sorted(p_top, f_top, mu, heads: Heads, rows_idx, exact) -> Tensor:
    """Record the heads of the rows whose boundary lies in the exact prefix; return that mask.

    p_top, f_top (the tokens' flat indices): (R, k) sorted by p descending; exact: (R, k) bool,
    or None for a full sort.
    """
    cum = p_top.cumsum(-1)
    head = cum <= mu
    head[:, 0] = True
    done = torch.ones_like(head[:, 0]) if exact is None else (exact & (cum > mu)).any(-1)
    heads.add(f_top[head & done[:, None]])
    heads.size[rows_idx[done]] = head[done].sum(-1).to(heads.size.dtype)
    return done


def _head_from_threshold(rows: HeadRows, mu: float, heads: Heads, todo: Tensor, bmax: Tensor) -> Tensor:
    """Stage of head_tokens for flat rows: a logit threshold from the block maxima, then only the
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
    z_max = bm.amax(-1, keepdim=True)
    ids = (z_max - bm).mul_(1.0 / _BUCKET_WIDTH).clamp_(0, nb - 1).to(_index_dtype(r * nb))
    ids += torch.arange(0, r * nb, nb, dtype=ids.dtype, device=ids.device)[:, None]
    weights = torch.sub(bm, lse).mul_(_LOG2E).exp2_()  # exp(b - lse): exp2 measured 4x faster than exp
    lower = torch.bincount(ids.flatten(), weights=weights.flatten(), minlength=r * nb)
    last = _count_at_most(lower.view(r, nb).cumsum(-1), mu)  # (r, 1) first bucket with L > mu
    ok = (last < nb - 1).squeeze(1)
    # tau: a bucket below that one, so that every block counted is above it whatever the
    # rounding (any tau gives the same head: its tokens are a prefix of the sorted row, and a row
    # whose prefix holds mass <= mu is not settled here); rows not ok get none
    tau = (z_max - (last + 2) * _BUCKET_WIDTH).squeeze(1).masked_fill_(~ok, math.inf)
    # the candidates: the tokens with z >= tau of the blocks with b >= tau (flat, row by row).
    # z_t may be untempered (rows.t): z / T >= tau is z >= tau T, up to rounding, and any
    # threshold will do (the tokens above it are still a prefix of the sorted row)
    tau_raw = tau * rows.t
    above = bm >= tau[:, None]  # the blocks holding the candidates
    if int(torch.count_nonzero(above)) * _BLOCK * _COMPARE_OVER_GATHER > r * v:
        # flat rows: one compare over them is cheaper than gathering the blocks' tokens. Over
        # every row (the rows not to do get no candidates), not over a copy of the rows to do:
        # a fresh 16 MB tensor per group of 2^22 logits, ~10 ms with its page faults
        n = rows.z_t.shape[0]
        mask = rows.ws.get("above", n, torch.bool)
        if r == n:
            ge_rows(rows.z_t, tau_raw, mask)
            flat = flat_nonzero(mask)
            loc = floor_div(flat, v)
        else:
            ge_rows(rows.z_t, tau_raw.new_full((n,), math.inf).index_copy_(0, todo, tau_raw), mask)
            if not bool(rows.lse_t.isfinite().all()):  # a +inf logit is >= inf: clear those rows
                skip = torch.ones(n, dtype=torch.bool, device=todo.device).index_fill_(0, todo, False)
                mask.index_fill_(0, skip.nonzero().squeeze(1), False)
            flat = flat_nonzero(mask)
            in_todo = torch.full((n,), -1, dtype=torch.long, device=todo.device)
            loc = in_todo.index_copy_(0, todo, torch.arange(r, device=todo.device)).index_select(
                0, floor_div(flat, v)
            )
    else:
        loc, blk = _nonzero_2d(above)  # (Mb,) row in todo, block
        cols = block_cols(blk, v)  # (Mb, _BLOCK)
        flat = (todo.index_select(0, loc) * v)[:, None] + cols.clamp(max=v - 1)
        z = take(rows.z_t, flat)
        keep = flat_nonzero((z >= tau_raw.index_select(0, loc)[:, None]) & (cols < v))
        loc = loc.index_select(0, keep // _BLOCK)
        flat = flat.view(-1).index_select(0, keep)
    return ok & _head_of_candidates(rows, todo, loc, flat, tau - bm.amax(-1), mu, heads)


def flat_nonzero(mask: Tensor) -> Tensor:
    """Positions (int64, ascending) of the True entries of a bool mask, flattened: torch's
    ``mask.view(-1).nonzero()`` squeezed. On CPU through numpy's ``flatnonzero`` on the same
    memory (no copy): 2.1x faster on the real T = 2 masks (71 M entries, 3.6 % true: 38 ms
    against 80, one thread), and the compare path's compaction is the largest op of AKL's head
    search there."""
    if mask.device.type == "cpu" and mask.numel() > _NUMPY_NONZERO_OVER:
        at = torch.from_numpy(np.flatnonzero(mask.contiguous().view(-1).numpy()))
        return at if at.dtype == torch.long else at.long()
    return mask.reshape(-1).nonzero().squeeze(1)


def ge_rows(z: Tensor, thr: Tensor, out: Tensor) -> Tensor:
    """out = z >= thr[:, None] (z (R, V), thr (R,), out bool (R, V)). On CPU through numpy on the
    same memory for fp32 / fp64: torch's compare into a bool tensor is not vectorised there
    (1.8 ms against numpy's 0.4 on a (85, 49152) group of real logits, one thread), and this
    compare over the whole group is the largest op of AKL's head search on flat rows (T = 2)."""
    if (
        z.device.type == "cpu"
        and z.dtype in (torch.float32, torch.float64)
        and z.numel() > _NUMPY_NONZERO_OVER
        and out.is_contiguous()
    ):
        np.greater_equal(z.detach().numpy(), thr.to(z.dtype)[:, None].numpy(), out=out.numpy())
        return out
    return torch.ge(z, thr[:, None], out=out)


def floor_div(x: Tensor, v: int) -> Tensor:
    """x // v for nonnegative int64 x (flat indices -> rows); numpy's on CPU for large x (3x faster)."""
    if x.device.type == "cpu" and x.numel() > _NUMPY_NONZERO_OVER:
        return torch.from_numpy(x.numpy() // v)
    return x // v


def _index_dtype(n: int) -> torch.dtype:
    """int32 for bucket ids below n when they fit: converting floats to int32 and counting them
    measured 2-6x faster than with int64 on CPU (the histograms of the threshold stage)."""
    return torch.int32 if n < 2**31 else torch.long


def take(x: Tensor, flat: Tensor) -> Tensor:
    """x.take(flat) (any shape of flat), as an index_select of the flat view (2.5x faster on CPU
    than ``take``), or numpy's ``take`` on the same memory for large fp32 / fp64 gathers on CPU
    (1.7x faster than the index_select: the candidates of the T = 2 head search, ~140 k a group)."""
    xf = x.reshape(-1)
    if (
        x.device.type == "cpu"
        and flat.numel() > _NUMPY_NONZERO_OVER
        and x.dtype in (torch.float32, torch.float64)
    ):
        return torch.from_numpy(np.take(xf.detach().numpy(), flat.reshape(-1).numpy())).view(flat.shape)
    return xf.index_select(0, flat.reshape(-1)).view(flat.shape)


def _nonzero_2d(mask: Tensor) -> tuple[Tensor, Tensor]:
    """(row, column) of the True entries of a 2-D mask, row-major."""
    at = flat_nonzero(mask)
    return at // mask.shape[1], at % mask.shape[1]


def _count_at_most(cum: Tensor, mu: float) -> Tensor:
    """(r, 1) how many entries of each row of ``cum`` (r, n), nondecreasing, are <= mu: a binary
    search (a compare and a bool sum over the rows measured ~50x slower on CPU)."""
    return torch.searchsorted(cum, cum.new_full((cum.shape[0], 1), mu), right=True)


def _head_of_candidates(rows: HeadRows, todo, loc, flat, low, mu, heads: Heads) -> Tensor:
    """Head of rows given every token above a threshold whose mass exceeds mu, flat.

    loc (M,): row (in todo) of each candidate, ascending; flat: its flat index; low: per row of
    todo, the threshold below the row's largest tempered logit (tau - z_max <= 0, in nats; not
    finite for a row with no candidates). The same as a sort of the candidates, without it: a fine
    histogram of log max(p) - log p (_FINE_WIDTH nats; = z_max - z / T) gives each bucket's
    mass; the tokens of the buckets before the one where the cumulative mass first exceeds mu are
    the head, and only that boundary bucket's few tokens are sorted (by p) and cut by the
    cumulative rule. Each op here runs over all M candidates (~1600 per row of real logits at
    T = 2), so they are kept few; p is read from the rows' p (no logits gathered). Returns the
    rows settled.
    """
    r = todo.numel()
    scale = 1.0 / _FINE_WIDTH
    # as many buckets as the candidates span (a few nats at T = 2), a margin for rounding
    span = (low * -scale).masked_fill_(~low.isfinite(), 0.0)
    nf = int(span.max()) + 3 if r else 1
    p32 = take(rows.p, flat)
    # bucket id, offset by row: floor(row nf + 0.5 + (log max p - log p) / _FINE_WIDTH): monotone
    # in p, so the buckets are ranges of the sorted row (p <= max p: ids >= row nf)
    zo = rows.p_max.index_select(0, todo).log().mul_(scale)
    zo += torch.arange(r, dtype=zo.dtype, device=zo.device) * nf + 0.5
    ids = torch.sub(zo.index_select(0, loc), p32.log(), alpha=scale).to(_index_dtype(r * nf))
    p = p32.double()
    cum = torch.bincount(ids, weights=p, minlength=r * nf).view(r, nf).cumsum(-1)
    last = _count_at_most(cum, mu)  # (r, 1) the boundary bucket
    ok = (last < nf).squeeze(1)
    last = last.clamp_(max=nf - 1)
    m0 = torch.where(last > 0, cum.gather(-1, (last - 1).clamp_(min=0)), 0.0).squeeze(1)
    n0 = torch.bincount(ids, minlength=r * nf).view(r, nf).cumsum(-1)
    n0 = torch.where(last > 0, n0.gather(-1, (last - 1).clamp_(min=0)), 0).squeeze(1)
    id_last = (
        (last.squeeze(1) + torch.arange(0, r * nf, nf, device=loc.device)).to(ids.dtype).index_select(0, loc)
    )
    before = ids < id_last
    loc_all, flat_all = loc, flat
    # the boundary bucket's tokens, sorted per row by p ((r, k) padded with -1)
    at = flat_nonzero(ids == id_last)
    loc, p, f = (x.index_select(0, at) for x in (loc, p, flat))
    count = torch.bincount(loc, minlength=r)
    k = max(int(count.max()) if loc.numel() else 0, 1)
    pos = (
        loc * k
        + torch.arange(loc.numel(), device=loc.device)
        - (count.cumsum(0) - count).index_select(0, loc)
    )
    p_s, order = (
        torch.full((r * k,), -1.0, dtype=p.dtype, device=p.device)
        .index_copy_(0, pos, p)
        .view(r, k)
        .sort(-1, descending=True)
    )
    pad = p_s < 0
    p_s = p_s.clamp_(min=0.0)
    f_s = (
        torch.zeros(r * k, dtype=f.dtype, device=f.device).index_copy_(0, pos, f).view(r, k).gather(-1, order)
    )
    c = p_s.cumsum(-1) + m0[:, None]
    head = (c <= mu) & ~pad
    head[:, 0] |= n0 == 0  # the top-1 token is always in the head
    done = ok & ((c > mu) & ~pad).any(-1)
    keep = before if bool(done.all()) else before & done.index_select(0, loc_all)
    heads.add(flat_all.index_select(0, flat_nonzero(keep)))
    heads.add(f_s[head & done[:, None]])
    heads.size[todo[done]] = (n0 + head.sum(-1))[done].to(heads.size.dtype)
    return done


def _head_from_blocks(rows, mu, heads: Heads, todo, bmax, blocks: int, keep: int) -> Tensor:
    """One stage of head_tokens over rows ``todo``, candidates from the top ``blocks`` blocks."""
    top_b, bidx = bmax.topk(blocks + 1, dim=-1)  # (R, blocks + 1)
    # top_b[:, -1:]: the largest logit outside the candidate blocks
    return _head_of_blocks(rows, mu, heads, todo, bidx[:, :-1], top_b[:, -1:], keep)


def _head_from_pyramid(rows: HeadRows, mu: float, heads: Heads, todo: Tensor, bmax: Tensor) -> Tensor:
    """Stage of head_tokens for short heads at large V: the blocks of 8 are grouped into blocks of 64
    (``block_max`` of the block maxima: block J holds the blocks J, J + nb64, ...), the best
    _PYRAMID_BLOCKS blocks of 8 are found among those of the best _PYRAMID_BLOCKS blocks of 64,
    and their tokens are the candidates (``_head_of_blocks``). Every token outside them is at
    most the larger of the two bounds (the best block of 64 left out, the best block of 8 left
    out of the candidate groups), so the sorted candidates above it are the top of the full sort.
    Only rows that can settle are looked at: a boundary within the first _PYRAMID_KEEP tokens
    needs _PYRAMID_KEEP * max(p) > mu. Returns the rows settled (a mask over ``todo``).
    """
    done = torch.zeros(todo.numel(), dtype=torch.bool, device=todo.device)
    nb = bmax.shape[1]
    nb64 = n_blocks(nb)
    if nb64 <= _PYRAMID_BLOCKS:
        return done
    can = (rows.p_max.index_select(0, todo) * _PYRAMID_KEEP > mu).nonzero().squeeze(1)
    if can.numel() == 0:
        return done
    sub = todo.index_select(0, can)
    # bmax has every row of the chunk; only the (r, nb / 8) maxima of its rows ``sub`` are copied
    top64, j64 = block_max(bmax).index_select(0, sub).topk(_PYRAMID_BLOCKS + 1, dim=-1)
    groups = block_cols(j64[:, :-1], nb).flatten(1)  # (r, 8 * blocks) ids of blocks of 8
    inside = groups < nb
    groups = groups.clamp_(max=nb - 1)
    top8 = take(bmax, groups + (sub * nb)[:, None]).masked_fill_(~inside, -math.inf)
    top8, j8 = top8.topk(_PYRAMID_BLOCKS + 1, dim=-1)
    bound = torch.maximum(top64[:, -1:], top8[:, -1:])
    blocks = groups.gather(-1, j8[:, :-1])
    done[can] = _head_of_blocks(rows, mu, heads, sub, blocks, bound, _PYRAMID_KEEP)
    return done


def _head_of_blocks(rows, mu, heads: Heads, todo, bidx: Tensor, bound: Tensor, keep: int) -> Tensor:
    """Settle the rows ``todo`` from the tokens of the candidate blocks ``bidx`` (R, blocks), every
    other token's logit being at most ``bound`` (R, 1); returns the mask of rows settled."""
    v = rows.z_t.shape[1]
    cols = block_cols(bidx, v).flatten(1)
    inside = cols < v  # the last block may be short
    # gather the candidates straight from the full (R, V) tensors, by flat index: copying the
    # rows left (rows.p[todo], ...) cost more than the whole search
    flat = cols.clamp_(max=v - 1).add_((todo * v)[:, None])
    cand = rows.z_take(flat).masked_fill_(~inside, -math.inf)
    cand, order = cand.topk(min(keep, cand.shape[1]), dim=-1)  # sorted; cheaper than a sort
    flat = flat.gather(-1, order)
    pad = cand == -math.inf
    p_c = take(rows.p, flat).masked_fill_(pad, 0.0)
    return _head_of_sorted(p_c, flat, mu, heads, todo, cand > bound)


def head_gap_by_sort(p: Tensor, q: Tensor, mu: float) -> tuple[Tensor, Tensor]:
    """(g_head, head_size) per row, by the definition: sort p, keep the prefix with c_i <= mu.

    p, q: (R, V) probabilities. The reference ``head_gap`` is tested against.
    """
    idx, head = head_by_sort(p, mu)
    g_head = torch.where(head, (p - q).abs().gather(-1, idx), 0.0).sum(-1)
    return g_head, head.sum(-1).to(p.dtype)


def head_by_sort(p: Tensor, mu: float) -> tuple[Tensor, Tensor]:
    """(idx, head): the columns of p (R, V) sorted by p descending, and which of them are the head
    (the prefix with c_i <= mu, and the top-1 token always): ``head_tokens``' last stage."""
    p_sorted, idx = p.sort(-1, descending=True)
    head = p_sorted.cumsum(-1) <= mu
    head[:, 0] = True  # the top-1 token is always in the head (covers p_top1 > mu)
    return idx, head
