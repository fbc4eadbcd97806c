"""Teacher caches: the build spec, the manifest, and the checks of a job against a manifest.

No torch import here: the API validates cache specs, reads manifests (``bytes_per_token``) and
checks a job against its cache without loading torch. The format itself (shards, reading,
building) lives in ``akl_core/teacher_cache.py``.

A job distils from a cache when its ``teacher`` is ``cache:<path under the caches root>``
(``AKL_CACHES_ROOT``, default ``{AKL_DATA_ROOT}/caches``); ``..`` and absolute paths are refused
as for model references.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from akl_core.spec import MODEL_REF_PATTERN, EvaluationSpec, JobSpec, check_model_ref

CACHE_PREFIX = "cache:"
CACHE_FORMAT: Final = "akl-teacher-cache/1"
MANIFEST = "manifest.json"
DEFAULT_TOP_K = 64
MAX_TOP_K = 1024
# Token ids fit uint16 up to this vocabulary size; larger vocabularies store int32.
UINT16_VOCAB = 65_536
# Log-probabilities are stored as float16: on the range top-k log-probs live in ([-30, 0]) its
# 10-bit mantissa is 8x finer than bfloat16's 7 bits, and no value comes near its 65504 limit
# (bench/cache.py measures the KL of both against the exact distribution).
LOGPROB_DTYPE = "float16"


def default_caches_root() -> Path:
    """AKL_CACHES_ROOT, else AKL_DATA_ROOT/caches, else ./.akl/caches."""
    if os.environ.get("AKL_CACHES_ROOT"):
        return Path(os.environ["AKL_CACHES_ROOT"])
    return Path(os.environ.get("AKL_DATA_ROOT") or ".akl") / "caches"


def is_cache_ref(ref: str) -> bool:
    return ref.startswith(CACHE_PREFIX)


def resolve_cache_ref(ref: str, caches_root: Path | None = None) -> Path:
    """``cache:NAME`` -> caches_root/NAME, refusing '..', absolute paths and escaping symlinks.

    Raises ValueError (the caller turns it into ``invalid_spec``); existence is not checked here.
    """
    if not is_cache_ref(ref):
        raise ValueError(f"'{ref}' is not a cache reference (cache:NAME)")
    name = ref[len(CACHE_PREFIX) :]
    root = Path(caches_root) if caches_root is not None else default_caches_root()
    if not name or name.startswith(("/", "\\")) or Path(name).is_absolute() or ".." in Path(name).parts:
        raise ValueError(
            f"teacher '{ref}': '..' and absolute paths are not allowed; name a cache under {root}"
        )
    path = (root / name).resolve()
    real_root = root.resolve()
    if path == real_root or not path.is_relative_to(real_root):
        raise ValueError(
            f"teacher '{ref}' resolves to {path}, not a cache inside the caches root {real_root}"
        )
    return path


# -- the build spec -----------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CacheDataSpec(_Strict):
    """The data the teacher runs over, tokenised exactly as training does (``akl_core.data``)."""

    train: str = Field(..., min_length=1, max_length=512)
    validation: str | None = Field(None, min_length=1, max_length=512)
    format: Literal["auto", "dolly", "prompt_response", "messages"] = "auto"
    max_length: int = Field(256, ge=8, le=32768)
    max_prompt_length: int = Field(128, ge=1, le=32768)

    @model_validator(mode="after")
    def _lengths(self) -> CacheDataSpec:
        if self.max_prompt_length >= self.max_length:
            raise ValueError("data.max_prompt_length must be smaller than data.max_length")
        return self


class CacheBuildSpec(_Strict):
    """How the build runs; none of it changes the cache's content beyond float rounding."""

    batch_size: int = Field(8, ge=1, le=1024, description="examples per teacher forward")
    shard_examples: int = Field(256, ge=1, le=1_000_000, description="examples per shard file")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    teacher_dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "fp32", description="the teacher's weights during the build; fp32 stores the exact distribution"
    )


