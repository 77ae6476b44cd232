"""``--runtime``: who runs the frozen forward, one record each.

A :class:`Runtime` declares everything the rest of taps needs to know about a runtime: its name,
the precisions it runs on the CPU, the package and extra that install it, and where its session
opener lives (``module:function``, loaded when a session is opened, so this declaration stays
free of the runtime's imports and every layer can read it). ``torch`` runs the extractor in this
process; every other record runs taps' checked ONNX export (:mod:`features.runtimes`).
Adding a runtime is one :func:`register_runtime` call and its opener.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from collections.abc import Callable
from dataclasses import dataclass

from .errors import UsageError
from .precisions import BF16, FP16, FP32, INT8
from .registry import Registry, load

AUTO = "auto"  # --runtime auto: the fastest installed runtime on a calibration batch


@dataclass(frozen=True)
class Runtime:
    name: str
    precisions: tuple[str, ...]   # what it runs on the CPU
    package: str | None = None    # the module that runs it; None: torch itself, in this process
    extra: str | None = None      # the optional extra that installs the package
    opener: str | None = None     # "module:function" -> (path, tap names, precision, threads) -> session
    quantizer: str | None = None  # "module:function" -> (fp32 export, target, calibration batches): int8 model
    int8_files: tuple[str, ...] = (".onnx",)  # the suffixes of the files the quantizer writes, the model's first

    @property
    def exported(self) -> bool:
        """Runs the ONNX export rather than the torch module."""
        return self.package is not None

    def version(self) -> str | None:
        """The installed version of its package, or None when it is not installed."""
        try:
            return importlib.metadata.version(self.package) if self.package else None
        except importlib.metadata.PackageNotFoundError:
            return None

    def module(self):
        try:
            return importlib.import_module(self.package)
        except ImportError:
            raise UsageError(f"--runtime {self.name} needs {self.package}: pip install -e '.[{self.extra}]' "
                             "(`make install` installs it)") from None

    def open(self) -> Callable:
        """Its session opener."""
        return load(self.opener)


RUNTIME_REGISTRY: Registry[Runtime] = Registry("runtime")
register_runtime = RUNTIME_REGISTRY.register
get_runtime = RUNTIME_REGISTRY.lookup


def exported_runtimes() -> dict[str, Runtime]:
    return {name: r for name, r in RUNTIME_REGISTRY.items() if r.exported}


TORCH = register_runtime(Runtime("torch", (FP32, BF16, FP16))).name
ONNXRUNTIME = register_runtime(Runtime("onnxruntime", (FP32, INT8), "onnxruntime", "onnx",
                                       "features.runtimes:open_onnxruntime", "features.quantize:quantize_onnxruntime"))
OPENVINO = register_runtime(Runtime("openvino", (FP32, BF16, INT8), "openvino", "openvino",
                                    "features.runtimes:open_openvino", "features.quantize:quantize_openvino",
                                    (".xml", ".bin")))
