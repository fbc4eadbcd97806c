"""Benchmark: forward + backward time and peak memory of the distillation divergences.

    python bench/divergences.py                      # real logits, then the full grid (slow on a CPU)
    python bench/divergences.py --real-only          # real logits only: AKL / FKL at T = 1 and T = 2
    python bench/divergences.py --no-real --tokens 1024 --vocab 32000 --repeats 1   # a quick look

First, real logits (bench/real_logits.py): SmolLM2-135M-Instruct as teacher and its 6-layer
truncation as student, teacher-forced on the demo validation responses (the first 1450 response
tokens, V = 49152), at T = 1 and T = 2: the teacher's statistics (top-1 > 0.5 share, mean
entropy, AKL head sizes), then our FKL, FKL+RKL, AKL (and torchtune's FKL at T = 1) timed in
turn, the median over rounds of each one's ratio to our FKL in the same round.

Then, on synthetic logits, for each shape (N tokens, V vocabulary) it measures, in one process:
- floor: one pass of memory traffic over the same logits (read student and teacher, write a
  gradient), the least any fwd+bwd can cost;
- straight_akl: AKL as the authors compute it (full sort, plain autograd), from the formulas;
- ours_unchunked / ours_chunked: ``akl_core.divergences.compute`` with one chunk / the default;
- ours_fused: ``akl_core.fused.compute_fused`` from hidden states (includes the lm_head matmuls),
  beside lmhead_chunked, the same matmuls in plain autograd followed by ``compute``;
- peers when importable: torchtune's ForwardKLLoss / ReverseKLLoss (its kd_losses.py file, loaded
  without the package, which needs torchao), TRL's GKD generalized_jsd_loss, Liger's
  LigerFusedLinearJSDLoss (compiled=False on CPU). A missing peer is skipped.
Peak memory is the growth of the process's resident set (VmHWM after clear_refs, glibc trimmed
between runs) on CPU, torch.cuda.max_memory_allocated on a GPU, over the inputs already held.
The synthetic logits are LLM-like but peaked (see make_logits). Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import importlib.util
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from akl_core.divergences import NAMES, compute
from akl_core.fused import compute_fused

# --------------------------------------------------------------------------------- inputs


def make_logits(n: int, v: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher logits with an LLM-like spread, and a student near them; (N, V) fp32 each.

    Per token: N(0, 1.5^2) noise plus 32 boosted tokens with Zipf-like logits scaled by a random
    sharpness. On 32000 tokens: top-1 > 0.5 on ~79% of tokens, mean entropy ~1.6 nats, head
    size 1 at the median and ~600 at the 99th percentile (a few flat tokens).
    """
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(n, v, generator=g).mul_(1.5)
    ids = torch.randint(0, v, (n, 32), generator=g)
    sharp = torch.rand(n, 1, generator=g) + 0.6
    t.scatter_add_(1, ids, sharp * (16.0 - 3.0 * torch.log1p(torch.arange(32.0))))
    s = torch.randn(n, v, generator=g).add_(t, alpha=0.8)
    return s, t


def make_hidden(n: int, v: int, h: int, seed: int = 0):
    """Hidden states and lm_head weights whose logits are peaked like make_logits' ones."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(v, h, generator=g) / math.sqrt(h)
    tw = torch.randn(v, h, generator=g) / math.sqrt(h)
    y = torch.randint(0, v, (n,), generator=g)
    alpha = 8.0 + 8.0 * torch.rand(n, 1, generator=g)
    th = alpha * tw[y] + torch.randn(n, h, generator=g)
    sh = 0.8 * alpha * w[y] + torch.randn(n, h, generator=g)
    return sh, w, th, tw


# --------------------------------------------------------------------------------- methods


def straight_akl(s, t, labels, mu: float = 0.5):
    """AKL the authors' way: full sort of p, several (N, V) tensors, autograd."""
    p, q = F.softmax(t.float(), -1), F.softmax(s.float(), -1)
    lp, lq = F.log_softmax(t.float(), -1), F.log_softmax(s.float(), -1)
    sorted_p, idx = p.sort(-1, descending=True)
    head_sorted = sorted_p.cumsum(-1) <= mu
    head_sorted[:, 0] = True
    head = torch.zeros_like(head_sorted).scatter_(-1, idx, head_sorted)
    gap = (p - q).abs()
    g_head, g_tail = (gap * head).sum(-1), (gap * ~head).sum(-1)
    w_head = (g_head / (g_head + g_tail)).detach()
    fkl, rkl = (p * (lp - lq)).sum(-1), (q * (lq - lp)).sum(-1)
    mask = labels != -100
    return ((w_head * fkl + (1 - w_head) * rkl) * mask).sum() / mask.sum()


