"""Print the distilled student's generations beside the teacher's on a few demo test prompts.

    python scripts/compare_generations.py --student DIR --teacher DIR [--n 3] [--max-new-tokens 40]
        [--max-prompt-length 128] [--chat]

Greedy decoding, so the comparison is repeatable; Rouge-L against the true continuation is shown.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from akl_core.data import encode_prompt, prompt_and_references, read_examples
from akl_core.evaluation import generate, rouge_l
from akl_core.formats import as_chat
from akl_core.models import load_teacher, load_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--student", type=Path, required=True)
    parser.add_argument("--teacher", type=Path, required=True)
    parser.add_argument("--n", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--max-prompt-length", type=int, default=128, help="the job's, in tokens")
    parser.add_argument("--chat", action="store_true", help="prompts in the chat template (as_chat)")
    args = parser.parse_args()

    tokenizer = load_tokenizer(args.teacher)
    examples = read_examples("demo:test", limit=args.n)
    if args.chat:
        examples = [as_chat(ex) for ex in examples]
    pairs = [prompt_and_references(ex, tokenizer) for ex in examples]
    prompts = [encode_prompt(ex, tokenizer, args.max_prompt_length) for ex in examples]
    outputs = {}
    for name, path in (("teacher", args.teacher), ("student", args.student)):
        model = load_teacher(path)
        outputs[name] = generate(
            model, tokenizer, prompts, seed=0, max_new_tokens=args.max_new_tokens, temperature=0.0
        )
        print(f"{name}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters from {path}")
        del model
    for i, (prompt, refs) in enumerate(pairs):
        print(f"\n--- example {i + 1} " + "-" * 60)
        print(prompt.strip()[-300:])
        print(f"\n  reference: {refs[0].strip()}")
        for name in ("teacher", "student"):
            text = outputs[name][i].strip().replace("\n", " ")
            score = 100 * rouge_l(outputs[name][i], refs)
            print(f"  {name:>9} (Rouge-L {score:5.1f}): {text}")


if __name__ == "__main__":
    main()
