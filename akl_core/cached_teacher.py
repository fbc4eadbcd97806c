"""A job whose teacher is a cache (``teacher: cache:NAME``): it never loads the teacher for the loss.

Loading checks the job against the cache's manifest before the first step (any mismatch is a
DistillError ``invalid_cache`` naming the field): the shards' sizes and sha256, the tokenizer
(the cache's own, stored in ``CACHE/teacher/``), the training data's sha256 and format, the
length settings, and each training example's count of response tokens. Then a step reads its
examples' top-k rows by example index (``CachedTeacher``), so the seeded, resumable data order
of ``batches.DataOrder`` is unchanged, and the sparse divergences (``akl_core/sparse.py``,
``akl_core/sparse_fused.py``) take the place of the dense ones.

The student: ``truncate`` reads the kept layers of the teacher named in the manifest, tensor by
tensor from its safetensors files (the full teacher is never in memory), after checking the
weights' digest; ``config`` needs only the config stored in the cache; ``pretrained`` must share
the cache's vocabulary. Evaluation: the teacher's Rouge-L line comes from the cache (when the
job's evaluation settings match those of the build), and val_kl is KL(teacher || student) on the
k + 1 coarse-grained outcomes of the cached validation split (at most the dense KL).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from akl_core import data, models, students
from akl_core.batches import Batch, Row, collate
from akl_core.cache_spec import file_sha256, job_mismatches, resolve_cache_ref
from akl_core.events import DistillError
from akl_core.loading import RunInputs, load_data, prepare_for_training
from akl_core.spec import JobSpec
from akl_core.teacher_cache import (
    CacheRows,
    TeacherCache,
    open_cache,
    tokenizer_sha256,
    weights_sha256,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel


class CachedTeacher:
    """The teacher side of a step, read from a cache: ``(batch) -> CacheRows`` on the batch's
    device, rows in the order of the student's response positions."""

    def __init__(self, cache: TeacherCache, vocab: int, validation_ok: bool):
        self.cache = cache
        self.vocab = vocab
        self.validation_ok = validation_ok  # the job's validation data is the cached split

    @property
    def path(self) -> Path:
        return self.cache.path

    def __call__(self, batch: Batch) -> CacheRows:
        ids = [i for i in batch["example_ids"].tolist() if i >= 0]  # -1: a fully masked filler
        return self.cache.rows("train", ids).to(batch["input_ids"].device)

    @torch.no_grad()
    def val_kl(
        self,
        student: PreTrainedModel,
        tokenized: list[Row],
        pad_id: int,
        batch_size: int,
        device: torch.device,
    ) -> float:
        """KL(teacher || student) on the k + 1 outcomes, mean over validation response tokens."""
        from akl_core.sparse import compute_sparse
        from akl_core.steps import ResponseLogits

        if not self.validation_ok:
            return float("nan")
        wrapper = ResponseLogits(student)
        kl = tokens = 0.0
        for i in range(0, len(tokenized), batch_size):
            index = list(range(i, min(i + batch_size, len(tokenized))))
            batch = {k: v.to(device) for k, v in collate([tokenized[j] for j in index], pad_id).items()}
            logits, targets = wrapper(batch["input_ids"], batch["attention_mask"], batch["labels"])
            if targets.numel() == 0:
                continue
            rows = self.cache.rows("validation", index).to(device)
            out = compute_sparse(
                "fkl", logits[:, : self.vocab], rows.topk_ids, rows.topk_logprobs, rows.tail_logmass, targets
            )
            kl += float(out.loss_sum)
            tokens += out.num_tokens
        return kl / max(tokens, 1.0)