def load_peers() -> dict[str, Callable]:
    peers: dict[str, Callable] = {}
    spec = importlib.util.find_spec("torchtune")
    if spec and spec.submodule_search_locations:
        path = Path(spec.submodule_search_locations[0]) / "modules" / "loss" / "kd_losses.py"
        mod_spec = importlib.util.spec_from_file_location("torchtune_kd_losses", path)
        mod = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(mod)
        peers["torchtune_fkl"] = mod.ForwardKLLoss()
        peers["torchtune_rkl"] = mod.ReverseKLLoss()
    try:
        import os

        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
        try:
            from trl.experimental.gkd import GKDTrainer
        except ImportError:
            from trl import GKDTrainer
        jsd = GKDTrainer.generalized_jsd_loss
        peers["trl_jsd"] = lambda s, t, y: jsd(s, t, labels=y, beta=0.5)
    except Exception as exc:  # noqa: BLE001 - any import failure skips the peer
        print(f"skip trl: {exc}", file=sys.stderr)
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        peers["liger_fused_jsd"] = LigerFusedLinearJSDLoss(
            weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.5, compiled=False
        )
    except Exception as exc:  # noqa: BLE001
        print(f"skip liger: {exc}", file=sys.stderr)
    return peers


# --------------------------------------------------------------------------------- measuring

_libc = ctypes.CDLL("libc.so.6") if platform.system() == "Linux" else None


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    return 0


def _reset_peak(device: torch.device) -> int:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    if _libc is not None:
        _libc.malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    return _rss_kb("VmRSS") * 1024


def _peak(device: torch.device, base: int) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    return _rss_kb("VmHWM") * 1024 - base


def measure(fn: Callable[[], torch.Tensor], device: torch.device, repeats: int) -> dict:
    """First run: peak memory (and warm-up); then the best of ``repeats`` timed runs."""
    base = _reset_peak(device)
    fn().backward()
    peak = _peak(device, base)
    times = []
    for _ in range(repeats):
        gc.collect()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return {"time_s": min(times), "peak_mb": peak / 2**20}


# Peak memory of each method in units of one (N, V) fp32 tensor, to skip what does not fit.
_UNITS = {
    "floor": 1,
    "straight_akl": 12,
    "ours_unchunked": 9,
    "ours_chunked": 1.2,
    "ours_fused": 0.3,
    "lmhead_chunked": 4,
    "torchtune_fkl": 6,
    "torchtune_rkl": 7,
    "trl_jsd": 9,
    "liger_fused_jsd": 0.5,
}


def run_shape(n, v, args, peers, device) -> list[dict]:
    s0, t0 = (x.to(device) for x in make_logits(n, v))
    labels = torch.zeros(n, dtype=torch.long, device=device)
    labels[::8] = -100  # some prompt tokens
    sh0, w0, th, tw = (x.to(device) for x in make_hidden(n, v, args.hidden))
    unit_gb = n * v * 4 / 2**30
    cases: list[tuple[str, str, Callable]] = [("floor", "-", None)]
    cases.append(("straight_akl", "akl", None))
    for name in args.names:
        cases += [("ours_unchunked", name, None), ("ours_chunked", name, None)]
    for name in args.fused_names:
        cases += [("ours_fused", name, None), ("lmhead_chunked", name, None)]
    cases += [(p, {"torchtune_fkl": "fkl", "torchtune_rkl": "rkl"}.get(p, "jsd"), None) for p in peers]
    rows = []
    for method, name, _ in cases:
        if args.methods and method not in args.methods:
            continue
        if unit_gb * (2 + _UNITS[method]) > args.max_gb:
            rows.append({"n": n, "v": v, "method": method, "name": name, "status": "skipped (memory)"})
            continue
        s = s0.clone().requires_grad_()
        sh, w = sh0.clone().requires_grad_(), w0.clone().requires_grad_()
        if method == "floor":
            out = torch.empty_like(s0)

            def fn(s=s, out=out):
                torch.add(s.detach(), t0, out=out)  # read student and teacher, write a gradient
                return s.sum() * 0  # a trivial backward

        elif method == "straight_akl":
            fn = lambda s=s: straight_akl(s, t0, labels)  # noqa: E731
        elif method == "ours_unchunked":
            fn = lambda s=s, name=name: compute(name, s, t0, labels, chunk_size=n).loss  # noqa: E731
        elif method == "ours_chunked":
            fn = lambda s=s, name=name: compute(name, s, t0, labels).loss  # noqa: E731
        elif method == "ours_fused":
            fn = lambda sh=sh, w=w, name=name: compute_fused(name, sh, w, th, tw, labels).loss  # noqa: E731
        elif method == "lmhead_chunked":
            fn = lambda sh=sh, w=w, name=name: compute(name, sh @ w.t(), th @ tw.t(), labels).loss  # noqa: E731
        elif method == "liger_fused_jsd":
            fn = lambda sh=sh, w=w, method=method: peers[method](sh, w, th, tw, labels)  # noqa: E731
        else:
            fn = lambda s=s, method=method: peers[method](s, t0, labels)  # noqa: E731
        try:
            res = measure(fn, device, args.repeats)
            rows.append({"n": n, "v": v, "method": method, "name": name, "status": "ok", **res})
        except Exception as exc:  # noqa: BLE001 - report and go on
            rows.append({"n": n, "v": v, "method": method, "name": name, "status": f"error: {exc}"[:200]})
        print(_fmt_row(rows[-1]), file=sys.stderr, flush=True)
        del fn, s, sh, w
    return rows


