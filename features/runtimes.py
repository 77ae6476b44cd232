"""``--runtime onnxruntime``: the frozen forward exported once to ONNX and run by ONNX Runtime.

On CPUs without bf16 kernels the torch forward, not the data path, limits extraction, and the
same network runs faster under ONNX Runtime. What is exported is taps' whole extractor
(:func:`features.forward.build_extractor`): the uint8 -> normalised pixels step, the pruned
graph with folded BatchNorm, and the pooling of every requested tap, each tap one output,
with a dynamic batch dimension.

An export is trusted only after it reproduces the torch forward (fp32) on a seeded
calibration batch: the largest difference of any tap, relative to that tap's largest value,
must stay under ``TOLERANCE``. 1e-3 is far above float32 reordering noise (1e-6 here) and far
below what would move a linear probe, while a mis-exported op (a baked-in batch size, a wrong
axis) shows up as differences of order 1. Exports are cached under ``cache_dir()`` keyed by
everything that defines them (backbone, weights and their digest, preprocessing, taps and
their layouts, pooling, input size, torch, ONNX Runtime and opset versions); a cached file
whose SHA-256 no longer matches its record is rebuilt, not trusted. A backbone that does not
export cleanly falls back to torch with one warning naming why.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from dataclasses import dataclass
from dataclasses import replace as with_
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .backbones import Backbone, Tap
from .errors import UsageError
from .forward import Forward, build_extractor
from .store import file_sha256

TOLERANCE = 1e-3
OPSET = 17
CALIBRATION_IMAGES = 8


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise UsageError("--runtime onnxruntime needs ONNX Runtime: pip install -e '.[onnx]' (`make install` "
                         "installs it)") from None
    return onnxruntime


def cache_dir() -> Path:
    """Where exports are kept: ``$TAPS_CACHE/onnx``, else ``~/.cache/taps/onnx``."""
    return Path(os.environ.get("TAPS_CACHE", Path.home() / ".cache" / "taps")) / "onnx"


def export_key(backbone: Backbone, taps: list[Tap], pooling: str) -> str:
    """Everything that defines an export, hashed: equal keys, interchangeable files."""
    fields = {"backbone": backbone.name, "weights": backbone.weights.spec, "weights_sha256": backbone.weights.sha256,
              "transform": backbone.transform_spec(), "input": backbone.input_size, "pooling": pooling,
              "taps": [[t.name, t.node, t.layout, t.prefix, list(t.shape)] for t in taps],
              "torch": torch.__version__, "onnxruntime": _ort().__version__, "opset": OPSET}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:20]


class _Outputs(nn.Module):
    """The extractor with its outputs as a tuple in tap order (what the ONNX exporter takes)."""

    def __init__(self, extractor: nn.Module, names: list[str]):
        super().__init__()
        self.extractor, self.names = extractor, names

    def forward(self, pixels: torch.Tensor):
        out = self.extractor(pixels)
        return tuple(out[n] for n in self.names)


@dataclass
class OnnxForward:
    """An ONNX Runtime session with :class:`features.forward.Forward`'s interface."""

    session: object
    names: list[str]
    runtime: str = "onnxruntime"
    compile_seconds: float = 0.0
    device: torch.device = torch.device("cpu")
    precision: str = "fp32"

    @classmethod
    def load(cls, path: Path, names: list[str]) -> OnnxForward:
        ort = _ort()
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()  # the cores this engine gives the model
        options.log_severity_level = 3
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return cls(session, names)

    def __call__(self, pixels: torch.Tensor) -> dict[str, np.ndarray]:
        x = np.ascontiguousarray(pixels.permute(0, 3, 1, 2).cpu().numpy())  # NHWC uint8 -> NCHW
        return dict(zip(self.names, (np.asarray(o, np.float32) for o in self.session.run(self.names, {"pixels": x})),
                        strict=True))


def calibration_batch(size: int) -> torch.Tensor:
    """A seeded NHWC uint8 batch of smooth random images."""
    g = torch.Generator().manual_seed(0)
    coarse = torch.randint(0, 256, (CALIBRATION_IMAGES, 3, 8, 8), generator=g, dtype=torch.uint8).float()
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear").round().to(torch.uint8) \
        .permute(0, 2, 3, 1).contiguous()


def largest_difference(reference: dict[str, np.ndarray], other: dict[str, np.ndarray]) -> float:
    """max over taps of max|a - b| / max|a|; below 1e-4 the scale counts as 1e-4, so a tap whose values
    vanish (random weights) is judged by absolute differences, not by float noise on tiny numbers."""
    return max(float(np.abs(reference[k] - other[k]).max() / max(float(np.abs(reference[k]).max()), 1e-4))
               for k in reference)


