"""Building a teacher cache: ``build_cache(spec, out_dir) -> result``.

  1. tokenise the data exactly as training does (``data.tokenize_examples``), so example i of
     the cache is example i of the trainer's training set (and validation example i is
     ``evaluate_model``'s example i: nothing dropped there);
  2. per shard of ``build.shard_examples`` examples: teacher forward in batches, logits at the
     response positions only, top-k + tail (``teacher_cache.topk_rows``), one atomic write;
     a shard already on disk with this spec's fingerprint is kept, so a build killed with
     SIGKILL resumes at the first missing shard;
  3. the teacher's Rouge-L on validation (``evaluation.teacher_rouge``, the line jobs show);
  4. ``manifest.json``, atomically, last.

Events (``OUT_DIR/events.jsonl`` and ``on_event``; dicts, ``type`` first):
```
{"type": "loading", "message": str}
{"type": "started", "total_shards": int, "resumed_shards": int, "num_examples": int,
 "total_tokens": int, "top_k": int, "vocab_size": int, "device": str}
{"type": "shard", "split": "train"|"validation", "index": int, "examples": int, "tokens": int,
 "bytes": int, "done_shards": int, "total_shards": int, "done_tokens": int, "progress": f (0..1),
 "tokens_per_s": f}
{"type": "teacher_eval", "rouge_l": f, "rouge_l_std": f, "rouge_l_greedy": f, "num_examples": int}
{"type": "log", "level": str, "message": str}
{"type": "completed", "tokens": int, "examples": int, "bytes": int, "bytes_per_token": f, "manifest": "manifest.json"}
{"type": "stopped", "done_shards": int, "total_shards": int}
{"type": "error", "code": str, "message": str}
```
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from akl_core.cache_data import response_tokens, shard_plan, tokenized_splits
from akl_core.cache_spec import (
    CACHE_FORMAT,
    LOGPROB_DTYPE,
    MANIFEST,
    CacheManifest,
    CacheSpec,
    ShardInfo,
    file_sha256,
)
from akl_core.contract import validate_cache_event
from akl_core.events import DistillError, Event, EventSink, classify_error
from akl_core.teacher_cache import (
    NP_DTYPES,
    TEACHER_DIR,
    id_dtype_for,
    shard_metadata,
    shard_name,
    tokenizer_sha256,
    topk_rows,
    weights_sha256,
    write_shard,
)

HEAD_ROWS = 256  # logits rows per lm_head chunk: (256, V) fp32 is 50 MB at V = 49152


def build_cache(
    spec: CacheSpec,
    out_dir: Path,
    *,
    on_event: Callable[[Event], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    resume: bool = True,
    models_root: Path | None = None,
    allow_hub: bool | None = None,
) -> dict[str, Any]:
    """Build (or finish building) the cache of ``spec`` in ``out_dir``.

    Returns ``{"status": "completed", "manifest": dict}`` or ``{"status": "stopped",
    "done_shards", "total_shards"}``. On failure emits an `error` event and raises DistillError.
    ``resume=False`` deletes what ``out_dir`` holds of an earlier build first.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        _clear(out_dir)
    sink = EventSink(out_dir / "events.jsonl", on_event, check=validate_cache_event)
    try:
        return _build(spec, out_dir, sink, should_stop, models_root, allow_hub)
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt):
            raise
        code, message = classify_error(exc)
        sink.emit("error", code=code, message=message)
        raise DistillError(code, message) from exc
    finally:
        sink.close()


