"""The job spec (akl_core/spec.py) bounds every integer where it is parsed (issue 10, section 1):
an unbounded one let `evaluation.seeds: [2**64]` through to fail the job after training."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from pydantic import ValidationError

from akl_core.spec import MAX_OVERRIDE, JobSpec, load_spec

BASE = {"teacher": "preset:tiny", "data": {"train": "demo:train"}}


def _integers(schema: Any, where: str, defs: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every integer schema under ``schema``, with a dotted path to it."""
    if isinstance(schema, list):
        for item in schema:
            yield from _integers(item, where, defs)
    if not isinstance(schema, dict):
        return
    if "$ref" in schema:
        yield from _integers(defs[schema["$ref"].rsplit("/", 1)[1]], where, defs)
    if schema.get("type") == "integer":
        yield where, schema
    for key in ("anyOf", "oneOf", "allOf"):
        yield from _integers(schema.get(key, []), where, defs)
    if "items" in schema:
        yield from _integers(schema["items"], f"{where}[]", defs)
    for name, child in schema.get("properties", {}).items():
        yield from _integers(child, f"{where}.{name}" if where else name, defs)
    if isinstance(schema.get("additionalProperties"), dict):
        yield from _integers(schema["additionalProperties"], f"{where}.*", defs)


def test_every_integer_of_the_spec_has_both_bounds() -> None:
    schema = JobSpec.model_json_schema()
    found = dict(_integers(schema, "", schema.get("$defs", {})))
    assert "evaluation.seeds[]" in found and "training.max_steps" in found
    # config_overrides mixes types; its model validator bounds its integers (test below).
    unbounded = [
        where
        for where, item in found.items()
        if where != "student.config_overrides.*"
        and not ({"minimum", "exclusiveMinimum"} & set(item) and {"maximum", "exclusiveMaximum"} & set(item))
    ]
    assert unbounded == []


@pytest.mark.parametrize("seed", [-1, 2**32, 2**64])
def test_seeds_outside_32_bits_are_refused_naming_the_field(seed: int) -> None:
    with pytest.raises(ValidationError, match="evaluation.seeds.0"):
        load_spec({**BASE, "evaluation": {"seeds": [seed]}})
    assert load_spec({**BASE, "evaluation": {"seeds": [0, 2**32 - 1]}}).evaluation.seeds == [0, 2**32 - 1]


@pytest.mark.parametrize("value", [MAX_OVERRIDE + 1, -(2**64), 10**30])
def test_integer_config_overrides_are_bounded(value: int) -> None:
    student = {"init": "config", "num_layers": 1, "config_overrides": {"hidden_size": value}}
    with pytest.raises(ValidationError, match="config_overrides.hidden_size"):
        load_spec({**BASE, "student": student})