def interleaved_ratios(
    s0: torch.Tensor,
    t0: torch.Tensor,
    labels: torch.Tensor,
    rounds: int,
    peers: dict,
    device,
    temperature=1.0,
) -> dict:
    """Times of a few methods run in turn, ``rounds`` times (fair under a changing load).

    Reports the best time of each and the median over rounds of its ratio to our FKL in the
    same round (the methods of a round ran seconds apart).
    """
    fns = {
        f"ours_chunked:{name}": (
            lambda name=name, s=None: compute(name, s, t0, labels, temperature=temperature).loss
        )
        for name in ("fkl", "fkl_rkl", "akl")
    }
    if "torchtune_fkl" in peers and temperature == 1.0:  # it has no temperature
        fns["torchtune_fkl:fkl"] = lambda s=None: peers["torchtune_fkl"](s, t0, labels)
    all_s: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for key, fn in fns.items():
            s = s0.clone().requires_grad_()
            gc.collect()
            start = time.perf_counter()
            fn(s=s).backward()
            if device.type == "cuda":
                torch.cuda.synchronize()
            all_s[key].append(time.perf_counter() - start)
    ratios = {
        k: statistics.median(a / b for a, b in zip(ts, all_s["ours_chunked:fkl"], strict=True))
        for k, ts in all_s.items()
    }
    n, v = s0.shape
    best = {k: min(ts) for k, ts in all_s.items()}
    return {
        "n": n,
        "v": v,
        "temperature": temperature,
        "rounds": rounds,
        "best_s": best,
        "median_ratio_to_fkl": ratios,
    }


def synthetic_interleaved(n: int, v: int, rounds: int, peers: dict, device) -> dict:
    s0, t0 = (x.to(device) for x in make_logits(n, v))
    labels = torch.zeros(n, dtype=torch.long, device=device)
    labels[::8] = -100
    return interleaved_ratios(s0, t0, labels, rounds, peers, device)


def real_group(args, peers: dict, device) -> list[dict]:
    """AKL / FKL on the real teacher's and truncated student's logits, at T = 1 and T = 2."""
    import real_logits  # bench/real_logits.py, beside this script

    s0, t0 = real_logits.load(args.real_cache, args.models_root)
    s0, t0 = (x[: args.real_tokens].to(device) for x in (s0, t0))
    labels = torch.zeros(s0.shape[0], dtype=torch.long, device=device)
    out = []
    for temperature in (1.0, 2.0):
        stats = real_logits.teacher_stats(t0, temperature)
        res = interleaved_ratios(s0, t0, labels, args.real_rounds, peers, device, temperature)
        res["teacher"] = stats
        out.append(res)
        print(_fmt_real(res), flush=True)
    return out


def _fmt_real(res: dict) -> str:
    st = res["teacher"]
    ratios = ", ".join(
        f"{k.split(':')[0].replace('ours_chunked', 'ours')}:{k.split(':')[1]} {x:.2f}x"
        for k, x in res["median_ratio_to_fkl"].items()
    )
    return (
        f"real logits N={res['n']} V={res['v']} T={res['temperature']:g}: teacher top-1 > 0.5 on "
        f"{100 * st['top1_above_half']:.0f}% of tokens, mean entropy {st['mean_entropy_nats']:.2f} nats, "
        f"AKL head size median {st['head_size_median']:.0f} / p90 {st['head_size_p90']:.0f} / max "
        f"{st['head_size_max']:.0f}; our FKL best {res['best_s']['ours_chunked:fkl']:.3f} s; median "
        f"per-round ratio to our FKL ({res['rounds']} rounds): {ratios}"
    )


