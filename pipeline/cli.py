"""`taps` command line: argparse subcommands that call library functions, nothing more.

Every failure the user can fix prints one line and exits 1 (2 for usage errors);
the last line a successful command prints is the path of what it made.
"""

from __future__ import annotations

import argparse
import difflib
import itertools
import os
import shlex
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from features.datasets import DUPLICATES
from features.errors import TapsError, UsageError
from features.runtime import limit_openmp_spinning

if TYPE_CHECKING:  # the CLI imports its jobs lazily: `taps --help` must not pay for torch
    from .results import RunResult

limit_openmp_spinning()  # libgomp reads it when torch loads it, so before anything imports torch

DEFAULT_DATASET = "digits"
DEFAULT_BACKBONE = "mobilenet_v2"
FEATURES_ROOT = "feature_store"
RUNS_ROOT = "runs"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line instead of usage + error
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _Renamed(argparse.Action):
    """An option under its old spelling: still accepted, with a one-line note of the new one."""

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"taps: note: {option_string} is now spelled {self.metavar}; the old spelling still works",
              file=sys.stderr)
        setattr(namespace, self.dest, values)


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
    g.add_argument("--allow-outside-root", action="store_true",
                   help="csv, folder: allow image paths (or links) that lead outside the dataset's folder")
    g.add_argument("--subset", help="a seeded random subset: N samples, or per split as train:5000,test:2000")
    g.add_argument("--duplicates", default="error", choices=DUPLICATES,
                   help="csv, folder: an image file listed more than once (repeated rows, links to one file) is "
                        "refused (error) or kept once, at its first row (first) (default: %(default)s)")
    g.add_argument("--encoding", default="utf-8-sig",
                   help="csv: the file's text encoding, e.g. cp1252 or latin-1 (default: UTF-8, with or without a BOM)")
    g.add_argument("--verify-content", action="store_true",
                   help="fingerprint the dataset by its images' bytes (not their sizes and times), and on a rerun "
                        "name each image whose bytes changed")


def _add_backbone_args(p: argparse.ArgumentParser, many: bool = False) -> None:
    g = p.add_argument_group("backbone")
    g.add_argument("--backbone", default=DEFAULT_BACKBONE,
                   help="torchvision model name or timm:NAME" + (", or several comma-separated" if many else "")
                        + " (default: %(default)s)")
    g.add_argument("--weights", default="auto",
                   help="auto (DEFAULT, or the cached pretrained weights offline), DEFAULT, an enum name such as "
                        "IMAGENET1K_V1 or timm tag, none, or a local .pth state dict" +
                        ("; one for all backbones or one per backbone, comma-separated" if many else "")
                        + " (default: %(default)s)")
    g.add_argument("--image-size", type=int, help="square input size instead of the weights' preprocessing")


def _add_extract_args(p: argparse.ArgumentParser, out_alias: bool = True) -> None:
    from features.options import CHOICES, ExtractOptions

    g = p.add_argument_group("extraction")
    g.add_argument("--pool", default=ExtractOptions.pooling, choices=CHOICES["pooling"],
                   help="pooling of spatial taps (default: %(default)s)")
    g.add_argument("--device", default="auto", choices=CHOICES["device"], help="(default: %(default)s)")
    g.add_argument("--precision", default="auto", choices=CHOICES["precision"],
                   help="autocast precision; auto: fp16 on CUDA, bf16 on CPUs with bf16 kernels, else fp32; "
                        "int8 (--runtime openvino or auto): quantised after training, calibrated on 300 images of "
                        "the dataset, its agreement with fp32 recorded (default: %(default)s)")
    g.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default: %(default)s)")
    g.add_argument("--workers", type=int,
                   help="parallelism of the loader: decode threads (inline), DataLoader processes (workers), "
                        "model replicas (replicas) or Ray actors (--engine ray); default: one per core, at most 8 "
                        "(Ray: one actor)")
    g.add_argument("--loader", default="auto", choices=CHOICES["loader"],
                   help="replicas: one single-threaded model per CPU core, each decoding its own batches; inline: "
                        "one model on all cores, decoding each batch between forward passes; workers: decode ahead "
                        "in DataLoader processes; auto: replicas on CPUs for datasets of 20,000+ images, else inline; "
                        "workers on CUDA/MPS (default: %(default)s)")
    g.add_argument("--compile", default="auto", choices=CHOICES["compile"],
                   help="torch.compile the extractor; auto: for datasets large enough to repay the compile time "
                        "(default: %(default)s)")
    g.add_argument("--decode", default="auto", choices=CHOICES["decode"],
                   help="simplejpeg (libjpeg-turbo, then torch's uint8 resize, on the decode threads), pil "
                        "(draft-mode JPEG decoding, box resize) or torchvision (decode_jpeg and resizing on the "
                        "model's device: nvJPEG on CUDA); auto: torchvision on CUDA, else simplejpeg "
                        "(default: %(default)s)")
    g.add_argument("--runtime", default=ExtractOptions.runtime, choices=CHOICES["runtime"],
                   help="onnxruntime (fp32) or openvino (fp32, int8, or bf16 where the CPU has it): the extractor "
                        "exported to ONNX once (checked against torch, cached) and run by that runtime on the CPU; "
                        "falls back to torch with a warning if it does not export; auto: the fastest installed "
                        "runtime on a calibration batch, recorded with the rates and reused on this CPU for the same "
                        "model, taps and batch size (default: %(default)s)")
    g.add_argument("--retime", action="store_true", help="--runtime auto: time the runtimes again instead of reusing "
                                                         "the choice recorded for this CPU")
    g.add_argument("--no-channels-last", dest="channels_last", action="store_false", help="keep NCHW memory layout")
    g.add_argument("--on-error", default="skip", choices=CHOICES["on_error"],
                   help="bad images: skip (record and go on) or fail (default: %(default)s)")
    g.add_argument("--features-root", dest="features_root", default=FEATURES_ROOT,
                   help="folder of feature files (default: %(default)s)")
    if out_alias:  # extract's --out named the feature folder before fit and compare's named the runs
        g.add_argument("--out", dest="features_root", action=_Renamed, metavar="--features-root",
                       help=argparse.SUPPRESS)
    g.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")


