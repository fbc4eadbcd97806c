"""Chunked == unchunked == fused, values and gradients, for every divergence."""

from __future__ import annotations

import math

import pytest
import torch

from akl_core.divergences import NAMES, compute
from akl_core.fused import compute_fused

N, H, H_T, V = 29, 12, 20, 157


def _setup(seed=0, dtype=torch.float32, bias=True):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(V, H, generator=g) * 0.5).to(dtype).requires_grad_()
    b = (torch.randn(V, generator=g) * 0.5).to(dtype).requires_grad_() if bias else None
    th = torch.randn(N, H_T, generator=g).to(dtype)
    tw = (torch.randn(V, H_T, generator=g) * 0.5).to(dtype)
    tb = (torch.randn(V, generator=g) * 0.5).to(dtype) if bias else None
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::3] = -100
    return h, w, b, th, tw, tb, labels


def _params(h, w, b):
    return [x for x in (h, w, b) if x is not None]


def _unfused(name, h, w, b, th, tw, tb, labels, **options):
    s = h @ w.t() + (0 if b is None else b)
    t = th @ tw.t() + (0 if tb is None else tb)
    out = compute(name, s, t, labels, all_stats=True, **options)
    return out, torch.autograd.grad(out.loss, _params(h, w, b))


def _fused(name, h, w, b, th, tw, tb, labels, **options):
    out = compute_fused(
        name, h, w, th, tw, labels, student_bias=b, teacher_bias=tb, all_stats=True, **options
    )
    return out, torch.autograd.grad(out.loss, _params(h, w, b))


@pytest.mark.parametrize("name", NAMES)
def test_chunked_unchunked_fused_agree(name):
    args = _setup()
    ref, ref_grads = _unfused(name, *args, chunk_size=10_000)
    others = [
        _unfused(name, *args, chunk_size=4),
        _unfused(name, *args, chunk_size=1),
        _fused(name, *args, chunk_size=10_000),
        _fused(name, *args, chunk_size=4),
        _fused(name, *args),
    ]
    for out, grads in others:
        assert out.num_tokens == ref.num_tokens
        torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(out.loss_sum, ref.loss_sum, rtol=1e-5, atol=1e-6)
        for a, b in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
        assert out.stats == pytest.approx(ref.stats, rel=1e-4, abs=1e-7)


def test_fused_3d_inputs_without_bias_and_no_grad():
    h, w, _, th, tw, _, labels = _setup(seed=1, bias=False)
    ref, ref_grads = _unfused("akl", h, w, None, th, tw, None, labels)
    out = compute_fused("akl", h.view(1, N, H), w, th.view(1, N, H_T), tw, labels.view(1, N), chunk_size=7)
    grads = torch.autograd.grad(out.loss, (h, w))
    torch.testing.assert_close(out.loss, ref.loss)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    with torch.no_grad():
        nograd = compute_fused("akl", h, w, th, tw, labels)
    assert not nograd.loss.requires_grad and math.isclose(nograd.loss.item(), ref.loss.item(), rel_tol=1e-5)


def test_fused_bf16_matches_fp32_and_keeps_dtypes():
    h, w, b, th, tw, tb, labels = _setup(seed=2, dtype=torch.bfloat16)
    # reference: the same bf16 values in fp32 (the fused path accumulates in fp32)
    up = [x.detach().float().requires_grad_(x.requires_grad) if x is not None else None for x in (h, w, b)]
    ref, ref_grads = _unfused("akl", *up, th.float(), tw.float(), tb.float(), labels)
    out, grads = _fused("akl", h, w, b, th, tw, tb, labels, chunk_size=5)
    assert all(g.dtype == torch.bfloat16 for g in grads)
    # bf16 logits (8 bits of mantissa) on both sides: a percent-level agreement
    torch.testing.assert_close(out.loss, ref.loss, rtol=2e-2, atol=1e-3)
    for a, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a.float(), r, rtol=5e-2, atol=3e-2 * r.abs().max().item())


def test_fused_all_masked_and_frozen_weight():
    h, w, b, th, tw, tb, labels = _setup(seed=3)
    out = compute_fused("akl", h, w, th, tw, torch.full_like(labels, -100), student_bias=b, teacher_bias=tb)
    assert out.num_tokens == 0 and out.loss.item() == 0.0
    out.loss.backward()
    assert h.grad.abs().sum() == 0 and w.grad.abs().sum() == 0
    # a frozen lm_head: only the hidden states receive a gradient, and it is the same
    w_frozen = w.detach()
    ref, (ref_gh, _, _) = _unfused("fkl", h, w, b, th, tw, tb, labels)
    out = compute_fused("fkl", h, w_frozen, th, tw, labels, student_bias=b.detach(), teacher_bias=tb)
    (gh,) = torch.autograd.grad(out.loss, h)
    torch.testing.assert_close(gh, ref_gh, rtol=1e-4, atol=1e-7)


