"""The argument groups several commands share, and the settings records built from them.

Defaults and choices come from the records (:class:`features.options.ExtractOptions`,
:class:`pipeline.options.FitOptions`, :mod:`pipeline.request`) and the family registries, so each
is written once.
"""

from __future__ import annotations

import argparse
import sys

from features.datasets import DUPLICATES
from features.options import FEATURES_ROOT

from ..request import DatasetRequest, FeatureRequest
from ..results import RUNS_ROOT

DEFAULT_BACKBONE = FeatureRequest.backbones[0]


class Renamed(argparse.Action):
    """An option under its old spelling: still accepted, with a one-line note of the new one."""

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"taps: note: {option_string} is now spelled {self.metavar}; the old spelling still works",
              file=sys.stderr)
        setattr(namespace, self.dest, values)


def csv_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def csv_tuple(text: str) -> tuple[str, ...]:
    """A comma-separated value as a tuple (``""`` stays one empty value: the flag was given empty)."""
    return tuple(csv_list(text)) or (text,)


def add_dataset_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("dataset")
    g.add_argument("--dataset", default=DatasetRequest.name,
                   help="digits, fashion_mnist, caltech101, cifar10, stl10, dtd, flowers102, eurosat, "
                        "folder:PATH or csv:PATH (default: %(default)s)")
    g.add_argument("--data-root", default=DatasetRequest.data_root,
                   help="where named datasets are read or downloaded (default: %(default)s)")
    g.add_argument("--image-column", help="csv: column with image paths (default: the first)")
    g.add_argument("--label-column", help="csv: column with labels (default: the second)")
    g.add_argument("--allow-outside-root", action="store_true",
                   help="csv, folder: allow image paths (or links) that lead outside the dataset's folder")
    g.add_argument("--subset", help="a seeded random subset: N samples, or per split as train:5000,test:2000")
    g.add_argument("--duplicates", default=DatasetRequest.duplicates, choices=DUPLICATES,
                   help="csv, folder: an image file listed more than once (repeated rows, links to one file) is "
                        "refused (error) or kept once, at its first row (first) (default: %(default)s)")
    g.add_argument("--encoding", default=DatasetRequest.encoding,
                   help="csv: the file's text encoding, e.g. cp1252 or latin-1 (default: UTF-8, with or without a BOM)")
    g.add_argument("--verify-content", action="store_true",
                   help="fingerprint the dataset by its images' bytes (not their sizes and times), and on a rerun "
                        "name each image whose bytes changed")


def add_backbone_args(p: argparse.ArgumentParser, many: bool = False) -> None:
    g = p.add_argument_group("backbone")
    g.add_argument("--backbone", default=DEFAULT_BACKBONE, type=csv_tuple,
                   help="torchvision model name or timm:NAME" + (", or several comma-separated" if many else "")
                        + " (default: %(default)s)")
    g.add_argument("--weights", default=FeatureRequest.weights[0], type=csv_tuple,
                   help="auto (DEFAULT, or the cached pretrained weights offline), DEFAULT, an enum name such as "
                        "IMAGENET1K_V1 or timm tag, none, or a local .pth state dict" +
                        ("; one for all backbones or one per backbone, comma-separated" if many else "")
                        + " (default: %(default)s)")
    g.add_argument("--image-size", type=int, help="square input size instead of the weights' preprocessing")


def described(records: dict, what: str = "summary") -> str:
    """``name: summary; ...`` of a registry's records, each once (aliases skipped): the help of its option."""
    return "; ".join(f"{name}: {getattr(record, what)}" for name, record in records.items() if record.name == name)


