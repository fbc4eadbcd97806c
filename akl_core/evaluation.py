"""Evaluation by the protocol of docs/method.md (inherited from MiniLLM).

- Rouge-L: sample a response per prompt (temperature, top_p, top_k) for each seed; F-measure of
  rouge_score's RougeScorer(['rougeL'], use_stemmer=True), max over references, mean over
  examples, x100; mean and std over seeds.
- rouge_l_greedy: the same Rouge-L of one greedy decode (no seeds). Cheap, and it exposes a
  student that samples plausible words but, decoded greedily, emits only punctuation.
- distinct-1/2: unique n-grams / all n-grams over every generated response (offline stand-in for
  the paper's diversity judgement).
- val_ce: the student's CE on validation responses; val_kl: token-level KL(teacher || student),
  both means over response tokens.
Generation is batched with left padding and uses the KV cache (``model.generate``).
"""

from __future__ import annotations

import hashlib
import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from akl_core.spec import EvaluationSpec

TEACHER_CACHE = "teacher_eval.json"


# ----------------------------------------------------------------------------------------------
# text metrics


_SCORER = None


def _scorer():
    global _SCORER
    if _SCORER is None:
        from rouge_score import rouge_scorer

        _SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return _SCORER


def rouge_l(prediction: str, references: Sequence[str]) -> float:
    """Rouge-L F-measure in [0, 1], max over references."""
    scorer = _scorer()
    return max((scorer.score(ref, prediction)["rougeL"].fmeasure for ref in references), default=0.0)


def corpus_rouge_l(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Mean over examples of ``rouge_l``, x100 (the paper's scale)."""
    if not predictions:
        return 0.0
    return 100.0 * sum(rouge_l(p, r) for p, r in zip(predictions, references, strict=True)) / len(predictions)


def distinct_n(sequences: Sequence[Sequence[Any]], n: int) -> float:
    """Distinct-n: unique n-grams / total n-grams, n-grams taken within each sequence."""
    grams = [tuple(seq[i : i + n]) for seq in sequences for i in range(len(seq) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


# ----------------------------------------------------------------------------------------------
# generation


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    *,
    seed: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
) -> list[str]:
    """Sample one response per prompt (token ids); returns the decoded new text.

    Prompts are left-padded into batches so that every row's new tokens start at the same
    position; the KV cache is on. ``temperature`` 0 means greedy. The global RNG is restored
    afterwards, so evaluation does not change a training run's random stream.
    """
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sampling = temperature > 0
    kwargs: dict[str, Any] = dict(
        max_new_tokens=max_new_tokens,
        do_sample=sampling,
        pad_token_id=pad_id,
        eos_token_id=tokenizer.eos_token_id,
        use_cache=True,
    )
    if sampling:
        kwargs.update(temperature=temperature, top_p=top_p, top_k=top_k)  # top_k 0: no top-k cut
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    texts: list[str] = []
    devices = [torch.device(device).index] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for i in range(0, len(prompts), batch_size):
            rows = [list(p) for p in prompts[i : i + batch_size]]
            width = max(len(r) for r in rows)
            ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], device=device)
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
            # (b, width + new); torch types Module.__getattr__ as Tensor | Module: generate is HF's
            out = model.generate(input_ids=ids, attention_mask=mask, **kwargs)  # type: ignore[operator]
            texts.extend(tokenizer.batch_decode(out[:, width:], skip_special_tokens=True))
    return texts


def rouge_over_seeds(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    references: Sequence[Sequence[str]],
    spec: EvaluationSpec,
    device: torch.device | str,
) -> dict[str, Any]:
    """Rouge-L mean/std over ``spec.seeds``, distinct-1/2 over every sampled response, and
    (``spec.greedy``) the Rouge-L of one greedy decode."""

    def decode(seed: int, temperature: float) -> list[str]:
        return generate(
            model,
            tokenizer,
            prompts,
            seed=seed,
            max_new_tokens=spec.max_new_tokens,
            temperature=temperature,
            top_p=spec.top_p,
            top_k=spec.top_k,
            batch_size=spec.batch_size,
            device=device,
        )

    scores: list[float] = []
    words: list[list[str]] = []
    for seed in spec.seeds:
        texts = decode(seed, spec.temperature)
        scores.append(corpus_rouge_l(texts, references))
        words.extend(t.lower().split() for t in texts)
    out: dict[str, Any] = {
        "rouge_l": statistics.fmean(scores),
        "rouge_l_std": statistics.pstdev(scores) if len(scores) > 1 else 0.0,
        "rouge_l_per_seed": scores,
        "distinct_1": distinct_n(words, 1),
        "distinct_2": distinct_n(words, 2),
        "rouge_l_greedy": float("nan"),
    }
    if spec.greedy:
        out["rouge_l_greedy"] = corpus_rouge_l(decode(0, 0.0), references)
    return out


# ----------------------------------------------------------------------------------------------
# teacher-forced validation metrics


@torch.no_grad()
def validation_losses(
    model: torch.nn.Module,
    teacher: torch.nn.Module | None,
    tokenized: Sequence[dict[str, list[int]]],
    pad_id: int,
    *,
    vocab_size: int | None = None,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """val_ce (student CE) and val_kl (KL(teacher || student), T = 1): means over response tokens."""
    from akl_core import batches, divergences

    ce = kl = tokens = 0.0
    for i in range(0, len(tokenized), batch_size):
        batch = {
            k: v.to(device) for k, v in batches.collate(list(tokenized[i : i + batch_size]), pad_id).items()
        }
        targets = batch["labels"][:, 1:]
        keep = targets != -100
        if not bool(keep.any()):
            continue
        s = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][keep]
        ce += float(F.cross_entropy(s.float(), targets[keep], reduction="sum"))
        tokens += int(keep.sum())
        if teacher is not None:
            t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][
                keep
            ]
            v = vocab_size or min(s.shape[-1], t.shape[-1])
            kl += float(divergences.compute("fkl", s[:, :v], t[:, :v], targets[keep]).loss_sum)
    n = max(tokens, 1.0)
    return {
        "val_ce": ce / n,
        "val_kl": kl / n if teacher is not None else float("nan"),
        "val_tokens": int(tokens),
    }


