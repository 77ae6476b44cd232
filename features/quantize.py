"""``--precision int8``: post-training quantisation of a checked export, calibrated on the dataset
being extracted and checked against the fp32 forward before it is used.

* **Calibration**: a seeded subset of the dataset (:data:`CALIBRATION_IMAGES`, NNCF's default
  subset size), decoded exactly as the extraction decodes. The subset (dataset fingerprint, seed,
  the sample indices) is part of the cache key, so another dataset or seed quantises afresh.
* **Agreement**: a disjoint seeded held-out subset (:data:`HELD_OUT_IMAGES`) runs through the
  runtime's fp32 session and the int8 one; per tap, the mean cosine between the two embeddings of
  an image and the relative error ``||int8 - fp32|| / ||fp32||`` are recorded beside the cached
  model, in the feature file's tap attributes (``int8``) and in what ``extract`` prints.
* A tap whose mean cosine is under :data:`MIN_COSINE` is named in a warning: a probe on it may
  move. Measured (docs/performance.md), taps down to a mean cosine of 0.93 (MobileNetV2
  ``block14`` on Caltech-101) left every logreg probe within 0.5 points of fp32 on the same
  splits, for both runtimes; under 0.9 nothing was measured, so it is said.

The quantiser is a runtime's record (``Runtime.quantizer``, with the files it writes in
``Runtime.int8_files``): OpenVINO's is NNCF's ``nncf.quantize`` (the ``openvino`` extra installs
it), ONNX Runtime's its own static quantisation to a QDQ model.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import io
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import UsageError
from .files import digest, file_sha256
from .precisions import FP32, INT8
from .registry import load
from .runtime import cpu_description

CALIBRATION_IMAGES = 300  # nncf.quantize's default subset_size
HELD_OUT_IMAGES = 64
MIN_COSINE = 0.9


@dataclass(frozen=True)
class CalibrationSet:
    """What int8 is calibrated on (``calibration``) and checked on (``held_out``): disjoint seeded
    samples of one dataset; ``pixels(indices)`` decodes them as the extraction does (NCHW uint8)."""

    dataset_fingerprint: str
    seed: int
    calibration: np.ndarray
    held_out: np.ndarray
    pixels: Callable[[np.ndarray], np.ndarray]

    def record(self) -> dict:
        return {"dataset_fingerprint": self.dataset_fingerprint, "seed": self.seed,
                "images": int(len(self.calibration)), "held_out": int(len(self.held_out)),
                "samples_digest": digest(self.calibration.tolist(), self.held_out.tolist())}


def calibration_set(n_images: int, dataset_fingerprint: str, pixels: Callable[[np.ndarray], np.ndarray], *,
                    images: int = CALIBRATION_IMAGES, held_out: int = HELD_OUT_IMAGES,
                    seed: int = 0) -> CalibrationSet:
    """Seeded, disjoint calibration and held-out samples of a dataset of ``n_images`` (a small dataset
    gives at most three quarters of its images to calibration, the rest are held out)."""
    order = np.random.default_rng(seed).permutation(n_images)
    n_cal = min(images, max(1, n_images * 3 // 4))
    return CalibrationSet(dataset_fingerprint, seed, np.sort(order[:n_cal]),
                          np.sort(order[n_cal:n_cal + held_out]), pixels)


def agreement(reference: list[np.ndarray], other: list[np.ndarray], names: list[str]) -> dict[str, dict]:
    """Per tap: the mean and smallest cosine between each image's fp32 and int8 embeddings, and the
    relative error ``||int8 - fp32|| / ||fp32||`` over the batch."""
    out = {}
    for name, a, b in zip(names, reference, other, strict=True):
        a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
        cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
        out[name] = {"cosine": round(float(cos.mean()), 5), "cosine_min": round(float(cos.min()), 5),
                     "relative_error": round(float(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-12)), 5)}
    return out


def quantize_openvino(source: Path, target: Path, batches: list[np.ndarray]) -> None:
    """NNCF's post-training quantisation of the export at ``source`` (fp32 ONNX), calibrated on
    ``batches`` (NCHW uint8, one image each), saved as OpenVINO IR at ``target`` (.xml and .bin)."""
    # NNCF's import probes torch's C++ extension toolchain and its calibration draws a progress bar:
    # neither says anything to a user of taps, whose own line reports the calibration.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    try:
        nncf = importlib.import_module("nncf")
        nncf.set_log_level(logging.ERROR)
    except ImportError:
        raise UsageError("--precision int8 needs nncf: pip install -e '.[openvino]' (`make install` installs it)") \
            from None
    import openvino as ov

    model = ov.Core().read_model(str(source))
    with contextlib.redirect_stdout(io.StringIO()):  # NNCF's progress bars: taps prints its own line
        quantized = nncf.quantize(model, nncf.Dataset(batches), subset_size=len(batches),
                                  preset=nncf.QuantizationPreset.PERFORMANCE)
    ov.save_model(quantized, str(target), compress_to_fp16=False)


def quantize_onnxruntime(source: Path, target: Path, batches: list[np.ndarray]) -> None:
    """ONNX Runtime's static post-training quantisation of the export at ``source`` (fp32 ONNX),
    calibrated on ``batches`` (NCHW uint8, one image each), saved as a QDQ ONNX model at ``target``:
    weights int8 per output channel, activations uint8 (MinMax ranges), the form its CPU kernels
    run fastest (VNNI where the CPU has it)."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pixels = onnx.load(str(source), load_external_data=False).graph.input[0].name

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(batches)

        def get_next(self):
            return next(({pixels: b} for b in self.batches), None)

    prepared = target.with_name(f"{target.stem}.prepared.onnx")
    try:
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)  # fold and infer shapes first
        quantize_static(str(prepared), str(target), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    finally:
        prepared.unlink(missing_ok=True)


def prepare_int8(runtime, source: Path, names: list[str], calibration: CalibrationSet,
                 open_session: Callable) -> tuple[Path, dict]:
    """The int8 model of the checked fp32 export at ``source`` for ``runtime`` (a
    :class:`features.runtime_records.Runtime`), quantised once per calibration set and cached beside
    it, with its record (calibration, agreement, seconds). ``open_session(path, precision)`` opens a
    session of ``runtime`` on a model file."""
    if runtime.quantizer is None:
        raise UsageError(f"--precision int8 is not available for --runtime {runtime.name}; "
                         "`taps extract --help` lists the runtimes that run it")
    target = int8_path(runtime, source, calibration.record())
    weights, record_path = target.with_suffix(runtime.int8_files[-1]), target.with_suffix(".json")
    record = cached_int8_record(runtime, target)
    if record is not None:
        return target, {**record, "reused": True}
    t0 = time.perf_counter()
    batches = [b for i in calibration.calibration if len(b := calibration.pixels(np.array([i])))]  # bad images: none
    partial = target.with_name(f"{target.stem}.{os.getpid()}.partial{runtime.int8_files[0]}")
    try:
        load(runtime.quantizer)(source, partial, batches)
        quantize_seconds = time.perf_counter() - t0
        held_out = calibration.pixels(calibration.held_out if len(calibration.held_out) else calibration.calibration)
        checked = agreement(open_session(source, FP32)(held_out), open_session(partial, INT8)(held_out), names)
        for suffix in runtime.int8_files:
            partial.with_suffix(suffix).replace(target.with_suffix(suffix))
    finally:  # a failed or interrupted quantisation leaves nothing half-written in the cache
        for suffix in runtime.int8_files:
            partial.with_suffix(suffix).unlink(missing_ok=True)
    record = {"sha256": file_sha256(weights), "calibration": calibration.record(),
              "agreement": checked, "quantize_seconds": round(quantize_seconds, 2)}
    record_path.write_text(json.dumps(record, indent=2))
    return target, {**record, "reused": False}


def int8_path(runtime, source: Path, calibration: dict) -> Path:
    """Where the int8 model of the fp32 export ``source``, calibrated on the samples ``calibration``
    records (:meth:`CalibrationSet.record`), is cached on this machine. The CPU is part of its key:
    its kernels (VNNI, bf16 around the int8 ops) are what the agreement measures."""
    key = digest({"export": file_sha256(source), "calibration": calibration, "runtime": runtime.name,
                  "version": runtime.version(), "quantizer": _quantizer_version(), "cpu": cpu_description()})
    return source.with_name(f"{source.stem}.int8-{key}{runtime.int8_files[0]}")


def cached_int8_record(runtime, target: Path) -> dict | None:
    """The record of the int8 model cached at ``target`` (:func:`int8_path`), or None when it is not
    there whole (its weights' SHA-256 is checked against the record)."""
    weights, record_path = target.with_suffix(runtime.int8_files[-1]), target.with_suffix(".json")
    if record_path.is_file() and weights.is_file():
        record = json.loads(record_path.read_text())
        if record.get("sha256") == file_sha256(weights):
            return record
    return None


def _quantizer_version() -> str | None:
    try:
        return importlib.metadata.version("nncf")
    except importlib.metadata.PackageNotFoundError:
        return None


def describe_int8(record: dict) -> str:
    """One line for the CLI and the file: calibration, and each tap's agreement with fp32."""
    cal = record["calibration"]
    taps = ", ".join(f"{tap} cosine {a['cosine']:.4f} (min {a['cosine_min']:.4f}), error {a['relative_error']:.3f}"
                     for tap, a in record["agreement"].items())
    return (f"int8 calibrated on {cal['images']} images of the dataset (seed {cal['seed']}); agreement with fp32 on "
            f"{cal['held_out']} held-out images: {taps}")


def low_agreement(record: dict) -> list[str]:
    """The taps whose mean cosine with fp32 is under :data:`MIN_COSINE`."""
    return [tap for tap, a in record["agreement"].items() if a["cosine"] < MIN_COSINE]
