"""How an extraction runs: one validated settings object, the tables of valid values, and the
one place where ``auto`` values are resolved for this machine.

:class:`ExtractOptions` is what a user sets (from the CLI or from Python); it is frozen,
keyword-only and checked when built, so bad values fail before any work. :meth:`ExtractOptions.resolve`
turns it into a :class:`RunConfig`: the device, precision, loader and decoder this machine will
really use. The CLI's ``choices=`` and help text come from :data:`CHOICES`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .decoders import DECODER_REGISTRY, SIMPLEJPEG, TORCHVISION, get_decoder
from .errors import TapsError, UsageError, choose
from .loaders import AUTO, ENGINES, LOADERS, LOCAL, default_workers, resolve_loader
from .pooling import DEFAULT_POOLING, POOLINGS
from .precisions import FP32, INT8, PRECISIONS, auto_precision, get_precision
from .runtime import reachable
from .runtime_records import RUNTIME_REGISTRY, TORCH, exported_runtimes

if TYPE_CHECKING:  # imported where a device is resolved: the CLI's parser and `taps --help` never need torch
    import torch

# The valid values of each option, in the order help text lists them.
FEATURES_ROOT = "feature_store"  # where extract writes feature files, one folder per dataset
CHOICES: dict[str, tuple[str, ...]] = {
    "pooling": POOLINGS,
    "device": ("auto", "cpu", "cuda", "mps"),
    "precision": (AUTO, *PRECISIONS),
    "on_error": ("skip", "fail"),
    "engine": ENGINES,
    "loader": LOADERS,
    "compile": ("auto", "on", "off"),
    "decode": ("auto", *DECODER_REGISTRY),
    "runtime": (*RUNTIME_REGISTRY, AUTO),
}
# The runtimes that run taps' ONNX export (features.runtimes) and the precisions each runs on the CPU.
EXPORTED_RUNTIME_PRECISIONS: dict[str, tuple[str, ...]] = {n: r.precisions for n, r in exported_runtimes().items()}

@dataclass(frozen=True, kw_only=True)
class ExtractOptions:
    """Everything ``taps extract`` takes besides the dataset, the backbone and the taps.

    ``workers`` is the parallelism of the chosen loader: decode threads (``inline``),
    DataLoader processes (``workers``), model replicas (``replicas``) or Ray actors
    (``engine="ray"``); ``None`` is one per core, at most 8.
    """

    pooling: str = DEFAULT_POOLING
    device: str = AUTO
    precision: str = AUTO
    batch_size: int = 64
    workers: int | None = None
    channels_last: bool = True
    on_error: str = "skip"
    draft: bool = True            # JPEGs decode at a reduced DCT scale that still covers the resize
    loader: str = AUTO
    compile: str = AUTO
    decode: str = AUTO
    runtime: str = TORCH  # onnxruntime | openvino: the extractor exported to ONNX (features.runtimes), on
    # the CPU; auto: the fastest installed runtime on a calibration batch (on the CPU; on a GPU, torch)
    retime: bool = False  # auto: time the runtimes again instead of reusing this CPU's recorded choice
    engine: str = LOCAL
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
        if precisions and (self.device not in (AUTO, "cpu") or self.gpus_per_worker
                           or self.precision not in (AUTO, *precisions)):
            spelled = " or ".join([", ".join(precisions[:-1]), precisions[-1]] if len(precisions) > 1 else precisions)
            raise UsageError(f"--runtime {self.runtime} runs the forward on the CPU in {spelled}; "
                             f"drop --device, --gpus-per-worker and --precision, or use --runtime {TORCH}")
        if self.precision == INT8 and (self.runtime == TORCH or self.engine != LOCAL or self.shard):
            quantizing = " or ".join(n for n, r in exported_runtimes().items() if INT8 in r.precisions)
            raise UsageError(f"--precision {INT8} runs a post-training quantised export on the CPU, locally: use "
                             f"--runtime {quantizing} (or {AUTO}), without --engine {' or '.join(e for e in ENGINES if e != LOCAL)} or --shard")
        _check_decoder_engine(self.decode, self.engine)
        _check_ray_address(self.ray_address)

    def resolve(self, n_images: int) -> RunConfig:
        """The settings this machine will use for ``n_images`` images, every ``auto`` decided."""
        exported = EXPORTED_RUNTIME_PRECISIONS.get(self.runtime)
        device = resolve_device("cpu" if exported else self.device)
        precision = resolve_precision(self.precision, device)
        if exported and precision not in exported:  # auto on a bf16 CPU, for a runtime that runs fp32 only
            precision = FP32
        runtime = TORCH if self.runtime == AUTO and (device.type != "cpu" or self.gpus_per_worker) else self.runtime
        if runtime == TORCH and get_precision(precision).quantized:  # auto on an accelerator: torch quantises nothing
            precision = FP32
        return RunConfig(pooling=self.pooling, device=device, precision=precision, runtime=runtime,
                         workers=default_workers() if self.workers is None else self.workers,
                         channels_last=self.channels_last, on_error=self.on_error, draft=self.draft,
                         loader=resolve_loader(self.loader, device.type, n_images) if self.engine == LOCAL
                         else self.engine, compile=self.compile,
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
    loader: str                 # a features.loaders record: where decoding and the forward run
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
    """``auto``: the precision whose record's rule picks it on ``device`` (:mod:`features.precisions`)."""
    choose("--precision", precision, CHOICES["precision"])
    return auto_precision(device) if precision == AUTO else precision


def resolve_decode(decode: str, device: torch.device, engine: str) -> str:
    """``auto``: torchvision (nvJPEG) on CUDA in the local engine, else simplejpeg (Ray decodes in CPU tasks)."""
    choose("--decode", decode, CHOICES["decode"])
    _check_decoder_engine(decode, engine)
    if decode != AUTO:
        return decode
    return TORCHVISION if device.type == "cuda" and engine == LOCAL else SIMPLEJPEG


def _check_ray_address(address: str | None) -> None:
    """A named Ray cluster that does not answer is refused at once: ``ray.init`` waits for it for minutes.
    ``auto`` (RAY_ADDRESS, or a cluster started on this machine) is left to Ray."""
    if not address or address == AUTO:
        return
    scheme, _, rest = address.rpartition("://")
    host = rest.split("/", 1)[0]
    port = 10001 if scheme == "ray" else 6379  # Ray Client's port; the cluster's (GCS) port
    if not reachable(f"{scheme or 'tcp'}://{host if ':' in host else f'{host}:{port}'}"):
        raise TapsError(f"--ray-address {address}: no Ray cluster answers there; start one (`ray start --head`) or "
                        f"leave --ray-address out for a local Ray")


def _check_decoder_engine(decode: str, engine: str) -> None:
    # a remote engine decodes in CPU tasks, away from the model's device
    if decode in DECODER_REGISTRY and get_decoder(decode).on_device and engine != LOCAL:
        cpu = " or ".join(name for name, d in DECODER_REGISTRY.items() if not d.on_device)
        raise UsageError(f"--decode {decode} decodes on the model's device in the {LOCAL} engine; "
                         f"with --engine {engine} use --decode {cpu}")
