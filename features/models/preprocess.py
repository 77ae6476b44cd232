"""The geometric half of a preset's preprocessing, on uint8 pixels."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import functional as F
from torchvision.transforms._presets import ImageClassification
from torchvision.transforms.v2 import functional as F2


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

    def __init__(self, preset: ImageClassification):
        self.resize_size, self.crop_size = list(preset.resize_size), list(preset.crop_size)
        self.interpolation, self.antialias = preset.interpolation, preset.antialias
        self.crop_hw = self.crop_size if len(self.crop_size) == 2 else self.crop_size * 2

    def __call__(self, img) -> np.ndarray:
        """PIL image or CHW uint8 tensor -> HWC uint8 array."""
        if not isinstance(img, Image.Image):
            return self.tensor(img).cpu().numpy()
        box = self._box(img.size)
        if box is not None:
            ch, cw = self.crop_hw
            return np.asarray(img.resize((cw, ch), F.pil_modes_mapping[self.interpolation], box=box))
        img = F.center_crop(F.resize(img, self.resize_size, interpolation=self.interpolation,
                                     antialias=self.antialias), self.crop_size)
        return F.pil_to_tensor(img).permute(1, 2, 0).numpy()

    def tensor(self, img: torch.Tensor) -> torch.Tensor:
        """CHW uint8 tensor (any device) -> HWC uint8 tensor, with the preset's tensor ops.

        torchvision's v2 kernels resize uint8 natively on the CPU (vectorised, channels-last
        when the CHW tensor views HWC memory) where v1 converts to float and back.
        Antialiasing only widens the filter when shrinking: an enlarged image (most of
        Caltech-101) gets the same pixels without it, 1.5x faster.
        """
        h, w = img.shape[-2:]
        rs = self.resize_size
        shrinks = min(h, w) > rs[0] if len(rs) == 1 else (h > rs[0] or w > rs[1])
        img = F2.resize(img, rs, interpolation=self.interpolation, antialias=self.antialias and shrinks)
        return F2.center_crop(img, self.crop_size).permute(1, 2, 0)

    def _box(self, size: tuple[int, int]) -> tuple[float, float, float, float] | None:
        """The source rectangle behind the centre crop, or None when the shortcut does not apply."""
        if len(self.resize_size) != 1:
            return None
        w, h = size
        short, long = min(w, h), max(w, h)
        new_short, new_long = self.resize_size[0], int(self.resize_size[0] * long / short)  # as F.resize
        rw, rh = (new_short, new_long) if w <= h else (new_long, new_short)
        ch, cw = self.crop_hw
        if cw > rw or ch > rh:  # F.center_crop would pad
            return None
        top, left = int(round((rh - ch) / 2.0)), int(round((rw - cw) / 2.0))  # as F.center_crop
        sx, sy = w / rw, h / rh
        return left * sx, top * sy, (left + cw) * sx, (top + ch) * sy