def test_fused_shape_errors():
    h, w, b, th, tw, tb, labels = _setup()
    with pytest.raises(ValueError, match="vocabularies"):
        compute_fused("akl", h, w, th, tw[:-1], labels)
    with pytest.raises(ValueError, match="labels"):
        compute_fused("akl", h, w, th, tw, labels[:-1])
    with pytest.raises(ValueError, match="choose from"):
        compute_fused("nope", h, w, th, tw, labels)


def test_fused_matmul_chunks_with_divergence_sub_chunks(monkeypatch):
    # automatic sizes: matmul chunks of 8 tokens, each split into divergence chunks of 3
    from akl_core import divergences, fused

    monkeypatch.setitem(divergences._AUTO_CHUNK_ELEMENTS, "cpu", 3 * V)
    monkeypatch.setattr(fused, "_MATMUL_CHUNK_ELEMENTS", 8 * V)
    args = _setup(seed=4)
    ref, ref_grads = _unfused("akl", *args, chunk_size=10_000)
    out, grads = _fused("akl", *args)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-7)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    assert out.stats == pytest.approx(ref.stats, rel=1e-4, abs=1e-7)


@pytest.mark.parametrize("fused", [False, True])
def test_second_backward_raises(fused):
    h, w, b, th, tw, tb, labels = _setup(seed=5)
    if fused:
        out = compute_fused("akl", h, w, th, tw, labels)
    else:
        out = compute("akl", h @ w.t(), th @ tw.t(), labels)
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="once"):
        out.loss.backward()


# -- the head as the model applies it: bias (Phi) and final soft-capping (Gemma-2), issue 11 #9 ---


@pytest.mark.parametrize("caps", [(30.0, None), (None, 5.0), (3.0, 4.0)])
def test_softcap_matches_capped_logits(caps):
    h, w, b, th, tw, tb, labels = _setup(seed=4)
    s = h @ w.t() + b
    t = th @ tw.t() + tb
    s, t = (x if c is None else torch.tanh(x / c) * c for x, c in zip((s, t), caps, strict=True))
    ref = compute("akl", s, t, labels, all_stats=True)
    ref_grads = torch.autograd.grad(ref.loss, (h, w, b))
    out = compute_fused(
        "akl",
        h,
        w,
        th,
        tw,
        labels,
        student_bias=b,
        teacher_bias=tb,
        student_softcap=caps[0],
        teacher_softcap=caps[1],
        all_stats=True,
        chunk_size=8,
    )
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-7)
    for a, r in zip(torch.autograd.grad(out.loss, (h, w, b)), ref_grads, strict=True):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-6)
    assert out.stats == pytest.approx(ref.stats, rel=1e-4, abs=1e-6)


def test_bad_softcap_raises():
    h, w, b, th, tw, tb, labels = _setup()
    with pytest.raises(ValueError, match="soft-capping"):
        compute_fused("akl", h, w, th, tw, labels, student_softcap=0.0)


def _tiny_lm(kind: str, seed: int):
    """A 2-layer Phi (lm_head with a bias) or Gemma-2 (final logit soft-capping), vocabulary 97."""
    from transformers import Gemma2Config, Gemma2ForCausalLM, PhiConfig, PhiForCausalLM

    common = dict(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(seed)
    if kind == "phi":
        lm = PhiForCausalLM(PhiConfig(**common))
        torch.nn.init.normal_(lm.lm_head.bias, std=2.0)  # a bias that matters
    else:
        config = Gemma2Config(**common, head_dim=8, final_logit_softcapping=3.0, tie_word_embeddings=False)
        lm = Gemma2ForCausalLM(config)
        torch.nn.init.normal_(lm.lm_head.weight, std=0.5)  # logits large enough to be capped
    return lm.eval()


@pytest.mark.parametrize("kind", ["phi", "gemma2"])
def test_fused_training_loss_uses_bias_and_softcap(kind):
    """steps.micro_loss: the fused path gives the unfused (model's own) CE, KD and gradients."""
    from akl_core import steps
    from akl_core.spec import load_spec

    teacher, student = _tiny_lm(kind, 0), _tiny_lm(kind, 1)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 97, (3, 12), generator=g)
    labels = ids.clone()
    labels[:, :5] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    spec = load_spec({"teacher": "preset:tiny", "data": {"train": "demo:train"}, "loss": {"name": "akl"}})
    results = []
    for fused in (False, True):
        student.zero_grad(set_to_none=True)
        s, t = steps.ResponseLogits(student, fused), steps.ResponseLogits(teacher, fused)
        ce, kd, _, n = steps.micro_loss(steps.StepContext(s, t, spec, 97), batch)
        (ce + kd).backward()
        results.append((ce.item(), kd.item(), {k: p.grad.clone() for k, p in student.named_parameters()}))
    (ce0, kd0, g0), (ce1, kd1, g1) = results
    assert ce1 == pytest.approx(ce0, rel=1e-5) and kd1 == pytest.approx(kd0, rel=1e-5)
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-4, atol=1e-5)
