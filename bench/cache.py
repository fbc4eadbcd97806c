"""Teacher caches, measured on the real teacher (SmolLM2-135M-Instruct) and the demo data.

  python bench/cache.py                      # all three parts; caches under .akl/bench-cache (gitignored)
  python bench/cache.py --parts bytes,dtype  # skip the training runs

1. bytes: caches built by ``build_cache`` at k = 16, 64, 256 over the first demo training
   examples: bytes per response token from the manifest, against dense fp16 logits (2 V bytes).
2. dtype: the stored log-probs as float16 or bfloat16: KL(exact || stored) of the k + 1 outcome
   distribution (renormalised, as the sparse loss reads it), the exact one from float64 logits.
3. train: the demo's student and shapes (examples/demo.yaml: 15 layers truncated from the
   teacher, batch 4, max_length 128, chat format), trained by ``python -m akl_core.runner`` from the online
   teacher and from the k = 64 cache, interleaved, each in its own process: tokens/s (median over
   the steps after the first) and the process's peak RSS (``wait4``'s ru_maxrss).
The machine's load average is recorded beside each part: the numbers are only comparable within
one run. Prints tables and writes JSON (bench/results/cache.json).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

TEACHER = "preset:smollm2-135m-instruct"


def _parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default="bytes,dtype,train")
    p.add_argument("--ks", default="16,64,256")
    p.add_argument("--examples", type=int, default=48, help="demo training examples cached at k = 64")
    p.add_argument("--small-examples", type=int, default=16, help="examples cached at the other k")
    p.add_argument("--dtype-examples", type=int, default=8, help="validation examples for the dtype part")
    p.add_argument("--steps", type=int, default=6, help="optimizer steps per training run")
    p.add_argument("--repeats", type=int, default=2, help="interleaved rounds of (online, cache)")
    p.add_argument("--work", type=Path, default=Path(".akl/bench-cache"))
    p.add_argument("--json", type=Path, default=Path("bench/results/cache.json"))
    return p.parse_args(argv)


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _subset(work: Path, n: int) -> Path:
    """The first n demo training examples in the demo's chat format (scripts/demo.sh)."""
    from akl_core import data
    from akl_core.formats import as_chat

    lines = [
        json.dumps({"messages": as_chat(ex).messages}) for ex in data.read_examples("demo:train", limit=n)
    ]
    path = work / f"train-chat-{n}.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _demo_lengths() -> dict:
    """max_length and max_prompt_length of examples/demo.yaml (a cache must match the job's)."""
    import yaml

    training = yaml.safe_load(Path("examples/demo.yaml").read_text())["training"]
    return {"max_length": training["max_length"], "max_prompt_length": training["max_prompt_length"]}


def _cache_spec(train: Path, k: int):
    from akl_core.cache_spec import CacheSpec

    return CacheSpec.model_validate(
        {
            "teacher": TEACHER,
            "data": {"train": str(train), **_demo_lengths()},
            "top_k": k,
            "evaluation": {"num_examples": 0},
        }
    )


# -- 1. bytes per token --------------------------------------------------------------------------


def bench_bytes(args, ks: list[int]) -> list[dict]:
    from akl_core.cache_builder import build_cache

    rows = []
    for k in ks:
        n = args.examples if k == 64 else args.small_examples
        train = _subset(args.work, n)
        load = _load()
        t0 = time.perf_counter()
        result = build_cache(_cache_spec(train, k), args.work / "caches" / f"k{k}")
        seconds = time.perf_counter() - t0
        m = result["manifest"]
        rows.append(
            {
                "k": k,
                "examples": m["examples"],
                "tokens": m["tokens"],
                "bytes": m["bytes"],
                "bytes_per_token": m["bytes_per_token"],
                "payload_bytes_per_token": 2 * k + 2 * k + 4,  # uint16 ids + fp16 log-probs + fp32 tail
                "dense_fp16_bytes_per_token": 2 * m["vocab_size"],
                "build_seconds": seconds,
                "load_avg": load,
            }
        )
    print("\n1. bytes per response token (SmolLM2-135M, V = 49152)")
    print(
        f"{'k':>5} {'examples':>8} {'tokens':>7} {'B/token':>8} {'payload':>8} {'dense fp16':>10} {'ratio':>6}"
    )
    for r in rows:
        ratio = r["dense_fp16_bytes_per_token"] / r["bytes_per_token"]
        print(
            f"{r['k']:>5} {r['examples']:>8} {r['tokens']:>7} {r['bytes_per_token']:>8.1f} "
            f"{r['payload_bytes_per_token']:>8} {r['dense_fp16_bytes_per_token']:>10} {ratio:>5.0f}x"
        )
    return rows


