"""The engines of one process and one model: ``inline`` (the CPU default below
:data:`features.loaders.REPLICAS_MIN_IMAGES`) and ``workers`` (the default on accelerators)."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

from torch.utils.data import DataLoader

from ..blocks import Block, BlockSource, block_ranges, prepare_forward
from . import Engine


class InlineEngine(Engine):
    """Decode each block on ``workers`` threads in the caller's turn, then embed it.

    On a CPU the forward pass already keeps every core busy; decoding alongside it only makes
    the forward's threads wait for a preempted peer. Decoding between forward passes, on all
    cores, costs exactly its own time divided by the cores (PIL releases the GIL, and
    simplejpeg scales across threads the same).
    """

    def __init__(self, images, backbone, taps, cfg):
        super().__init__(images, backbone, taps, cfg)
        # By dataset size, not images left: a resumed run must compute the way it started.
        self.forward = prepare_forward(backbone, taps, cfg, len(images))
        self.compile_seconds = self.startup_seconds = self.forward.compile_seconds
        self.source = BlockSource.of(images, backbone.pixel_transform(), cfg)

    def blocks(self, start: int) -> Iterator[Block]:
        dataset = self.source.dataset
        pool = ThreadPoolExecutor(self.cfg.workers, thread_name_prefix="taps-decode") if self.cfg.workers > 1 else None
        try:
            for rows in block_ranges(start, len(self.images), self.cfg.batch_size):
                items = list(pool.map(dataset.__getitem__, rows)) if pool else [dataset[i] for i in rows]
                yield self.source.embed(self.source.collate(items), self.forward)
        finally:  # also when the caller stops early (closes this generator)
            if pool is not None:
                pool.shutdown(cancel_futures=True)


class WorkersEngine(InlineEngine):
    """Decode ahead in ``workers`` DataLoader processes while the model computes (pinned memory on CUDA)."""

    def blocks(self, start: int) -> Iterator[Block]:
        cfg = self.cfg
        ranges = [list(r) for r in block_ranges(start, len(self.images), cfg.batch_size)]
        loader = DataLoader(self.source.dataset, batch_sampler=ranges, collate_fn=self.source.collate,
                            num_workers=cfg.workers, pin_memory=cfg.device.type == "cuda",
                            prefetch_factor=4 if cfg.workers else None)
        for collated in loader:
            yield self.source.embed(collated, self.forward)
