"""Compare the distillation losses of the paper with the real teacher (issue 6).

SmolLM2-135M-Instruct (30 layers) -> a truncated student (its evenly spaced layers) on the demo data
(Jane Austen continuations). Every method gets the same budget (steps, batch, lr, data order per
seed); each (method, seed) run is one child process (memory is returned, one torch thread each) that
calls ``akl_core.trainer.distill``. The final model is evaluated on the test split by the trainer's
own evaluation (``data.validation`` is set to the test split; nothing selects checkpoints): Rouge-L
mean over the sampling seeds, distinct-1/2, and the teacher-forced KL(teacher || student) on the
test responses. The teacher is scored once with the same prompts and sampling seeds.

  python experiments/compare_losses.py                      # the CPU study: 8 methods x 3 seeds
                                                            # + teacher; 80 min on 2 shared cores
  python experiments/compare_losses.py --budget gpu         # a larger budget on one GPU
  python experiments/compare_losses.py --aggregate-only     # rebuild the table from finished runs
  python experiments/compare_losses.py --task jargon        # the same study on the Jargon task
  python experiments/compare_losses.py --task jargon --teacher-cache 64 --methods akl fkl_rkl fkl
                                  # from top-64 teacher caches (one per seed, see seed_train_file);
                                  # out/compare-jargon-cache-k64/, compare_losses_jargon_cache_k64.json

Runs go to out/compare/<method>-s<seed>/ (out/compare-jargon/ for --task jargon; ignored by git); a finished run (result.json) is skipped
on re-invocation, so an interrupted study resumes. The summary goes to
experiments/results/compare_losses.json (compare_losses_jargon.json for --task jargon); ``experiments/plot_gaps.py`` draws the gap histories.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

# how the table and the plots name each method
LABELS = {
    "sft": "SFT",
    "fkl": "FKL",
    "rkl": "RKL",
    "fkl_rkl": "FKL+RKL",
    "akl": "AKL",
    "akl_r": "AKL-r",
    "skl": "SKL",
    "srkl": "SRKL",
}

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("sft", "fkl", "rkl", "fkl_rkl", "akl", "akl_r", "skl", "srkl")
TASKS = ("demo", "jargon")  # the built-in datasets: Austen continuations, Jargon definitions
METRICS = (
    "rouge_l",
    "rouge_l_std",
    "rouge_l_greedy",
    "distinct_1",
    "distinct_2",
    "val_kl",
    "val_ce",
    "val_kl_topk",
)
TEACHER = "preset:smollm2-135m-instruct"


def summary_path(task: str, cache_k: int | None = None) -> Path:
    name = "compare_losses" if task == "demo" else f"compare_losses_{task}"
    if cache_k is not None:
        name += f"_cache_k{cache_k}"
    return ROOT / "experiments" / "results" / f"{name}.json"


def cache_name(task: str, k: int, seed: int) -> str:
    """A cache study's cache under ``--caches-root``: one per training seed (``seed_train_file``)."""
    return f"{task}-k{k}-s{seed}"


def seed_train_file(task: str, seed: int, b: dict) -> Path:
    """The training examples that seed's online run reads, arranged so that the trainer's seeded
    order (``batches.DataOrder``) over this file gives the online run's batches, in its order.

    A cache must hold every example of its training file, and a teacher pass over the whole split
    (1,735 Jargon examples) does not fit the CPU budget, while one run reads only
    steps x batch examples (one epoch of this file). Position perm_n[j] of the file holds the
    online run's j-th example perm_N[j]; ``write_seed_train_file`` checks it.
    """
    n = b["steps"] * b["batch_size"] * b["grad_accum"]
    return ROOT / "out" / "study-data" / f"{task}-train-s{seed}-n{n}.jsonl"