def _clear(out_dir: Path) -> None:
    for path in out_dir.iterdir():
        if path.name == ".runner.lock":  # held by the runner that called us
            continue
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def _build(spec, out_dir, sink, should_stop, models_root, allow_hub) -> dict[str, Any]:
    fingerprint = spec.fingerprint()
    done = _existing_manifest(out_dir, fingerprint)
    if done is not None:  # a worker retrying a build that finished before it was recorded
        sink.log("this directory already holds the complete cache of this spec; not building again")
        sink.emit("completed", **_summary(done))
        return {"status": "completed", "manifest": done}
    for stale in out_dir.glob(".tmp-*"):  # a write cut short by SIGKILL
        shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    sink.emit("loading", message="loading the teacher and the data")
    t = _Teacher.load(spec, models_root, allow_hub)
    if spec.top_k > t.vocab:
        raise DistillError(
            "invalid_spec", f"top_k={spec.top_k} exceeds the teacher's vocabulary of {t.vocab} tokens"
        )
    _save_teacher_dir(t, out_dir / TEACHER_DIR)
    splits, infos = tokenized_splits(spec, t.tokenizer)
    plan = shard_plan(spec, splits)
    kept = [p for p in plan if _shard_done(out_dir, p, fingerprint)]
    total_tokens = sum(p["tokens"] for p in plan)
    sink.emit(
        "started",
        total_shards=len(plan),
        resumed_shards=len(kept),
        num_examples=sum(len(rows) for rows in splits.values()),
        total_tokens=total_tokens,
        top_k=spec.top_k,
        vocab_size=t.vocab,
        device=str(t.device),
    )
    done_shards = len(kept)
    done_tokens = sum(p["tokens"] for p in kept)
    id_dtype = id_dtype_for(t.vocab)
    for p in plan:
        if p in kept:
            continue
        t0 = time.perf_counter()
        rows = _shard_rows(t, splits[p["split"]][p["first"] : p["first"] + p["examples"]], spec, should_stop)
        if rows is None:
            sink.emit("stopped", done_shards=done_shards, total_shards=len(plan))
            return {"status": "stopped", "done_shards": done_shards, "total_shards": len(plan)}
        ids, logprobs, tail, offsets = rows
        meta = {
            "format": CACHE_FORMAT,
            "fingerprint": fingerprint,
            "split": p["split"],
            "first_example": str(p["first"]),
            "examples": str(p["examples"]),
            "tokens": str(p["tokens"]),
        }
        path = out_dir / shard_name(p["split"], p["index"])
        write_shard(
            path,
            ids.astype(NP_DTYPES[id_dtype]),
            logprobs.astype(np.float16),
            tail.astype(np.float32),
            offsets,
            meta,
        )
        done_shards += 1
        done_tokens += p["tokens"]
        sink.emit(
            "shard",
            split=p["split"],
            index=p["index"],
            examples=p["examples"],
            tokens=p["tokens"],
            bytes=path.stat().st_size,
            done_shards=done_shards,
            total_shards=len(plan),
            done_tokens=done_tokens,
            progress=done_tokens / max(total_tokens, 1),
            tokens_per_s=p["tokens"] / max(time.perf_counter() - t0, 1e-9),
        )
    teacher_eval = _teacher_eval(spec, t, out_dir, sink)
    manifest = _write_manifest(spec, out_dir, plan, infos, t, id_dtype, teacher_eval)
    sink.emit("completed", **_summary(manifest))
    return {"status": "completed", "manifest": manifest}


def _existing_manifest(out_dir: Path, fingerprint: str) -> dict[str, Any] | None:
    path = out_dir / MANIFEST
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("spec_fingerprint") != fingerprint:
        raise DistillError(
            "invalid_spec",
            f"{out_dir} already holds a cache of another spec; build into another directory "
            "(or rebuild from scratch with --no-resume)",
        )
    return manifest


def _summary(manifest: dict[str, Any]) -> dict[str, Any]:
    keys = ("tokens", "examples", "bytes", "bytes_per_token")
    return {**{k: manifest[k] for k in keys}, "manifest": MANIFEST}


# -- the teacher --------------------------------------------------------------------------------


