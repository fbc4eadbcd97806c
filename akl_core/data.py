"""JSONL training data: reading and validating files, tokenization with labels.

The formats of one line (dolly, prompt_response, messages) are in formats.py; the padded
tensors of a batch in batches.py. Chat examples go through the tokenizer's chat template and
only assistant tokens are learned.

No torch or transformers import at module level: the API validates uploads with this module.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import BinaryIO

from akl_core.formats import DataError, Example, LineParser

IGNORE_INDEX = -100
DATASETS_DIR = Path(__file__).resolve().parent / "datasets"
# Built-in datasets, named "NAME:SPLIT" in specs (see each folder's LICENSE.md):
#   demo   - continue a Jane Austen passage (scripts/build_demo_dataset.py);
#   jargon - define a hacker term in the Jargon File's words, chat format (scripts/build_jargon_dataset.py).
BUILTIN_DATASETS = ("demo", "jargon")
DEMO_SPLITS = ("train", "validation", "test")
BUILTIN_REFS = tuple(f"{name}:{split}" for name in BUILTIN_DATASETS for split in DEMO_SPLITS)
DEMO_DIR = DATASETS_DIR / "demo"

# Used only when a tokenizer has no chat template of its own.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


# -- reading and validation ---------------------------------------------------------------------


def resolve_data_path(path: str | Path) -> Path:
    """'demo:SPLIT' / 'jargon:SPLIT' -> the packaged file; anything else -> Path(path)."""
    text = str(path)
    name = text.split(":", 1)[0]
    if ":" in text and name in BUILTIN_DATASETS:
        if text not in BUILTIN_REFS:
            refs = ", ".join(r for r in BUILTIN_REFS if r.startswith(name + ":"))
            raise DataError(f"{text}: unknown {name} split; use one of {refs}")
        return DATASETS_DIR / name / f"{text.split(':', 1)[1]}.jsonl"
    return Path(path)


def read_examples(path: str | Path, format: str = "auto", limit: int | None = None) -> list[Example]:
    """Parse a JSONL file (or a built-in split such as 'demo:train' or 'jargon:test') into examples."""
    file = resolve_data_path(path)
    try:
        data = file.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc}") from exc
    return parse_jsonl(data, name=str(path), format=format, limit=limit)


def validate_jsonl_bytes(
    data: bytes, max_line_bytes: int = 1_000_000, format: str = "auto", name: str = "upload"
) -> int:
    """Check an uploaded JSONL file without tokenizing it; returns the number of examples."""
    return len(parse_jsonl(data, name=name, format=format, max_line_bytes=max_line_bytes))


def validate_jsonl_stream(
    source: BinaryIO,
    sink: BinaryIO | None = None,
    *,
    max_line_bytes: int = 1_000_000,
    format: str = "auto",
    name: str = "upload",
) -> tuple[int, int]:
    """Check a JSONL stream line by line and copy it to ``sink``, in memory bounded by one line
    (``parse_jsonl`` keeps every example). Returns (examples, bytes); raises DataError."""
    lines = LineParser(name, format, max_line_bytes)
    count = size = 0
    for number in itertools.count(1):
        raw = source.readline(max_line_bytes + 1)  # a longer line is refused before it is whole
        if not raw:
            break
        size += len(raw)
        if sink is not None:
            sink.write(raw)
        body = raw[:-1] if raw.endswith(b"\n") else raw
        if len(body) > max_line_bytes:
            where = f"{name}, line {number}"
            raise DataError(f"{where}: line is longer than the limit of {max_line_bytes} bytes")
        count += lines.parse(body, number) is not None
    if not count:
        raise DataError(f"{name}: no examples (the file is empty)")
    return count, size


def parse_jsonl(
    data: bytes,
    name: str = "data",
    format: str = "auto",
    limit: int | None = None,
    max_line_bytes: int | None = None,
) -> list[Example]:
    """Parse JSONL bytes; every error names ``name``, the 1-based line and the field."""
    lines = LineParser(name, format, max_line_bytes)
    examples: list[Example] = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if limit is not None and len(examples) >= limit:
            break
        example = lines.parse(raw, number)
        if example is not None:
            examples.append(example)
    if not examples:
        raise DataError(f"{name}: no examples (the file is empty)")
    return examples


# -- tokenization -------------------------------------------------------------------------------


def render_chat(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    """The tokenizer's chat template as text (a plain fallback template if it has none)."""
    template = None if getattr(tokenizer, "chat_template", None) else FALLBACK_CHAT_TEMPLATE
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt, chat_template=template
    )


def _keep_prompt_end(ids: list[int], max_prompt_length: int, bos_id: int | None) -> list[int]:
    """The last max_prompt_length tokens, keeping a leading BOS if the tokenizer added one."""
    if len(ids) <= max_prompt_length:
        return ids
    if bos_id is not None and ids[0] == bos_id and max_prompt_length > 1:
        return [bos_id, *ids[len(ids) - max_prompt_length + 1 :]]
    return ids[len(ids) - max_prompt_length :]


