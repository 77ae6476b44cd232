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


def signed(fraction: float, digits: int = 1) -> str:
    """A difference in points with its sign, never ``-0.0``: exactly 0 prints unsigned, and a value
    too small for ``digits`` keeps its sign with two significant digits, so a bound next to 0 shows
    which side of 0 it is on."""
    points = 100 * fraction + 0.0
    if points == 0:
        return f"{0:.{digits}f}"
    text = f"{points:+.{digits}f}"
    return text if float(text) != 0 else f"{points:+.2g}"


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
    """Single taps against depth, one line per backbone and classifier; each fused row as a horizontal
    line with its bootstrap interval as a band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    singles = [r for r in rows if r["depth"] is not None]
    series = list(dict.fromkeys((r["backbone"], r["clf"]) for r in singles))
    one_axis = len({b for b, _ in series}) == 1  # one backbone: its tap names on the x axis
    width = max(len([r for r in singles if (r["backbone"], r["clf"]) == s]) for s in series) if series else 4
    fig, ax = plt.subplots(figsize=(max(7, 0.45 * width), 4.5))
    for backbone, clf in series:
        mine = [r for r in singles if (r["backbone"], r["clf"]) == (backbone, clf)]
        x = list(range(len(mine))) if one_axis else [r["depth"] for r in mine]
        y = [100 * r["mean_per_class_accuracy_mean"] for r in mine]
        err = [100 * r["mean_per_class_accuracy_std"] for r in mine]
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=backbone if len(series) == 1 else f"{backbone} {clf}")
        if one_axis:
            ax.set_xticks(x, [f"{r['tap']}\n{r['dim']}-D" for r in mine], rotation=60, fontsize=7)
    for k, r in enumerate(r for r in rows if r["depth"] is None):
        y, color = 100 * r["mean_per_class_accuracy_mean"], f"C{(len(series) + k) % 10}"
        name = r["tap"] if r["tap"] != "auto" else f"auto: {r['taps'].split(';')[0]}"
        ax.axhline(y, linestyle="--", linewidth=1.2, color=color, label=f"{r['backbone']} {r['clf']} {name} ({y:.1f}%)")
        if r.get("interval_low") is not None:
            ax.axhspan(100 * r["interval_low"], 100 * r["interval_high"], color=color, alpha=0.1)
    best = next((r for r in rows if r["best"]), None)
    if best is not None and best["depth"] is not None:
        mine = [r for r in singles if (r["backbone"], r["clf"]) == (best["backbone"], best["clf"])]
        x = mine.index(best) if one_axis else best["depth"]
        name = best["tap"] if one_axis else f"{best['backbone']}/{best['tap']}"  # across backbones: whose tap
        ax.annotate(f"best: {name} {100 * best['mean_per_class_accuracy_mean']:.1f}%",
                    (x, 100 * best["mean_per_class_accuracy_mean"]), textcoords="offset points", xytext=(0, 8),
                    ha="center", fontsize=8)
    ax.set_xlabel("tap (shallow to deep)" if one_axis else "relative depth of tap (0 = first, 1 = last)")
    ax.set_ylabel("mean per-class accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if len(series) > 1 or len(singles) < len(rows):
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _mark(row: dict) -> str:
    marks = ["<- best"] if row["best"] else ["tied"] if row.get("tied") else []
    marks += ["CV's pick"] if row.get("cv_pick") else []
    return "".join(f"  {m}" for m in marks)


def format_table(rows: list[dict], seeds: int) -> str:
    """The comparison as the CLI prints it: the best row marked, and every row not significantly worse
    than it (paired bootstrap interval of the difference includes 0) marked tied."""
    several = len({r["clf"] for r in rows}) > 1
    wide = max(14, *(len(r["backbone"]) + 2 for r in rows))  # a row across backbones names them all
    names = [r["tap"] if r["tap"] != "auto" else f"auto: {r['taps'].split(';')[0]}" for r in rows]
    tap_wide = min(max(24, *(len(n) + 1 for n in names)), 48)  # long sets are cut; compare.csv has them whole
    clf_wide = max(8, *(len(r["clf"]) + 2 for r in rows))
    lines = [f"{'backbone':<{wide}}" + (f"{'clf':<{clf_wide}}" if several else "") + f"{'tap':<{tap_wide}}{'dim':>6}  {'pool':<8}"
             f"{'accuracy':>12}{'mean/class':>12}{'vs best':>25}{'LogME':>9}{'fit s':>7}"]
    for r, name in zip(rows, names, strict=True):
        acc, mpc = ({"mean": r[f"{k}_mean"], "std": r[f"{k}_std"]} for k in ("accuracy", "mean_per_class_accuracy"))
        vs = (f"{signed(r['vs_best'])} [{signed(r['vs_best_low'])}, {signed(r['vs_best_high'])}]"
              if r.get("vs_best") is not None else "")
        score = f"{r['logme']:.3f}" if r.get("logme") is not None else ""
        lines.append(f"{r['backbone']:<{wide}}" + (f"{r['clf']:<{clf_wide}}" if several else "")
                     + f"{name[:tap_wide - 1]:<{tap_wide}}{r['dim']:>6}  "
                     f"{r['pooling']:<8}{fmt(acc, seeds):>12}{fmt(mpc, seeds):>12}{vs:>25}{score:>9}"
                     f"{r['fit_seconds']:>7.1f}{_mark(r)}")
    return "\n".join(lines)


def _set(row: dict) -> str:
    """A fused row's name, with the set seed 0 chose when it is ``auto``."""
    chosen = row["taps"].split(";")[0]
    return row["tap"] if chosen == row["tap"] else f"{row['tap']} ({chosen})"


