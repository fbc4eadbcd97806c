"""akl_core.sparse and akl_core.sparse_fused: divergences from a stored top-k teacher.

Three kinds of check: a float64 reference written straight from the coarse-grained formulas
(docs/method.md, "On a stored top-k teacher"; the student's bucket summed from its dense softmax,
gradients by autograd), the dense divergences (k = V, data-processing inequality), and the
contract of the dense ``compute`` (masking, chunking, options, errors).
"""

from __future__ import annotations

import math

import pytest
import torch

from akl_core import divergences, sparse
from akl_core.divergences import NAMES, STAT_NAMES, DivergenceOutput, compute
from akl_core.fused import compute_fused
from akl_core.sparse import SPARSE_STAT_NAMES, compute_sparse, sparse_chunk, teacher_log_probs
from akl_core.sparse_fused import compute_sparse_fused

try:
    from .test_divergences_reference import _kl, _log
except ImportError:  # rootdir-style import (tests/akl_core has no __init__.py)
    from test_divergences_reference import _kl, _log

F_DIVERGENCES = ("fkl", "rkl", "skl", "srkl", "tvd", "jsd")  # data-processing inequality holds
FINITE_WITH_TEACHER_ONLY_INF = ("fkl", "skl", "srkl", "tvd", "jsd")


# ---------------------------------------------------------------------------- the reference


def reference_sparse_terms(name, s, ids, lp, tail, mu=0.5, temperature=1.0, lam=0.1, beta=0.5):
    """Per-token loss (N,) and stats, float64: q from the dense softmax, Q_r = sum of q off K."""
    q = torch.softmax(s.double() / temperature, -1)  # (N, V)
    ids = ids.long()
    off = torch.ones_like(q, dtype=torch.bool).scatter(-1, ids, False)
    q_coarse = torch.cat([q.gather(-1, ids), torch.where(off, q, 0.0).sum(-1, keepdim=True)], -1)
    w = torch.exp(torch.cat([lp.double(), tail.double()[:, None]], -1) / temperature)
    p_coarse = w / w.sum(-1, keepdim=True)  # the T = 1 cache re-tempered over the k + 1 outcomes
    p, lp_, lq = p_coarse, _log(p_coarse), _log(q_coarse)
    fkl, rkl = _kl(p, lp_, lq), _kl(q_coarse, lq, lp_)
    # the head: the dense rule on the sorted top-k of p; the bucket is tail
    p_k, order = torch.sort(p[:, :-1], dim=-1, descending=True, stable=True)
    cum = p_k.cumsum(-1)
    head = cum <= mu
    head[:, 0] = True
    gaps = (p_k - q_coarse[:, :-1].gather(-1, order)).abs()
    g_head = (gaps * head).sum(-1).detach()
    g_tail = ((gaps * ~head).sum(-1) + (p[:, -1] - q_coarse[:, -1]).abs()).detach()
    total = g_head + g_tail
    w_head = torch.where(total > 0, g_head / torch.where(total > 0, total, 1.0), 0.5)
    stats = {
        "fkl": fkl.detach(),
        "rkl": rkl.detach(),
        "g_head": g_head,
        "g_tail": g_tail,
        "w_head": w_head,
        "head_size": head.sum(-1).double(),
        "head_truncated": (p[:, :-1].sum(-1) < mu).double(),
    }
    qc = q_coarse
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
        loss = _kl(p, lp_, _log(lam * p + (1 - lam) * qc))
    elif name == "srkl":
        loss = _kl(qc, lq, _log((1 - lam) * p + lam * qc))
    elif name == "tvd":
        loss = 0.5 * (p - qc).abs().sum(-1)
    elif name == "jsd":
        lm = _log(beta * p + (1 - beta) * qc)
        loss = beta * _kl(p, lp_, lm) + (1 - beta) * _kl(qc, lq, lm)
    else:
        raise KeyError(name)
    return loss, stats


def reference_sparse(name, s, ids, lp, tail, labels, ignore_index=-100, **options):
    """(mean loss, loss sum, num_tokens, stats means) over the kept tokens; float64."""
    v, k = s.shape[-1], ids.shape[-1]
    keep = labels.reshape(-1) != ignore_index
    rows = (x.reshape(-1, *x.shape[len(labels.shape) :])[keep] for x in (s, ids, lp, tail))
    loss, stats = reference_sparse_terms(name, *rows, **options)
    assert k <= v
    n = int(keep.sum())
    total = loss.sum()
    return total / max(n, 1), total, n, {key: float(x.sum()) / max(n, 1) for key, x in stats.items()}


