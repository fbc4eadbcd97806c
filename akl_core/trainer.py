"""The distillation run: ``distill(spec, output_dir) -> result``.

One optimizer step (read top to bottom, nanoGPT style):
  1. take the step's examples from a seeded per-epoch permutation (position saved in checkpoints),
  2. count the valid (response) tokens of the whole step, summed over processes,
  3. per micro-batch: teacher forward (no grad), student forward, CE sum + divergence sum,
     scaled once by 1 / global valid tokens (STYLE.md habit 5), backward,
  4. clip, AdamW, scheduler; emit a `step` event with the AKL gap stats.
Logits are computed only at response positions (the LM head applied to the selected hidden
states): prompt and padding positions never cost a (V,)-sized row.

Several processes: started by torchrun (RANK / WORLD_SIZE / LOCAL_RANK in the environment) this
runs DistributedDataParallel over gloo (CPU) or nccl (CUDA); rank 0 alone writes files and events.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from akl_core import checkpoint as ckpt
from akl_core.events import DistillError, Event, EventSink, classify_error, json_safe, step_event
from akl_core.spec import JobSpec, total_steps

GAP_KEYS = ("g_head", "g_tail", "w_head", "fkl", "rkl", "head_size")


# ----------------------------------------------------------------------------------------------
# processes and devices


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def all_reduce(self, values: list[float], device: torch.device) -> list[float]:
        """Sum plain numbers over processes (float64 so token counts stay exact)."""
        if not self.enabled:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def init_distributed(device_pref: str) -> tuple[DistInfo, torch.device]:
    """Join the process group torchrun describes (if any) and pick this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    info = DistInfo(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
    use_cuda = device_pref == "cuda" or (device_pref == "auto" and torch.cuda.is_available())
    if device_pref == "cuda" and not torch.cuda.is_available():
        raise DistillError(
            "no_gpu",
            "resources.device is 'cuda' but this worker has no usable CUDA device; submit with "
            "resources.device 'auto' or 'cpu', or run a GPU worker on the gpu queue",
        )
    if use_cuda and info.local_rank >= torch.cuda.device_count():
        raise DistillError(
            "no_gpu",
            f"resources.processes asks for {info.world_size} processes but this worker has "
            f"{torch.cuda.device_count()} CUDA devices; lower resources.processes",
        )
    device = torch.device("cuda", info.local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if info.enabled and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return info, device


# ----------------------------------------------------------------------------------------------
# data order


class DataOrder:
    """A seeded permutation per epoch; the run's position is (epoch, index within the epoch)."""

    def __init__(self, num_examples: int, seed: int):
        self.n = num_examples
        self.seed = seed
        self._cache: tuple[int, list[int]] | None = None

    def permutation(self, epoch: int) -> list[int]:
        if self._cache is None or self._cache[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._cache = (epoch, torch.randperm(self.n, generator=g).tolist())
        return self._cache[1]

    def take(self, state: ckpt.TrainState, count: int) -> list[int]:
        """The next ``count`` example indices (fewer at the end of an epoch); advances ``state``."""
        if state.index >= self.n:
            state.epoch, state.index = state.epoch + 1, 0
        ids = self.permutation(state.epoch)[state.index : state.index + count]
        state.index += len(ids)
        return ids


def micro_batches(ids: list[int], batch_size: int, grad_accum: int, info: DistInfo) -> list[list[int]]:
    """This process's micro-batches of a step: micro m of rank r holds slot (m * world + r), so
    the union over ranks is the same global batch whatever the process count. Empty slots (end
    of an epoch) stay empty lists; the caller fills them with a fully masked example."""
    out = []
    for m in range(grad_accum):
        slot = m * info.world_size + info.rank
        out.append(ids[slot * batch_size : (slot + 1) * batch_size])
    return out


# ----------------------------------------------------------------------------------------------
# models: logits at response positions only


class ResponseLogits(nn.Module):
    """Wraps a causal LM; ``forward`` returns the logits (N, V) at the N positions whose next-token
    label is valid, plus those labels (N,). DDP wraps this module, so gradients sync as usual.
    With ``hidden_only`` it returns the hidden states (N, H) for the fused lm_head + loss."""

    def __init__(self, lm: nn.Module, hidden_only: bool = False):
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


def _autocast(device: torch.device, precision: str):
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def teacher_dtype(name: str, device: torch.device) -> torch.dtype:
    table = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return table[name]


# ----------------------------------------------------------------------------------------------
# the loss of one micro-batch


@dataclass
class StepSums:
    """Sums over the micro-batches of one optimizer step (and later over processes)."""

    ce: float = 0.0
    kd: float = 0.0
    tokens: float = 0.0  # valid (response) tokens
    seq_tokens: float = 0.0  # non-padding input tokens, for throughput
    stats: dict[str, float] | None = None  # gap stats, summed weighted by tokens

    def as_list(self) -> list[float]:
        stats = self.stats or {}
        return [self.ce, self.kd, self.tokens, self.seq_tokens, *(stats.get(k, 0.0) for k in GAP_KEYS)]

    @classmethod
    def from_list(cls, values: list[float]) -> StepSums:
        return cls(*values[:4], stats=dict(zip(GAP_KEYS, values[4:], strict=True)))


def micro_loss(
    student: nn.Module,
    teacher: nn.Module,
    batch: dict[str, torch.Tensor],
    spec: JobSpec,
    vocab: int,
    precision: str,
    fused_fn: Callable | None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float], int]:
    """(ce_sum, kd_sum, gap stats summed over tokens, valid tokens) for one micro-batch."""
    from akl_core import divergences

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
    kd_name = "fkl" if loss.name == "sft" else loss.name  # sft: the divergence is monitoring only
    device = batch["input_ids"].device
    with torch.no_grad(), _autocast(device, precision):
        t_out, _ = teacher(batch["input_ids"], batch["attention_mask"], batch["labels"])  # (N, V|H')
    with _autocast(device, precision):
        s_out, targets = student(batch["input_ids"], batch["attention_mask"], batch["labels"])  # (N, V|H)
    n = int(targets.numel())
    if fused_fn is not None:
        # Full logits never exist: lm_head + divergence fused, CE in recomputed chunks.
        # the head as the model applies it: bias (Phi) and final soft-capping (Gemma-2) too
        s_w, s_b, s_cap = _head_parts(student)
        t_w, t_b, t_cap = _head_parts(teacher)
        ce_sum = _chunked_ce(s_out, s_w, targets, s_b, s_cap)
        with torch.set_grad_enabled(loss.name != "sft" and torch.is_grad_enabled()):
            out = fused_fn(
                kd_name,
                s_out,
                s_w[:vocab],
                t_out,
                t_w[:vocab],
                targets,
                student_bias=None if s_b is None else s_b[:vocab],
                teacher_bias=None if t_b is None else t_b[:vocab],
                student_softcap=s_cap,
                teacher_softcap=t_cap,
                **opts,
            )
    else:
        ce_sum = F.cross_entropy(s_out.float(), targets, reduction="sum")
        # slice only a padded vocabulary: a no-op slice would still cost a copy downstream
        s_logits = s_out if s_out.shape[-1] == vocab else s_out[:, :vocab]
        t_logits = t_out if t_out.shape[-1] == vocab else t_out[:, :vocab]
        del s_out, t_out
        with torch.set_grad_enabled(loss.name != "sft" and torch.is_grad_enabled()):
            out = divergences.compute(kd_name, s_logits, t_logits, targets, **opts)
        del s_logits, t_logits
    kd_sum = out.loss_sum if loss.name != "sft" else ce_sum.new_zeros(())
    # stats are means over the divergence's own valid tokens: weight them by that count
    stats_sum = {k: float(out.stats.get(k, 0.0)) * out.num_tokens for k in GAP_KEYS}
    return ce_sum, kd_sum, stats_sum, n


def _head_parts(wrapper: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, float | None]:
    """(lm_head weight, its bias or None, final logit soft-cap or None) of a ResponseLogits."""
    lm = _unwrap(wrapper).lm
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
    from torch.utils.checkpoint import checkpoint

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


def _unwrap(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


def _load_fused(spec: JobSpec, sink: EventSink) -> Callable | None:
    if not spec.loss.fused:
        return None
    try:
        from akl_core.fused import compute_fused
    except ImportError:
        sink.log("loss.fused is set but akl_core.fused is not available; using the unfused loss", "warning")
        return None
    return compute_fused


# ----------------------------------------------------------------------------------------------
# one optimizer step


def train_step(
    student: nn.Module,
    teacher: nn.Module,
    batches: list[dict[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    spec: JobSpec,
    vocab: int,
    info: DistInfo,
    device: torch.device,
    precision: str,
    fused_fn: Callable | None = None,
) -> tuple[StepSums, float]:
    """Accumulate over ``batches`` (this process's micro-batches), clip, step. Returns the step's
    sums over all processes and the gradient norm. Raises DistillError('nan_loss') before the
    update if the loss is not finite."""
    r = spec.loss.kd_ratio
    local_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    global_tokens = info.all_reduce([float(local_tokens)], device)[0]
    # DDP averages gradients over processes; multiplying by world_size turns that into a sum, so
    # the gradient is d(sum of token losses)/d(theta) / (global valid tokens).
    scale = info.world_size / max(global_tokens, 1.0)
    sums = StepSums(stats={k: 0.0 for k in GAP_KEYS})
    for i, batch in enumerate(batches):
        sync = i == len(batches) - 1 or not info.enabled
        ctx = contextlib.nullcontext() if sync else student.no_sync()
        with ctx:
            ce_sum, kd_sum, stats_sum, n = micro_loss(
                student, teacher, batch, spec, vocab, precision, fused_fn
            )
            total = ((1.0 - r) * ce_sum + r * kd_sum) * scale
            total.backward()
        sums.ce += float(ce_sum.detach())
        sums.kd += float(kd_sum.detach())
        sums.tokens += n
        sums.seq_tokens += float(batch["attention_mask"].sum())
        for k in GAP_KEYS:
            sums.stats[k] += stats_sum[k]
        del ce_sum, kd_sum, total
    sums = StepSums.from_list(info.all_reduce(sums.as_list(), device))
    loss = ((1.0 - r) * sums.ce + r * sums.kd) / max(sums.tokens, 1.0)
    if not math.isfinite(loss):
        optimizer.zero_grad(set_to_none=True)
        raise DistillError(
            "nan_loss",
            f"the loss is not finite ({loss}); lower training.learning_rate, use training.precision "
            "'fp32' and teacher_dtype 'fp32', or check the data",
        )
    max_norm = spec.training.max_grad_norm if spec.training.max_grad_norm > 0 else float("inf")
    grad_norm = float(torch.nn.utils.clip_grad_norm_(student.parameters(), max_norm))
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return sums, grad_norm


def lr_factor(step: int, spec: JobSpec, total: int) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based), nanoGPT-style:
    1) linear warmup that starts above 0 (no wasted first step), 2) cosine / linear decay to 0
    over the remaining steps, or constant."""
    t = spec.training
    if step < t.warmup_steps:
        return (step + 1) / (t.warmup_steps + 1)
    if t.scheduler == "constant":
        return 1.0
    progress = min(1.0, (step - t.warmup_steps) / max(1, total - t.warmup_steps))
    if t.scheduler == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - progress


def make_optimizer(model: nn.Module, spec: JobSpec, total: int, device: torch.device):
    """AdamW with weight decay on matrices only (nanoGPT), and the warmup + decay schedule."""
    t = spec.training
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": t.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=t.learning_rate, betas=(0.9, 0.999), fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, spec, total))
    return optimizer, scheduler


# ----------------------------------------------------------------------------------------------
# the run


def distill(
    spec: JobSpec,
    output_dir: Path,
    *,
    on_event: Callable[[Event], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    resume: bool = True,
    models_root: Path | None = None,
    allow_hub: bool | None = None,
) -> dict[str, Any]:
    """Run a distillation job into ``output_dir`` (layout in docs/architecture.md).

    Returns ``{"status": "completed"|"stopped", "step", "total_steps", "trained_tokens",
    "metrics", "final_path"}``. On failure emits an `error` event and raises DistillError.
    """
    output_dir = Path(output_dir)
    try:
        info, device = init_distributed(spec.resources.device)
    except DistillError as exc:  # no sink yet: the error event still reaches events.jsonl
        if int(os.environ.get("RANK", "0")) == 0:
            sink = EventSink(output_dir / "events.jsonl", on_event)
            sink.emit("error", code=exc.code, message=exc.message)
            sink.close()
        raise
    if not resume and info.is_main:  # a fresh run: no trace of an earlier one in the output
        for stale in ("checkpoints", "final", "result.json", "events.jsonl"):
            path = output_dir / stale
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    info.barrier()
    sink = EventSink(output_dir / "events.jsonl", on_event) if info.is_main else EventSink()
    try:
        return _run(spec, output_dir, sink, info, device, should_stop, resume, models_root, allow_hub)
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt):
            raise
        code, message = classify_error(exc)
        sink.emit("error", code=code, message=message)
        raise DistillError(code, message) from exc
    finally:
        sink.close()


@dataclass
class _Setup:
    tokenizer: Any
    teacher: nn.Module
    student: nn.Module  # bare model (not wrapped)
    vocab: int
    train: list[dict[str, list[int]]]
    validation: list[Any]
    pad_id: int


def _setup(spec: JobSpec, device: torch.device, models_root, allow_hub, resume_from: Path | None) -> _Setup:
    from transformers import AutoModelForCausalLM

    from akl_core import data, models

    t = spec.training
    teacher_path = models.resolve_model_ref(spec.teacher, models_root=models_root, allow_hub=allow_hub)
    tokenizer = models.load_tokenizer(teacher_path)
    teacher = models.load_teacher(teacher_path, dtype=teacher_dtype(t.teacher_dtype, device), device=device)
    if resume_from is not None:
        student = AutoModelForCausalLM.from_pretrained(resume_from, dtype=torch.float32, use_safetensors=True)
    else:
        student = models.build_student(spec.student, teacher_path, models_root, allow_hub, t.seed)
        if spec.student.init == "pretrained":
            s_path = models.resolve_model_ref(
                spec.student.model, models_root=models_root, allow_hub=allow_hub
            )
            models.check_tokenizers(tokenizer, models.load_tokenizer(s_path))
    student = student.to(device=device, dtype=torch.float32)
    vocab = models.common_vocab_size(teacher, student, tokenizer)
    examples = data.read_examples(spec.data.train, spec.data.format, spec.data.max_train_examples)
    train = data.tokenize_examples(examples, tokenizer, t.max_length, t.max_prompt_length)
    validation = []
    if spec.data.validation:
        validation = data.read_examples(
            spec.data.validation, spec.data.format, spec.data.max_validation_examples
        )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return _Setup(tokenizer, teacher, student, vocab, train, validation, pad_id)


def _batch(s: _Setup, ids: list[int], device: torch.device) -> dict[str, torch.Tensor]:
    from akl_core import data

    if ids:
        rows = [s.train[i] for i in ids]
    else:  # an empty slot at the end of an epoch: one fully masked example keeps DDP in lock-step
        rows = [{"input_ids": s.train[0]["input_ids"], "labels": [-100] * len(s.train[0]["input_ids"])}]
    return {k: v.to(device) for k, v in data.collate(rows, s.pad_id).items()}


def _evaluate(spec: JobSpec, s: _Setup, output_dir: Path, device: torch.device, step: int) -> dict[str, Any]:
    from akl_core import evaluation

    s.student.eval()
    try:
        metrics = evaluation.evaluate_model(
            s.student,
            s.tokenizer,
            s.validation,
            spec.evaluation,
            teacher=s.teacher,
            vocab_size=s.vocab,
            max_length=spec.training.max_length,
            max_prompt_length=spec.training.max_prompt_length,
            device=device,
            cache_dir=output_dir,
        )
    finally:
        s.student.train()
    return {"step": step, **metrics}


EVAL_KEYS = (
    "rouge_l",
    "rouge_l_std",
    "rouge_l_greedy",
    "distinct_1",
    "distinct_2",
    "val_ce",
    "val_kl",
    "teacher_rouge_l",
    "teacher_rouge_l_std",
    "teacher_rouge_l_greedy",
    "num_examples",
)


def _eval_event(metrics: dict[str, Any]) -> dict[str, Any]:
    """The contract's `eval` fields, in order (the full metrics go to result.json)."""
    return {"step": metrics["step"], **{k: metrics.get(k) for k in EVAL_KEYS}}


def _completed_result(output_dir: Path, spec_hash: str) -> dict[str, Any] | None:
    path = output_dir / "result.json"
    if not path.is_file() or not (output_dir / "final").is_dir():
        return None
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return result if result.get("spec_sha256") == spec_hash and result.get("status") == "completed" else None


def _run(spec, output_dir, sink, info, device, should_stop, resume, models_root, allow_hub) -> dict[str, Any]:
    t = spec.training
    torch.manual_seed(t.seed)
    spec_hash = hashlib.sha256(spec.model_dump_json(exclude={"resources"}).encode()).hexdigest()[:16]
    done = _completed_result(output_dir, spec_hash) if resume else None
    if done is not None:  # e.g. a worker retrying a job that finished before it was recorded
        sink.log("this output directory already holds the completed run of this spec; not training again")
        sink.emit("completed", step=done["step"], final_path="final", metrics=done["metrics"])
        return done
    latest = ckpt.latest_checkpoint(output_dir) if resume else None
    # Loading can take minutes for a large teacher: say so before the first `started` event.
    sink.emit("loading", message="loading the teacher, the student and the data")
    s = _setup(spec, device, models_root, allow_hub, latest)
    if not s.train:
        raise DistillError("invalid_data", "the training data has no examples")
    if t.gradient_checkpointing:
        if hasattr(s.student, "activation_checkpointing_enable"):  # transformers >= 5.x name
            s.student.activation_checkpointing_enable({"use_reentrant": False})
        else:
            s.student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    s.student.train()
    s.teacher.eval().requires_grad_(False)
    fused_fn = _load_fused(spec, sink)
    student = ResponseLogits(s.student, hidden_only=fused_fn is not None)
    teacher = ResponseLogits(s.teacher, hidden_only=fused_fn is not None)
    if info.enabled:
        ids = [device.index] if device.type == "cuda" else None
        student = nn.parallel.DistributedDataParallel(student, device_ids=ids)
    total = total_steps(spec, len(s.train), info.world_size)
    optimizer, scheduler = make_optimizer(s.student, spec, total, device)
    state = ckpt.TrainState()
    if latest is not None:
        blob = ckpt.load_trainer_state(latest)
        optimizer.load_state_dict(blob["optimizer"])
        scheduler.load_state_dict(blob["scheduler"])
        ckpt.set_rng_state(blob["rng"])
        state = blob["train_state"]
    order = DataOrder(len(s.train), t.seed)
    global_batch = t.batch_size * t.grad_accum * info.world_size
    sink.emit(
        "started",
        total_steps=total,
        resumed_from_step=state.step,
        num_train_examples=len(s.train),
        device=str(device) if not info.enabled else f"{device.type} x{info.world_size}",
    )
    if latest is not None:
        sink.log(f"resumed from {latest.relative_to(output_dir)}")
    if not s.validation:
        sink.log("no validation data (data.validation): evaluation is skipped", "warning")
    last_ckpt: str | None = str(latest.relative_to(output_dir)) if latest is not None else None
    last_ckpt_step = state.step if latest is not None else -1
    metrics: dict[str, Any] = {}

    def save(step_state: ckpt.TrainState) -> str:
        path = None
        if info.is_main:
            path = ckpt.save_checkpoint(
                output_dir,
                step_state,
                model=s.student,
                tokenizer=s.tokenizer,
                optimizer=optimizer,
                scheduler=scheduler,
                keep=spec.checkpointing.keep,
            )
            sink.emit("checkpoint", step=step_state.step, path=str(path))
        info.barrier()
        return str(path) if path is not None else ckpt.CHECKPOINTS + "/" + ckpt.step_dir_name(step_state.step)

    while state.step < total:
        t0 = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        ids = order.take(state, global_batch)
        batches = [_batch(s, mb, device) for mb in micro_batches(ids, t.batch_size, t.grad_accum, info)]
        sums, grad_norm = train_step(
            student,
            teacher,
            batches,
            optimizer,
            scheduler,
            spec,
            s.vocab,
            info,
            device,
            t.precision,
            fused_fn,
        )
        state.step += 1
        state.trained_tokens += int(sums.tokens)
        n = max(sums.tokens, 1.0)
        r = spec.loss.kd_ratio
        dt = time.perf_counter() - t0
        sink(
            step_event(
                step=state.step,
                total_steps=total,
                epoch=state.epoch + state.index / len(s.train),
                loss=((1 - r) * sums.ce + r * sums.kd) / n,
                ce=sums.ce / n,
                kd=sums.kd / n,
                lr=lr,
                grad_norm=grad_norm,
                tokens=int(sums.tokens),
                trained_tokens=state.trained_tokens,
                tokens_per_s=sums.seq_tokens / max(dt, 1e-9),
                stats={k: v / n for k, v in sums.stats.items()} if sums.tokens > 0 else {},
            )
        )
        done = state.step >= total
        if spec.evaluation.every_steps and state.step % spec.evaluation.every_steps == 0 and not done:
            if info.is_main and s.validation:
                sink.emit("eval", **_eval_event(_evaluate(spec, s, output_dir, device, state.step)))
            info.barrier()
        if spec.checkpointing.every_steps and state.step % spec.checkpointing.every_steps == 0 and not done:
            last_ckpt, last_ckpt_step = save(state), state.step
        stop = bool(should_stop()) if should_stop is not None else False
        stop = info.all_reduce([float(stop)], device)[0] > 0  # every rank stops at the same step
        if stop and not done:
            if last_ckpt_step != state.step:
                last_ckpt, last_ckpt_step = save(state), state.step
            sink.emit("stopped", step=state.step, checkpoint=last_ckpt)
            return {
                "status": "stopped",
                "step": state.step,
                "total_steps": total,
                "trained_tokens": state.trained_tokens,
                "checkpoint": last_ckpt,
                "metrics": {},
            }

    if info.is_main:
        if s.validation:
            metrics = _evaluate(spec, s, output_dir, device, state.step)
            sink.emit("eval", **_eval_event(metrics))
            metrics.pop("step", None)
        final = output_dir / "final"
        tmp = output_dir / ".tmp-final"
        shutil.rmtree(tmp, ignore_errors=True)
        s.student.save_pretrained(tmp, safe_serialization=True)
        s.tokenizer.save_pretrained(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    info.barrier()
    result = {
        "status": "completed",
        "step": state.step,
        "total_steps": total,
        "trained_tokens": state.trained_tokens,
        "final_path": "final",
        "metrics": metrics,
        "train_state": asdict(state),
        "spec_sha256": spec_hash,
    }
    if info.is_main:
        (output_dir / "result.json").write_text(json.dumps(json_safe(result), indent=2), encoding="utf-8")
        sink.emit("completed", step=state.step, final_path="final", metrics=metrics)
    return result
