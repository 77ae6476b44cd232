"""Engines: where decoding and the frozen forward run. One interface, a source per loader.

Every engine is built from (images, backbone, taps, resolved run config), is a context
manager, and yields :class:`features.blocks.Block` objects in sample order from a
block-aligned start; the write loop in :mod:`features.extract` is the same for all.

Each is declared once, as a :mod:`features.loaders` record that names its class here, imported
on first use: Ray is optional, and no engine imports another.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator

from ..backbones import Backbone, Tap
from ..blocks import Block
from ..datasets import ImageSet
from ..options import RunConfig


class Engine(ABC):
    """Decode and embed blocks of ``images``; ``startup_seconds`` and ``compile_seconds`` say what
    getting ready took (model loads, process start-up, ``torch.compile``) before the first block."""

    startup_seconds: float = 0.0
    compile_seconds: float = 0.0

    def __init__(self, images: ImageSet, backbone: Backbone, taps: list[Tap], cfg: RunConfig):
        self.images, self.backbone, self.taps, self.cfg = images, backbone, taps, cfg

    @abstractmethod
    def blocks(self, start: int) -> Iterator[Block]:
        """Blocks [start, start + B), [start + B, start + 2B), ... to the end, in order."""

    def close(self) -> None:  # noqa: B027 - a hook: engines without processes have nothing to stop
        """Stop whatever feeds the blocks (threads, processes, a Ray instance)."""

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
