"""Which tap transfers best? The same splits over many taps (and backbones): table, CSV, JSON, chart.

Missing taps are extracted first (one pass per backbone); every tap is then fit
through :func:`pipeline.evaluate.fit_run`, so each row is an ordinary run folder
and a rerun reuses finished rows (skip-existing, as in CLIP_benchmark).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from features.backbones import Backbone
from features.datasets import ImageSet
from features.errors import UsageError
from features.extract import extract
from features.options import ExtractOptions
from features.pooling import is_spatial
from features.store import FeatureFile

from .evaluate import fit_run
from .options import FitOptions
from .protocols import Protocol, check_protocol
from .report import plot_comparison
from .runs import settings_digest

COLUMNS = ("backbone", "tap", "depth", "node", "dim", "pooling", "accuracy_mean", "accuracy_std",
           "mean_per_class_accuracy_mean", "mean_per_class_accuracy_std", "macro_f1_mean", "macro_f1_std",
           "top5_accuracy_mean", "top5_accuracy_std", "fit_seconds", "best", "run")


def compare_taps(images: ImageSet, backbones: list[Backbone], taps: list[str] | None, options: FitOptions,
                 protocol: Protocol, *, seeds: int = 1, extract_options: ExtractOptions | None = None,
                 runs_root: Path | str = "runs", force: bool = False, log=print) -> tuple[Path, list[dict]]:
    """Extract what is missing, fit every tap with the same seeded splits, write the comparison folder.

    ``extract_options`` says how to extract and where feature files live (its ``out``), and its
    ``pooling`` is the pooling of every spatial tap compared."""
    extract_options = extract_options or ExtractOptions()
    pooling = extract_options.pooling
    # Everything that can be refused is checked before the first extraction.
    if seeds < 1:
        raise UsageError(f"--seeds must be at least 1, not {seeds}")
    check_protocol(protocol, images.labels, images.classes, images.splits)
    planned = {bb.name: bb.resolve_taps(taps) for bb in backbones}
    rows: list[dict] = []
    made_from: list[dict] = []  # per backbone: what its features were made from
    for bb in backbones:
        resolved = planned[bb.name]
        report = extract(images, bb, [t.name for t in resolved], extract_options)
        if report.computed:
            log(f"extracted {', '.join(report.computed)} with {bb.name} ({report.images_per_second:.1f} img/s)")
        features = FeatureFile(report.path)
        made_from.append({**features.settings(), "features_fingerprint": features.fingerprint(),
                          "precision": sorted({features.taps[k].precision for k in report.computed + report.reused}),
                          "decode": sorted({features.taps[k].decode
                                            for k in report.computed + report.reused})})
        for position, tap in enumerate(resolved):
            run_dir, results, reused = fit_run(features, tap.name, pooling, options, protocol, seeds=seeds,
                                               runs_root=runs_root, force=force)
            rows.append({"backbone": bb.name, "tap": tap.name, "node": tap.node,
                         "depth": round(position / max(len(resolved) - 1, 1), 4),
                         "pooling": pooling if is_spatial(tap.shape) else "none", **_row(results, run_dir)})
            log(f"{'reused' if reused else 'fitted'} {bb.name} {tap.name}: mean per-class accuracy "
                f"{100 * results['metrics']['mean_per_class_accuracy']['mean']:.1f}%")
    for name in {r["backbone"] for r in rows}:
        mine = [r for r in rows if r["backbone"] == name]
        max(mine, key=lambda r: r["mean_per_class_accuracy_mean"])["best"] = True
    # Every setting that changes a result is in the folder's digest: the dataset's contents, each
    # backbone's weights and preprocessing and the feature files themselves, then the fit settings.
    settings = {"dataset": images.name, "dataset_fingerprint": images.fingerprint(),
                "backbones": [b.name for b in backbones], "features": made_from, "taps": taps, "pooling": pooling,
                "protocol": str(protocol), "seeds": seeds, **options.as_dict()}
    digest = settings_digest(settings)
    out = Path(runs_root) / images.name / f"compare__{'+'.join(b.name for b in backbones)}__{options.clf}__{digest}"
    _write_tables(out, rows, settings)
    plot_comparison(rows, out / "compare.png", f"{images.name}: {options.clf}, {protocol}, {seeds} seed(s), {pooling} pooling")
    return out, rows


METRIC_NAMES = ("accuracy", "mean_per_class_accuracy", "macro_f1", "top5_accuracy")


def _row(results: dict, run_dir: Path) -> dict:
    """A comparison row's figures from its run's results."""
    m = results["metrics"]
    return {"dim": results["features"]["dim"],
            **{f"{k}_{s}": round(m[k][s], 5) for k in METRIC_NAMES if k in m for s in ("mean", "std")},
            "fit_seconds": round(results["fit_seconds"]["mean"], 2), "best": False, "run": str(run_dir),
            "split_digests": [s["train_digest"] for s in results["per_seed"]]}


def _write_tables(out: Path, rows: list[dict], settings: dict) -> None:
    """compare.csv (flat columns) and compare.json (results.json's metric names, and the settings)."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "compare.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    flat = {f"{k}_{s}" for k in METRIC_NAMES for s in ("mean", "std")}
    (out / "compare.json").write_text(json.dumps({"settings": settings, "rows": [
        {**{k: r[k] for k in COLUMNS if k not in flat}, "split_digests": r["split_digests"],
         "metrics": {k: {"mean": r[f"{k}_mean"], "std": r[f"{k}_std"]} for k in METRIC_NAMES
                     if f"{k}_mean" in r}} for r in rows]},
        indent=2))
