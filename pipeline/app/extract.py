"""`taps extract`: one feature file per backbone of --backbone."""

from __future__ import annotations

import argparse

from features.errors import UsageError

from .args import add_backbone_args, add_dataset_args, add_extract_args, csv_list, extract_options, feature_request

HELP = "run a frozen backbone over a dataset and cache tap embeddings to HDF5"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from features.options import CHOICES, ExtractOptions

    add_dataset_args(p)
    add_backbone_args(p, many=True)
    p.add_argument("--taps", type=csv_list, help="comma-separated taps, or all (default: the standard embedding)")
    add_extract_args(p)
    p.add_argument("--force", action="store_true", help="rebuild the feature file from scratch")
    g = p.add_argument_group("scale-out")
    g.add_argument("--shard", help="extract the I-th of N contiguous slices into its own file (I/N, 0-based); "
                                   "combine with `taps merge`")
    g.add_argument("--engine", default=ExtractOptions.engine, choices=CHOICES["engine"],
                   help="ray: Ray Data (needs taps[ray]) (default: %(default)s)")
    g.add_argument("--ray-address", help="ray: cluster address (auto, ray://host:10001); default: a local Ray")
    g.add_argument("--gpus-per-worker", type=float, default=ExtractOptions.gpus_per_worker,
                   help="ray: GPUs per backbone actor")


def run(args) -> None:
    """A tap ``A/t`` is backbone A's, a plain one every backbone's; every name is checked (and every
    checkpoint found) before the dataset is read, and before torch is imported."""
    from features.joined import BACKBONE_SEPARATOR, split_key

    options = extract_options(args)
    request = feature_request(args)
    backbones = [request.backbone(name) for name in request.backbones]
    mine = {bb.name: [] for bb in backbones}
    for spec in args.taps or []:
        name, tap = split_key(spec) if BACKBONE_SEPARATOR in spec else (None, spec)
        if name is not None and name not in mine:
            raise UsageError(f"tap {spec!r} names backbone {name!r}, which is not one of {', '.join(mine)}; "
                             f"pass it with --backbone")
        for other, taps in mine.items():
            if name in (None, other):
                taps.append(tap)
    for backbone in backbones:
        backbone.resolve_taps(mine[backbone.name] or None)
        backbone.check_weights()  # before the dataset: a missing checkpoint is the cheaper thing to find out
    images = request.dataset.load()
    print(f"read {images.name}: {images.class_counts()}")
    from features.extract import extract

    for backbone in backbones:
        report = extract(images, backbone, mine[backbone.name] or None, options)
        print(describe_extraction(report))
        print(report.path)


def _ready_after(report) -> str:
    compiled = f"{report.compile_seconds:.1f} s of torch.compile" if report.compile_seconds else ""
    if report.startup_seconds > report.compile_seconds + 0.05:  # replicas: processes started as well
        return f" after {report.startup_seconds:.1f} s of start-up" + (f" ({compiled})" if compiled else "")
    return f" after {compiled}" if compiled else ""


def describe_extraction(report) -> str:
    """What an extraction did, for people: rates, the runtime chosen, what was reused or skipped."""
    lines = []
    if report.computed:
        lines.append(f"extracted {', '.join(report.computed)} for {report.samples} samples: {report.images} images in "
                     f"{report.seconds:.1f} s ({report.images_per_second:.1f} img/s, {report.device}, {report.precision})"
                     + _ready_after(report))
    if report.computed and report.runtime_note:
        lines.append(report.runtime_note)
    if report.reused:
        lines.append(f"reused {', '.join(report.reused)} (already complete)")
    if report.skipped:
        lines.append(f"skipped {len(report.skipped)} undecodable images:")
        lines += [f"  {sid}: {reason}" for sid, reason in sorted(report.skipped.items())]
    return "\n".join(lines)
