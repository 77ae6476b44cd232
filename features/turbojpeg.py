"""JPEG files straight to cropped pixels: libjpeg-turbo (through simplejpeg), then torch's resize.

The CPU default (``--decode simplejpeg``): about half the core time of PIL's decode +
box resize per photo, and it scales over decode threads as PIL's decoder does
(docs/performance.md has the figures):

- ``simplejpeg.decode_jpeg`` calls the same libjpeg-turbo as PIL, with the same
  (accurate) DCT and upsampling, so full-size pixels are identical. It reads the
  header first, so the pixel bound is checked before anything is decoded. Large
  JPEGs decode at PIL's draft scale (1/2, 1/4 or 1/8; identical to PIL's too).
- The pixels are turned as the file's EXIF orientation says, with the transposes of PIL's
  ``ImageOps.exif_transpose`` (the PIL path's): the preset's crop is taken where it lies in the
  stored image and turned (:meth:`features.models.preprocess.UInt8Crop.tensor`).
- Resizing and cropping run torchvision's tensor ops on the HWC buffer viewed as
  channels-last CHW, which is torch's vectorised uint8 antialias kernel. These are the
  weights preset's own tensor ops, so values match its PIL path to a grey level or two.

Anything else (not a JPEG, CMYK, a file libjpeg-turbo calls damaged, over the pixel
bound) returns ``None`` and goes through the PIL path, so which images decode, and the
reasons recorded for those that do not, stay the same.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import simplejpeg
import torch

from .datasets import DEFAULT_MAX_PIXELS, ImageSet, exif_orientation, open_image
from .decoders import EXIF_TURNED, SIMPLEJPEG

JPEG_MAGIC = b"\xff\xd8\xff"
EXIF_HEADER = b"Exif\x00\x00"  # opens a JPEG's APP1 segment of EXIF data, within its first 64 KiB


def jpeg_orientation(data: bytes) -> int:
    """The EXIF orientation of JPEG bytes (1 when they carry none: most files, found without parsing)."""
    return exif_orientation(io.BytesIO(data)) if data.find(EXIF_HEADER, 0, 65536) >= 0 else 1


def draft_scale(width: int, height: int, min_side: int | None) -> int:
    """The DCT scale divisor PIL's draft mode picks in :func:`features.datasets.open_image`."""
    short = min(width, height)
    if not min_side or short <= 2 * min_side:
        return 1
    want_w, want_h = min_side * width // short, min_side * height // short
    fit = min(width // want_w, height // want_h)
    return next(s for s in (8, 4, 2, 1) if fit >= s)


def decode_crop(path: Path, transform, min_side: int | None, max_pixels: int | None,
                turn: bool = True) -> np.ndarray | None:
    """HWC uint8 pixels of a JPEG, resized and cropped by ``transform``, or None to use PIL instead."""
    try:
        data = path.read_bytes()
    except OSError:  # PIL words the reason
        return None
    if data[:3] != JPEG_MAGIC:
        return None
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        if colorspace not in ("YCbCr", "Gray") or (max_pixels is not None and width * height > max_pixels):
            return None  # PIL converts CMYK/YCCK its own way, and words the refusal of huge images
        s = draft_scale(width, height, min_side)
        pixels = simplejpeg.decode_jpeg(data, colorspace="RGB", min_width=-(-width // s),
                                        min_height=-(-height // s))
    except ValueError:  # damaged or unsupported: PIL decides
        return None
    return transform(torch.from_numpy(pixels).permute(2, 0, 1), jpeg_orientation(data) if turn else 1)


def file_pixels(path: Path | str, transform, min_side: int | None, decode: str,
                max_pixels: int = DEFAULT_MAX_PIXELS, turn: bool = True) -> np.ndarray:
    """HWC uint8 pixels of an image file by the chosen CPU decoder (``simplejpeg`` or ``pil``), turned as
    its EXIF orientation says unless ``turn`` is False.

    Raises :class:`features.datasets.BadImage` when the image cannot be decoded.
    """
    pixels = decode_crop(Path(path), transform, min_side, max_pixels, turn) if decode == SIMPLEJPEG else None
    return pixels if pixels is not None else transform(open_image(path, min_side, max_pixels, turn))


def sample_pixels(images: ImageSet, index: int, transform, min_side: int | None, decode: str) -> np.ndarray:
    """HWC uint8 pixels of sample ``index``: :func:`file_pixels` for file-backed sets."""
    path = images.source_file(index)
    if path is None:
        return transform(images.image(index, min_side))
    return file_pixels(path, transform, min_side, decode, images.max_pixels, images.orientation == EXIF_TURNED)