def _extract_options(args):
    """The CLI's extraction flags as one :class:`features.options.ExtractOptions` (validated here)."""
    from features.options import ExtractOptions
    from features.shards import parse_shard

    return ExtractOptions(
        pooling=args.pool, device=args.device, precision=args.precision, batch_size=args.batch_size,
        workers=args.workers, channels_last=args.channels_last, on_error=args.on_error, loader=args.loader,
        compile=args.compile, decode=args.decode, runtime=args.runtime, out=args.features_root, progress=args.progress,
        verify_content=args.verify_content, retime=args.retime,
        force=getattr(args, "force", False) and args.command == "extract",
        shard=parse_shard(args.shard) if getattr(args, "shard", None) else None,
        engine=getattr(args, "engine", "local"), ray_address=getattr(args, "ray_address", None),
        gpus_per_worker=getattr(args, "gpus_per_worker", 0.0))


def _images(args):
    from features.datasets import load_dataset

    options = ({"allow_outside": args.allow_outside_root, "duplicates": args.duplicates}
               if args.dataset.startswith(("csv:", "folder:")) else {})
    if args.dataset.startswith("csv:"):
        options.update(image_column=args.image_column, label_column=args.label_column, encoding=args.encoding)
    return load_dataset(args.dataset, args.data_root, subset_spec=args.subset, **options)


def _backbone(args, name: str | None = None):
    """``name`` (default: the first of --backbone) with its --weights: one value for every backbone, or
    one per backbone in the order of --backbone."""
    from features.backbones import Backbone

    names = _csv_list(args.backbone)
    name = name or names[0]
    weights = _csv_list(args.weights) if args.weights else [args.weights]
    if len(weights) not in (1, len(names)):
        raise UsageError(f"--weights has {len(weights)} values for {len(names)} backbones; pass one for all, "
                         f"or one per backbone in the order of --backbone")
    chosen = weights[names.index(name)] if len(weights) > 1 and name in names else weights[0]
    return Backbone(name, weights=chosen, image_size=args.image_size)


def cmd_list(args) -> None:
    from features.datasets import dataset_names
    from features.pooling import POOLINGS, get_pooling, poolable, pooled_dim

    if args.what == "datasets":
        print(" ".join(dataset_names()))
        return
    if args.what in ("taps", "nodes") and not args.backbone:
        raise UsageError(f"`taps list {args.what}` needs a backbone name, e.g. `taps list {args.what} mobilenet_v2`")
    from features.backbones import Backbone, source_listings  # torch: only for what needs a network

    if args.what == "backbones":
        print("\n".join(source_listings()))
    elif args.what in ("taps", "nodes"):
        bb = Backbone(args.backbone, weights="none", image_size=args.image_size)
        if args.what == "nodes":
            print("\n".join(bb.node_names()))
            return
        print(f"{bb.name} at {bb.input_size}px (standard embedding: {bb.default_tap})")
        taps = list(bb.taps.values())
        shapes = {t.name: (f"{t.prefix}+{t.shape[1]}x{t.shape[2]} tokens x{t.shape[0]}" if t.layout == "tokens"
                           else "x".join(map(str, t.shape))) for t in taps}
        wide = [max(len(h), *(len(x) for x in column)) + 1 for h, column in
                (("tap", [t.name for t in taps]), ("node", [t.node for t in taps]), ("output shape", shapes.values()))]
        print(f"{'tap':<{wide[0]}}{'node':<{wide[1]}}{'output shape':<{wide[2]}}" + "".join(f"{p:>8}" for p in POOLINGS))
        for tap in taps:  # columns as wide as their longest entry (timm and open_clip nodes are long)
            start = f"{tap.name:<{wide[0]}}{tap.node:<{wide[1]}}{shapes[tap.name]:<{wide[2]}}"
            if not poolable(tap.shape):
                print(f"{start}  tokens of unknown layout: not pooled")
                continue
            dims = [pooled_dim(tap.shape, p) if not get_pooling(p).class_token or tap.layout == "tokens"
                    or len(tap.shape) == 1 else "-"
                    for p in POOLINGS]
            print(start + "".join(f"{d:>8}" for d in dims))
        print("columns avg..cls: embedding size per pooling (vector taps are not pooled; cls: transformer "
              "blocks' class token; avg of tokens: the mean of the patch tokens)")


