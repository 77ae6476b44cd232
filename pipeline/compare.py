"""Which tap transfers best, and is the difference real? The same splits over many taps, fused
tap sets, classifiers and backbones: table, CSV, JSON and chart.

Missing taps are extracted first (one pass per backbone); every row is then fit through
:func:`pipeline.evaluate.fit_run`, so each row is an ordinary run folder and a rerun reuses
finished rows (skip-existing, as in CLIP_benchmark). Because every row is scored on the same
test samples, rows are compared pairwise (:mod:`pipeline.significance`): the best row is
marked, and every row whose paired interval against it includes 0 is marked ``tied``. Each
single tap also gets its LogME score (:mod:`pipeline.transfer`, no fit), and the table
reports how well that score ranks the taps (Kendall's tau against the fitted ranking).
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.stats import kendalltau

from features.backbones import Backbone, Tap
from features.datasets import ImageSet
from features.errors import UsageError
from features.extract import extract
from features.files import path_safe
from features.joined import BACKBONE_SEPARATOR, Features, JoinedFeatures, owner, split_key
from features.options import ExtractOptions
from features.pooling import DEFAULT_POOLING, recorded_pooling
from features.store import FeatureFile

from .classifiers import get_classifier
from .evaluate import fit_run
from .fusion import AUTO, is_fused, tap_set
from .options import FitOptions
from .protocols import Protocol, check_protocol, make_split
from .report import plot_comparison
from .results import RUNS_ROOT, RunResult
from .runs import load_model, load_predictions, settings_digest
from .significance import bootstrap, interval, paired_difference, sample_weights
from .transfer import logme
from .zeroshot import TEXT_TAP

COLUMNS = ("backbone", "clf", "tap", "taps", "depth", "node", "dim", "pooling", "accuracy_mean", "accuracy_std",
           "mean_per_class_accuracy_mean", "mean_per_class_accuracy_std", "macro_f1_mean", "macro_f1_std",
           "top5_accuracy_mean", "top5_accuracy_std", "interval_low", "interval_high", "logme", "fit_seconds", "predict_seconds",
           "best", "tied", "vs_best", "vs_best_low", "vs_best_high", "cv_accuracy", "cv_pick", "run")
METRIC = "mean_per_class_accuracy"  # what ranks the rows and what the paired tests compare
METRIC_NAMES = ("accuracy", "mean_per_class_accuracy", "macro_f1", "top5_accuracy")


def plan_taps(backbone: Backbone, taps: list[str] | None, fuse: bool,
              pooling: str = DEFAULT_POOLING) -> tuple[list[Tap], list[str], list[str]]:
    """A backbone's rows: (single taps, shallow first; fused sets, ``auto`` last; every tap to extract)."""
    specs = taps or [backbone.default_tap]
    singles = [t for t in specs if not is_fused(t)]
    sets = [t for t in specs if is_fused(t) and t != AUTO] + ([AUTO] if fuse or AUTO in specs else [])
    resolved = backbone.resolve_taps(["all"] if "all" in singles else singles) if singles else []
    backbone.check_pooling(resolved, pooling)
    if AUTO in sets and len(resolved) < 2:
        raise UsageError("--fuse (or auto) chooses among the compared taps; compare at least two, e.g. --taps all")
    members = [m for spec in sets if spec != AUTO for m in tap_set(spec)]
    extra = backbone.resolve_taps(members) if members else []
    needed = list(dict.fromkeys(t.name for t in resolved + extra))
    return resolved, sets, needed


def _cross_sets(backbones: list[Backbone], taps: list[str] | None,
                fuse: bool) -> tuple[dict[str, list[str] | None], list[str]]:
    """``taps`` as each backbone's own specs (a plain name is every backbone's; ``A/t`` and ``A/t+A/u`` are
    A's) and the sets across backbones (``A/t+B/u``; with ``fuse`` and several backbones, ``auto`` chosen
    among every single tap of every backbone)."""
    own: dict[str, list[str]] = {b.name: [] for b in backbones}
    across = []
    for spec in taps or []:
        if BACKBONE_SEPARATOR not in spec:
            for specs in own.values():
                specs.append(spec)
            continue
        members = [split_key(m) for m in tap_set(spec)]
        for name, _ in members:
            if name not in own:
                raise UsageError(f"tap {spec!r} names backbone {name!r}, which is not one of {', '.join(own)}; "
                                 f"pass it with --backbone")
        if len({name for name, _ in members}) == 1:
            own[members[0][0]].append("+".join(tap for _, tap in members))
        else:
            across.append(spec)
    return {name: specs or None for name, specs in own.items()}, across + ([AUTO] if fuse and len(own) > 1 else [])


