"""Divergence fwd+bwd on one GPU: ours (Triton kernel and PyTorch path) against Liger-Kernel.

Issue 15's shape: BT = 8192 tokens, H = 4096, V = 128256 (Llama-3), bf16. Groups:
- fused (and chunked, run last): lm_head + divergence from hidden states and weights. Ours
  ``compute_fused`` (akl, fkl; Triton kernel and PyTorch path), Liger's ``LigerFusedLinearJSD`` (Triton; beta 0.5 = JSD,
  beta 0 = its fused linear forward KL) and its chunked ``LigerFusedLinearJSDLoss`` (soft loss only);
- logits: ``compute`` on (BT, V) bf16 logits (akl, fkl; Triton kernel and PyTorch path).
Inputs are random (no real teacher fits in the kit): hidden states N(0, 1) with a third of the
teacher's rows scaled x4 (peaked rows, top-1 > mu) and a third x0.5 (flat rows); weights scaled
so the logits' std is about 2.5. The teacher statistics of that mix are reported with the table.

Per variant: ms (median of --repeats timed fwd+bwd after one warm-up, CUDA events) and peak GB
above the inputs (max_memory_allocated minus what was allocated before). Writes JSON after every
variant, so a stage killed by its timeout keeps what it measured.

  python bench/gpu_divergences.py                       # the issue's shape on CUDA
  python bench/gpu_divergences.py --small --device cpu  # dry run (AKL_TRITON=1 TRITON_INTERPRET=1)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

from akl_core.divergences import compute
from akl_core.fused import compute_fused


def _inputs(n: int, h: int, v: int, dtype, device, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    th = torch.randn(n, h, generator=g)
    th[0::3] *= 4.0  # peaked rows
    th[1::3] *= 0.5  # flat rows
    sh = 0.7 * th + 0.7 * torch.randn(n, h, generator=g)
    tw = randn(v, h, scale=2.5 / h**0.5)
    sw = randn(v, h, scale=2.5 / h**0.5)
    labels = torch.randint(0, v, (n,), generator=g).to(device)
    return sh.to(device=device, dtype=dtype), sw, th.to(device=device, dtype=dtype), tw, labels


@torch.no_grad()
def teacher_stats(th, tw, rows: int = 1024) -> dict:
    """Share of tokens whose teacher top-1 p > 0.5, and mean entropy (nats), chunk by chunk."""
    top, ent = 0, 0.0
    for i in range(0, th.shape[0], rows):
        logp = torch.log_softmax((th[i : i + rows] @ tw.t()).float(), -1)
        top += int((logp.amax(-1) > -0.6931471805599453).sum())
        ent += float(-(logp.exp() * logp).sum())
    return {"top1_above_half": top / th.shape[0], "mean_entropy": ent / th.shape[0]}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(fn: Callable[[], None], device, repeats: int) -> dict:
    """ms (median) and peak GB above what is allocated before the first call."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        _sync(device)
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    fn()  # warm-up (Triton / torch.compile compile here)
    _sync(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    out = {"ms": statistics.median(times), "ms_all": times}
    if device.type == "cuda":
        out["peak_gb_above_inputs"] = (torch.cuda.max_memory_allocated() - base) / 1e9
    return out


def _fused_ours(name: str, triton: bool, sh, sw, th, tw, labels, stats: dict):
    def fn():
        os.environ["AKL_TRITON"] = "1" if triton else "0"
        a, b = sh.detach().requires_grad_(), sw.detach().requires_grad_()
        out = compute_fused(name, a, b, th, tw, labels)
        out.loss_sum.backward()
        stats.update(out.stats)
        del a, b, out

    return fn


def _logits_ours(name: str, triton: bool, s, t, labels, stats: dict):
    def fn():
        os.environ["AKL_TRITON"] = "1" if triton else "0"
        x = s.detach().requires_grad_()
        out = compute(name, x, t, labels)
        out.loss_sum.backward()
        stats.update(out.stats)
        del x, out

    return fn


def _liger(kind: str, sh, sw, th, tw, labels):
    if kind.startswith("liger-jsd-chunked"):
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        loss = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.5)
    else:
        from liger_kernel.transformers.fused_linear_jsd import LigerFusedLinearJSD

        loss = LigerFusedLinearJSD(jsd_beta=0.0 if kind == "liger-fused-linear-kl" else 0.5)

    def fn():
        a, b = sh.detach().requires_grad_(), sw.detach().requires_grad_()
        loss(a, b, th, tw, labels).backward()
        del a, b

    return fn