def cmd_extract(args) -> None:
    """One feature file per backbone of --backbone; a tap ``A/t`` is backbone A's, a plain one every backbone's."""
    from features.extract import extract
    from features.joined import BACKBONE_SEPARATOR, split_key

    options = _extract_options(args)
    backbones = [_backbone(args, name) for name in _csv_list(args.backbone)]
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
        backbone.resolve_taps(mine[backbone.name] or None)  # every tap name, before any extraction
        backbone.check_weights()  # before the dataset: a missing checkpoint is the cheaper thing to find out
    images = _images(args)
    print(f"read {images.name}: {images.class_counts()}")
    for backbone in backbones:
        report = extract(images, backbone, mine[backbone.name] or None, options)
        print(describe_extraction(report))
        print(report.path)


def cmd_merge(args) -> None:
    from features.shards import merge_shards

    out = merge_shards([Path(p) for p in args.shards], Path(args.out) if args.out else None, args.force)
    print(f"merged {len(args.shards)} shards")
    print(out)


def _ready_after(report) -> str:
    compiled = f"{report.compile_seconds:.1f} s of torch.compile" if report.compile_seconds else ""
    if report.startup_seconds > report.compile_seconds + 0.05:  # replicas: processes started as well
        return f" after {report.startup_seconds:.1f} s of start-up" + (f" ({compiled})" if compiled else "")
    return f" after {compiled}" if compiled else ""


def describe_extraction(report) -> str:
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


def cmd_info(args) -> None:
    from features.store import FeatureFile

    f = FeatureFile(args.file)
    for k in ("backbone", "weights", "transform", "dataset", "dataset_fingerprint", "n_samples", "complete", "created",
              "format_version"):
        print(f"{k}: {f.attrs.get(k, 1 if k == 'format_version' else None)}")
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
    for key, t in f.taps.items():
        print(f"tap {key}: node={t.node} pooling={t.pooling} dim={t.dim} precision={t.precision} "
              f"decode={t.decode} runtime={t.runtime} rows={t.rows_done}/{len(f.labels)} "
              f"complete={t.complete}")
    print(f.path)


def _fit_options(args, clf: str | None = None):
    """One classifier's FitOptions from the flags; --prompts goes to the zero-shot classifier only (with
    several --clf values the others share the flags), and is refused when no classifier reads it."""
    from .classifiers import get_classifier
    from .options import FitOptions

    names = _csv_list(args.clf)
    text = [n for n in names if get_classifier(n).text]
    if args.prompts and not text:
        raise UsageError("--prompts is for --clf zeroshot")
    return FitOptions(clf=clf or args.clf, preprocess=args.preprocess, grid=args.grid, folds=args.folds,
                      solver=args.solver, hidden=args.hidden, device=args.device, memory_budget_mb=args.memory_budget,
                      select=args.select, select_threshold=args.select_threshold, calibrate=args.calibrate,
                      prompts=args.prompts if get_classifier(clf or args.clf).text else None)


def _protocol(args, features):
    from .protocols import parse_protocol

    return parse_protocol(args.protocol, args.test_per_class, has_split=features.split or False)


def extract_command(args) -> str:
    """The `taps extract` command that writes the feature file(s) these arguments name (every backbone's)."""
    from features.pooling import DEFAULT_POOLING

    parts = ["taps", "extract", "--dataset", args.dataset]
    tap = getattr(args, "tap", None)  # fit's --tap: one tap, a fused set a+b (extract a,b) or auto (extract all)
    taps = None if not tap else "all" if tap == "auto" else tap.replace("+", ",")
    optional = [("--data-root", args.data_root, "data"), ("--subset", args.subset, None),
                ("--image-column", getattr(args, "image_column", None), None),
                ("--label-column", getattr(args, "label_column", None), None),
                ("--backbone", args.backbone, None), ("--weights", args.weights, "auto"),
                ("--image-size", args.image_size, None), ("--taps", taps, None),
                ("--pool", getattr(args, "pool", DEFAULT_POOLING), DEFAULT_POOLING),
                ("--features-root", args.features_root, FEATURES_ROOT),
                ("--duplicates", getattr(args, "duplicates", "error"), "error"),
                ("--encoding", getattr(args, "encoding", "utf-8-sig"), "utf-8-sig")]
    for flag, value, default in optional:
        if value is not None and value != default:
            parts += [flag, str(value)]
    for flag in ("allow_outside_root", "verify_content"):
        if getattr(args, flag, False):
            parts.append("--" + flag.replace("_", "-"))
    return shlex.join(parts)


