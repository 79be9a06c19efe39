"""The CNN as an ONNX graph, exported once from the packaged weights and cached on disk.

The graph takes ``(N, H, W, 3)`` uint8 images (batch, height and width dynamic), scales them as
the network was trained (``_backbone``: ``(x - 127) / 128``) and returns the feature maps after
each requested stage: one graph serves ``cnn``'s pooling and ``cnn-hist``'s statistics alike.
It is exported with ``torch.onnx.export`` from the same folded float32 network PyTorch runs,
so nothing is ever downloaded.

Where it is kept: ``cbir.config.cache_dir() / "graphs"``, under a name made of the model, the
weights (their package's version and the file's SHA-256), the cbir version, the input layout and
the stages, so a new release of either makes a new graph and an old one is never used for it.

Why writing it is safe: it is exported to a temporary file in the same directory and renamed
over the final name (atomic on POSIX), under an exclusive lock on a lock file, so two worker
processes starting together export it once and no process ever reads half a graph.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.metadata
import os
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from cbir.config import cache_dir
from cbir.features import _backbone

if TYPE_CHECKING:
    from cbir.features._engines import Readout

#: ONNX operator set of the exported graph (read by ONNX Runtime and OpenVINO alike).
OPSET = 17
#: The network's total stride: at sides that are multiples of it, every stride-2 convolution
#: sees an even input, so TensorFlow-"same" padding (fixed when the network is built for a
#: side) is the same for all of them, and one graph with dynamic height and width serves them
#: all. Any other side gets a graph of its own.
STRIDE = 32
_CHUNK = 1 << 20
#: The side a multiple-of-32 layout's graph is traced at (any multiple would do).
_TRACE_SIDE = 7 * STRIDE


def layout(side: int) -> str:
    """The padding layout a side belongs to: ``x32`` for multiples of :data:`STRIDE`."""
    return f"x{STRIDE}" if side % STRIDE == 0 else f"s{side}"


def _weights(model: str) -> tuple[Path, str]:
    package, holder, _native = _backbone.MODELS[model]
    path = Path(getattr(importlib.import_module(package), holder).get_model_file_path())
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(_CHUNK):
            digest.update(block)
    version = importlib.metadata.version(package.replace("_", "-"))
    return path, f"{version}-{digest.hexdigest()[:12]}"


def graph_name(model: str, side: int, readout: Readout) -> str:
    import cbir

    _, weights = _weights(model)
    parts = [model, f"w{weights}", f"cbir{cbir.__version__}", layout(side)]
    stages = "s" + "x".join(map(str, readout.stages))
    return "-".join([*parts, stages, readout.statistic, f"op{OPSET}"]) + ".onnx"


def graph_file(model: str, side: int, readout: Readout) -> Path:
    """The cached graph for a model, an input side's layout and a readout (exported if
    absent)."""
    folder = cache_dir() / "graphs"
    path = folder / graph_name(model, side, readout)
    if path.is_file():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    with _locked(folder / ".lock"):
        if not path.is_file():  # another process may have made it while this one waited
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=".export-", suffix=".onnx")
            os.close(fd)
            try:
                export(model, side if side % STRIDE else _TRACE_SIDE, readout, Path(tmp))
                os.chmod(tmp, 0o644)  # mkstemp makes it private; a cache needs no secrecy
                os.replace(tmp, path)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
    return path


@contextlib.contextmanager
def _locked(lock: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: the rename alone keeps reads whole
        yield
        return
    with lock.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def export(model: str, side: int, readout: Readout, target: Path) -> None:
    """Export the float32 network built for ``side``, with the outputs of ``readout``, to
    ``target``."""
    import torch

    net = _backbone.Backbone(model, side, "fp32")
    stage_list = list(readout.stages)

    class Stages(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net.net.to(memory_format=torch.contiguous_format)

        def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
            x = images.permute(0, 3, 1, 2).float()
            x = x.sub(_backbone.INPUT_MEAN).div(_backbone.INPUT_STD)
            return tuple(readout.apply(net.run_stages(self.net, x, stage_list)))

    kinds = ["maps"] if readout.statistic == "maps" else readout.statistic.split("_")
    names = [f"stage{s}_{k}" for s in readout.stages for k in kinds]
    dynamic = {"images": {0: "batch", 1: "height", 2: "width"}}
    spatial = {2: "height", 3: "width"} if readout.statistic == "maps" else {}
    dynamic.update({n: {0: "batch", **{a: f"{n}_{d}" for a, d in spatial.items()}} for n in names})
    example = torch.zeros((1, side, side, 3), dtype=torch.uint8)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's notes on constant folding
        torch.onnx.export(
            Stages().eval(),
            (example,),
            str(target),
            input_names=["images"],
            output_names=names,
            dynamic_axes=dynamic,
            opset_version=OPSET,
            dynamo=False,  # the TorchScript exporter: no onnxscript needed, dynamic axes as named
        )