def load_cache_inputs(
    spec: JobSpec,
    device: torch.device,
    models_root: Path | None,
    allow_hub: bool | None,
    resume_from: Path | None,
) -> RunInputs:
    """``loading.load_inputs`` for a cache: the student, the tokenizer, the data, no teacher."""
    from transformers import AutoModelForCausalLM

    try:
        cache_dir = resolve_cache_ref(spec.teacher)
    except ValueError as exc:
        raise DistillError("invalid_spec", str(exc)) from exc
    cache = open_cache(cache_dir)  # invalid_cache: missing, truncated or corrupt
    manifest = cache.manifest
    tokenizer = models.load_tokenizer(cache.tokenizer_dir)
    if tokenizer_sha256(tokenizer) != manifest.tokenizer_sha256:
        raise DistillError(
            "invalid_cache", f"teacher cache {cache_dir}: tokenizer differs from the manifest's"
        )
    _check_job(spec, cache)
    student: PreTrainedModel
    if resume_from is not None:
        student = AutoModelForCausalLM.from_pretrained(resume_from, dtype=torch.float32, use_safetensors=True)
    else:
        student = _build_student(spec, cache, tokenizer, models_root, allow_hub)
    # transformers wraps PreTrainedModel.to with functools.wraps(nn.Module.to): mypy sees an unbound call
    student = student.to(device=device, dtype=torch.float32)  # type: ignore[call-arg]
    vocab = _vocab(student, tokenizer, cache)
    train, validation = load_data(spec, tokenizer)
    _check_rows(cache, "train", train, "data.train")
    notes, validation_ok = _validation_status(spec, cache, tokenizer, validation)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prepare_for_training(student, None, spec.training.gradient_checkpointing)
    teacher = CachedTeacher(cache, vocab, validation_ok)
    return RunInputs(tokenizer, None, student, vocab, train, validation, pad_id, cache=teacher, notes=notes)


def _check_job(spec: JobSpec, cache: TeacherCache) -> None:
    from akl_core.cache_data import resolved_format

    path = data.resolve_data_path(spec.data.train)
    try:
        digest, fmt = file_sha256(path), resolved_format(spec.data.train, spec.data.format)
    except (OSError, ValueError) as exc:  # DataError is a ValueError
        raise DistillError("invalid_data", f"data.train: cannot read {spec.data.train}: {exc}") from exc
    problems = job_mismatches(spec, cache.manifest, train_sha256=digest, resolved_format=fmt)
    if problems:
        detail = "; ".join(f"{field}: {reason}" for field, reason in problems)
        raise DistillError("invalid_cache", f"the job does not match teacher cache {cache.path}: {detail}")


def _check_rows(cache: TeacherCache, split: str, rows: list[Row], field: str) -> None:
    """Each example has as many response tokens as its cached rows (example i is example i)."""
    from akl_core.cache_data import response_tokens

    stored = cache.example_tokens(split)
    if len(rows) > len(stored):
        raise DistillError(
            "invalid_cache",
            f"{field}: {len(rows)} examples but the cache holds {len(stored)} {split} examples",
        )
    ours = np.array([response_tokens(r) for r in rows], dtype=np.int64)
    bad = np.flatnonzero(ours != stored[: len(rows)])
    if bad.size:
        i = int(bad[0])
        raise DistillError(
            "invalid_cache",
            f"{field}: example {i} has {ours[i]} response tokens but the cache stores {stored[i]}: "
            "the cache was built from other data or settings",
        )


def _validation_status(
    spec: JobSpec, cache: TeacherCache, tokenizer, validation: list
) -> tuple[list[str], bool]:
    """(warnings, whether val_kl can come from the cache's validation split)."""
    if not validation:
        return [], False
    cached = cache.manifest.splits.get("validation")
    assert spec.data.validation is not None  # validation examples were read from it
    path = data.resolve_data_path(spec.data.validation)
    if cached is None or file_sha256(path) != cached.sha256:
        return [
            "val_kl needs the teacher: the cache holds no split of this validation data (val_kl is null)"
        ], False
    t = spec.training
    rows = [data.tokenize_example(ex, tokenizer, t.max_length, t.max_prompt_length) for ex in validation]
    _check_rows(cache, "validation", rows, "data.validation")
    return [], True


def _vocab(student: PreTrainedModel, tokenizer, cache: TeacherCache) -> int:
    rows = int(student.get_output_embeddings().weight.shape[0])
    if rows < cache.vocab_size or len(tokenizer) > cache.vocab_size:
        raise DistillError(
            "tokenizer_mismatch",
            f"the student has {rows} output rows and the tokenizer {len(tokenizer)} tokens; the cache's "
            f"teacher has {cache.vocab_size}",
        )
    return cache.vocab_size


