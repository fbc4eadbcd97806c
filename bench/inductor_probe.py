"""Probe: what would torch.compile (Inductor, C++ on CPU) give AKL's element-wise work, against FKL's?

    python bench/inductor_probe.py                 # real logits, T = 1 and 2, 5 rounds (~4 min with compiling)

Issue 15 keeps the CPU path in eager PyTorch ("CPU: torch stays"); in eager mode every op is a
pass over memory, and AKL needs about twice FKL's passes (docs/bench-divergences.md). This probe
measures what fusing them would be worth, so that the choice to compile (a C++ compiler at run
time, ~20 s of compiling per shape on 2 cores) is made on numbers. It is a probe, not a product
path: nothing in akl_core compiles.

On the real logits (bench/real_logits.py, the first 1450 response tokens, V = 49152), in turn:
- ``eager_fkl`` / ``eager_akl``: ``akl_core.divergences.compute`` fwd+bwd, as shipped;
- ``compiled_fkl``: FKL's chunk math (two log-softmaxes, the loss, q - p into the gradient) under
  torch.compile, 10-row chunks;
- ``compiled_akl_elementwise``: AKL's chunk pass under torch.compile (both softmaxes, the FKL,
  RKL and |p - q| sums, the weights, the weighted gradient), given each row's g_head, which the
  head search found beforehand (untimed);
- ``eager_head_search``: the teacher pass and the head search (``rows._teacher_pass``,
  ``head.head_tokens``) alone, as shipped;
- ``hybrid_fkl`` / ``hybrid_akl``: the softmaxes left to ATen (its CPU softmax is faster than
  what Inductor generates) and only the passes after them compiled: FKL's loss and q - p; AKL's
  shipped teacher pass and head search, then per chunk q (eager), one compiled pass for the FKL,
  RKL and |p - q| sums, g_head gathered (eager) and one compiled pass for the gradient. The
  fairest measure of what fusing AKL's extra passes is worth (no autograd: ~15 ms less than a
  ``compute`` fwd+bwd would cost).
Ratios are the median over rounds of each time over eager_fkl's in the same round. Writes
bench/results/inductor-probe.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from akl_core.divergences import compute, head, rows
from akl_core.divergences.chunked import Workspace
from akl_core.divergences.definitions import head_weight

ROWS = 10  # rows per compiled chunk (FKL's CPU chunk at V = 49152)
GROUP = 85  # rows per head-search group (rows.akl_group's CPU group at V = 49152)


def fkl_chunk(zs: torch.Tensor, zt: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    lp, lq = torch.log_softmax(zt, -1), torch.log_softmax(zs, -1)
    p, q = lp.exp(), lq.exp()
    grad.copy_(q - p)
    return (p * (lp - lq)).sum(-1)


def akl_chunk(zs: torch.Tensor, zt: torch.Tensor, g_head: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    lp, lq = torch.log_softmax(zt, -1), torch.log_softmax(zs, -1)
    p, q = lp.exp(), lq.exp()
    d = lp - lq
    fkl, rkl = (p * d).sum(-1), -(q * d).sum(-1)
    gap = (q - p).abs().sum(-1)
    w_f = head_weight(g_head, gap)
    w_r = 1.0 - w_f
    grad.copy_(w_f[:, None] * (q - p) - w_r[:, None] * q * (d + rkl[:, None]))
    return w_f * fkl + w_r * rkl


def g_heads(s: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
    """Each row's g_head (sum of |p - q| over its head), by the shipped head search."""
    out = []
    for a in range(0, s.shape[0], GROUP):
        zs, zt = s[a : a + GROUP] / temperature, t[a : a + GROUP] / temperature
        r = rows.Rows(zs, zt, False, Workspace(zs.shape[0], zs.shape[1], zs.device), blocks=True)
        out.append(head.head_gap(r, 0.5)[0])
    return torch.cat(out)