def test_reference_pinned_values():
    # p = (0.5, 0.2, 0.2, 0.1), K = {0, 1}, P_r = 0.3; q = (0.4, 0.4, 0.1, 0.1), Q_r = 0.2.
    # head: c = 0.5 <= mu, then 0.7 > mu: {0}; g_head = 0.1, g_tail = 0.2 + |0.3 - 0.2| = 0.3
    p = torch.tensor([[0.5, 0.2, 0.2, 0.1]], dtype=torch.float64)
    s = torch.tensor([[0.4, 0.4, 0.1, 0.1]], dtype=torch.float64).log()
    ids, lp, tail = torch.tensor([[1, 0]]), p[:, [1, 0]].log(), torch.tensor([0.3], dtype=torch.float64).log()
    fkl = 0.5 * math.log(0.5 / 0.4) + 0.2 * math.log(0.2 / 0.4) + 0.3 * math.log(0.3 / 0.2)
    rkl = 0.4 * math.log(0.4 / 0.5) + 0.4 * math.log(0.4 / 0.2) + 0.2 * math.log(0.2 / 0.3)
    loss, st = reference_sparse_terms("akl", s, ids, lp, tail)
    assert st["head_size"].item() == 1 and st["head_truncated"].item() == 0
    assert math.isclose(st["g_head"].item(), 0.1) and math.isclose(st["g_tail"].item(), 0.3)
    assert math.isclose(loss.item(), 0.25 * fkl + 0.75 * rkl)
    out = compute_sparse("akl", s.float(), ids, lp.float(), tail.float(), torch.zeros(1, dtype=torch.long))
    assert math.isclose(out.loss.item(), 0.25 * fkl + 0.75 * rkl, rel_tol=1e-5)
    assert math.isclose(out.stats["w_head"], 0.25, rel_tol=1e-5)


# ---------------------------------------------------------------------------- cases


def make_cache(t: torch.Tensor, k: int, dtype=torch.float32, seed: int = 0):
    """The stored teacher at T = 1 from logits (..., V): top-k ids in a shuffled order, their
    log-probs, the tail log-mass (a log-sum-exp of the rest, float64, then cast)."""
    lp_full = torch.log_softmax(t.double(), -1)
    lp_k, ids = lp_full.topk(k, -1)
    g = torch.Generator().manual_seed(seed)
    perm = torch.rand(ids.shape, generator=g).argsort(-1)  # the top-k in any order
    ids, lp_k = ids.gather(-1, perm), lp_k.gather(-1, perm)
    tail = lp_full.scatter(-1, ids, -math.inf).logsumexp(-1)
    return ids, lp_k.to(dtype), tail.to(dtype)