def format_cv_pick(rows: list[dict]) -> list[str]:
    """The row picked on the training splits alone (highest CV accuracy), and how it fares on the test rows."""
    pick = next((r for r in rows if r.get("cv_pick")), None)
    if pick is None or len(rows) < 2:
        return []
    fares = f"on the test rows {100 * pick['mean_per_class_accuracy_mean']:.1f}"
    if pick["best"]:
        fares = "the best row on the test rows too"
    elif pick.get("vs_best") is not None:
        fares += (f", {signed(pick['vs_best'])} [{signed(pick['vs_best_low'])}, {signed(pick['vs_best_high'])}] "
                  f"against the best ({'tied' if pick['tied'] else 'significantly worse'}; the best is the highest of "
                  f"{len(rows)} test scores, so optimistic)")
    return [f"picked on the training splits alone (highest CV accuracy, {100 * pick['cv_accuracy']:.1f}; `auto` rows "
            f"aside): {pick['backbone']} {pick['clf']} {pick['tap']}, {fares}"]


def format_gains(rows: list[dict]) -> list[str]:
    """One line per fused row: its gain over the best single tap, with the paired interval; for a set
    across backbones, what each backbone and tap carries of its model's weights."""
    lines = []
    for r in rows:
        if r.get("shares"):
            shares = ", ".join(f"{k} {100 * v:.0f}%" for k, v in r["shares"].items())
            lines.append(f"{r['backbone']} {r['clf']} {_set(r)}: share of the seed-0 model's squared weights: {shares}")
        g = r.get("gain_over_best_single")
        if g:
            several = "+" in r["backbone"] and g.get("backbone")  # which backbone's single tap, when several
            best = f"{g['backbone']}/{g['tap']}" if several else g["tap"]
            lines.append(f"{r['backbone']} {r['clf']} {_set(r)} against {best}: "
                         f"{signed(g['difference'], 2)} points mean per-class accuracy, 95% interval "
                         f"[{signed(g['low'], 2)}, {signed(g['high'], 2)}], McNemar p per seed "
                         f"{', '.join(f'{p:.3g}' for p in g['mcnemar_p'])}")
    return lines
