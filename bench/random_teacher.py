"""A randomly initialised teacher of a real model's shape, for benchmarks where the real weights
cannot travel (bench/gpu.sh: the GPU machine has no network and no room for a 135M GGUF).

Writes MODELS_ROOT/NAME: a Llama with that shape and the tiny preset's tokenizer (its 768 ids
fit in any vocabulary), loadable as ``--teacher NAME --models-root MODELS_ROOT``. Speed and
memory depend on the shape only; a random teacher's distributions are flatter than a trained
one's (more AKL head search), so the numbers are not the real teacher's.

  python bench/random_teacher.py /tmp/models smollm2-135m-shape
"""

from __future__ import annotations

import argparse
from pathlib import Path

SHAPES = {
    # SmolLM2-135M-Instruct (the demo teacher): 30 layers, hidden 576, vocabulary 49152
    "smollm2-135m": dict(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        tie_word_embeddings=True,
    ),
}


def build(root: Path, name: str, shape: str = "smollm2-135m", seed: int = 0) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from akl_core.tokenizer_tiny import build_tiny_tokenizer

    out = root / name
    if (out / "config.json").is_file():
        return out
    tok = build_tiny_tokenizer()
    config = LlamaConfig(
        **SHAPES[shape],
        max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("models_root", type=Path)
    ap.add_argument("name")
    ap.add_argument("--shape", default="smollm2-135m", choices=sorted(SHAPES))
    args = ap.parse_args()
    print(build(args.models_root, args.name, args.shape))
