"""akl_core.divergences: properties, the float64 reference, edge cases, options."""

from __future__ import annotations

import math

import pytest
import torch

from akl_core import divergences
from akl_core.divergences import NAMES, DivergenceOutput, compute, head
from akl_core.divergences.rows import Rows

try:
    from .test_divergences_reference import reference
except ImportError:  # rootdir-style import (tests/akl_core has no __init__.py)
    from test_divergences_reference import reference

FINITE_WITH_TEACHER_ONLY_INF = ("fkl", "skl", "srkl", "tvd", "jsd")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_case(kind: str, seed: int = 0):
    """(student, teacher, labels, options, dtype) for one named situation."""
    g = _gen(seed)
    opts: dict = {}
    dtype = torch.float32
    if kind == "odd":
        shape, scale = (3, 7, 131), 3.0
    elif kind == "flat":  # top-64 mass < mu: the sort fallback
        shape, scale = (2, 5, 517), 0.05
    elif kind == "peaked":  # top-1 > mu on most rows
        shape, scale = (4, 9, 67), 12.0
    elif kind == "temp_hot":
        shape, scale, opts = (2, 6, 97), 4.0, {"temperature": 2.5}
    elif kind == "temp_cold":
        shape, scale, opts = (2, 6, 97), 1.0, {"temperature": 0.6}
    elif kind == "bf16":
        shape, scale, dtype = (2, 5, 89), 3.0, torch.bfloat16
    elif kind == "fp16":
        shape, scale, dtype = (2, 5, 89), 3.0, torch.float16
    elif kind == "mu03":
        shape, scale, opts = (3, 5, 113), 2.0, {"mu": 0.3, "lam": 0.3, "beta": 0.2}
    elif kind == "mu09":
        shape, scale, opts = (3, 5, 113), 2.0, {"mu": 0.9, "lam": 0.0, "beta": 0.8}
    elif kind == "neg_inf":
        shape, scale = (3, 4, 71), 3.0
    elif kind == "flat_n":
        shape, scale = (17, 29), 0.2
    elif kind in ("wide", "wide_inf"):  # V > _BLOCK * (_BLOCKS + 1): the block candidates
        shape, scale = (4, 6, 1000), 2.0
    elif kind == "wide64":  # V a multiple of _BLOCK: also the top-1 shortcut
        shape, scale = (4, 6, 1024), 2.0
    else:
        raise KeyError(kind)
    s = (torch.randn(shape, generator=g) * scale).to(dtype)
    t = (torch.randn(shape, generator=g) * scale).to(dtype)
    if kind == "peaked":
        t[..., 3] += 15.0
    if kind.startswith("wide"):  # rows of every kind: peaked, flat, a few strong tokens
        t[0] += 12.0 * (torch.arange(shape[-1]) == 700)
        t[1] *= 0.05
        t[2, :, 100:140] += 4.0
        t[3, :, ::97] += 6.0
    if kind == "wide_inf":
        s[..., 960:] = -math.inf
        t[..., 960:] = -math.inf
        s[..., 130:200] = -math.inf
        t[..., 130:200] = -math.inf
    if kind == "neg_inf":  # a masked vocabulary slice, the same in teacher and student
        s[..., -9:] = -math.inf
        t[..., -9:] = -math.inf
        t[..., 5] = -math.inf
        s[..., 5] = -math.inf
    labels = torch.randint(0, shape[-1], shape[:-1], generator=g)
    labels.view(-1)[::4] = -100
    return s, t, labels, opts


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
    "flat_n",
    "wide",
    "wide_inf",
    "wide64",
)


def _ours_and_ref(name, s, t, labels, opts, **extra):
    s1 = s.clone().requires_grad_()
    out = compute(name, s1, t, labels, all_stats=True, **opts, **extra)
    (grad,) = torch.autograd.grad(out.loss, s1)
    s64 = s.double().requires_grad_()
    ref_loss, ref_sum, ref_n, ref_stats = reference(name, s64, t.double(), labels, **opts)
    (ref_grad,) = torch.autograd.grad(ref_loss, s64)
    return out, grad, (ref_loss, ref_sum, ref_n, ref_stats, ref_grad)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("name", NAMES)
