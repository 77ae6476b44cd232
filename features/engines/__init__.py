"""Engines: where decoding and the frozen forward run. One interface, four sources.

Every engine is built from (images, backbone, taps, resolved run config), is a context
manager, and yields :class:`features.blocks.Block` objects in sample order from a
block-aligned start; the write loop in :mod:`features.extract` is the same for all.

- ``inline``: one model on all cores; each block decoded on threads between forward passes.
- ``workers``: DataLoader processes decode ahead while an accelerator computes.
- ``replicas``: one single-threaded model per CPU core in spawned processes.
- ``ray``: Ray Data tasks decode, a pool of Ray actors embeds (the optional extra ``taps[ray]``).

The registry maps a name to its module, imported on first use: Ray is optional, and no
engine imports another.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Iterator

from ..backbones import Backbone, Tap
from ..blocks import Block
from ..datasets import ImageSet
from ..options import RunConfig

ENGINES: dict[str, tuple[str, str]] = {
    "inline": (".local", "InlineEngine"),
    "workers": (".local", "WorkersEngine"),
    "replicas": (".replicas", "ReplicaEngine"),
    "ray": (".ray", "RayEngine"),
}


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


def engine_class(name: str) -> type[Engine]:
    """The engine registered under ``name`` (inline, workers, replicas, ray)."""
    module, cls = ENGINES[name]
    return getattr(importlib.import_module(module, __name__), cls)