def _plan(backbone: Backbone, specs: list[str] | None, fuse: bool, pooling: str,
          several: bool) -> tuple[list[Tap], list[str], list[str]]:
    """:func:`plan_taps`; with several backbones, ``fuse`` adds a backbone's own ``auto`` row only where
    it has two taps to choose from (the ``auto`` across backbones chooses among all of them)."""
    if not (fuse and several):
        return plan_taps(backbone, specs, fuse, pooling)
    singles, sets, needed = plan_taps(backbone, specs, False, pooling)
    return singles, sets + ([AUTO] if len(singles) > 1 else []), needed


def tap_shares(run_dir: Path, results: RunResult) -> dict[str, float] | None:
    """Each tap's share of the seed-0 model's squared weights (the taps' columns are standardised one by
    one, so their weights compare), and each backbone's (their taps' sum); None when the model has no
    linear weights over the taps' own columns (knn, PCA)."""
    model = load_model(run_dir, results)
    coef = getattr(model[-1] if hasattr(model, "steps") else model, "coef_", None)
    taps = results.features.taps
    if coef is None or np.shape(coef)[-1] != sum(t.dim for t in taps):
        return None
    energy = np.square(np.asarray(coef, dtype=np.float64)).sum(axis=0)
    edges = np.cumsum([0] + [t.dim for t in taps])
    per_tap = {t.tap: float(energy[a:b].sum() / energy.sum()) for t, a, b in zip(taps, edges, edges[1:], strict=False)}
    per_backbone: dict[str, float] = {}
    for tap, share in per_tap.items():
        per_backbone[owner(tap)] = per_backbone.get(owner(tap), 0.0) + share
    return {**{k: round(v, 4) for k, v in per_backbone.items()}, **{k: round(v, 4) for k, v in per_tap.items()}}


@dataclass(frozen=True)
class PlannedRow:
    """One row to fit: a tap, a fused set or ``auto`` of one backbone's file, or a set across the files."""

    features: Features
    spec: str
    backbone: str
    tap: Tap | None = None  # a single tap (None for sets)
    depth: float | None = None  # a single tap's relative depth in its backbone
    candidates: list[str] | None = None  # what ``auto`` chooses among


@dataclass
class Prepared:
    """What :func:`prepare_rows` extracted: the rows to fit in groups (each backbone's, then the sets
    across backbones) and, per backbone, its feature file and what it was made from."""

    groups: list[list[PlannedRow]]
    files: dict[str, FeatureFile]
    made_from: list[dict]

    @property
    def rows(self) -> list[PlannedRow]:
        return [row for group in self.groups for row in group]


def prepare_rows(images: ImageSet, backbones: list[Backbone], taps: list[str] | None, fuse: bool,
                 extract_options: ExtractOptions, log=print) -> Prepared:
    """Plan every row of a comparison (every name checked before the first extraction), extract what is
    missing (one pass per backbone) and return the rows on their feature files."""
    pooling = extract_options.pooling
    own, across = _cross_sets(backbones, taps, fuse)
    planned = {bb.name: _plan(bb, own[bb.name], fuse, pooling, several=len(backbones) > 1) for bb in backbones}
    for spec in across:  # the members of cross-backbone sets are extracted with their backbones
        for member in ([] if spec == AUTO else tap_set(spec)):
            name, tap = split_key(member)
            planned[name][2].append(next(b for b in backbones if b.name == name).resolve_taps([tap])[0].name)
    for bb in backbones:  # every checkpoint found before the first extraction, as every name is
        bb.check_weights()
    groups: list[list[PlannedRow]] = []
    made_from: list[dict] = []  # per backbone: what its features were made from
    files: dict[str, FeatureFile] = {}
    for bb in backbones:
        singles, sets, needed = planned[bb.name]
        report = extract(images, bb, list(dict.fromkeys(needed)), extract_options)
        if report.computed:
            log(f"extracted {', '.join(report.computed)} with {bb.name} ({report.images_per_second:.1f} img/s)")
        features = files[bb.name] = FeatureFile(report.path)
        made_from.append({**features.settings(), "features_fingerprint": features.fingerprint(),
                          "precision": sorted({features.taps[k].precision for k in report.computed + report.reused}),
                          "decode": sorted({features.taps[k].decode
                                            for k in report.computed + report.reused})})
        groups.append([PlannedRow(features, t.name, bb.name, t, round(i / max(len(singles) - 1, 1), 4))
                       for i, t in enumerate(singles)]
                      + [PlannedRow(features, spec, bb.name, candidates=[t.name for t in singles]) for spec in sets])
    if across:
        joined = JoinedFeatures(list(files.values()))
        candidates = [f"{bb.name}{BACKBONE_SEPARATOR}{t.name}" for bb in backbones for t in planned[bb.name][0]]
        groups.append([PlannedRow(joined, spec, joined.attrs["backbone"], candidates=candidates) for spec in across])
    return Prepared(groups, files, made_from)


