"""The frozen forward pass: uint8 pixels in, pooled tap embeddings out.

:func:`build_extractor` turns a backbone and its requested taps into one module:
batch normalisation of the pixels (the arithmetic half of the weights' preset),
the graph pruned after the deepest tap (``create_feature_extractor``) with every
eval-mode BatchNorm folded into the convolution before it, and the pooling of
each tap. Keeping the pooling inside the module lets ``torch.compile`` fuse it
into the last kernel, so a spatial tap never exists in memory at full size.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import sys
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.fx.experimental.optimization import fuse as fold_batchnorm
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .backbones import Backbone, Tap
from .errors import choose
from .pooling import DEFAULT_POOLING, pool_tap
from .precisions import get_precision

COMPILE = ("auto", "on", "off")
# `--compile auto` compiles datasets of at least this many images: a compile costs seconds
# (more with a cold Inductor cache) and saves about a millisecond per image on a small CPU,
# so below this it does not pay for itself (docs/performance.md).
COMPILE_MIN_IMAGES = 4000


class TapExtractor(nn.Module):
    """uint8 NCHW batch -> {tap name: pooled embedding}; float batches skip the normalisation."""

    def __init__(self, graph: nn.Module, taps: list[Tap], pooling: str, mean, std):
        super().__init__()
        self.graph, self.pooling = graph, pooling
        self.nodes = [(t.name, t.node, t.layout, t.prefix, tuple(t.shape[1:]) or None) for t in taps]
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if x.dtype == torch.uint8:  # the same ops, in the same order, as ImageClassification
            x = x.float().div(255).sub(self.mean).div(self.std)
        out = self.graph(x)
        return {name: pool_tap(out[node], self.pooling, layout, prefix, grid)
                for name, node, layout, prefix, grid in self.nodes}


def fold_sequential_batchnorm(model: nn.Module, keep: set[str]) -> nn.Module:
    """Fold each eval-mode BatchNorm2d into the Conv2d just before it in a Sequential (in place).

    torchvision's graph tracer keeps its ``ops`` blocks (Conv2dNormActivation: MobileNet,
    EfficientNet, ...) as leaves, so a graph-level pass cannot see inside them. The
    BatchNorm becomes an Identity, so node names stay valid; convs named in ``keep``
    (requested as taps themselves) are left alone.
    """
    for prefix, seq in list(model.named_modules()):
        if not isinstance(seq, nn.Sequential):
            continue
        names = list(seq._modules)
        for a, b in zip(names, names[1:], strict=False):
            conv, bn = seq._modules[a], seq._modules[b]
            if (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats
                    and f"{prefix}.{a}".lstrip(".") not in keep):
                seq._modules[a], seq._modules[b] = fuse_conv_bn_eval(conv, bn), nn.Identity()
    return model


def build_extractor(backbone: Backbone, taps: list[Tap], device: torch.device, channels_last: bool = True,
                    pooling: str = DEFAULT_POOLING) -> TapExtractor:
    """The pruned, BatchNorm-folded graph between normalisation and pooling, in eval mode on ``device``."""
    # Frozen BatchNorm is an affine map: folded into the convolution it costs nothing
    # (outputs agree to float rounding). It matters most in the early, high-resolution layers.
    model = fold_sequential_batchnorm(backbone.build(), {t.node for t in taps})
    graph = backbone.feature_graph(model, {t.node: t.node for t in taps}).eval()
    graph = fold_batchnorm(graph, inplace=True, no_trace=True)  # the rest (ResNet's conv1/bn1 attributes)
    graph.delete_all_unused_submodules()  # the folded BatchNorms
    preset = backbone.preprocess()
    extractor = TapExtractor(graph, taps, pooling, preset.mean, preset.std).eval().to(device)
    for p in extractor.parameters():
        p.requires_grad_(False)
    if not channels_last:
        return extractor
    try:
        return extractor.to(memory_format=torch.channels_last)
    except RuntimeError:  # a 5-D parameter or buffer (timm's Swin): lay out the convolutions only
        for module in extractor.modules():
            if isinstance(module, nn.Conv2d):
                module.to(memory_format=torch.channels_last)
        return extractor


def can_compile(device: torch.device) -> str:
    """'' when ``torch.compile`` can work here, else the reason it cannot."""
    if device.type not in ("cpu", "cuda"):
        return f"torch.compile is not used on {device.type}"
    if sys.platform == "win32":
        return "torch.compile is not tried on Windows"
    if device.type == "cpu" and not (shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")):
        return "no C++ compiler on PATH (torch.compile's CPU backend needs one)"
    return ""


def resolve_compile(choice: str, device: torch.device, n_images: int, *, warn: bool = True) -> bool:
    choose("--compile", choice, COMPILE)
    if choice == "off":
        return False
    reason = can_compile(device)
    if choice == "on" and reason and warn:
        warnings.warn(f"--compile on ignored: {reason}", stacklevel=2)
    return not reason and (choice == "on" or n_images >= COMPILE_MIN_IMAGES)


def compiled(extractor: TapExtractor) -> nn.Module:
    """``torch.compile`` with frozen weights (constant folding, weight prepacking for oneDNN)."""
    import torch._dynamo
    import torch._inductor.config as inductor

    inductor.freezing = True  # weights never change here; lets Inductor prepack them
    # Dynamo caches compiled code per forward() code object, guarded on the instance: every
    # new extractor in one process (compare, bench) would count as a recompile, and past the
    # recompile limit it silently runs eagerly. One extractor runs at a time, so start afresh.
    torch._dynamo.reset()
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "No CUDA runtime" on CPU
    return torch.compile(extractor, dynamic=False)


def nchw(pixels: torch.Tensor) -> torch.Tensor:
    """An NHWC uint8 batch as the NCHW tensor the model takes: a view, already channels_last."""
    return pixels.permute(0, 3, 1, 2)


def autocast(device: torch.device, precision: str):
    dtype = get_precision(precision).dtype
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=getattr(torch, dtype))


@dataclass
class Forward:
    """A ready extractor with the settings it runs under: ``forward(pixels)`` -> pooled arrays."""

    module: nn.Module
    device: torch.device
    precision: str
    channels_last: bool = True
    pad_to: int | None = None   # batch size a compiled module was compiled for
    compile_seconds: float = 0.0

    def __call__(self, pixels: torch.Tensor) -> dict[str, np.ndarray]:
        return forward_taps(self.module, pixels, self.device, self.precision, self.channels_last, self.pad_to)


def forward_taps(extractor: nn.Module, pixels: torch.Tensor, device: torch.device, precision: str,
                 channels_last: bool = True, pad_to: int | None = None) -> dict[str, np.ndarray]:
    """One forward pass over an NHWC uint8 batch -> float32 arrays keyed by tap name.

    ``pad_to`` pads a short batch with blank images up to that size (and drops their
    rows again), so a compiled extractor sees one shape and never recompiles.
    """
    n = len(pixels)
    if pad_to and n < pad_to:
        pixels = torch.cat([pixels, pixels.new_zeros((pad_to - n, *pixels.shape[1:]))])
    x = nchw(pixels.to(device, non_blocking=True))
    x = x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    with torch.inference_mode(), autocast(device, precision):
        out = extractor(x)
        return {name: v[:n].float().cpu().numpy() for name, v in out.items()}
