"""The chunked autograd machinery: chunks of valid tokens, reused buffers, a gradient made in forward.

- ``chunk_loop`` runs a per-chunk function over the valid tokens a few rows at a time, in
  buffers reused from chunk to chunk (``Workspace``), and sums its losses and statistics. The
  dense divergences here, akl_core/fused.py and the Triton wrappers (akl_core/kernels/dispatch.py)
  use it or its parts; any per-token loss over rows of tensors can.
- Gradients are computed in the forward pass, one chunk at a time, and written into one buffer
  shaped like the student logits (what autograd has to hand back anyway); backward scales that
  buffer in place and returns it (``grad_in_forward``, ``scaled_once``). Peak memory is the
  logits, their gradient and one chunk of fp32 temporaries, never a few (N, V) fp32 tensors as
  with plain autograd. The graph can be backpropagated once.
- The fast per-row formulas (rows.py) skip the guards that -inf logits need; a chunk whose
  result holds a NaN is recomputed with the guarded ones (``divergence_chunk``).
- AKL's chunks are groups: its element-wise passes run in smaller chunks that stay in the CPU's
  cache, its head search once per group (``rows.akl_group``, ``sub_chunk_rows``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from akl_core.divergences.options import DivergenceOptions, DivergenceOutput
from akl_core.divergences.rows import akl_group, needs_head, per_token, tempered

# Tokens (rows of V logits) per chunk when chunk_size is None: about this many fp32 elements.
# On CPU a chunk's few (rows, V) buffers then stay in the L2/L3 caches: 16 rows at V = 32000
# ran FKL 1.3x faster than 64 rows (bench/divergences.py); smaller chunks pay more per-op overhead.
_AUTO_CHUNK_ELEMENTS = {"cpu": 1 << 19, "cuda": 1 << 23}
# AKL's head search is a few dozen small ops per call, whatever its rows: it runs once per group
# of this many logits, whose element-wise passes run in chunks of _AUTO_CHUNK_ELEMENTS
# (rows.akl_group; on real logits, N = 1450, V = 49152: bench/divergences.py)
_AUTO_CHUNK_ELEMENTS_HEAD = {"cpu": 1 << 22, "cuda": 1 << 23}
GROUPED = ("akl", "akl_r")  # the divergences with a grouped path (rows.akl_group)

# per_chunk(inputs of one chunk, out) -> (loss (R,), gradient rows or None, stats sums)
ChunkFn = Callable[[tuple[Tensor, ...], "Tensor | None"], tuple[Tensor, "Tensor | None", dict[str, Tensor]]]


class Workspace:
    """(rows, V) buffers reused from chunk to chunk (fp32 unless asked otherwise).

    Fresh multi-megabyte tensors cost page faults on every chunk (measured: up to 10x the
    arithmetic on CPU), so each chunk writes into the same few buffers with ``out=``.
    """

    def __init__(self, rows: int, vocab: int, device: torch.device):
        self.rows, self.vocab, self.device = rows, vocab, device
        self._bufs: dict[tuple[str, torch.dtype], Tensor] = {}
        # what one chunk learnt that the next chunks of the same call can use (speed only: e.g.
        # head.py stops trying a head stage that settles few rows of these logits)
        self.hints: dict[str, bool] = {}
        self._sub: Workspace | None = None

    def sub(self, rows: int) -> Workspace:
        """A workspace of ``rows`` rows for chunks inside this one's (kept; it shares the hints)."""
        if self._sub is None or self._sub.rows != rows:
            self._sub = Workspace(rows, self.vocab, self.device)
            self._sub.hints = self.hints
        return self._sub

    def get(
        self, key: str, r: int, dtype: torch.dtype = torch.float32, tail: tuple[int, ...] | None = None
    ) -> Tensor:
        """The first r rows of buffer ``key``: (r, V), or (r, *tail) when a tail shape is given."""
        buf = self._bufs.get((key, dtype))
        if buf is None:
            shape = (self.rows, *(tail if tail is not None else (self.vocab,)))
            buf = torch.empty(shape, dtype=dtype, device=self.device)
            self._bufs[(key, dtype)] = buf
        return buf[:r]


def chunk_rows(opts: DivergenceOptions, vocab: int, device: torch.device, name: str | None = None) -> int:
    """Tokens per chunk: opts.chunk_size, else about _AUTO_CHUNK_ELEMENTS logits (more with a head search)."""
    if opts.chunk_size is not None:
        return opts.chunk_size
    return _auto_rows(
        _AUTO_CHUNK_ELEMENTS_HEAD if needs_head(name, opts) else _AUTO_CHUNK_ELEMENTS, vocab, device
    )


def sub_chunk_rows(opts: DivergenceOptions, vocab: int, device: torch.device) -> int:
    """Rows per element-wise chunk inside a group (``rows.akl_group``): about
    _AUTO_CHUNK_ELEMENTS logits, at most opts.chunk_size."""
    rows = _auto_rows(_AUTO_CHUNK_ELEMENTS, vocab, device)
    return min(rows, opts.chunk_size) if opts.chunk_size is not None else rows