def fkl_post(p, q, zt, zs, lse_t, inv_t: float, grad):
    """FKL after the softmaxes (zt, zs untempered): the loss, and q - p into grad."""
    lse_s = zs.amax(-1) * inv_t - q.amax(-1).log()
    grad.copy_(q - p)
    return (p * ((zt - zs) * inv_t + (lse_s - lse_t)[:, None])).sum(-1)


def akl_stats(p, q, zt, zs, lse_t, inv_t: float):
    """AKL's row sums after the softmaxes, in one fused pass: FKL, RKL, |p - q|, c."""
    c = zs.amax(-1) * inv_t - q.amax(-1).log() - lse_t
    d = (zt - zs) * inv_t + c[:, None]
    return (p * d).sum(-1), -(q * d).sum(-1), (q - p).abs().sum(-1), c


def akl_grad(p, q, zt, zs, c, w_f, rkl, inv_t: float, grad):
    """AKL's gradient wrt the untempered student logits, in one fused pass."""
    w_r = 1.0 - w_f
    d = (zt - zs) * inv_t + c[:, None]
    grad.copy_((w_f[:, None] * (q - p) - w_r[:, None] * q * (d + rkl[:, None])) * inv_t)


def hybrid_fkl(s, t, temperature: float, post) -> None:
    n, v = s.shape
    grad = torch.empty_like(s)
    pb, qb = torch.empty(ROWS, v), torch.empty(ROWS, v)
    for a in range(0, n, ROWS):
        zt, zs = t[a : a + ROWS], s[a : a + ROWS]
        p = torch.softmax(zt / temperature, -1, out=pb)
        q = torch.softmax(zs / temperature, -1, out=qb)
        lse_t = zt.amax(-1) / temperature - p.amax(-1).log()
        post(p, q, zt, zs, lse_t, 1.0 / temperature, grad[a : a + ROWS])


