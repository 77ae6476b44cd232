"""``--runtime``: who runs the frozen forward on the CPU. ``torch`` runs the extractor itself;
the exported runtimes (records in :mod:`features.runtime_records`: ONNX Runtime, OpenVINO) run its ONNX export
(:mod:`features.export`); ``auto`` times them all on a calibration batch and keeps the fastest.

On CPUs without bf16 kernels the torch forward, not the data path, limits extraction, and the
same network runs faster under the exported runtimes. An export is trusted by a runtime only
after that runtime reproduced the torch forward (fp32 both) on a seeded calibration batch:
the largest difference of any tap, relative to that tap's largest value, must stay under
``TOLERANCE``. 1e-3 is far above float32 reordering noise (1e-6 here) and far below what would
move a linear probe, while a mis-exported op (a baked-in batch size, a wrong axis) shows up
as differences of order 1. Each check is recorded beside the cached file (per runtime and
version); a cached file whose SHA-256 no longer matches its record is rebuilt, not trusted.
A backbone that does not export cleanly falls back to torch with one warning naming why.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import replace as with_
from pathlib import Path

import numpy as np
import torch

from .backbones import Backbone, Tap
from .errors import TapsError, UsageError
from .export import (
    cache_dir,
    calibration_batch,
    export_key,
    export_onnx,
    largest_difference,
    reference_outputs,
)
from .files import digest, file_sha256, write_atomically
from .precisions import BF16, FP32, INT8
from .quantize import MIN_COSINE, CalibrationSet, cached_int8_record, low_agreement, prepare_int8
from .runtime import cpu_description
from .runtime_records import AUTO, ONNXRUNTIME, OPENVINO, TORCH, exported_runtimes

TOLERANCE = 1e-3

# A session: the NCHW uint8 batch -> one float32 array per tap, in the order of the names it was built with.
Session = Callable[[np.ndarray], list[np.ndarray]]


RUNTIMES = exported_runtimes()  # the runtimes of the export, by name (features.runtime_records)


def open_onnxruntime(path: Path, names: list[str], precision: str, threads: int) -> Session:
    ort = ONNXRUNTIME.module()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    pixels = session.get_inputs()[0].name
    return lambda x: session.run(names, {pixels: x})


def open_openvino(path: Path, names: list[str], precision: str, threads: int) -> Session:
    ov = OPENVINO.module()
    core = ov.Core()
    if precision == BF16 and "BF16" not in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        raise UsageError("--runtime openvino --precision bf16 needs a CPU with bf16 support (AVX512_BF16 or AMX); "
                         f"use --precision {FP32}")
    # THROUGHPUT: several streams when there are cores for them; a batch is split across their
    # requests, run at once and put back together in order.
    # No pinning when the process gets fewer threads than the machine has cores: one-thread
    # replicas would each pin their thread to the same first core and share it.
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    # CACHE_DIR: OpenVINO keeps the compiled blob (keyed by the model and these settings), so a
    # later run on the same export loads it instead of compiling again.
    compiled = core.compile_model(str(path), "CPU", {
        "CACHE_DIR": str(cache_dir() / "openvino-compiled"), "PERFORMANCE_HINT": "THROUGHPUT",
        "INFERENCE_NUM_THREADS": threads, "ENABLE_CPU_PINNING": threads >= cores,
        # int8: the quantised graph carries its own int8 ops; what is left runs in bf16 where the CPU
        # has it (OpenVINO's own default there; in f32 the leftover ops cost more than int8 saves),
        # else f32. The agreement with fp32 is measured through this same session.
        "INFERENCE_PRECISION_HINT": _rest_precision(core) if precision == INT8 else
        "f32" if precision == FP32 else precision})
    outputs = [compiled.output(n) for n in names]
    # Plain requests, no AsyncInferQueue callbacks: a callback holding the last reference to the
    # compiled model lets one of OpenVINO's own threads destroy (and join) itself, which aborts.
    requests = [compiled.create_infer_request()
                for _ in range(int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))]

    def run(x: np.ndarray) -> list[np.ndarray]:
        chunks = [rows for rows in np.array_split(np.arange(len(x)), len(requests)) if len(rows)]
        for request, rows in zip(requests, chunks, strict=False):
            request.start_async({0: x[rows[0]:rows[-1] + 1]})
        parts = []
        for request, _ in zip(requests, chunks, strict=False):
            request.wait()
            parts.append([request.get_tensor(o).data.copy() for o in outputs])
        return [np.concatenate([part[j] for part in parts]) for j in range(len(names))]
    return run


def _rest_precision(core) -> str:
    """What OpenVINO runs an int8 model's unquantised ops in on this CPU."""
    return BF16 if "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES") else "f32"


