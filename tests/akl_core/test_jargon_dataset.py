"""The bundled Jargon dataset (akl_core/datasets/jargon) and the script that builds it."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from collections import Counter
from pathlib import Path

import pytest

from akl_core import data
from akl_core.data import DataError

ROOT = Path(__file__).resolve().parents[2]
JARGON_DIR = data.DATASETS_DIR / "jargon"


def load_builder():
    spec = importlib.util.spec_from_file_location(
        "build_jargon", ROOT / "scripts" / "build_jargon_dataset.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def rows(split: str) -> list[dict]:
    return [json.loads(line) for line in (JARGON_DIR / f"{split}.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    ("split", "low", "high"), [("train", 1600, 2100), ("validation", 140, 160), ("test", 140, 160)]
)
def test_jargon_splits_are_chat_pairs(split: str, low: int, high: int) -> None:
    examples = data.read_examples(f"jargon:{split}")
    assert low <= len(examples) <= high
    for ex in examples:
        assert ex.is_chat and [m["role"] for m in ex.messages] == ["user", "assistant"]
        answer = ex.messages[1]["content"]
        assert 6 <= len(answer.split()) <= 90
        assert not re.search(r"\{\w[^{}]*\}", answer), answer  # cross-reference braces removed


def test_jargon_splits_are_disjoint_by_term() -> None:
    terms = {s: {r["term"].casefold() for r in rows(s)} for s in data.DEMO_SPLITS}
    assert not terms["train"] & terms["test"]
    assert not terms["train"] & terms["validation"]
    assert not terms["validation"] & terms["test"]


def test_jargon_prompts_vary_and_name_the_term() -> None:
    builder = load_builder()
    forms = Counter()
    for row in rows("train"):
        prompt = row["messages"][0]["content"]
        matches = [i for i, p in enumerate(builder.PROMPTS) if prompt == p.format(term=row["term"])]
        assert len(matches) == 1, prompt
        forms[matches[0]] += 1
    assert len(forms) == len(builder.PROMPTS) and min(forms.values()) > 200


def test_jargon_bundle_has_its_licence_and_is_small() -> None:
    assert "public domain" in (JARGON_DIR / "LICENSE.md").read_text().lower()
    assert sum(p.stat().st_size for p in JARGON_DIR.iterdir()) < 2_000_000


def test_unknown_jargon_split_names_the_valid_ones() -> None:
    with pytest.raises(DataError, match="jargon:validation"):
        data.read_examples("jargon:dev")


# A real excerpt of the Jargon File 4.4.7 (public domain), in its on-disk layout.
EXCERPT = """\
   :abbrev: /@·breev'/, /@·brev´/, n.

   Common abbreviation for ‘abbreviation’.

   :ABEND: /a´bend/, /@·bend´/, n.

   [ABnormal END]

   1. Abnormal termination (of software); {crash}; {lossage}. Derives from
   an error message on the IBM 360; used jokingly by hackers but seriously
   mainly by {code grinder}s.

   2. [alt.callahans] Absent By Enforced Net Deprivation.

   :adger: /aj'r/, vt.

   [UCLA mutant of {nadger}, poss. also from the middle name of an infamous
   {tenured graduate student}] To make a bonehead move with consequences
   that could have been foreseen with even slight mental effort. Compare
   {dumbass attack}.

   :ADVENT: /ad'vent/, n.

   The prototypical computer adventure game, first designed by Will Crowther
   on the {PDP-10} in the mid-1970s.

   Figure 1. Screen shot of the original ADVENT game

 Orange River Chamber
 You are in a splendid chamber thirty feet high.

   :fudge: vt.,n.

   1. vt. To perform in an incomplete but marginally acceptable way,
   particularly with respect to the writing of a program.

   2. n. The code resulting from fudging.

   :xyzzy: /xiz'ee/, adj.

   See {plugh}.

                             Part III. Appendices
"""


def test_builder_takes_first_sense_and_drops_pointers() -> None:
    builder = load_builder()
    stats: Counter = Counter()
    entries = {e.term: e.definition for e in builder.entries_from(EXCERPT, stats)}
    # Pure cross-references carry no definition.
    assert "abbrev" not in entries and "xyzzy" not in entries
    assert stats["dropped: pure cross-reference or too short"] == 2
    # Multi-sense: sense 1 only, braces removed, the [etymology] dropped.
    assert entries["ABEND"].startswith("Abnormal termination (of software); crash; lossage.")
    assert "Net Deprivation" not in entries["ABEND"]
    assert entries["adger"].startswith("To make a bonehead move") and "Compare" not in entries["adger"]
    # Figures (one-space indent) are not part of the definition; the part-of-speech tag goes.
    assert "Orange River" not in entries["ADVENT"] and "PDP-10" in entries["ADVENT"]
    assert entries["fudge"].startswith("To perform in an incomplete")


def test_builder_split_is_deterministic_and_by_term() -> None:
    builder = load_builder()
    entries = [builder.Entry(f"term{i}", "a definition long enough to keep") for i in range(400)]
    entries += [builder.Entry("Term7", "a case variant of term7 that must follow it")]
    first = builder.split_terms(entries, seed=0)
    second = builder.split_terms(list(reversed(entries)), seed=0)
    assert {k: sorted(e.term for e in v) for k, v in first.items()} == {
        k: sorted(e.term for e in v) for k, v in second.items()
    }
    where = {e.term: split for split, items in first.items() for e in items}
    assert where["term7"] == where["Term7"]
    assert len(first["test"]) >= 150 and len(first["validation"]) >= 150
