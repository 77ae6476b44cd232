"""`taps bench`: extraction and fit speed, measured in one run (ratios, peak memory, start-up)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .args import DEFAULT_BACKBONE, FEATURES_ROOT, csv_list

HELP = "measure extraction and fit speed in one run (ratios, peak memory)"


def _runtime_list(text: str) -> tuple[str, ...]:
    from features.options import EXPORTED_RUNTIME_PRECISIONS

    names = () if text == "none" else tuple(csv_list(text))
    for name in names:
        if name not in EXPORTED_RUNTIME_PRECISIONS:
            raise argparse.ArgumentTypeError(f"unknown runtime {name!r}; choose from "
                                             f"{', '.join(EXPORTED_RUNTIME_PRECISIONS)} or none")
    return names


def add_arguments(p: argparse.ArgumentParser) -> None:
    from features.options import AUTO, CHOICES
    from features.precisions import BF16, FP32

    p.add_argument("--backbone", default=DEFAULT_BACKBONE)
    p.add_argument("--images", type=int, default=1000,
                   help="JPEGs to time; fewer makes worker start-up weigh more (default: %(default)s)")
    p.add_argument("--data-root", help="use Caltech-101 JPEGs from here instead of synthetic ones")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--taps", type=csv_list, help="the 3 taps of the pipeline pass (default: a third, two thirds, standard)")
    p.add_argument("--device", default="auto", choices=CHOICES["device"])
    p.add_argument("--rss-sizes", type=int, nargs=2, default=[1000, 8000], help="dataset sizes for peak memory")
    p.add_argument("--features-root", default=FEATURES_ROOT, help="stage-two timing uses cached Caltech-101 features here")
    p.add_argument("--reference", action="store_true", help="also time scikit-learn's reference fits (LinearSVC: minutes)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; rates and ratios are medians over rounds (default: %(default)s)")
    p.add_argument("--compile", default="on", choices=("on", "off"),
                   help="torch.compile in the pipeline and the ceiling (default: %(default)s)")
    p.add_argument("--precision", default=AUTO, choices=(AUTO, FP32, BF16),
                   help="fp32 shows what a CPU without bf16 kernels runs (default: %(default)s)")
    p.add_argument("--runtimes", type=_runtime_list, default=None,
                   help="exported runtimes measured beside torch, comma-separated, or none (default: every installed one)")
    p.add_argument("--quick", action="store_true", help="every row once at toy size (about a minute): checks that "
                                                        "every measure runs; its figures are not comparable")
    p.add_argument("--out", default="bench_out")


def run(args) -> None:
    from ..bench import BenchSettings, run_bench

    settings = BenchSettings(backbone=args.backbone, images=args.images, data_root=args.data_root,
                             batch_size=args.batch_size, taps=args.taps, device=args.device,
                             rss_sizes=tuple(args.rss_sizes), out=args.out, features_root=args.features_root,
                             reference=args.reference, rounds=args.rounds, compile=args.compile,
                             precision=args.precision, quick=args.quick,
                             runtimes=() if args.quick and args.runtimes is None else args.runtimes)
    text, _ = run_bench(settings, log=lambda msg: print(msg, file=sys.stderr))
    print(text)
    print(Path(args.out) / "bench.txt")