def write_seed_train_file(task: str, seed: int, b: dict) -> Path:
    from akl_core import data
    from akl_core.batches import DataOrder

    target = seed_train_file(task, seed, b)
    lines = data.resolve_data_path(f"{task}:train").read_text(encoding="utf-8").splitlines()
    lines = [line for line in lines if line.strip()]
    n = b["steps"] * b["batch_size"] * b["grad_accum"]
    if n > len(lines):
        raise SystemExit(f"{n} examples per run is more than one epoch of {task}:train")
    online = DataOrder(len(lines), seed).permutation(0)[:n]
    here = DataOrder(n, seed).permutation(0)
    subset = [""] * n
    for j in range(n):
        subset[here[j]] = lines[online[j]]
    # the trainer indexes parsed examples: no line may be dropped by the parser
    assert len(data.read_examples(f"{task}:train")) == len(lines)
    assert all(subset[here[j]] == lines[online[j]] for j in range(n))
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("\n".join(subset) + "\n", encoding="utf-8")
    assert len(data.read_examples(target)) == n
    return target


def cache_spec(task: str, b: dict, k: int, seed: int):
    """The cache of a seed's training data: same examples, same length settings as online.

    No validation split and no teacher evaluation in the cache: the study scores every student
    against the full teacher (``dense_eval``), so the test metrics stay comparable with online runs.
    """
    from akl_core.cache_spec import CacheSpec

    return CacheSpec.model_validate(
        {
            "teacher": TEACHER,
            "data": {
                "train": str(seed_train_file(task, seed, b)),
                "max_length": b["max_length"],
                "max_prompt_length": b["max_prompt_length"],
            },
            "top_k": k,
            "evaluation": {"num_examples": 0},
            "build": {"batch_size": 8, "shard_examples": 128, "device": b["device"], "teacher_dtype": "fp32"},
        }
    )


def build_study_cache(task: str, b: dict, k: int, seed: int, caches_root: Path, models_root: Path) -> dict:
    """Build (or resume) one seed's cache; returns the builder's result with its wall time."""
    import torch

    from akl_core.cache_builder import build_cache

    torch.set_num_threads(int(os.environ.get("AKL_BUILD_THREADS", "2")))
    write_seed_train_file(task, seed, b)
    t0 = time.perf_counter()

    def show(event) -> None:
        if event.get("type") in ("started", "shard", "completed"):
            print(time.strftime("%H:%M:%S"), json.dumps(event), flush=True)

    result = build_cache(
        cache_spec(task, b, k, seed),
        caches_root / cache_name(task, k, seed),
        on_event=show,
        models_root=models_root,
        allow_hub=False,
    )
    result["wall_s"] = time.perf_counter() - t0
    return result


# Budgets. "cpu": 2 runs in parallel (1 thread each); one run took 160-700 s on 2 shared cores
# (~4-7 s per step and ~1-2 min of evaluation when the cores were free), 80 min for the study.
BUDGETS: dict[str, dict] = {
    "cpu": dict(
        num_layers=6,
        steps=30,
        batch_size=4,
        grad_accum=1,
        lr=2e-4,
        warmup=4,
        max_length=160,
        max_prompt_length=112,
        eval_examples=32,
        max_new_tokens=32,
        eval_batch=16,
        jobs=2,
        device="cpu",
        threads=1,
    ),
    "gpu": dict(
        num_layers=6,
        steps=1000,
        batch_size=16,
        grad_accum=1,
        lr=2e-4,
        warmup=50,
        max_length=256,
        max_prompt_length=160,
        eval_examples=100,
        max_new_tokens=64,
        eval_batch=50,
        jobs=1,
        device="cuda",
        threads=4,
    ),
}


