"""akl_core/kernels: the Triton kernel against the PyTorch path and the float64 reference.

Without CUDA the kernel runs under Triton's interpreter (TRITON_INTERPRET=1, set before the
kernel module is imported: ``triton.jit`` reads it then); with CUDA, natively. The interpreter
is slow, so the cases are few rows of small vocabularies, and the multi-tile paths are forced
with small blocks. Skipped when Triton is not importable (it is a test dependency only).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

from akl_core import divergences
from akl_core.divergences import compute
from akl_core.fused import compute_fused
from akl_core.kernels import dispatch
from tests.akl_core.test_divergences import make_case
from tests.akl_core.test_divergences_reference import reference_terms

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")
from akl_core.kernels import akl_triton  # noqa: E402  (after TRITON_INTERPRET)

DEVICE = "cuda" if CUDA else "cpu"


def _run(monkeypatch, mode: str, name, s, t, labels, **opts):
    monkeypatch.setenv("AKL_TRITON", mode)
    s1 = s.clone().requires_grad_()
    out = compute(name, s1, t, labels, **opts)
    (grad,) = torch.autograd.grad(out.loss_sum, s1)
    return out, grad


def _case(case: str):
    """make_case's logits, cut to a few rows (the interpreter runs one program per row)."""
    s, t, labels, opts = make_case(case)
    return s[:1].to(DEVICE), t[:1].to(DEVICE), labels[:1].to(DEVICE), opts


def _check_same(ours, grad, ref, ref_grad):
    assert ours.num_tokens == ref.num_tokens
    assert sorted(ours.stats) == sorted(ref.stats)
    assert grad.dtype == ref_grad.dtype
    torch.testing.assert_close(ours.loss_sum, ref.loss_sum, rtol=1e-5, atol=1e-5)
    low = grad.dtype != torch.float32
    scale = ref_grad.abs().max().item()
    torch.testing.assert_close(
        grad.double(),
        ref_grad.double(),
        rtol=1e-2 if low else 1e-4,
        atol=(1e-2 if low else 1e-5) * scale + 1e-8,
    )
    for key, val in ref.stats.items():
        assert math.isclose(ours.stats[key], val, rel_tol=1e-4, abs_tol=1e-5), key


@pytest.mark.parametrize("case", ["odd", "flat", "peaked", "temp_hot", "bf16", "mu03", "neg_inf", "wide_inf"])
def test_akl_matches_torch_path(monkeypatch, case):
    s, t, labels, opts = _case(case)
    ours, grad = _run(monkeypatch, "1", "akl", s, t, labels, **opts)
    ref, ref_grad = _run(monkeypatch, "0", "akl", s, t, labels, **opts)
    _check_same(ours, grad, ref, ref_grad)


@pytest.mark.parametrize("name", ["fkl", "rkl", "fkl_rkl", "akl_r"])
@pytest.mark.parametrize("case", ["odd", "fp16", "neg_inf"])
def test_other_names_match_torch_path(monkeypatch, name, case):
    s, t, labels, opts = _case(case)
    opts = {**opts, "all_stats": name == "akl_r" or case == "odd"}
    ours, grad = _run(monkeypatch, "1", name, s, t, labels, **opts)
    ref, ref_grad = _run(monkeypatch, "0", name, s, t, labels, **opts)
    _check_same(ours, grad, ref, ref_grad)


def _tie_rows() -> torch.Tensor:
    """Teacher rows whose head boundary falls in a group of tied logits, and other odd rows."""
    v = 97
    g = torch.Generator().manual_seed(5)
    t = torch.randn(7, v, generator=g)
    t[0] = 0.0  # uniform: the head is the first 48 tokens by index
    t[1, 10:20] = 3.0  # ten tied tokens hold most of the mass; the boundary lies among them
    t[2, [3, 50]] = 9.0  # two tied top tokens over mu together; each below mu: head = both
    t[3, [40, 7]] = 30.0  # two tied tops, each 1/2 > mu = 0.45 ... (mu set below)
    t[4, ::3] = -math.inf  # masked vocabulary
    t[4, 1] = 4.0
    t[5] *= 0.01  # nearly flat: a long search
    t[6, 90] = 1e4  # one token holds everything
    return t


