"""`make demo`: learn masks for lenet300 at density 0.5 and train the dense lenet300, on MNIST, on CPU.

Prints a table (test accuracy, kept weights, time) and writes the validation curves as a PNG.
"""
from __future__ import annotations

import json
from pathlib import Path

from .train import TrainConfig, train

RUNS = {"mask (density 0.5)": "mask", "dense": "dense"}


def plot_curves(runs: dict[str, Path], path: Path) -> str | None:
    """Validation accuracy per epoch, one line per run; returns why not when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib, or pip install 'maskprune[plot]')"

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, run in runs.items():
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        ax.plot([r["epoch"] for r in rows], [100 * r["val_acc"] for r in rows], marker="o", label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title("lenet300 on MNIST: masks over frozen random weights vs dense", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def run_demo(out: Path, *, epochs: int = 10, quiet: bool = False) -> dict:
    """Both runs into OUT/mask and OUT/dense (replaced if there), the table on stdout, OUT/val_curves.png."""
    out.mkdir(parents=True, exist_ok=True)
    runs = {label: out / mode for label, mode in RUNS.items()}
    summaries = {}
    for label, mode in RUNS.items():
        print(f"== {label}: lenet300 on MNIST, {epochs} epochs, CPU", flush=True)
        # The same edge-popup hyperparameters for both. One thread: lenet300 gains little from more, and a single
        # thread cannot stall in OpenMP's spin-waits when other processes share the cores.
        cfg = TrainConfig(model="lenet300", dataset="mnist", mode=mode, density=0.5, epochs=epochs, device="cpu",
                          threads=1)
        summaries[label] = train(cfg, runs[label], overwrite=True, quiet=quiet)
    no_plot = plot_curves(runs, out / "val_curves.png")
    print(f"\n{'lenet300 / MNIST':20s} {'test acc (last)':>16s} {'test acc (best val)':>20s} "
          f"{'kept / total weights':>22s} {'s / epoch':>10s} {'total':>8s}")
    for label, s in summaries.items():
        kept = f"{s['kept_weights']:,} / {s['total_weights']:,}"
        print(f"{label:20s} {100 * s['test_acc_last']:15.2f}% {100 * s['test_acc_best']:19.2f}% "
              f"{kept:>22s} {s['seconds_per_epoch']:9.1f}s {s['wall_time_s']:7.1f}s")
    curves = f"no plot: {no_plot}" if no_plot else f"validation curves: {out / 'val_curves.png'}"
    print(f"\n{curves}; runs: {runs['mask (density 0.5)']}, {runs['dense']}")
    (out / "demo.json").write_text(json.dumps(summaries, indent=2) + "\n")
    return summaries
