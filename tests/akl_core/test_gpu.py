"""CUDA only (marker ``gpu``): bf16 autocast training, fused AdamW, the fused loss and the Triton
kernel against the PyTorch path on the GPU, and a 2-process DDP run when two GPUs exist.

Run by bench/gpu.sh; skipped without CUDA. Tiny models only.
"""

from __future__ import annotations

import math

import pytest
import torch

from akl_core import optim
from akl_core.divergences import compute
from akl_core.fused import compute_fused
from tests.akl_core.test_ddp import run_runner
from tests.akl_core.test_trainer import run, steps, tiny_spec

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
CUDA = torch.device("cuda")


def _logits(n: int, v: int, dtype, seed: int = 0):
    """Student / teacher logits with peaked, flat and in-between rows; a quarter masked."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    t = torch.randn(n, v, device=CUDA, generator=g) * 2.0
    t[: n // 3, 7] += 14.0  # peaked: top-1 > mu
    t[n // 3 : 2 * n // 3] *= 0.1  # flat: a long head
    s = t * 0.7 + torch.randn(n, v, device=CUDA, generator=g)
    labels = torch.randint(0, v, (n,), device=CUDA, generator=g)
    labels[::4] = -100
    return s.to(dtype), t.to(dtype), labels


def _both(monkeypatch, fn):
    out = []
    for mode in ("1", "0"):
        monkeypatch.setenv("AKL_TRITON", mode)
        out.append(fn())
    return out


# every name in bf16, AKL in fp32 too: each pair is one more kernel compile (seconds) in the kit
@pytest.mark.parametrize(
    ("name", "dtype"),
    [(n, torch.bfloat16) for n in ("fkl", "rkl", "fkl_rkl", "akl", "akl_r")] + [("akl", torch.float32)],
)
def test_triton_kernel_matches_torch_path(monkeypatch, name, dtype):
    s, t, labels = _logits(384, 50257, dtype)

    def one():
        x = s.clone().requires_grad_()
        out = compute(name, x, t, labels, all_stats=True, temperature=1.5)
        (grad,) = torch.autograd.grad(out.loss_sum, x)
        return out, grad

    (ours, grad), (ref, ref_grad) = _both(monkeypatch, one)
    assert grad.dtype == dtype and ours.num_tokens == ref.num_tokens
    torch.testing.assert_close(ours.loss_sum, ref.loss_sum, rtol=1e-4, atol=1e-3)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(
        grad.float(), ref_grad.float(), rtol=tol, atol=tol * ref_grad.abs().max().item()
    )
    assert ours.stats.keys() == ref.stats.keys()
    for k, v in ref.stats.items():
        assert math.isclose(ours.stats[k], v, rel_tol=1e-3, abs_tol=1e-4), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_loss_matches_torch_path(monkeypatch, dtype):
    g = torch.Generator(device="cuda").manual_seed(1)
    n, h, v = 700, 256, 32003
    sh = torch.randn(n, h, device=CUDA, generator=g).to(dtype)
    th = torch.randn(n, h, device=CUDA, generator=g).to(dtype)
    sw = (torch.randn(v, h, device=CUDA, generator=g) * 0.1).to(dtype)
    tw = (torch.randn(v, h, device=CUDA, generator=g) * 0.15).to(dtype)
    labels = torch.randint(0, v, (n,), device=CUDA, generator=g)
    labels[::5] = -100

    def one():
        a, b = sh.clone().requires_grad_(), sw.clone().requires_grad_()
        out = compute_fused("akl", a, b, th, tw, labels, chunk_size=256)
        return out, torch.autograd.grad(out.loss_sum, (a, b))

    (ours, grads), (ref, ref_grads) = _both(monkeypatch, one)
    torch.testing.assert_close(ours.loss_sum, ref.loss_sum, rtol=1e-3, atol=1e-2)
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-4
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol * b.abs().max().item())
    assert math.isclose(ours.stats["w_head"], ref.stats["w_head"], rel_tol=1e-3)


def test_torch_path_on_cuda_matches_cpu(monkeypatch):
    monkeypatch.setenv("AKL_TRITON", "0")
    s, t, labels = _logits(64, 4099, torch.float32)
    outs = []
    for dev in ("cuda", "cpu"):
        x = s.to(dev).requires_grad_()
        out = compute("akl", x, t.to(dev), labels.to(dev))
        outs.append((float(out.loss_sum), torch.autograd.grad(out.loss_sum, x)[0].cpu()))
    assert outs[0][0] == pytest.approx(outs[1][0], rel=1e-5)
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-4, atol=1e-6)


def test_fused_adamw_matches_foreach():
    spec = tiny_spec()
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.LayerNorm(32)).to(CUDA)
    twin = [p.detach().clone().requires_grad_() for p in model.parameters()]
    opt, _ = optim.make_optimizer(model, spec, 10, CUDA)
    assert opt.defaults["fused"] is True
    ref = torch.optim.AdamW(
        [
            {"params": [p for p in twin if p.dim() >= 2], "weight_decay": spec.training.weight_decay},
            {"params": [p for p in twin if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=spec.training.learning_rate,
        foreach=True,
    )
    for _ in range(3):
        for p, q in zip(model.parameters(), twin, strict=True):
            grad = torch.randn_like(p)
            p.grad, q.grad = grad, grad.clone()
        opt.step()
        ref.step()
    for p, q in zip(model.parameters(), twin, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_bf16_autocast_run_is_close_to_fp32(models_root, tmp_path):
    fp32 = tiny_spec(training={"max_steps": 3, "precision": "fp32"})
    bf16 = tiny_spec(training={"max_steps": 3, "precision": "bf16"})
    _, a = run(fp32, tmp_path / "a", models_root)
    _, b = run(bf16, tmp_path / "b", models_root)
    assert a[0]["device"].startswith("cuda")
    for key in ("loss", "kd", "w_head"):
        assert [e[key] for e in steps(b)] == pytest.approx([e[key] for e in steps(a)], rel=5e-2), key


def test_fused_run_matches_unfused_on_cuda(models_root, tmp_path):
    _, plain = run(tiny_spec(training={"max_steps": 2}), tmp_path / "a", models_root)
    spec = tiny_spec(training={"max_steps": 2})
    spec.loss.fused = True
    _, fused = run(spec, tmp_path / "b", models_root)
    for key in ("loss", "ce", "kd", "w_head"):
        assert [e[key] for e in steps(fused)] == pytest.approx([e[key] for e in steps(plain)], rel=2e-2), key


@pytest.mark.timeout(300)
def test_ddp_two_gpus(models_root, tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    spec = tiny_spec(training={"max_steps": 2}, resources={"device": "cuda", "processes": 2})
    events = run_runner(spec, tmp_path / "two", models_root)
    assert events[-1]["type"] == "completed"
    assert all(math.isfinite(e["loss"]) for e in events if e["type"] == "step")
