"""Throughput and peak memory of one distillation step: ours against TRL's GKDTrainer.

Same teacher, same student (truncated from the teacher), same batch and sequence length, in one
run; each variant runs in its own child process so that peak memory is its own. A step is teacher
forward + student forward + loss + backward + gradient clipping + AdamW.

  python bench/train_step.py                       # preset:tiny teacher, 2-layer student
  python bench/train_step.py --teacher preset:smollm2-135m-instruct --layers 6 --batch 4 --seq-len 192

Variants: ours-akl (AKL + CE, kd_ratio 0.5, the product), ours-fkl (forward KL only, kd_ratio 1),
ours-akl-fused (fused lm_head + AKL), trl-gkd (GKDTrainer, beta 0 = forward KL, lmbda 0: no
on-policy generation). TRL is skipped when it is not importable (it is not a project dependency).
Peak memory: CUDA max_memory_allocated, or on CPU the process's peak RSS during the timed steps
(VmHWM after resetting it through /proc/self/clear_refs). Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = ("ours-akl", "ours-fkl", "ours-akl-fused", "trl-gkd")


def _parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default="preset:tiny")
    p.add_argument("--layers", type=int, default=2, help="student layers (truncated from the teacher)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--device", default="auto")
    p.add_argument("--models-root", type=Path, default=None)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument(
        "--repeats",
        type=int,
        default=2,
        help="rounds over all variants, interleaved; the fastest round counts (shared machines)",
    )
    p.add_argument("--json", type=Path, default=Path("bench/results/train_step.json"))
    p.add_argument("--only", default=None, help=argparse.SUPPRESS)  # child mode: one variant
    return p.parse_args(argv)


# -- shared set-up -------------------------------------------------------------------------------


def _setup(args):
    import torch

    from akl_core import batches, data, models, students
    from akl_core.spec import StudentSpec

    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    path = models.resolve_model_ref(args.teacher, models_root=args.models_root)
    tok = models.load_tokenizer(path)
    teacher = models.load_teacher(
        path, dtype=torch.bfloat16 if device.type == "cuda" else None, device=device
    )
    student = students.build_student(
        StudentSpec(init="truncate", num_layers=args.layers), path, args.models_root
    )
    student = student.to(device=device, dtype=torch.float32)
    examples = data.read_examples("demo:train", "auto", args.batch * 4)
    rows = data.tokenize_examples(examples, tok, args.seq_len, args.seq_len // 2)
    rows = sorted(rows, key=lambda r: -len(r["input_ids"]))[: args.batch]  # the longest: ~seq_len each
    batch = {k: v.to(device) for k, v in batches.collate(rows, tok.pad_token_id).items()}
    return torch, device, tok, teacher, student, batch


def _reset_peak(torch, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        except OSError:
            pass


def _peak_mib(torch, device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _time(torch, device, step, args) -> tuple[float, float]:
    for _ in range(args.warmup):
        step()
    _reset_peak(torch, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / args.steps, _peak_mib(torch, device)


# -- the variants --------------------------------------------------------------------------------


def _ours(args, name: str, kd_ratio: float, fused: bool) -> dict:
    torch, device, tok, teacher, student, batch = _setup(args)
    from akl_core import optim, steps
    from akl_core.ddp import DistInfo
    from akl_core.spec import load_spec

    spec = load_spec(
        {
            "teacher": args.teacher,
            "data": {"train": "demo:train"},
            "loss": {"name": name, "kd_ratio": kd_ratio, "fused": fused},
            "training": {
                "max_steps": 10**6,
                "learning_rate": 1e-5,
                "max_length": args.seq_len,
                "max_prompt_length": args.seq_len // 2,
            },
        }
    )
    s, t = steps.ResponseLogits(student, fused), steps.ResponseLogits(teacher, fused)
    opt, sched = optim.make_optimizer(student, spec, 10**6, device)
    vocab = min(
        teacher.get_output_embeddings().weight.shape[0], student.get_output_embeddings().weight.shape[0]
    )
    ctx = steps.StepContext(s, t, spec, vocab, DistInfo(), device)

    def step():
        steps.train_step(ctx, [batch], opt, sched)

    return _result(torch, device, step, args, batch)


def _trl(args) -> dict:
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    try:
        from datasets import Dataset
        from datasets.table import InMemoryTable
        from trl.experimental.gkd import GKDConfig, GKDTrainer
    except ImportError as exc:
        return {"skipped": f"trl not importable: {exc}"}
    import tempfile

    torch, device, tok, teacher, student, batch = _setup(args)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = GKDConfig(
            output_dir=tmp,
            per_device_train_batch_size=args.batch,
            beta=0.0,
            lmbda=0.0,
            seq_kd=False,
            max_length=args.seq_len,
            learning_rate=1e-5,
            report_to=[],
            use_cpu=device.type == "cpu",
            bf16=device.type == "cuda",
            max_grad_norm=1.0,
            save_strategy="no",
            logging_strategy="no",
        )
        rows = [
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
        ] * 4
        # an explicit fingerprint: datasets' own hashes the table with dill, which failed on
        # pyarrow 26 ("Can't pickle MonthDayNano"); the dataset is only a placeholder here
        ds = Dataset(InMemoryTable.from_pylist(rows), fingerprint="akl-bench-gkd")
        gkd = GKDTrainer(
            model=student, teacher_model=teacher, args=cfg, train_dataset=ds, processing_class=tok
        )
        gkd.create_optimizer_and_scheduler(num_training_steps=10**6)
        model = gkd.model
        model.train()
        n_items = int((batch["labels"][:, 1:] != -100).sum())

        def step():
            inputs = dict(batch)
            gkd.training_step(model, inputs, num_items_in_batch=torch.tensor(n_items, device=device))
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            gkd.optimizer.step()
            gkd.lr_scheduler.step()
            gkd.optimizer.zero_grad(set_to_none=True)

        return _result(torch, device, step, args, batch)


def _result(torch, device, step, args, batch) -> dict:
    sec, peak = _time(torch, device, step, args)
    tokens = int(batch["attention_mask"].sum())
    return {
        "step_s": sec,
        "tokens_per_s": tokens / sec,
        "peak_mib": peak,
        "tokens": tokens,
        "valid_tokens": int((batch["labels"][:, 1:] != -100).sum()),
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
    }


def run_variant(args, variant: str) -> dict:
    if variant == "ours-akl":
        return _ours(args, "akl", 0.5, False)
    if variant == "ours-fkl":
        return _ours(args, "fkl", 1.0, False)
    if variant == "ours-akl-fused":
        return _ours(args, "akl", 0.5, True)
    if variant == "trl-gkd":
        return _trl(args)
    raise ValueError(f"unknown variant {variant}")


def main(argv=None) -> None:
    args = _parse(argv)
    if args.only:
        print("RESULT " + json.dumps(run_variant(args, args.only)), flush=True)
        return
    results: dict[str, dict] = {}
    passthrough = list(argv if argv is not None else sys.argv[1:])
    for _ in range(args.repeats):
        for variant in args.variants.split(","):
            proc = subprocess.run(
                [sys.executable, __file__, *passthrough, "--only", variant], capture_output=True, text=True
            )
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            r = json.loads(lines[-1][7:]) if lines else {"skipped": proc.stderr[-800:]}
            old = results.get(variant)
            if old is None or ("step_s" in r and ("step_s" not in old or r["step_s"] < old["step_s"])):
                results[variant] = r
    base = results.get("trl-gkd", {}).get("tokens_per_s")
    print(f"\nteacher {args.teacher}, student {args.layers} layers, batch {args.batch} x seq {args.seq_len}")
    print(f"{'variant':<16}{'step s':>9}{'tokens/s':>11}{'peak MiB':>10}{'vs TRL':>8}")
    for variant, r in results.items():
        if "skipped" in r:
            print(f"{variant:<16} skipped: {r['skipped'].strip().splitlines()[-1] if r['skipped'] else ''}")
            continue
        ratio = f"{r['tokens_per_s'] / base:.2f}x" if base else "-"
        print(f"{variant:<16}{r['step_s']:>9.3f}{r['tokens_per_s']:>11.0f}{r['peak_mib']:>10.0f}{ratio:>8}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps({"config": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=2)
    )
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
