"""`taps merge`: the shard files of one extraction into one feature file."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "combine the shard files of one extraction into one feature file"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("shards", nargs="+", help="the .shardIofN.h5 files")
    p.add_argument("--out", help="merged file (default: the shard name without .shardIofN)")
    p.add_argument("--force", action="store_true", help="replace an existing merged file")


def run(args) -> None:
    from features.shards import merge_shards

    out = merge_shards([Path(p) for p in args.shards], Path(args.out) if args.out else None, args.force)
    print(f"merged {len(args.shards)} shards")
    print(out)