class _Teacher:
    """The loaded teacher: model, tokenizer, device, output vocabulary, weights digest."""

    def __init__(self, ref, path, model, tokenizer, device, dtype_name):
        self.ref, self.path, self.model, self.tokenizer = ref, path, model, tokenizer
        self.device, self.dtype_name = device, dtype_name
        self.vocab = int(model.get_output_embeddings().weight.shape[0])
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    @classmethod
    def load(cls, spec: CacheSpec, models_root, allow_hub) -> _Teacher:
        from akl_core import models
        from akl_core.loading import teacher_dtype

        device = _device(spec.build.device)
        path = models.resolve_model_ref(spec.teacher, models_root=models_root, allow_hub=allow_hub)
        tokenizer = models.load_tokenizer(path)
        dtype = teacher_dtype(spec.build.teacher_dtype, device)
        model = models.load_teacher(path, dtype=dtype, device=device)
        return cls(spec.teacher, path, model, tokenizer, device, str(dtype).removeprefix("torch."))

    @torch.no_grad()
    def response_rows(self, batch: dict[str, torch.Tensor], k: int):
        """(ids, log-probs, tail) over the batch's response positions, in the trainer's row order."""
        from akl_core.steps import ResponseLogits

        hidden, _ = ResponseLogits(self.model, hidden_only=True)(
            batch["input_ids"], batch["attention_mask"], batch["labels"]
        )  # (N, H)
        head = self.model.get_output_embeddings()
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        out = []
        for i in range(0, hidden.shape[0], HEAD_ROWS):
            logits = head(hidden[i : i + HEAD_ROWS])  # (n, V), the model's own head (bias too)
            if cap is not None:
                logits = torch.tanh(logits / cap) * cap
            out.append(topk_rows(logits, k))
        if not out:
            return (torch.zeros(0, k, dtype=torch.long), torch.zeros(0, k), torch.zeros(0))
        return tuple(torch.cat(parts).cpu() for parts in zip(*out, strict=True))


def _device(pref: str) -> torch.device:
    if pref == "cuda" and not torch.cuda.is_available():
        raise DistillError("no_gpu", "build.device is 'cuda' but this machine has no usable CUDA device")
    use_cuda = pref == "cuda" or (pref == "auto" and torch.cuda.is_available())
    return torch.device("cuda") if use_cuda else torch.device("cpu")


def _save_teacher_dir(t: _Teacher, target: Path) -> None:
    """The teacher's tokenizer and config (no weights): what a job trains with, without the teacher."""
    tmp = target.with_name(f".tmp-{target.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    t.tokenizer.save_pretrained(tmp)
    t.model.config.save_pretrained(tmp)
    if getattr(t.model, "generation_config", None) is not None:
        t.model.generation_config.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)


def _shard_done(out_dir: Path, p: dict[str, Any], fingerprint: str) -> bool:
    path = out_dir / shard_name(p["split"], p["index"])
    if not path.is_file():
        return False
    meta = shard_metadata(path)
    if meta is None:
        return False
    if meta.get("fingerprint") != fingerprint:
        raise DistillError(
            "invalid_spec",
            f"{out_dir} holds part of a cache of another spec ({path.name}); build into another "
            "directory (or rebuild from scratch with --no-resume)",
        )
    want = {"split": p["split"], "first_example": str(p["first"]), "examples": str(p["examples"])}
    return all(meta.get(k) == v for k, v in want.items()) and meta.get("tokens") == str(p["tokens"])