@dataclass
class ExportedForward:
    """A session of an exported runtime with :class:`features.forward.Forward`'s interface."""

    session: Session
    names: list[str]
    runtime: str
    precision: str = FP32
    compile_seconds: float = 0.0
    device: torch.device = torch.device("cpu")

    def __call__(self, pixels: torch.Tensor) -> dict[str, np.ndarray]:
        x = np.ascontiguousarray(pixels.permute(0, 3, 1, 2).cpu().numpy())  # NHWC uint8 -> NCHW
        return dict(zip(self.names, (np.asarray(o, np.float32) for o in self.session(x)), strict=True))


def load_exported(runtime: str, path: Path | str, names: list[str], precision: str = FP32,
                  outputs: list[str] | None = None) -> ExportedForward:
    """``runtime``'s session on the export at ``path``, with as many threads as torch is given here
    (the cores this engine gives the model: all of them inline, one per replica); it returns the
    model's ``outputs`` (default: ``names``) under ``names``."""
    session = RUNTIMES[runtime].open()(Path(path), outputs or names, precision, torch.get_num_threads())
    return ExportedForward(session, names, runtime, precision)


def prepare_export(backbone: Backbone, taps: list[Tap], pooling: str, runtime: str) -> tuple[Path | None, str, dict]:
    """The export of this extractor, checked by ``runtime``: (path, "", record) or (None, why not, {}).
    A file is exported once; each runtime (and version) checks it once, recorded in ``record["checks"]``."""
    rt = RUNTIMES[runtime]
    check = f"{runtime} {rt.version()}"
    rt.module()
    path = cache_dir() / f"{export_key(backbone, taps, pooling)}.onnx"
    record_path = path.with_suffix(".json")
    names = [t.name for t in taps]
    record = json.loads(record_path.read_text()) if path.is_file() and record_path.is_file() else {}
    intact = bool(record) and record.get("sha256") == file_sha256(path)
    if intact and check in record.get("checks", {}):
        return path, "", record
    # an intact file is checked by this runtime as it is; anything else is exported afresh
    target = path if intact else path.with_suffix(f".{os.getpid()}.tmp")
    t0 = time.perf_counter()
    try:
        if target != path:
            export_onnx(backbone, taps, pooling, target)
        expected = reference_outputs(backbone, taps, pooling)
        difference = largest_difference(expected, load_exported(runtime, target, names)(
            calibration_batch(backbone.input_size)))
    except UsageError:
        raise
    except Exception as exc:  # exporters and runtimes fail in many ways (unsupported ops, shapes)
        if target != path:
            target.unlink(missing_ok=True)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return None, f"{backbone.name} did not export to ONNX for {runtime} ({reason[:200]})", {}
    if difference > TOLERANCE:
        if target != path:
            target.unlink(missing_ok=True)
        return None, (f"the ONNX export of {backbone.name} run by {runtime} differs from torch by {difference:.2g} "
                      f"(relative) on the calibration batch, over the tolerance {TOLERANCE:g}"), {}
    if target != path:
        target.replace(path)
        record = {"sha256": file_sha256(path), "taps": names, "export_seconds": round(time.perf_counter() - t0, 2)}
    record.setdefault("checks", {})[check] = {"max_relative_difference": difference}
    record_path.write_text(json.dumps(record, indent=2))
    return path, "", record


