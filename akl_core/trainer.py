"""The distillation run: ``distill(spec, output_dir) -> result``.

``_run`` reads top to bottom: setup (load the models and the data), resume (optimizer, schedule,
random state and data position from the newest checkpoint), the step loop, evaluation /
checkpoint / stop between steps, and the final model with result.json at the end.

The pieces it calls, one concern per module:
  ddp.py       processes (torchrun + DistributedDataParallel); rank 0 alone writes files and events
  loading.py   the teacher, the student, the tokenizer and the data of a run
  batches.py   the data order and each step's micro-batches
  steps.py     the math of one optimizer step (micro-batch loss, accumulation, clip, update)
  optim.py     AdamW and the learning-rate schedule
  checkpoint.py, events.py, evaluation.py
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from akl_core import checkpoint as ckpt
from akl_core import data, evaluation, loading
from akl_core.batches import DataOrder, next_step_batches
from akl_core.contract import EVAL_METRICS
from akl_core.ddp import DistInfo, init_distributed, wrap
from akl_core.events import DistillError, Event, EventSink, classify_error, json_safe, step_event
from akl_core.loading import RunInputs
from akl_core.optim import make_optimizer
from akl_core.spec import JobSpec, total_steps
from akl_core.steps import ResponseLogits, StepContext, StepSums, train_step

EVAL_KEYS = (*EVAL_METRICS, "num_examples")


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
    run = _Run(spec, output_dir, sink, info, device, should_stop, resume, models_root, allow_hub)
    try:
        return _run(run)
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt):
            raise
        code, message = classify_error(exc)
        sink.emit("error", code=code, message=message)
        raise DistillError(code, message) from exc
    finally:
        sink.close()


@dataclass
class _Run:
    """One call of ``distill``: what it trains, where it writes, which process this is."""

    spec: JobSpec
    output_dir: Path
    sink: EventSink
    info: DistInfo
    device: torch.device
    should_stop: Callable[[], bool] | None
    resume: bool
    models_root: Path | None
    allow_hub: bool | None


def _run(run: _Run) -> dict[str, Any]:
    spec, sink, info, t = run.spec, run.sink, run.info, run.spec.training
    # 1. setup
    torch.manual_seed(t.seed)
    spec_hash = hashlib.sha256(spec.model_dump_json(exclude={"resources"}).encode()).hexdigest()[:16]
    done = _completed_result(run.output_dir, spec_hash) if run.resume else None
    if done is not None:  # e.g. a worker retrying a job that finished before it was recorded
        sink.log("this output directory already holds the completed run of this spec; not training again")
        sink.emit("completed", step=done["step"], final_path="final", metrics=done["metrics"])
        return done
    latest = ckpt.latest_checkpoint(run.output_dir) if run.resume else None
    # Loading can take minutes for a large teacher: say so before the first `started` event.
    sink.emit("loading", message="loading the teacher, the student and the data")
    inputs = loading.load_inputs(spec, run.device, run.models_root, run.allow_hub, latest)
    ctx = _step_context(run, inputs)
    total = total_steps(spec, len(inputs.train), info.world_size)
    optimizer, scheduler = make_optimizer(inputs.student, spec, total, run.device)

    # 2. resume
    state = _resume(latest, optimizer, scheduler)
    checkpoints = _Checkpoints(run, inputs, optimizer, scheduler, latest, state.step)
    order = DataOrder(len(inputs.train), t.seed)
    _announce(run, inputs, total, state, latest)

    # 3. the step loop (after the untrained student's evaluation when evaluation.at_start asks)
    if spec.evaluation.at_start and state.step == 0:
        if info.is_main and inputs.validation:
            sink.emit("eval", **_eval_event(_evaluate(run, inputs, 0)))
        info.barrier()
    while state.step < total:
        t0 = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        batches = next_step_batches(order, state, inputs.train, inputs.pad_id, spec, info, run.device)
        sums, grad_norm = train_step(ctx, batches, optimizer, scheduler)
        state.step += 1
        state.trained_tokens += int(sums.tokens)
        sink(
            _step_event(spec, state, total, len(inputs.train), sums, lr, grad_norm, time.perf_counter() - t0)
        )

        # 4. between steps: evaluate, checkpoint, stop (after the last step, the end does those)
        last = state.step >= total
        if _due(spec.evaluation.every_steps, state.step) and not last:
            if info.is_main and inputs.validation:
                sink.emit("eval", **_eval_event(_evaluate(run, inputs, state.step)))
            info.barrier()
        if _due(spec.checkpointing.every_steps, state.step) and not last:
            checkpoints.save(state)
        if _stop_requested(run) and not last:
            if checkpoints.step != state.step:
                checkpoints.save(state)
            sink.emit("stopped", step=state.step, checkpoint=checkpoints.path)
            return {
                "status": "stopped",
                "step": state.step,
                "total_steps": total,
                "trained_tokens": state.trained_tokens,
                "checkpoint": checkpoints.path,
                "metrics": {},
            }

    # 5. save: the final evaluation, the final model, result.json
    metrics = _save_final(run, inputs, state.step)
    return _finish(run, state, total, metrics, spec_hash)


# ----------------------------------------------------------------------------------------------
# setup and resume


def _step_context(run: _Run, inputs: RunInputs) -> StepContext:
    """The models as a step sees them: logits (or, fused, hidden states) at response positions."""
    fused = run.spec.loss.fused
    student = wrap(ResponseLogits(inputs.student, hidden_only=fused), run.info, run.device)
    teacher = (
        ResponseLogits(inputs.teacher, hidden_only=fused) if inputs.teacher is not None else inputs.cache
    )
    return StepContext(student, teacher, run.spec, inputs.vocab, run.info, run.device)


def _completed_result(output_dir: Path, spec_hash: str) -> dict[str, Any] | None:
    path = output_dir / "result.json"
    if not path.is_file() or not (output_dir / "final").is_dir():
        return None
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return result if result.get("spec_sha256") == spec_hash and result.get("status") == "completed" else None


def _resume(latest: Path | None, optimizer: torch.optim.Optimizer, scheduler: Any) -> ckpt.TrainState:
    """The training state of checkpoint ``latest`` (optimizer, schedule and random state restored
    in place), or a fresh state."""
    if latest is None:
        return ckpt.TrainState()
    blob = ckpt.load_trainer_state(latest)
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    ckpt.set_rng_state(blob["rng"])
    return blob["train_state"]


def _announce(run: _Run, inputs: RunInputs, total: int, state: ckpt.TrainState, latest: Path | None) -> None:
    info, device = run.info, run.device
    run.sink.emit(
        "started",
        total_steps=total,
        resumed_from_step=state.step,
        num_train_examples=len(inputs.train),
        device=str(device) if not info.enabled else f"{device.type} x{info.world_size}",
    )
    if latest is not None:
        run.sink.log(f"resumed from {latest.relative_to(run.output_dir)}")
    if not inputs.validation:
        run.sink.log("no validation data (data.validation): evaluation is skipped", "warning")
    for note in inputs.notes:
        run.sink.log(note, "warning")


# ----------------------------------------------------------------------------------------------
# during the loop


def _step_event(
    spec: JobSpec,
    state: ckpt.TrainState,
    total: int,
    num_train: int,
    sums: StepSums,
    lr: float,
    grad_norm: float,
    seconds: float,
) -> Event:
    n = max(sums.tokens, 1.0)
    r = spec.loss.kd_ratio
    return step_event(
        step=state.step,
        total_steps=total,
        epoch=state.epoch + state.index / num_train,
        loss=((1 - r) * sums.ce + r * sums.kd) / n,
        ce=sums.ce / n,
        kd=sums.kd / n,
        lr=lr,
        grad_norm=grad_norm,
        tokens=int(sums.tokens),
        trained_tokens=state.trained_tokens,
        tokens_per_s=sums.seq_tokens / max(seconds, 1e-9),
        stats={k: v / n for k, v in sums.stats.items()} if sums.tokens > 0 else {},
    )


def _due(every_steps: int | None, step: int) -> bool:
    """Whether a periodic action (every ``every_steps`` steps; 0 or None: never) falls on ``step``."""
    if not every_steps:
        return False
    return step % every_steps == 0


def _stop_requested(run: _Run) -> bool:
    """Whether the caller asked to stop; every rank stops at the same step."""
    stop = bool(run.should_stop()) if run.should_stop is not None else False
    return run.info.all_reduce([float(stop)], run.device)[0] > 0


class _Checkpoints:
    """Writes checkpoints (rank 0 alone) and remembers the newest one: its path and step."""

    def __init__(self, run: _Run, inputs: RunInputs, optimizer, scheduler, latest: Path | None, step: int):
        self.run, self.inputs, self.optimizer, self.scheduler = run, inputs, optimizer, scheduler
        self.path: str | None = str(latest.relative_to(run.output_dir)) if latest is not None else None
        self.step = step if latest is not None else -1

    def save(self, state: ckpt.TrainState) -> None:
        run, path = self.run, None
        if run.info.is_main:
            path = ckpt.save_checkpoint(
                run.output_dir,
                state,
                model=self.inputs.student,
                tokenizer=self.inputs.tokenizer,
                optimizer=self.optimizer,
                scheduler=self.scheduler,
                keep=run.spec.checkpointing.keep,
            )
            run.sink.emit("checkpoint", step=state.step, path=str(path))
        run.info.barrier()
        self.path = str(path) if path is not None else ckpt.CHECKPOINTS + "/" + ckpt.step_dir_name(state.step)
        self.step = state.step


def _evaluate(run: _Run, inputs: RunInputs, step: int) -> dict[str, Any]:
    t = run.spec.training
    inputs.student.eval()
    try:
        metrics = evaluation.evaluate_model(
            inputs.student,
            inputs.tokenizer,
            inputs.validation,
            run.spec.evaluation,
            teacher=inputs.teacher,
            vocab_size=inputs.vocab,
            max_length=t.max_length,
            max_prompt_length=t.max_prompt_length,
            device=run.device,
            # a teacher cache holds the teacher's line, scored when it was built
            cache_dir=run.output_dir if inputs.cache is None else inputs.cache.path,
        )
        if inputs.cache is not None:
            tokenized = [
                data.tokenize_example(ex, inputs.tokenizer, t.max_length, t.max_prompt_length)
                for ex in inputs.validation
            ]
            metrics["val_kl"] = inputs.cache.val_kl(
                inputs.student, tokenized, inputs.pad_id, run.spec.evaluation.batch_size, run.device
            )
    finally:
        inputs.student.train()
    return {"step": step, **metrics}


def _eval_event(metrics: dict[str, Any]) -> dict[str, Any]:
    """The contract's `eval` fields, in order (the full metrics go to result.json)."""
    return {"step": metrics["step"], **{k: metrics.get(k) for k in EVAL_KEYS}}


# ----------------------------------------------------------------------------------------------
# the end of the run


def _save_final(run: _Run, inputs: RunInputs, step: int) -> dict[str, Any]:
    """Rank 0: the final evaluation (its metrics are returned) and ``final/``, written atomically."""
    metrics: dict[str, Any] = {}
    if run.info.is_main:
        if inputs.validation:
            metrics = _evaluate(run, inputs, step)
            run.sink.emit("eval", **_eval_event(metrics))
            metrics.pop("step", None)
        final = run.output_dir / "final"
        tmp = run.output_dir / ".tmp-final"
        shutil.rmtree(tmp, ignore_errors=True)
        inputs.student.save_pretrained(tmp, safe_serialization=True)
        inputs.tokenizer.save_pretrained(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    run.info.barrier()
    return metrics


def _finish(
    run: _Run, state: ckpt.TrainState, total: int, metrics: dict[str, Any], spec_hash: str
) -> dict[str, Any]:
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
    if run.info.is_main:
        path = run.output_dir / "result.json"
        path.write_text(json.dumps(json_safe(result), indent=2), encoding="utf-8")
        run.sink.emit("completed", step=state.step, final_path="final", metrics=metrics)
    return result
