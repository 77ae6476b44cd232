"""JPEG decoding with ``torchvision.io.decode_jpeg`` on the model's device (nvJPEG on CUDA).

Loaders only read file bytes; the main process decodes each batch in one
``decode_jpeg`` call on the device, then resizes and crops every image there with
the tensor kernels of the weights' preset (bilinear, antialiased), after turning it as
its EXIF orientation says (torchvision turns only its CPU decodes, so taps turns every
decoded tensor itself, on the device). Anything that is
not a JPEG, or that ``decode_jpeg`` rejects, goes through the PIL path instead, so
the set of images that decode (and the reasons of those that do not) is the same.
Pixels differ from the PIL path by a grey level or two (another resampling kernel).
torchvision 0.29 deprecated its decoders in favour of TorchCodec; they still work, and
the deprecation notice is silenced here until this module moves to TorchCodec.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .datasets import BadImage, ImageSet
from .decoders import EXIF_TURNED
from .turbojpeg import JPEG_MAGIC, jpeg_orientation


def decode_jpeg(data, **kwargs):
    from torchvision.io import ImageReadMode  # imported with the decoder that uses it: over a second
    from torchvision.io import decode_jpeg as _decode_jpeg

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="torchvision")
        return _decode_jpeg(data, mode=ImageReadMode.RGB, **kwargs)


def supports(images: ImageSet) -> bool:
    """Only file-backed image sets have bytes to hand to ``decode_jpeg``."""
    return images.source_file(0) is not None


class EncodedImages(Dataset):
    """Sample index -> (("jpeg", bytes tensor, EXIF orientation) | ("pixels", HWC array) | None, index, error)."""

    def __init__(self, images: ImageSet, transform, min_side: int | None):
        self.images, self.transform, self.min_side = images, transform, min_side
        self.max_pixels = images.max_pixels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        try:
            data = self.images.source_file(index).read_bytes()
            if data[:3] == JPEG_MAGIC:
                w, h = Image.open(io.BytesIO(data)).size  # header only: bound the decode before it happens
                if self.max_pixels is None or w * h <= self.max_pixels:
                    turn = jpeg_orientation(data) if self.images.orientation == EXIF_TURNED else 1
                    return ("jpeg", torch.frombuffer(bytearray(data), dtype=torch.uint8), turn), index, ""
            return ("pixels", self.pil(index)), index, ""
        except (BadImage, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            try:  # the PIL path words the reason the same way for every loader
                return ("pixels", self.pil(index)), index, ""
            except BadImage as bad:
                return None, index, str(bad) or str(exc) or "undecodable image"

    def pil(self, index: int) -> np.ndarray:
        return self.transform(self.images.image(index, self.min_side))


def collate_encoded(items):
    return items, [i for _, i, _ in items], {i: e for _, i, e in items if e}


def decode_batch(items, dataset: EncodedImages, device: torch.device) -> tuple[torch.Tensor | None, dict[int, str]]:
    """Decode, resize and crop one batch on ``device`` -> (NHWC uint8 batch of the good images, new errors)."""
    errors: dict[int, str] = {}
    jpegs = [(i, x[1]) for x, i, _ in items if x is not None and x[0] == "jpeg"]
    orientation = {i: x[2] for x, i, _ in items if x is not None and x[0] == "jpeg"}
    decoded: dict[int, torch.Tensor] = {}
    if jpegs:
        try:
            images = decode_jpeg([b for _, b in jpegs], device=device)
            decoded = dict(zip([i for i, _ in jpegs], images, strict=True))
        except RuntimeError:  # one bad file fails the whole call: decode one by one to find it
            for i, data in jpegs:
                try:
                    decoded[i] = decode_jpeg(data, device=device)
                except RuntimeError:
                    pass
    rows = []
    for x, i, _ in items:
        if x is None:
            continue
        if i in decoded:  # turned as the EXIF orientation says (torchvision's own turning is CPU-only)
            rows.append(dataset.transform.tensor(decoded[i], orientation[i]))
            continue
        try:  # not a JPEG, or one decode_jpeg rejects
            pixels = x[1] if x[0] == "pixels" else dataset.pil(i)
            rows.append(torch.from_numpy(np.array(pixels)).to(device))  # a writable copy
        except BadImage as exc:
            errors[i] = str(exc) or "undecodable image"
    return (torch.stack(rows) if rows else None), errors
