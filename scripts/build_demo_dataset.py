"""Build the bundled demo dataset: passage continuation from Jane Austen's six novels.

Each example is a prompt/response pair: the prompt asks to continue a passage of 40-80 words
(whole sentences), the response is the true continuation in the book (the next whole sentences,
20-40 words). Windows never overlap, so no text is shared between train, validation and test.

Source: the Debian package r-cran-janeaustenr (MIT; the novels are public domain). Usage:

    cd /tmp && apt-get download r-cran-janeaustenr && dpkg -x r-cran-janeaustenr_*.deb jane
    python scripts/build_demo_dataset.py --rdata-dir /tmp/jane/usr/lib/R/site-library/janeaustenr/data

Needs the `rdata` package (in the dev extras). The output is deterministic for a given seed.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import re
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path

BOOKS = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion")
PROMPT_TEMPLATE = "Continue the passage:\n\n{passage}\n\nContinuation:\n"
OUT_DIR = Path(__file__).resolve().parent.parent / "akl_core" / "datasets" / "demo"
SPLITS = (("test", 100), ("validation", 100), ("train", 2000))
PASSAGE_WORDS = (40, 80)
CONTINUATION_WORDS = (20, 40)
# Honorifics end in a period but do not end a sentence.
_ABBREV = re.compile(r"\b(Mr|Mrs|Dr|St|Messrs|Col|Capt|Lt|Gen|Sir)\.")
_SENTENCE = re.compile(r"[^.!?]+(?:[.!?]+[\"')\]]*|$)")
_HEADING = re.compile(r"^(chapter|volume|vol\.|book)\b", re.IGNORECASE)


def load_books(rdata_dir: Path) -> dict[str, list[str]]:
    """Read the novels (one string per printed line) from janeaustenr's R object store."""
    import rdata

    warnings.simplefilter("ignore")  # rdata warns that the raw stream has no RDS magic
    index = rdata.conversion.convert(
        rdata.parser.parse_data(gzip.decompress((rdata_dir / "Rdata.rdx").read_bytes()))
    )
    store = (rdata_dir / "Rdata.rdb").read_bytes()
    books = {}
    for name, (offset, length) in index["variables"].items():
        blob = store[int(offset) : int(offset) + int(length)]
        # Each object: a 4-byte big-endian length, then zlib-compressed R serialization.
        lines = rdata.conversion.convert(rdata.parser.parse_data(zlib.decompress(blob[4:])))
        books[str(name)] = [str(line) for line in lines]
    return books


def paragraphs(lines: list[str]) -> Iterator[str]:
    """Join wrapped lines into paragraphs; drop headings and markup underscores."""
    current: list[str] = []
    for line in [*lines, ""]:
        if line.strip():
            current.append(line.strip())
            continue
        if current:
            text = re.sub(r"\s+", " ", " ".join(current).replace("_", "")).strip()
            if not _HEADING.match(text):
                yield text
            current = []


def sentences(paragraph: str) -> list[str]:
    protected = _ABBREV.sub(lambda m: m.group(1) + "\x00", paragraph)
    return [s.strip().replace("\x00", ".") for s in _SENTENCE.findall(protected) if s.strip()]


def windows(paragraph: str) -> Iterator[tuple[str, str]]:
    """Non-overlapping (passage, continuation) pairs of whole sentences inside one paragraph."""
    sents = sentences(paragraph)
    counts = [len(s.split()) for s in sents]
    i = 0
    while i < len(sents):
        j, n = i, 0
        while j < len(sents) and n < PASSAGE_WORDS[0]:
            n += counts[j]
            j += 1
        if not PASSAGE_WORDS[0] <= n <= PASSAGE_WORDS[1]:
            i += 1
            continue
        k, m = j, 0
        while k < len(sents) and m < CONTINUATION_WORDS[0]:
            m += counts[k]
            k += 1
        if CONTINUATION_WORDS[0] <= m <= CONTINUATION_WORDS[1]:
            yield " ".join(sents[i:j]), " ".join(sents[j:k])
            i = k
        else:
            i += 1


def build(rdata_dir: Path, out_dir: Path, seed: int) -> dict[str, int]:
    books = load_books(rdata_dir)
    pairs = [
        {"prompt": PROMPT_TEMPLATE.format(passage=passage), "response": continuation, "source": name}
        for name in BOOKS
        for para in paragraphs(books[name])
        for passage, continuation in windows(para)
    ]
    random.Random(seed).shuffle(pairs)
    needed = sum(size for _, size in SPLITS)
    if len(pairs) < needed:
        raise SystemExit(f"only {len(pairs)} windows found, {needed} needed")
    out_dir.mkdir(parents=True, exist_ok=True)
    start, sizes = 0, {}
    for split, size in SPLITS:
        rows = pairs[start : start + size]
        start += size
        with (out_dir / f"{split}.jsonl").open("w", encoding="utf-8", newline="\n") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        sizes[split] = len(rows)
    sizes["available"] = len(pairs)
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rdata-dir", type=Path, required=True, help="janeaustenr/data directory")
    parser.add_argument("--out-dir", type=Path, default=OUT_DIR)
    parser.add_argument("--seed", type=int, default=1813)
    args = parser.parse_args()
    print(json.dumps(build(args.rdata_dir, args.out_dir, args.seed)))


if __name__ == "__main__":
    main()
