"""`taps fit`: one classifier on one tap (a fused set, or ``auto``) of a feature file, scored over
seeded splits; the run folder is the last line."""

from __future__ import annotations

import argparse

from .args import (
    FEATURES_ROOT,
    add_backbone_args,
    add_dataset_args,
    add_fit_args,
    csv_tuple,
    feature_request,
    fit_options,
    result_notes,
)

HELP = "fit a classifier on one cached tap and score it"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from features.pooling import DEFAULT_POOLING, POOLINGS

    from ..options import FitOptions

    add_dataset_args(p)
    add_backbone_args(p, many=True)
    p.add_argument("--tap", help="tap to fit on; taps joined by + are fused (block14+pooled); auto chooses the set "
                                 "among the file's taps on each training split (default: the standard embedding)")
    p.add_argument("--pool", default=DEFAULT_POOLING, choices=POOLINGS,
                   help="pooling the tap was extracted with (default: %(default)s)")
    p.add_argument("--features", type=csv_tuple, help="a feature file (or several, comma-separated: one per "
                                                      "backbone), instead of finding it from the settings")
    p.add_argument("--features-root", default=FEATURES_ROOT, help="where `extract` wrote (default: %(default)s)")
    p.add_argument("--device", default=FitOptions.device, help="device for the torch solvers (default: %(default)s)")
    add_fit_args(p)


def run(args) -> None:
    from ..protocols import parse_protocol
    from ..tracking import Tracking, log_fit

    request, options, track = feature_request(args), fit_options(args), Tracking.parse(args.track)
    features, tap = request.open_for_fit(args.tap)
    protocol = parse_protocol(args.protocol, args.test_per_class, has_split=features.split or False)
    from ..evaluate import fit_run  # scikit-learn: once the arguments and the file are found good
    from ..report import fmt

    run_dir, results, reused = fit_run(features, tap, args.pool, options, protocol, seeds=args.seeds,
                                       runs_root=args.runs_root, force=args.force)
    m, used = results.metrics, results.features
    chosen = ", ".join(f"{v:g}" for v in results.chosen[options.param])
    selection = "; ".join(dict.fromkeys(s.selection for s in results.per_seed))
    files = " + ".join(p.name for p in getattr(features, "paths", [features.path]))
    print(f"{'reused' if reused else 'fitted'} {options.clf} on {used.tap} ({used.dim}-D) of {files}, "
          f"protocol {results.settings['protocol']}, {args.seeds} seed(s), {options.param} by {selection}")
    if results.per_seed[0].tap_selection:
        print(f"--tap auto ({options.select}) chose: " + "; ".join(
            f"seed {s.seed} {'+'.join(s.taps)} ({s.tap_selection['seconds']:.1f} s)" for s in results.per_seed))
    wide = max(14, len(used.tap) + 2)  # a fused set across backbones names every member
    values = max(13, len(chosen) + 1)  # one chosen value per seed
    print(f"{'tap':<{wide}}{'dim':>6}  {'clf':<7}{'accuracy':>12}{'mean/class':>12}{'macro F1':>12}{'top-5':>12}  "
          f"{options.param:<{values}}{'fit s':>7}")
    print(f"{used.tap:<{wide}}{used.dim:>6}  {options.clf:<7}" + "".join(
        f"{fmt(m.get(k), args.seeds):>12}" for k in ("accuracy", "mean_per_class_accuracy", "macro_f1", "top5_accuracy"))
        + f"  {chosen:<{values}}{results.fit_seconds['mean']:>7.1f}")
    for note in result_notes(results, args.seeds):
        print(note)
    if track:
        print(f"tracked as MLflow run {log_fit(track, run_dir, results)} in {track.uri}")
    print(run_dir)
