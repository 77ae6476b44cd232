"""How an extraction runs: one validated settings object, the tables of valid values, and the
one place where ``auto`` values are resolved for this machine.

:class:`ExtractOptions` is what a user sets (from the CLI or from Python); it is frozen,
keyword-only and checked when built, so bad values fail before any work. :meth:`ExtractOptions.resolve`
turns it into a :class:`RunConfig`: the device, precision, loader and decoder this machine will
really use. The CLI's ``choices=`` and help text come from :data:`CHOICES`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .decoders import DECODER_REGISTRY, SIMPLEJPEG, TORCHVISION, get_decoder
from .errors import UsageError, choose
from .pooling import DEFAULT_POOLING, POOLINGS
from .quantize import INT8
from .runtime_records import RUNTIME_REGISTRY, TORCH, exported_runtimes

if TYPE_CHECKING:  # imported where a device is resolved: the CLI's parser and `taps --help` never need torch
    import torch

AUTO = "auto"    # an option this machine decides (features.options.ExtractOptions.resolve)

# The valid values of each option, in the order help text lists them.
FEATURES_ROOT = "feature_store"  # where extract writes feature files, one folder per dataset
CHOICES: dict[str, tuple[str, ...]] = {
    "pooling": POOLINGS,
    "device": ("auto", "cpu", "cuda", "mps"),
    "precision": ("auto", "fp32", "bf16", "fp16", INT8),
    "on_error": ("skip", "fail"),
    "engine": ("local", "ray"),
    "loader": ("auto", "inline", "workers", "replicas"),
    "compile": ("auto", "on", "off"),
    "decode": ("auto", *DECODER_REGISTRY),
    "runtime": (*RUNTIME_REGISTRY, AUTO),
}
# The precisions a torch forward can run on each device type (what ``auto`` may adopt from a file).
VALID_PRECISIONS: dict[str, tuple[str, ...]] = {"cpu": ("fp32", "bf16"), "cuda": ("fp32", "fp16", "bf16"),
                                                "mps": ("fp32", "fp16")}
# The runtimes that run taps' ONNX export (features.runtimes) and the precisions each runs on the CPU.
EXPORTED_RUNTIME_PRECISIONS: dict[str, tuple[str, ...]] = {n: r.precisions for n, r in exported_runtimes().items()}
# `--loader auto` runs replicas on CPU datasets at least this large: below it their start-up
# (spawning processes, building and compiling one model each) outweighs what they save.
REPLICAS_MIN_IMAGES = 20_000


def default_workers() -> int:
    """One per core this process may use, at most 8."""
    return min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1, 8)


@dataclass(frozen=True, kw_only=True)
class ExtractOptions:
    """Everything ``taps extract`` takes besides the dataset, the backbone and the taps.

    ``workers`` is the parallelism of the chosen loader: decode threads (``inline``),
    DataLoader processes (``workers``), model replicas (``replicas``) or Ray actors
    (``engine="ray"``); ``None`` is one per core, at most 8.
    """

    pooling: str = DEFAULT_POOLING
    device: str = "auto"
    precision: str = "auto"
    batch_size: int = 64
    workers: int | None = None
    channels_last: bool = True
    on_error: str = "skip"
    draft: bool = True            # JPEGs decode at a reduced DCT scale that still covers the resize
    loader: str = "auto"
    compile: str = "auto"
    decode: str = "auto"
    runtime: str = TORCH  # onnxruntime | openvino: the extractor exported to ONNX (features.runtimes), on
    # the CPU; auto: the fastest installed runtime on a calibration batch (on the CPU; on a GPU, torch)
    retime: bool = False  # auto: time the runtimes again instead of reusing this CPU's recorded choice
    engine: str = "local"
    ray_address: str | None = None
    gpus_per_worker: float = 0.0
    out: Path | str = FEATURES_ROOT
    path: Path | str | None = None    # write exactly here instead of under ``out``
    force: bool = False
    progress: bool = True
    verify_content: bool = False      # fingerprint the dataset by its bytes, and compare them on a rerun
    shard: tuple[int, int] | None = None
    limit_batches: int | None = None  # stop after this many batches (tests of interruption)

    def __post_init__(self) -> None:
        for name, valid in CHOICES.items():
            choose(f"--{name.replace('_', '-')}", getattr(self, name), valid)
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1, not {self.batch_size}")
        if self.workers is not None and self.workers < 0:
            raise UsageError(f"--workers must be 0 or more, not {self.workers}")
        if self.gpus_per_worker < 0:
            raise UsageError(f"--gpus-per-worker must be 0 or more, not {self.gpus_per_worker}")
        precisions = EXPORTED_RUNTIME_PRECISIONS.get(self.runtime)
        if precisions and (self.device not in ("auto", "cpu") or self.gpus_per_worker
                           or self.precision not in ("auto", *precisions)):
            spelled = " or ".join([", ".join(precisions[:-1]), precisions[-1]] if len(precisions) > 1 else precisions)
            raise UsageError(f"--runtime {self.runtime} runs the forward on the CPU in {spelled}; "
                             "drop --device, --gpus-per-worker and --precision, or use --runtime torch")
        if self.precision == INT8 and (self.runtime == TORCH or self.engine == "ray" or self.shard):
            raise UsageError("--precision int8 runs a post-training quantised export on the CPU, locally: use "
                             "--runtime openvino (or auto), without --engine ray or --shard")
        _check_decoder_engine(self.decode, self.engine)

    def resolve(self, n_images: int) -> RunConfig:
        """The settings this machine will use for ``n_images`` images, every ``auto`` decided."""
        exported = EXPORTED_RUNTIME_PRECISIONS.get(self.runtime)
        device = resolve_device("cpu" if exported else self.device)
        precision = resolve_precision(self.precision, device)
        if exported and precision not in exported:  # auto on a bf16 CPU, for a runtime that runs fp32 only
            precision = "fp32"
        runtime = TORCH if self.runtime == AUTO and (device.type != "cpu" or self.gpus_per_worker) else self.runtime
        if runtime == TORCH and precision == INT8:  # auto on an accelerator: torch, which quantises nothing
            precision = "fp32"
        return RunConfig(pooling=self.pooling, device=device, precision=precision, runtime=runtime,
                         workers=default_workers() if self.workers is None else self.workers,
                         channels_last=self.channels_last, on_error=self.on_error, draft=self.draft,
                         loader=resolve_loader(self.loader, device, n_images), compile=self.compile,
                         decode=resolve_decode(self.decode, device, self.engine), batch_size=self.batch_size,
                         actors=self.workers, ray_address=self.ray_address, gpus_per_worker=self.gpus_per_worker)


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """How one extraction pass runs, resolved for this machine. None of it changes what is
    computed beyond the rounding level (precision, compile, and a grey level or two between
    decoders); what does change it (weights, preprocessing, pooling) names the file or the tap."""

    pooling: str
    device: torch.device
    precision: str
    workers: int
    channels_last: bool
    on_error: str
    draft: bool
    loader: str = "inline"      # inline | workers | replicas
    compile: str = "off"        # auto | on | off (decided by dataset size, see features.forward)
    runtime: str = TORCH        # torch | onnxruntime | openvino | auto (decided by features.runtimes.resolve_runtime)
    runtime_rates: str = ""     # auto: what the calibration timing measured, recorded beside the choice
    quantization: str = ""      # int8: the calibration and the agreement with fp32 (JSON), recorded per tap
    onnx_path: str = ""         # an exported runtime: the export it checked (loaded by each engine)
    decode: str = SIMPLEJPEG  # a features.decoders record
    batch_size: int = 64
    actors: int | None = None   # ray: backbone actors (None: one, or one per GPU slot)
    ray_address: str | None = None
    gpus_per_worker: float = 0.0


def resolve_device(device: str) -> torch.device:
    """``auto``: CUDA, then MPS, then the CPU; an unavailable explicit choice is a usage error."""
    import torch

    choose("--device", device, CHOICES["device"])
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda requested but no CUDA GPU is visible; use --device auto or cpu")
    if device == "mps" and not mps:
        raise UsageError("--device mps requested but MPS is not available; use --device auto or cpu")
    return torch.device(device)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto``: fp16 autocast on CUDA, bf16 on CPUs with native bf16 kernels, else fp32."""
    import torch

    choose("--precision", precision, CHOICES["precision"])
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "fp16"
    if device.type == "cpu" and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return "bf16"
    return "fp32"


