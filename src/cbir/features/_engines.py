"""Inference engines behind the CNN descriptors: ONNX Runtime, OpenVINO, or PyTorch.

The engine is a process-wide choice, never part of a descriptor's spec: a stored vector means
the same whichever engine made it, so a collection indexed with one engine is searched with
another without extracting anything again. What "the same" means is stated and tested
(tests/test_engines.py): with ``precision=fp32`` every engine computes in float32 and each
component of a vector (unit-length blocks) is within :data:`FP32_TOLERANCE` of PyTorch's; with
``precision=bf16`` an engine may compute in bfloat16 where the CPU has it (PyTorch autocast,
OpenVINO's bf16 hint; ONNX Runtime stays in float32) and each block's cosine to the float32
vector is at least :data:`BF16_MIN_COSINE`, the spread bfloat16 has always had here.

``CBIR_ENGINE`` (``cbir.config.deep_engine``) names the engine: ``auto`` (the default) takes
the first installed one of :data:`AUTO_ORDER`; a named engine whose package is missing falls
back the same way with a one-line notice, not an error. Worker processes inherit the variable.

ONNX Runtime and OpenVINO run a graph exported from the packaged weights with
``torch.onnx.export`` (:mod:`cbir.features._graph`), made once and cached in the user's cache
directory; PyTorch stays the reference and the fallback (``_backbone``).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import threading
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from cbir.config import deep_engine

#: Engines in the order ``auto`` tries them (fastest first, measured in docs/deep.md); PyTorch,
#: always installed with the deep extra, last.
AUTO_ORDER = ("openvino", "onnx", "torch")
ENGINES = ("onnx", "openvino", "torch")
#: Largest difference of any component (vectors of unit blocks) from PyTorch's at fp32.
FP32_TOLERANCE = 1e-4
#: Smallest cosine of any block to the float32 vector at bf16 (bfloat16 keeps 8 bits of
#: mantissa; the lowest measured on real photos is in docs/deep.md).
BF16_MIN_COSINE = 0.97
#: Python modules each engine needs (the graph exporter needs ``onnx`` beside PyTorch).
_MODULES = {"onnx": ("onnxruntime", "onnx"), "openvino": ("openvino", "onnx"), "torch": ()}
_INSTALL = "pip install 'cbir[deep]'"

log = logging.getLogger("cbir.engine")
#: What a network returns for each stage: its feature maps, their per-channel mean, or the
#: mean and the (sample) standard deviation.
STATISTICS = ("maps", "mean", "mean_std")


@dataclass(frozen=True)
class Readout:
    """What a network returns: for each of ``stages`` (0-6 the MBConv stages, 7 the head),
    the ``statistic`` of its feature maps. Pooling inside the network spares copying the maps
    out of the engine and pooling them again in NumPy."""

    stages: tuple[int, ...]
    statistic: str = "maps"

    def __post_init__(self) -> None:
        if self.statistic not in STATISTICS:
            raise ValueError(
                f"statistic must be one of {', '.join(STATISTICS)}, got {self.statistic!r}"
            )

    def apply(self, maps: list[Any]) -> list[Any]:
        """The statistic of each stage's ``(N, C, h, w)`` torch maps: (N, C, h, w) maps, or
        (N, C) means, or (N, C) means and deviations in turn. The exported graph and the
        PyTorch engine both compute it here."""
        if self.statistic == "maps":
            return maps
        if self.statistic == "mean":
            return [m.mean((2, 3)) for m in maps]
        return [s for m in maps for s in (m.mean((2, 3)), m.std((2, 3)))]


class Network(Protocol):
    """A CNN at one input layout that returns what a :class:`Readout` asks for."""

    engine: str

    def features(self, images: np.ndarray) -> list[np.ndarray]:
        """``(N, H, W, 3)`` uint8 images (already squared to the network's side) to the
        float32 outputs of the readout, in its order."""
        ...


def installed(engine: str) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in _MODULES[engine])


_NOTICED: set[str] = set()


def resolve(requested: str | None = None) -> str:
    """The engine this process uses: ``requested`` (else ``CBIR_ENGINE``) if installed; for
    ``auto`` or a missing engine, the first installed one of :data:`AUTO_ORDER` (a missing
    named one is told once per process, on one line)."""
    name = requested or deep_engine()
    if name != "auto" and installed(name):
        return name
    chosen = next(e for e in AUTO_ORDER if e == "torch" or installed(e))
    if name != "auto" and name not in _NOTICED:
        _NOTICED.add(name)
        missing = [m for m in _MODULES[name] if importlib.util.find_spec(m) is None]
        log.warning(
            "cbir: engine %s needs %s (%s); using %s", name, ", ".join(missing), _INSTALL, chosen
        )
    return chosen


def _in_worker() -> bool:
    """An extraction worker process: the pool already uses every core, one thread each.

    The layout was chosen by measurement (docs/deep.md, bench_deep.py): one worker process per
    core, each engine on one thread, runs the network faster than one process whose engine
    spreads over every core (no threads waiting on each other inside a batch), and a worker's
    decoding overlaps the other workers' inference. Outside a worker (a query, an in-process
    run) the engine takes every core."""
    return os.environ.get("CBIR_WORKER") == "1"


class TorchNetwork:
    """The reference: the packaged network in eager PyTorch (``_backbone``)."""

    engine = "torch"

    def __init__(self, model: str, side: int, precision: str, readout: Readout) -> None:
        from cbir.features import _backbone

        self._net = _backbone.backbone(model, side, precision)
        self._readout = readout

    def features(self, images: np.ndarray) -> list[np.ndarray]:
        maps = self._net.features(self._net.tensor(images), self._readout.stages)
        return [m.numpy() for m in self._readout.apply(maps)]


class OnnxNetwork:
    """The exported graph on ONNX Runtime's CPU provider, in float32."""

    engine = "onnx"

    def __init__(self, model: str, side: int, precision: str, readout: Readout) -> None:
        import onnxruntime as ort

        from cbir.features._graph import graph_file

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = 1 if _in_worker() else 0  # 0: every core
        options.inter_op_num_threads = 1
        self._session = ort.InferenceSession(
            str(graph_file(model, side, readout)), options, providers=["CPUExecutionProvider"]
        )
        self._outputs = [o.name for o in self._session.get_outputs()]

    def features(self, images: np.ndarray) -> list[np.ndarray]:
        return self._session.run(self._outputs, {"images": np.ascontiguousarray(images)})