def build_spec(method: str, seed: int, b: dict, task: str = "demo", cache_k: int | None = None):
    """The run's job. With ``cache_k`` the teacher is the study's cache (``cache:TASK-kK``); every
    other field is the online run's, so a seed sees the same batches from the same start."""
    from akl_core.spec import JobSpec

    return JobSpec.model_validate(
        {
            "teacher": TEACHER if cache_k is None else f"cache:{cache_name(task, cache_k, seed)}",
            "student": {"init": "truncate", "num_layers": b["num_layers"]},
            "data": {
                "train": f"{task}:train" if cache_k is None else str(seed_train_file(task, seed, b)),
                "validation": f"{task}:test",
                "max_validation_examples": b["eval_examples"],
            },
            "loss": {"name": method, "kd_ratio": 0.5, "mu": 0.5, "lam": 0.1},
            "training": {
                "max_steps": b["steps"],
                "batch_size": b["batch_size"],
                "grad_accum": b["grad_accum"],
                "learning_rate": b["lr"],
                "scheduler": "cosine",
                "warmup_steps": b["warmup"],
                "max_length": b["max_length"],
                "max_prompt_length": b["max_prompt_length"],
                "seed": seed,
                "precision": "fp32",
                "teacher_dtype": "fp32",
            },
            "evaluation": {
                "num_examples": b["eval_examples"],
                "seeds": [10, 20, 30, 40, 50],
                "max_new_tokens": b["max_new_tokens"],
                "temperature": 1.0,
                "top_p": 1.0,
                "top_k": 0,
                "batch_size": b["eval_batch"],
                "teacher_reference": False,
            },
            "checkpointing": {"every_steps": 0, "keep": 1},
            "resources": {"device": b["device"]},
        }
    )


# ----------------------------------------------------------------------------------------------
# one run / the teacher line (child processes)


def run_one(
    method: str, seed: int, b: dict, out: Path, models_root: Path, task: str, cache_k: int | None = None
) -> None:
    import torch

    from akl_core.trainer import distill

    torch.set_num_threads(b["threads"])
    t0 = time.perf_counter()
    spec = build_spec(method, seed, b, task, cache_k)
    out.mkdir(parents=True, exist_ok=True)
    (out / "spec.json").write_text(spec.model_dump_json(indent=1))
    distill(spec, out, resume=False, models_root=models_root, allow_hub=False)
    result = json.loads((out / "result.json").read_text())
    result["train_eval_s"] = time.perf_counter() - t0
    if cache_k is not None:
        # The trainer's val_kl from a cache is over the k + 1 cached outcomes of a cached
        # validation split (none here): score the student against the full teacher instead.
        result["trainer_metrics"] = {k: result["metrics"].get(k) for k in ("val_kl", "val_ce")}
        result["metrics"].update(dense_eval(spec, out / "final", b, models_root, cache_k))
        # the same student on the same tokens: the trainer's CE and ours agree
        ce = result["trainer_metrics"]["val_ce"]
        assert abs(result["metrics"]["val_ce"] - ce) < 1e-3 * ce, (result["metrics"]["val_ce"], ce)
    result["wall_s"] = time.perf_counter() - t0
    (out / "result.json").write_text(json.dumps(result, indent=2))
    # Weights are not needed for the study: drop them (0.2 GB per run).
    for f in (out / "final").glob("*.safetensors"):
        f.unlink()


def dense_eval(spec, student_dir: Path, b: dict, models_root: Path, k: int) -> dict:
    """The online runs' teacher-forced metrics for a cache-trained student: KL(teacher || student)
    against the full teacher over all V tokens (as ``evaluation.validation_losses`` computes it
    for online runs), its CE, and the KL over the teacher's top-k + one tail bucket (what the k-cache
    lets the loss see; at most the dense KL)."""
    import torch
    from transformers import AutoModelForCausalLM

    from akl_core import batches, data, divergences, models
    from akl_core.sparse import compute_sparse
    from akl_core.teacher_cache import topk_rows

    path = models.resolve_model_ref(TEACHER, models_root=models_root, allow_hub=False)
    tok = models.load_tokenizer(path)
    teacher = models.load_teacher(path, dtype=torch.float32, device=b["device"])
    student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32, use_safetensors=True)
    student = student.to(b["device"]).eval()
    examples = data.read_examples(spec.data.validation, limit=spec.data.max_validation_examples)
    t = spec.training
    rows = [data.tokenize_example(ex, tok, t.max_length, t.max_prompt_length) for ex in examples]
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    vocab = min(student.config.vocab_size, teacher.config.vocab_size)
    topk = dense = ce = tokens = 0.0
    torch.set_grad_enabled(False)  # the end of the child process: nothing trains after this
    for i in range(0, len(rows), spec.evaluation.batch_size):
        batch = {
            k_: v.to(b["device"])
            for k_, v in batches.collate(rows[i : i + spec.evaluation.batch_size], pad_id).items()
        }
        targets = batch["labels"][:, 1:]
        keep = targets != -100
        if not bool(keep.any()):
            continue
        s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][keep]
        q = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][keep]
        s, q = s[:, :vocab].float(), q[:, :vocab].float()
        ids, top, tail = topk_rows(q, k)
        topk += float(compute_sparse("fkl", s, ids, top, tail, targets[keep]).loss_sum)
        dense += float(divergences.compute("fkl", s, q, targets[keep]).loss_sum)
        ce += float(torch.nn.functional.cross_entropy(s, targets[keep], reduction="sum"))
        tokens += int(keep.sum())
    return {
        "val_kl": dense / tokens,
        "val_ce": ce / tokens,
        "val_kl_topk": topk / tokens,
        "val_tokens": int(tokens),
    }


