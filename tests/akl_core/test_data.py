"""Data formats, validation errors, tokenization with labels, collation, the demo dataset."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from akl_core import batches, data, formats
from akl_core.data import IGNORE_INDEX, DataError, Example


def write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def learned_text(tokenizer, item: dict) -> str:
    return tokenizer.decode([t for t in item["labels"] if t != IGNORE_INDEX])


# -- formats --------------------------------------------------------------------------------------


def test_dolly_with_and_without_context(tmp_path: Path) -> None:
    f = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"instruction": "Name a color.", "context": "", "response": "Blue.", "category": "open_qa"},
            {"instruction": "Summarize.", "context": "Emma is clever.", "response": "Emma is smart."},
        ],
    )
    a, b = data.read_examples(f)
    assert a.prompt == formats.DOLLY_TEMPLATE.format(instruction="Name a color.") and a.response == "Blue."
    assert "### Input:\nEmma is clever.\n\n### Response:\n" in b.prompt
    assert b.prompt.endswith("### Response:\n") and not a.is_chat


def test_prompt_response_and_completion(tmp_path: Path) -> None:
    f = write_jsonl(
        tmp_path / "p.jsonl",
        [
            {"prompt": "Q: 2+2?\nA:", "response": " 4"},
            {"prompt": "Q: 3+3?\nA:", "completion": " 6"},
        ],
    )
    examples = data.read_examples(f, format="prompt_response")
    assert [(e.prompt, e.response) for e in examples] == [("Q: 2+2?\nA:", " 4"), ("Q: 3+3?\nA:", " 6")]


def test_messages_format(tmp_path: Path) -> None:
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
    ]
    (ex,) = data.read_examples(write_jsonl(tmp_path / "m.jsonl", [{"messages": msgs}]))
    assert ex.is_chat and ex.messages == msgs and ex.prompt is None


def test_auto_detects_per_file_and_skips_blank_lines(tmp_path: Path) -> None:
    f = tmp_path / "x.jsonl"
    f.write_text('\n{"prompt": "a", "response": "b"}\n\n{"prompt": "c", "response": "d"}\n')
    assert [e.response for e in data.read_examples(f)] == ["b", "d"]


def test_limit(tmp_path: Path) -> None:
    f = write_jsonl(tmp_path / "x.jsonl", [{"prompt": str(i), "response": "r"} for i in range(10)])
    assert [e.prompt for e in data.read_examples(f, limit=3)] == ["0", "1", "2"]


@pytest.mark.parametrize(("split", "size"), [("train", 2000), ("validation", 100), ("test", 100)])
def test_demo_splits(split: str, size: int) -> None:
    examples = data.read_examples(f"demo:{split}")
    assert len(examples) == size
    ex = examples[0]
    assert ex.prompt.startswith("Continue the passage:\n\n") and ex.prompt.endswith("\n\nContinuation:\n")
    assert 20 <= len(ex.response.split()) <= 40


def test_demo_splits_share_no_text() -> None:
    texts = {s: {e.response for e in data.read_examples(f"demo:{s}")} for s in data.DEMO_SPLITS}
    assert not texts["train"] & texts["test"] and not texts["train"] & texts["validation"]


def test_demo_bundle_is_small() -> None:
    assert sum(p.stat().st_size for p in data.DEMO_DIR.iterdir()) < 2_000_000
    assert (data.DEMO_DIR / "LICENSE.md").is_file()


def test_unknown_demo_split() -> None:
    with pytest.raises(DataError, match="demo:train"):
        data.read_examples("demo:dev")


def test_data_module_does_not_import_torch() -> None:
    code = (
        "import sys, akl_core.data; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# -- errors ---------------------------------------------------------------------------------------

GOOD = b'{"prompt": "p", "response": "r"}\n'


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (GOOD + b'{"prompt": "p", "response": "\xff\xfe"}\n', r"line 2: not valid UTF-8"),
        (GOOD + GOOD + b'{"prompt": "p", "response": }\n', r"line 3: invalid JSON"),
        (GOOD + b"[1, 2]\n", r"line 2: expected a JSON object"),
        (GOOD + b'{"prompt": "p"}\n', r"line 2: field 'response' is missing"),
        (GOOD + b'{"prompt": "p", "response": 5}\n', r"line 2: field 'response' must be a string"),
        (GOOD + b'{"prompt": ["p"], "response": "r"}\n', r"line 2: field 'prompt' must be a string"),
        (GOOD + b'{"prompt": "p", "response": "  "}\n', r"line 2: field 'response' is empty"),
        (
            GOOD + b'{"prompt": "a\\ud800b", "response": "r"}\n',
            r"line 2: field 'prompt' holds a lone UTF-16 surrogate \(\\ud800 at character 1\)",
        ),
        (
            b'{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "\\udfff"}]}\n',
            r"line 1: messages\[1\].content holds a lone UTF-16 surrogate",
        ),
        (b'{"text": "x"}\n', r"line 1: cannot detect the format"),
        (b"", r"no examples"),
        (b"\n  \n", r"no examples"),
        (
            b'{"instruction": "i", "context": 3, "response": "r"}\n',
            r"line 1: field 'context' must be a string",
        ),
        (b'{"instruction": "", "response": "r"}\n', r"line 1: field 'instruction' is empty"),
        (b'{"messages": []}\n', r"line 1: field 'messages' must be a non-empty list"),
        (b'{"messages": "hi"}\n', r"line 1: field 'messages' must be a non-empty list"),
        (b'{"messages": [{"role": "bot", "content": "x"}]}\n', r"line 1: messages\[0\].role must be one of"),
        (
            b'{"messages": [{"role": "user", "content": 1}]}\n',
            r"line 1: messages\[0\].content must be a string",
        ),
        (b'{"messages": ["hi"]}\n', r"line 1: messages\[0\] must be an object"),
        (
            b'{"messages": [{"role": "user", "content": "x"}]}\n',
            r"line 1: .*last message must have role 'assistant'",
        ),
    ],
)
def test_errors_name_file_line_and_field(tmp_path: Path, payload: bytes, match: str) -> None:
    f = tmp_path / "bad.jsonl"
    f.write_bytes(payload)
    with pytest.raises(DataError, match=match) as err:
        data.read_examples(f)
    assert str(f) in str(err.value)
    assert err.value.code == "invalid_data"
    with pytest.raises(DataError, match=match), open(f, "rb") as source:  # the upload path: the same words
        data.validate_jsonl_stream(source, name=str(f))


def test_stream_validation_copies_the_bytes_in_memory_bounded_by_a_line() -> None:
    import io
    import tracemalloc

    line = b'{"prompt": "' + b"p" * 200 + b'", "response": "r"}\n'
    payload = line * 50_000 + b"\n"  # ~11 MB
    sink = io.BytesIO()
    tracemalloc.start()
    try:
        counted = data.validate_jsonl_stream(io.BytesIO(payload), _Discard(sink), max_line_bytes=4096)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert counted == (50_000, len(payload)) and sink.getvalue() == payload[:4096]
    assert peak < 1_000_000, peak  # parse_jsonl would hold every example (> 20 MB here)
    with pytest.raises(DataError, match=r"line 3: line is longer than the limit of 100 bytes"):
        data.validate_jsonl_stream(io.BytesIO(GOOD * 2 + b"x" * 500), max_line_bytes=100)


class _Discard:
    """A sink that keeps only the first 4 KiB (the test measures the validator, not the copy)."""

    def __init__(self, kept):
        self.kept = kept

    def write(self, chunk: bytes) -> None:
        if self.kept.tell() < 4096:
            self.kept.write(chunk[: 4096 - self.kept.tell()])


def test_forced_format_rejects_other_lines(tmp_path: Path) -> None:
    f = write_jsonl(tmp_path / "x.jsonl", [{"prompt": "p", "response": "r"}, {"messages": []}])
    with pytest.raises(DataError, match="line 2"):
        data.read_examples(f)  # auto: decided by line 1 (prompt_response), line 2 lacks its fields
    with pytest.raises(DataError, match="line 1: field 'instruction' is missing"):
        data.read_examples(f, format="dolly")


def test_missing_file_and_unknown_format(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        data.read_examples(tmp_path / "none.jsonl")
    with pytest.raises(DataError, match="unknown format"):
        data.read_examples("demo:test", format="alpaca")


def test_a_surrogate_pair_is_one_character_and_accepted(tmp_path: Path) -> None:
    f = tmp_path / "emoji.jsonl"
    f.write_bytes(b'{"prompt": "smile \\ud83d\\ude00", "response": "r"}\n')
    assert data.read_examples(f)[0].prompt == "smile \U0001f600"


def test_validate_jsonl_bytes() -> None:
    assert data.validate_jsonl_bytes(GOOD * 3) == 3
    with pytest.raises(DataError, match="upload, line 2: line is 46 bytes, more than the limit of 40"):
        data.validate_jsonl_bytes(
            GOOD + b'{"prompt": "ppppppppppppppp", "response": "r"}\n', max_line_bytes=40
        )
    with pytest.raises(DataError, match="line 1: invalid JSON"):
        data.validate_jsonl_bytes(b"{")


# -- tokenization ---------------------------------------------------------------------------------


def test_prompt_response_labels_are_response_plus_eos(tiny_tokenizer) -> None:
    ex = Example(prompt="Continue the passage:\n\nEmma smiled.\n\nContinuation:\n", response="She was happy.")
    item = data.tokenize_example(ex, tiny_tokenizer, max_length=128, max_prompt_length=64)
    prompt_ids = tiny_tokenizer(ex.prompt)["input_ids"]
    assert item["input_ids"][: len(prompt_ids)] == prompt_ids
    assert item["labels"][: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
    assert learned_text(tiny_tokenizer, item) == "She was happy.</s>"
    assert item["labels"][-1] == tiny_tokenizer.eos_token_id
    assert len(item["input_ids"]) == len(item["labels"])


def test_prompt_truncation_keeps_its_end(tiny_tokenizer) -> None:
    ex = Example(prompt=" ".join(f"word{i}" for i in range(100)) + " END:", response="yes")
    item = data.tokenize_example(ex, tiny_tokenizer, max_length=64, max_prompt_length=8)
    prompt_part = [t for t, lab in zip(item["input_ids"], item["labels"], strict=True) if lab == IGNORE_INDEX]
    assert len(prompt_part) == 8
    assert tiny_tokenizer.decode(prompt_part).endswith(" END:")
    assert learned_text(tiny_tokenizer, item) == "yes</s>"


def test_total_truncation(tiny_tokenizer) -> None:
    ex = Example(prompt="Hi:", response=" ".join(["Elizabeth"] * 50))
    item = data.tokenize_example(ex, tiny_tokenizer, max_length=16, max_prompt_length=8)
    assert len(item["input_ids"]) == len(item["labels"]) == 16
    assert item["labels"][-1] != tiny_tokenizer.eos_token_id  # the end was cut


def test_chat_learns_only_assistant_turns(tiny_tokenizer) -> None:
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Who is Emma?"},
        {"role": "assistant", "content": "A heroine."},
        {"role": "user", "content": "And Darcy?"},
        {"role": "assistant", "content": "A gentleman."},
    ]
    item = data.tokenize_example(
        Example(messages=msgs), tiny_tokenizer, max_length=256, max_prompt_length=128
    )
    assert tiny_tokenizer.decode(item["input_ids"]) == tiny_tokenizer.apply_chat_template(
        msgs, tokenize=False
    )
    learned = learned_text(tiny_tokenizer, item)
    assert learned == "A heroine.</s>\nA gentleman.</s>\n"
    assert "Darcy" not in learned and "brief" not in learned


def test_as_chat_makes_the_prompt_the_user_turn_and_learns_only_the_response(tiny_tokenizer) -> None:
    """formats.as_chat (the demo's data): the prompt (trailing newline dropped) is the user's turn;
    the student learns the response and the end of the turn, as for any chat example."""
    raw = Example(
        prompt="Continue the passage:\n\nEmma smiled.\n\nContinuation:\n", response="She was happy.", line=7
    )
    chat = formats.as_chat(raw)
    assert chat.is_chat and chat.line == 7
    assert chat.messages == [
        {"role": "user", "content": "Continue the passage:\n\nEmma smiled.\n\nContinuation:"},
        {"role": "assistant", "content": "She was happy."},
    ]
    assert formats.as_chat(chat) is chat
    item = data.tokenize_example(chat, tiny_tokenizer, max_length=256, max_prompt_length=128)
    assert learned_text(tiny_tokenizer, item) == "She was happy.</s>\n"
    prompt = data.encode_prompt(chat, tiny_tokenizer, 128)
    assert item["input_ids"][: len(prompt)] == prompt  # generation sees what training conditioned on


def test_chat_truncates_prompt_of_final_reply(tiny_tokenizer) -> None:
    msgs = [{"role": "user", "content": "word " * 80}, {"role": "assistant", "content": "Fine."}]
    item = data.tokenize_example(Example(messages=msgs), tiny_tokenizer, max_length=256, max_prompt_length=10)
    assert item["labels"][:10] == [IGNORE_INDEX] * 10 and item["labels"][10] != IGNORE_INDEX
    assert learned_text(tiny_tokenizer, item) == "Fine.</s>\n"


def test_chat_without_template_uses_fallback_and_appends_eos(tiny_tokenizer) -> None:
    import copy

    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = None
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    item = data.tokenize_example(Example(messages=msgs), tok, max_length=64, max_prompt_length=32)
    assert learned_text(tok, item) == "Hello.</s>\n"


def test_encode_prompt_matches_training_prefix(tiny_tokenizer) -> None:
    for ex in [
        Example(prompt="Tell me:", response="ok"),
        Example(messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo."}]),
    ]:
        item = data.tokenize_example(ex, tiny_tokenizer, max_length=64, max_prompt_length=32)
        prompt = data.encode_prompt(ex, tiny_tokenizer, max_prompt_length=32)
        first_label = next(i for i, lab in enumerate(item["labels"]) if lab != IGNORE_INDEX)
        assert item["input_ids"][:first_label] == prompt


def test_prompt_and_references(tiny_tokenizer) -> None:
    assert data.prompt_and_references(Example(prompt="P:", response="R")) == ("P:", ["R"])
    chat = Example(messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo."}])
    assert data.prompt_and_references(chat, tiny_tokenizer) == ("<|user|>\nHi</s>\n<|assistant|>\n", ["Yo."])
    with pytest.raises(ValueError, match="tokenizer"):
        data.prompt_and_references(chat)


def test_tokenize_demo_examples(tiny_tokenizer) -> None:
    examples = data.read_examples("demo:validation", limit=20)
    items = data.tokenize_examples(examples, tiny_tokenizer, max_length=256, max_prompt_length=128)
    assert len(items) == 20
    for ex, item in zip(examples, items, strict=True):
        assert learned_text(tiny_tokenizer, item) == ex.response + "</s>"


def test_collate_right_pads(tiny_tokenizer) -> None:
    batch = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    out = batches.collate(batch, pad_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert out["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert str(out["input_ids"].dtype) == "torch.int64"


def test_chat_template_errors_name_the_line(tiny_tokenizer) -> None:
    import copy

    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = "{{ raise_exception('Conversation roles must alternate') }}"
    ex = Example(messages=[{"role": "assistant", "content": "Hello."}], line=7)
    with pytest.raises(DataError, match="line 7: cannot apply the chat template: Conversation roles"):
        data.tokenize_example(ex, tok, max_length=64, max_prompt_length=32)