def test_matches_float64_reference(name, case):
    s, t, labels, opts = make_case(case)
    out, grad, (ref_loss, ref_sum, ref_n, ref_stats, ref_grad) = _ours_and_ref(name, s, t, labels, opts)
    assert out.num_tokens == ref_n
    assert out.loss.dtype == torch.float32 and grad.dtype == s.dtype
    low = s.dtype != torch.float32
    torch.testing.assert_close(out.loss.double(), ref_loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss_sum.double(), ref_sum.detach(), rtol=1e-5, atol=1e-5)
    # low-precision logits return a low-precision gradient: compare at that precision
    scale = ref_grad.abs().max().item()
    torch.testing.assert_close(
        grad.double(), ref_grad, rtol=1e-2 if low else 1e-4, atol=(1e-2 if low else 2e-5) * scale + 1e-8
    )
    for key in divergences.STAT_NAMES:
        assert math.isclose(out.stats[key], ref_stats[key], rel_tol=1e-4, abs_tol=1e-5), key


@pytest.mark.parametrize("name", FINITE_WITH_TEACHER_ONLY_INF)
def test_teacher_only_neg_inf_is_finite_and_exact(name):
    s, t, labels, opts = make_case("odd", seed=3)
    t[..., :11] = -math.inf  # p = 0 where q > 0: these divergences stay finite
    out, grad, (ref_loss, _, _, _, ref_grad) = _ours_and_ref(name, s, t, labels, opts)
    assert torch.isfinite(out.loss) and torch.isfinite(grad).all()
    torch.testing.assert_close(out.loss.double(), ref_loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-7)


def _stage_log(monkeypatch) -> dict[str, int]:
    """Rows settled per stage of the head search: top1, blocks, pyramid, buckets (the threshold
    stage), sort."""
    settled = {"top1": 0, "blocks": 0, "pyramid": 0, "buckets": 0, "sort": 0}
    one, blocks, pyramid, buckets, by_sort = (
        head._head_of_one,
        head._head_from_blocks,
        head._head_from_pyramid,
        head._head_from_threshold,
        head.head_by_sort,
    )

    def spy_one(rows, mu, heads, bmax):
        todo = one(rows, mu, heads, bmax)
        settled["top1"] += rows.p.shape[0] - todo.numel()
        return todo

    def spy_blocks(*args):
        done = blocks(*args)
        settled["blocks"] += int(done.sum())
        return done

    def spy_pyramid(*args):
        done = pyramid(*args)
        settled["pyramid"] += int(done.sum())
        return done

    def spy_buckets(*args):
        done = buckets(*args)
        settled["buckets"] += int(done.sum())
        return done

    def spy_sorted(p, mu):
        settled["sort"] += p.shape[0]
        return by_sort(p, mu)

    monkeypatch.setattr(head, "_head_of_one", spy_one)
    monkeypatch.setattr(head, "_head_from_blocks", spy_blocks)
    monkeypatch.setattr(head, "_head_from_pyramid", spy_pyramid)
    monkeypatch.setattr(head, "_head_from_threshold", spy_buckets)
    monkeypatch.setattr(head, "head_by_sort", spy_sorted)
    return settled


def test_each_head_stage_settles_its_kind_of_row(monkeypatch):
    # wide: rows of t[0] peaked (top-1), t[2] / t[3] a few strong tokens (blocks), t[1] flat
    # (V = 1000 <= _TOPK_LAST: past the block stages, the full sort)
    settled = _stage_log(monkeypatch)
    s, t, labels, opts = make_case("wide")
    out, _, (_, _, _, ref_stats, _) = _ours_and_ref("akl", s, t, labels, opts)
    n = int((labels != -100).sum())
    assert sum(settled.values()) == n
    assert settled["top1"] >= 4 and settled["blocks"] > 0 and settled["sort"] > 0
    assert math.isclose(out.stats["g_head"], ref_stats["g_head"], rel_tol=1e-5)
    assert math.isclose(out.stats["head_size"], ref_stats["head_size"], rel_tol=1e-6)