# ----------------------------------------------------------------------------------------------
# everything at once


def _teacher_key(spec: EvaluationSpec, prompts: Sequence[Sequence[int]]) -> str:
    blob = json.dumps(
        [spec.model_dump(exclude={"every_steps", "at_start", "teacher_reference"}), list(map(list, prompts))]
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def teacher_rouge(
    teacher: torch.nn.Module | None,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    references: Sequence[Sequence[str]],
    spec: EvaluationSpec,
    device: torch.device | str,
    cache_dir: Path | None,
) -> dict[str, Any] | None:
    """The teacher's Rouge-L (the reference line), computed once and cached in ``cache_dir``.

    Without a teacher (a job on a teacher cache, whose directory is ``cache_dir``) only a stored
    line scored with the same settings and prompts is returned; otherwise None."""
    key = _teacher_key(spec, prompts)
    path = Path(cache_dir) / TEACHER_CACHE if cache_dir is not None else None
    if path is not None and path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("key") == key:
            return cached["metrics"]
    if teacher is None:
        return None
    metrics = rouge_over_seeds(teacher, tokenizer, prompts, references, spec, device)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"key": key, "metrics": metrics}, indent=2))
    return metrics


def evaluate_model(
    model: torch.nn.Module,
    tokenizer: Any,
    examples: Sequence[Any],
    spec: EvaluationSpec,
    *,
    teacher: torch.nn.Module | None = None,
    vocab_size: int | None = None,
    max_length: int = 256,
    max_prompt_length: int = 128,
    device: torch.device | str = "cpu",
    cache_dir: Path | None = None,
) -> dict[str, Any]:
    """All metrics of the `eval` event for ``model`` on validation ``examples`` (data.Example)."""
    from akl_core import data

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    tokenized = [data.tokenize_example(ex, tokenizer, max_length, max_prompt_length) for ex in examples]
    was_training = model.training
    model.eval()
    try:
        out: dict[str, Any] = validation_losses(
            model,
            teacher,
            tokenized,
            pad_id,
            vocab_size=vocab_size,
            batch_size=spec.batch_size,
            device=device,
        )
        out.update(
            rouge_l=float("nan"),
            rouge_l_std=float("nan"),
            rouge_l_greedy=float("nan"),
            distinct_1=float("nan"),
            distinct_2=float("nan"),
            teacher_rouge_l=None,
            num_examples=0,
        )
        chosen = list(range(min(spec.num_examples, len(examples))))
        if chosen:
            prompts = [data.encode_prompt(examples[i], tokenizer, max_prompt_length) for i in chosen]
            refs = [data.prompt_and_references(examples[i], tokenizer)[1] for i in chosen]
            gen = rouge_over_seeds(model, tokenizer, prompts, refs, spec, device)
            out.update(gen, num_examples=len(chosen))
            ref = None
            if spec.teacher_reference and (teacher is not None or cache_dir is not None):
                ref = teacher_rouge(teacher, tokenizer, prompts, refs, spec, device, cache_dir)
            if ref is not None:
                out.update(
                    teacher_rouge_l=ref["rouge_l"],
                    teacher_rouge_l_std=ref["rouge_l_std"],
                    teacher_rouge_l_greedy=ref.get("rouge_l_greedy"),
                )
    finally:
        model.train(was_training)
    return out
