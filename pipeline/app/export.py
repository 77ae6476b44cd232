"""`taps export`: a feature file's taps with ids, labels and split, for other tools."""

from __future__ import annotations

import argparse

HELP = "write a feature file's taps with ids, labels and split to npz, parquet or csv"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from features.pooling import DEFAULT_POOLING, POOLINGS

    from ..api import FORMATS

    p.add_argument("file", help="a feature file, or several of the same samples (one per backbone), comma-separated")
    p.add_argument("--taps", required=True, help="comma-separated taps (each its own columns) or fused sets a+b; "
                                                 "BACKBONE/TAP with several files")
    p.add_argument("--format", default=FORMATS[0], choices=FORMATS, help="(default: %(default)s)")
    p.add_argument("--pool", default=DEFAULT_POOLING, choices=POOLINGS,
                   help="the pooling of spatial taps to export (default: %(default)s)")
    p.add_argument("--out", help="the file to write (default: beside the feature file, named by the taps)")


def run(args) -> None:
    from ..api import export_features

    print(export_features(args.file, args.taps, args.out, fmt=args.format, pooling=args.pool))