# -- the student --------------------------------------------------------------------------------


def _build_student(spec: JobSpec, cache: TeacherCache, tokenizer, models_root, allow_hub) -> PreTrainedModel:
    s = spec.student
    if s.init == "config":
        return students.build_student(s, cache.tokenizer_dir, models_root, allow_hub, spec.training.seed)
    if s.init == "pretrained":
        student = students.build_student(s, cache.tokenizer_dir, models_root, allow_hub, spec.training.seed)
        assert s.model is not None  # StudentSpec validates this
        s_path = models.resolve_model_ref(s.model, models_root=models_root, allow_hub=allow_hub)
        models.check_tokenizers(tokenizer, models.load_tokenizer(s_path))
        return student
    teacher_path = _teacher_weights(cache, models_root, allow_hub)
    student = truncated_from_files(teacher_path, s.num_layers)
    student.train()
    student.requires_grad_(True)
    return student


def _teacher_weights(cache: TeacherCache, models_root, allow_hub) -> Path:
    """The directory of the cache's teacher, when it is here and still holds the same weights."""
    m = cache.manifest
    try:
        path = models.resolve_model_ref(m.teacher, models_root=models_root, allow_hub=allow_hub)
    except models.ModelError as exc:
        raise DistillError(
            "model_not_found",
            f"student.init 'truncate' reads the weights of the cache's teacher {m.teacher}, which is not "
            f"available here ({exc}); use student.init 'config' or 'pretrained'",
        ) from exc
    if weights_sha256(path) != m.teacher_weights_sha256:
        raise DistillError(
            "invalid_cache",
            f"teacher_weights_sha256: {m.teacher} ({path}) no longer holds the weights the cache was built "
            "from; student.init 'truncate' would start from another model",
        )
    return path


def truncated_from_files(teacher_path: Path, num_layers: int | None) -> PreTrainedModel:
    """``students.build_student(truncate)`` reading only the kept tensors from the teacher's
    safetensors files: the same student, without the whole teacher in memory. Falls back to
    the full load when the files' names are not the model's (a converted checkpoint format)."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    config = AutoConfig.from_pretrained(teacher_path, trust_remote_code=False)
    total = config.num_hidden_layers
    if num_layers is None or not 1 <= num_layers <= total:
        raise models.ModelError(
            "invalid_model",
            f"student.num_layers={num_layers} must be between 1 and the teacher's {total} layers",
        )
    keep = students.truncate_layer_indices(total, num_layers)
    small = config.__class__.from_dict(config.to_dict())
    small.num_hidden_layers = num_layers
    if isinstance(getattr(small, "layer_types", None), list):
        small.layer_types = [small.layer_types[i] for i in keep]
    with torch.random.fork_rng(devices=[]):  # the init is overwritten; do not move the run's RNG
        student = AutoModelForCausalLM.from_config(small, dtype=torch.float32)
    source = {key: _teacher_key(key, keep) for key in student.state_dict()}
    state: dict[str, torch.Tensor] = {}
    for file in sorted(Path(teacher_path).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            names = set(f.keys())
            for key, name in source.items():
                if name in names:
                    state[key] = f.get_tensor(name).to(torch.float32)
    tied = {"lm_head.weight"} if getattr(small, "tie_word_embeddings", False) else set()
    if set(source) - set(state) - tied:
        return students.build_student(_truncate_spec(num_layers), teacher_path)
    student.load_state_dict(state, strict=False)
    if tied:
        student.tie_weights()
    if (Path(teacher_path) / "generation_config.json").is_file():
        student.generation_config = GenerationConfig.from_pretrained(teacher_path)
    return student


def _teacher_key(key: str, keep: list[int]) -> str:
    match = students._LAYER_KEY.match(key)
    if match is None:
        return key
    return f"{match.group(1)}{keep[int(match.group(2))]}{match.group(3)}"


def _truncate_spec(num_layers: int) -> Any:
    from akl_core.spec import StudentSpec

    return StudentSpec(init="truncate", num_layers=num_layers)
