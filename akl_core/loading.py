"""What a run loads before its first step: the teacher, the student, the tokenizer and the data.

A job whose teacher is a cache (``cache:NAME``) loads no teacher: ``akl_core/cached_teacher.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from akl_core import data, models, students
from akl_core.batches import Row
from akl_core.events import DistillError
from akl_core.spec import JobSpec

if TYPE_CHECKING:
    from transformers import PreTrainedModel


@dataclass
class RunInputs:
    tokenizer: Any
    teacher: PreTrainedModel | None  # frozen, eval mode; None when the teacher is a cache
    student: PreTrainedModel  # the bare model (not wrapped), train mode, float32
    vocab: int  # logit columns both models share
    train: list[Row]  # tokenized training examples
    validation: list[data.Example]  # raw validation examples (evaluation tokenizes them itself)
    pad_id: int
    cache: Any = None  # cached_teacher.CachedTeacher when the teacher is a cache
    notes: list[str] = field(default_factory=list)  # warnings for the run's log


def teacher_dtype(name: str, device: torch.device) -> torch.dtype:
    table = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return table[name]


def load_inputs(
    spec: JobSpec,
    device: torch.device,
    models_root: Path | None,
    allow_hub: bool | None,
    resume_from: Path | None,
) -> RunInputs:
    """Load everything a run needs; the student comes from ``resume_from`` (a checkpoint) when given."""
    if spec.teacher.startswith("cache:"):
        from akl_core.cached_teacher import load_cache_inputs

        return load_cache_inputs(spec, device, models_root, allow_hub, resume_from)
    t = spec.training
    teacher_path = models.resolve_model_ref(spec.teacher, models_root=models_root, allow_hub=allow_hub)
    tokenizer = models.load_tokenizer(teacher_path)
    teacher = models.load_teacher(teacher_path, dtype=teacher_dtype(t.teacher_dtype, device), device=device)
    student: PreTrainedModel
    if resume_from is not None:
        student = AutoModelForCausalLM.from_pretrained(resume_from, dtype=torch.float32, use_safetensors=True)
    else:
        student = students.build_student(spec.student, teacher_path, models_root, allow_hub, t.seed)
        if spec.student.init == "pretrained":
            assert spec.student.model is not None  # StudentSpec validates this
            s_path = models.resolve_model_ref(
                spec.student.model, models_root=models_root, allow_hub=allow_hub
            )
            models.check_tokenizers(tokenizer, models.load_tokenizer(s_path))
    # transformers wraps PreTrainedModel.to with functools.wraps(nn.Module.to): mypy sees an unbound call
    student = student.to(device=device, dtype=torch.float32)  # type: ignore[call-arg]
    vocab = models.common_vocab_size(teacher, student, tokenizer)
    train, validation = load_data(spec, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prepare_for_training(student, teacher, t.gradient_checkpointing)
    return RunInputs(tokenizer, teacher, student, vocab, train, validation, pad_id)


def load_data(spec: JobSpec, tokenizer: Any) -> tuple[list[Row], list[data.Example]]:
    """(tokenized training examples, raw validation examples) as the run uses them."""
    t = spec.training
    examples = data.read_examples(spec.data.train, spec.data.format, spec.data.max_train_examples)
    train = data.tokenize_examples(examples, tokenizer, t.max_length, t.max_prompt_length)
    validation = []
    if spec.data.validation:
        validation = data.read_examples(
            spec.data.validation, spec.data.format, spec.data.max_validation_examples
        )
    if not train:
        raise DistillError("invalid_data", "the training data has no examples")
    return train, validation


def prepare_for_training(
    student: PreTrainedModel, teacher: nn.Module | None, gradient_checkpointing: bool
) -> None:
    if gradient_checkpointing:
        if hasattr(student, "activation_checkpointing_enable"):  # transformers >= 5.x name
            student.activation_checkpointing_enable({"use_reentrant": False})
        else:
            student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    student.train()
    if teacher is not None:
        teacher.eval().requires_grad_(False)
