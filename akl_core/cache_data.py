"""The data side of a teacher cache build (``cache_builder``): the splits tokenised exactly as
the trainer tokenises them, their provenance (``SplitInfo``) and the plan of shards."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from akl_core.cache_spec import CacheSpec, SplitInfo, file_sha256


def resolved_format(path: str, format: str) -> str:
    """The format of a data file: ``format`` itself unless it is auto (then the first row's)."""
    from akl_core.data import resolve_data_path
    from akl_core.formats import detect_format

    if format != "auto":
        return format
    return detect_format(json.loads(_first_line(resolve_data_path(path))), str(path))


def _first_line(path: Path) -> str:
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                return line
    return "{}"


def tokenized_splits(spec: CacheSpec, tokenizer) -> tuple[dict[str, list], dict[str, SplitInfo]]:
    """Each split tokenised exactly as training (train) and evaluation (validation) see it."""
    from akl_core import data

    d = spec.data
    splits: dict[str, list] = {}
    infos: dict[str, SplitInfo] = {}
    for split, ref in (("train", d.train), ("validation", d.validation)):
        if ref is None:
            continue
        examples = data.read_examples(ref, d.format)
        if split == "train":  # as trainer._setup: examples with no learned token are dropped
            rows = data.tokenize_examples(examples, tokenizer, d.max_length, d.max_prompt_length)
        else:  # as evaluation.evaluate_model: one row per example
            rows = [
                data.tokenize_example(ex, tokenizer, d.max_length, d.max_prompt_length) for ex in examples
            ]
        splits[split] = rows
        infos[split] = SplitInfo(
            data=ref,
            sha256=file_sha256(data.resolve_data_path(ref)),
            format=d.format,
            resolved_format=resolved_format(ref, d.format),
            source_examples=len(examples),
            examples=len(rows),
            tokens=sum(response_tokens(r) for r in rows),
        )
    return splits, infos


def response_tokens(row: dict[str, list[int]]) -> int:
    """Positions the trainer learns in a tokenised example: next-token labels that are not -100."""
    return sum(label != -100 for label in row["labels"][1:])


def shard_plan(spec: CacheSpec, splits: dict[str, list]) -> list[dict[str, Any]]:
    """One entry per shard of ``build.shard_examples`` examples: split, index, rows, tokens."""
    size = spec.build.shard_examples
    plan = []
    for split, rows in splits.items():
        for index, first in enumerate(range(0, len(rows), size)):
            part = rows[first : first + size]
            tokens = sum(response_tokens(r) for r in part)
            plan.append(
                {"split": split, "index": index, "first": first, "examples": len(part), "tokens": tokens}
            )
    return plan