def _features_file(args):
    """The feature file named by --features (taken as it is, but not with other preprocessing), or the
    one `extract` writes for the same settings, checked against the dataset as it is now; with several
    backbones (or files), their files joined (:class:`features.joined.JoinedFeatures`)."""
    from features.catalog import find_feature_file
    from features.joined import JoinedFeatures
    from features.store import FeatureFile

    if getattr(args, "features", None):
        files = [FeatureFile(path) for path in _csv_list(args.features)]
        if args.image_size:
            for features in files:
                bb = _backbone(args, features.attrs["backbone"])
                features.check_made_from({"transform": bb.transform_spec()}, "drop --image-size, or pass the file "
                                         "extracted with it")
    else:
        backbones = [_backbone(args, name) for name in _csv_list(args.backbone)]
        try:
            images = _images(args)
        except TapsError as exc:
            raise type(exc)(f"{exc} (fit reads the dataset to check that its feature file still matches it; pass "
                            f"--features FILE to fit on a file as it is)") from None
        files = [find_feature_file(images, bb, args.features_root, extract_command(args),
                                   verify_content=args.verify_content) for bb in backbones]
    return files[0] if len(files) == 1 else JoinedFeatures(files)


def _fit_tap(args, features) -> str:
    """--tap, checked against the backbones where that needs no network; without it each backbone's
    standard embedding (fused when there are several)."""
    from features.joined import BACKBONE_SEPARATOR, JoinedFeatures

    if args.features and args.tap:  # the file names the taps it has when one is missing: no network to build
        return args.tap
    if not isinstance(features, JoinedFeatures):
        backbone = _backbone(args, features.attrs["backbone"])
        _check_tap_names(args, backbone)
        return args.tap or backbone.default_tap
    backbones = {name: _backbone(args, name) for name in features.files}
    if args.tap and args.tap != "auto":
        from features.joined import split_key

        from .fusion import tap_set
        for member in tap_set(args.tap):
            name, tap = split_key(member)
            if name in backbones:
                backbones[name].resolve_taps([tap])
    return args.tap or "+".join(f"{name}{BACKBONE_SEPARATOR}{bb.default_tap}" for name, bb in backbones.items())