class OpenVinoNetwork:
    """The exported graph on OpenVINO's CPU plug-in; bfloat16 when ``precision=bf16`` and the
    CPU has it (AVX-512 BF16 / AMX), else float32."""

    engine = "openvino"

    def __init__(self, model: str, side: int, precision: str, readout: Readout) -> None:
        import openvino as ov

        from cbir.features._graph import graph_file

        core = ov.Core()
        bf16 = precision == "bf16" and "BF16" in core.get_property(
            "CPU", "OPTIMIZATION_CAPABILITIES"
        )
        config: dict[str, Any] = {
            "INFERENCE_PRECISION_HINT": "bf16" if bf16 else "f32",
            "PERFORMANCE_HINT": "LATENCY",
            "NUM_STREAMS": 1,
        }
        if _in_worker():
            config["INFERENCE_NUM_THREADS"] = 1
            # OpenVINO pins its threads to cores by default, and every worker process picks the
            # same core for its one thread: two workers then share one core (half the rate)
            config["ENABLE_CPU_PINNING"] = False
        compiled = core.compile_model(str(graph_file(model, side, readout)), "CPU", config)
        self._request = compiled.create_infer_request()
        self._count = len(compiled.outputs)
        # one request, and it takes one batch at a time ("Infer Request is busy" otherwise):
        # a service describes uploads, regions and heat maps from several threads at once
        self._lock = threading.Lock()

    def features(self, images: np.ndarray) -> list[np.ndarray]:
        request = self._request
        with self._lock:
            request.infer({0: np.ascontiguousarray(images)})
            # the request reuses its output buffers: copy before the next batch overwrites them
            return [request.get_output_tensor(i).data.copy() for i in range(self._count)]


_CLASSES: dict[str, type[TorchNetwork | OnnxNetwork | OpenVinoNetwork]] = {
    "torch": TorchNetwork,
    "onnx": OnnxNetwork,
    "openvino": OpenVinoNetwork,
}
_CACHE: dict[tuple[str, str, int, str, Readout], Network] = {}
_LOCK = threading.Lock()


def network(
    model: str, side: int, precision: str, readout: Readout, engine: str | None = None
) -> Network:
    """The process's one network for a model, input side, precision and readout on the engine
    :func:`resolve` picks (built, and for a graph engine exported, on first use)."""
    name = resolve(engine)
    key = (name, model, int(side), precision, readout)
    with _LOCK:
        if key not in _CACHE:
            _CACHE[key] = _CLASSES[name](model, int(side), precision, readout)
        return _CACHE[key]