def run_teacher(b: dict, out: Path, models_root: Path, task: str) -> None:
    """The teacher's line: the trainer's evaluation applied to the teacher itself (KL 0 by definition)."""
    import torch

    from akl_core import data, evaluation, models

    torch.set_num_threads(b["threads"])
    t0 = time.perf_counter()
    spec = build_spec("fkl", 0, b, task)
    path = models.resolve_model_ref(spec.teacher, models_root=models_root, allow_hub=False)
    tok = models.load_tokenizer(path)
    teacher = models.load_teacher(path, dtype=torch.float32, device=b["device"])
    examples = data.read_examples(spec.data.validation, limit=spec.data.max_validation_examples)
    metrics = evaluation.evaluate_model(
        teacher,
        tok,
        examples,
        spec.evaluation,
        teacher=None,
        max_length=spec.training.max_length,
        max_prompt_length=spec.training.max_prompt_length,
        device=b["device"],
    )
    metrics.update(val_kl=0.0)
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(
        json.dumps({"status": "completed", "metrics": metrics, "wall_s": time.perf_counter() - t0}, indent=2)
    )


# ----------------------------------------------------------------------------------------------
# the study


def queue(methods: list[str], seeds: list[int], teacher: bool = True) -> list[tuple[str, int]]:
    """Seed-major order: every method's first seed finishes before any second seed starts, so a
    study cut short still compares all methods on the seeds it has. A cache study has no teacher
    line of its own (the online study's is the teacher's)."""
    return [("teacher", 0)] * teacher + [(m, s) for s in seeds for m in methods]


def finished(d: Path) -> bool:
    """A run is done when its result.json has the driver's wall time (written last; a cache run's
    result.json exists before its dense evaluation)."""
    return (d / "result.json").is_file() and "wall_s" in json.loads((d / "result.json").read_text())


def run_dir(out_root: Path, method: str, seed: int) -> Path:
    return out_root / ("teacher" if method == "teacher" else f"{method}-s{seed}")


def launch(method: str, seed: int, args, out_root: Path) -> subprocess.Popen:
    d = run_dir(out_root, method, seed)
    d.mkdir(parents=True, exist_ok=True)
    threads = str(BUDGETS[args.budget]["threads"])
    env = {
        **os.environ,
        "AKL_CACHES_ROOT": str(args.caches_root),
        "OMP_NUM_THREADS": threads,
        "MKL_NUM_THREADS": threads,
        "TOKENIZERS_PARALLELISM": "false",
    }
    cmd = [
        sys.executable,
        __file__,
        "--budget",
        args.budget,
        "--task",
        args.task,
        "--out",
        str(out_root),
        "--models-root",
        str(args.models_root),
        *(["--teacher-cache", str(args.teacher_cache)] if args.teacher_cache else []),
        "--child",
        method,
        str(seed),
        *_overrides(args),
    ]
    log = open(d / "run.log", "w")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)