def cmd_fit(args) -> None:
    from .evaluate import fit_run
    from .report import fmt

    options = _fit_options(args)
    if not args.features and "," not in args.backbone:  # before the dataset: a tap the backbone lacks is a usage error
        _check_tap_names(args, _backbone(args))
    features = _features_file(args)
    tap = _fit_tap(args, features)
    run_dir, results, reused = fit_run(features, tap, args.pool, options, _protocol(args, features), seeds=args.seeds,
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
    header = f"{'tap':<14}{'dim':>6}  {'clf':<7}{'accuracy':>12}{'mean/class':>12}{'macro F1':>12}{'top-5':>12}  {options.param:<13}{'fit s':>7}"
    print(header)
    print(f"{used.tap:<14}{used.dim:>6}  {options.clf:<7}{fmt(m.get('accuracy'), args.seeds):>12}"
          f"{fmt(m.get('mean_per_class_accuracy'), args.seeds):>12}{fmt(m.get('macro_f1'), args.seeds):>12}{fmt(m.get('top5_accuracy'), args.seeds):>12}  "
          f"{chosen:<13}{results.fit_seconds['mean']:>7.1f}")
    for note in result_notes(results, args.seeds):
        print(note)
    if tracking := _tracking(args):
        from .tracking import log_fit

        print(f"tracked as MLflow run {log_fit(tracking, run_dir, results)} in {tracking.uri}")
    print(run_dir)


def _tracking(args):
    """--track, parsed (None when not asked)."""
    from .tracking import Tracking

    return Tracking.parse(args.track)


def _check_tap_names(args, backbone) -> None:
    """Refuse a --tap naming a tap the backbone does not have, suggesting the closest of its taps."""
    if args.tap and args.tap != "auto":
        from .fusion import tap_set

        backbone.resolve_taps(tap_set(args.tap))


def result_notes(results: RunResult, seeds: int) -> list[str]:
    """What a reader of a fit's numbers must know: what the ± varies over, duplicate images."""
    notes = []
    if seeds > 1 and results.seeds_vary.startswith("the CV folds only"):
        notes.append(f"note: ± over {seeds} seeds varies {results.seeds_vary}")
    ece = results.metrics.get("expected_calibration_error")
    if ece is not None:
        before = results.metrics.get("expected_calibration_error_uncalibrated")
        from .calibration import calibration_method

        notes.append(f"calibrated ({calibration_method(results.settings['clf'])}): expected calibration error on the test "
                     f"rows {ece['mean']:.3f}" + (f", {before['mean']:.3f} before" if before else
                                                   " (the uncalibrated scores were not probabilities)"))
    dup = results.duplicates
    if dup.get("groups"):
        notes.append(f"note: {dup['groups']} group(s) of byte-identical images ({dup['images']} images) in the file, "
                     f"each kept on one side of every split")
    elif dup and not dup.get("checked"):
        notes.append("note: duplicate images were not checked (the file has no content digests: a file from "
                     "before they were recorded, which `extract --force` rebuilds, or a dataset without a pixel array)")
    return notes


def cmd_predict(args) -> None:
    """Results on stdout as they come (one record per image), everything else on stderr; images stream
    through in chunks, so memory stays flat however many a folder holds."""
    from features.progress import Progress

    from .predict import Predictor, image_files, prediction_writer

    predictor = Predictor(args.run, device=args.device, weights=args.weights, top_k=args.top_k)
    header, write = prediction_writer(args.format, args.top_k)
    if header:
        print(header)
    total = failed = 0
    names = image_files(args.images)
    bar = Progress(None, "predict", enabled=args.progress)
    while chunk := list(itertools.islice(names, PREDICT_CHUNK)):
        for p in predictor.predict(chunk):
            print(write(p))
            failed += bool(p.error)
        sys.stdout.flush()
        total += len(chunk)
        bar.update(len(chunk))
    bar.close()
    if total == 0:
        raise UsageError(f"no image files in {', '.join(args.images)}; pass image files or folders of them")
    if failed == total:
        raise TapsError(f"none of the {total} images could be read (their records say why); pass image files")
    print(f"classified {total - failed} of {total} images with {args.run}", file=sys.stderr)
    if failed and not args.allow_failures:
        raise TapsError(f"{failed} of {total} images could not be read (their records say why); pass "
                        f"--allow-failures to exit 0 anyway")


def cmd_compare(args) -> None:
    from .compare import compare_taps, rank_agreement, score_taps, write_scores
    from .protocols import parse_protocol
    from .report import format_gains, format_table

    images = _images(args)
    print(f"read {images.name}: {images.class_counts()}")
    backbones = [_backbone(args, name) for name in _csv_list(args.backbone)]
    protocol = parse_protocol(args.protocol, args.test_per_class, has_split=images.splits or False)
    clfs = _csv_list(args.clf)
    if len(clfs) > 1 and args.grid:
        raise UsageError("--grid is one classifier's grid; with several --clf values leave it out (each uses its own)")
    if args.shots:
        return _shot_curves(args, images, backbones, [_fit_options(args, clf) for clf in clfs], protocol)
    if args.score:  # no fit: LogME per tap, every backbone's taps ranked in one list
        scored = [score_taps(images, bb, args.taps, protocol, extract_options=_extract_options(args))
                  for bb in backbones]
        ranked = sorted((r for rows in scored for r in rows), key=lambda r: -r["logme"])
        wide = max(14, *(len(r["backbone"]) + 2 for r in ranked))
        print(f"{'rank':<6}{'backbone':<{wide}}{'tap':<14}{'dim':>6}{'LogME':>10}")
        print("\n".join(f"{i + 1:<6}{r['backbone']:<{wide}}{r['tap']:<14}{r['dim']:>6}{r['logme']:>10.4f}"
                        for i, r in enumerate(ranked)))
        print(f"scored {len(ranked)} taps of {', '.join(bb.name for bb in backbones)} in "
              f"{sum(rows[0]['seconds'] for rows in scored):.1f} s (LogME on seed 0's training split, no fit)")
        print(write_scores(ranked, images, backbones, protocol, args.runs_root))
        return
    out, rows = compare_taps(images, backbones, args.taps, [_fit_options(args, clf) for clf in clfs], protocol,
                             seeds=args.seeds, extract_options=_extract_options(args), runs_root=args.runs_root,
                             force=args.force, fuse=args.fuse)
    print(format_table(rows, args.seeds))
    for line in format_gains(rows):
        print(line)
    for a in rank_agreement(rows):
        if a["kendall_tau"] is not None:
            print(f"LogME against the fitted ranking of {a['taps']} {a['backbone']} taps ({a['clf']}): "
                  f"Kendall tau {a['kendall_tau']:.2f}")
    from .runs import load_results

    for note in result_notes(load_results(Path(rows[0]["run"])), args.seeds):
        print(note)
    if tracking := _tracking(args):
        from .tracking import log_compare

        print(f"tracked as MLflow run {log_compare(tracking, out, rows, load_results)} (one nested run per row) in "
              f"{tracking.uri}")
    print(out)


def _shot_curves(args, images, backbones, fits, protocol) -> None:
    """compare --shots: the curve table, who leads where, and the folder."""
    from .shots import format_curves, parse_shots, shot_curves

    if args.score or args.seeds != 1:
        raise UsageError("--shots draws its training images --tries times on one fixed test split; leave out "
                         f"{'--score' if args.score else '--seeds'}")
    out, points, sentence = shot_curves(images, backbones, args.taps, fits, protocol, shots=parse_shots(args.shots),
                                        tries=args.tries, extract_options=_extract_options(args), runs_root=args.runs_root,
                                        fuse=args.fuse)
    print(format_curves(points))
    print(sentence)
    print(out)


def cmd_bench(args) -> None:
    from .bench import BenchSettings, run_bench

    settings = BenchSettings(backbone=args.backbone, images=args.images, data_root=args.data_root,
                             batch_size=args.batch_size, taps=args.taps, device=args.device,
                             rss_sizes=tuple(args.rss_sizes), out=args.out, features_root=args.features_root,
                             reference=args.reference, rounds=args.rounds, compile=args.compile,
                             precision=args.precision, quick=args.quick,
                             runtimes=() if args.quick and args.runtimes is None else args.runtimes)
    text, _ = run_bench(settings, log=lambda msg: print(msg, file=sys.stderr))
    print(text)
    print(Path(args.out) / "bench.txt")


def _add_fit_args(p: argparse.ArgumentParser, many: bool = False) -> None:
    from .classifiers import CLASSIFIERS, SOLVERS
    from .options import SELECTORS, FitOptions

    g = p.add_argument_group("classifier and protocol")
    if many:
        g.add_argument("--clf", default=FitOptions.clf, help=f"{', '.join(CLASSIFIERS)}, or several comma-separated (rows for "
                                                    f"each, on the same splits) (default: %(default)s)")
    else:
        g.add_argument("--clf", default=FitOptions.clf, choices=CLASSIFIERS,
                       help="softmax is an alias of logreg; knn is a weighted k-NN probe (default: %(default)s)")
    g.add_argument("--preprocess", default=FitOptions.preprocess,
                   help="standard, l2, none, pca:K, or a comma list (default: %(default)s)")
    g.add_argument("--protocol", default="auto",
                   help="official, per-class:N, fraction:F or auto (official if the file has a split, else fraction:0.5)")
    g.add_argument("--test-per-class", type=int, help="cap on test images per class")
    g.add_argument("--seeds", type=int, default=1, help="repeat over this many seeded splits (default: %(default)s)")
    g.add_argument("--grid", type=lambda s: [float(v) for v in _csv_list(s)],
                   help="comma-separated C (svm, logreg), weight decay (linear) or k (knn) values; default: a log grid")
    g.add_argument("--folds", type=int, default=3, help="cross-validation folds for the grid (default: %(default)s)")
    g.add_argument("--solver", default=FitOptions.solver, choices=SOLVERS,
                   help="torch (L-BFGS) or sklearn (LinearSVC/LogisticRegression reference) (default: %(default)s)")
    g.add_argument("--hidden", type=int, default=0, help="linear: hidden units (0: a plain linear head)")
    g.add_argument("--memory-budget", type=float, help="MiB for an in-memory fit (default: half the free RAM); "
                                                        "above it linear streams from HDF5, svm/logreg refuse")
    g.add_argument("--select", default=FitOptions.select, choices=SELECTORS,
                   help="how --tap auto chooses the taps to fuse on each training split: forward (greedy, by CV) or "
                        "group-lasso (Head2Toe's ranking, the count by CV) (default: %(default)s)")
    g.add_argument("--select-threshold", type=float, default=0.002,
                   help="auto: the least CV-accuracy gain (0-1) that adds a tap (default: %(default)s)")
    g.add_argument("--prompts", help="--clf zeroshot: a file of prompt templates, one per line with {} for the class "
                                     "name (default: open_clip's 80 ImageNet templates)")
    g.add_argument("--calibrate", action="store_true",
                   help="calibrate the probabilities on out-of-fold training scores (a temperature; Platt scaling "
                        "for svm), report the expected calibration error before and after; predict uses them")
    g.add_argument("--track", help="log the fit (compare: a parent run and one per row) to MLflow: mlflow for a "
                                   "local ./mlruns store, or mlflow:URI (needs the track extra)")
    g.add_argument("--runs-root", dest="runs_root", default=RUNS_ROOT,
                   help="folder of run folders (default: %(default)s)")
    g.add_argument("--out", dest="runs_root", action=_Renamed, metavar="--runs-root", help=argparse.SUPPRESS)
    g.add_argument("--force", action="store_true", help="recompute even if a run with identical settings exists")


def _add_list_command(p: argparse.ArgumentParser) -> None:
    p.add_argument("what", choices=["backbones", "datasets", "taps", "nodes"])
    p.add_argument("backbone", nargs="?")
    p.add_argument("--image-size", type=int)
    p.set_defaults(func=cmd_list)


def _add_extract_command(p: argparse.ArgumentParser) -> None:
    _add_dataset_args(p)
    _add_backbone_args(p, many=True)
    p.add_argument("--taps", type=_csv_list, help="comma-separated taps, or all (default: the standard embedding)")
    _add_extract_args(p)
    p.add_argument("--force", action="store_true", help="rebuild the feature file from scratch")
    g = p.add_argument_group("scale-out")
    g.add_argument("--shard", help="extract the I-th of N contiguous slices into its own file (I/N, 0-based); "
                                   "combine with `taps merge`")
    g.add_argument("--engine", default="local", choices=("local", "ray"),
                   help="ray: Ray Data (needs taps[ray]) (default: %(default)s)")
    g.add_argument("--ray-address", help="ray: cluster address (auto, ray://host:10001); default: a local Ray")
    g.add_argument("--gpus-per-worker", type=float, default=0.0, help="ray: GPUs per backbone actor")
    p.set_defaults(func=cmd_extract)


def _add_merge_command(p: argparse.ArgumentParser) -> None:
    p.add_argument("shards", nargs="+", help="the .shardIofN.h5 files")
    p.add_argument("--out", help="merged file (default: the shard name without .shardIofN)")
    p.add_argument("--force", action="store_true", help="replace an existing merged file")
    p.set_defaults(func=cmd_merge)


def _add_info_command(p: argparse.ArgumentParser) -> None:
    p.add_argument("file")
    p.set_defaults(func=cmd_info)


def _add_export_command(p: argparse.ArgumentParser) -> None:
    from features.pooling import DEFAULT_POOLING, POOLINGS

    p.add_argument("file", help="a feature file, or several of the same samples (one per backbone), comma-separated")
    p.add_argument("--taps", required=True, help="comma-separated taps (each its own columns) or fused sets a+b; "
                                                 "BACKBONE/TAP with several files")
    p.add_argument("--format", default="npz", choices=("npz", "parquet", "csv"), help="(default: %(default)s)")
    p.add_argument("--pool", default=DEFAULT_POOLING, choices=POOLINGS,
                   help="the pooling of spatial taps to export (default: %(default)s)")
    p.add_argument("--out", help="the file to write (default: beside the feature file, named by the taps)")
    p.set_defaults(func=cmd_export)


def cmd_export(args) -> None:
    from .api import export_features

    print(export_features(args.file, args.taps, args.out, fmt=args.format, pooling=args.pool))


def _add_fit_command(p: argparse.ArgumentParser) -> None:
    from features.pooling import DEFAULT_POOLING, POOLINGS

    _add_dataset_args(p)
    _add_backbone_args(p, many=True)
    p.add_argument("--tap", help="tap to fit on; taps joined by + are fused (block14+pooled); auto chooses the set "
                                 "among the file's taps on each training split (default: the standard embedding)")
    p.add_argument("--pool", default=DEFAULT_POOLING, choices=POOLINGS, help="pooling the tap was extracted with (default: %(default)s)")
    p.add_argument("--features", help="a feature file (or several, comma-separated: one per backbone), instead of finding it from the settings")
    p.add_argument("--features-root", default=FEATURES_ROOT, help="where `extract` wrote (default: %(default)s)")
    p.add_argument("--device", default="auto", help="device for the torch solvers (default: %(default)s)")
    _add_fit_args(p)
    p.set_defaults(func=cmd_fit)


def _add_compare_command(p: argparse.ArgumentParser) -> None:
    _add_dataset_args(p)
    _add_backbone_args(p, many=True)
    p.add_argument("--taps", type=_csv_list, default=["all"],
                   help="comma-separated taps, all, or fused sets such as block14+pooled (default: all)")
    p.add_argument("--fuse", action="store_true",
                   help="add the auto row: the taps to fuse chosen among the compared ones on each training split")
    p.add_argument("--score", action="store_true",
                   help="rank the taps by LogME transferability instead of fitting (seconds)")
    p.add_argument("--shots", help="few-shot curves: training images per class, e.g. 1,2,5,10,20,all (each drawn "
                                   "--tries times from the training split; the test split stays fixed)")
    p.add_argument("--tries", type=int, default=5, help="--shots: seeded draws per shot count (default: %(default)s)")
    _add_extract_args(p, out_alias=False)
    _add_fit_args(p, many=True)
    p.set_defaults(func=cmd_compare)


def _runtime_list(text: str) -> tuple[str, ...]:
    from features.options import EXPORTED_RUNTIME_PRECISIONS

    names = () if text == "none" else tuple(_csv_list(text))
    for name in names:
        if name not in EXPORTED_RUNTIME_PRECISIONS:
            raise argparse.ArgumentTypeError(f"unknown runtime {name!r}; choose from "
                                             f"{', '.join(EXPORTED_RUNTIME_PRECISIONS)} or none")
    return names


def _add_bench_command(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backbone", default=DEFAULT_BACKBONE)
    p.add_argument("--images", type=int, default=1000,
                   help="JPEGs to time; fewer makes worker start-up weigh more (default: %(default)s)")
    p.add_argument("--data-root", help="use Caltech-101 JPEGs from here instead of synthetic ones")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--taps", type=_csv_list, help="the 3 taps of the pipeline pass (default: a third, two thirds, standard)")
    p.add_argument("--device", default="auto")
    p.add_argument("--rss-sizes", type=int, nargs=2, default=[1000, 8000], help="dataset sizes for peak memory")
    p.add_argument("--features-root", default=FEATURES_ROOT, help="stage-two timing uses cached Caltech-101 features here")
    p.add_argument("--reference", action="store_true", help="also time scikit-learn's reference fits (LinearSVC: minutes)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; rates and ratios are medians over rounds (default: %(default)s)")
    p.add_argument("--compile", default="on", help="torch.compile in the pipeline and the ceiling: on or off (default: %(default)s)")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                   help="fp32 shows what a CPU without bf16 kernels runs (default: %(default)s)")
    p.add_argument("--runtimes", type=_runtime_list, default=None,
                   help="exported runtimes measured beside torch, comma-separated, or none (default: every installed one)")
    p.add_argument("--quick", action="store_true", help="every row once at toy size (about a minute): checks that "
                                                        "every measure runs; its figures are not comparable")
    p.add_argument("--out", default="bench_out")
    p.set_defaults(func=cmd_bench)


def _add_predict_command(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="a run folder printed by `taps fit`")
    p.add_argument("images", nargs="+", help="image files, or folders (searched recursively for images)")
    p.add_argument("--format", default="tsv", choices=("tsv", "csv", "json"),
                   help="one record per image on stdout; json: one object per line (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=1, help="the K best labels per image (default: %(default)s)")
    p.add_argument("--allow-failures", action="store_true", help="exit 0 even when some images could not be read")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar (there is none unless stderr is a terminal)")
    p.add_argument("--device", default="auto")
    p.add_argument("--weights", help="override the recorded weights (needed for runs on a local .pth)")
    p.set_defaults(func=cmd_predict)


COMMANDS = {  # name -> (help, what adds its arguments): a command's arguments are built only when it runs
    "list": ("list backbones, datasets, a backbone's taps or its raw graph nodes", _add_list_command),
    "extract": ("run a frozen backbone over a dataset and cache tap embeddings to HDF5", _add_extract_command),
    "merge": ("combine the shard files of one extraction into one feature file", _add_merge_command),
    "info": ("describe a feature file", _add_info_command),
    "export": ("write a feature file's taps with ids, labels and split to npz, parquet or csv", _add_export_command),
    "fit": ("fit a classifier on one cached tap and score it", _add_fit_command),
    "compare": ("fit the same classifier on many taps (and backbones) with the same splits", _add_compare_command),
    "bench": ("measure extraction and fit speed in one run (ratios, peak memory)", _add_bench_command),
    "predict": ("classify image files with a run folder's model", _add_predict_command),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser; with ``only``, the other commands' arguments are left out (their defaults and choices
    come from records whose modules import torch and scikit-learn)."""
    parser = _Parser(prog="taps", description="Cache frozen-CNN embeddings from layer taps, then fit linear classifiers.")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an unexpected error")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, (help_text, add_arguments) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        if only is None or name == only:  # the others need only their name and help (no torch to import)
            add_arguments(p)
    for command in sub.choices.values():  # also after the command name
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help="show the traceback of an unexpected error")
        if not any("--no-progress" in action.option_strings for action in command._actions):
            # accepted everywhere, so a script can pass it to every command; these show no bar
            command.add_argument("--no-progress", dest="progress", action="store_false", help=argparse.SUPPRESS)
    parser.set_defaults(commands=sub.choices)
    return parser


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """The arguments, with an unknown option blamed on the command it was given to, and the closest
    options of that command suggested (``taps fit --datset`` -> did you mean --dataset?)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(next((a for a in argv if a in COMMANDS), ""))  # options come after their command
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        command = args.commands[args.command]
        known = [o for action in command._actions for o in action.option_strings if o.startswith("--")]
        flag = next((u.split("=", 1)[0] for u in unknown if u.startswith("-")), unknown[0])
        close = difflib.get_close_matches(flag, known, n=2, cutoff=0.75)
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        command.error(f"unrecognized arguments: {' '.join(unknown)}{hint}")
    return args


# Commands whose finished work survives an interruption and is picked up by the same command.
RESUMABLE = ("extract", "merge", "compare")
PREDICT_CHUNK = 256  # images classified (and printed) at a time


def main(argv: list[str] | None = None) -> int:
    """Run one command. Exit codes: 0, 1 (a failure named in one line), 2 (usage), 130 (Ctrl-C)."""
    args = _parse(argv)
    one_line = lambda message, category, *_, **__: f"taps {args.command}: warning: {message}\n"  # noqa: E731
    previous, warnings.formatwarning = warnings.formatwarning, one_line
    try:
        args.func(args)
    except TapsError as exc:
        print(f"taps {args.command}: error: {exc}", file=sys.stderr)
        return exc.code
    except BrokenPipeError:  # the reader (`| head`) stopped reading: stop quietly, as Unix tools do
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        except (OSError, ValueError, AttributeError):  # stdout is no file (a test's capture)
            pass
        return 141
    except KeyboardInterrupt:
        kept = "; finished work is kept, rerun the same command to resume" if args.command in RESUMABLE else ""
        print(f"taps {args.command}: interrupted{kept}", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug:
            raise
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else "no message"
        print(f"taps {args.command}: error: unexpected {type(exc).__name__} ({reason}); rerun with --debug for the "
              f"traceback", file=sys.stderr)
        return 1
    finally:
        warnings.formatwarning = previous
    return 0


if __name__ == "__main__":
    sys.exit(main())
