"""AKL's grouped path (``rows.akl_group``): a teacher pass, one head search per group of chunks
from the teacher alone (``head.head_tokens``), then the element-wise passes in small chunks with
the gradient written once. Against the float64 reference (the authors' sort), row by row, token
by token for the heads, and against the per-chunk path; the dense and the fused entry points."""

from __future__ import annotations

import math

import pytest
import torch

from akl_core import fused as fused_mod
from akl_core.divergences import chunked, compute, head
from akl_core.divergences import rows as rows_mod
from akl_core.divergences.chunked import Workspace
from akl_core.divergences.rows import akl_group
from akl_core.fused import compute_fused

try:
    from .test_divergences import CASES, make_case
    from .test_divergences_reference import reference, reference_terms
except ImportError:  # rootdir-style import (tests/akl_core has no __init__.py)
    from test_divergences import CASES, make_case
    from test_divergences_reference import reference, reference_terms

AKL_NAMES = ("akl", "akl_r")


@pytest.fixture
def grouped(monkeypatch):
    """Element-wise chunks of 2 rows inside groups of up to 2^21 / V rows (whatever V), and a
    count of the groups the grouped path settled (None: it handed a group back, -inf logits)."""
    runs = {"settled": 0, "handed_back": 0}

    def spy(*args, **kwargs):
        result = akl_group(*args, **kwargs)
        runs["settled" if result is not None else "handed_back"] += 1
        return result

    monkeypatch.setattr(chunked, "akl_group", spy)
    monkeypatch.setattr(chunked, "sub_chunk_rows", lambda opts, v, device: 2)
    monkeypatch.setattr(fused_mod, "sub_chunk_rows", lambda opts, v, device: 2)
    return runs


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("name", AKL_NAMES)
def test_grouped_matches_float64_reference(grouped, name, case):
    s, t, labels, opts = make_case(case)
    s1 = s.clone().requires_grad_()
    out = compute(name, s1, t, labels, **opts)
    (grad,) = torch.autograd.grad(out.loss, s1)
    s64 = s.double().requires_grad_()
    ref_loss, _, ref_n, ref_stats = reference(name, s64, t.double(), labels, **opts)
    (ref_grad,) = torch.autograd.grad(ref_loss, s64)
    if "inf" in case:  # 0 * inf in the fast sums: the group is redone with the guarded formulas
        assert grouped["handed_back"] > 0
    else:
        assert grouped["settled"] > 0 and grouped["handed_back"] == 0
    low = s.dtype != torch.float32
    torch.testing.assert_close(out.loss.double(), ref_loss.detach(), rtol=1e-5, atol=1e-6)
    scale = ref_grad.abs().max().item()
    torch.testing.assert_close(
        grad.double(), ref_grad, rtol=1e-2 if low else 1e-4, atol=(1e-2 if low else 2e-5) * scale + 1e-8
    )
    assert out.num_tokens == ref_n
    for key in ("fkl", "rkl", "g_head", "g_tail", "w_head", "head_size"):
        assert math.isclose(out.stats[key], ref_stats[key], rel_tol=1e-4, abs_tol=1e-5), key


def _large_v(spread: tuple[float, float], seed: int = 7, n: int = 24):
    """Rows past _TOPK_LAST (the pyramid and threshold stages), flat to peaked, a short last block."""
    g = torch.Generator().manual_seed(seed)
    v = head._TOPK_LAST + 1003
    t = torch.randn(n, v, generator=g) * torch.linspace(*spread, n)[:, None]
    t[::5, 17] += 9.0  # a few peaked rows (top-1 shortcut)
    s = t + torch.randn(n, v, generator=g)
    return s, t


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("mu", [0.5, 0.9])
@pytest.mark.parametrize("spread", [(0.3, 6.0), (3.0, 9.0)])  # heads up to ~2000 / ~250 tokens
def test_group_heads_and_losses_are_the_sorts_row_by_row(temperature, mu, spread):
    # the group's head search reads the untempered z_t, tempering the tokens it looks at, and p
    # as exp(z_t / T - lse_t) there, not from a kept p
    s, t = _large_v(spread)
    n, v = s.shape
    out = torch.empty(n, v)
    result = akl_group(s, t, mu, False, Workspace(n, v, s.device), out, 5, temperature)
    assert result is not None
    loss, stats = result
    ref_loss, ref = reference_terms("akl", s.double(), t.double(), mu=mu, temperature=temperature)
    torch.testing.assert_close(stats["head_size"].double(), ref["head_size"], rtol=0, atol=0)
    torch.testing.assert_close(stats["g_head"].double(), ref["g_head"], rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)
    # the gradient of the summed loss wrt the untempered logits (1 / T folded in)
    s64 = s.double().requires_grad_()
    (ref_grad,) = torch.autograd.grad(
        reference_terms("akl", s64, t.double(), mu=mu, temperature=temperature)[0].sum(), s64
    )
    torch.testing.assert_close(out.double(), ref_grad, rtol=1e-4, atol=2e-5 * ref_grad.abs().max().item())


