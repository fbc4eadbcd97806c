"""When the Triton kernel replaces the PyTorch path, and its autograd wrappers.

``compute`` and ``compute_fused`` (akl_core/divergences/, akl_core/fused.py) ask ``wanted`` first:
the kernel runs for CUDA tensors when Triton is importable and the divergence is one it has
(``SUPPORTED``). The environment variable ``AKL_TRITON`` overrides: ``0`` never, ``1`` on any
device (CPU tensors then need ``TRITON_INTERPRET=1``: the tests). Everything else, and every
other name, stays on the PyTorch path, which is the reference.

The results are the PyTorch path's: loss_sum, num_tokens and the same stats (STAT_NAMES for
AKL / AKL-r or ``all_stats``, else the divergence's own); the gradient is made in forward, in the
student logits' dtype, and handed back once (``divergences.scaled_once``).
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch
from torch import Tensor

from akl_core.divergences import (
    STAT_NAMES,
    DivergenceOptions,
    DivergenceOutput,
    chunk_selectors,
    finish,
    grad_in_forward,
)
from akl_core.fused import fused_grad_in_forward, softcap_, softcap_grad_

SUPPORTED = ("fkl", "rkl", "fkl_rkl", "akl", "akl_r")
_OWN_STATS = {"fkl": ("fkl",), "rkl": ("rkl",), "fkl_rkl": ("fkl", "rkl")}
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Tokens per lm_head matmul on the fused path: about this many logits per (R, V) buffer
# (2**27 bf16 logits = 256 MiB; two such buffers, the student's reused for its gradient).
_FUSED_CHUNK_ELEMENTS = 1 << 27


@functools.cache
def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def wanted(name: str, *tensors: Tensor) -> bool:
    """Whether ``name`` on these logits / hidden states goes to the Triton kernel."""
    mode = os.environ.get("AKL_TRITON", "auto").strip().lower()
    if mode in ("0", "off", "false") or name not in SUPPORTED or not triton_importable():
        return False
    if any(x.dtype not in _DTYPES for x in tensors):
        return False
    return mode in ("1", "on", "true") or all(x.is_cuda for x in tensors)


def _kernel():
    from akl_core.kernels import akl_triton

    return akl_triton


def _stats(name: str, opts: DivergenceOptions, rows: Tensor) -> dict[str, Tensor]:
    """Stats sums from the kernel's per-row columns, with the PyTorch path's keys."""
    cols = _kernel().COLUMNS
    keys = STAT_NAMES if opts.all_stats or name not in _OWN_STATS else _OWN_STATS[name]
    return {k: rows[:, cols.index(k)].sum() for k in keys}


def _head(name: str, opts: DivergenceOptions) -> bool:
    return opts.all_stats or name in ("akl", "akl_r")


def _forward(name, s, t, labels, opts: DivergenceOptions, need_grad: bool):
    valid = labels != opts.ignore_index
    all_valid = bool(valid.all())
    rows = None if all_valid else valid.nonzero().squeeze(1)
    grad = None
    if need_grad:
        grad = torch.empty_like(s) if all_valid else torch.zeros_like(s)
    per_row = _kernel().divergence_rows(
        name, s, t, mu=opts.mu, temperature=opts.temperature, head=_head(name, opts), rows=rows, grad=grad
    )
    return per_row[:, 0].sum(), grad, int(valid.sum()), _stats(name, opts, per_row)


_TritonDivergence = grad_in_forward(_forward)


def compute(name: str, s: Tensor, t: Tensor, labels: Tensor, opts: DivergenceOptions) -> DivergenceOutput:
    """``divergences.compute`` on (N, V) logits, teacher detached, by the kernel."""
    s = s if s.stride(-1) == 1 else s.contiguous()
    t = t if t.stride(-1) == 1 else t.contiguous()
    if torch.is_grad_enabled() and s.requires_grad:
        loss_sum, n, stats = _TritonDivergence.apply(s, t, labels, name, opts)
        return finish(loss_sum, n, stats)
    with torch.no_grad():
        loss_sum, _, n, stats = _forward(name, s, t, labels, opts, need_grad=False)
    return finish(loss_sum, n, stats)


# -- the fused lm_head path ----------------------------------------------------------------------


def _fused_forward(sh, sw, sb, th, tw, tb, labels, name, opts: DivergenceOptions, need, caps):
    """``akl_core.fused._fused_forward`` with the kernel, in the weights' dtype.

    Per chunk of valid tokens: both logits in the hidden states' dtype, the kernel writes the
    gradient over the student logits (no third (R, V) buffer; with a student soft-cap its
    own, since the chain rule needs the capped logits after the kernel), then grad_h = g @ W and
    grad_W += g.T @ h. grad_W accumulates in W's dtype, as Liger-Kernel's chunked losses do:
    an fp32 copy of a (V, H) weight would cost more memory than all the chunks together.
    """
    need_h, need_w, need_b = need
    need_grad = any(need)
    valid = labels != opts.ignore_index
    v = sw.shape[0]
    grad_h = torch.zeros_like(sh) if need_h else None
    grad_w = torch.zeros_like(sw) if need_w else None
    grad_b = torch.zeros(sb.shape, dtype=torch.float32, device=sb.device) if need_b else None
    loss_sum = sh.new_zeros((), dtype=torch.float32)
    stats: dict[str, Tensor] = {}
    rows = opts.chunk_size or max(1, _FUSED_CHUNK_ELEMENTS // max(v, 1))
    rows = min(rows, max(sh.shape[0], 1))
    s_buf = torch.empty(rows, v, dtype=sh.dtype, device=sh.device)
    t_buf = torch.empty(rows, v, dtype=th.dtype, device=th.device)
    g_buf = torch.empty_like(s_buf) if caps[0] is not None and need_grad else s_buf
    for sel in chunk_selectors(valid, rows):
        h_c = sh[sel]
        r = h_c.shape[0]
        s_c = softcap_(_logits(h_c, sw, sb, s_buf[:r]), caps[0])
        t_c = softcap_(_logits(th[sel], tw, tb, t_buf[:r]), caps[1])
        g = g_buf[:r]  # the gradient wrt these logits (s_c itself without a soft-cap)
        per_row = _kernel().divergence_rows(
            name,
            s_c,
            t_c,
            mu=opts.mu,
            temperature=opts.temperature,
            head=_head(name, opts),
            grad=g if need_grad else None,
        )
        loss_sum += per_row[:, 0].sum()
        for k, val in _stats(name, opts, per_row).items():
            stats[k] = stats[k] + val if k in stats else val
        if need_grad:
            softcap_grad_(g, s_c, caps[0])
        if grad_h is not None:  # need_h
            gh = g.to(sw.dtype) @ sw
            if isinstance(sel, slice):
                grad_h[sel] = gh
            else:
                grad_h.index_copy_(0, sel, gh.to(grad_h.dtype))
        if grad_w is not None:  # need_w
            grad_w.addmm_(g.t().to(sw.dtype), h_c.to(sw.dtype))
        if grad_b is not None:  # need_b
            grad_b += g.float().sum(0)
    return loss_sum, int(valid.sum()), stats, (grad_h, grad_w, grad_b)


def _logits(hidden: Tensor, weight: Tensor, bias: Tensor | None, out: Tensor) -> Tensor:
    """hidden @ weight.T (+ bias) into ``out`` (in the hidden states' dtype)."""
    w = weight.to(hidden.dtype)
    if bias is None:
        return torch.mm(hidden, w.t(), out=out)
    return torch.addmm(bias.to(hidden.dtype), hidden, w.t(), out=out)


_TritonFused = fused_grad_in_forward(_fused_forward)


def compute_fused(name, sh, sw, sb, th, tw, tb, labels, opts: DivergenceOptions, caps=(None, None)):
    """``fused.compute_fused`` on (N, H) hidden states (checked, teacher detached) by the kernel."""
    wants_grad = sh.requires_grad or sw.requires_grad or (sb is not None and sb.requires_grad)
    if torch.is_grad_enabled() and wants_grad:
        loss_sum, n, stats = _TritonFused.apply(sh, sw, sb, th, tw, tb, labels, name, opts, caps)
        return finish(loss_sum, n, stats)
    with torch.no_grad():
        loss_sum, n, stats, _ = _fused_forward(sh, sw, sb, th, tw, tb, labels, name, opts, (False,) * 3, caps)
    return finish(loss_sum, n, stats)