def test_top1_shortcut_settles_peaked_rows(monkeypatch):
    settled = _stage_log(monkeypatch)
    s, t, labels, opts = make_case("wide64")
    out, _, (_, _, _, ref_stats, _) = _ours_and_ref("akl", s, t, labels, opts)
    assert 0 < settled["top1"] < int((labels != -100).sum())  # row block 0 is peaked, the others are not
    assert math.isclose(out.stats["g_head"], ref_stats["g_head"], rel_tol=1e-5)


def test_all_head_stages_match_reference(monkeypatch):
    # blocks of 2 tokens: V = 131 goes through the top-1 shortcut, 8 blocks, the logit histogram
    # from the block maxima (on V > 100, 128 buckets: at mu = 0.99 the flat rows overflow it), the full sort
    monkeypatch.setattr(head, "_BLOCK", 2)
    monkeypatch.setattr(head, "_TOPK_LAST", 100)
    monkeypatch.setattr(head, "_NBUCKETS", 128)
    monkeypatch.setattr(head, "_BLOCK_STAGES_BEFORE_BUCKETS", 1)  # keep the 8-block stage too
    settled = _stage_log(monkeypatch)
    s, t, labels, opts = make_case("odd", seed=5)
    for scale, mu in ((6.0, 0.5), (2.0, 0.5), (0.4, 0.5), (0.05, 0.5), (0.05, 0.99)):
        for name in ("akl", "akl_r"):
            out, grad, (ref_loss, _, _, ref_stats, ref_grad) = _ours_and_ref(
                name, s * scale, t * scale, labels, {"mu": mu}
            )
            torch.testing.assert_close(out.loss.double(), ref_loss.detach(), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-7)
            assert math.isclose(out.stats["head_size"], ref_stats["head_size"], rel_tol=1e-6)
    assert all(v > 0 for v in settled.values()), settled