def add_extract_args(p: argparse.ArgumentParser, out_alias: bool = True) -> None:
    from features.decoders import DECODER_REGISTRY
    from features.loaders import LOADER_REGISTRY, LOADERS
    from features.options import AUTO, CHOICES, ExtractOptions
    from features.precisions import PRECISION_REGISTRY
    from features.runtime_records import TORCH, exported_runtimes

    local = {name: record for name, record in LOADER_REGISTRY.items() if name in LOADERS}

    g = p.add_argument_group("extraction")
    g.add_argument("--pool", default=ExtractOptions.pooling, choices=CHOICES["pooling"],
                   help="pooling of spatial taps (default: %(default)s)")
    g.add_argument("--device", default=ExtractOptions.device, choices=CHOICES["device"], help="(default: %(default)s)")
    g.add_argument("--precision", default=ExtractOptions.precision, choices=CHOICES["precision"],
                   help=f"{described(PRECISION_REGISTRY)} (default: %(default)s)")
    g.add_argument("--batch-size", type=int, default=ExtractOptions.batch_size,
                   help="images per forward pass (default: %(default)s)")
    g.add_argument("--workers", type=int,
                   help="the loader's parallelism: " + ", ".join(f"{r.workers} ({n})" for n, r in LOADER_REGISTRY.items())
                        + "; default: one per core, at most 8 (a remote engine: one actor)")
    g.add_argument("--loader", default=ExtractOptions.loader, choices=CHOICES["loader"],
                   help=f"{described(local)} (default: %(default)s)")
    g.add_argument("--compile", default=ExtractOptions.compile, choices=CHOICES["compile"],
                   help="torch.compile the extractor; auto: for datasets large enough to repay the compile time "
                        "(default: %(default)s)")
    g.add_argument("--decode", default=ExtractOptions.decode, choices=CHOICES["decode"],
                   help=f"{described(DECODER_REGISTRY, 'description')}; {AUTO}: the one on the model's device "
                        "on CUDA, else the CPU default (default: %(default)s)")
    g.add_argument("--runtime", default=ExtractOptions.runtime, choices=CHOICES["runtime"],
                   help=f"{TORCH}: the module itself, on any device; "
                        + " or ".join(f"{n} ({', '.join(r.precisions)})" for n, r in exported_runtimes().items())
                        + f": the extractor exported to ONNX once (checked against {TORCH}, cached) and run by that "
                        f"runtime on the CPU, {TORCH} with a warning if it does not export; {AUTO}: the fastest "
                        "installed runtime on a calibration batch, recorded with the rates and reused on this CPU for "
                        "the same model, taps and batch size (default: %(default)s)")
    g.add_argument("--retime", action="store_true", help="--runtime auto: time the runtimes again instead of reusing "
                                                         "the choice recorded for this CPU")
    g.add_argument("--no-channels-last", dest="channels_last", action="store_false", help="keep NCHW memory layout")
    g.add_argument("--on-error", default=ExtractOptions.on_error, choices=CHOICES["on_error"],
                   help="bad images: skip (record and go on) or fail (default: %(default)s)")
    g.add_argument("--features-root", dest="features_root", default=FEATURES_ROOT,
                   help="folder of feature files (default: %(default)s)")
    if out_alias:  # extract's --out named the feature folder before fit and compare's named the runs
        g.add_argument("--out", dest="features_root", action=Renamed, metavar="--features-root",
                       help=argparse.SUPPRESS)
    g.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")