def make_case(kind: str, seed: int = 0):
    """(student, teacher logits, labels, k, options, cache dtype) for one named situation."""
    g = torch.Generator().manual_seed(seed)
    opts: dict = {}
    dtype, cache_dtype = torch.float32, torch.float32
    shape, scale, k = (3, 7, 131), 3.0, 8
    if kind == "flat":  # top-k mass < mu: head_truncated rows
        shape, scale, k = (2, 5, 517), 0.05, 16
    elif kind == "peaked":
        shape, scale = (4, 9, 67), 12.0
    elif kind == "temp_hot":
        shape, opts = (2, 6, 97), {"temperature": 2.5}
    elif kind == "temp_cold":
        shape, scale, opts = (2, 6, 97), 1.0, {"temperature": 0.6}
    elif kind == "bf16":
        shape, dtype, cache_dtype = (2, 5, 89), torch.bfloat16, torch.bfloat16
    elif kind == "fp16":
        shape, dtype, cache_dtype = (2, 5, 89), torch.float16, torch.float16
    elif kind == "mu03":
        opts = {"mu": 0.3, "lam": 0.3, "beta": 0.2}
    elif kind == "mu09":
        opts = {"mu": 0.9, "lam": 0.0, "beta": 0.8}
    elif kind == "k1":
        k = 1
    elif kind == "k_big":
        k = 120
    elif kind == "extreme":  # logits far apart; Q_r below fp32's smallest number: log space
        scale = 40.0
    elif kind in ("wide", "wide_inf"):
        shape, scale, k = (4, 6, 1000), 2.0, 64
    elif kind == "flat_n":
        shape, scale = (17, 29), 0.2
    elif kind not in ("odd", "neg_inf"):
        raise KeyError(kind)
    s = torch.randn(shape, generator=g) * scale
    t = torch.randn(shape, generator=g) * scale
    if kind == "peaked":
        t[..., 3] += 15.0
    if kind == "extreme":  # the student's mass all on the teacher's top-k: Q_r < exp(-150)
        top = t[0].topk(k, -1).indices
        s[0].scatter_add_(-1, top, torch.full(top.shape, 400.0))
    if kind.startswith("wide"):  # rows of every kind: peaked, flat, a few strong tokens
        t[0] += 12.0 * (torch.arange(shape[-1]) == 700)
        t[1] *= 0.05
        t[2, :, 100:140] += 4.0
        t[3, :, ::97] += 6.0
    if kind == "wide_inf":  # masked vocabulary in both; the top-64 holds none of it
        for x in (s, t):
            x[..., 960:] = -math.inf
            x[..., 130:200] = -math.inf
    if kind == "neg_inf":  # a masked vocabulary slice, the same in teacher and student
        for x in (s, t):
            x[..., -9:] = -math.inf
            x[..., 5] = -math.inf
    labels = torch.randint(0, shape[-1], shape[:-1], generator=g)
    labels.view(-1)[::4] = -100
    return s.to(dtype), t, labels, k, opts, cache_dtype


CASES = (
    "odd",
    "flat",
    "peaked",
    "temp_hot",
    "temp_cold",
    "bf16",
    "fp16",
    "mu03",
    "mu09",
    "neg_inf",
    "k1",
    "k_big",
    "extreme",
    "flat_n",
    "wide",
    "wide_inf",
)


def _ours_and_ref(name, s, ids, lp, tail, labels, opts):
    s1 = s.clone().requires_grad_()
    out = compute_sparse(name, s1, ids, lp, tail, labels, all_stats=True, **opts)
    (grad,) = torch.autograd.grad(out.loss, s1)
    s64 = s.double().requires_grad_()
    ref_loss, ref_sum, ref_n, ref_stats = reference_sparse(name, s64, ids, lp, tail, labels, **opts)
    (ref_grad,) = torch.autograd.grad(ref_loss, s64)
    return out, grad, (ref_loss, ref_sum, ref_n, ref_stats, ref_grad)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("name", NAMES)
def test_matches_float64_reference(name, case):
    s, t, labels, k, opts, cache_dtype = make_case(case)
    ids, lp, tail = make_cache(t, k, cache_dtype)
    out, grad, (ref_loss, ref_sum, ref_n, ref_stats, ref_grad) = _ours_and_ref(
        name, s, ids, lp, tail, labels, opts
    )
    assert out.num_tokens == ref_n
    assert out.loss.dtype == torch.float32 and grad.dtype == s.dtype
    low = s.dtype != torch.float32
    torch.testing.assert_close(out.loss.double(), ref_loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss_sum.double(), ref_sum.detach(), rtol=1e-5, atol=1e-5)
    scale = ref_grad.abs().max().item()
    torch.testing.assert_close(
        grad.double(), ref_grad, rtol=1e-2 if low else 1e-4, atol=(1e-2 if low else 2e-5) * scale + 1e-8
    )
    assert set(out.stats) == set(SPARSE_STAT_NAMES)
    for key in SPARSE_STAT_NAMES:
        assert math.isclose(out.stats[key], ref_stats[key], rel_tol=1e-4, abs_tol=1e-5), key


def test_cases_cover_truncated_and_full_heads():
    # flat: every row's top-16 holds < mu; peaked: none; and the int32 ids of a cache work alike
    for case, truncated in (("flat", 1.0), ("peaked", 0.0)):
        s, t, labels, k, opts, _ = make_case(case)
        ids, lp, tail = make_cache(t, k)
        out = compute_sparse("akl", s, ids.int(), lp, tail, labels, **opts)
        assert out.stats["head_truncated"] == truncated
        if truncated:
            assert out.stats["head_size"] == k
        assert out.loss.item() == compute_sparse("akl", s, ids, lp, tail, labels, **opts).loss.item()


