"""``--loader`` and ``--engine``: where decoding and the frozen forward run, one record each.

A :class:`Loader` declares its engine class (``module:Class`` in :mod:`features.engines`, imported
when an extraction starts, so Ray stays optional and this declaration free of torch), what
``--workers`` counts for it, the device types it runs on, and when ``--loader auto`` picks it.
A ``remote`` loader is chosen with ``--engine`` instead (Ray: the work runs in a cluster's tasks and
actors, whose decoding is on CPUs). Adding a loader is one :func:`register_loader` call and its
engine class.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from .errors import UsageError, choose
from .registry import Registry, load

AUTO = "auto"
LOCAL = "local"  # --engine local: one of the local loaders, in this process and its children
# `--loader auto` runs replicas on CPU datasets at least this large: below it their start-up
# (spawning processes, building and compiling one model each) outweighs what they save.
REPLICAS_MIN_IMAGES = 20_000


@dataclass(frozen=True)
class Loader:
    name: str
    engine: str                      # "module:Class" of its features.engines.Engine
    workers: str                     # what --workers counts for it
    summary: str
    devices: tuple[str, ...] | None = None  # device types it runs on; None: any
    replicated: bool = False         # every worker holds its own model and runs its share at once
    remote: bool = False             # picked by --engine (not --loader); decodes in CPU tasks
    auto: Callable[[str, int, int], bool] | None = None  # (device type, images, cores): --loader auto picks it

    def engine_class(self) -> type:
        return load(self.engine)


LOADER_REGISTRY: Registry[Loader] = Registry("--loader")
register_loader = LOADER_REGISTRY.register
get_loader = LOADER_REGISTRY.lookup


def default_workers() -> int:
    """One per core this process may use, at most 8."""
    return min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1, 8)


def resolve_loader(loader: str, device_type: str, n_images: int) -> str:
    """``loader`` checked against the device, or for ``auto`` the record whose rule picks it."""
    choose("--loader", loader, LOADERS)
    if loader != AUTO:
        devices = get_loader(loader).devices
        if devices is not None and device_type not in devices:
            raise UsageError(f"--loader {loader} runs on {' or '.join(devices)}, not on {device_type}; "
                             f"use --loader {AUTO} there")
        return loader
    cores = default_workers()
    return next(name for name, r in LOADER_REGISTRY.items() if r.auto and r.auto(device_type, n_images, cores))


def _large_cpu_run(device_type: str, n_images: int, cores: int) -> bool:
    return device_type == "cpu" and n_images >= REPLICAS_MIN_IMAGES and cores >= 2


INLINE = register_loader(Loader(
    "inline", "features.engines.local:InlineEngine", "decode threads",
    "one model on all cores, each batch decoded on threads between forward passes (auto's choice on CPUs below "
    f"{REPLICAS_MIN_IMAGES:,} images)",
    auto=lambda device_type, n, cores: device_type == "cpu" and not _large_cpu_run(device_type, n, cores))).name
WORKERS = register_loader(Loader(
    "workers", "features.engines.local:WorkersEngine", "DataLoader processes",
    "DataLoader processes decode ahead while an accelerator computes (auto's choice on CUDA and MPS)",
    auto=lambda device_type, n, cores: device_type != "cpu")).name
REPLICAS = register_loader(Loader(
    "replicas", "features.engines.replicas:ReplicaEngine", "one-thread replicas",
    "one single-threaded model per CPU core, each decoding its own batches (auto's choice on CPUs from "
    f"{REPLICAS_MIN_IMAGES:,} images)", devices=("cpu",), replicated=True,
    auto=_large_cpu_run)).name
RAY = register_loader(Loader(
    "ray", "features.engines.ray:RayEngine", "Ray actors",
    "Ray Data tasks decode, a pool of Ray actors embeds (needs the extra taps[ray])",
    replicated=True, remote=True)).name
LOADERS = (AUTO, *(name for name, r in LOADER_REGISTRY.items() if not r.remote))  # --loader's choices
ENGINES = (LOCAL, *(name for name, r in LOADER_REGISTRY.items() if r.remote))    # --engine's choices
