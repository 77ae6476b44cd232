"""Ray Data engine for `taps extract --engine ray` (optional extra ``taps[ray]``).

Decoding and preprocessing run as Ray tasks on CPUs; the frozen backbone runs in
a pool of stateful actors (``map_batches`` with a class: one model load per
actor, ``num_gpus`` per actor where GPUs exist). Order is preserved, so the
driver writes the same fixed blocks through the same :class:`FeatureWriter` as
the local engine: same schema, same sample order, resumable the same way. Ray
retries failed tasks and restarts dead actors; a rerun skips finished blocks.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..backbones import Backbone, Tap
from ..blocks import Block, prepare_forward
from ..datasets import BadImage, ImageSet
from ..errors import UsageError
from ..options import TORCH, RunConfig
from ..turbojpeg import sample_pixels
from . import Engine


def _decode(batch: dict, images: ImageSet, transform, min_side: int | None, start: int, decode: str) -> dict:
    index = batch["id"].astype(np.int64) + start
    size = int(transform.crop_size[0])
    pixels = np.zeros((len(index), size, size, 3), np.uint8)  # NHWC, as the local loaders
    errors = np.array([""] * len(index), dtype=object)
    for row, i in enumerate(index):
        try:
            pixels[row] = sample_pixels(images, int(i), transform, min_side, decode)
        except BadImage as exc:
            errors[row] = str(exc) or "undecodable image"
    return {"index": index, "pixels": pixels, "error": errors.astype(str)}


class _Embed:
    """One backbone per actor; forward the good rows of each batch, pool, return float32 rows.
    With an exported runtime the actor runs the driver's checked export: the file itself where
    this machine has it intact, else its bytes from the object store (``export``: sha256, ref)."""

    def __init__(self, backbone_args: tuple, taps: list[Tap], cfg: RunConfig, export: tuple | None = None):
        import dataclasses

        import torch

        from ..runtime import keep_freed_memory

        self._memory = keep_freed_memory()  # for the actor's lifetime, as extract() does for a local run
        self._memory.__enter__()
        self.taps, self.pooling = taps, cfg.pooling
        if export is not None:
            import ray

            from ..runtimes import local_export

            sha256, ref = export
            cfg = dataclasses.replace(cfg, onnx_path=str(local_export(cfg.onnx_path, sha256, lambda: ray.get(ref))))
        # The driver's device (a GPU when actors are given GPUs) and the precision it records in the file;
        # eager: an actor's share of a run is too short to repay compiling.
        device = torch.device("cuda" if cfg.gpus_per_worker else cfg.device.type)
        name, weights, image_size = backbone_args
        self.forward = prepare_forward(Backbone(name, weights, image_size), taps,
                                       dataclasses.replace(cfg, device=device, compile="off"), 0)

    def __call__(self, batch: dict) -> dict:
        import torch

        from ..pooling import pooled_dim

        good = batch["error"] == ""
        out = {"index": batch["index"], "error": batch["error"]}
        arrays = self.forward(torch.from_numpy(batch["pixels"][good])) if good.any() else {}
        for t in self.taps:
            rows = np.zeros((len(good), pooled_dim(t.shape, self.pooling)), np.float32)
            if good.any():
                rows[good] = arrays[t.name]
            out[f"tap:{t.name}"] = rows
        return out


class RayEngine(Engine):
    """Decoding in Ray Data tasks, the backbone in a pool of ``cfg.actors`` actors (one per GPU slot
    with ``gpus_per_worker``); a local Ray started here gets every core and is shut down after."""

    def __init__(self, images: ImageSet, backbone: Backbone, taps: list[Tap], cfg: RunConfig):
        super().__init__(images, backbone, taps, cfg)
        try:
            import ray  # noqa: F401
        except ImportError:
            raise UsageError("--engine ray needs Ray: pip install 'taps[ray]' (or ray[data])") from None

    def blocks(self, start: int) -> Iterator[Block]:
        import ray

        images, backbone, taps, cfg = self.images, self.backbone, self.taps, self.cfg
        batch_size = cfg.batch_size
        started_here = not ray.is_initialized()
        n_actors = max(1, cfg.actors or 1)
        if started_here:
            # A local Ray gets every core, and at least one CPU beyond the actors: the read and
            # decode tasks need one, or the pipeline waits forever on its resource budget.
            local = {} if cfg.ray_address else {"num_cpus": max(os.cpu_count() or 1, n_actors + 1)}
            ray.init(address=cfg.ray_address, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True,
                     logging_level="warning", **local)
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True
        ctx.enable_progress_bars = False
        transform = backbone.pixel_transform()
        min_side = int(transform.resize_size[0]) if cfg.draft else None
        if not cfg.actors and cfg.gpus_per_worker:  # one actor per GPU slot
            n_actors = max(1, int(ray.cluster_resources().get("GPU", 0) // cfg.gpus_per_worker))
        export = None
        if cfg.runtime != TORCH:  # the checked export travels through the object store (nested: not fetched
            from ..files import file_sha256  # by actors whose machine has the file already)

            export = (file_sha256(cfg.onnx_path), ray.put(Path(cfg.onnx_path).read_bytes()))
        ds = ray.data.range(len(images) - start, override_num_blocks=max(1, (len(images) - start) // (4 * batch_size)))
        ds = ds.map_batches(_decode, batch_size=batch_size, batch_format="numpy",
                            fn_kwargs={"images": images, "transform": transform, "min_side": min_side,
                                       "start": start, "decode": cfg.decode})
        ds = ds.map_batches(_Embed, batch_size=batch_size, batch_format="numpy",
                            compute=ray.data.ActorPoolStrategy(size=n_actors), num_gpus=cfg.gpus_per_worker or None,
                            fn_constructor_args=(backbone.spec_args(), taps, cfg, export))
        try:
            for batch in ds.iter_batches(batch_size=batch_size, batch_format="numpy", prefetch_batches=2):
                index = batch["index"]
                good = batch["error"] == ""
                errors = {int(i): str(e) for i, e in zip(index, batch["error"], strict=True) if e}
                yield Block(int(index[0]), int(index[-1]) + 1, {t.name: batch[f"tap:{t.name}"][good] for t in taps},
                            errors)
        finally:
            if started_here:
                ray.shutdown()