def local_export(path: Path | str, sha256: str, fetch: Callable[[], bytes]) -> Path:
    """The export at ``path`` when this machine has it intact (a Ray actor on the driver's machine),
    else a copy of its bytes (``fetch()``) kept in this machine's cache under its digest."""
    if Path(path).is_file() and file_sha256(path) == sha256:
        return Path(path)
    local = cache_dir() / f"copy-{sha256[:20]}.onnx"
    if not (local.is_file() and file_sha256(local) == sha256):
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(fetch())
        tmp.replace(local)
    return local


def installed_runtimes() -> list[str]:
    """The exported runtimes whose package is installed here."""
    return [name for name, rt in RUNTIMES.items() if rt.version() is not None]


def runtime_precision(runtime: str, precision: str) -> str:
    """The precision ``runtime`` runs a ``precision`` request in: its own when it has it, else fp32
    (torch runs no int8: post-training quantisation is the exported runtimes')."""
    if runtime == TORCH:
        return FP32 if precision == INT8 else precision
    return precision if precision in RUNTIMES[runtime].precisions else FP32


def with_int8(cfg, names: list[str], calibration: Callable[[], CalibrationSet] | None):
    """``cfg`` on its runtime's int8 model when it runs int8 (quantised once per calibration set,
    cached), with what was chosen and how well it agrees with fp32 in ``cfg.quantization``."""
    if cfg.precision != INT8:
        return cfg
    if calibration is None:
        raise UsageError("--precision int8 is calibrated on the dataset being extracted; extract it with "
                         "`taps extract ... --precision int8`")
    runtime = RUNTIMES[cfg.runtime]
    path, record = prepare_int8(runtime, Path(cfg.onnx_path), names, calibration(),
                                lambda p, precision: load_exported(runtime.name, p, names, precision).session)
    low = low_agreement(record)
    if low:
        warnings.warn(f"--precision int8: taps {', '.join(low)} agree with fp32 at a cosine under {MIN_COSINE} on "
                      f"held-out images; a probe on them may move (use --precision fp32 to be sure)", stacklevel=3)
    return with_(cfg, onnx_path=str(path), quantization=json.dumps({k: v for k, v in record.items() if k != "reused"}))


def recorded_int8(runtime: str, recorded: dict) -> Path:
    """The int8 model a feature file's taps came from (``recorded``: their ``int8`` attribute, which
    names the model by its SHA-256), found in this machine's cache; refused in one line when it is
    not there (quantised elsewhere, or a cleared cache): another quantisation gives other features,
    which a probe trained on these would score without a word."""
    rt = RUNTIMES[runtime]
    wanted = recorded.get("sha256")
    for record_path in sorted(cache_dir().glob("*.int8-*.json")) if wanted else []:
        target = record_path.with_suffix(rt.int8_files[0])
        if target.is_file() and json.loads(record_path.read_text()).get("sha256") == wanted and \
                cached_int8_record(rt, target) is not None:
            return target
    calibration = recorded["calibration"]
    raise TapsError(f"these features came from {runtime}'s int8 model, quantised on {calibration['images']} images "
                    f"of their dataset (seed {calibration['seed']}), which is not in this machine's cache "
                    f"({cache_dir()})" + ("" if wanted else " or not recorded by their file (an older taps)") +
                    "; rerun the same `taps extract ... --precision int8 --force` here, and refit on its features")


