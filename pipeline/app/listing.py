"""`taps list`: backbones, datasets, a backbone's taps (with each pooling's size) or its graph nodes."""

from __future__ import annotations

import argparse

from features.errors import UsageError

HELP = "list backbones, datasets, a backbone's taps or its raw graph nodes"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("what", choices=["backbones", "datasets", "taps", "nodes"])
    p.add_argument("backbone", nargs="?")
    p.add_argument("--image-size", type=int)


def run(args) -> None:
    from features.datasets import dataset_names

    if args.what == "datasets":
        print(" ".join(dataset_names()))
        return
    if args.what in ("taps", "nodes") and not args.backbone:
        raise UsageError(f"`taps list {args.what}` needs a backbone name, e.g. `taps list {args.what} mobilenet_v2`")
    from features.backbones import Backbone, source_listings  # torch: only for what needs a network

    if args.what == "backbones":
        print("\n".join(source_listings()))
        return
    bb = Backbone(args.backbone, weights="none", image_size=args.image_size)
    if args.what == "nodes":
        print("\n".join(bb.node_names()))
        return
    print(f"{bb.name} at {bb.input_size}px (standard embedding: {bb.default_tap})")
    print("\n".join(tap_table(list(bb.taps.values()))))


def tap_table(taps: list) -> list[str]:
    """One line per tap: name, node, output shape and its embedding size under each pooling."""
    from features.pooling import POOLINGS, get_pooling, poolable, pooled_dim

    shapes = {t.name: (f"{t.prefix}+{t.shape[1]}x{t.shape[2]} tokens x{t.shape[0]}" if t.layout == "tokens"
                       else "x".join(map(str, t.shape))) for t in taps}
    wide = [max(len(h), *(len(x) for x in column)) + 1 for h, column in
            (("tap", [t.name for t in taps]), ("node", [t.node for t in taps]), ("output shape", shapes.values()))]
    lines = [f"{'tap':<{wide[0]}}{'node':<{wide[1]}}{'output shape':<{wide[2]}}" + "".join(f"{p:>8}" for p in POOLINGS)]
    for tap in taps:  # columns as wide as their longest entry (timm and open_clip nodes are long)
        start = f"{tap.name:<{wide[0]}}{tap.node:<{wide[1]}}{shapes[tap.name]:<{wide[2]}}"
        if not poolable(tap.shape):
            lines.append(f"{start}  tokens of unknown layout: not pooled")
            continue
        dims = [pooled_dim(tap.shape, p) if not get_pooling(p).class_token or tap.layout == "tokens"
                or len(tap.shape) == 1 else "-" for p in POOLINGS]
        lines.append(start + "".join(f"{d:>8}" for d in dims))
    lines.append(f"columns {POOLINGS[0]}..{POOLINGS[-1]}: embedding size per pooling (vector taps are not pooled; "
                 f"cls: transformer blocks' class token; avg of tokens: the mean of the patch tokens)")
    return lines