def _fmt_row(r: dict) -> str:
    if r["status"] != "ok":
        return f"{r['n']:>5} {r['v']:>6}  {r['method'] + ':' + r['name']:<24} {r['status']}"
    return f"{r['n']:>5} {r['v']:>6}  {r['method'] + ':' + r['name']:<24} {r['time_s']:8.3f} s {r['peak_mb']:9.0f} MiB"


def table(rows: list[dict]) -> str:
    """Markdown: one line per method and divergence, time / peak / time vs ours_chunked:fkl."""
    lines = [
        "| N | V | method | divergence | fwd+bwd s | x our FKL | peak MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ref = next(
            (
                x
                for x in rows
                if (x["n"], x["v"], x["method"], x["name"]) == (r["n"], r["v"], "ours_chunked", "fkl")
                and x["status"] == "ok"
            ),
            None,
        )
        if r["status"] != "ok":
            lines.append(f"| {r['n']} | {r['v']} | {r['method']} | {r['name']} | {r['status']} | | |")
            continue
        ratio = f"{r['time_s'] / ref['time_s']:.2f}" if ref else ""
        lines.append(
            f"| {r['n']} | {r['v']} | {r['method']} | {r['name']} | {r['time_s']:.3f} | {ratio} | {r['peak_mb']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--vocab", type=int, nargs="+", default=[32000, 49152, 128256])
    ap.add_argument("--names", nargs="+", default=list(NAMES), choices=NAMES)
    ap.add_argument("--fused-names", nargs="+", default=["fkl", "akl", "jsd"], choices=NAMES)
    ap.add_argument("--methods", nargs="+", default=None, choices=sorted(_UNITS), help="default: all")
    ap.add_argument("--hidden", type=int, default=256, help="hidden size of the fused-path inputs")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs after the first (best is kept)")
    ap.add_argument(
        "--max-gb", type=float, default=8.0, help="skip a method whose estimated memory is larger"
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: on a loaded 2-core box 2 threads thrash, ~5x noisier); 0 = torch's default",
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument(
        "--interleave",
        type=int,
        default=0,
        help="only time our fkl, fkl_rkl, akl and torchtune's FKL in turn, K rounds",
    )
    ap.add_argument("--out", type=Path, default=Path("bench/results/divergences.json"))
    real = ap.add_argument_group("real logits (measured first)")
    real.add_argument("--no-real", action="store_true", help="skip the real-logit group")
    real.add_argument("--real-only", action="store_true", help="only the real-logit group")
    real.add_argument("--real-tokens", type=int, default=1450, help="response tokens kept (the first N)")
    real.add_argument("--real-rounds", type=int, default=5, help="interleaved rounds per temperature")
    real.add_argument(
        "--real-cache",
        type=Path,
        default=Path("bench/results/real_logits.pt"),
        help="logits cache (built on first use: ~1.5 GB, a few minutes)",
    )
    real.add_argument(
        "--models-root", type=Path, default=None, help="where the teacher preset is (or is built)"
    )
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    peers = {} if args.no_peers else load_peers()
    # real logits first: synthetic rows are far more peaked and hid AKL's cost (issue 15)
    real = [] if args.no_real else real_group(args, peers, device)
    if args.real_only:
        _write(args, argv, device, {"real": real})
        return
    if args.interleave:
        synthetic = [
            synthetic_interleaved(n, v, args.interleave, peers, device)
            for n in args.tokens
            for v in args.vocab
        ]
        for res in synthetic:
            fkl = res["best_s"]["ours_chunked:fkl"]
            print(json.dumps(res), {k: round(t / fkl, 2) for k, t in res["best_s"].items()})
            print("median per-round ratios:", {k: round(x, 2) for k, x in res["median_ratio_to_fkl"].items()})
        _write(args, argv, device, {"real": real, "synthetic_interleaved": synthetic})
        return
    rows: list[dict] = []
    for n in args.tokens:
        for v in args.vocab:
            rows += run_shape(n, v, args, peers, device)
    print(table(rows))
    _write(args, argv, device, {"real": real, "rows": rows})


def _write(args, argv, device, groups: dict) -> None:
    meta = {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "hidden": args.hidden,
        "repeats": args.repeats,
        "command": " ".join(["python bench/divergences.py", *(argv if argv is not None else sys.argv[1:])]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, **groups}, indent=1))
    print(f"\n{meta}\nwritten: {args.out}")


if __name__ == "__main__":
    main()
