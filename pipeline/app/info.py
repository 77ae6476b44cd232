"""`taps info`: a feature file's settings, samples and taps."""

from __future__ import annotations

import argparse
import json

HELP = "describe a feature file"
SHOWN = ("backbone", "weights", "transform", "dataset", "dataset_fingerprint", "n_samples", "complete", "created")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file")
    p.add_argument("--copies", nargs="?", const="", metavar="TAP",
                   help="list the byte-identical images; with TAP (one tap or a+b) also the near-copies by it "
                        "(resized, re-encoded, mirrored), to clean the dataset")


def run(args) -> None:
    from features.store import FeatureFile

    f = FeatureFile(args.file)
    for k in SHOWN:
        print(f"{k}: {f.attrs.get(k)}")
    print(f"format_version: {f.attrs.get('format_version', 1)}")
    print(f"fingerprint_version: {f.fingerprint_version}")
    groups = f.duplicate_groups()
    print("byte-identical images: not recorded (older file)" if groups is None else
          f"byte-identical images: {(groups != range(len(groups))).sum()} copies of "
          f"{len(set(groups[groups != range(len(groups))]))} images")
    if "shard" in f.attrs:
        start = int(f.attrs["shard_start"])
        print(f"shard: {f.attrs['shard']}, samples {start}..{start + len(f.labels) - 1} of {f.attrs['full_n_samples']}; "
              f"combine the shards with `taps merge`")
    print(f"classes: {len(f.classes)}; splits: {sorted(set(f.split)) if f.split else 'none'}; "
          f"skipped images: {len(f.errors)}")
    for sample, reason in sorted(f.errors.items()):  # undecodable: in no split of any fit
        print(f"  {sample}: {reason}")
    for key, t in f.taps.items():
        print(f"tap {key}: node={t.node} pooling={t.pooling} dim={t.dim} precision={t.precision} "
              f"decode={t.decode} orientation={t.orientation} runtime={t.runtime} rows={t.rows_done}/{len(f.labels)} "
              f"complete={t.complete}{_how(t.extra)}")
    if args.copies is not None:
        _print_copies(f, args.copies or None)
    print(f.path)


def _print_copies(f, tap: str | None) -> None:
    """Each group of copies, one line: its images, and its classes where there are two or more."""
    from ..api import copies
    from ..nearcopies import RATIO

    found = copies(f, tap)
    near = [c for c in found if c["kind"] == "near"]
    print(f"copies: {len(found) - len(near)} group(s) of byte-identical images" + ("" if tap is None else
          f", {len(near)} pair(s) of near-copies by {tap} (within {RATIO:g}x its typical nearest-neighbour "
          f"distance)") + f", {sum(len(c['classes']) > 1 for c in found)} under two or more classes")
    for c in found:
        how = "=" if c["kind"] == "bytes" else f"~ ({c['distance']:.3f})"
        classes = f"  [classes {', '.join(c['classes'])}]" if len(c["classes"]) > 1 else ""
        print(f"  {f' {how} '.join(c['ids'])}{classes}")


def _how(extra: dict) -> str:
    """What else made a tap what it is: int8's agreement with fp32, a compiled forward."""
    parts = []
    if "int8" in extra:
        record = json.loads(extra["int8"])
        agreement, calibration = record["agreement"], record["calibration"]
        parts.append(f"int8: cosine with fp32 {agreement['cosine']:.4f} (min {agreement['cosine_min']:.4f}), error "
                     f"{agreement['relative_error']:.3f}, calibrated on {calibration['images']} images "
                     f"(seed {calibration['seed']})")
    if extra.get("compiled"):
        parts.append(f"compiled (batches of {extra['compiled']})")
    return "".join(f"; {p}" for p in parts)