# -- 2. the stored dtype -------------------------------------------------------------------------


def bench_dtype(args, ks: list[int]) -> list[dict]:
    import torch

    from akl_core import data, models
    from akl_core.batches import collate
    from akl_core.steps import ResponseLogits
    from akl_core.teacher_cache import reconstruct

    path = models.resolve_model_ref(TEACHER)
    tok = models.load_tokenizer(path)
    teacher = models.load_teacher(path)
    examples = data.read_examples("demo:validation", limit=args.dtype_examples)
    rows = data.tokenize_examples(examples, tok, 192, 128)
    batch = collate(rows, tok.pad_token_id)
    with torch.no_grad():
        logits, _ = ResponseLogits(teacher)(batch["input_ids"], batch["attention_mask"], batch["labels"])
    exact = torch.log_softmax(logits.double(), -1)  # (N, V) float64
    del teacher, logits
    out = []
    for k in ks:
        top, ids = exact.topk(k, -1)
        tail = torch.logsumexp(exact.scatter(-1, ids, float("-inf")), -1)
        p = torch.cat([top, tail[:, None]], -1)  # the exact k + 1 distribution
        for name, dtype in (("float16", torch.float16), ("bfloat16", torch.bfloat16)):
            stored = top.float().to(dtype).float()
            raw_sum = torch.cat([stored.double(), tail[:, None]], -1).exp().sum(-1)
            lp, lt = reconstruct(stored, tail.float())
            q = torch.cat([lp.double(), lt.double()[:, None]], -1)
            kl = (p.exp() * (p - q)).sum(-1)
            out.append(
                {
                    "k": k,
                    "dtype": name,
                    "tokens": int(p.shape[0]),
                    "kl_mean": float(kl.mean()),
                    "kl_max": float(kl.max()),
                    "max_abs_sum_error": float((raw_sum - 1).abs().max()),
                    "tail_mass_mean": float(tail.exp().mean()),
                }
            )
    print(f"\n2. stored log-probs: KL(exact || stored) over the k + 1 outcomes ({out[0]['tokens']} tokens)")
    print(f"{'k':>5} {'dtype':>9} {'KL mean':>10} {'KL max':>10} {'|sum-1| max':>12} {'tail mass':>9}")
    for r in out:
        print(
            f"{r['k']:>5} {r['dtype']:>9} {r['kl_mean']:>10.2e} {r['kl_max']:>10.2e} "
            f"{r['max_abs_sum_error']:>12.2e} {r['tail_mass_mean']:>9.3f}"
        )
    return out


# -- 3. training throughput and memory -----------------------------------------------------------


def _job(teacher: str, train: Path, steps: int) -> dict:
    import yaml

    spec = yaml.safe_load(Path("examples/demo.yaml").read_text())
    spec["teacher"] = teacher
    spec["data"] = {"train": str(train)}
    spec["training"].update(max_steps=steps, warmup_steps=0)
    spec["evaluation"] = {"num_examples": 0}
    spec["checkpointing"] = {"every_steps": 0}
    spec["resources"] = {"device": "cpu"}
    return spec