class CacheSpec(_Strict):
    """A teacher cache: the teacher's top-k distribution over every response token of the data."""

    teacher: str = Field(..., max_length=512, pattern=MODEL_REF_PATTERN)
    data: CacheDataSpec
    top_k: int = Field(DEFAULT_TOP_K, ge=1, le=MAX_TOP_K, description="stored teacher tokens per position")
    evaluation: EvaluationSpec = Field(
        default_factory=EvaluationSpec,
        description="the teacher's Rouge-L on data.validation, stored with the cache "
        "(num_examples 0 skips it); a job whose evaluation settings match reuses it",
    )
    build: CacheBuildSpec = Field(default_factory=CacheBuildSpec)

    @field_validator("teacher")
    @classmethod
    def _no_traversal(cls, v: str) -> str:
        return check_model_ref(v, "teacher")

    def fingerprint(self) -> str:
        """What fixes the cache's content (not the batch size, shard size or device)."""
        blob = self.model_dump_json(
            exclude={"build": {"batch_size", "device"}, "evaluation": {"every_steps", "at_start"}}
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_cache_spec(raw: dict[str, Any]) -> CacheSpec:
    return CacheSpec.model_validate(raw)


# -- the manifest -------------------------------------------------------------------------------


class ShardInfo(BaseModel):
    file: str
    split: Literal["train", "validation"]
    first_example: int
    examples: int
    tokens: int
    bytes: int
    sha256: str


class SplitInfo(BaseModel):
    data: str  # the data reference as given
    sha256: str  # of the data file's bytes
    format: str  # as given in the spec ("auto" allowed)
    resolved_format: str  # what the file is (auto resolved)
    source_examples: int  # examples in the file
    examples: int  # after tokenisation (examples with no learned token are dropped, as in training)
    tokens: int  # response tokens (rows of the cache)


class CacheManifest(BaseModel):
    """``manifest.json``: written last, so a directory with a manifest is a complete cache."""

    format: Literal["akl-teacher-cache/1"] = CACHE_FORMAT
    spec: CacheSpec
    spec_fingerprint: str
    teacher: str
    teacher_weights_sha256: str
    teacher_dtype: str
    tokenizer_sha256: str
    vocab_size: int
    max_length: int
    max_prompt_length: int
    top_k: int
    id_dtype: Literal["uint16", "int32"]
    logprob_dtype: Literal["float16", "bfloat16"]
    tail_dtype: Literal["float32"] = "float32"
    splits: dict[str, SplitInfo]
    shards: list[ShardInfo]
    tokens: int  # train + validation rows
    examples: int
    bytes: int  # shard bytes
    bytes_per_token: float
    teacher_eval: dict[str, Any] | None = None  # the teacher's Rouge-L line on validation, or None
    created_at: float

    def split_shards(self, split: str) -> list[ShardInfo]:
        return [s for s in self.shards if s.split == split]


def read_manifest(cache_dir: Path) -> CacheManifest:
    """The manifest of a complete cache; ValueError naming the problem otherwise."""
    path = Path(cache_dir) / MANIFEST
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{cache_dir} is not a complete teacher cache (no {MANIFEST})") from None
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: unreadable manifest: {exc}") from exc
    try:
        return CacheManifest.model_validate(raw)
    except ValidationError as exc:
        raise ValueError(f"{path}: invalid manifest: {exc}") from exc


# -- a job against its cache --------------------------------------------------------------------


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def job_mismatches(
    job: JobSpec,
    manifest: CacheManifest,
    *,
    train_sha256: str,
    resolved_format: str | None = None,
) -> list[tuple[str, str]]:
    """(job field, reason) for each way ``job`` cannot train from ``manifest``'s cache.

    ``train_sha256`` is the digest of the job's training file (the caller resolves file ids /
    paths). Checked: the training data, its format and the length settings. Other validation
    data only costs the cached val_kl (the trainer says so). The tokenizer is the cache's own (see teacher_cache); a
    pretrained student's is compared with it when the student is loaded.
    """
    out: list[tuple[str, str]] = []
    train = manifest.splits["train"]
    if train_sha256 != train.sha256:
        out.append(
            (
                "data.train",
                f"the training data (sha256 {train_sha256[:12]}) is not the data the cache was "
                f"built on ({train.data}, sha256 {train.sha256[:12]})",
            )
        )
    if resolved_format is not None and resolved_format != train.resolved_format:
        out.append(
            ("data.format", f"'{resolved_format}' but the cache was built as '{train.resolved_format}'")
        )
    for field in ("max_length", "max_prompt_length"):
        ours, theirs = getattr(job.training, field), getattr(manifest, field)
        if ours != theirs:
            out.append((f"training.{field}", f"{ours} but the cache was built with {theirs}"))
    return out
