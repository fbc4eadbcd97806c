"""Build the bundled Jargon dataset: define a hacker term, answered with the Jargon File's own words.

An instruction task with human-written references (the AKL paper's setting: instruction following
scored by Rouge-L against human responses). Each example is a chat pair: the user asks about a term
in one of several phrasings, the assistant answers with the entry's definition. Only the
assistant's tokens are learned; the prompt goes through the model's chat template, as a user's
would.

How entries become examples:
- The definition is the entry's FIRST sense: the text of "1." when the entry is numbered, else its
  first paragraph. An etymology in brackets before it ("[from Greek akme ...]") is dropped, as are
  figures and code listings (the file indents those by one space, not three).
- A part-of-speech tag opening a sense ("1. vt. To fudge ...") is dropped, and so are sentences
  that only point elsewhere ("See magic.", "Compare SED, LER.").
- Cross-reference braces are removed ("{crash}" -> "crash") and typographic quotes made ASCII.
- The definition is cut after whole sentences at about MAX_WORDS words; a first sentence longer than
  that is kept whole (up to HARD_MAX_WORDS, else the entry is dropped).
- Pure cross-references carry no definition to learn and are dropped: a first sense that is only a
  pointer ("= {foo}", "See {foo}.", "Syn. {foo}", "Var. of {foo}", ...) or shorter than MIN_WORDS
  words. The counts are printed and written to LICENSE.md's build note.
- Terms are split into train / validation / test by a seeded shuffle of the case-folded term, so
  variants of one term never straddle two splits.

Source: the Debian package jargon-text (The Jargon File 4.4.7, public domain). Usage:

    cd /tmp && apt-get download jargon-text && dpkg -x jargon-text_*.deb jargon
    python scripts/build_jargon_dataset.py --source /tmp/jargon/usr/share/doc/jargon-text/jargon.txt.gz

The output is deterministic for a given source file and seed.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

OUT_DIR = Path(__file__).resolve().parent.parent / "akl_core" / "datasets" / "jargon"
SPLITS = (("test", 150), ("validation", 150))  # train: every remaining term
MIN_WORDS, MAX_WORDS, HARD_MAX_WORDS = 6, 60, 90
# Instruction forms, picked per term by the seeded generator (the three and two more).
PROMPTS = (
    "What does the hacker term '{term}' mean?",
    "Define {term} as a programmer would.",
    "Explain '{term}' in one or two sentences.",
    "In hacker slang, what is meant by '{term}'?",
    "What is '{term}' in the Jargon File's sense?",
)
_ENTRY = re.compile(r"^   :(?P<term>[^ :].*?):(?P<rest>.*)$")
_PART_III = re.compile(r"Part\s+III\.\s+Appendices")
_SENSE = re.compile(r"^(?P<n>\d+)\.\s+(?P<text>.*)$", re.DOTALL)
_BRACKET = re.compile(r"^\[[^\]]*\]\s*")
_POINTER = re.compile(
    r"^(=|see\b|syn\b|syn\.|var\.?\b|variant of\b|abbrev\.?\s+(for|of)\b|common abbreviation (for|of)\b"
    r"|obs\.?\s*=|alt\.?\s*=|short for\b|same as\b|compare\b|from\s+\{)",
    re.IGNORECASE,
)
# "1. vt. To perform ..." - a part-of-speech tag inside a sense of a multi-part-of-speech entry.
_POS = re.compile(r"^((n|vt|vi|v|adj|adv|interj|excl|pron|prep|conj|abbrev|obs)\.,?\s+)+")
# Sentences that only point elsewhere ("See magic.", "Compare SED, LER.") teach nothing to learn.
_SEE = re.compile(r"^(see|see also|compare|cf\.)\b", re.IGNORECASE)
_QUOTES = str.maketrans({"“": '"', "”": '"', "‘": "'", "’": "'", "´": "'", "—": " - ", "·": ""})
_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"')]))\s+(?=[A-Z0-9\"'(])")


@dataclass
class Entry:
    term: str
    definition: str


def lexicon_lines(text: str) -> list[str]:
    """The lines of Part II (the lexicon), from the first entry to the start of Part III."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if _ENTRY.match(line))
    end = next(i for i, line in enumerate(lines) if i > start and _PART_III.search(line))
    return lines[start:end]


