"""`taps` command line: argparse subcommands that call library functions, nothing more.

Every failure the user can fix prints one line and exits 1 (2 for usage errors);
the last line a successful command prints is the path of what it made.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from features.errors import TapsError

DEFAULT_DATASET = "digits"
DEFAULT_BACKBONE = "mobilenet_v2"
FEATURES_ROOT = "feature_store"
RUNS_ROOT = "runs"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line instead of usage + error
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _csv_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _add_dataset_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("dataset")
    g.add_argument("--dataset", default=DEFAULT_DATASET,
                   help="digits, fashion_mnist, caltech101, cifar10, stl10, dtd, flowers102, eurosat, "
                        "folder:PATH or csv:PATH (default: %(default)s)")
    g.add_argument("--data-root", default="data", help="where named datasets are read or downloaded (default: %(default)s)")
    g.add_argument("--image-column", help="csv: column with image paths (default: the first)")
    g.add_argument("--label-column", help="csv: column with labels (default: the second)")
    g.add_argument("--allow-outside-root", action="store_true", help="csv: allow image paths outside the CSV's folder")


def _add_backbone_args(p: argparse.ArgumentParser, many: bool = False) -> None:
    g = p.add_argument_group("backbone")
    g.add_argument("--backbone", default=DEFAULT_BACKBONE,
                   help="torchvision model name" + (", or several comma-separated" if many else "") + " (default: %(default)s)")
    g.add_argument("--weights", default="auto",
                   help="auto (DEFAULT, or the cached pretrained weights offline), DEFAULT, an enum name such as "
                        "IMAGENET1K_V1, none, or a local .pth state dict (default: %(default)s)")
    g.add_argument("--image-size", type=int, help="square input size instead of the weights' preprocessing")


def _add_extract_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("extraction")
    g.add_argument("--pool", default="avg", help="pooling of spatial taps: avg, max, avgmax, pyramid (default: %(default)s)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (default: %(default)s)")
    g.add_argument("--precision", default="auto", help="auto, fp32, bf16 or fp16 autocast (default: %(default)s)")
    g.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default: %(default)s)")
    g.add_argument("--workers", type=int, help="DataLoader worker processes (default: one per core, at most 8)")
    g.add_argument("--no-channels-last", dest="channels_last", action="store_false", help="keep NCHW memory layout")
    g.add_argument("--on-error", default="skip", help="bad images: skip (record and go on) or fail (default: %(default)s)")
    g.add_argument("--features-root", "--out", dest="features_root", default=FEATURES_ROOT,
                   help="folder of feature files (default: %(default)s)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")


def _images(args):
    from features.datasets import load_dataset

    options = {}
    if args.dataset.startswith("csv:"):
        options = {"image_column": args.image_column, "label_column": args.label_column,
                   "allow_outside": args.allow_outside_root}
    return load_dataset(args.dataset, args.data_root, **options)


def _backbone(args, name: str | None = None):
    from features.backbones import Backbone

    return Backbone(name or args.backbone, weights=args.weights, image_size=args.image_size)


def cmd_list(args) -> None:
    from features.backbones import Backbone, backbone_names
    from features.datasets import dataset_names
    from features.pooling import MULTIPLIER, is_spatial

    if args.what == "backbones":
        print(" ".join(backbone_names()))
    elif args.what == "datasets":
        print(" ".join(dataset_names()))
    elif args.what in ("taps", "nodes"):
        if not args.backbone:
            raise TapsError(f"`taps list {args.what}` needs a backbone name, e.g. `taps list {args.what} mobilenet_v2`")
        bb = Backbone(args.backbone, weights="none", image_size=args.image_size)
        if args.what == "nodes":
            print("\n".join(bb.node_names()))
            return
        print(f"{bb.name} at {bb.input_size}px (standard embedding: {bb.default_tap})")
        print(f"{'tap':<14}{'node':<22}{'output shape':<18}" + "".join(f"{p:>9}" for p in MULTIPLIER))
        for tap in bb.taps.values():
            dims = [tap.shape[0] * m if is_spatial(tap.shape) else tap.shape[0] for m in MULTIPLIER.values()]
            print(f"{tap.name:<14}{tap.node:<22}{'x'.join(map(str, tap.shape)):<18}" + "".join(f"{d:>9}" for d in dims))
        print("columns avg..pyramid: embedding size per pooling (vector taps are not pooled)")


def cmd_extract(args) -> None:
    from features.extract import extract

    images = _images(args)
    report = extract(images, _backbone(args), args.taps, pooling=args.pool, out=args.features_root,
                     device=args.device, precision=args.precision, batch_size=args.batch_size,
                     workers=args.workers, channels_last=args.channels_last, on_error=args.on_error,
                     force=args.force, progress=args.progress)
    print(describe_extraction(report, len(images)))
    print(report.path)


def describe_extraction(report, n: int) -> str:
    lines = []
    if report.computed:
        lines.append(f"extracted {', '.join(report.computed)} for {n} samples: {report.images} images in "
                     f"{report.seconds:.1f} s ({report.images_per_second:.1f} img/s, {report.device}, {report.precision})")
    if report.reused:
        lines.append(f"reused {', '.join(report.reused)} (already complete)")
    if report.skipped:
        lines.append(f"skipped {len(report.skipped)} undecodable images:")
        lines += [f"  {sid}: {reason}" for sid, reason in sorted(report.skipped.items())]
    return "\n".join(lines)


def cmd_info(args) -> None:
    from features.store import FeatureFile

    f = FeatureFile(args.file)
    for k in ("backbone", "weights", "transform", "dataset", "dataset_fingerprint", "n_samples", "complete", "created"):
        print(f"{k}: {f.attrs.get(k)}")
    print(f"classes: {len(f.classes)}; splits: {sorted(set(f.split)) if f.split else 'none'}; "
          f"skipped images: {len(f.errors)}")
    for key, a in f.taps.items():
        print(f"tap {key}: node={a['node']} pooling={a['pooling']} dim={a['dim']} precision={a['precision']} "
              f"rows={a['rows_done']}/{len(f.labels)} complete={a['complete']}")
    print(f.path)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="taps", description="Cache frozen-CNN embeddings from layer taps, then fit linear classifiers.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("list", help="list backbones, datasets, a backbone's taps or its raw graph nodes")
    p.add_argument("what", choices=["backbones", "datasets", "taps", "nodes"])
    p.add_argument("backbone", nargs="?")
    p.add_argument("--image-size", type=int)
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("extract", help="run a frozen backbone over a dataset and cache tap embeddings to HDF5")
    _add_dataset_args(p)
    _add_backbone_args(p)
    p.add_argument("--taps", type=_csv_list, help="comma-separated taps, or all (default: the standard embedding)")
    _add_extract_args(p)
    p.add_argument("--force", action="store_true", help="rebuild the feature file from scratch")
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("info", help="describe a feature file")
    p.add_argument("file")
    p.set_defaults(func=cmd_info)

    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except TapsError as exc:
        print(f"taps {args.command}: error: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print(f"taps {args.command}: interrupted; finished work is saved, rerun the same command to resume",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
