"""A Triton kernel for FKL, RKL, FKL+RKL, AKL and AKL-r: one program per row of logits.

The same as ``akl_core.divergences`` (the reference and the CPU path), per token, without a sort
and without (N, V) fp32 temporaries. Each program streams its row of teacher and student logits
in tiles of BLOCK tokens, in fp32:
1. online max / sum-exp of z_t = t / T and z_s = s / T (both log-normalisers);
2. (AKL only) the head boundary: a search over the teacher's logits (below), teacher only;
3. FKL, RKL, sum |p - q| and, for AKL, g_head and the head size;
4. the gradient wrt the student logits, written once in the gradient buffer's dtype (it may be
   the student logits themselves: each element is read before it is overwritten, by the same
   program).

The head (docs/method.md, ``divergences.head.head_gap``): sort p descending, token i is in the head when
its cumulative mass c_i <= mu; the top-1 token always is; tied tokens sort by index (the stable
sort of tests/akl_core/test_divergences_reference.py). p is monotone in z_t, so the head is every
token whose z_t lies above a threshold, plus the first few (by index) of one group of tokens
tied at the boundary value. The search keeps an interval [lo, hi) of order-preserving integer
keys of z_t with M(lo) > mu >= M(hi), M(x) = the mass of the tokens whose key is >= x; each pass
measures M at NT thresholds (the first at geometric distances below the top logit, then evenly
inside the interval) and the smallest / largest key of the tokens inside it, and narrows to those. It stops when one distinct value is left (the boundary group). Rows whose
top-1 p exceeds mu (most rows of an LLM teacher) skip it: their head is their first top-1 token.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

KINDS = {"fkl": 0, "rkl": 1, "fkl_rkl": 2, "akl": 3, "akl_r": 4}
# per-row results, columns of the (R, 8) output
COLUMNS = ("loss", "fkl", "rkl", "g_head", "g_tail", "w_head", "head_size")
_INT32_MAX = tl.constexpr(2147483647)
_BIG = tl.constexpr(9223372036854775807)


@triton.jit
def _key(z):
    """Integer keys with the order of the fp32 values z (negative floats flip their low bits)."""
    b = z.to(tl.int32, bitcast=True)
    return b ^ ((b >> 31) & 0x7FFFFFFF)


@triton.jit
def _tile(ptr, cols, ok, temp):
    return tl.load(ptr + cols, mask=ok, other=float("-inf")).to(tl.float32) / temp


@triton.jit
def _normaliser(ptr, V, temp, BLOCK: tl.constexpr):
    """(lse, max, smallest key) of the row z = x / T, in one pass (online max / sum-exp)."""
    offs = tl.arange(0, BLOCK)
    m = tl.full((), float("-inf"), tl.float32)
    acc = tl.full((), 0.0, tl.float32)
    kmin = tl.full((), _INT32_MAX, tl.int32)
    for start in range(0, V, BLOCK):
        cols = start + offs
        ok = cols < V
        z = _tile(ptr, cols, ok, temp)
        m_new = tl.maximum(m, tl.max(z, 0))
        # while the row is all -inf so far, m_new is -inf and nothing is added
        safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        acc = acc * tl.exp(m - safe) + tl.sum(tl.exp(z - safe), 0)
        m = m_new
        kmin = tl.minimum(kmin, tl.min(tl.where(ok, _key(z), _INT32_MAX), 0))
    return m + tl.log(acc), m, kmin.to(tl.int64)


@triton.jit
def _search(
    t_row, V, temp, lse_t, m_t, kmax, kmin, skip, mu, BLOCK: tl.constexpr, NT: tl.constexpr, MAX_PASSES
):
    """The boundary group: (its key, M above it, its p, its count). See the module docstring.

    skip: the row is peaked (top-1 p > mu): no pass, the group is the top-1 value (lo = kmin).
    The first pass measures M at m_t - 2**(j - 4) nats (j < NT): a trained teacher's head is a
    few tokens within a few nats of its top, so one pass leaves an interval holding few tokens;
    later passes split the interval evenly in key space. Any threshold is a valid measurement:
    the interval takes the largest one with M > mu and the smallest with M <= mu.
    """
    offs = tl.arange(0, BLOCK)
    steps = tl.arange(0, NT).to(tl.int64) + 1
    first = _key(m_t - tl.exp2(tl.arange(0, NT).to(tl.float32) - 4.0)).to(tl.int64)
    lo = kmin
    hi = kmax + 1
    m_hi = tl.full((), 0.0, tl.float32)
    g_p = tl.full((), 0.0, tl.float32)
    g_n = tl.full((), 0, tl.int64)
    done = skip.to(tl.int32)
    passes = 0
    while (done == 0) & (passes < MAX_PASSES):
        # (NT,) in (lo, hi] after the first pass; int64 arithmetic, int32 compares (keys of
        # finite / inf z fit)
        thr = tl.where(passes == 0, first, lo + ((hi - lo) * steps) // (NT + 1))
        thr32 = tl.minimum(thr, _INT32_MAX).to(tl.int32)
        lo32 = lo.to(tl.int32)
        hi32 = tl.minimum(hi, _INT32_MAX).to(tl.int32)
        mass = tl.zeros((NT,), tl.float32)
        k_lo = tl.full((), _INT32_MAX, tl.int32)
        k_hi = tl.full((), -_INT32_MAX, tl.int32)
        n_in = tl.full((), 0, tl.int32)
        p_in = tl.full((), 0.0, tl.float32)
        for start in range(0, V, BLOCK):
            cols = start + offs
            ok = cols < V
            z = _tile(t_row, cols, ok, temp)
            key = _key(z)
            p = tl.where(ok, tl.exp(z - lse_t), 0.0)
            mass += tl.sum(tl.where(key[:, None] >= thr32[None, :], p[:, None], 0.0), 0)
            inside = ok & (key >= lo32) & (key < hi32)
            k_lo = tl.minimum(k_lo, tl.min(tl.where(inside, key, _INT32_MAX), 0))
            k_hi = tl.maximum(k_hi, tl.max(tl.where(inside, key, -_INT32_MAX), 0))
            n_in += tl.sum(inside.to(tl.int32), 0)
            p_in = tl.maximum(p_in, tl.max(tl.where(inside, p, 0.0), 0))
        k_lo = k_lo.to(tl.int64)
        k_hi = k_hi.to(tl.int64)
        one = k_lo == k_hi
        above = mass > mu
        new_lo = tl.maximum(tl.max(tl.where(above, thr, lo), 0), k_lo)
        t_hi = tl.min(tl.where(above, _BIG, thr), 0)
        # M at the new hi: the thresholds' mass; the shrink to k_hi + 1 leaves M unchanged
        m_at = tl.max(tl.where((thr == t_hi) & ~above, mass, -1.0), 0)
        m_hi = tl.where(one, m_hi, tl.where(t_hi < hi, m_at, m_hi))
        new_hi = tl.minimum(tl.minimum(t_hi, hi), k_hi + 1)
        lo = tl.where(one, k_lo, new_lo)
        hi = tl.where(one, k_lo + 1, new_hi)
        g_p = p_in
        g_n = n_in.to(tl.int64)
        done = one.to(tl.int32)
        passes += 1
    return lo, m_hi, g_p, g_n


@triton.jit
def _divergence_rows_kernel(
    s_ptr,
    t_ptr,
    g_ptr,
    out_ptr,
    rows_ptr,
    V,
    stride_s,
    stride_t,
    stride_g,
    temp,
    mu,
    MAX_PASSES,
    HAS_ROWS: tl.constexpr,
    KIND: tl.constexpr,
    HEAD: tl.constexpr,
    GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
    SBLOCK: tl.constexpr,
    NT: tl.constexpr,
):
    pid = tl.program_id(0)
    if HAS_ROWS:
        row = tl.load(rows_ptr + pid).to(tl.int64)
    else:
        row = pid.to(tl.int64)
    s_row = s_ptr + row * stride_s
    t_row = t_ptr + row * stride_t
    offs = tl.arange(0, BLOCK)

    # 1. log-normalisers
    lse_t, m_t, kmin = _normaliser(t_row, V, temp, BLOCK)
    lse_s, m_s, _ = _normaliser(s_row, V, temp, BLOCK)

    # 2. the head boundary: key b of the boundary group, M_hi = mass above it, its p and count
    kmax = _key(m_t).to(tl.int64)
    p_max = tl.exp(m_t - lse_t)
    peaked = p_max > mu
    if HEAD:
        b, m_hi, g_p, g_n = _search(
            t_row, V, temp, lse_t, m_t, kmax, tl.where(peaked, kmax, kmin), peaked, mu, SBLOCK, NT, MAX_PASSES
        )
        # the first `take` tokens of the group (by index) are head: M_hi + take * p <= mu;
        # the top-1 token always is
        take_f = tl.minimum(tl.maximum((mu - m_hi) / tl.maximum(g_p, 1e-38), 0.0), g_n.to(tl.float32))
        take = tl.floor(take_f).to(tl.int64)
        take = tl.where(b == kmax, tl.maximum(take, 1), take)
    else:
        b = kmax
        take = tl.full((), 0, tl.int64)

    # 3. FKL, RKL, sum |p - q|, g_head, head size
    fkl = tl.full((), 0.0, tl.float32)
    rkl = tl.full((), 0.0, tl.float32)
    gap = tl.full((), 0.0, tl.float32)
    g_head = tl.full((), 0.0, tl.float32)
    size = tl.full((), 0, tl.int32)
    seen = tl.full((), 0, tl.int32)  # group tokens before this tile
    b32 = tl.minimum(b, _INT32_MAX).to(tl.int32)
    take32 = tl.minimum(take, _INT32_MAX).to(tl.int32)
    for start in range(0, V, BLOCK):
        cols = start + offs
        ok = cols < V
        z_t = _tile(t_row, cols, ok, temp)
        lp = z_t - lse_t
        lq = _tile(s_row, cols, ok, temp) - lse_s
        p = tl.exp(lp)
        q = tl.exp(lq)
        fkl += tl.sum(tl.where(p > 0, p * (lp - lq), 0.0), 0)
        rkl += tl.sum(tl.where(q > 0, q * (lq - lp), 0.0), 0)
        e = tl.abs(p - q)
        gap += tl.sum(e, 0)
        if HEAD:
            key = _key(z_t)  # the search's keys: from z_t itself, not lp + lse_t
            group = ok & (key == b32)
            rank = seen + tl.cumsum(group.to(tl.int32), 0)
            head = ok & ((key > b32) | (group & (rank <= take32)))
            g_head += tl.sum(tl.where(head, e, 0.0), 0)
            size += tl.sum(head.to(tl.int32), 0)
            seen += tl.sum(group.to(tl.int32), 0)
    g_tail = tl.maximum(gap - g_head, 0.0)
    w_head = tl.where(gap > 0, g_head / tl.maximum(gap, 1e-38), 0.5)
    if KIND == 0:
        w_f = 1.0
    elif KIND == 1:
        w_f = 0.0
    elif KIND == 2:
        w_f = 0.5
    elif KIND == 3:
        w_f = w_head
    else:
        w_f = 1.0 - w_head
    w_r = 1.0 - w_f
    if KIND == 0:
        loss = fkl
    elif KIND == 1:
        loss = rkl
    else:
        loss = w_f * fkl + w_r * rkl
    out = out_ptr + pid.to(tl.int64) * 8
    tl.store(out + 0, loss)
    tl.store(out + 1, fkl)
    tl.store(out + 2, rkl)
    tl.store(out + 3, g_head)
    tl.store(out + 4, g_tail)
    tl.store(out + 5, w_head)
    tl.store(out + 6, size.to(tl.float32))

    # 4. gradient wrt the student logits: (w_f (q - p) - w_r q (log p - log q + RKL)) / T
    if GRAD:
        g_row = g_ptr + row * stride_g
        for start in range(0, V, BLOCK):
            cols = start + offs
            ok = cols < V
            lp = _tile(t_row, cols, ok, temp) - lse_t
            lq = _tile(s_row, cols, ok, temp) - lse_s
            p = tl.exp(lp)
            q = tl.exp(lq)
            if KIND == 0:
                g = q - p
            else:
                g_r = tl.where(q > 0, q * (lp - lq + rkl), 0.0)
                g = w_f * (q - p) - w_r * g_r
            tl.store(g_row + cols, (g / temp).to(g_ptr.dtype.element_ty), mask=ok)


def divergence_rows(
    name: str,
    s: Tensor,
    t: Tensor,
    *,
    mu: float,
    temperature: float,
    head: bool,
    rows: Tensor | None = None,
    grad: Tensor | None = None,
    block: int | None = None,
    search_block: int | None = None,
    thresholds: int = 16,
) -> Tensor:
    """Per-row results (R, 8) fp32, columns ``COLUMNS``; the gradient into ``grad`` when given.

    s, t: (N, V) student and teacher logits, unit stride along V, any float dtype.
    rows: int64 indices of the rows to compute (R of them), or None for all N.
    grad: (N, V) buffer for the gradient wrt s (may be s itself); rows not computed are untouched.
    head: also find AKL's head (always for akl / akl_r).
    block, search_block: tokens per tile (powers of two); thresholds: NT, a power of two.
    """
    n, v = s.shape
    assert t.shape == s.shape and s.stride(-1) == 1 and t.stride(-1) == 1
    r = n if rows is None else rows.numel()
    out = torch.zeros(r, 8, dtype=torch.float32, device=s.device)
    if r == 0:
        return out
    block = block or min(4096, triton.next_power_of_2(v))
    search_block = search_block or min(1024, block)
    if grad is not None:
        assert grad.shape == s.shape and grad.stride(-1) == 1
    kind = KINDS[name]
    _divergence_rows_kernel[(r,)](
        s,
        t,
        grad if grad is not None else s,
        out,
        rows if rows is not None else out,
        v,
        s.stride(0),
        t.stride(0),
        grad.stride(0) if grad is not None else 0,
        float(temperature),
        float(mu),
        64,
        HAS_ROWS=rows is not None,
        KIND=kind,
        HEAD=head or kind >= 3,
        GRAD=grad is not None,
        BLOCK=block,
        SBLOCK=search_block,
        NT=thresholds,
        num_warps=8 if block >= 2048 else 4,
    )
    return out