def run_study(args, out_root: Path) -> None:
    todo = [
        (m, s)
        for m, s in queue(args.methods, args.seeds, teacher=not args.teacher_cache)
        if not finished(run_dir(out_root, m, s))
    ]
    print(f"{len(todo)} runs to do -> {out_root}", flush=True)
    running: list[tuple[str, int, subprocess.Popen, float]] = []
    jobs = args.jobs or BUDGETS[args.budget]["jobs"]

    def stop_children(signum, frame):  # SIGTERM / Ctrl-C: the runs in flight go too
        for _, _, proc, _ in running:
            proc.terminate()
        sys.exit(1)

    signal.signal(signal.SIGTERM, stop_children)
    signal.signal(signal.SIGINT, stop_children)
    while todo or running:
        while todo and len(running) < jobs:
            m, s = todo.pop(0)
            running.append((m, s, launch(m, s, args, out_root), time.time()))
            print(f"{time.strftime('%H:%M:%S')} start {m} seed {s}", flush=True)
        time.sleep(2)
        for item in list(running):
            m, s, p, t0 = item
            if p.poll() is not None:
                running.remove(item)
                print(
                    f"{time.strftime('%H:%M:%S')} done {m} seed {s} rc={p.returncode} {time.time() - t0:.0f}s",
                    flush=True,
                )
        # The table so far; not before the first run finishes (aggregate refuses an empty study).
        if any(finished(run_dir(out_root, m, s)) for m in args.methods for s in args.seeds):
            aggregate(args, out_root, quiet=True)


# ----------------------------------------------------------------------------------------------
# aggregation


def _events(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _round(value):
    return round(value, 6) if isinstance(value, float) else value


def _change(history: list[float], first: int = 3, last: int = 5) -> float:
    """Mean of the last steps / mean of the first steps: < 1 means the gap closed (per-step
    values are on different batches, hence the averages)."""
    return statistics.fmean(history[-last:]) / statistics.fmean(history[:first])


def _mean_std(values: list[float]) -> dict:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
        "values": values,
    }


def aggregate(args, out_root: Path, quiet: bool = False) -> dict:
    b = {**BUDGETS[args.budget], **_override_values(args)}
    summary: dict = {
        "budget": args.budget,
        "task": args.task,
        "teacher_cache": cache_info(args) if args.teacher_cache else None,
        "config": b,
        "methods": {},
        "runs": {},
        "teacher": None,
    }
    teacher = run_dir(out_root, "teacher", 0) / "result.json"
    if teacher.is_file():
        tm = json.loads(teacher.read_text())["metrics"]
        summary["teacher"] = {k: tm.get(k) for k in (*METRICS, "rouge_l_per_seed")}
    for m in args.methods:
        per_seed: dict = {}
        for s in args.seeds:
            d = run_dir(out_root, m, s)
            if not finished(d):
                continue
            res = json.loads((d / "result.json").read_text())
            steps = [e for e in _events(d / "events.jsonl") if e.get("type") == "step"]
            per_seed[s] = {
                **{k: res["metrics"].get(k) for k in (*METRICS, "rouge_l_per_seed")},
                "wall_s": res.get("wall_s"),
                **({"train_eval_s": res["train_eval_s"]} if "train_eval_s" in res else {}),
                # Runs started before spec.json was saved used an evaluation batch of 8.
                "eval_batch": (
                    json.loads((d / "spec.json").read_text())["evaluation"]["batch_size"]
                    if (d / "spec.json").is_file()
                    else 8
                ),
                "history": {
                    k: [_round(e.get(k)) for e in steps]
                    for k in ("step", "loss", "ce", "kd", "g_head", "g_tail", "w_head", "fkl", "rkl")
                },
            }
        summary["runs"][m] = {str(s): r for s, r in per_seed.items()}
        if per_seed:
            # Runs from before greedy Rouge-L existed have no value for it: leave the metric out.
            summary["methods"][m] = {
                k: _mean_std([r[k] for r in per_seed.values()])
                for k in METRICS
                if all(r.get(k) is not None for r in per_seed.values())
            }
            summary["methods"][m]["gap_change"] = {
                k: _mean_std([_change(r["history"][k]) for r in per_seed.values()])
                for k in ("g_head", "g_tail")
            }
    summary["paired"] = paired(summary["runs"])
    target = summary_path(args.task, args.teacher_cache)
    if args.teacher_cache and summary_path(args.task).is_file():
        online = json.loads(summary_path(args.task).read_text())
        summary["teacher"] = online.get("teacher")  # the same teacher, prompts and sampling seeds
        summary["cache_minus_online"] = cache_minus_online(summary["runs"], online["runs"])
    if not summary["methods"]:  # never replace a stored study with an empty one
        raise SystemExit(f"no finished runs under {out_root}; {target} is left as it was")
    target.parent.mkdir(parents=True, exist_ok=True)
    # compact for cache studies: the file stays under 50 KB with per-step histories
    target.write_text(json.dumps(summary, indent=None if args.teacher_cache else 1))
    if not quiet:
        print(table(summary))
        if summary.get("cache_minus_online"):
            print(json.dumps(summary["cache_minus_online"], indent=1))
    return summary


