"""``--decode``: who turns image files into pixels, one record each.

A :class:`Decoder` declares what the rest of taps needs to know about a decoder: its name, whether
it decodes whole batches of JPEG bytes on the model's device (nvJPEG through torchvision, on
CUDA) and so cannot run in Ray's CPU tasks, and whether it takes the DCT-domain draft shortcut.
Adding a decoder is one :func:`register_decoder` call (and its code in the loaders).
"""

from __future__ import annotations

from dataclasses import dataclass

from .registry import Registry


@dataclass(frozen=True)
class Decoder:
    name: str
    description: str
    on_device: bool = False  # decodes batches of JPEG bytes on the model's device (not in Ray's CPU tasks)


DECODER_REGISTRY: Registry[Decoder] = Registry("--decode")
register_decoder = DECODER_REGISTRY.register
get_decoder = DECODER_REGISTRY.lookup


SIMPLEJPEG = register_decoder(Decoder(
    "simplejpeg", "libjpeg-turbo at PIL's draft scale, crop box resized (the CPU default)")).name
PIL = register_decoder(Decoder("pil", "PIL's decoder and resize (files made before the decoder was recorded)")).name
TORCHVISION = register_decoder(Decoder(
    "torchvision", "torchvision.io.decode_jpeg on the model's device (nvJPEG on CUDA)", on_device=True)).name
LEGACY_DECODER = PIL  # what taps made before the decoder was recorded were decoded with

# Every decoder turns an image as its EXIF orientation says (as viewers show it), recorded on each tap
# as ``orientation``; taps made before that was recorded hold the pixels as stored in the file.
EXIF_TURNED = "exif"
AS_STORED = "stored"
