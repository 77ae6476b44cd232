"""`taps compare`: rows for many taps, tap sets, backbones and classifiers on the same splits; LogME
scores (--score) or few-shot curves (--shots) instead of full-data fits."""

from __future__ import annotations

import argparse
from pathlib import Path

from features.errors import UsageError

from .args import (
    add_backbone_args,
    add_dataset_args,
    add_extract_args,
    add_fit_args,
    backbones,
    csv_list,
    dataset_request,
    extract_options,
    fit_options,
    result_notes,
)

HELP = "fit the same classifier on many taps (and backbones) with the same splits"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_dataset_args(p)
    add_backbone_args(p, many=True)
    p.add_argument("--taps", type=csv_list, default=["all"],
                   help="comma-separated taps, all, or fused sets such as block14+pooled (default: all)")
    p.add_argument("--fuse", action="store_true",
                   help="add the auto row: the taps to fuse chosen among the compared ones on each training split")
    p.add_argument("--score", action="store_true",
                   help="rank the taps by LogME transferability instead of fitting (seconds)")
    p.add_argument("--shots", help="few-shot curves: training images per class, e.g. 1,2,5,10,20,all (each drawn "
                                   "--tries times from the training split; the test split stays fixed)")
    p.add_argument("--tries", type=int, default=5, help="--shots: seeded draws per shot count (default: %(default)s)")
    add_extract_args(p, out_alias=False)
    add_fit_args(p, many=True)


def run(args) -> None:
    from ..protocols import parse_protocol

    nets = backbones(args)
    for bb in nets:  # a missing checkpoint is the cheaper thing to find out, before the dataset is read
        bb.check_weights()
    clfs = csv_list(args.clf)
    if len(clfs) > 1 and args.grid:
        raise UsageError("--grid is one classifier's grid; with several --clf values leave it out (each uses its own)")
    from ..tracking import Tracking, log_compare

    fits, track = _fits(args, clfs), Tracking.parse(args.track)
    images = dataset_request(args).load()
    print(f"read {images.name}: {images.class_counts()}")
    protocol = parse_protocol(args.protocol, args.test_per_class, has_split=images.splits or False)
    from ..compare import compare_taps, rank_agreement  # torch and scikit-learn: once the arguments are found good
    from ..report import format_cv_pick, format_gains, format_table

    if args.shots:
        return _shot_curves(args, images, nets, fits, protocol)
    if args.score:  # no fit: LogME per tap, every backbone's taps ranked in one list
        return _scores(args, images, nets, protocol)
    out, rows = compare_taps(images, nets, args.taps, fits, protocol,
                             seeds=args.seeds, extract_options=extract_options(args), runs_root=args.runs_root,
                             force=args.force, fuse=args.fuse)
    print(format_table(rows, args.seeds))
    for line in format_gains(rows) + format_cv_pick(rows):
        print(line)
    for a in rank_agreement(rows):
        if a["kendall_tau"] is not None:
            print(f"LogME against the fitted ranking of {a['taps']} {a['backbone']} taps ({a['clf']}): "
                  f"Kendall tau {a['kendall_tau']:.2f}")
    from ..runs import load_results

    best = next(r for r in rows if r["best"])  # the notes hold for every row (one split), near-copies for this one
    for note in result_notes(load_results(Path(best["run"])), args.seeds):
        print(note)
    if track:
        print(f"tracked as MLflow run {log_compare(track, out, rows, load_results)} (one nested run per row) in "
              f"{track.uri}")
    print(out)


def _fits(args, clfs: list[str]) -> list:
    """One FitOptions per --clf value; --prompts goes to the text classifiers only, and is refused
    when none of them reads it."""
    from ..classifiers import get_classifier, text_classifiers

    if args.prompts and not any(get_classifier(c).text for c in clfs):
        raise UsageError(f"--prompts is for --clf {', '.join(text_classifiers())}")
    return [fit_options(args, clf, prompts=get_classifier(clf).text) for clf in clfs]


def _scores(args, images, nets, protocol) -> None:
    """compare --score: every backbone's taps ranked by LogME in one list, and the file written."""
    from ..compare import score_taps, write_scores

    scored = [score_taps(images, bb, args.taps, protocol, extract_options=extract_options(args)) for bb in nets]
    ranked = sorted((r for rows in scored for r in rows), key=lambda r: -r["logme"])
    wide = max(14, *(len(r["backbone"]) + 2 for r in ranked))
    print(f"{'rank':<6}{'backbone':<{wide}}{'tap':<14}{'dim':>6}{'LogME':>10}")
    print("\n".join(f"{i + 1:<6}{r['backbone']:<{wide}}{r['tap']:<14}{r['dim']:>6}{r['logme']:>10.4f}"
                    for i, r in enumerate(ranked)))
    print(f"scored {len(ranked)} taps of {', '.join(bb.name for bb in nets)} in "
          f"{sum(rows[0]['seconds'] for rows in scored):.1f} s (LogME on seed 0's training split, no fit)")
    print(write_scores(ranked, images, nets, protocol, args.runs_root))


def _shot_curves(args, images, nets, fits, protocol) -> None:
    """compare --shots: the curve table, who leads where, and the folder."""
    from ..shots import format_curves, parse_shots, shot_curves

    if args.score or args.seeds != 1:
        raise UsageError("--shots draws its training images --tries times on one fixed test split; leave out "
                         f"{'--score' if args.score else '--seeds'}")
    out, points, sentence = shot_curves(images, nets, args.taps, fits, protocol, shots=parse_shots(args.shots),
                                        tries=args.tries, extract_options=extract_options(args),
                                        runs_root=args.runs_root, fuse=args.fuse)
    print(format_curves(points))
    print(sentence)
    print(out)
