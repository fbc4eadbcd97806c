"""The model catalog behind ``/v1/models`` and the preflight checks: what a model is, read from its
``config.json`` and tokenizer files without torch (the API never imports it).

Three sources: the presets (prepared under the models root or not), the other model directories
under the models root, and the tenant's distilled models (``ft:`` ids, api/core/distilled.py).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from akl_core import models

MAX_CONFIG_BYTES = 1024 * 1024  # a model's config.json is a few KB; more is not a model config
# Where configs of common architectures keep their decoder layer count.
LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
# Files that define a tokenizer's vocabulary (whichever of them a model directory has).
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer.model", "vocab.txt")
# Config classes whose tie_word_embeddings defaults to False (transformers' own defaults).
UNTIED_BY_DEFAULT = frozenset({"llama", "mistral", "mixtral", "qwen2"})
MAX_SCAN_DEPTH = 2  # models root entries: NAME or ORG/NAME


class ConfigError(ValueError):
    """A model directory whose config.json is missing or unreadable; the message says which."""


@dataclass
class ModelFacts:
    """What the catalog tells of one model; ``None`` where a field cannot be known here."""

    id: str
    source: str  # preset, local or distilled
    created: int = 0
    prepared: bool = True
    architecture: str | None = None
    num_layers: int | None = None
    vocab_size: int | None = None
    parameters: int | None = None
    tokenizer_digest: str | None = None
    roles: list[str] = field(default_factory=lambda: ["teacher", "student"])
    path: Path | None = None  # never shown to a client


def read_config(folder: Path) -> dict[str, Any]:
    """The parsed config.json of a model directory; ConfigError says what is wrong."""
    config = folder / "config.json"
    if not config.is_file():
        raise ConfigError("has no config.json: not a model directory")
    try:
        if config.stat().st_size > MAX_CONFIG_BYTES:
            raise ValueError("larger than 1 MiB")
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise ConfigError(f"config.json is unreadable ({type(exc).__name__})") from None
    if not isinstance(data, dict):
        raise ConfigError("config.json is not a JSON object")
    return data


def _text_scopes(config: dict[str, Any]) -> list[dict[str, Any]]:
    """The config, then its text model's (multimodal configs nest it in text_config)."""
    nested = config.get("text_config")
    return [config, nested] if isinstance(nested, dict) else [config]


def _positive_int(scopes: list[dict[str, Any]], *keys: str) -> int | None:
    for scope in scopes:
        for key in keys:
            value = scope.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def num_layers(config: dict[str, Any]) -> int | None:
    """Decoder layers of a config; None if unknown."""
    return _positive_int(_text_scopes(config), *LAYER_KEYS)


def vocab_size(config: dict[str, Any]) -> int | None:
    """Vocabulary size of a config; None if unknown."""
    return _positive_int(_text_scopes(config), "vocab_size", "n_vocab")


def estimate_parameters(config: dict[str, Any]) -> int | None:
    """Parameters of a Llama-shaped decoder (Llama, Mistral, Qwen2, SmolLM, ...) from its config:
    embeddings, per layer q/k/v/o projections, a gated MLP (gate, up, down) and two RMSNorms, a
    final norm, and an lm_head unless tied. Biases where the config turns them on. None for other
    shapes. Equal to ``sum(p.numel())`` of the built model for these architectures (a test checks
    it against torch for the tiny preset)."""
    scopes = _text_scopes(config)
    text = scopes[-1]
    vocab, hidden = _positive_int(scopes, "vocab_size"), _positive_int(scopes, "hidden_size")
    inter, layers = _positive_int(scopes, "intermediate_size"), num_layers(config)
    heads = _positive_int(scopes, "num_attention_heads")
    if None in (vocab, hidden, inter, layers, heads):
        return None
    assert vocab and hidden and inter and layers and heads  # for the type checker
    kv_heads = _positive_int(scopes, "num_key_value_heads") or heads
    head_dim = _positive_int(scopes, "head_dim") or hidden // heads
    q, kv = heads * head_dim, kv_heads * head_dim
    attention = hidden * q + 2 * hidden * kv + q * hidden
    if text.get("attention_bias"):
        attention += q + 2 * kv + hidden  # Llama's flag biases all four projections
    elif text.get("model_type") == "qwen2":
        attention += q + 2 * kv  # Qwen2 always biases q, k and v (and has no flag)
    mlp = 3 * hidden * inter + (2 * inter + hidden if text.get("mlp_bias") else 0)
    per_layer = attention + mlp + 2 * hidden
    untied_by_default = text.get("model_type") in UNTIED_BY_DEFAULT
    tied = config.get("tie_word_embeddings", text.get("tie_word_embeddings", not untied_by_default))
    return vocab * hidden + layers * per_layer + hidden + (0 if tied else vocab * hidden)