@pytest.mark.parametrize("name", FINITE_WITH_TEACHER_ONLY_INF)
def test_teacher_only_neg_inf_is_finite_and_exact(name):
    # p = 0 on some stored tokens (and in the bucket) where q > 0: these stay finite
    s, t, labels, _, opts, _ = make_case("odd", seed=3)
    t[..., :11] = -math.inf
    ids, lp, tail = make_cache(t, 128)  # 120 finite tokens: the top-128 holds 8 with p = 0
    assert bool((lp == -math.inf).any()) and bool((tail == -math.inf).all())
    out, grad, (ref_loss, _, _, _, ref_grad) = _ours_and_ref(name, s, ids, lp, tail, labels, opts)
    assert torch.isfinite(out.loss) and torch.isfinite(grad).all()
    torch.testing.assert_close(out.loss.double(), ref_loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------------------- against dense


@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.0])
@pytest.mark.parametrize("name", NAMES)
def test_k_equals_v_is_the_dense_divergence(name, temperature):
    s, t, labels, _, _, _ = make_case("odd", seed=1)
    v = s.shape[-1]
    ids, lp, tail = make_cache(t, v)
    assert bool((tail == -math.inf).all())
    x, y = s.clone().requires_grad_(), s.clone().requires_grad_()
    ours = compute_sparse(name, x, ids, lp, tail, labels, temperature=temperature, all_stats=True)
    dense = compute(name, y, t, labels, temperature=temperature, all_stats=True)
    ours.loss.backward()
    dense.loss.backward()
    torch.testing.assert_close(ours.loss, dense.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-4, atol=1e-7)
    for key in STAT_NAMES:
        assert math.isclose(ours.stats[key], dense.stats[key], rel_tol=1e-4, abs_tol=1e-6), key
    assert ours.stats["head_truncated"] == 0.0


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_retempers_the_cache_with_the_bucket_as_one_outcome(temperature):
    # the documented approximation: the top-k's ratios are the dense tempered ones; the bucket's
    # mass is below the true tempered one for T > 1, above for T < 1, equal at T = 1
    _, t, _, _, _, _ = make_case("odd", seed=8)
    t = t.reshape(-1, t.shape[-1])
    ids, lp, tail = make_cache(t, 8)
    ours = teacher_log_probs(lp, tail, temperature).double()
    dense = torch.log_softmax(t.double() / temperature, -1)
    dense_k = dense.gather(-1, ids)
    ratios = ours[:, :-1] - ours[:, :1]
    torch.testing.assert_close(ratios, dense_k - dense_k[:, :1], rtol=1e-5, atol=1e-5)
    true_bucket = dense.scatter(-1, ids, -math.inf).logsumexp(-1)
    # the mass of the top-k relative to the bucket, ours minus the truth
    excess = (ours[:, :-1].logsumexp(-1) - ours[:, -1]) - (dense_k.logsumexp(-1) - true_bucket)
    if temperature == 1.0:
        torch.testing.assert_close(excess, torch.zeros_like(excess), rtol=0, atol=1e-5)
        torch.testing.assert_close(ours.exp().sum(-1), torch.ones_like(excess))
    else:
        assert ((excess > 1e-3) if temperature > 1 else (excess < -1e-3)).all()


def test_memory_is_bounded_by_the_chunk(monkeypatch):
    # every (rows, V) buffer of the chunked and fused paths holds at most chunk_size rows
    sizes = []

    class Recording(divergences.Workspace):
        def __init__(self, rows, vocab, device):
            sizes.append(rows)
            super().__init__(rows, vocab, device)

    from akl_core import fused
    from akl_core.divergences import chunked

    # the shared loops that allocate them: rows_forward (chunked) and fused_loop (fused)
    monkeypatch.setattr(sparse, "Workspace", Recording)
    monkeypatch.setattr(chunked, "Workspace", Recording)
    monkeypatch.setattr(fused, "Workspace", Recording)
    s, t, labels, k, _, _ = make_case("odd")
    cache = make_cache(t, k)
    x = s.clone().requires_grad_()
    compute_sparse("akl", x, *cache, labels, chunk_size=3).loss.backward()
    h, w = torch.randn(21, 6, requires_grad=True), torch.randn(s.shape[-1], 6, requires_grad=True)
    compute_sparse_fused("akl", h.view(3, 7, 6), w, *cache, labels, chunk_size=3).loss.backward()
    assert sizes and max(sizes) == 3