def resolve_loader(loader: str, device: torch.device, n_images: int) -> str:
    """``auto``: on CPUs with 2+ cores, replicas for datasets large enough to repay their start-up
    (see :data:`REPLICAS_MIN_IMAGES`), else inline; worker processes on accelerators."""
    choose("--loader", loader, CHOICES["loader"])
    if loader == "replicas" and device.type != "cpu":
        raise UsageError(f"--loader replicas runs one model per CPU core, not on {device.type}; "
                         "use --loader auto or workers there")
    if loader != "auto":
        return loader
    if device.type != "cpu":
        return "workers"
    return "replicas" if n_images >= REPLICAS_MIN_IMAGES and default_workers() >= 2 else "inline"


def resolve_decode(decode: str, device: torch.device, engine: str) -> str:
    """``auto``: torchvision (nvJPEG) on CUDA in the local engine, else simplejpeg (Ray decodes in CPU tasks)."""
    choose("--decode", decode, CHOICES["decode"])
    _check_decoder_engine(decode, engine)
    if decode != "auto":
        return decode
    return TORCHVISION if device.type == "cuda" and engine == "local" else SIMPLEJPEG


def _check_decoder_engine(decode: str, engine: str) -> None:
    if decode in DECODER_REGISTRY and get_decoder(decode).on_device and engine == "ray":
        cpu = " or ".join(name for name, d in DECODER_REGISTRY.items() if not d.on_device)
        raise UsageError(f"--decode {decode} decodes on the model's device in the local engine; "
                         f"with --engine ray use --decode {cpu}")