def _auto_rows(table: dict[str, int], vocab: int, device: torch.device) -> int:
    return max(1, table.get(device.type, table["cuda"]) // max(vocab, 1))


def chunk_selectors(valid: Tensor, rows: int) -> list[Tensor | slice]:
    """Row selectors over the valid tokens: slices when every token is valid (no copies)."""
    n = valid.numel()
    if bool(valid.all()):
        return [slice(i, min(i + rows, n)) for i in range(0, n, rows)]
    idx = valid.nonzero().squeeze(1)
    return list(idx.split(rows)) if idx.numel() > 0 else []


def chunk_loop(
    per_chunk: ChunkFn,
    inputs: tuple[Tensor, ...],
    valid: Tensor,
    rows: int,
    ws: Workspace,
    grad: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """(loss sum, stats sums) of ``per_chunk`` over the valid tokens, ``rows`` at a time.

    inputs: tensors with one row per token ((N, ...) each); a chunk gets their valid rows as
        views (every token valid) or gathered into reused ``ws`` buffers.
    valid: (N,) bool. grad: (N, ...) or None; the gradient rows ``per_chunk`` returns are
        written into it. ``per_chunk(chunk, out)`` gets ``out``, the chunk's slice of ``grad``,
        when that can be written directly (an fp32 slice), else None.
    """
    loss_sum = inputs[0].new_zeros((), dtype=torch.float32)
    stats: dict[str, Tensor] = {}
    for sel in chunk_selectors(valid, rows):
        if isinstance(sel, slice):
            chunk = tuple(x[sel] for x in inputs)
        else:  # gather the valid rows into reused buffers
            r = sel.numel()
            chunk = tuple(
                torch.index_select(x, 0, sel, out=ws.get(f"rows{i}", r, x.dtype, tuple(x.shape[1:])))
                for i, x in enumerate(inputs)
            )
        # write the gradient straight into the result when it is an fp32 slice of it
        direct = grad is not None and isinstance(sel, slice) and grad.dtype == torch.float32
        loss, g, st = per_chunk(chunk, grad[sel] if direct and grad is not None else None)
        loss_sum += loss.sum()
        for k, v in st.items():
            stats[k] = stats[k] + v if k in stats else v
        if grad is not None and not direct:
            assert g is not None
            if isinstance(sel, slice):
                grad[sel].copy_(g)
            else:
                grad.index_copy_(0, sel, g if g.dtype == grad.dtype else g.to(grad.dtype))
    return loss_sum, stats


def divergence_chunk(
    name: str,
    student: Tensor,
    teacher: Tensor,
    opts: DivergenceOptions,
    need_grad: bool,
    ws: Workspace | None = None,
    out: Tensor | None = None,
    sub_rows: int | None = None,
) -> tuple[Tensor, Tensor | None, dict[str, Tensor]]:
    """Per-token loss (R,), grad wrt the student logits (R, V) fp32 or None, and stats sums.

    student, teacher: (R, V) logits of valid tokens in any float dtype (computed in fp32).
    ws: buffers to reuse across chunks; out: where to write the gradient ((R, V) fp32); without
    it the gradient lives in ``ws`` and is overwritten by the next chunk.
    sub_rows: for AKL, run the element-wise passes in chunks of this many rows and the head
    search once for all R (``rows.akl_group``).
    """
    r, v = student.shape
    ws = ws or Workspace(r, v, student.device)
    t = opts.temperature
    if need_grad and out is None:
        out = ws.get("grad", r)
    o = out if need_grad else None
    result: tuple[Tensor, dict[str, Tensor]] | None = None
    grouped = sub_rows is not None and r > sub_rows and name in GROUPED
    if grouped:  # tempered chunk by chunk; its gradient is wrt the untempered logits already
        assert sub_rows is not None
        result = akl_group(student, teacher, opts.mu, name == "akl_r", ws, o, sub_rows, t)  # None: a NaN
    if result is None:
        z_s, z_t = tempered(student, t, ws, "z_s"), tempered(teacher, t, ws, "z_t")
        if not grouped:
            result = per_token(name, z_s, z_t, opts, ws, o, safe=False)
            if any(bool(x.isnan().any()) for x in (result[0], *result[1].values())):
                result = None
        if result is None:
            # -inf logits (masked vocabulary) give 0 * inf = nan in the fast formulas, and only
            # there; redo the chunk with the guarded ones rather than pay for guards every time.
            result = per_token(name, z_s, z_t, opts, ws, o, safe=True)
        if o is not None and t != 1.0:
            o.div_(t)
    loss, stats = result
    return loss, o, {k: v.sum() for k, v in stats.items()}


def flatten(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Check shapes; return (N, V), (N, V), (N,) views."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student and teacher logits must have the same shape, got {tuple(student_logits.shape)} "
            f"and {tuple(teacher_logits.shape)} (cut a padded vocabulary to the shared size first)"
        )
    if student_logits.dim() not in (2, 3) or labels.shape != student_logits.shape[:-1]:
        raise ValueError(
            f"expected logits (B, T, V) or (N, V) and labels (B, T) or (N,), got "
            f"{tuple(student_logits.shape)} and {tuple(labels.shape)}"
        )
    if not student_logits.is_floating_point() or not teacher_logits.is_floating_point():
        raise ValueError("logits must be floating point")
    v = student_logits.shape[-1]
    return student_logits.reshape(-1, v), teacher_logits.reshape(-1, v), labels.reshape(-1)


def rows_forward(
    name: str,
    inputs: tuple[Tensor, ...],
    labels: Tensor,
    opts: DivergenceOptions,
    need_grad: bool,
    divergence: Callable,
) -> tuple[Tensor, Tensor | None, int, dict[str, Tensor]]:
    """(loss sum, grad wrt inputs[0] or None, num_tokens, stats sums) over the valid tokens.

    inputs: the (N, V) student logits first, then the teacher's per-token tensors (dense logits or
    the stored top-k). ``divergence(chunk, ws, out) -> (loss, grad, stats)`` is one chunk's
    divergence; the dense and the sparse chunked paths share this setup and ``chunk_loop``.
    """
    s = inputs[0]
    valid = labels != opts.ignore_index
    grad = None
    if need_grad:
        grad = torch.empty_like(s) if bool(valid.all()) else torch.zeros_like(s)
    rows = chunk_rows(opts, s.shape[-1], s.device, name)
    ws = Workspace(min(rows, s.shape[0]), s.shape[-1], s.device)

    def per_chunk(chunk: tuple[Tensor, ...], out: Tensor | None):
        return divergence(chunk, ws, out)

    loss_sum, stats = chunk_loop(per_chunk, inputs, valid, rows, ws, grad)
    return loss_sum, grad, int(valid.sum()), stats


def dense_forward(
    name: str, s: Tensor, t: Tensor, labels: Tensor, opts: DivergenceOptions, need_grad: bool
) -> tuple[Tensor, Tensor | None, int, dict[str, Tensor]]:
    """(loss sum, grad wrt s or None, num_tokens, stats sums) of ``name`` on (N, V) logits."""

    sub_rows = sub_chunk_rows(opts, s.shape[-1], s.device)

    def divergence(chunk: tuple[Tensor, ...], ws: Workspace, out: Tensor | None):
        return divergence_chunk(name, chunk[0], chunk[1], opts, need_grad, ws, out, sub_rows)

    return rows_forward(name, (s, t), labels, opts, need_grad, divergence)


def grad_in_forward(forward: Callable) -> type[torch.autograd.Function]:
    """An autograd Function over ``forward(name, s, t, labels, opts, need_grad)``, which returns
    (loss_sum, grad wrt the student logits, num_tokens, stats): the gradient is made in forward.

    ``Function.apply(s, t, labels, name, opts)`` returns (loss_sum, num_tokens, stats); only
    loss_sum carries a gradient. backward hands the buffer back scaled in place, without a copy
    (the copy of an (N, V) gradient was a third of the whole cost on CPU), so the graph can be
    backpropagated once. The chunked torch path and the Triton kernel
    (akl_core/kernels/dispatch.py) share it; ``t`` and ``labels`` may be any objects ``forward``
    takes.
    """

    class _PrecomputedGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, s, t, labels, name, opts):
            loss_sum, grad, n, stats = forward(name, s, t, labels, opts, need_grad=True)
            ctx.grad = grad
            return loss_sum, n, stats

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx, grad_output, *_):
            return scaled_once(ctx, "grad", grad_output), None, None, None, None

    return _PrecomputedGrad


ChunkedDivergence = grad_in_forward(dense_forward)


def scaled_once(ctx, attr: str, grad_output: Tensor) -> Tensor | None:
    """ctx.<attr> * grad_output, in place, releasing it; a second backward raises."""
    if not hasattr(ctx, attr):
        raise RuntimeError(
            "akl_core divergences keep their gradient from the forward pass and can be "
            "backpropagated once; recompute the loss instead of retain_graph=True"
        )
    grad = getattr(ctx, attr)
    delattr(ctx, attr)
    if grad is not None and not bool(grad_output == 1):
        grad.mul_(grad_output.to(grad.dtype))
    return grad


def finish(loss_sum: Tensor, n: int, stats: dict[str, Tensor]) -> DivergenceOutput:
    """The result: mean = sum / max(n, 1), stats as plain float means (empty when n == 0)."""
    denom = max(n, 1)
    out_stats = {k: float(v) / denom for k, v in stats.items()} if n > 0 else {}
    return DivergenceOutput(loss=loss_sum / denom, loss_sum=loss_sum, num_tokens=n, stats=out_stats)
