"""A preset's preprocessing as plain numbers, and its geometric half on uint8 pixels.

:class:`Preprocess` is what a feature file records of a weights' eval preset (resize, crop,
interpolation, mean, std): plain values, so a backbone's card (:mod:`.cards`) keeps it and a
run that never builds the model never imports torchvision. torchvision is imported only
where its kernels do the work (tensors, and the padding fallback).
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from functools import cache

import numpy as np
from PIL import Image

# torchvision's InterpolationMode values -> PIL's filters (torchvision's own ``pil_modes_mapping``).
PIL_FILTERS = {"nearest": Image.Resampling.NEAREST, "nearest-exact": Image.Resampling.NEAREST,
               "bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
               "box": Image.Resampling.BOX, "hamming": Image.Resampling.HAMMING,
               "lanczos": Image.Resampling.LANCZOS}
# EXIF orientation -> (swap rows and columns, then flip the rows, flip the columns): the transposes of
# PIL's ImageOps.exif_transpose, which the PIL path runs
TURNS = {2: (False, False, True), 3: (False, True, True), 4: (False, True, False), 5: (True, False, False),
         6: (True, False, True), 7: (True, True, True), 8: (True, True, False)}


def turned_tensor(image, orientation: int):
    """A CHW image tensor (on any device) turned as EXIF ``orientation`` says."""
    if orientation not in TURNS:
        return image
    swap, rows, cols = TURNS[orientation]
    image = image.transpose(-2, -1) if swap else image
    dims = [dim for dim, flip in ((-2, rows), (-1, cols)) if flip]
    return image.flip(dims) if dims else image.contiguous()


@dataclass(frozen=True)
class Preprocess:
    """The numbers of a torchvision ``ImageClassification`` preset."""

    resize: tuple[int, ...]
    crop: tuple[int, ...]
    interpolation: str   # an InterpolationMode value ("bilinear", "bicubic", ...)
    antialias: bool | None
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def of(cls, preset) -> Preprocess:
        """From an ``ImageClassification`` preset."""
        return cls(tuple(int(s) for s in preset.resize_size), tuple(int(s) for s in preset.crop_size),
                   preset.interpolation.value, preset.antialias, tuple(preset.mean), tuple(preset.std))

    @property
    def input_size(self) -> int:
        return self.crop[0]

    def spec(self) -> str:
        """The whole preprocessing in one line, as feature files record it."""
        return (f"resize={self.resize[0]} crop={self.crop[0]} interpolation={self.interpolation} "
                f"mean={list(self.mean)} std={list(self.std)}")


class UInt8Crop:
    """Resize and centre-crop like ``ImageClassification``: PIL image -> HWC uint8 array.

    For PIL images the crop box is mapped back to the source and PIL resamples only
    that box (``Image.resize(box=...)``): the same filter and sample positions as
    resizing the whole image and cropping afterwards, at a fraction of the work
    (a 300x240 photo: 50k output pixels instead of 82k). Values may differ by a grey
    level or two: PIL rounds to 8 bits between its horizontal and vertical passes and
    may order the passes differently for the two output sizes. HWC is what the model
    wants in channels_last layout, so batches need no transposing copy.
    """

    def __init__(self, preprocess: Preprocess):
        self.resize_size, self.crop_size = list(preprocess.resize), list(preprocess.crop)
        self.interpolation, self.antialias = preprocess.interpolation, preprocess.antialias
        self.crop_hw = self.crop_size if len(self.crop_size) == 2 else self.crop_size * 2

    def __call__(self, img, orientation: int = 1) -> np.ndarray:
        """PIL image (turned already) or CHW uint8 tensor (turned as EXIF ``orientation`` says) -> HWC uint8 array."""
        if not isinstance(img, Image.Image):
            return self.tensor(img, orientation).cpu().numpy()
        box = self._box(img.size)
        if box is not None:
            ch, cw = self.crop_hw
            return np.asarray(img.resize((cw, ch), PIL_FILTERS[self.interpolation], box=box))
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as F

        img = F.center_crop(F.resize(img, self.resize_size, interpolation=InterpolationMode(self.interpolation),
                                     antialias=self.antialias), self.crop_size)
        return F.pil_to_tensor(img).permute(1, 2, 0).numpy()

    def tensor(self, img, orientation: int = 1):
        """CHW uint8 tensor (any device) -> HWC uint8 tensor, with the preset's tensor ops, of the image
        turned as EXIF ``orientation`` says.

        torchvision's v2 kernels resize uint8 natively on the CPU (vectorised, channels-last
        when the CHW tensor views HWC memory) where v1 converts to float and back.
        Bilinear antialiasing only widens the filter when shrinking: an enlarged image (most of
        Caltech-101) gets the same pixels without it, 1.5x faster. Bicubic's is another kernel
        (PIL's a=-0.5 against -0.75) even when enlarging, so it stays. A turned image is resized as
        stored and only its crop is turned: turning the whole decoded image first is a transposing
        copy that costs more than the resize. Flipped, the pixels are the same; transposed, the
        resize's two passes run in the other order, which moves a bilinear pixel by one grey level at
        most, but a bicubic one (its kernel overshoots, and each pass clamps) by more: bicubic presets
        turn the whole image first.
        """
        swap, rows, cols = TURNS.get(orientation, (False, False, False))
        if swap and self.interpolation != "bilinear":  # turned first, laid out channels-last again
            img, orientation, swap, rows, cols = (turned_tensor(img, orientation).permute(1, 2, 0).contiguous()
                                                  .permute(2, 0, 1), 1, False, False, False)
        h, w = img.shape[-2:][::-1] if swap else img.shape[-2:]  # as displayed
        rs = self.resize_size
        shrinks = min(h, w) > rs[0] if len(rs) == 1 else (h > rs[0] or w > rs[1])
        antialias = bool(self.antialias and (shrinks or self.interpolation != "bilinear"))
        rw, rh = self._resized(w, h)
        offset = self._crop_offset(rw, rh)
        if offset is not None and _native_uint8(img, self.interpolation):
            (ch, cw), (top, left) = self.crop_hw, offset
            # the displayed crop's place in the stored image: undo the flips, then the swap
            top, left = rh - top - ch if rows else top, rw - left - cw if cols else left
            if swap:
                (top, left), (ch, cw), (rh, rw) = (left, top), (cw, ch), (rw, rh)
            resized = _resize_uint8(img, rh, rw, self.interpolation, antialias)
            return turned_tensor(resized[:, top:top + ch, left:left + cw], orientation).permute(1, 2, 0)
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms.v2 import functional as F2

        img = F2.resize(turned_tensor(img, orientation), rs, interpolation=InterpolationMode(self.interpolation),
                        antialias=antialias)
        return F2.center_crop(img, self.crop_size).permute(1, 2, 0)

    def _resized(self, w: int, h: int) -> tuple[int, int]:
        """(width, height) after the resize, as torchvision computes them."""
        if len(self.resize_size) != 1:
            return self.resize_size[1], self.resize_size[0]
        short, long = min(w, h), max(w, h)
        new_short, new_long = self.resize_size[0], int(self.resize_size[0] * long / short)
        return (new_short, new_long) if w <= h else (new_long, new_short)

    def _crop_offset(self, rw: int, rh: int) -> tuple[int, int] | None:
        """(top, left) of the centre crop in a ``rw`` x ``rh`` image, as torchvision places it; None
        where the crop is larger and torchvision would pad."""
        ch, cw = self.crop_hw
        if cw > rw or ch > rh:
            return None
        return int(round((rh - ch) / 2.0)), int(round((rw - cw) / 2.0))

    def _box(self, size: tuple[int, int]) -> tuple[float, float, float, float] | None:
        """The source rectangle behind the centre crop, or None when the shortcut does not apply."""
        if len(self.resize_size) != 1:
            return None
        w, h = size
        rw, rh = self._resized(w, h)
        offset = self._crop_offset(rw, rh)
        if offset is None:
            return None
        (top, left), (ch, cw) = offset, self.crop_hw
        sx, sy = w / rw, h / rh
        return left * sx, top * sy, (left + cw) * sx, (top + ch) * sy


def _native_uint8(img, interpolation: str) -> bool:
    """Where torchvision's v2 resize hands uint8 straight to torch's kernel (``_do_native_uint8_resize_on_cpu``):
    bicubic always, bilinear on CPUs with a vectorised uint8 kernel."""
    import torch  # loaded already: img is a tensor

    return (img.dtype == torch.uint8 and img.device.type == "cpu" and img.ndim == 3
            and (interpolation == "bicubic" or interpolation == "bilinear" and _cpu_resizes_uint8()))


@cache
def _cpu_resizes_uint8() -> bool:
    """torchvision's ``_do_native_uint8_resize_on_cpu`` for bilinear: a CPU with AVX2/AVX-512 or an ARM
    one (asked once: it is per image otherwise)."""
    import torch

    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") or platform.machine() in ("aarch64", "arm64")


def _resize_uint8(img, height: int, width: int, interpolation: str, antialias: bool):
    """torchvision v2's ``resize_image`` on that path, without importing torchvision (over a second of
    every run's start-up): the same kernel call, with the same re-striding of a channels-last image
    (pytorch#68430) so the output stays channels-last. ``tests/test_fast_paths.py`` checks that
    the pixels are torchvision's, bit for bit."""
    import torch

    c, h, w = img.shape
    if (height, width) == (h, w):
        return img
    x = img.reshape(1, c, h, w)
    if x.is_contiguous(memory_format=torch.channels_last) and x.numel() != x.stride()[0]:
        x = x.as_strided((1, c, h, w), (x.numel(), *x.stride()[1:]))
    return torch.nn.functional.interpolate(x, size=[height, width], mode=interpolation, align_corners=False,
                                           antialias=antialias)[0]