def add_fit_args(p: argparse.ArgumentParser, many: bool = False) -> None:
    from ..classifiers import (
        CLASSIFIER_REGISTRY,
        CLASSIFIERS,
        DEFAULT_SOLVER,
        REFERENCE_SOLVER,
        SOLVERS,
        preprocess_spellings,
        streaming_classifiers,
        text_classifiers,
    )
    from ..options import FitOptions
    from ..protocols import AUTO as AUTO_PROTOCOL
    from ..protocols import FALLBACK, KINDS, OFFICIAL
    from ..tapselectors import SELECTOR_REGISTRY, SELECTORS

    aliases = "; ".join(f"{alias} is an alias of {c.name}" for alias, c in CLASSIFIER_REGISTRY.items() if alias != c.name)
    params = {}
    for name, c in CLASSIFIER_REGISTRY.items():
        if c.name == name and len(c.grid) > 1:
            params.setdefault(c.param, []).append(name)

    g = p.add_argument_group("classifier and protocol")
    if many:
        g.add_argument("--clf", default=FitOptions.clf, help=f"{', '.join(CLASSIFIERS)}, or several comma-separated "
                                                             f"(rows for each, on the same splits) (default: %(default)s)")
    else:
        g.add_argument("--clf", default=FitOptions.clf, choices=CLASSIFIERS,
                       help=f"{aliases} (default: %(default)s)")
    g.add_argument("--preprocess", default=FitOptions.preprocess,
                   help=f"{', '.join(preprocess_spellings())}, or a comma list applied in order (default: %(default)s)")
    g.add_argument("--protocol", default=AUTO_PROTOCOL,
                   help=f"{', '.join(k for k in KINDS if k != AUTO_PROTOCOL)} or {AUTO_PROTOCOL} ({AUTO_PROTOCOL}: {OFFICIAL} if the file has a split, "
                        f"else {FALLBACK}) (default: %(default)s)")
    g.add_argument("--test-per-class", type=int, help="cap on test images per class")
    g.add_argument("--seeds", type=int, default=1, help="repeat over this many seeded splits (default: %(default)s)")
    g.add_argument("--grid", type=lambda s: [float(v) for v in csv_list(s)],
                   help="comma-separated values of " + ", ".join(f"{param} ({', '.join(names)})" for param, names
                                                                  in params.items()) + "; default: each one's log grid")
    g.add_argument("--folds", type=int, default=FitOptions.folds,
                   help="cross-validation folds for the grid (default: %(default)s)")
    g.add_argument("--solver", default=FitOptions.solver, choices=SOLVERS,
                   help=f"{DEFAULT_SOLVER} (L-BFGS, any device) or {REFERENCE_SOLVER} (scikit-learn's own estimator, the "
                        "reference) (default: %(default)s)")
    g.add_argument("--hidden", type=int, default=FitOptions.hidden,
                   help=f"{'/'.join(n for n, c in CLASSIFIER_REGISTRY.items() if 'hidden' in c.takes)}: hidden units "
                        "(0: a plain linear head)")
    g.add_argument("--memory-budget", type=float, help="MiB for an in-memory fit (default: half the free RAM); above it "
                                                        f"{'/'.join(streaming_classifiers())} streams from HDF5, the "
                                                        "others refuse")
    g.add_argument("--select", default=FitOptions.select, choices=SELECTORS,
                   help=f"how --tap auto chooses the taps to fuse on each training split: {described(SELECTOR_REGISTRY)} "
                        "(default: %(default)s)")
    g.add_argument("--select-threshold", type=float, default=FitOptions.select_threshold,
                   help="auto: the least CV-accuracy gain (0-1) that adds a tap (default: %(default)s)")
    g.add_argument("--prompts", help=f"--clf {'/'.join(text_classifiers())}: a file of prompt templates, one per line with {{}} for the class "
                                     "name (default: open_clip's 80 ImageNet templates)")
    g.add_argument("--calibrate", action="store_true",
                   help="calibrate the probabilities on out-of-fold training scores (a temperature; Platt scaling "
                        "for svm), report the expected calibration error before and after; predict uses them")
    g.add_argument("--track", help="log the fit (compare: a parent run and one per row) to MLflow: mlflow for a "
                                   "local ./mlruns store, or mlflow:URI (needs the track extra)")
    g.add_argument("--runs-root", dest="runs_root", default=RUNS_ROOT,
                   help="folder of run folders (default: %(default)s)")
    g.add_argument("--out", dest="runs_root", action=Renamed, metavar="--runs-root", help=argparse.SUPPRESS)
    g.add_argument("--force", action="store_true", help="recompute even if a run with identical settings exists")


def dataset_request(args) -> DatasetRequest:
    return DatasetRequest(name=args.dataset, data_root=args.data_root, subset=args.subset,
                          image_column=args.image_column, label_column=args.label_column,
                          allow_outside_root=args.allow_outside_root, duplicates=args.duplicates,
                          encoding=args.encoding, verify_content=args.verify_content)


def feature_request(args) -> FeatureRequest:
    """The feature files the arguments name: --features as they are, or found from the settings."""
    return FeatureRequest(files=getattr(args, "features", None) or (), backbones=args.backbone, weights=args.weights,
                          image_size=args.image_size, features_root=args.features_root,
                          pooling=getattr(args, "pool", None), dataset=dataset_request(args))


def backbones(args) -> list:
    request = feature_request(args)
    return [request.backbone(name) for name in request.backbones]


def extract_options(args):
    """The extraction flags as one :class:`features.options.ExtractOptions` (validated there)."""
    from features.options import ExtractOptions
    from features.shards import parse_shard

    return ExtractOptions(
        pooling=args.pool, device=args.device, precision=args.precision, batch_size=args.batch_size,
        workers=args.workers, channels_last=args.channels_last, on_error=args.on_error, loader=args.loader,
        compile=args.compile, decode=args.decode, runtime=args.runtime, out=args.features_root, progress=args.progress,
        verify_content=args.verify_content, retime=args.retime,
        force=getattr(args, "force", False) and args.command == "extract",
        shard=parse_shard(args.shard) if getattr(args, "shard", None) else None,
        engine=getattr(args, "engine", ExtractOptions.engine), ray_address=getattr(args, "ray_address", None),
        gpus_per_worker=getattr(args, "gpus_per_worker", ExtractOptions.gpus_per_worker))