def cache_info(args) -> dict:
    """What the cache study trained from: per seed, k, size, bytes per token and build time."""
    from akl_core.cache_spec import read_manifest

    out: dict = {"top_k": args.teacher_cache, "per_seed": {}}
    builds = json.loads((args.out / "build.json").read_text()) if (args.out / "build.json").is_file() else {}
    for seed in args.seeds:
        path = args.caches_root / cache_name(args.task, args.teacher_cache, seed)
        if not (path / "manifest.json").is_file():
            continue
        m = read_manifest(path)
        out["per_seed"][str(seed)] = {
            "name": cache_name(args.task, args.teacher_cache, seed),
            "examples": m.examples,
            "tokens": m.tokens,
            "bytes": m.bytes,
            "bytes_per_token": m.bytes_per_token,
            "build_wall_s": builds.get(str(seed)),
        }
    return out


def cache_minus_online(cache_runs: dict, online_runs: dict) -> dict:
    """Paired by training seed (same start, same batches): the cache run minus the online run."""
    out: dict = {}
    for m, per_seed in cache_runs.items():
        seeds = [s for s in per_seed if s in online_runs.get(m, {})]
        if not seeds:
            continue
        out[m] = {
            k: _mean_std([per_seed[s][k] - online_runs[m][s][k] for s in seeds])
            for k in ("rouge_l", "rouge_l_greedy", "val_kl", "val_ce")
            if all(per_seed[s].get(k) is not None and online_runs[m][s].get(k) is not None for s in seeds)
        }
    return out


def paired(runs: dict, ref: str = "akl") -> dict:
    """Paired by training seed (same data order, same start): AKL minus each method in Rouge-L and
    KL, and claim 2's early-training gap ratios FKL / RKL (steps 6-15, where the curves part)."""
    out: dict = {"akl_minus": {}, "fkl_over_rkl_steps_6_15": {}}
    for m, per_seed in runs.items():
        seeds = [s for s in per_seed if s in runs.get(ref, {})]
        if m == ref or not seeds:
            continue
        out["akl_minus"][m] = {
            k: _mean_std([runs[ref][s][k] - per_seed[s][k] for s in seeds])
            for k in ("rouge_l", "rouge_l_greedy", "val_kl")
            if all(runs[ref][s].get(k) is not None and per_seed[s].get(k) is not None for s in seeds)
        }
    seeds = [s for s in runs.get("fkl", {}) if s in runs.get("rkl", {})]
    for key in ("g_head", "g_tail"):
        if seeds:
            out["fkl_over_rkl_steps_6_15"][key] = _mean_std(
                [
                    statistics.fmean(
                        a / b
                        for a, b in zip(
                            runs["fkl"][s]["history"][key][5:15],
                            runs["rkl"][s]["history"][key][5:15],
                            strict=True,
                        )
                    )
                    for s in seeds
                ]
            )
    return out


