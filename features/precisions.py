"""``--precision``: what number format the frozen forward computes in, one record each.

A :class:`Precision` declares the device types torch runs it on (autocast to ``dtype``), whether
it is a post-training quantisation only the exported runtimes run, and when ``auto`` picks it.
The runtimes (:mod:`features.runtime_records`) list which of these they run; the options read
the valid values, the device check and the ``auto`` rule from here. This module imports no torch
at import time: ``taps --help`` reads it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .registry import Registry

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Precision:
    name: str
    summary: str                   # what it is, and when auto picks it (the CLI's help)
    devices: tuple[str, ...]       # device types torch's forward runs it on (none: exported runtimes only)
    dtype: str | None = None       # torch dtype autocast computes in; None: the weights' own fp32, no autocast
    quantized: bool = False        # a calibrated int8 export (features.quantize), not an autocast
    auto: Callable[[torch.device], bool] | None = None  # whether ``auto`` picks it on this device


PRECISION_REGISTRY: Registry[Precision] = Registry("--precision")
register_precision = PRECISION_REGISTRY.register
get_precision = PRECISION_REGISTRY.lookup


def precisions_on(device_type: str) -> tuple[str, ...]:
    """The precisions torch's forward runs on ``device_type``."""
    return tuple(name for name, p in PRECISION_REGISTRY.items() if device_type in p.devices)


def auto_precision(device: torch.device) -> str:
    """The first precision whose rule picks it on ``device``; fp32 where none does."""
    return next((name for name, p in PRECISION_REGISTRY.items() if p.auto and p.auto(device)), FP32)


def _cpu_with_bf16_kernels(device: torch.device) -> bool:
    import torch

    return device.type == "cpu" and torch.backends.mkldnn.is_available() and \
        torch.ops.mkldnn._is_mkldnn_bf16_supported()


FP32 = register_precision(Precision(
    "fp32", "the weights' own float32 (auto's choice where no other is)", ("cpu", "cuda", "mps"))).name
BF16 = register_precision(Precision(
    "bf16", "bfloat16 autocast (auto's choice on CPUs with bf16 kernels)", ("cpu", "cuda"), "bfloat16",
    auto=_cpu_with_bf16_kernels)).name
FP16 = register_precision(Precision(
    "fp16", "float16 autocast (auto's choice on CUDA)", ("cuda", "mps"), "float16",
    auto=lambda device: device.type == "cuda")).name
INT8 = register_precision(Precision(
    "int8", "quantised after training by an exported runtime, calibrated on images of the dataset, its "
            "agreement with fp32 recorded", (), quantized=True)).name
PRECISIONS = tuple(PRECISION_REGISTRY)