def prepare_onnx(backbone: Backbone, taps: list[Tap], pooling: str) -> tuple[Path | None, str, dict]:
    """The checked export of this extractor: (path, "", record) or (None, why it cannot be used, {})."""
    path = cache_dir() / f"{export_key(backbone, taps, pooling)}.onnx"
    record_path = path.with_suffix(".json")
    names = [t.name for t in taps]
    if path.is_file() and record_path.is_file():
        record = json.loads(record_path.read_text())
        if record.get("sha256") == file_sha256(path):
            return path, "", record
    t0 = time.perf_counter()
    extractor = build_extractor(backbone, taps, torch.device("cpu"), channels_last=False, pooling=pooling).eval()
    pixels = calibration_batch(backbone.input_size)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    with torch.inference_mode():
        reference = {k: v.numpy() for k, v in extractor(pixels.permute(0, 3, 1, 2).contiguous()).items()}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        example = pixels[:2].permute(0, 3, 1, 2).contiguous()
        with warnings.catch_warnings():  # the TorchScript exporter's deprecation notice is not the user's
            warnings.simplefilter("ignore")
            # The TorchScript exporter: it needs no onnxscript and traces taps' FX graphs as they are.
            # eval() on the wrapper too: the exporter restores the wrapper's mode afterwards, recursively
            torch.onnx.export(_Outputs(extractor, names).eval(), (example,), str(tmp), input_names=["pixels"],
                              output_names=names, opset_version=OPSET, dynamo=False,
                              dynamic_axes={"pixels": {0: "batch"}, **{n: {0: "batch"} for n in names}})
        difference = largest_difference(reference, OnnxForward.load(tmp, names)(pixels))
    except Exception as exc:  # exporters and runtimes fail in many ways (unsupported ops, shapes)
        tmp.unlink(missing_ok=True)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return None, f"{backbone.name} did not export to ONNX ({reason[:200]})", {}
    if difference > TOLERANCE:
        tmp.unlink(missing_ok=True)
        return None, (f"the ONNX export of {backbone.name} differs from torch by {difference:.2g} (relative) on the "
                      f"calibration batch, over the tolerance {TOLERANCE:g}"), {}
    tmp.replace(path)
    record = {"sha256": file_sha256(path), "max_relative_difference": difference,
              "export_seconds": round(time.perf_counter() - t0, 2), "taps": names}
    record_path.write_text(json.dumps(record, indent=2))
    return path, "", record


def _rate(forward, pixels: torch.Tensor, repeats: int = 3) -> float:
    """Images per second of ``forward`` on ``pixels``: the median of ``repeats`` timed calls after a warm-up."""
    forward(pixels)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        forward(pixels)
        times.append(time.perf_counter() - t0)
    return len(pixels) / sorted(times)[len(times) // 2]


def resolve_runtime(backbone: Backbone, taps: list[Tap], cfg, recorded: str | None):
    """The run config with its runtime decided: ``onnxruntime`` if the export checks out (else torch,
    with a warning); ``auto``: the runtime the file's unfinished taps were started with, else the
    faster of eager torch (at the resolved precision) and ONNX Runtime on a calibration batch of
    ``cfg.batch_size`` images, the rates recorded beside the choice."""
    if cfg.runtime == "auto" and recorded is not None:
        cfg = with_(cfg, runtime=recorded, precision="fp32" if recorded == "onnxruntime" else cfg.precision)
        if recorded == "torch":
            return cfg
    path, why, _ = prepare_onnx(backbone, taps, cfg.pooling)
    if path is None:
        warnings.warn(f"--runtime {cfg.runtime}: {why}; extracting with torch", stacklevel=3)
        return with_(cfg, runtime="torch")
    cfg = with_(cfg, onnx_path=str(path))
    if cfg.runtime == "onnxruntime":
        return cfg
    pixels = calibration_batch(backbone.input_size).repeat(-(-cfg.batch_size // CALIBRATION_IMAGES), 1, 1, 1)
    pixels = pixels[:cfg.batch_size]
    rates = {"torch": _rate(Forward(build_extractor(backbone, taps, cfg.device, cfg.channels_last, cfg.pooling),
                                    cfg.device, cfg.precision, cfg.channels_last), pixels),
             "onnxruntime": _rate(OnnxForward.load(path, [t.name for t in taps]), pixels)}
    best = max(rates, key=rates.get)
    measured = f"{', '.join(f'{k} {v:.1f} img/s' for k, v in rates.items())} (calibration batch, {cfg.precision} torch)"
    return with_(cfg, runtime=best, precision="fp32" if best == "onnxruntime" else cfg.precision,
                 runtime_rates=measured)
