"""Head and tail gap histories per method, from experiments/results/compare_losses.json.

  python experiments/plot_gaps.py

g_head / g_tail are the trainer's per-step means over the step's response tokens of sum |p - q| on
AKL's head (teacher tokens up to cumulative mass mu = 0.5, top-1 always in) and on the rest. Each
step sees a different batch, so curves are smoothed (moving average over 5 steps) and averaged over
training seeds. Writes docs/figures/gaps_history.png (absolute gaps) and gaps_vs_sft.png: each gap
divided by SFT's gap at the same step of the same seed. Every method starts from the same student
and sees the same batches for a seed, so this ratio removes the batch-to-batch noise; below 1 means
the method has closed that part of the gap more than SFT (which trains on the labels only).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from compare_losses import LABELS  # run as a script: experiments/ is on sys.path

ROOT = Path(__file__).resolve().parents[1]
SUMMARY = ROOT / "experiments" / "results" / "compare_losses.json"
FIGURES = ROOT / "docs" / "figures"
STYLE = {
    "sft": ("0.5", ":"),
    "fkl": ("tab:blue", "-"),
    "rkl": ("tab:red", "-"),
    "fkl_rkl": ("tab:purple", "-"),
    "akl": ("k", "-"),
    "akl_r": ("k", "--"),
    "skl": ("tab:cyan", "--"),
    "srkl": ("tab:orange", "--"),
}


def smooth(values: list[float], k: int = 5) -> list[float]:
    return [statistics.fmean(values[max(0, i - k + 1) : i + 1]) for i in range(len(values))]


def mean_history(runs: dict, key: str) -> tuple[list[int], list[float]]:
    hists = [r["history"][key] for r in runs.values() if r["history"].get(key)]
    n = min(len(h) for h in hists)
    steps = next(iter(runs.values()))["history"]["step"][:n]
    return steps, [statistics.fmean(h[i] for h in hists) for i in range(n)]


def ratio_to_sft(runs: dict, method: str, key: str) -> tuple[list[int], list[float]]:
    """Per step, mean over the seeds both have of method's gap / SFT's gap (paired by seed)."""
    seeds = [s for s in runs[method] if s in runs.get("sft", {})]
    hists = [
        [a / b for a, b in zip(runs[method][s]["history"][key], runs["sft"][s]["history"][key], strict=True)]
        for s in seeds
    ]
    n = min(len(h) for h in hists)
    steps = runs[method][seeds[0]]["history"]["step"][:n]
    return steps, [statistics.fmean(h[i] for h in hists) for i in range(n)]


def main() -> None:
    import matplotlib.pyplot as plt

    summary = json.loads(SUMMARY.read_text())
    runs = {m: r for m, r in summary["runs"].items() if r}
    for relative, name in ((False, "gaps_history.png"), (True, "gaps_vs_sft.png")):
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharex=True)
        for ax, key in zip(axes, ("g_head", "g_tail"), strict=True):
            for m, r in runs.items():
                if relative and (m == "sft" or "sft" not in runs):
                    continue
                steps, h = ratio_to_sft(runs, m, key) if relative else mean_history(r, key)
                h = smooth(h)
                color, ls = STYLE.get(m, ("0.3", "-"))
                ax.plot(steps, h, color=color, ls=ls, lw=1.4, label=LABELS.get(m, m))
            part = "head (cumulative teacher mass 0.5)" if key == "g_head" else "tail (the rest)"
            ax.set_title(f"{key}: sum |p-q| on the {part}" + (" / SFT's" if relative else ""), fontsize=9)
            ax.set_xlabel("optimizer step")
        axes[0].legend(fontsize=7, ncol=2)
        n = max(len(r) for r in runs.values())
        fig.suptitle(
            f"Real teacher -> 6-layer student: gap histories (mean over {n} training seed(s), "
            "5-step moving average)",
            fontsize=9,
        )
        fig.tight_layout()
        fig.savefig(FIGURES / name, dpi=75)
        plt.close(fig)
    print("wrote", FIGURES / "gaps_history.png", FIGURES / "gaps_vs_sft.png")


if __name__ == "__main__":
    main()