def table(summary: dict) -> str:
    greedy = all("rouge_l_greedy" in agg for agg in summary["methods"].values())
    g_head = " greedy Rouge-L |" if greedy else ""
    rows = [
        f"| Method | seeds | Rouge-L |{g_head} distinct-1 | distinct-2 | KL(teacher‖student) | student CE |",
        "|---|---|---|" + ("---|" if greedy else "") + "---|---|---|---|",
    ]
    t = summary.get("teacher")
    if t:
        g_t = (
            f" {t['rouge_l_greedy']:.2f} |"
            if greedy and t.get("rouge_l_greedy") is not None
            else (" - |" if greedy else "")
        )
        rows.append(
            f"| Teacher | - | {t['rouge_l']:.2f} (± {t['rouge_l_std']:.2f} over sampling seeds) |{g_t} "
            f"{t['distinct_1']:.3f} | {t['distinct_2']:.3f} | 0 | {t['val_ce']:.3f} |"
        )
    for m, agg in summary["methods"].items():

        def f(k: str, d: int, agg: dict = agg) -> str:
            return f"{agg[k]['mean']:.{d}f} ± {agg[k]['std']:.{d}f}"

        g_m = f" {f('rouge_l_greedy', 2)} |" if greedy else ""
        rows.append(
            f"| {LABELS.get(m, m)} | {agg['rouge_l']['n']} | {f('rouge_l', 2)} |{g_m} {f('distinct_1', 3)} | "
            f"{f('distinct_2', 3)} | {f('val_kl', 3)} | {f('val_ce', 3)} |"
        )
    return "\n".join(rows)


# ----------------------------------------------------------------------------------------------
# command line


OVERRIDABLE = ("steps", "batch_size", "lr", "max_length", "eval_examples", "max_new_tokens", "num_layers")


def _override_values(args) -> dict:
    return {k: getattr(args, k) for k in OVERRIDABLE if getattr(args, k, None) is not None}


def _overrides(args) -> list[str]:
    return [x for k, v in _override_values(args).items() for x in (f"--{k.replace('_', '-')}", str(v))]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", choices=sorted(BUDGETS), default="cpu")
    p.add_argument("--task", choices=TASKS, default="demo", help="built-in dataset to train and test on")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3], help="training seeds")
    p.add_argument("--jobs", type=int, default=None, help="runs in parallel (default: the budget's)")
    p.add_argument("--out", type=Path, default=None, help="default out/compare (out/compare-TASK)")
    p.add_argument("--models-root", type=Path, default=ROOT / "out" / "models")
    p.add_argument("--aggregate-only", action="store_true")
    p.add_argument(
        "--teacher-cache",
        type=int,
        metavar="K",
        help="train from a top-K teacher cache of the training split (built once under --caches-root)",
    )
    p.add_argument("--caches-root", type=Path, default=ROOT / "out" / "caches")
    p.add_argument("--child", nargs=2, metavar=("METHOD", "SEED"), help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--max-length", type=int)
    p.add_argument("--eval-examples", type=int)
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--num-layers", type=int)
    args = p.parse_args(argv)
    if args.out is None:
        args.out = ROOT / "out" / ("compare" if args.task == "demo" else f"compare-{args.task}")
        if args.teacher_cache:
            args.out = args.out.with_name(f"{args.out.name}-cache-k{args.teacher_cache}")
    b = {**BUDGETS[args.budget], **_override_values(args)}
    if args.child:
        method, seed = args.child[0], int(args.child[1])
        d = run_dir(args.out, method, seed)
        if method == "teacher":
            run_teacher(b, d, args.models_root, args.task)
        else:
            run_one(method, seed, b, d, args.models_root, args.task, args.teacher_cache)
        return
    if args.aggregate_only:
        aggregate(args, args.out)
        return
    from akl_core import models

    models.prepare_preset(models.SMOLLM2, args.models_root)  # converts the GGUF once if needed
    if args.teacher_cache:  # once per (task, k, seed); a finished cache is kept
        args.out.mkdir(parents=True, exist_ok=True)
        builds_file = args.out / "build.json"
        builds = json.loads(builds_file.read_text()) if builds_file.is_file() else {}
        for seed in args.seeds:
            build = build_study_cache(
                args.task, b, args.teacher_cache, seed, args.caches_root, args.models_root
            )
            builds.setdefault(str(seed), build["wall_s"])
            builds_file.write_text(json.dumps(builds))
    t0 = time.time()
    run_study(args, args.out)
    print(f"study finished in {time.time() - t0:.0f}s", flush=True)
    aggregate(args, args.out)


if __name__ == "__main__":
    main()