def _per_token(name, s, ids, lp, tail, **options):
    loss, _, _ = sparse_chunk(
        name, s, ids, lp, tail, divergences.DivergenceOptions(**options), need_grad=False
    )
    return loss


@pytest.mark.parametrize("name", F_DIVERGENCES)
def test_never_above_dense_and_rising_with_k(name):
    # data-processing inequality: coarse-graining can only lose divergence; nested top-k sets
    # are finer and finer coarse-grainings, so the loss rises with k to the dense one at k = V
    s, t, _, _, _, _ = make_case("odd", seed=5)
    v = s.shape[-1]
    s, t = s.reshape(-1, v), t.reshape(-1, v)
    dense = divergences.divergence_chunk(name, s, t, divergences.DivergenceOptions(), need_grad=False)[0]
    previous = torch.zeros_like(dense)
    for k in (1, 2, 8, 32, 100, v):
        ids, lp, tail = make_cache(t, k)
        loss = _per_token(name, s, ids, lp, tail)
        assert (loss <= dense + 1e-5).all(), k
        assert (loss >= previous - 1e-5).all(), k
        previous = loss
    torch.testing.assert_close(previous, dense, rtol=1e-5, atol=1e-6)
    assert (_per_token(name, s, *make_cache(t, 8)) < dense - 1e-3).any()  # k < V does lose some


def test_gaps_include_the_bucket():
    s, t, labels, _, _, _ = make_case("odd", seed=2)
    ids, lp, tail = make_cache(t, 4)
    st = compute_sparse("akl", s, ids, lp, tail, labels).stats
    tvd = compute_sparse("tvd", s, ids, lp, tail, labels).loss.item()
    assert math.isclose(st["g_head"] + st["g_tail"], 2 * tvd, rel_tol=1e-5)
    assert 0.0 < st["w_head"] < 1.0 and 1.0 <= st["head_size"] <= 4.0


# ---------------------------------------------------------------------------- properties


@pytest.mark.parametrize("name", NAMES)
def test_zero_and_finite_when_student_is_teacher(name):
    s, _, labels, _, _, _ = make_case("odd")
    s[0, 0, :5] = -math.inf
    ids, lp, tail = make_cache(s, 8)
    x = s.clone().requires_grad_()
    out = compute_sparse(name, x, ids, lp, tail, labels, all_stats=True)
    (grad,) = torch.autograd.grad(out.loss, x)
    assert abs(out.loss.item()) < 1e-6
    # TVD's gradient is sign(q - p): at p = q up to rounding it is any subgradient
    assert torch.isfinite(grad).all() and (name == "tvd" or grad.abs().max() < 1e-6)
    assert all(math.isfinite(v) for v in out.stats.values())
    # the cache went through float64 and back: p and q agree to rounding, not bit for bit
    assert out.stats["g_head"] + out.stats["g_tail"] < 1e-5


def test_akl_between_fkl_and_rkl():
    s, t, _, _, _, _ = make_case("odd", seed=11)
    v = s.shape[-1]
    s, t = s.reshape(-1, v), t.reshape(-1, v)
    cache = make_cache(t, 6)
    fkl, rkl = _per_token("fkl", s, *cache), _per_token("rkl", s, *cache)
    akl, akl_r = _per_token("akl", s, *cache), _per_token("akl_r", s, *cache)
    lo, hi = torch.minimum(fkl, rkl), torch.maximum(fkl, rkl)
    assert ((akl >= lo - 1e-6) & (akl <= hi + 1e-6)).all()
    torch.testing.assert_close(akl + akl_r, fkl + rkl, rtol=1e-5, atol=1e-6)
    assert (akl - akl_r).abs().max() > 1e-3


