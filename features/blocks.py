"""What every engine shares: a block of samples decoded by the run's decoder and embedded by
one forward pass, handed to the write loop as a :class:`Block`.

Engines (:mod:`features.engines`) differ only in where this runs (the calling process, worker
processes, model replicas, Ray actors); they all yield the same blocks, in sample order.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from . import jpeg
from .backbones import Backbone, Tap
from .datasets import BadImage, ImageSet
from .decoders import get_decoder
from .forward import Forward, build_extractor, compiled, resolve_compile
from .options import TORCH, RunConfig
from .turbojpeg import sample_pixels


@dataclass
class Block:
    """Samples [start, stop): each tap's pooled rows for the block's good images, in sample order,
    and why each bad one (sample index -> reason) was skipped."""

    start: int
    stop: int
    taps: dict[str, np.ndarray]
    errors: dict[int, str]


def block_ranges(start: int, n: int, batch_size: int) -> list[range]:
    """Consecutive fixed blocks [k*B, (k+1)*B) from a block-aligned ``start`` to ``n``."""
    return [range(lo, min(lo + batch_size, n)) for lo in range(start, n, batch_size)]


class DecodedImages(Dataset):
    """Sample index -> (HWC uint8 array or None, index, error reason); bad images never raise."""

    def __init__(self, images: ImageSet, transform, min_side: int | None, decode: str):
        self.images, self.transform, self.min_side, self.decode = images, transform, min_side, decode

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        try:
            return sample_pixels(self.images, index, self.transform, self.min_side, self.decode), index, ""
        except BadImage as exc:
            return None, index, str(exc) or "undecodable image"


def collate_pixels(items):
    """-> (NHWC uint8 tensor of the good images or None, indices, {index: error})."""
    good = [x for x, _, _ in items if x is not None]
    batch = torch.from_numpy(np.stack(good)) if good else None
    return batch, [i for _, i, _ in items], {i: e for _, i, e in items if e}


@dataclass
class BlockSource:
    """Sample indices -> decoded, collated batches by the run's decoder -> embedded blocks."""

    dataset: Dataset
    collate: object
    encoded: bool  # JPEG bytes, decoded per batch on the model's device (``--decode torchvision``)

    @classmethod
    def of(cls, images: ImageSet, transform, cfg: RunConfig) -> BlockSource:
        min_side = int(transform.resize_size[0]) if cfg.draft else None
        if get_decoder(cfg.decode).on_device and jpeg.supports(images):
            return cls(jpeg.EncodedImages(images, transform, min_side), jpeg.collate_encoded, True)
        return cls(DecodedImages(images, transform, min_side, cfg.decode), collate_pixels, False)

    def load(self, lo: int, hi: int):
        """Samples [lo, hi) decoded and collated, on the calling thread."""
        return self.collate([self.dataset[i] for i in range(lo, hi)])

    def embed(self, collated, forward: Forward) -> Block:
        """A collated block -> its :class:`Block`."""
        batch, indices, errors = collated
        if self.encoded:  # loaders read bytes; decoding happens here, on the device, for the whole batch
            batch, more = jpeg.decode_batch(batch, self.dataset, forward.device)
            errors = {**errors, **more}
        return Block(indices[0], indices[-1] + 1, {} if batch is None else forward(batch), errors)


def prepare_forward(backbone: Backbone, taps: list[Tap], cfg: RunConfig, n_images: int) -> Forward:
    """The extractor ready to run; compiled (and timed) when ``cfg.compile`` asks for it.

    Compiling runs one blank batch, so the compile time is reported on its own and
    the extraction rate is the steady state. A failing compile falls back to eager.
    Compiled graphs get NCHW input: Inductor picks its own layouts, and the bench
    measured channels_last input slower there, while it is much faster eagerly.
    """
    if cfg.runtime != TORCH:  # extract() exported and checked it (cfg.onnx_path): each engine loads it
        from .runtimes import load_exported

        return load_exported(cfg.runtime, cfg.onnx_path, [t.name for t in taps], cfg.precision)
    eager = Forward(build_extractor(backbone, taps, cfg.device, cfg.channels_last, cfg.pooling), cfg.device,
                    cfg.precision, cfg.channels_last)
    if not resolve_compile(cfg.compile, cfg.device, n_images):
        return eager
    t0 = time.perf_counter()
    try:
        fast = Forward(compiled(eager.module.to(memory_format=torch.contiguous_format)), cfg.device, cfg.precision,
                       channels_last=False, pad_to=cfg.batch_size)
        size = backbone.input_size
        fast(torch.zeros((cfg.batch_size, size, size, 3), dtype=torch.uint8))
    except Exception as exc:  # Inductor fails in many ways (toolchain, headers, unsupported ops)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        warnings.warn(f"torch.compile failed ({reason}); extracting without it", stacklevel=2)
        eager.module.to(memory_format=torch.channels_last if cfg.channels_last else torch.contiguous_format)
        return eager
    fast.compile_seconds = time.perf_counter() - t0
    return fast
