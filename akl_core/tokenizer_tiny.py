"""A small byte-level BPE tokenizer trained offline on the bundled demo dataset.

It backs the `preset:tiny` model used by tests and smoke runs: the same code paths as a real
tokenizer (special tokens, chat template, padding) at a vocabulary of a few hundred entries.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (PAD, BOS, EOS, *ROLE_TOKENS)
DEFAULT_VOCAB_SIZE = 768

# Each turn: a role marker, a newline, the content, then EOS: the assistant learns to end its turn
# with EOS, which is also what generation stops on.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '</s>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def demo_texts(demo_dir: Path | None = None) -> Iterator[str]:
    """Prompts and responses of the demo train split (the tokenizer's training corpus)."""
    demo_dir = demo_dir or Path(__file__).resolve().parent / "datasets" / "demo"
    with (demo_dir / "train.jsonl").open(encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            yield row["prompt"]
            yield row["response"]


def build_tiny_tokenizer(vocab_size: int = DEFAULT_VOCAB_SIZE, texts: Iterator[str] | None = None):
    """Train a byte-level BPE on the demo texts; returns a transformers fast tokenizer.

    Deterministic: BPE training over a fixed corpus with ties broken by the library's ordering.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts if texts is not None else demo_texts(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=list(ROLE_TOKENS),
        chat_template=CHAT_TEMPLATE,
        model_max_length=2048,
    )
