"""The parts of akl_core.divergences against their definitions: head.head_gap against
head.head_gap_by_sort row by row, rows.per_token against definitions.per_token (values and
autograd gradients), and chunked.chunk_loop on inputs that are not logits."""

from __future__ import annotations

import pytest
import torch

from akl_core.divergences import NAMES, DivergenceOptions, Workspace, chunk_loop, definitions, head
from akl_core.divergences.rows import Rows, per_token

try:
    from .test_divergences import make_case
except ImportError:  # rootdir-style import (tests/akl_core has no __init__.py)
    from test_divergences import make_case

FINITE_CASES = ("odd", "flat", "peaked", "temp_hot", "mu03", "mu09", "flat_n", "wide", "wide64")


def _tempered(case: str) -> tuple[torch.Tensor, torch.Tensor, DivergenceOptions]:
    s, t, _, opts = make_case(case)
    opts = DivergenceOptions(**opts)
    v = s.shape[-1]
    return s.reshape(-1, v).float() / opts.temperature, t.reshape(-1, v).float() / opts.temperature, opts


@pytest.mark.parametrize("case", [*FINITE_CASES, "neg_inf", "wide_inf"])
@pytest.mark.parametrize("mu", [0.1, 0.5, 0.9])
def test_head_gap_is_the_sort_definition_row_by_row(case, mu):
    z_s, z_t, _ = _tempered(case)
    rows = Rows(z_s, z_t, False, Workspace(z_s.shape[0], z_s.shape[1], z_s.device), blocks=True)
    g_head, size = head.head_gap(rows, mu)
    ref_gap, ref_size = head.head_gap_by_sort(rows.p, rows.q, mu)
    torch.testing.assert_close(size, ref_size, rtol=0, atol=0)
    torch.testing.assert_close(g_head, ref_gap, rtol=1e-5, atol=1e-6)


def test_head_gap_by_sort_pinned():
    # p sorted: 0.3, 0.25, 0.25, 0.2 -> c = 0.3, 0.55: mu 0.5 keeps the top-1 only, mu 0.6 two
    p = torch.tensor([[0.3, 0.25, 0.2, 0.25], [0.9, 0.05, 0.03, 0.02]])
    q = torch.tensor([[0.1, 0.4, 0.2, 0.3], [0.5, 0.2, 0.2, 0.1]])
    g, n = head.head_gap_by_sort(p, q, 0.5)
    torch.testing.assert_close(n, torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(g, torch.tensor([0.2, 0.4]))
    g, n = head.head_gap_by_sort(p, q, 0.6)
    assert n.tolist() == [2.0, 1.0] and g[0].item() == pytest.approx(0.2 + 0.15)


@pytest.mark.parametrize("case", FINITE_CASES)
@pytest.mark.parametrize("name", NAMES)
def test_fast_rows_match_the_definitions(name, case):
    z_s, z_t, opts = _tempered(case)
    opts = DivergenceOptions(mu=opts.mu, temperature=1.0, lam=opts.lam, beta=opts.beta, all_stats=True)
    x = z_s.double().requires_grad_()
    ref_loss, ref_stats = definitions.per_token(name, x, z_t.double(), opts)
    (ref_grad,) = torch.autograd.grad(ref_loss.sum(), x)
    ws = Workspace(z_s.shape[0], z_s.shape[1], z_s.device)
    out = torch.empty_like(z_s)
    loss, stats = per_token(name, z_s, z_t, opts, ws, out, safe=False)
    torch.testing.assert_close(loss.double(), ref_loss.detach(), rtol=1e-4, atol=1e-6)
    scale = ref_grad.abs().max().item()  # fp32 against float64
    torch.testing.assert_close(out.double(), ref_grad, rtol=1e-4, atol=2e-5 * scale + 1e-8)
    for key, value in ref_stats.items():
        torch.testing.assert_close(stats[key].double(), value.double(), rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.parametrize("masked", [False, True])
def test_chunk_loop_on_inputs_that_are_not_logits(masked):
    # a per-row loss over (N, k) values and (N,) integer ids: sum_k w x + id, gradient w
    g = torch.Generator().manual_seed(0)
    n, k = 23, 5
    x, w = torch.randn(n, k, generator=g), torch.randn(n, k, generator=g)
    ids = torch.arange(n)
    valid = torch.rand(n, generator=g) > 0.3 if masked else torch.ones(n, dtype=torch.bool)
    seen: list[int] = []

    def per_chunk(chunk, out):
        xc, wc, idc = chunk
        seen.append(xc.shape[0])
        if out is not None:
            out.copy_(wc)
        return (wc * xc).sum(-1) + idc, (None if out is not None else wc.clone()), {"rows": torch.tensor(1.0)}

    grad = torch.zeros(n, k)
    loss_sum, stats = chunk_loop(per_chunk, (x, w, ids), valid, 4, Workspace(4, k, x.device), grad)
    keep = valid[:, None]
    torch.testing.assert_close(loss_sum, ((w * x).sum(-1) + ids)[valid].sum())
    torch.testing.assert_close(grad, torch.where(keep, w, 0.0))
    assert max(seen) == 4 and sum(seen) == int(valid.sum()) and stats["rows"].item() == len(seen)