def _head_by_sort(s: torch.Tensor, t: torch.Tensor, mu: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(g_head, head_size) per row straight from docs/method.md: full sort of p, float64."""
    p, q = torch.softmax(t.double(), -1), torch.softmax(s.double(), -1)
    p_sorted, idx = p.sort(-1, descending=True)
    head = p_sorted.cumsum(-1) <= mu
    head[:, 0] = True
    return ((p_sorted - q.gather(-1, idx)).abs() * head).sum(-1), head.sum(-1).double()


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("mu", [0.5, 0.9])
@pytest.mark.parametrize("spread", [(0.3, 6.0), (3.0, 9.0)])  # heads up to ~2000 / ~250 tokens
def test_threshold_stage_matches_full_sort_per_row(monkeypatch, temperature, mu, spread):
    # V > _TOPK_LAST with the default constants: flat rows of every size of head go to
    # _head_from_threshold (its candidates from whole rows, or from the blocks when heads are
    # small); every row's head must be the full sort's, exactly
    settled = _stage_log(monkeypatch)
    g = _gen(7)
    v = head._TOPK_LAST + 1003  # not a multiple of _BLOCK: a short last block
    t = torch.randn(24, v, generator=g) * torch.linspace(*spread, 24)[:, None]
    t[::5, 17] += 9.0  # a few peaked rows (top-1 shortcut)
    s = t + torch.randn(24, v, generator=g)
    opts = divergences.DivergenceOptions(temperature=temperature, mu=mu)
    z_s, z_t = s / temperature, t / temperature
    rows = Rows(z_s, z_t, False, divergences.Workspace(24, v, s.device), blocks=True)
    g_head, size = head.head_gap(rows, opts.mu)
    ref_gap, ref_size = _head_by_sort(z_s, z_t, mu)
    assert settled["buckets"] + settled["pyramid"] > 0, settled
    torch.testing.assert_close(size.double(), ref_size, rtol=0, atol=0)
    torch.testing.assert_close(g_head.double(), ref_gap, rtol=1e-5, atol=2e-6)  # p, q are fp32


@pytest.mark.parametrize("flat_first", [True, False])
def test_pyramid_stage_turns_itself_off_on_flat_chunks_and_changes_no_head(monkeypatch, flat_first):
    # chunks of one call share a Workspace: after a chunk of flat rows (heads of hundreds of
    # tokens) the pyramid stage is skipped; every head is still the full sort's, row by row
    settled = _stage_log(monkeypatch)
    g = _gen(11)
    v = head._TOPK_LAST + 1003
    flat = torch.randn(12, v, generator=g) * 0.3
    short = torch.randn(12, v, generator=g) * 6.0  # heads of a few tokens
    t = torch.cat([flat, short] if flat_first else [short, flat])
    s = t + torch.randn(24, v, generator=g)
    ws = divergences.Workspace(12, v, s.device)
    for chunk in (slice(0, 12), slice(12, 24)):
        rows = Rows(s[chunk], t[chunk], False, ws, blocks=True)
        g_head, size = head.head_gap(rows, 0.5)
        ref_gap, ref_size = _head_by_sort(s[chunk], t[chunk], 0.5)
        torch.testing.assert_close(size.double(), ref_size, rtol=0, atol=0)
        torch.testing.assert_close(g_head.double(), ref_gap, rtol=1e-5, atol=2e-6)
    assert ws.hints.get("no_pyramid") is True
    assert (settled["pyramid"] == 0) if flat_first else (settled["pyramid"] > 6), settled


# ---------------------------------------------------------------------------- properties


def _per_token(name, s, t, **options):
    rows_loss, _, _ = divergences.divergence_chunk(
        name, s, t, divergences.DivergenceOptions(**options), need_grad=False
    )
    return rows_loss


@pytest.mark.parametrize("name", NAMES)
def test_zero_and_finite_when_p_equals_q(name):
    s, _, labels, _ = make_case("odd")
    s[0, 0, :5] = -math.inf
    x = s.clone().requires_grad_()
    out = compute(name, x, s.clone(), labels, all_stats=True)
    (grad,) = torch.autograd.grad(out.loss, x)
    assert abs(out.loss.item()) < 1e-6
    assert torch.isfinite(grad).all() and grad.abs().max() < 1e-6
    assert all(math.isfinite(v) for v in out.stats.values())
    assert out.stats["w_head"] == 0.5


@pytest.mark.parametrize("name", NAMES)
def test_non_negative_per_token(name):
    s, t, _, _ = make_case("odd", seed=7)
    v = s.shape[-1]
    loss = _per_token(name, s.reshape(-1, v), t.reshape(-1, v))
    assert (loss >= -1e-6).all() and (loss > 1e-4).any()


def test_akl_between_fkl_and_rkl_and_weights_sum_to_one():
    s, t, _, _ = make_case("odd", seed=11)
    s, t = s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1])
    fkl, rkl = _per_token("fkl", s, t), _per_token("rkl", s, t)
    akl, akl_r = _per_token("akl", s, t), _per_token("akl_r", s, t)
    lo, hi = torch.minimum(fkl, rkl), torch.maximum(fkl, rkl)
    assert ((akl >= lo - 1e-6) & (akl <= hi + 1e-6)).all()
    assert ((akl_r >= lo - 1e-6) & (akl_r <= hi + 1e-6)).all()
    # w_head + w_tail = 1 for both orders  <=>  akl + akl_r = fkl + rkl per token
    torch.testing.assert_close(akl + akl_r, fkl + rkl, rtol=1e-5, atol=1e-6)
    assert (akl - akl_r).abs().max() > 1e-3  # AKL-r differs


def test_stats_consistent():
    s, t, labels, _ = make_case("odd", seed=2)
    st = compute("akl", s, t, labels).stats
    tvd = compute("tvd", s, t, labels).loss.item()
    assert math.isclose(st["g_head"] + st["g_tail"], 2 * tvd, rel_tol=1e-5)
    assert 0.0 < st["w_head"] < 1.0 and st["head_size"] >= 1.0
    assert set(compute("fkl", s, t, labels).stats) == {"fkl"}
    assert set(compute("fkl", s, t, labels, all_stats=True).stats) == set(divergences.STAT_NAMES)


def test_fkl_gradient_is_q_minus_p():
    s, t, labels, _ = make_case("odd", seed=4)
    x = s.clone().requires_grad_()
    out = compute("fkl", x, t, labels)
    out.loss.backward()
    keep = (labels != -100).unsqueeze(-1)
    expected = (torch.softmax(s, -1) - torch.softmax(t, -1)) * keep / out.num_tokens
    torch.testing.assert_close(x.grad, expected, rtol=1e-5, atol=1e-8)


def test_pinned_akl_value():
    p = torch.tensor([[0.7, 0.2, 0.1]])
    q = torch.tensor([[0.4, 0.4, 0.2]])
    out = compute("akl", q.log(), p.log(), torch.zeros(1, dtype=torch.long))
    fkl = 0.7 * math.log(0.7 / 0.4) + 0.2 * math.log(0.2 / 0.4) + 0.1 * math.log(0.1 / 0.2)
    rkl = 0.4 * math.log(0.4 / 0.7) + 0.4 * math.log(0.4 / 0.2) + 0.2 * math.log(0.2 / 0.1)
    assert math.isclose(out.loss.item(), 0.5 * fkl + 0.5 * rkl, rel_tol=1e-5)  # g_head = g_tail = 0.3
    assert out.stats["head_size"] == 1.0 and math.isclose(out.stats["w_head"], 0.5, rel_tol=1e-5)


# ---------------------------------------------------------------------------- contract


@pytest.mark.parametrize("name", NAMES)
def test_all_masked_gives_zero(name):
    s, t, labels, _ = make_case("odd")
    x = s.clone().requires_grad_()
    out = compute(name, x, t, torch.full_like(labels, -100))
    assert isinstance(out, DivergenceOutput)
    assert out.num_tokens == 0 and out.loss.item() == 0.0 and out.stats == {}
    out.loss.backward()
    assert x.grad is not None and x.grad.abs().sum() == 0


@pytest.mark.parametrize("name", NAMES)
def test_sum_mean_shapes_and_no_grad_agree(name):
    s, t, labels, _ = make_case("odd", seed=9)
    x = s.clone().requires_grad_()
    out = compute(name, x, t, labels, chunk_size=5)
    assert math.isclose(out.loss_sum.item(), out.loss.item() * out.num_tokens, rel_tol=1e-6)
    v = s.shape[-1]
    flat = compute(name, s.reshape(-1, v), t.reshape(-1, v), labels.reshape(-1))
    with torch.no_grad():
        nograd = compute(name, x, t, labels)
    assert not nograd.loss.requires_grad
    assert math.isclose(flat.loss.item(), out.loss.item(), rel_tol=1e-6)
    assert math.isclose(nograd.loss.item(), out.loss.item(), rel_tol=1e-6)
    assert flat.stats == pytest.approx(out.stats, rel=1e-5)


def test_teacher_gets_no_gradient_and_ignore_index_option():
    s, t, labels, _ = make_case("odd")
    x, y = s.clone().requires_grad_(), t.clone().requires_grad_()
    out = compute("akl", x, y, labels.masked_fill(labels == -100, 7), ignore_index=7)
    out.loss.backward()
    assert y.grad is None and x.grad is not None
    assert out.num_tokens == int((labels != -100).sum()) - int((labels == 7).sum())


def test_grad_output_scales_gradient():
    s, t, labels, _ = make_case("odd")
    x = s.clone().requires_grad_()
    (g1,) = torch.autograd.grad(compute("akl", x, t, labels).loss_sum, x)
    (g3,) = torch.autograd.grad(3.0 * compute("akl", x, t, labels).loss_sum, x)
    torch.testing.assert_close(g3, 3 * g1)


@pytest.mark.parametrize(
    "options, match",
    [
        ({"mu": 0.0}, "mu"),
        ({"mu": 1.5}, "mu"),
        ({"temperature": 0.0}, "temperature"),
        ({"lam": 1.0}, "lam"),
        ({"beta": 0.0}, "beta"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"alpha": 1.0}, "choose from"),
    ],
)
def test_bad_options_raise(options, match):
    s, t, labels, _ = make_case("odd")
    with pytest.raises(ValueError, match=match):
        compute("akl", s, t, labels, **options)


def test_bad_name_and_shapes_raise():
    s, t, labels, _ = make_case("odd")
    with pytest.raises(ValueError, match="choose from .*akl"):
        compute("kl", s, t, labels)
    with pytest.raises(ValueError, match="same shape"):
        compute("akl", s, t[..., :-1], labels)
    with pytest.raises(ValueError, match="labels"):
        compute("akl", s, t, labels[:, :-1])