def raw_entries(lines: list[str]) -> list[tuple[str, list[str]]]:
    """(term, body paragraphs) per entry; one-space-indented blocks (figures, code) are dropped."""
    entries: list[tuple[str, list[str]]] = []
    current: list[str] = []
    for line in [*lines, ""]:
        match = _ENTRY.match(line)
        if match:
            entries.append((match.group("term").strip(), []))
            continue
        if not entries:
            continue
        if line.startswith("   ") and line.strip():
            current.append(line.strip())
            continue
        if current:
            entries[-1][1].append(" ".join(current))
            current = []
    return entries


def first_sense(paragraphs: list[str]) -> str:
    """Sense 1 of a numbered entry, else the first paragraph, without a leading [etymology]."""
    texts = []
    for para in paragraphs:
        match = _SENSE.match(para)
        if match:
            if match.group("n") == "1":
                texts = [match.group("text")]
                break
            continue
        texts.append(para)
    for text in texts:
        stripped = _POS.sub("", _BRACKET.sub("", text).strip()).strip()
        stripped = _BRACKET.sub("", stripped).strip()
        if stripped:
            return stripped
    return ""


def clean(text: str) -> str:
    text = re.sub(r"\{([^{}]*)\}", r"\1", text).translate(_QUOTES)
    return re.sub(r"\s+", " ", text).strip()


def trim(text: str) -> str | None:
    """Whole sentences up to MAX_WORDS words; None when even the first is too long."""
    kept: list[str] = []
    count = 0
    for sentence in _SENTENCE_END.split(text):
        if _SEE.match(sentence):
            continue
        words = len(sentence.split())
        if kept and count + words > MAX_WORDS:
            break
        kept.append(sentence)
        count += words
    if count > HARD_MAX_WORDS:
        return None
    return " ".join(kept)


def entries_from(text: str, stats: Counter) -> list[Entry]:
    out = []
    for term, paragraphs in raw_entries(lexicon_lines(text)):
        stats["entries"] += 1
        sense = first_sense(paragraphs)
        if not sense or _POINTER.match(sense) or len(clean(sense).split()) < MIN_WORDS:
            stats["dropped: pure cross-reference or too short"] += 1
            continue
        if any(_SENSE.match(p) for p in paragraphs):
            stats["multi-sense: first sense kept"] += 1
        definition = trim(clean(sense))
        if definition is not None and len(definition.split()) < MIN_WORDS:
            stats["dropped: pure cross-reference or too short"] += 1
            continue
        if definition is None:
            stats["dropped: first sentence over the hard limit"] += 1
            continue
        out.append(Entry(clean(term), definition))
    return out


def split_terms(entries: list[Entry], seed: int) -> dict[str, list[Entry]]:
    by_key: dict[str, list[Entry]] = {}
    for entry in entries:
        by_key.setdefault(entry.term.casefold(), []).append(entry)
    keys = sorted(by_key)
    random.Random(seed).shuffle(keys)
    splits: dict[str, list[Entry]] = {}
    start = 0
    for name, size in SPLITS:
        splits[name] = [e for key in keys[start : start + size] for e in by_key[key]]
        start += size
    splits["train"] = [e for key in keys[start:] for e in by_key[key]]
    return splits


def example(entry: Entry, rng: random.Random) -> dict:
    prompt = rng.choice(PROMPTS).format(term=entry.term)
    return {
        "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": entry.definition}],
        "term": entry.term,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", type=Path, required=True, help="jargon.txt or jargon.txt.gz")
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    raw = args.source.read_bytes()
    text = (gzip.decompress(raw) if args.source.suffix == ".gz" else raw).decode("utf-8")
    stats: Counter = Counter()
    splits = split_terms(entries_from(text, stats), args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, items in splits.items():
        rng = random.Random(f"{args.seed}:{name}")
        with open(args.out / f"{name}.jsonl", "w", encoding="utf-8") as fh:
            for entry in items:
                fh.write(json.dumps(example(entry, rng), ensure_ascii=False) + "\n")
        stats[f"split {name}"] = len(items)
    for key in sorted(stats):
        print(f"{key}: {stats[key]}")


if __name__ == "__main__":
    main()