def test_fkl_gradient_is_q_minus_p_on_k_and_spread_off_k():
    # docs/method.md: q_j - p_j on K, q_j (1 - P_r / Q_r) off K
    s, t, labels, _, _, _ = make_case("odd", seed=4)
    ids, lp, tail = make_cache(t, 5)
    x = s.clone().requires_grad_()
    out = compute_sparse("fkl", x, ids, lp, tail, labels)
    out.loss_sum.backward()
    q = torch.softmax(s.double(), -1)
    on_k = torch.zeros_like(q, dtype=torch.bool).scatter(-1, ids, True)
    q_r = torch.where(on_k, 0.0, q).sum(-1, keepdim=True)
    p_k = torch.zeros_like(q).scatter(-1, ids, lp.double().exp())
    expected = torch.where(on_k, q - p_k, q * (1 - tail.double().exp()[..., None] / q_r))
    expected = expected * (labels != -100)[..., None]
    torch.testing.assert_close(x.grad.double(), expected, rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------------------- contract


@pytest.mark.parametrize("name", NAMES)
def test_all_masked_gives_zero(name):
    s, t, labels, _, _, _ = make_case("odd")
    ids, lp, tail = make_cache(t, 8)
    x = s.clone().requires_grad_()
    out = compute_sparse(name, x, ids, lp, tail, torch.full_like(labels, -100))
    assert isinstance(out, DivergenceOutput)
    assert out.num_tokens == 0 and out.loss.item() == 0.0 and out.stats == {}
    out.loss.backward()
    assert x.grad is not None and x.grad.abs().sum() == 0


@pytest.mark.parametrize("name", NAMES)
def test_single_token(name):
    s, t, _, _, _, _ = make_case("odd", seed=6)
    s, t = s[0, :1], t[0, :1]  # (1, V)
    ids, lp, tail = make_cache(t, 8)
    labels = torch.zeros(1, dtype=torch.long)
    out, grad, (ref_loss, _, n, _, ref_grad) = _ours_and_ref(name, s, ids, lp, tail, labels, {})
    assert out.num_tokens == n == 1
    torch.testing.assert_close(out.loss.double(), ref_loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("name", NAMES)
def test_sum_mean_shapes_chunks_and_no_grad_agree(name):
    s, t, labels, _, _, _ = make_case("odd", seed=9)
    ids, lp, tail = make_cache(t, 8)
    x = s.clone().requires_grad_()
    out = compute_sparse(name, x, ids, lp, tail, labels, chunk_size=5)
    (grad,) = torch.autograd.grad(out.loss, x)
    assert math.isclose(out.loss_sum.item(), out.loss.item() * out.num_tokens, rel_tol=1e-6)
    v, k = s.shape[-1], ids.shape[-1]
    y = s.reshape(-1, v).clone().requires_grad_()
    flat = compute_sparse(
        name, y, ids.reshape(-1, k), lp.reshape(-1, k), tail.reshape(-1), labels.reshape(-1)
    )
    (flat_grad,) = torch.autograd.grad(flat.loss, y)
    with torch.no_grad():
        nograd = compute_sparse(name, x, ids, lp, tail, labels, chunk_size=1)
    assert not nograd.loss.requires_grad
    assert math.isclose(flat.loss.item(), out.loss.item(), rel_tol=1e-6)
    assert math.isclose(nograd.loss.item(), out.loss.item(), rel_tol=1e-6)
    assert flat.stats == pytest.approx(out.stats, rel=1e-5)
    torch.testing.assert_close(flat_grad.view_as(grad), grad, rtol=1e-5, atol=1e-8)


def test_masked_rows_are_not_read_and_ignore_index_option():
    s, t, labels, _, _, _ = make_case("odd")
    ids, lp, tail = make_cache(t, 8)
    ref = compute_sparse("akl", s, ids, lp, tail, labels)
    masked = labels == -100
    ids, lp, tail = ids.clone(), lp.clone(), tail.clone()
    ids[masked] = 10**6  # padding rows of a cache hold anything: not checked, not read
    lp[masked], tail[masked] = math.nan, math.nan
    x = s.clone().requires_grad_()
    out = compute_sparse("akl", x, ids, lp, tail, labels.masked_fill(masked, 7), ignore_index=7)
    out.loss.backward()
    assert out.num_tokens == ref.num_tokens and out.loss.item() == pytest.approx(ref.loss.item(), rel=1e-6)
    assert torch.isfinite(x.grad).all() and x.grad[masked].abs().sum() == 0


def test_teacher_gets_no_gradient_grad_output_scales_and_backward_once():
    s, t, labels, _, _, _ = make_case("odd")
    ids, lp, tail = make_cache(t, 8)
    lp, tail = lp.clone().requires_grad_(), tail.clone().requires_grad_()
    x = s.clone().requires_grad_()
    (g1,) = torch.autograd.grad(compute_sparse("akl", x, ids, lp, tail, labels).loss_sum, x)
    (g3,) = torch.autograd.grad(3.0 * compute_sparse("akl", x, ids, lp, tail, labels).loss_sum, x)
    torch.testing.assert_close(g3, 3 * g1)
    out = compute_sparse("akl", x, ids, lp, tail, labels)
    out.loss.backward(retain_graph=True)
    assert lp.grad is None and tail.grad is None
    with pytest.raises(RuntimeError, match="once"):
        out.loss.backward()


def _set(x, value):
    """x with one entry of a valid token (labels[0, 1]) set to value."""
    x = x.clone()
    x[0, 1, 0] = value
    return x


def test_bad_inputs_raise():
    s, t, labels, _, _, _ = make_case("odd")
    ids, lp, tail = make_cache(t, 8)
    v = s.shape[-1]
    bad = [
        ({"name": "kl"}, "choose from"),
        ({"options": {"mu": 1.5}}, "mu"),
        ({"options": {"alpha": 1.0}}, "choose from"),
        ({"ids": ids[..., :3]}, "shape of topk_ids"),
        ({"tail": tail[:, :-1]}, "tail_logmass"),
        ({"labels": labels[:, :-1]}, "labels"),
        ({"ids": ids.float()}, "int64 or int32"),
        ({"ids": _set(ids, v)}, r"\[0, 131\)"),
        ({"ids": torch.cat([ids[..., :1], ids[..., :-1]], -1)}, "repeats"),
        ({"lp": _set(lp, math.nan)}, "NaN"),
        ({"lp": _set(lp, math.inf)}, "NaN or \\+inf"),
        ({"tail": tail.clone().fill_(math.nan)}, "tail_logmass holds"),
    ]
    for change, match in bad:
        args = {"name": "akl", "ids": ids, "lp": lp, "tail": tail, "labels": labels, "options": {}}
        args.update(change)
        with pytest.raises(ValueError, match=match):
            compute_sparse(
                args["name"], s, args["ids"], args["lp"], args["tail"], args["labels"], **args["options"]
            )
    wide = make_cache(torch.randn(2, v + 5), v + 5)  # k > V
    with pytest.raises(ValueError, match="top-k size"):
        compute_sparse("fkl", s[0, :2], *wide, torch.zeros(2, dtype=torch.long))


# ---------------------------------------------------------------------------- fused path

N, H, V = 29, 12, 157


def _setup(seed=0, dtype=torch.float32, bias=True, k=10):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(V, H, generator=g) * 0.5).to(dtype).requires_grad_()
    b = (torch.randn(V, generator=g) * 0.5).to(dtype).requires_grad_() if bias else None
    t = torch.randn(N, V, generator=g) * 2.0
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::3] = -100
    return (h, w, b, *make_cache(t, k), labels)


