"""`taps predict`: classify image files with a run folder's model, one record per image on stdout."""

from __future__ import annotations

import argparse
import itertools
import sys

from features.errors import TapsError, UsageError

HELP = "classify image files with a run folder's model"
CHUNK = 256  # images classified (and printed) at a time


def add_arguments(p: argparse.ArgumentParser) -> None:
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
    p.add_argument("--compile", default="auto", choices=("auto", "off"),
                   help="auto: torch.compile where the run's taps were compiled, so that the features are the "
                        "training ones to the bit (seconds of start-up); off: eager, within bf16 rounding of them")


def run(args) -> None:
    """Results on stdout as they come, everything else on stderr; images stream through in chunks, so
    memory stays flat however many a folder holds."""
    from features.datasets import warn_left_out
    from features.progress import Progress

    from ..predict import Predictor, image_files, prediction_writer

    predictor = Predictor(args.run, device=args.device, weights=args.weights, top_k=args.top_k, compile=args.compile)
    header, write = prediction_writer(args.format, args.top_k)
    if header:
        print(header)
    total = failed = 0
    left_out: list = []
    names = image_files(args.images, left_out)
    bar = Progress(None, "predict", enabled=args.progress)
    while chunk := list(itertools.islice(names, CHUNK)):
        for p in predictor.predict(chunk):
            print(write(p))
            failed += bool(p.error)
        sys.stdout.flush()
        total += len(chunk)
        bar.update(len(chunk))
    bar.close()
    if left_out:
        warn_left_out(left_out, "the folders given")
    if total == 0:
        raise UsageError(f"no image files in {', '.join(args.images)}; pass image files or folders of them")
    if failed == total:
        raise TapsError(f"none of the {total} images could be read (their records say why); pass image files")
    print(f"classified {total - failed} of {total} images with {args.run}", file=sys.stderr)
    if failed and not args.allow_failures:
        raise TapsError(f"{failed} of {total} images could not be read (their records say why); pass "
                        f"--allow-failures to exit 0 anyway")
