"""The math of one optimizer step: the loss of a micro-batch, accumulation, clip and update.

One optimizer step (read top to bottom, nanoGPT style):
  1. count the valid (response) tokens of the whole step, summed over processes,
  2. per micro-batch: teacher outputs (no grad), student forward, CE sum + divergence sum,
     scaled once by 1 / global valid tokens (STYLE.md habit 5), backward,
  3. clip, AdamW, scheduler.
Logits are computed only at response positions (the LM head applied to the selected hidden
states): prompt and padding positions never cost a (V,)-sized row. With ``loss.fused`` the
full logits never exist at all: lm_head and divergence are fused (akl_core/fused.py).
With a teacher cache the teacher's side is its stored top-k rows (akl_core/cached_teacher.py)
and the divergence the sparse one (akl_core/sparse.py, akl_core/sparse_fused.py).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.checkpoint import checkpoint

from akl_core import divergences
from akl_core.batches import Batch
from akl_core.cached_teacher import CachedTeacher
from akl_core.ddp import DistInfo, unwrap
from akl_core.events import STEP_STATS, DistillError
from akl_core.fused import compute_fused
from akl_core.sparse import compute_sparse
from akl_core.sparse_fused import compute_sparse_fused
from akl_core.spec import JobSpec
from akl_core.teacher_cache import CacheRows

if TYPE_CHECKING:
    from transformers import PreTrainedModel


class ResponseLogits(nn.Module):
    """Wraps a causal LM; ``forward`` returns the logits (N, V) at the N positions whose next-token
    label is valid, plus those labels (N,). DDP wraps this module, so gradients sync as usual.
    With ``hidden_only`` it returns the hidden states (N, H) for the fused lm_head + loss."""

    def __init__(self, lm: PreTrainedModel, hidden_only: bool = False):
        super().__init__()
        self.lm = lm
        self.hidden_only = hidden_only
        # Models that transform logits after the head (Gemma-2 soft-capping) take the full path.
        self.full_path = getattr(lm.config, "final_logit_softcapping", None) is not None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor):
        targets = labels[:, 1:]  # (B, T-1): position t predicts token t+1
        keep = targets != -100
        if self.full_path and not self.hidden_only:
            logits = self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
            return logits[:, :-1][keep], targets[keep]
        hidden = self.lm.get_decoder()(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False
        ).last_hidden_state  # (B, T, H)
        hidden = hidden[:, :-1][keep]  # (N, H)
        if self.hidden_only:
            return hidden, targets[keep]
        return self.lm.get_output_embeddings()(hidden), targets[keep]  # (N, V)


@dataclass
class StepContext:
    """What every optimizer step of a run uses; built once per run."""

    student: nn.Module  # a ResponseLogits (under DDP with several processes)
    teacher: nn.Module | CachedTeacher  # a ResponseLogits of the frozen teacher, or its cache
    spec: JobSpec
    vocab: int  # logit columns both models share (akl_core.models.common_vocab_size)
    info: DistInfo = field(default_factory=DistInfo)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def fused(self) -> bool:
        """The fused lm_head + loss: the wrappers return hidden states, not logits."""
        return bool(unwrap(self.student).hidden_only)

    @property
    def precision(self) -> str:
        return self.spec.training.precision


@dataclass
class StepSums:
    """Sums over the micro-batches of one optimizer step (and later over processes)."""

    ce: float = 0.0
    kd: float = 0.0
    tokens: float = 0.0  # valid (response) tokens
    seq_tokens: float = 0.0  # non-padding input tokens, for throughput
    stats: dict[str, float] = field(default_factory=dict)  # gap stats, summed weighted by tokens

    def as_list(self) -> list[float]:
        return [self.ce, self.kd, self.tokens, self.seq_tokens, *(self.stats.get(k, 0.0) for k in STEP_STATS)]

    @classmethod
    def from_list(cls, values: list[float]) -> StepSums:
        ce, kd, tokens, seq_tokens = values[:4]
        return cls(ce, kd, tokens, seq_tokens, stats=dict(zip(STEP_STATS, values[4:], strict=True)))


def autocast(device: torch.device, precision: str):
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------------------------
# one optimizer step


def train_step(
    ctx: StepContext, batches: list[Batch], optimizer: torch.optim.Optimizer, scheduler: Any
) -> tuple[StepSums, float]:
    """Accumulate over ``batches`` (this process's micro-batches), clip, step. Returns the step's
    sums over all processes and the gradient norm. Raises DistillError('nan_loss') before the
    update if the loss is not finite."""
    info, r = ctx.info, ctx.spec.loss.kd_ratio
    local_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    global_tokens = info.all_reduce([float(local_tokens)], ctx.device)[0]
    # DDP averages gradients over processes; multiplying by world_size turns that into a sum, so
    # the gradient is d(sum of token losses)/d(theta) / (global valid tokens).
    scale = info.world_size / max(global_tokens, 1.0)
    sums = StepSums(stats={k: 0.0 for k in STEP_STATS})
    for i, batch in enumerate(batches):
        sync = i == len(batches) - 1 or not info.enabled
        # not sync implies info.enabled: the student is a DistributedDataParallel wrapper
        with contextlib.nullcontext() if sync else cast(DDP, ctx.student).no_sync():
            ce_sum, kd_sum, stats_sum, n = micro_loss(ctx, batch)
            total = ((1.0 - r) * ce_sum + r * kd_sum) * scale
            total.backward()
        sums.ce += float(ce_sum.detach())
        sums.kd += float(kd_sum.detach())
        sums.tokens += n
        sums.seq_tokens += float(batch["attention_mask"].sum())
        for k in STEP_STATS:
            sums.stats[k] += stats_sum[k]
        del ce_sum, kd_sum, total
    sums = StepSums.from_list(info.all_reduce(sums.as_list(), ctx.device))
    loss = ((1.0 - r) * sums.ce + r * sums.kd) / max(sums.tokens, 1.0)
    if not math.isfinite(loss):
        optimizer.zero_grad(set_to_none=True)
        raise DistillError(
            "nan_loss",
            f"the loss is not finite ({loss}); lower training.learning_rate, use training.precision "
            "'fp32' and teacher_dtype 'fp32', or check the data",
        )
    max_norm = ctx.spec.training.max_grad_norm if ctx.spec.training.max_grad_norm > 0 else float("inf")
    grad_norm = float(torch.nn.utils.clip_grad_norm_(ctx.student.parameters(), max_norm))
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return sums, grad_norm


# ----------------------------------------------------------------------------------------------
# the loss of one micro-batch


def micro_loss(ctx: StepContext, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, dict[str, float], int]:
    """(ce_sum, kd_sum, gap stats summed over tokens, valid tokens) for one micro-batch."""
    name = ctx.spec.loss.name
    t_out = teacher_outputs(ctx, batch)  # (N, V), (N, H') on the fused path, or cached rows
    with autocast(batch["input_ids"].device, ctx.precision):
        s_out, targets = ctx.student(batch["input_ids"], batch["attention_mask"], batch["labels"])  # (N, V|H)
    if isinstance(t_out, CacheRows):
        ce_sum, out = _cached_losses(ctx, s_out, t_out, targets)
    else:
        losses = _fused_losses if ctx.fused else _unfused_losses
        ce_sum, out = losses(ctx, s_out, t_out, targets)
    kd_sum = out.loss_sum if name != "sft" else ce_sum.new_zeros(())
    # stats are means over the divergence's own valid tokens: weight them by that count
    stats_sum = {k: float(out.stats.get(k, 0.0)) * out.num_tokens for k in STEP_STATS}
    return ce_sum, kd_sum, stats_sum, int(targets.numel())


def teacher_outputs(ctx: StepContext, batch: Batch) -> torch.Tensor | CacheRows:
    """The teacher's side of the loss at the N response positions, without gradients: logits
    (N, V), or hidden states (N, H') on the fused path, or a cache's rows (top-k ids (N, k),
    log-probs (N, k), tail log-mass (N,)). The one place a step asks the teacher."""
    if isinstance(ctx.teacher, CachedTeacher):
        return ctx.teacher(batch)
    with torch.no_grad(), autocast(batch["input_ids"].device, ctx.precision):
        t_out, _ = ctx.teacher(batch["input_ids"], batch["attention_mask"], batch["labels"])
    return t_out


def _divergence(spec: JobSpec) -> tuple[str, dict[str, Any]]:
    """(divergence name, its options). sft trains on CE alone; its divergence (fkl) is monitoring."""
    loss = spec.loss
    # The gap history (g_head, g_tail, w_head, fkl, rkl) is logged for every loss; divergences
    # other than AKL add it with all_stats (about one more pass over the chunk, no gradient).
    opts = dict(
        mu=loss.mu,
        temperature=loss.temperature,
        lam=loss.lam,
        beta=loss.beta,
        chunk_size=loss.chunk_size,
        all_stats=loss.name not in ("akl", "akl_r"),
    )
    return ("fkl" if loss.name == "sft" else loss.name), opts


def _unfused_losses(ctx: StepContext, s_logits: torch.Tensor, t_logits: torch.Tensor, targets: torch.Tensor):
    """(CE sum, divergence output) from logits (N, V) and (N, V')."""
    kd_name, opts = _divergence(ctx.spec)
    ce_sum = F.cross_entropy(s_logits.float(), targets, reduction="sum")
    # slice only a padded vocabulary: a no-op slice would still cost a copy downstream
    if s_logits.shape[-1] != ctx.vocab:
        s_logits = s_logits[:, : ctx.vocab]
    if t_logits.shape[-1] != ctx.vocab:
        t_logits = t_logits[:, : ctx.vocab]
    with torch.set_grad_enabled(ctx.spec.loss.name != "sft" and torch.is_grad_enabled()):
        out = divergences.compute(kd_name, s_logits, t_logits, targets, **opts)
    return ce_sum, out


def _fused_losses(ctx: StepContext, s_hidden: torch.Tensor, t_hidden: torch.Tensor, targets: torch.Tensor):
    """(CE sum, divergence output) from hidden states (N, H) and (N, H'): full logits never exist;
    lm_head + divergence are fused, CE runs in recomputed chunks. The heads are applied as the
    models apply them: bias (Phi) and final soft-capping (Gemma-2) included."""
    kd_name, opts = _divergence(ctx.spec)
    s_w, s_b, s_cap = _head_parts(ctx.student)
    t_w, t_b, t_cap = _head_parts(cast(nn.Module, ctx.teacher))  # a live teacher: hidden states
    ce_sum = _chunked_ce(s_hidden, s_w, targets, s_b, s_cap)
    vocab = ctx.vocab
    with torch.set_grad_enabled(ctx.spec.loss.name != "sft" and torch.is_grad_enabled()):
        out = compute_fused(
            kd_name,
            s_hidden,
            s_w[:vocab],
            t_hidden,
            t_w[:vocab],
            targets,
            student_bias=None if s_b is None else s_b[:vocab],
            teacher_bias=None if t_b is None else t_b[:vocab],
            student_softcap=s_cap,
            teacher_softcap=t_cap,
            **opts,
        )
    return ce_sum, out


def _cached_losses(ctx: StepContext, s_out: torch.Tensor, rows: CacheRows, targets: torch.Tensor):
    """(CE sum, divergence output) from the student's logits (N, V) - or hidden states (N, H)
    on the fused path - and a cache's top-k rows: the sparse twins of the two functions above."""
    if rows.topk_ids.shape[0] != targets.numel():
        raise DistillError(
            "invalid_cache",
            f"the cache gave {rows.topk_ids.shape[0]} rows for {targets.numel()} response tokens",
        )
    kd_name, opts = _divergence(ctx.spec)
    teacher = (rows.topk_ids, rows.topk_logprobs, rows.tail_logmass)
    vocab = ctx.vocab
    with torch.set_grad_enabled(ctx.spec.loss.name != "sft" and torch.is_grad_enabled()):
        if ctx.fused:
            s_w, s_b, s_cap = _head_parts(ctx.student)
            ce_sum = _chunked_ce(s_out, s_w, targets, s_b, s_cap)
            bias = None if s_b is None else s_b[:vocab]
            out = compute_sparse_fused(
                kd_name,
                s_out,
                s_w[:vocab],
                *teacher,
                targets,
                student_bias=bias,
                student_softcap=s_cap,
                **opts,
            )
        else:
            ce_sum = F.cross_entropy(s_out.float(), targets, reduction="sum")
            s_logits = s_out if s_out.shape[-1] == vocab else s_out[:, :vocab]
            out = compute_sparse(kd_name, s_logits, *teacher, targets, **opts)
    return ce_sum, out


def _head_parts(wrapper: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, float | None]:
    """(lm_head weight, its bias or None, final logit soft-cap or None) of a ResponseLogits."""
    lm = cast(ResponseLogits, unwrap(wrapper)).lm
    head = lm.get_output_embeddings()
    return head.weight, getattr(head, "bias", None), getattr(lm.config, "final_logit_softcapping", None)


def _chunked_ce(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    softcap: float | None = None,
    rows: int = 1024,
):
    """Sum of CE over (N, H) hidden states; each (rows, V) chunk of logits is recomputed in
    backward (activation checkpointing) instead of kept, so memory stays one chunk. The logits
    are the model's own: + bias, then softcap * tanh(logits / softcap) when given (Gemma-2)."""

    def ce(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
        logits = F.linear(h, w, b)
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        return F.cross_entropy(logits.float(), y, reduction="sum")

    total = hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, hidden.shape[0], rows):
        total = total + checkpoint(
            ce, hidden[i : i + rows], weight, bias, targets[i : i + rows], use_reentrant=False
        )
    return total
