"""Can our evaluation metrics tell students apart? A validity check on both built-in tasks.

For each task (demo: Jane Austen continuations; jargon: define a hacker term) and each metric we
report (sampled Rouge-L, greedy Rouge-L, distinct-1/2, validation KL and CE), score three models on
the same test prompts:
- the teacher (SmolLM2-135M-Instruct);
- the student before any training (its evenly spaced layers, `student.init: truncate`);
- the same student trained with SFT only (kd_ratio 0, the study's CPU budget).

A metric is fit to rank losses only if it is a quality metric (distinct-n measure diversity,
which has no better direction, so they are reported and never ranked) and it separates the teacher
from the untrained student by a clear margin: the gap must exceed K noise scales, where the noise scale is the larger of the
sampling-seed standard deviation (sampled metrics) and the bootstrap standard deviation of the gap
over examples (every metric; paired, same prompts). The verdicts go to
experiments/results/metric_validity.json and docs/results.md quotes the table.

  python experiments/metric_validity.py                 # both tasks, ~25 min on 2 cores
  python experiments/metric_validity.py --tasks jargon --examples 16   # quicker look
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SUMMARY = ROOT / "experiments" / "results" / "metric_validity.json"
K = 3.0  # noise scales the teacher-vs-untrained gap must exceed
SEEDS = (10, 20, 30)
BOOTSTRAP = 1000
# Higher is better for every metric but the validation losses.
LOWER_IS_BETTER = ("val_kl", "val_ce")
# Diversity statistics are reported, never used to rank: more distinct n-grams is not better (an
# untrained student's noise is the most "diverse"), and fewer is not better either (mode collapse).
DIVERSITY = ("distinct_1", "distinct_2")


def per_example_scores(model, tok, teacher, examples, args, device="cpu") -> dict[str, list[float]]:
    """Per-example values of every metric (sampled Rouge-L averaged over seeds)."""
    from akl_core import data, evaluation

    prompts = [data.encode_prompt(ex, tok, args.max_prompt_length) for ex in examples]
    refs = [data.prompt_and_references(ex, tok)[1] for ex in examples]
    kw = dict(max_new_tokens=args.max_new_tokens, batch_size=args.batch, device=device)
    sampled = [evaluation.generate(model, tok, prompts, seed=s, temperature=1.0, **kw) for s in SEEDS]
    greedy = evaluation.generate(model, tok, prompts, seed=0, temperature=0.0, **kw)
    out: dict[str, list[float]] = {"rouge_l": [], "rouge_l_greedy": [], "val_kl": [], "val_ce": []}
    seed_scores = [evaluation.corpus_rouge_l(texts, refs) for texts in sampled]
    for i, ex in enumerate(examples):
        out["rouge_l"].append(100 * statistics.fmean(evaluation.rouge_l(t[i], refs[i]) for t in sampled))
        out["rouge_l_greedy"].append(100 * evaluation.rouge_l(greedy[i], refs[i]))
        row = data.tokenize_example(ex, tok, args.max_length, args.max_prompt_length)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        losses = evaluation.validation_losses(model, teacher, [row], pad, device=device)
        out["val_kl"].append(losses["val_kl"])
        out["val_ce"].append(losses["val_ce"])
    words = [[t.lower().split() for t in texts] for texts in sampled]
    out["_seed_rouge_l"] = seed_scores
    out["_distinct"] = [
        [evaluation.distinct_n(w, 1) for w in words],
        [evaluation.distinct_n(w, 2) for w in words],
    ]
    return out


def summarize(scores: dict[str, list[float]]) -> dict[str, float]:
    d1, d2 = scores["_distinct"]
    return {
        "rouge_l": statistics.fmean(scores["_seed_rouge_l"]),
        "rouge_l_seed_std": statistics.pstdev(scores["_seed_rouge_l"]),
        "rouge_l_greedy": statistics.fmean(scores["rouge_l_greedy"]),
        "distinct_1": statistics.fmean(d1),
        "distinct_1_seed_std": statistics.pstdev(d1),
        "distinct_2": statistics.fmean(d2),
        "distinct_2_seed_std": statistics.pstdev(d2),
        "val_kl": statistics.fmean(scores["val_kl"]),
        "val_ce": statistics.fmean(scores["val_ce"]),
    }


def bootstrap_std(a: list[float], b: list[float], rng: random.Random) -> float:
    """Std of mean(a - b) over examples resampled with replacement (paired: same prompts)."""
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    n = len(diffs)
    means = [statistics.fmean(diffs[rng.randrange(n)] for _ in range(n)) for _ in range(BOOTSTRAP)]
    return statistics.pstdev(means)


def verdicts(teacher: dict, untrained: dict, sft: dict, rng: random.Random) -> dict[str, dict]:
    """Per metric: the teacher-vs-untrained gap, its noise scale, and whether it ranks."""
    out = {}
    st, su, ss = summarize(teacher), summarize(untrained), summarize(sft)
    for metric in ("rouge_l", "rouge_l_greedy", "distinct_1", "distinct_2", "val_kl", "val_ce"):
        sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
        gap = sign * (st[metric] - su[metric])
        noise = [st.get(f"{metric}_seed_std", 0.0), su.get(f"{metric}_seed_std", 0.0)]
        if metric in teacher and metric != "val_kl":  # per-example values exist
            noise.append(bootstrap_std(teacher[metric], untrained[metric], rng))
        elif metric == "val_kl":  # the teacher's KL to itself is 0 for every example
            noise.append(bootstrap_std([0.0] * len(untrained[metric]), untrained[metric], rng))
        scale = max(noise)
        out[metric] = {
            "teacher": st[metric],
            "untrained": su[metric],
            "sft": ss[metric],
            "gap": gap,
            "noise": scale,
            "gap_in_noise": gap / scale if scale > 0 else float("inf"),
            "sft_gain": sign * (ss[metric] - su[metric]),
            "separates": bool(gap > K * scale),
            "ranks": bool(gap > K * scale) and metric not in DIVERSITY,
        }
    return out


def sft_student(task: str, args, models_root: Path, out: Path):
    """Train the truncated student with SFT only (kd_ratio 0) and load its final weights."""
    import torch
    from transformers import AutoModelForCausalLM

    from akl_core.spec import JobSpec
    from akl_core.trainer import distill

    spec = JobSpec.model_validate(
        {
            "teacher": "preset:smollm2-135m-instruct",
            "student": {"init": "truncate", "num_layers": args.num_layers},
            "data": {"train": f"{task}:train"},
            "loss": {"name": "fkl", "kd_ratio": 0.0},
            "training": {
                "max_steps": args.sft_steps,
                "batch_size": 4,
                "learning_rate": 2e-4,
                "warmup_steps": 4,
                "max_length": args.max_length,
                "max_prompt_length": args.max_prompt_length,
                "precision": "fp32",
                "teacher_dtype": "fp32",
            },
            "evaluation": {"num_examples": 0},
            "checkpointing": {"every_steps": 0, "keep": 1},
            "resources": {"device": "cpu"},
        }
    )
    if not (out / "final").is_dir():
        distill(spec, out, resume=True, models_root=models_root, allow_hub=False)
    return AutoModelForCausalLM.from_pretrained(out / "final", dtype=torch.float32).eval()


def run_task(task: str, args, models_root: Path) -> dict:
    import torch

    from akl_core import data, models, students
    from akl_core.spec import StudentSpec

    path = models.prepare_preset("smollm2-135m-instruct", models_root)
    tok = models.load_tokenizer(path)
    teacher = models.load_teacher(path, dtype=torch.float32).eval()
    examples = data.read_examples(f"{task}:test", limit=args.examples)
    t0 = time.perf_counter()
    untrained = students.build_student(StudentSpec(init="truncate", num_layers=args.num_layers), path).eval()
    sft = sft_student(task, args, models_root, ROOT / "out" / "validity" / f"{task}-sft")
    scores = {}
    for name, model in (("teacher", teacher), ("untrained", untrained), ("sft", sft)):
        with torch.no_grad():
            scores[name] = per_example_scores(model, tok, teacher, examples, args)
        print(f"[{task}] {name}: {summarize(scores[name])}", flush=True)
    rng = random.Random(0)
    return {
        "examples": len(examples),
        "seconds": time.perf_counter() - t0,
        "metrics": verdicts(scores["teacher"], scores["untrained"], scores["sft"], rng),
    }


def table(results: dict) -> str:
    lines = [
        "| task | metric | teacher | untrained | SFT | gap / noise | separates? | ranks losses? |",
        "|---|---|---:|---:|---:|---:|---|---|",
    ]
    for task, res in results["tasks"].items():
        for metric, v in res["metrics"].items():
            lines.append(
                f"| {task} | {metric} | {v['teacher']:.3f} | {v['untrained']:.3f} | {v['sft']:.3f} "
                f"| {v['gap_in_noise']:.1f} | {'yes' if v['separates'] else 'no'} | {'yes' if v['ranks'] else 'no'} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="+", default=["jargon", "demo"], choices=["jargon", "demo"])
    parser.add_argument("--examples", type=int, default=48)
    parser.add_argument("--num-layers", type=int, default=6)
    parser.add_argument("--sft-steps", type=int, default=60)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--max-length", type=int, default=160)
    parser.add_argument("--max-prompt-length", type=int, default=112)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models-root", type=Path, default=ROOT / ".akl" / "models")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    results = {"k": K, "seeds": list(SEEDS), "args": {k: str(v) for k, v in vars(args).items()}, "tasks": {}}
    for task in args.tasks:
        results["tasks"][task] = run_task(task, args, args.models_root)
        SUMMARY.parent.mkdir(parents=True, exist_ok=True)
        SUMMARY.write_text(json.dumps(results, indent=2))
    print(table(results))


if __name__ == "__main__":
    main()