def _params(h, w, b):
    return [x for x in (h, w, b) if x is not None]


def _chunked(name, h, w, b, ids, lp, tail, labels, softcap=None, **options):
    s = h @ w.t() + (0 if b is None else b)
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    out = compute_sparse(name, s, ids, lp, tail, labels, all_stats=True, **options)
    return out, torch.autograd.grad(out.loss, _params(h, w, b))


def _fused(name, h, w, b, ids, lp, tail, labels, **options):
    out = compute_sparse_fused(name, h, w, ids, lp, tail, labels, student_bias=b, all_stats=True, **options)
    return out, torch.autograd.grad(out.loss, _params(h, w, b))


def _agree(out, grads, ref, ref_grads, rtol=1e-4, atol=1e-7):
    assert out.num_tokens == ref.num_tokens
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out.loss_sum, ref.loss_sum, rtol=1e-5, atol=1e-6)
    for a, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, r, rtol=rtol, atol=atol)
    assert out.stats == pytest.approx(ref.stats, rel=1e-4, abs=1e-7)


@pytest.mark.parametrize("name", NAMES)
def test_fused_equals_chunked(name):
    args = _setup()
    ref, ref_grads = _chunked(name, *args, chunk_size=10_000)
    for chunk_size in (10_000, 4, None):
        _agree(*_fused(name, *args, chunk_size=chunk_size), ref, ref_grads)