def hybrid_akl(s, t, temperature: float, stats, grad_fn) -> None:
    n, v = s.shape
    grad = torch.empty_like(s)
    group = GROUP - GROUP % ROWS  # whole chunks in every group: one compiled shape
    ws = Workspace(group, v, s.device)
    inner = ws.sub(ROWS)
    qb = torch.empty(ROWS, v)
    for g0 in range(0, n, group):
        tg, sg = t[g0 : g0 + group], s[g0 : g0 + group]
        g = tg.shape[0]
        lse_t, p_max, bmax, p_all = rows._teacher_pass(tg, temperature, ROWS // 2, ws, inner)
        heads = head.head_tokens(rows.GroupRows(tg, temperature, p_all, p_max, lse_t, bmax, ws), 0.5)
        starts = list(range(0, g, ROWS))
        for a, (flat, row) in zip(starts, heads.by_chunks(v, [*starts, g]), strict=True):
            b = a + ROWS
            q = torch.softmax(sg[a:b] / temperature, -1, out=qb)
            p = p_all[a:b]
            fkl, rkl, gap, c = stats(p, q, tg[a:b], sg[a:b], lse_t[a:b], 1.0 / temperature)
            g_head = head.row_sums_at(q - p, flat, row)
            w_f = rows._w_head(g_head, gap)
            grad_fn(p, q, tg[a:b], sg[a:b], c, w_f, rkl, 1.0 / temperature, grad[g0 + a : g0 + b])


def head_search(t: torch.Tensor, temperature: float) -> None:
    ws = Workspace(GROUP, t.shape[1], t.device)
    inner = ws.sub(ROWS)
    for a in range(0, t.shape[0], GROUP):
        tg = t[a : a + GROUP]
        lse, p_max, bmax, p = rows._teacher_pass(tg, temperature, ROWS // 2, ws, inner)  # as akl_group
        head.head_tokens(rows.GroupRows(tg, temperature, p, p_max, lse, bmax, ws), 0.5)


def probe(s: torch.Tensor, t: torch.Tensor, temperature: float, rounds: int) -> dict:
    n = s.shape[0] - s.shape[0] % ROWS  # whole chunks: one compiled shape
    s, t = s[:n], t[:n]
    labels = torch.zeros(n, dtype=torch.long)
    gh = g_heads(s, t, temperature)
    fkl_c = torch.compile(fkl_chunk, dynamic=False)
    akl_c = torch.compile(akl_chunk, dynamic=False)
    start = time.perf_counter()
    scratch = torch.empty(ROWS, s.shape[1])
    fkl_c(s[:ROWS] / temperature, t[:ROWS] / temperature, scratch)
    akl_c(s[:ROWS] / temperature, t[:ROWS] / temperature, gh[:ROWS], scratch)
    post_c = torch.compile(fkl_post, dynamic=False)
    stats_c = torch.compile(akl_stats, dynamic=False)
    grad_c = torch.compile(akl_grad, dynamic=False)
    hybrid_fkl(s[:ROWS], t[:ROWS], temperature, post_c)
    hybrid_akl(s[:ROWS], t[:ROWS], temperature, stats_c, grad_c)
    compile_s = time.perf_counter() - start

    def compiled(fn, with_head: bool) -> None:
        grad = torch.empty_like(s)  # a fresh gradient, as compute's (its page faults included)
        for a in range(0, n, ROWS):
            zs, zt = s[a : a + ROWS] / temperature, t[a : a + ROWS] / temperature
            args = (zs, zt, gh[a : a + ROWS]) if with_head else (zs, zt)
            fn(*args, grad[a : a + ROWS])

    def eager(name: str, x: torch.Tensor) -> None:
        compute(name, x, t, labels, temperature=temperature).loss.backward()

    fns = {
        "eager_fkl": lambda x: eager("fkl", x),
        "eager_akl": lambda x: eager("akl", x),
        "compiled_fkl": lambda x: compiled(fkl_c, False),
        "compiled_akl_elementwise": lambda x: compiled(akl_c, True),
        "eager_head_search": lambda x: head_search(t, temperature),
        "hybrid_fkl": lambda x: hybrid_fkl(s, t, temperature, post_c),
        "hybrid_akl": lambda x: hybrid_akl(s, t, temperature, stats_c, grad_c),
    }
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for key, fn in fns.items():
            x = s.clone().requires_grad_() if key.startswith("eager_") else None  # untimed
            gc.collect()
            begin = time.perf_counter()
            fn(x)
            times[key].append(time.perf_counter() - begin)
            del x
    return {
        "temperature": temperature,
        "n": n,
        "v": s.shape[1],
        "rounds": rounds,
        "compile_s": compile_s,
        "best_s": {k: min(v) for k, v in times.items()},
        "median_ratio_to_eager_fkl": {
            k: statistics.median(a / b for a, b in zip(v, times["eager_fkl"], strict=True))
            for k, v in times.items()
        },
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=1450)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--real-cache", type=Path, default=Path("bench/results/real_logits.pt"))
    ap.add_argument("--out", type=Path, default=Path("bench/results/inductor-probe.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(Path(__file__).parent))
    import real_logits  # bench/real_logits.py

    s, t = (x[: args.tokens] for x in real_logits.load(args.real_cache))
    results = []
    print(f"{'T':>3} {'method':<26} {'best s':>8} {'/ eager FKL':>12}")
    for temperature in (1.0, 2.0):
        res = probe(s, t, temperature, args.rounds)
        results.append(res)
        for k, best in res["best_s"].items():
            print(f"{temperature:>3g} {k:<26} {best:>8.3f} {res['median_ratio_to_eager_fkl'][k]:>11.2f}x")
        print(f"    (compiling both chunk functions: {res['compile_s']:.0f} s)", flush=True)
    meta = {"threads": torch.get_num_threads(), "torch": torch.__version__, "tokens": args.tokens}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