def architecture(config: dict[str, Any]) -> str | None:
    names = config.get("architectures")
    if isinstance(names, list) and names and isinstance(names[0], str):
        return names[0]
    model_type = config.get("model_type")
    return model_type if isinstance(model_type, str) else None


def tokenizer_digest(folder: Path) -> str | None:
    """A short sha256 of the files that define the vocabulary; equal files, equal digests."""
    found = [folder / name for name in TOKENIZER_FILES if (folder / name).is_file()]
    if not found:
        return None
    stats = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in found)
    return _digest(stats)


@lru_cache(maxsize=256)
def _digest(stats: tuple[tuple[str, int, int], ...]) -> str:
    """Cached by (path, size, mtime): a tokenizer.json may be tens of MB."""
    sha = hashlib.sha256()
    for path, _size, _mtime in stats:
        sha.update(Path(path).name.encode() + b"\0")
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                sha.update(chunk)
    return sha.hexdigest()[:16]


def describe(folder: Path, model_id: str, source: str) -> ModelFacts:
    """The facts of a model directory (raises ConfigError when it is not one)."""
    config = read_config(folder)
    digest = tokenizer_digest(folder)
    arch = architecture(config)
    # A teacher tokenizes the data, so it needs a tokenizer; a student is a causal LM.
    roles = [role for role, ok in (("teacher", digest is not None), ("student", True)) if ok]
    return ModelFacts(
        id=model_id,
        source=source,
        created=int((folder / "config.json").stat().st_mtime),
        architecture=arch,
        num_layers=num_layers(config),
        vocab_size=vocab_size(config),
        parameters=estimate_parameters(config),
        tokenizer_digest=digest,
        roles=roles,
        path=folder,
    )


def preset(name: str, models_root: Path) -> ModelFacts:
    """A preset: read from its directory once prepared, else what is known before it is built."""
    folder = models_root / name
    if (folder / "config.json").is_file():
        try:
            return describe(folder, f"preset:{name}", "preset")
        except ConfigError:
            pass
    return ModelFacts(
        id=f"preset:{name}",
        source="preset",
        prepared=False,
        architecture="LlamaForCausalLM",
        num_layers=models.PRESET_LAYERS[name],
    )


def local_models(models_root: Path) -> list[ModelFacts]:
    """Model directories under the models root (NAME or ORG/NAME), presets and hidden folders
    aside; a folder without a readable config.json is not listed."""
    root = models_root.resolve()
    found: list[ModelFacts] = []

    def scan(folder: Path, depth: int) -> None:
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            return
        for entry in entries:
            if entry.name.startswith(".") or not entry.is_dir(follow_symlinks=False):
                continue
            path = Path(entry.path)
            ref = path.relative_to(root).as_posix()
            if depth == 1 and entry.name in models.PRESETS:
                continue
            if (path / "config.json").is_file():
                try:
                    found.append(describe(path, ref, "local"))
                except ConfigError:
                    pass
            elif depth < MAX_SCAN_DEPTH:
                scan(path, depth + 1)

    scan(root, 1)
    return found