def compare_taps(images: ImageSet, backbones: list[Backbone], taps: list[str] | None,
                 options: FitOptions | Sequence[FitOptions], protocol: Protocol, *, seeds: int = 1,
                 extract_options: ExtractOptions | None = None, runs_root: Path | str = RUNS_ROOT, force: bool = False,
                 fuse: bool = False, log=print) -> tuple[Path, list[dict]]:
    """Extract what is missing, fit every row with the same seeded splits, test the rows against each
    other, write the comparison folder. Rows: every tap in ``taps`` (``all``: every tap; ``a+b``: a
    fused set), and with ``fuse`` the ``auto`` set chosen among the single taps, for each backbone and
    each of ``options`` (one per classifier).

    ``extract_options`` says how to extract and where feature files live (its ``out``), and its
    ``pooling`` is the pooling of every spatial tap compared."""
    extract_options = extract_options or ExtractOptions()
    fits = [options] if isinstance(options, FitOptions) else list(options)
    pooling = extract_options.pooling
    # Everything that can be refused is checked before the first extraction.
    if seeds < 1:
        raise UsageError(f"--seeds must be at least 1, not {seeds}")
    check_protocol(protocol, images.labels, images.classes, images.splits)
    text = [f for f in fits if get_classifier(f.clf).text]
    if text and TEXT_TAP not in {t.rpartition(BACKBONE_SEPARATOR)[2] for t in taps or []}:
        raise UsageError(f"--clf zeroshot reads the {TEXT_TAP} tap (the image embedding text is compared with); add "
                         f"it to --taps")
    prepared = prepare_rows(images, backbones, taps, fuse, extract_options, log)
    made_from = prepared.made_from
    rows: list[dict] = []
    runs: list[RunResult] = []  # each row's run
    job = {"pooling": pooling, "protocol": protocol, "seeds": seeds, "runs_root": runs_root, "force": force, "log": log}
    for group in prepared.groups:
        singles = [r.tap for r in group if r.tap is not None]
        scores = _logme_scores(group[0].features, singles, pooling, protocol) if singles else {}
        for fit in fits:
            for planned in group:
                if get_classifier(fit.clf).text and planned.spec.rpartition(BACKBONE_SEPARATOR)[2] != TEXT_TAP:
                    continue  # a zero-shot row exists for the embedding text is compared with only
                row, results = _fit_row(planned.features, planned.spec, fit, **job,
                                        candidates=None if planned.tap else planned.candidates)
                extra = ({"node": planned.tap.node, "logme": scores[planned.spec], "depth": planned.depth,
                          "pooling": recorded_pooling(planned.tap.shape, pooling)} if planned.tap else
                         {"logme": None, "depth": None, "pooling": results.features.pooling})  # as the set used
                if isinstance(planned.features, JoinedFeatures):
                    extra["shares"] = tap_shares(Path(row["run"]), results)
                rows.append({**row, "backbone": planned.backbone, **extra})
                runs.append(results)
    pairs = _significance(rows, runs, seeds)
    mark_cv_pick(rows)
    # Every setting that changes a result is in the folder's digest: the dataset's contents, each
    # backbone's weights and preprocessing and the feature files themselves, then the fit settings.
    settings = {"dataset": images.name, "dataset_fingerprint": images.fingerprint(),
                "backbones": [b.name for b in backbones], "features": made_from, "taps": taps, "fuse": fuse,
                "pooling": pooling, "protocol": str(protocol), "seeds": seeds,
                **(fits[0].settings if len(fits) == 1 else {"fits": [f.settings for f in fits]})}
    digest = settings_digest(settings)
    clfs = "+".join(f.clf for f in fits)
    out = Path(runs_root) / images.name / path_safe(f"compare__{'+'.join(b.name for b in backbones)}__{clfs}__{digest}")
    _write_tables(out, rows, settings, pairs, rank_agreement(rows))
    plot_comparison(rows, out / "compare.png", f"{images.name}: {clfs}, {protocol}, {seeds} seed(s), {pooling} pooling")
    return out, rows


