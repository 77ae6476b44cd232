"""What a person reads: per-class tables, confusion matrices, comparison charts and tables."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np


def fmt(metric: dict | None, seeds: int) -> str:
    """``mean±std`` in percent; no spread for a single seed."""
    if not metric:
        return "-"
    return f"{100 * metric['mean']:.1f}" + (f"±{100 * metric['std']:.1f}" if seeds > 1 else "")


def write_per_class(path: Path, report: dict, classes: list[str]) -> None:
    """``per_class.csv`` from scikit-learn's ``classification_report(output_dict=True)``."""
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["class", "precision", "recall", "f1", "support"])
        for c in classes:
            r = report[c]
            w.writerow([c, f"{r['precision']:.4f}", f"{r['recall']:.4f}", f"{r['f1-score']:.4f}", int(r["support"])])


def plot_confusion(cm: np.ndarray, classes: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    size = min(4 + 0.18 * len(classes), 20)
    fig, ax = plt.subplots(figsize=(size, size))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    if len(classes) <= 40:
        ax.set_xticks(range(len(classes)), classes, rotation=90, fontsize=7)
        ax.set_yticks(range(len(classes)), classes, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of true class")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_comparison(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    backbones = list(dict.fromkeys(r["backbone"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(7, 0.45 * max(len([r for r in rows if r["backbone"] == b]) for b in backbones)), 4.5))
    for b in backbones:
        mine = [r for r in rows if r["backbone"] == b]
        x = [r["depth"] for r in mine] if len(backbones) > 1 else list(range(len(mine)))
        y = [100 * r["mean_per_class_accuracy_mean"] for r in mine]
        err = [100 * r["mean_per_class_accuracy_std"] for r in mine]
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=b)
        best = next(i for i, r in enumerate(mine) if r["best"])
        ax.annotate(f"best: {mine[best]['tap']} {y[best]:.1f}%", (x[best], y[best]), textcoords="offset points",
                    xytext=(0, 8), ha="center", fontsize=8)
        if len(backbones) == 1:
            ax.set_xticks(x, [f"{r['tap']}\n{r['dim']}-D" for r in mine], rotation=60, fontsize=7)
    ax.set_xlabel("tap (shallow to deep)" if len(backbones) == 1 else "relative depth of tap (0 = first, 1 = last)")
    ax.set_ylabel("mean per-class accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if len(backbones) > 1:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_table(rows: list[dict], seeds: int) -> str:
    """The comparison as the CLI prints it, the best row of each backbone marked."""
    lines = [f"{'backbone':<14}{'tap':<12}{'dim':>6}  {'pool':<8}{'accuracy':>12}{'mean/class':>12}{'fit s':>7}"]
    for r in rows:
        acc, mpc = ({"mean": r[f"{k}_mean"], "std": r[f"{k}_std"]} for k in ("accuracy", "mean_per_class_accuracy"))
        lines.append(f"{r['backbone']:<14}{r['tap']:<12}{r['dim']:>6}  {r['pooling']:<8}{fmt(acc, seeds):>12}"
                     f"{fmt(mpc, seeds):>12}{r['fit_seconds']:>7.1f}{'  <- best' if r['best'] else ''}")
    return "\n".join(lines)