def _train_once(args, name: str, spec: dict, run: int) -> dict:
    out = args.work / "runs" / f"{name}-{run}"
    spec_path = args.work / f"{name}.json"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "AKL_CACHES_ROOT": str((args.work / "caches").resolve())}
    load = _load()
    cmd = [sys.executable, "-m", "akl_core.runner", str(spec_path), str(out), "--no-resume"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    lines = proc.stdout.read().splitlines() if proc.stdout else []
    _, status, usage = os.wait4(proc.pid, 0)
    events = [json.loads(line) for line in lines]
    steps = [e for e in events if e["type"] == "step"]
    if os.waitstatus_to_exitcode(status) != 0 or not steps:
        raise RuntimeError(f"{name} run failed: {events[-1:]}")
    timed = steps[1:] or steps
    return {
        "variant": name,
        "run": run,
        "tokens_per_s": statistics.median(e["tokens_per_s"] for e in timed),
        "steps": len(steps),
        "peak_rss_mib": usage.ru_maxrss / 1024,  # KiB on Linux
        "load_avg": load,
    }


def bench_train(args) -> dict:
    from akl_core import models

    train = _subset(args.work, args.examples)  # the k = 64 cache's data
    name = f"k64-chat-{args.examples}"  # the cache's data and lengths are the job's
    if not (args.work / "caches" / name / "manifest.json").is_file():
        from akl_core.cache_builder import build_cache

        build_cache(_cache_spec(train, 64), args.work / "caches" / name)
    variants = {
        "online": _job(TEACHER, train, args.steps),
        "cache-k64": _job(f"cache:{name}", train, args.steps),
    }
    runs = [_train_once(args, name, spec, r) for r in range(args.repeats) for name, spec in variants.items()]
    teacher_dir = models.resolve_model_ref(TEACHER)
    weights = sum(f.stat().st_size for f in teacher_dir.glob("*.safetensors")) / 2**20
    summary = {}
    for name in variants:
        mine = [r for r in runs if r["variant"] == name]
        summary[name] = {
            "tokens_per_s": max(r["tokens_per_s"] for r in mine),  # the fastest round (shared machine)
            "peak_rss_mib": min(r["peak_rss_mib"] for r in mine),
        }
    speedup = summary["cache-k64"]["tokens_per_s"] / summary["online"]["tokens_per_s"]
    print("\n3. training on the demo's student and shapes (examples/demo.yaml), CPU")
    print(f"{'variant':>10} {'run':>3} {'tokens/s':>9} {'peak RSS MiB':>13} {'load avg':>18}")
    for r in runs:
        print(
            f"{r['variant']:>10} {r['run']:>3} {r['tokens_per_s']:>9.1f} {r['peak_rss_mib']:>13.0f} "
            f"{str(r['load_avg']):>18}"
        )
    rss_gap = summary["online"]["peak_rss_mib"] - summary["cache-k64"]["peak_rss_mib"]
    print(
        f"speed-up from the cache: {speedup:.2f}x (best rounds); peak RSS {rss_gap:.0f} MiB lower; "
        f"the teacher's weights are {weights:.0f} MiB"
    )
    return {"runs": runs, "summary": summary, "speedup": speedup, "teacher_weights_mib": weights}


def main(argv=None) -> None:
    args = _parse(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    parts = set(args.parts.split(","))
    ks = [int(k) for k in args.ks.split(",")]
    result: dict = {"teacher": TEACHER, "cpu_count": os.cpu_count(), "load_avg_start": _load()}
    if "bytes" in parts:
        result["bytes"] = bench_bytes(args, ks)
    if "dtype" in parts:
        result["dtype"] = bench_dtype(args, ks)
    if "train" in parts:
        result["train"] = bench_train(args)
    result["load_avg_end"] = _load()
    if args.json.is_file() and parts != {"bytes", "dtype", "train"}:  # keep the parts not rerun
        result = {**json.loads(args.json.read_text()), **result}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"\nload average: {result['load_avg_start']} at the start, {result['load_avg_end']} at the end")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
