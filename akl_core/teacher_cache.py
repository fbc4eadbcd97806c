"""The teacher cache format: top-k ids, their log-probs and the tail's log-mass per response token.

A cache directory (built by ``akl_core/cache_builder.py``):
```
CACHE/manifest.json                  written last: a directory with it is a complete cache
CACHE/teacher/                       the teacher's tokenizer and config.json (no weights)
CACHE/train-00000.safetensors ...    shards of ``shard_examples`` examples each
CACHE/validation-00000.safetensors   the same for data.validation, if given
CACHE/teacher_eval.json              the teacher's Rouge-L on validation (evaluation.teacher_rouge)
```
Each shard holds, for its R response tokens (the positions the trainer learns, in example order
and, within an example, position order - the row order of trainer.ResponseLogits):
```
topk_ids       (R, k)  uint16 (vocab <= 65536) or int32   the teacher's k most likely tokens
topk_logprobs  (R, k)  float16                            their log-probabilities at T = 1
tail_logmass   (R,)    float32                            log(1 - their total probability)
offsets        (E+1,)  int64                              example e owns rows offsets[e]:offsets[e+1]
```
safetensors: no pickle, memory-mapped. A shard whose size or sha256 differs from the manifest
raises DistillError('invalid_cache') when the cache is opened: never a silently wrong loss.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from akl_core.cache_spec import MANIFEST, UINT16_VOCAB, CacheManifest, ShardInfo, file_sha256, read_manifest
from akl_core.events import DistillError

TEACHER_DIR = "teacher"
TENSORS = ("topk_ids", "topk_logprobs", "tail_logmass", "offsets")
NP_DTYPES = {"uint16": np.uint16, "int32": np.int32, "float16": np.float16, "float32": np.float32}


def id_dtype_for(vocab_size: int) -> str:
    return "uint16" if vocab_size <= UINT16_VOCAB else "int32"


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.safetensors"


# -- digests ------------------------------------------------------------------------------------


def tokenizer_sha256(tokenizer: Any) -> str:
    """Digest of what tokenisation depends on: the vocabulary (added tokens included), every
    special token and the chat template."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    special = {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())}
    template = getattr(tokenizer, "chat_template", None)
    blob = json.dumps([vocab, special, template], ensure_ascii=False, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()


def weights_sha256(model_dir: Path) -> str:
    """Digest of a model directory's weight files (``*.safetensors``, by name)."""
    digest = hashlib.sha256()
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise DistillError("model_not_found", f"{model_dir} holds no .safetensors weights")
    for f in files:
        digest.update(f"{f.name}\0{file_sha256(f)}\n".encode())
    return digest.hexdigest()


# -- from logits to rows ------------------------------------------------------------------------


def topk_rows(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids (N, k) int64, log-probs (N, k) float32, tail log-mass (N,) float32) of logits (N, V).

    The tail is logsumexp of the log-probs outside the top-k, not log(1 - sum p): it stays
    accurate when the top-k holds almost all the mass (and is -inf when k = V).
    """
    logp = torch.log_softmax(logits.float(), dim=-1)  # (N, V)
    top, ids = logp.topk(k, dim=-1, sorted=True)  # (N, k)
    tail = torch.logsumexp(logp.scatter(-1, ids, float("-inf")), dim=-1)  # (N,)
    return ids, top, tail


def reconstruct(logprobs: torch.Tensor, tail: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The stored (k + 1)-outcome distribution, renormalised in float32.

    Rounding the top-k log-probs to float16 leaves their total off 1 by up to ~1e-3 of it;
    renormalising is the closest distribution in KL to the rounded values, and keeps every
    divergence's terms a proper distribution (bench/cache.py measures what is left).
    """
    full = torch.cat([logprobs.float(), tail.float().unsqueeze(-1)], dim=-1)  # (N, k+1)
    log_z = torch.logsumexp(full, dim=-1, keepdim=True)
    return logprobs.float() - log_z, tail.float() - log_z.squeeze(-1)


# -- writing ------------------------------------------------------------------------------------


def write_shard(
    path: Path,
    ids: np.ndarray,
    logprobs: np.ndarray,
    tail: np.ndarray,
    offsets: np.ndarray,
    metadata: dict[str, str],
) -> None:
    """Write one shard atomically: a temporary file in the same directory, fsync, rename."""
    from safetensors.numpy import save_file

    assert ids.shape == logprobs.shape and tail.shape == ids.shape[:1] and offsets[-1] == len(ids)
    tensors = {"topk_ids": ids, "topk_logprobs": logprobs, "tail_logmass": tail, "offsets": offsets}
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, tmp, metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide the shard from another user's worker
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def shard_metadata(path: Path) -> dict[str, str] | None:
    """A shard file's metadata, or None when it cannot be read as a safetensors file."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            return dict(f.metadata() or {})
    except Exception:  # noqa: BLE001 - any unreadable file is "not a shard"
        return None


# -- reading ------------------------------------------------------------------------------------


@dataclass
class CacheRows:
    """The teacher side of a batch: rows in the trainer's response-token order."""

    topk_ids: torch.Tensor  # (N, k) int64
    topk_logprobs: torch.Tensor  # (N, k) float32, renormalised with the tail
    tail_logmass: torch.Tensor  # (N,) float32

    def to(self, device: torch.device | str) -> CacheRows:
        return CacheRows(*(t.to(device) for t in (self.topk_ids, self.topk_logprobs, self.tail_logmass)))


class _Shard:
    """One open shard: memory-mapped arrays (numpy views of the file, nothing copied)."""

    def __init__(self, path: Path, info: ShardInfo, manifest: CacheManifest):
        from safetensors import safe_open

        def bad(reason: str) -> DistillError:
            return DistillError("invalid_cache", f"teacher cache shard {path}: {reason}")

        try:
            handle = safe_open(str(path), framework="numpy")
            arrays = {name: handle.get_slice(name) for name in TENSORS}
        except Exception as exc:  # noqa: BLE001 - header or tensor missing: not our shard
            raise bad(f"unreadable ({exc})") from exc
        self.info = info
        self._slices = arrays
        shapes = {name: list(s.get_shape()) for name, s in arrays.items()}
        k, rows, n = manifest.top_k, info.tokens, info.examples
        want = {"topk_ids": [rows, k], "topk_logprobs": [rows, k], "tail_logmass": [rows], "offsets": [n + 1]}
        if shapes != want:
            raise bad(f"tensor shapes {shapes}, the manifest says {want}")
        self.offsets = np.asarray(arrays["offsets"][:], dtype=np.int64)
        if self.offsets[0] != 0 or self.offsets[-1] != rows or np.any(np.diff(self.offsets) < 0):
            raise bad("offsets are not an increasing run from 0 to the row count")

    def rows(self, local: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        a, b = int(self.offsets[local]), int(self.offsets[local + 1])
        return (
            self._slices["topk_ids"][a:b],
            self._slices["topk_logprobs"][a:b],
            self._slices["tail_logmass"][a:b],
        )


class TeacherCache:
    """A complete cache, opened for random access by example: ``rows("train", [7, 2, 9])``."""

    def __init__(self, cache_dir: Path, *, verify: bool = True):
        self.path = Path(cache_dir)
        try:
            self.manifest = read_manifest(self.path)
        except ValueError as exc:
            raise DistillError("invalid_cache", str(exc)) from exc
        if verify:
            self.verify()
        self._shards: dict[str, list[_Shard]] = {}
        self._starts: dict[str, np.ndarray] = {}
        for split in self.manifest.splits:
            shards = [_Shard(self.path / s.file, s, self.manifest) for s in self.manifest.split_shards(split)]
            self._shards[split] = shards
            self._check_split(split, shards)
        self.tokenizer_dir = self.path / TEACHER_DIR

    @property
    def top_k(self) -> int:
        return self.manifest.top_k

    @property
    def vocab_size(self) -> int:
        return self.manifest.vocab_size

    def verify(self) -> None:
        """Every shard has the manifest's size and sha256 (a truncated or corrupt file fails here)."""
        for info in self.manifest.shards:
            path = self.path / info.file
            if not path.is_file():
                raise DistillError(
                    "invalid_cache", f"teacher cache {self.path}: shard {info.file} is missing"
                )
            size = path.stat().st_size
            if size != info.bytes:
                raise DistillError(
                    "invalid_cache",
                    f"teacher cache shard {path} is {size} bytes, the manifest says {info.bytes} (truncated?)",
                )
            if file_sha256(path) != info.sha256:
                raise DistillError(
                    "invalid_cache", f"teacher cache shard {path}: sha256 differs from the manifest (corrupt)"
                )

    def _check_split(self, split: str, shards: list[_Shard]) -> None:
        expected = 0
        for shard in shards:
            if shard.info.first_example != expected:
                raise DistillError("invalid_cache", f"teacher cache {self.path}: {split} shards leave a gap")
            expected += shard.info.examples
        if expected != self.manifest.splits[split].examples:
            raise DistillError(
                "invalid_cache",
                f"teacher cache {self.path}: {split} shards hold {expected} examples, "
                f"the manifest says {self.manifest.splits[split].examples}",
            )
        self._starts[split] = np.array([s.info.first_example for s in shards], dtype=np.int64)

    def num_examples(self, split: str = "train") -> int:
        return self.manifest.splits[split].examples

    def example_tokens(self, split: str = "train") -> np.ndarray:
        """(E,) response tokens stored per example."""
        return np.concatenate([np.diff(s.offsets) for s in self._shards[split]])

    def _locate(self, split: str, index: int) -> tuple[_Shard, int]:
        if not 0 <= index < self.num_examples(split):
            raise IndexError(
                f"example {index} is outside the cache's {self.num_examples(split)} {split} examples"
            )
        j = int(np.searchsorted(self._starts[split], index, side="right")) - 1
        shard = self._shards[split][j]
        return shard, index - shard.info.first_example

    def raw_rows(self, split: str, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Example ``index``'s stored arrays as they are on disk (ids, log-probs, tail)."""
        shard, local = self._locate(split, index)
        return shard.rows(local)

    def rows(self, split: str, indices: list[int]) -> CacheRows:
        """The rows of ``indices``'s examples, concatenated in that order (the trainer's order)."""
        parts = [self.raw_rows(split, i) for i in indices]
        k = self.top_k
        ids = np.concatenate([p[0] for p in parts]) if parts else np.zeros((0, k), np.int64)
        lp = np.concatenate([p[1] for p in parts]) if parts else np.zeros((0, k), np.float16)
        tail = np.concatenate([p[2] for p in parts]) if parts else np.zeros((0,), np.float32)
        ids_t = torch.from_numpy(ids.astype(np.int64))
        if ids_t.numel() and int(ids_t.max()) >= self.vocab_size:
            raise DistillError(
                "invalid_cache", f"teacher cache {self.path}: a token id is outside the vocabulary"
            )
        logprobs, tail_t = reconstruct(torch.from_numpy(lp.astype(np.float32)), torch.from_numpy(tail))
        return CacheRows(ids_t, logprobs, tail_t)


def open_cache(cache_dir: Path, *, verify: bool = True) -> TeacherCache:
    """Open a complete cache; DistillError('invalid_cache') when it is missing, corrupt or truncated."""
    if not (Path(cache_dir) / MANIFEST).is_file():
        raise DistillError("invalid_cache", f"{cache_dir} is not a complete teacher cache (no {MANIFEST})")
    return TeacherCache(cache_dir, verify=verify)
