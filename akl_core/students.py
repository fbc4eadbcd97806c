"""Building the student: a pretrained model, the teacher truncated to k layers, or a fresh
model from the teacher's config (``student.init`` in the job spec)."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from akl_core.models import ModelError, load_causal_lm, resolve_model_ref
from akl_core.spec import FORBIDDEN_OVERRIDES

if TYPE_CHECKING:  # torch and transformers load lazily, as in models.py
    from transformers import PreTrainedModel

    from akl_core.spec import StudentSpec

_LAYER_KEY = re.compile(r"^(.*?\blayers\.)(\d+)(\..*)$")


def truncate_layer_indices(num_teacher_layers: int, num_layers: int) -> list[int]:
    """Evenly spaced layers, first and last included: round(i*(L-1)/(k-1)), halves rounded up."""
    if num_layers == 1:
        return [0]
    step = (num_teacher_layers - 1) / (num_layers - 1)
    return [math.floor(i * step + 0.5) for i in range(num_layers)]


def build_student(
    spec_student: StudentSpec,
    teacher_path: Path,
    models_root: Path | None = None,
    allow_hub: bool | None = None,
    seed: int = 0,
) -> PreTrainedModel:
    """The student, in train mode, as ``spec_student.init`` says (pretrained / truncate / config)."""
    if spec_student.init == "pretrained":
        assert spec_student.model is not None  # StudentSpec validates this
        model = load_causal_lm(resolve_model_ref(spec_student.model, models_root, allow_hub), None)
    elif spec_student.init == "truncate":
        model = _truncated_student(Path(teacher_path), spec_student.num_layers)
    elif spec_student.init == "config":
        model = _config_student(
            Path(teacher_path), spec_student.num_layers, spec_student.config_overrides, seed
        )
    else:
        raise ModelError("invalid_model", f"student.init: unknown value '{spec_student.init}'")
    model.train()
    model.requires_grad_(True)
    return model


def _truncated_student(teacher_path: Path, num_layers: int | None) -> PreTrainedModel:
    """Copy embeddings, final norm, lm_head and k evenly spaced decoder layers of the teacher."""
    from transformers import AutoModelForCausalLM

    teacher = load_causal_lm(teacher_path, None)
    total = teacher.config.num_hidden_layers
    if num_layers is None or num_layers > total:
        raise ModelError(
            "invalid_model",
            f"student.num_layers={num_layers} must be between 1 and the teacher's {total} layers",
        )
    keep = truncate_layer_indices(total, num_layers)
    config = teacher.config.__class__.from_dict(teacher.config.to_dict())
    config.num_hidden_layers = num_layers
    if isinstance(getattr(config, "layer_types", None), list):  # per-layer attention kinds
        config.layer_types = [config.layer_types[i] for i in keep]
    student = AutoModelForCausalLM.from_config(config, dtype=teacher.dtype)
    new_index = {old: new for new, old in enumerate(keep)}
    state = {}
    for key, value in teacher.state_dict().items():
        match = _LAYER_KEY.match(key)
        if match is None:
            state[key] = value
        elif int(match.group(2)) in new_index:
            state[f"{match.group(1)}{new_index[int(match.group(2))]}{match.group(3)}"] = value
    student.load_state_dict(state, strict=True)
    student.generation_config = teacher.generation_config
    return student


def _config_student(
    teacher_path: Path, num_layers: int | None, overrides: dict[str, Any], seed: int
) -> PreTrainedModel:
    """Random init from the teacher's config, with num_layers and config_overrides applied."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    base = AutoConfig.from_pretrained(teacher_path, trust_remote_code=False)
    values = base.to_dict()
    for key in overrides:
        if key in FORBIDDEN_OVERRIDES:
            raise ModelError(
                "invalid_model",
                f"student.config_overrides.{key}: cannot be changed (the student must "
                "share the teacher's vocabulary and architecture)",
            )
        if key not in values:
            raise ModelError(
                "invalid_model",
                f"student.config_overrides.{key}: unknown field of the teacher's {base.model_type} config",
            )
    if num_layers is not None:
        total = values.get("num_hidden_layers")
        if isinstance(total, int) and num_layers > total:  # a student is smaller than its teacher
            raise ModelError(
                "invalid_model",
                f"student.num_layers={num_layers} must be at most the teacher's {total} layers",
            )
        values["num_hidden_layers"] = num_layers
        values.pop("layer_types", None)
    values.update(overrides)
    if {"hidden_size", "num_attention_heads"} & overrides.keys() and "head_dim" not in overrides:
        values.pop("head_dim", None)  # recomputed from hidden_size / num_attention_heads
    try:
        config = base.__class__.from_dict(values)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    except Exception as exc:  # e.g. hidden_size not divisible by num_attention_heads
        raise ModelError(
            "invalid_model", f"student.config_overrides: cannot build the student: {exc}"
        ) from exc