@pytest.mark.parametrize("name", AKL_NAMES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_and_per_chunk_paths_agree(monkeypatch, name, temperature, dtype):
    # bf16 logits: the group tempers chunk by chunk and the head search the tokens it gathers;
    # both must be the values the per-chunk path tempers as a whole
    s, t = (x.to(dtype) for x in _large_v((0.3, 6.0), seed=3, n=40))
    labels = torch.zeros(40, dtype=torch.long)
    labels[::6] = -100  # the valid rows are gathered into the group's buffers

    def run():
        s1 = s.clone().requires_grad_()
        out = compute(name, s1, t, labels, temperature=temperature, chunk_size=16)
        out.loss.backward()
        return out, s1.grad

    monkeypatch.setattr(chunked, "sub_chunk_rows", lambda opts, v, device: 3)
    grouped_out, grouped_grad = run()
    monkeypatch.setattr(chunked, "GROUPED", ())
    chunk_out, chunk_grad = run()
    torch.testing.assert_close(grouped_out.loss, chunk_out.loss, rtol=1e-6, atol=1e-6)
    if dtype == torch.float32:
        # the group takes p = exp(z_t / T - lse_t) (lse_t from its teacher pass), the chunk path a
        # softmax: a few fp32 roundings apart (each is held to the float64 reference above)
        scale = chunk_grad.abs().max().item()
        torch.testing.assert_close(grouped_grad, chunk_grad, rtol=1e-5, atol=2e-6 * scale)
    else:  # the gradient is returned in bf16: one rounding apart at most
        torch.testing.assert_close(grouped_grad.float(), chunk_grad.float(), rtol=1e-2, atol=1e-6)
    assert grouped_out.stats == pytest.approx(chunk_out.stats, rel=1e-6, abs=1e-7)


def test_fused_grouped_matches_unfused(grouped):
    g = torch.Generator().manual_seed(5)
    n, h, v = 30, 16, head._TOPK_LAST + 1003
    sh, th = torch.randn(n, h, generator=g), torch.randn(n, h, generator=g)
    sw, tw = torch.randn(v, h, generator=g) * 0.4, torch.randn(v, h, generator=g) * 0.6
    labels = torch.zeros(n, dtype=torch.long)
    labels[4::9] = -100
    a = sh.clone().requires_grad_()
    fused = compute_fused("akl", a, sw, th, tw, labels, temperature=2.0)
    fused.loss.backward()
    assert grouped["settled"] > 0
    b = sh.clone().requires_grad_()
    unfused = compute("akl", b @ sw.t(), th @ tw.t(), labels, temperature=2.0)
    unfused.loss.backward()
    torch.testing.assert_close(fused.loss, unfused.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)
    assert fused.stats == pytest.approx(unfused.stats, rel=1e-5, abs=1e-6)


def _sorted_heads(z_t: torch.Tensor, temperature: float, mu: float) -> list[set[int]]:
    """Each row's head tokens (columns) by the definition: sort p (float64), keep c_i <= mu."""
    idx, head_mask = head.head_by_sort(torch.softmax(z_t.double() / temperature, -1), mu)
    return [set(idx[i][head_mask[i]].tolist()) for i in range(z_t.shape[0])]


def _found_heads(heads: head.Heads, n: int, v: int) -> list[set[int]]:
    flat = heads.flat()
    found: list[set[int]] = [set() for _ in range(n)]
    for f in flat.tolist():
        assert f % v not in found[f // v], "a head token was recorded twice"
        found[f // v].add(f % v)
    return found


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("mu", [0.5, 0.9])
@pytest.mark.parametrize("spread", [(0.3, 6.0), (3.0, 9.0)])
def test_head_tokens_from_the_teacher_alone_are_the_sorts(temperature, mu, spread):
    # every stage (top-1, pyramid, threshold, sort) records the tokens of the rows it settles;
    # from untempered teacher logits only (no student value exists yet in akl_group)
    _, t = _large_v(spread, seed=11)
    n, v = t.shape
    ws = Workspace(n, v, t.device)
    lse, p_max, bmax, p = rows_mod._teacher_pass(t, temperature, 3, ws, ws.sub(3))
    heads = head.head_tokens(rows_mod.GroupRows(t, temperature, p, p_max, lse, bmax, ws), mu)
    found = _found_heads(heads, n, v)
    want = _sorted_heads(t, temperature, mu)
    assert found == want
    assert heads.size.tolist() == [len(x) for x in want]
    # the teacher pass's normaliser and max p, against float64
    ref = torch.logsumexp(t.double() / temperature, -1)
    torch.testing.assert_close(lse.double(), ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(
        p_max.double(), (t.double() / temperature - ref[:, None]).exp().amax(-1), rtol=1e-5, atol=0
    )
    # and p, kept for the chunk pass
    torch.testing.assert_close(p.double(), torch.softmax(t.double() / temperature, -1), rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("v", [600, head._TOPK_LAST + 1003])  # block stages; pyramid and threshold
def test_head_tokens_of_a_chunk_are_the_sorts(v):
    g = torch.Generator().manual_seed(2)
    n = 30
    t = torch.randn(n, v, generator=g) * torch.linspace(0.2, 8.0, n)[:, None]
    t[::4, 5] += 12.0  # peaked rows (top-1)
    s = t + torch.randn(n, v, generator=g)
    ws = Workspace(n, v, t.device)
    r = rows_mod.Rows(s, t, False, ws, blocks=True)
    heads = head.head_tokens(r, 0.5)
    assert _found_heads(heads, n, v) == _sorted_heads(t, 1.0, 0.5)
    g_head, size = head.head_gap(r, 0.5)
    ref_gap, ref_size = head.head_gap_by_sort(r.p.double(), r.q.double(), 0.5)
    torch.testing.assert_close(size.double(), ref_size, rtol=0, atol=0)
    torch.testing.assert_close(g_head.double(), ref_gap, rtol=1e-6, atol=1e-7)


def test_heads_by_rows_splits_every_token_once_in_row_order():
    # stages add row-ascending parts that interleave rows; by_rows cuts each part by binary search
    v = 10
    heads = head.Heads(7, torch.zeros(7))
    heads.add(torch.tensor([3, 14, 15, 61]))  # rows 0, 1, 1, 6
    heads.add(torch.tensor([[22, 27], [40, 49]]))  # rows 2, 2, 4, 4
    heads.add(torch.tensor([], dtype=torch.long))  # a stage that settled no row
    heads.add(torch.tensor([9, 33, 58]))  # rows 0, 3, 5
    pieces = heads.by_rows(v, [0, 2, 5, 7])
    assert [sorted(p.tolist()) for p in pieces] == [[3, 9, 14, 15], [22, 27, 33, 40, 49], [58, 61]]
    assert sorted(heads.flat().tolist()) == [3, 9, 14, 15, 22, 27, 33, 40, 49, 58, 61]
    assert [p.tolist() for p in head.Heads(3, torch.zeros(3)).by_rows(v, [0, 3])] == [[]]


def test_heads_by_chunks_gives_each_chunk_its_tokens_in_its_own_layout():
    # akl_group's loop reads these: a chunk's head tokens as flat indices into its (rows, V)
    # buffers and their rows in it, for every chunk at once
    v = 10
    heads = head.Heads(7, torch.zeros(7))
    heads.add(torch.tensor([3, 14, 15, 61]))
    heads.add(torch.tensor([[22, 27], [40, 49]]))
    heads.add(torch.tensor([9, 33, 58]))
    starts = [0, 2, 5, 7]
    chunks = heads.by_chunks(v, starts)
    assert len(chunks) == 3
    for (flat, row), a, b, want in zip(
        chunks, starts[:-1], starts[1:], heads.by_rows(v, starts), strict=True
    ):
        assert sorted((flat + a * v).tolist()) == sorted(want.tolist())
        assert torch.equal(row, flat // v)
        assert bool(((row >= 0) & (row < b - a)).all())
    assert [(f.tolist(), r.tolist()) for f, r in head.Heads(3, torch.zeros(3)).by_chunks(v, [0, 3])] == [
        ([], [])
    ]


def test_w_head_is_head_weight_also_where_p_equals_q():
    # the grouped loop's two-op w_head: 0.5 where gap == 0 (p == q), g_head / gap elsewhere
    from akl_core.divergences.definitions import head_weight

    g_head = torch.tensor([0.0, 0.1, 0.0, 0.3, 2e-30])
    gap = torch.tensor([0.0, 0.4, 0.2, 0.3, 5e-30])
    got = rows_mod._w_head(g_head, gap, torch.empty(5))
    torch.testing.assert_close(got, head_weight(g_head, gap), rtol=1e-6, atol=0)
    assert got[0] == 0.5


def test_grouped_akl_of_a_student_equal_to_its_teacher_is_zero_with_weight_half():
    g = torch.Generator().manual_seed(5)
    t = torch.randn(24, 700, generator=g) * 3
    s = t.clone()
    s[1::2] += torch.randn(12, 700, generator=g)  # every other row differs
    out = torch.empty_like(s)
    loss, stats = akl_group(s, t, 0.5, False, Workspace(24, 700, s.device), out, 5, 1.0)
    assert bool((loss[::2] == 0).all()) and bool((stats["w_head"][::2] == 0.5).all())
    assert bool((out[::2] == 0).all())
    assert bool((loss[1::2] > 0).all())


@pytest.mark.parametrize("shape", [(3, 7), (40, 5000), (0, 5000)])
@pytest.mark.parametrize("density", [0.0, 0.03, 1.0])
def test_flat_nonzero_is_torch_nonzero(shape, density):
    # numpy's flatnonzero on the mask's memory above _NUMPY_NONZERO_OVER entries, torch below
    g = torch.Generator().manual_seed(3)
    mask = torch.rand(shape, generator=g) < density
    want = mask.reshape(-1).nonzero().squeeze(1)
    got = head.flat_nonzero(mask)
    assert got.dtype == torch.long and torch.equal(got, want)
    if mask.dim() == 2 and mask.shape[0] > 2:
        sub = mask[:, ::2]  # not contiguous
        assert torch.equal(head.flat_nonzero(sub), sub.reshape(-1).nonzero().squeeze(1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 7), (40, 5000)])
def test_ge_rows_is_torch_ge(dtype, shape):
    # numpy's compare on the same memory above _NUMPY_NONZERO_OVER entries (fp32 / fp64), torch's
    # otherwise; NaN, +-inf and a threshold equal to an entry included, z not contiguous too
    g = torch.Generator().manual_seed(4)
    z = (torch.randn(shape, generator=g) * 3).to(dtype)
    z[0, :3] = torch.tensor([math.nan, math.inf, -math.inf]).to(dtype)
    thr = torch.randn(shape[0], generator=g)
    thr[1] = float(z[1, 2])  # ties are >=
    thr[2] = math.inf
    for x in (z, z[:, ::2]):
        out = torch.empty(x.shape, dtype=torch.bool)
        got = head.ge_rows(x, thr, out)
        assert got.data_ptr() == out.data_ptr()
        assert torch.equal(got, x >= thr[:, None].to(torch.promote_types(x.dtype, thr.dtype)))


@pytest.mark.parametrize("n", [0, 5, 100_000])
def test_floor_div_is_torch_floor_divide(n):
    flat = torch.randint(0, 49152 * 85, (n,), generator=torch.Generator().manual_seed(6))
    got = head.floor_div(flat, 49152)
    assert got.dtype == torch.long and torch.equal(got, flat // 49152)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.long])
@pytest.mark.parametrize("n", [7, 20_000])
def test_take_is_torch_take(dtype, n):
    # numpy's take above _NUMPY_NONZERO_OVER indices for fp32 / fp64, index_select otherwise;
    # x strided too (its flat layout is the logical row-major one), any shape of indices
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(60, 900, generator=g) * 100).to(dtype)
    flat = torch.randint(0, 30 * 900, (n,), generator=g)
    for src in (x, x[::2]):
        for idx in (flat, flat[: n - n % 7].view(-1, 7)):
            got = head.take(src, idx)
            assert got.shape == idx.shape and got.dtype == src.dtype
            assert torch.equal(got, src.take(idx))