def _fit_row(features: FeatureFile, tap: str, fit: FitOptions, *, pooling: str, protocol: Protocol, seeds: int,
             runs_root, force: bool, log, candidates: list[str] | None = None) -> tuple[dict, RunResult]:
    """One row of the table, and its run's results."""
    run_dir, results, reused = fit_run(features, tap, pooling, fit, protocol, seeds=seeds, runs_root=runs_root,
                                       force=force, candidates=candidates)
    m = results.metrics
    chosen = ";".join("+".join(s.taps) for s in results.per_seed)
    log(f"{'reused' if reused else 'fitted'} {features.attrs['backbone']} {tap} {fit.clf}: mean per-class accuracy "
        f"{100 * m[METRIC]['mean']:.1f}%" + (f" (chose {chosen})" if tap == AUTO else ""))
    return {"clf": fit.clf, "tap": tap, "taps": chosen, "node": results.features.node, "dim": results.features.dim,
            **{f"{k}_{s}": round(m[k][s], 5) for k in METRIC_NAMES if k in m for s in ("mean", "std")},
            "fit_seconds": round(results.fit_seconds["mean"], 2),
            "predict_seconds": round(float(np.mean([s.predict_seconds for s in results.per_seed])), 3),
            "best": False, "tied": False, "cv_accuracy": _cv_accuracy(results), "cv_pick": False, "run": str(run_dir),
            "split_digests": [s.test_digest for s in results.per_seed]}, results


def _cv_accuracy(results: RunResult) -> float | None:
    """The row's accuracy on held-out training folds at the value its CV chose, over seeds (None
    where nothing was chosen by CV): what a user who never looks at the test rows can rank rows by."""
    scores = [s.cv_accuracy for s in results.per_seed]
    return None if any(s is None for s in scores) else round(float(np.mean([max(s) for s in scores])), 5)


def mark_cv_pick(rows: list[dict]) -> None:
    """Mark the row with the highest CV accuracy: the pick made on the training splits alone, free of
    the optimism of picking the best of many rows by their test scores. ``auto`` rows stand aside:
    their taps were chosen on those very folds, so their CV accuracy is not a held-out estimate."""
    ranked = [r for r in rows if r["cv_accuracy"] is not None and r["tap"] != AUTO]
    if ranked:
        max(ranked, key=lambda r: r["cv_accuracy"])["cv_pick"] = True


def _logme_scores(features: FeatureFile, taps: list[Tap], pooling: str, protocol: Protocol) -> dict[str, float]:
    """Each single tap's LogME on seed 0's training rows (no test row is read), and its time."""
    train, _ = make_split(protocol, features.labels, features.split, 0, features.valid)
    y = features.labels[train]
    return {t.name: round(logme(features.matrix(features.tap_key(t.name, pooling), finite=True)[train], y), 6)
            for t in taps}


def score_taps(images: ImageSet, backbone: Backbone, taps: list[str] | None, protocol: Protocol, *,
               extract_options: ExtractOptions | None = None, log=print) -> list[dict]:
    """``compare --score``: every tap ranked by LogME on seed 0's training split, with no fit at all."""
    extract_options = extract_options or ExtractOptions()
    check_protocol(protocol, images.labels, images.classes, images.splits)
    singles, _, needed = plan_taps(backbone, [t for t in (taps or []) if not is_fused(t)] or None, False,
                                   extract_options.pooling)
    report = extract(images, backbone, needed, extract_options)
    if report.computed:
        log(f"extracted {', '.join(report.computed)} with {backbone.name} ({report.images_per_second:.1f} img/s)")
    features = FeatureFile(report.path)
    t0 = time.perf_counter()
    scores = _logme_scores(features, singles, extract_options.pooling, protocol)
    seconds = time.perf_counter() - t0
    ranked = sorted(singles, key=lambda t: -scores[t.name])
    return [{"rank": i + 1, "backbone": backbone.name, "tap": t.name, "dim": backbone.dim(t.name, extract_options.pooling),
             "logme": scores[t.name], "seconds": round(seconds, 2)} for i, t in enumerate(ranked)]


def write_scores(ranked: list[dict], images: ImageSet, backbones: list[Backbone], protocol: Protocol,
                 runs_root: Path | str) -> Path:
    """``compare --score``'s ranking as score.csv and score.json (with its settings) in
    ``runs/<dataset>/score__<backbones>__<hash>/``; -> the folder."""
    ranked = [{**r, "rank": i + 1} for i, r in enumerate(ranked)]
    settings = {"dataset": images.name, "dataset_fingerprint": images.fingerprint(),
                "backbones": [b.name for b in backbones], "protocol": str(protocol), "score": "logme",
                "taps": [f"{r['backbone']}/{r['tap']}" for r in ranked]}
    out = Path(runs_root) / images.name / path_safe(
        f"score__{'+'.join(b.name for b in backbones)}__{settings_digest(settings)}")
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "score.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=("rank", "backbone", "tap", "dim", "logme", "seconds"))
        w.writeheader()
        w.writerows(ranked)
    (out / "score.json").write_text(json.dumps({"settings": settings, "ranking": ranked}, indent=2))
    return out