def fit_options(args, clf: str | None = None, *, prompts: bool = True):
    """The fit flags as one :class:`pipeline.options.FitOptions` (validated there), for ``clf``
    (default --clf), with --prompts unless ``prompts`` is False."""
    from ..options import FitOptions

    return FitOptions(clf=clf or args.clf, preprocess=args.preprocess, grid=args.grid, folds=args.folds,
                      solver=args.solver, hidden=args.hidden, device=args.device, memory_budget_mb=args.memory_budget,
                      select=args.select, select_threshold=args.select_threshold, calibrate=args.calibrate,
                      prompts=args.prompts if prompts else None)


FEW_TEST_IMAGES = 10  # below this, one test image of a class is over a tenth of its accuracy: say so


def _near_copy_note(near: dict, tap: str) -> list[str]:
    if not near.get("test_images"):
        return []
    test, train = near["examples"][0]
    across = f", {near['across_classes']} of them filed under another class" if near["across_classes"] else ""
    without = near.get("mean_per_class_accuracy_without")
    return [f"note: {near['test_images']} test image(s) (seed 0) have a near-copy in training by {tap} (resized, "
            f"re-encoded or mirrored: within {near['ratio']:g}x its typical nearest-neighbour distance){across}, e.g. "
            f"{test} ~ {train}" + ("" if without is None else
                                   f"; seed 0's mean per-class accuracy without them: {100 * without:.1f} "
                                   f"(with: {100 * near['mean_per_class_accuracy']:.1f})")]


def result_notes(results, seeds: int) -> list[str]:
    """What a reader of a fit's numbers must know: classes without a test image or with few, what the ±
    varies over, calibration, duplicate and undecodable images."""
    notes = []
    missing = results.untested_classes
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        notes.append(f"note: {len(missing)} of {len(results.classes)} classes have no test image (in some seed's split): "
                     f"{shown}; mean per-class accuracy averages the classes that have, and macro F1 counts each "
                     f"such class predicted as 0")
    if results.untrained_classes:
        missing = results.untrained_classes
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        notes.append(f"note: {len(missing)} of {len(results.classes)} classes have test images but no training image (in "
                     f"some seed's split): {shown}; the classifier cannot predict them, so each of their test images "
                     f"is an error and mean per-class accuracy counts each such class as 0")
    fewest = results.fewest_test_images
    if fewest and fewest["images"] < FEW_TEST_IMAGES:
        weight = 100 / (fewest["images"] * fewest["classes_tested"])
        notes.append(f"note: class {fewest['class']!r} has {fewest['images']} test image(s) (seed 0); each moves mean "
                     f"per-class accuracy by {weight:.2f} points, so differences of that size can be one image")
    notes += _near_copy_note(results.near_copies, results.features.tap)
    if results.undecodable:
        notes.append(f"note: {results.undecodable} image(s) could not be decoded at extraction and are in no split "
                     f"(`taps info` on the feature file lists them)")
    if seeds > 1 and results.seeds_vary.startswith("the CV folds only"):
        notes.append(f"note: ± over {seeds} seeds varies {results.seeds_vary}")
    ece = results.metrics.get("expected_calibration_error")
    if ece is not None:
        before = results.metrics.get("expected_calibration_error_uncalibrated")
        from ..calibration import calibration_method

        notes.append(f"calibrated ({calibration_method(results.settings['clf'])}): expected calibration error on the test "
                     f"rows {ece['mean']:.3f}" + (f", {before['mean']:.3f} before" if before else
                                                   " (the uncalibrated scores were not probabilities)"))
    dup = results.duplicates
    if dup.get("groups"):
        dropped = dup.get("test_copies_dropped")
        mixed = f"{dup['mixed_labels']} of them under two or more classes (a wrong label or overlapping classes), " \
            if dup.get("mixed_labels") else ""
        once = (f"; {dup['test_copies_once']} test image(s) repeating another under its class, scored once (seed 0)"
                if dup.get("test_copies_once") else "")
        notes.append(f"note: {dup['groups']} group(s) of byte-identical images ({dup['images']} images) in the file, "
                     + mixed + ("each kept on one side of every split" if dropped is None else
                        f"{dropped} test image(s) left out: their bytes are also in training") + once)
    elif dup and not dup.get("checked"):
        notes.append("note: duplicate images were not checked (the file has no content digests: a file from "
                     "before they were recorded, which `extract --force` rebuilds, or a dataset without a pixel array)")
    return notes