def _shard_rows(t: _Teacher, rows: list, spec: CacheSpec, should_stop) -> tuple | None:
    """(ids, log-probs, tail, offsets) of one shard's examples as numpy; None when stopped."""
    from akl_core.batches import collate

    ids, logprobs, tails = [], [], []
    counts = [response_tokens(r) for r in rows]
    for i in range(0, len(rows), spec.build.batch_size):
        if should_stop is not None and should_stop():
            return None
        part = [r for r in rows[i : i + spec.build.batch_size] if response_tokens(r)]
        if not part:
            continue
        batch = {k: v.to(t.device) for k, v in collate(part, t.pad_id).items()}
        a, b, c = t.response_rows(batch, spec.top_k)
        ids.append(a.numpy())
        logprobs.append(b.numpy())
        tails.append(c.numpy())
    k = spec.top_k
    ids_np = np.concatenate(ids) if ids else np.zeros((0, k), np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    assert len(ids_np) == offsets[-1], "teacher rows and response tokens disagree"
    lp = np.concatenate(logprobs) if logprobs else np.zeros((0, k), np.float32)
    tail = np.concatenate(tails) if tails else np.zeros((0,), np.float32)
    return ids_np, lp, tail, offsets


# -- evaluation and the manifest ----------------------------------------------------------------


def _teacher_eval(spec: CacheSpec, t: _Teacher, out_dir: Path, sink: EventSink) -> dict[str, Any] | None:
    """The teacher's Rouge-L on validation with ``spec.evaluation``; its key tells jobs whether
    their own evaluation settings would give the same line (evaluation._teacher_key)."""
    from akl_core import data, evaluation

    ev = spec.evaluation
    if not spec.data.validation or ev.num_examples == 0 or not ev.teacher_reference:
        return None
    examples = data.read_examples(spec.data.validation, spec.data.format)
    chosen = range(min(ev.num_examples, len(examples)))
    prompts = [data.encode_prompt(examples[i], t.tokenizer, spec.data.max_prompt_length) for i in chosen]
    refs = [data.prompt_and_references(examples[i], t.tokenizer)[1] for i in chosen]
    sink.log(f"scoring the teacher on {len(prompts)} validation prompts x {len(ev.seeds)} seeds")
    metrics = evaluation.teacher_rouge(t.model, t.tokenizer, prompts, refs, ev, t.device, out_dir)
    assert metrics is not None  # None only without a teacher model
    line = {
        "rouge_l": metrics["rouge_l"],
        "rouge_l_std": metrics["rouge_l_std"],
        "rouge_l_greedy": metrics.get("rouge_l_greedy"),
        "num_examples": len(prompts),
    }
    sink.emit("teacher_eval", **line)
    return {**line, "key": evaluation._teacher_key(ev, prompts), "metrics": metrics}


def _write_manifest(spec, out_dir, plan, infos, t: _Teacher, id_dtype, teacher_eval) -> dict[str, Any]:
    shards = []
    for p in plan:
        path = out_dir / shard_name(p["split"], p["index"])
        shards.append(
            ShardInfo(
                file=path.name,
                split=p["split"],
                first_example=p["first"],
                examples=p["examples"],
                tokens=p["tokens"],
                bytes=path.stat().st_size,
                sha256=file_sha256(path),
            )
        )
    size = sum(s.bytes for s in shards)
    tokens = sum(s.tokens for s in shards)
    manifest = CacheManifest(
        spec=spec,
        spec_fingerprint=spec.fingerprint(),
        teacher=t.ref,
        teacher_weights_sha256=weights_sha256(t.path),
        teacher_dtype=t.dtype_name,
        tokenizer_sha256=tokenizer_sha256(t.tokenizer),
        vocab_size=t.vocab,
        max_length=spec.data.max_length,
        max_prompt_length=spec.data.max_prompt_length,
        top_k=spec.top_k,
        id_dtype=id_dtype,
        logprob_dtype=LOGPROB_DTYPE,
        splits=infos,
        shards=shards,
        tokens=tokens,
        examples=sum(i.examples for i in infos.values()),
        bytes=size,
        bytes_per_token=size / max(tokens, 1),
        teacher_eval=teacher_eval,
        created_at=time.time(),
    ).model_dump(mode="json")
    tmp = out_dir / f".tmp-{MANIFEST}"
    tmp.write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    os.replace(tmp, out_dir / MANIFEST)
    return manifest