FUSED = (
    "ours-akl-triton",
    "ours-fkl-triton",
    "ours-akl-torch",
    "liger-fused-linear-jsd",
    "liger-fused-linear-kl",
)
LOGITS = ("ours-akl-triton", "ours-fkl-triton", "ours-akl-torch", "ours-fkl-torch")
# last: torch.compile makes its first call slow, and a stage timeout then loses nothing else
CHUNKED = ("liger-jsd-chunked",)
GROUPS = {"fused": FUSED, "logits": LOGITS, "chunked": CHUNKED}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--small", action="store_true", help="dry-run shape: 16 x 32 x 509, fp32")
    ap.add_argument("--groups", default="fused,logits,chunked")
    ap.add_argument("--json", type=Path, default=Path("bench/results/gpu-divergences.json"))
    args = ap.parse_args(argv)
    if args.small:
        args.tokens, args.hidden, args.vocab, args.repeats = 16, 32, 509, 1
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    meta = {
        "tokens": args.tokens,
        "hidden": args.hidden,
        "vocab": args.vocab,
        "dtype": str(dtype),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "inputs": "random (see bench/gpu_divergences.py): no real teacher in the kit",
    }
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        meta["triton"] = None
    try:
        from importlib.metadata import version

        import liger_kernel  # noqa: F401

        meta["liger_kernel"] = version("liger-kernel")
    except Exception as exc:  # not installed: the Liger rows are skipped
        meta["liger_kernel"] = f"not importable: {exc}"
    results: dict = {"meta": meta, "rows": []}

    def save():
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))

    sh, sw, th, tw, labels = _inputs(args.tokens, args.hidden, args.vocab, dtype, device)
    meta["teacher"] = teacher_stats(th, tw)
    print("teacher:", meta["teacher"], flush=True)
    groups = args.groups.split(",")
    for group in groups:
        variants = GROUPS[group]
        if group == "logits":
            with torch.no_grad():
                s, t = sh @ sw.t(), th @ tw.t()  # (BT, V) each
        for variant in variants:
            row = {"group": group, "variant": variant}
            stats: dict = {}
            try:
                if variant.startswith("ours"):
                    _, name, path = variant.split("-")
                    if group != "logits":
                        fn = _fused_ours(name, path == "triton", sh, sw, th, tw, labels, stats)
                    else:
                        fn = _logits_ours(name, path == "triton", s, t, labels, stats)
                else:
                    fn = _liger(variant, sh, sw, th, tw, labels)
                row.update(measure(fn, device, args.repeats))
                if stats:
                    row["stats"] = dict(stats)
            except Exception as exc:  # one failing variant must not lose the others
                row["error"] = f"{type(exc).__name__}: {exc}"[:600]
                traceback.print_exc()
            finally:
                fn = None
            results["rows"].append(row)
            save()
            print(_fmt(row), flush=True)
    print(table(results))
    print(f"wrote {args.json}")


def _fmt(row: dict) -> str:
    if "error" in row:
        return f"{row['group']:<7} {row['variant']:<24} error: {row['error'][:120]}"
    peak = row.get("peak_gb_above_inputs")
    peak_s = f"{peak:8.2f}" if peak is not None else "       -"
    return f"{row['group']:<7} {row['variant']:<24} {row['ms']:10.1f} {peak_s}"


def table(results: dict) -> str:
    m = results["meta"]
    lines = [
        f"{m['device']}, torch {m['torch']}, triton {m['triton']}, liger {m['liger_kernel']}",
        f"BT {m['tokens']} x H {m['hidden']} x V {m['vocab']}, {m['dtype']}, {m['inputs']}",
        f"teacher: top-1 p > 0.5 on {m['teacher']['top1_above_half']:.0%} of tokens, "
        f"mean entropy {m['teacher']['mean_entropy']:.2f} nats",
        f"{'group':<7} {'variant':<24} {'ms':>10} {'peak GB':>8}",
    ]
    lines += [_fmt(r) for r in results["rows"]]
    akl = next((r for r in results["rows"] if r["variant"] == "ours-akl-triton" and "stats" in r), None)
    if akl:
        st = akl["stats"]
        lines.append(
            "teacher stats (ours, per token): "
            + ", ".join(f"{k} {st[k]:.3f}" for k in ("head_size", "w_head", "fkl", "rkl") if k in st)
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