def encode_prompt(ex: Example, tokenizer, max_prompt_length: int) -> list[int]:
    """Prompt token ids for generation, exactly as ``tokenize_example`` conditions the response."""
    if ex.messages is not None:  # a chat example (ex.is_chat)
        text = render_chat(tokenizer, ex.messages[:-1], add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(ex.prompt, add_special_tokens=True)["input_ids"]
    return _keep_prompt_end(ids, max_prompt_length, tokenizer.bos_token_id)


def tokenize_example(ex: Example, tokenizer, max_length: int, max_prompt_length: int) -> dict[str, list[int]]:
    """input_ids and labels (prompt and non-assistant tokens are IGNORE_INDEX).

    The prompt keeps its last max_prompt_length tokens; the whole sequence its first max_length.
    The response ends with EOS so the student learns to stop.
    """
    if ex.messages is not None:  # a chat example (ex.is_chat)
        from jinja2 import TemplateError

        try:
            ids, learn = _tokenize_chat(ex.messages, tokenizer, max_prompt_length)
        except (DataError, TemplateError) as exc:  # e.g. "Conversation roles must alternate"
            raise DataError(f"example from line {ex.line}: cannot apply the chat template: {exc}") from None
    else:
        prompt = _keep_prompt_end(
            tokenizer(ex.prompt, add_special_tokens=True)["input_ids"],
            max_prompt_length,
            tokenizer.bos_token_id,
        )
        response = tokenizer(ex.response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids, learn = prompt + response, [False] * len(prompt) + [True] * len(response)
    ids, learn = ids[:max_length], learn[:max_length]
    return {
        "input_ids": ids,
        "labels": [t if keep else IGNORE_INDEX for t, keep in zip(ids, learn, strict=True)],
    }


def _assistant_char_spans(tokenizer, messages: list[dict[str, str]], full: str) -> list[tuple[int, int]]:
    """Character spans of each assistant turn in ``full``, from renders of message prefixes."""
    spans = []
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        before = render_chat(tokenizer, messages[:i], add_generation_prompt=True)
        through = render_chat(tokenizer, messages[: i + 1])
        if not (full.startswith(before) and full.startswith(through)):
            raise DataError("the template does not render message prefixes as prefixes of the whole chat")
        spans.append((len(before), len(through)))
    return spans


def _tokenize_chat(
    messages: list[dict[str, str]], tokenizer, max_prompt_length: int
) -> tuple[list[int], list[bool]]:
    full = render_chat(tokenizer, messages)
    spans = _assistant_char_spans(tokenizer, messages, full)
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        ids, ends = enc["input_ids"], [e for _, e in enc["offset_mapping"]]

        def first_token(char: int) -> int:  # the first token that ends after `char`
            return next((i for i, e in enumerate(ends) if e > char), len(ids))

    else:  # slow tokenizers have no offsets: count the tokens of the rendered prefix

        def first_token(char: int) -> int:
            return len(tokenizer(full[:char], add_special_tokens=False)["input_ids"])

        ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    learn = [False] * len(ids)
    for start, end in spans:
        a, b = first_token(start), first_token(end)
        learn[a:b] = [True] * (b - a)
    last = first_token(spans[-1][0])  # where the final reply starts
    eos = tokenizer.eos_token_id
    if eos is not None and eos not in ids[last:]:  # templates whose turn end is not EOS
        ids, learn = [*ids, eos], [*learn, True]
    # The prompt of the final reply keeps its end (like prompt/response examples).
    cut = max(0, last - max_prompt_length)
    return ids[cut:], learn[cut:]


def tokenize_examples(
    examples: list[Example], tokenizer, max_length: int, max_prompt_length: int
) -> list[dict[str, list[int]]]:
    """Tokenize all examples; drops the ones left with no learned token."""
    out = [tokenize_example(ex, tokenizer, max_length, max_prompt_length) for ex in examples]
    return [item for item in out if any(label != IGNORE_INDEX for label in item["labels"])]


def prompt_and_references(ex: Example, tokenizer=None) -> tuple[str, list[str]]:
    """(prompt text for generation, reference responses). Chat examples need the tokenizer:
    the prompt is the chat without its last reply, rendered with the generation prompt.

    To get token ids identical to training, prefer ``encode_prompt`` (it handles BOS).
    """
    if ex.messages is not None:  # a chat example (ex.is_chat)
        if tokenizer is None:
            raise ValueError("prompt_and_references: chat examples need the tokenizer (its chat template)")
        return render_chat(tokenizer, ex.messages[:-1], add_generation_prompt=True), [
            ex.messages[-1]["content"]
        ]
    assert ex.prompt is not None and ex.response is not None, "a prompt/response example has both"
    return ex.prompt, [ex.response]