def _rate(forward, pixels: torch.Tensor, repeats: int = 3) -> float:
    """Images per second of ``forward`` on ``pixels``: the median of ``repeats`` timed calls after a warm-up."""
    forward(pixels)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        forward(pixels)
        times.append(time.perf_counter() - t0)
    return len(pixels) / sorted(times)[len(times) // 2]


def resolve_runtime(backbone: Backbone, taps: list[Tap], cfg, recorded: str | None, torch_forward: Callable, *,
                    calibration: Callable[[], CalibrationSet] | None = None, retime: bool = False):
    """The run config with its runtime decided. An exported runtime: its checked export (else
    torch, with a warning). ``auto``: the runtime the file's unfinished taps were started with;
    else torch and every installed exported runtime whose export checks out are timed on a
    calibration batch of ``cfg.batch_size`` images, each at the precision it would run, and the
    fastest is used; the rates are recorded beside the choice. ``torch_forward(cfg)`` builds
    torch's forward as the run would (compiled when the run compiles: on a bf16 CPU a compiled
    torch can beat the exported runtimes, and eager timing would hide it). ``--precision int8``
    runs a runtime's int8 model (:func:`with_int8`, calibrated on ``calibration()``), timed as such
    by ``auto``; torch, which has none, runs fp32. ``auto``'s choice is kept per CPU, model, taps,
    batch size, precision and runtime versions (:func:`choice_path`) and reused without timing
    unless ``retime``."""
    if cfg.runtime == AUTO and recorded is not None:
        cfg = with_(cfg, runtime=recorded, precision=runtime_precision(recorded, cfg.precision))
    names = [t.name for t in taps]
    if cfg.runtime == TORCH:
        return with_(cfg, precision=runtime_precision(TORCH, cfg.precision))
    if cfg.runtime != AUTO:
        path, why, _ = prepare_export(backbone, taps, cfg.pooling, cfg.runtime)
        if path is None:
            warnings.warn(f"--runtime {cfg.runtime}: {why}; extracting with torch", stacklevel=3)
            return with_(cfg, runtime=TORCH, precision=runtime_precision(TORCH, cfg.precision))
        return with_int8(with_(cfg, onnx_path=str(path)), names, calibration)
    kept = choice_path(backbone, taps, cfg)
    if not retime and kept.is_file():
        choice = json.loads(kept.read_text())
        if choice["runtime"] == TORCH or choice["runtime"] in installed_runtimes():
            chosen = with_(cfg, runtime=choice["runtime"])
            return with_(resolve_runtime(backbone, taps, chosen, None, torch_forward, calibration=calibration),
                         runtime_rates=f"{choice['rates']} (recorded {choice['when']}; --retime times again)")
    pixels = calibration_batch(backbone.input_size, cfg.batch_size)
    forward = torch_forward(with_(cfg, runtime=TORCH, precision=runtime_precision(TORCH, cfg.precision)))
    rates = {TORCH: _rate(forward, pixels)}
    candidates = {}
    for name in installed_runtimes():
        path, _, _ = prepare_export(backbone, taps, cfg.pooling, name)
        if path is not None:  # one that does not export is simply not a candidate
            candidates[name] = with_int8(with_(cfg, runtime=name, precision=runtime_precision(name, cfg.precision),
                                               onnx_path=str(path)), names, calibration)
            rates[name] = _rate(load_exported(name, candidates[name].onnx_path, names, candidates[name].precision),
                                pixels)
    best = max(rates, key=rates.get)
    measured = ", ".join(f"{k} {v:.1f} img/s ({runtime_precision(k, cfg.precision)})" for k, v in rates.items())
    how = "compiled" if getattr(forward, "compile_seconds", 0) else "eager"
    chosen = candidates.get(best, with_(cfg, runtime=TORCH, precision=runtime_precision(TORCH, cfg.precision)))
    rates_text = f"{measured} on a calibration batch of {len(pixels)}, torch {how}"
    write_atomically(kept, json.dumps({"runtime": best, "rates": rates_text,
                                       "when": time.strftime("%Y-%m-%d %H:%M", time.localtime())}))
    return with_(chosen, runtime_rates=rates_text)


def choice_path(backbone: Backbone, taps: list[Tap], cfg) -> Path:
    """Where ``auto`` keeps its choice: keyed by everything its timing depends on (the CPU, the
    extractor's export key, batch size, precision, compile setting, threads and every runtime's
    version), so a change of any of them times afresh."""
    key = digest({"cpu": cpu_description(), "export": export_key(backbone, taps, cfg.pooling),
                  "batch_size": cfg.batch_size, "precision": cfg.precision, "compile": cfg.compile,
                  "threads": torch.get_num_threads(), "torch": torch.__version__,
                  "runtimes": {name: rt.version() for name, rt in RUNTIMES.items()}})
    return cache_dir() / f"runtime-choice-{key}.json"
