"""The frozen forward exported once to ONNX, for the runtimes of :mod:`features.runtimes`.

What is exported is taps' whole extractor (:func:`features.forward.build_extractor`): the
uint8 -> normalised pixels step, the pruned graph with folded BatchNorm, and the pooling of
every requested tap, each tap one output, with a dynamic batch dimension. Files are cached
under :func:`cache_dir`, named by :func:`export_key`: everything that defines the graph
(backbone, weights and their digest, preprocessing, taps and their layouts, pooling, input
size, torch and opset versions). Which runtime may run a file is decided by
:func:`features.runtimes.prepare_export`, which checks it against :func:`reference_outputs`.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .backbones import Backbone, Tap
from .files import KEY_DIGITS, cache_root, digest
from .forward import build_extractor

OPSET = 17
CALIBRATION_IMAGES = 8


def cache_dir() -> Path:
    """Where exports are kept: ``$TAPS_CACHE/onnx``, else ``~/.cache/taps/onnx``."""
    return cache_root() / "onnx"


def export_key(backbone: Backbone, taps: list[Tap], pooling: str) -> str:
    """Everything that defines an exported graph, hashed: equal keys, interchangeable files."""
    fields = {"backbone": backbone.name, "weights": backbone.weights.spec, "weights_sha256": backbone.weights.sha256,
              "transform": backbone.transform_spec(), "input": backbone.input_size, "pooling": pooling,
              "taps": [[t.name, t.node, t.layout, t.prefix, list(t.shape)] for t in taps],
              "torch": torch.__version__, "opset": OPSET}
    return digest(fields, length=KEY_DIGITS)


def calibration_batch(size: int, n: int = CALIBRATION_IMAGES) -> torch.Tensor:
    """A seeded NHWC uint8 batch of ``n`` smooth random images (the first 8 repeat)."""
    g = torch.Generator().manual_seed(0)
    coarse = torch.randint(0, 256, (CALIBRATION_IMAGES, 3, 8, 8), generator=g, dtype=torch.uint8).float()
    images = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear").round().to(torch.uint8)
    return images.permute(0, 2, 3, 1).repeat(-(-n // CALIBRATION_IMAGES), 1, 1, 1)[:n].contiguous()


def largest_difference(reference: dict[str, np.ndarray], other: dict[str, np.ndarray]) -> float:
    """max over taps of max|a - b| / max|a|; below 1e-4 the scale counts as 1e-4, so a tap whose values
    vanish (random weights) is judged by absolute differences, not by float noise on tiny numbers."""
    return max(float(np.abs(reference[k] - other[k]).max() / max(float(np.abs(reference[k]).max()), 1e-4))
               for k in reference)


class _Outputs(nn.Module):
    """The extractor with its outputs as a tuple in tap order (what the ONNX exporter takes)."""

    def __init__(self, extractor: nn.Module, names: list[str]):
        super().__init__()
        self.extractor, self.names = extractor, names

    def forward(self, pixels: torch.Tensor):
        out = self.extractor(pixels)
        return tuple(out[n] for n in self.names)


def reference_outputs(backbone: Backbone, taps: list[Tap], pooling: str) -> dict[str, np.ndarray]:
    """The torch forward (fp32, eval mode) on the calibration batch: what every export must reproduce."""
    extractor = build_extractor(backbone, taps, torch.device("cpu"), channels_last=False, pooling=pooling).eval()
    with torch.inference_mode():
        pixels = calibration_batch(backbone.input_size).permute(0, 3, 1, 2).contiguous()
        return {k: v.numpy() for k, v in extractor(pixels).items()}


def export_onnx(backbone: Backbone, taps: list[Tap], pooling: str, path: Path) -> None:
    """Write the extractor of ``taps`` to ``path`` as ONNX: input ``pixels`` (uint8 NCHW), one output
    per tap, the batch dimension dynamic. Raises what the exporter raises."""
    extractor = build_extractor(backbone, taps, torch.device("cpu"), channels_last=False, pooling=pooling)
    names = [t.name for t in taps]
    example = calibration_batch(backbone.input_size, 2).permute(0, 3, 1, 2).contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    # nn.MultiheadAttention with frozen weights takes its fused inference kernel, which ONNX has
    # no op for (torchvision's ViT); the export traces the plain attention ops instead.
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with warnings.catch_warnings():  # the TorchScript exporter's deprecation notice is not the user's
            warnings.simplefilter("ignore")
            # The TorchScript exporter: it needs no onnxscript and traces taps' FX graphs as they are.
            # eval() on the wrapper: the exporter restores the wrapper's mode afterwards, recursively,
            # and a Dropout left in training mode would be exported (or compared) perturbed.
            torch.onnx.export(_Outputs(extractor, names).eval(), (example,), str(path), input_names=["pixels"],
                              output_names=names, opset_version=OPSET, dynamo=False,
                              dynamic_axes={"pixels": {0: "batch"}, **{n: {0: "batch"} for n in names}})
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