def _significance(rows: list[dict], runs: list[RunResult], seeds: int) -> list[dict]:
    """Mark the best row and the rows tied with it; each fused row's gain over its best single tap;
    -> every pair's paired difference (all rows share their test samples)."""
    best = max(range(len(rows)), key=lambda i: rows[i][f"{METRIC}_mean"])
    rows[best]["best"] = True
    if len({tuple(r["split_digests"]) for r in rows}) > 1:  # not the same test samples: no paired test
        return []
    correct, weights, samples, labels = [], [], [], {}
    for row, results in zip(rows, runs, strict=True):
        by_seed = load_predictions(Path(row["run"]), results)
        path = results.features.path  # one feature file serves every row of its backbone
        y = labels[path] if path in labels else labels.setdefault(path, FeatureFile(path).labels)
        correct.append([y[by_seed[s][0]] == by_seed[s][1] for s in range(seeds)])
        if not weights:  # every row tests the same samples (the same split digests)
            samples = [by_seed[s][0] for s in range(seeds)]
            weights = [sample_weights(y[test], METRIC) for test in samples]
    stats = bootstrap(correct, weights, samples=samples)
    observed = np.array([r[f"{METRIC}_mean"] for r in rows])
    for i, row in enumerate(rows):
        row["interval_low"], row["interval_high"] = (round(v, 5) for v in interval(stats[i]))
        if i != best:
            d = paired_difference(stats, observed, correct, best, i)
            row.update(tied=not d.significant, vs_best=round(-d.difference, 5) + 0.0,  # + 0.0: never -0.0
                       vs_best_low=round(-d.high, 5) + 0.0, vs_best_high=round(-d.low, 5) + 0.0,
                       vs_best_mcnemar_p=list(d.mcnemar_p))
        if row["depth"] is None:  # a fused row against the best single tap of its backbone(s) and classifier
            mine = [j for j, r in enumerate(rows) if r["depth"] is not None
                    and r["backbone"] in row["backbone"].split("+") and r["clf"] == row["clf"]]
            if mine:
                single = max(mine, key=lambda j: observed[j])
                row["gain_over_best_single"] = {"tap": rows[single]["tap"], "backbone": rows[single]["backbone"],
                                                **paired_difference(stats, observed, correct, i, single).as_dict()}
    return [{"a": f"{rows[a]['backbone']} {rows[a]['clf']} {rows[a]['tap']}",
             "b": f"{rows[b]['backbone']} {rows[b]['clf']} {rows[b]['tap']}",
             **paired_difference(stats, observed, correct, a, b).as_dict()}
            for a in range(len(rows)) for b in range(a + 1, len(rows))]


def rank_agreement(rows: list[dict]) -> list[dict]:
    """Kendall's tau between the LogME ranking of the single taps and their fitted ranking, per backbone
    and classifier (None with fewer than 3 taps)."""
    out = []
    for key in dict.fromkeys((r["backbone"], r["clf"]) for r in rows):
        mine = [r for r in rows if (r["backbone"], r["clf"]) == key and r["logme"] is not None]
        tau = kendalltau([r["logme"] for r in mine], [r[f"{METRIC}_mean"] for r in mine]).statistic \
            if len(mine) >= 3 else None
        out.append({"backbone": key[0], "clf": key[1], "taps": len(mine),
                    "kendall_tau": None if tau is None or np.isnan(tau) else round(float(tau), 4)})
    return out


def _write_tables(out: Path, rows: list[dict], settings: dict, pairs: list[dict], agreement: list[dict]) -> None:
    """compare.csv (flat columns) and compare.json (results.json's metric names, the settings, every
    pair's paired difference and the LogME rank agreement)."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "compare.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    flat = {f"{k}_{s}" for k in METRIC_NAMES for s in ("mean", "std")}
    extra = ("split_digests", "vs_best_mcnemar_p", "gain_over_best_single", "shares")
    (out / "compare.json").write_text(json.dumps({"settings": settings, "rank_agreement": agreement, "rows": [
        {**{k: r.get(k) for k in COLUMNS if k not in flat}, **{k: r[k] for k in extra if k in r},
         "metrics": {k: {"mean": r[f"{k}_mean"], "std": r[f"{k}_std"]} for k in METRIC_NAMES
                     if f"{k}_mean" in r}} for r in rows], "pairs": pairs}, indent=2))