def test_fused_matmul_chunks_with_sub_chunks(monkeypatch):
    from akl_core import fused  # the shared fused loop's matmul chunk

    monkeypatch.setitem(divergences.chunked._AUTO_CHUNK_ELEMENTS_HEAD, "cpu", 3 * V)
    monkeypatch.setattr(fused, "_MATMUL_CHUNK_ELEMENTS", 8 * V)
    args = _setup(seed=4)
    _agree(*_fused("akl", *args), *_chunked("akl", *args, chunk_size=10_000))


@pytest.mark.parametrize("cap", [3.0, 30.0])
def test_fused_softcap_3d_and_no_bias(cap):
    h, w, _, ids, lp, tail, labels = _setup(seed=1, bias=False)
    ref, ref_grads = _chunked("akl", h, w, None, ids, lp, tail, labels, softcap=cap)
    out = compute_sparse_fused(
        "akl",
        h.view(1, N, H),
        w,
        ids.view(1, N, -1).int(),
        lp.view(1, N, -1),
        tail.view(1, N),
        labels.view(1, N),
        student_softcap=cap,
        all_stats=True,
        chunk_size=7,
    )
    _agree(out, torch.autograd.grad(out.loss, (h, w)), ref, ref_grads, atol=1e-6)
    with torch.no_grad():
        nograd = compute_sparse_fused("akl", h, w, ids, lp, tail, labels, student_softcap=cap)
    assert not nograd.loss.requires_grad and math.isclose(nograd.loss.item(), ref.loss.item(), rel_tol=1e-5)


def test_fused_matches_dense_fused_at_k_equals_v():
    h, w, b, _, _, _, labels = _setup(seed=2)
    g = torch.Generator().manual_seed(9)
    th, tw = torch.randn(N, 20, generator=g), torch.randn(V, 20, generator=g) * 0.5
    ids, lp, tail = make_cache(th @ tw.t(), V)
    ref = compute_fused("akl", h, w, th, tw, labels, student_bias=b, all_stats=True, temperature=2.0)
    ref_grads = torch.autograd.grad(ref.loss, (h, w, b))
    out = compute_sparse_fused(
        "akl", h, w, ids, lp, tail, labels, student_bias=b, all_stats=True, temperature=2.0
    )
    grads = torch.autograd.grad(out.loss, (h, w, b))
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-7)
    for a, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-6)
    assert {k: out.stats[k] for k in ref.stats} == pytest.approx(ref.stats, rel=1e-4, abs=1e-6)


def test_fused_bf16_keeps_dtypes():
    h, w, b, ids, lp, tail, labels = _setup(seed=3, dtype=torch.bfloat16)
    up = [x.detach().float().requires_grad_() for x in (h, w, b)]
    ref, ref_grads = _chunked("akl", *up, ids, lp, tail, labels)
    out, grads = _fused("akl", h, w, b, ids, lp, tail, labels, chunk_size=5)
    assert all(g.dtype == torch.bfloat16 for g in grads)
    torch.testing.assert_close(out.loss, ref.loss, rtol=2e-2, atol=1e-3)
    for a, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a.float(), r, rtol=5e-2, atol=3e-2 * r.abs().max().item())


def test_fused_all_masked_frozen_weight_and_errors():
    h, w, b, ids, lp, tail, labels = _setup(seed=5)
    out = compute_sparse_fused("akl", h, w, ids, lp, tail, torch.full_like(labels, -100), student_bias=b)
    assert out.num_tokens == 0 and out.loss.item() == 0.0 and out.stats == {}
    out.loss.backward()
    assert h.grad.abs().sum() == 0 and w.grad.abs().sum() == 0
    ref, (ref_gh, _, _) = _chunked("fkl", h, w, b, ids, lp, tail, labels)
    out = compute_sparse_fused("fkl", h, w.detach(), ids, lp, tail, labels, student_bias=b.detach())
    (gh,) = torch.autograd.grad(out.loss, h)
    torch.testing.assert_close(gh, ref_gh, rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match="labels"):
        compute_sparse_fused("akl", h, w, ids, lp, tail, labels[:-1])
    with pytest.raises(ValueError, match="hidden size"):
        compute_sparse_fused("akl", h[:, :-1], w, ids, lp, tail, labels)
    with pytest.raises(ValueError, match="soft-capping"):
        compute_sparse_fused("akl", h, w, ids, lp, tail, labels, student_softcap=0.0)
    with pytest.raises(ValueError, match="choose from"):
        compute_sparse_fused("nope", h, w, ids, lp, tail, labels)