@pytest.mark.parametrize("mu", [0.5, 0.45, 0.9])
def test_head_with_ties_and_small_tiles_matches_reference(mu):
    t = _tie_rows()
    s = torch.randn(t.shape, generator=torch.Generator().manual_seed(6))
    s[4, ::3] = -math.inf
    grad = torch.empty_like(s)
    dev = lambda x: x.to(DEVICE)  # noqa: E731
    rows = akl_triton.divergence_rows(
        "akl",
        dev(s),
        dev(t),
        mu=mu,
        temperature=1.0,
        head=True,
        grad=dev(grad),
        block=32,
        search_block=16,
        thresholds=4,
    ).cpu()
    s64 = s.double().requires_grad_()
    loss, stats = reference_terms("akl", s64, t.double(), mu=mu)
    cols = akl_triton.COLUMNS
    assert rows[:, cols.index("head_size")].tolist() == stats["head_size"].tolist()
    for key in ("fkl", "rkl", "g_head", "g_tail", "w_head"):
        torch.testing.assert_close(rows[:, cols.index(key)].double(), stats[key], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(rows[:, 0].double(), loss.detach(), rtol=1e-4, atol=1e-5)


def test_rows_subset_leaves_other_rows_untouched():
    s, t, _, _ = make_case("odd")
    s, t = s[0].to(DEVICE), t[0].to(DEVICE)  # (7, 131)
    grad = torch.full_like(s, 7.0)
    rows = torch.tensor([1, 4], device=DEVICE)
    out = akl_triton.divergence_rows("fkl", s, t, mu=0.5, temperature=1.0, head=False, rows=rows, grad=grad)
    assert out.shape == (2, 8)
    keep = torch.ones(7, dtype=torch.bool)
    keep[[1, 4]] = False
    assert bool((grad[keep.to(DEVICE)] == 7.0).all())
    torch.testing.assert_close(grad[rows], torch.softmax(s[rows], -1) - torch.softmax(t[rows], -1))


@pytest.mark.parametrize("bias", [False, True])
def test_fused_matches_torch_path(monkeypatch, bias):
    """Without, and with a bias and soft-capping (Phi, Gemma-2)."""
    g = torch.Generator().manual_seed(2)
    n, h, v = 9, 16, 75
    sh, th = torch.randn(n, h, generator=g), torch.randn(n, h + 4, generator=g)
    sw, tw = torch.randn(v, h, generator=g) * 0.3, torch.randn(v, h + 4, generator=g) * 0.3
    sb, tb = (torch.randn(v, generator=g), torch.randn(v, generator=g)) if bias else (None, None)
    labels = torch.arange(n) % 4 - 1  # every fourth label is -1, not -100: use ignore_index
    results = []
    for mode in ("1", "0"):
        monkeypatch.setenv("AKL_TRITON", mode)
        leaves = [x.clone().to(DEVICE).requires_grad_() for x in (sh, sw, *([sb] if bias else []))]
        out = compute_fused(
            "akl",
            leaves[0],
            leaves[1],
            th.to(DEVICE),
            tw.to(DEVICE),
            labels.to(DEVICE),
            student_bias=leaves[2] if bias else None,
            teacher_bias=None if tb is None else tb.to(DEVICE),
            ignore_index=-1,
            chunk_size=4,
            student_softcap=3.0 if bias else None,  # its own gradient buffer, the chain rule
            teacher_softcap=4.0 if bias else None,
        )
        results.append((out, torch.autograd.grad(out.loss_sum, leaves)))
    (ours, grads), (ref, ref_grads) = results
    assert ours.num_tokens == ref.num_tokens == 6
    torch.testing.assert_close(ours.loss_sum, ref.loss_sum, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for key, val in ref.stats.items():
        assert math.isclose(ours.stats[key], val, rel_tol=1e-4, abs_tol=1e-5), key


def test_wanted(monkeypatch):
    x = torch.zeros(2, 3)
    monkeypatch.setenv("AKL_TRITON", "0")
    assert not dispatch.wanted("akl", x)
    monkeypatch.setenv("AKL_TRITON", "1")
    assert dispatch.wanted("akl", x) and not dispatch.wanted("jsd", x)
    assert not dispatch.wanted("akl", x.double())
    monkeypatch.delenv("AKL_TRITON", raising=False)
    assert dispatch.wanted("akl", x) is False  # CPU tensors: the PyTorch path unless forced
    assert set(dispatch.SUPPORTED) <= set(divergences.NAMES)


_COMPILE = """
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile
from akl_core.kernels import akl_triton

sig = {
    **{k: "*bf16" for k in ("s_ptr", "t_ptr", "g_ptr")},
    "out_ptr": "*fp32",
    "rows_ptr": "*i64",
    "V": "i32",
    **{k: "i64" for k in ("stride_s", "stride_t", "stride_g")},
    "temp": "fp32",
    "mu": "fp32",
    "MAX_PASSES": "i32",
}
const = {"HAS_ROWS": True, "KIND": 3, "HEAD": True, "GRAD": True, "BLOCK": 4096, "SBLOCK": 1024, "NT": 16}
sig.update({k: "constexpr" for k in const})
src = ASTSource(akl_triton._divergence_rows_kernel, sig, {(list(sig).index(k),): v for k, v in const.items()})
try:
    compiled = compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
except RuntimeError as exc:  # no ptxas / CUDA backend in this Triton build
    print("SKIP", exc)
else:
    print("OK" if "cubin" in compiled.asm else "NO CUBIN")
"""


@pytest.mark.slow
def test_compiles_for_hopper():
    """The kernel compiles for sm_90 (Triton's front end and its ptxas; no GPU needed).

    The interpreter runs Python and accepts code the compiler refuses (non-constexpr globals,
    loop-carried type changes); this catches those before a GPU is lent. In a subprocess: this
    module's kernel is the interpreted one.
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-c", _COMPILE], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    if proc.stdout.startswith("SKIP"):
        pytest.skip(proc.stdout)
    assert proc.stdout.strip().endswith("OK"), proc.stdout
