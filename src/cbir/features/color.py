"""Colour descriptors: global and regional colour histograms.

Both convert with OpenCV (uint8 HSV has H in 0..179; uint8 LAB stores L*255/100, a+128, b+128),
map every channel value to its bin with a 256-entry integer lookup table (no float rounding at
bin edges) and count all pixels with one ``np.bincount`` over the combined bin index.
"""

from __future__ import annotations

import functools
from typing import Any

import cv2
import numpy as np

from cbir.features.base import Descriptor
from cbir.features.inputs import as_rgb_uint8, check_positive_int, is_int
from cbir.features.registry import register_descriptor
from cbir.images import InputSpec

SPACES = ("hsv", "rgb", "lab")
# Number of distinct uint8 values of each channel after OpenCV's conversion.
_CHANNEL_RANGE = {"hsv": (180, 256, 256), "rgb": (256, 256, 256), "lab": (256, 256, 256)}
_CONVERSION = {"hsv": cv2.COLOR_RGB2HSV, "lab": cv2.COLOR_RGB2LAB, "rgb": None}
#: Order of the blocks of ``color-regional``.
REGIONS = ("centre", "top-left", "top-right", "bottom-right", "bottom-left")


def _check_space(space: Any) -> str:
    if not isinstance(space, str) or space.lower() not in SPACES:
        raise ValueError(f"space must be one of {', '.join(SPACES)}, got {space!r}")
    return space.lower()


def _check_bins(bins: Any, space: str) -> tuple[int, int, int]:
    """Three positive bin counts (one int or a 1-tuple means the same count for every channel)."""
    values = (bins,) if is_int(bins) else bins
    try:
        values = tuple(values)
    except TypeError:
        values = ()
    if len(values) == 1:
        values = values * 3
    if len(values) != 3 or not all(is_int(b) and b >= 1 for b in values):
        raise ValueError(
            f"bins must be 3 positive integers, one per channel (e.g. 8x12x3), got {bins!r}"
        )
    limits = _CHANNEL_RANGE[space]
    if any(b > r for b, r in zip(values, limits, strict=True)):
        raise ValueError(
            f"bins must be at most {'x'.join(map(str, limits))} for space {space!r} "
            f"(one bin per channel value), got {'x'.join(map(str, values))}"
        )
    return (int(values[0]), int(values[1]), int(values[2]))


@functools.lru_cache(maxsize=64)
def _bin_lut(space: str, bins: tuple[int, int, int]) -> np.ndarray:
    """(256, 1, 3) uint8 table for ``cv2.LUT``: per channel, value -> bin ``value * bins // range``.

    Integer arithmetic, so bin edges are exact (no float rounding at edges).
    """
    values = np.arange(256)
    per_channel = [
        np.minimum(values * b // r, b - 1) for b, r in zip(bins, _CHANNEL_RANGE[space], strict=True)
    ]
    lut = np.stack(per_channel, axis=-1).astype(np.uint8).reshape(256, 1, 3)
    lut.flags.writeable = False
    return lut


def index_dtype(n_bins: int) -> type[np.unsignedinteger] | type[np.signedinteger]:
    """uint16 when every bin index fits (half the memory traffic of intp), else intp."""
    return np.uint16 if n_bins <= 2**16 else np.intp


def joint_bins(
    image: np.ndarray, space: str, bins: tuple[int, int, int], total_bins: int | None = None
) -> np.ndarray:
    """(H, W) joint colour bin ``(b0 * bins[1] + b1) * bins[2] + b2`` of every pixel.

    Its dtype is ``index_dtype(total_bins)`` (default ``prod(bins)``), so a caller can add
    offsets up to ``total_bins`` (the regional histogram adds region * prod(bins)).
    """
    rgb = as_rgb_uint8(image)
    code = _CONVERSION[space]
    converted = rgb if code is None else cv2.cvtColor(rgb, code)
    per_channel = cv2.LUT(converted, _bin_lut(space, bins))  # (H, W, 3) uint8 bin indices
    dtype = index_dtype(total_bins or bins[0] * bins[1] * bins[2])
    index = np.multiply(per_channel[..., 0], bins[1] * bins[2], dtype=dtype)
    index += np.multiply(per_channel[..., 1], bins[2], dtype=dtype)
    index += per_channel[..., 2]
    return index


@register_descriptor
class ColorHistogram(Descriptor):
    """Global colour distribution: a joint 3-D histogram over HSV, RGB or LAB, summing to 1.

    Ignores where colours are, so it is invariant to flips, rotations and (nearly) scale.
    ``bins`` are per channel (H x S x V for ``hsv``); the vector has ``prod(bins)`` entries.
    """

    name = "color-hist"
    aliases = ("hsv-hist",)
    default_metric = "hellinger"  # best of chi2/JS/intersection/L1 on COIL-100
    nonnegative = True

    def __init__(
        self, space: str = "hsv", bins: tuple[int, ...] = (8, 12, 3), max_side: int = 128
    ) -> None:
        self.space = _check_space(space)
        self.bins = _check_bins(bins, self.space)
        self.max_side = check_positive_int("max_side", max_side)

    @property
    def dim(self) -> int:
        """prod(bins)."""
        return int(np.prod(self.bins))

    @property
    def input_spec(self) -> InputSpec:
        """RGB, shrunk to ``max_side``: the histogram barely changes with scale (MAP on dtd10
        and COIL-100 is the same at 128 and 256 px), and a smaller target lets JPEG draft
        mode decode less."""
        return InputSpec(mode="RGB", max_side=self.max_side)

    def transform_one(self, image: np.ndarray) -> np.ndarray:
        """L1-normalised joint histogram of one RGB image."""
        index = joint_bins(image, self.space, self.bins)
        hist = np.bincount(index.ravel(), minlength=self.dim).astype(np.float64)
        return (hist / index.size).astype(np.float32)


@functools.lru_cache(maxsize=32)
def region_labels(height: int, width: int) -> np.ndarray:
    """(H, W) uint8 map of the 5 regions in :data:`REGIONS` order (read-only, cached per shape).

    The centre is the ellipse whose axes are 75% of the width and height; the rest of the image
    is split into the four quadrants around the image centre (pixel centres at ``x + 0.5``).
    """
    y = (np.arange(height, dtype=np.float64) + 0.5)[:, None] - height / 2
    x = (np.arange(width, dtype=np.float64) + 0.5)[None, :] - width / 2
    ax, ay = 0.75 * width / 2, 0.75 * height / 2
    inside = (x / ax) ** 2 + (y / ay) ** 2 <= 1.0
    top, left = y < 0, x < 0
    # quadrants: top-left 1, top-right 2, bottom-right 3, bottom-left 4
    quadrant = np.where(top, np.where(left, 1, 2), np.where(left, 4, 3))
    labels = np.where(inside, 0, quadrant).astype(np.uint8)
    labels.flags.writeable = False
    return labels


@functools.lru_cache(maxsize=32)
def _region_offsets(height: int, width: int, n_bins: int) -> np.ndarray:
    """region_label * n_bins, so ``offset + bin`` indexes the concatenated histograms."""
    dtype = index_dtype(len(REGIONS) * n_bins)
    offsets = region_labels(height, width).astype(dtype) * dtype(n_bins)
    offsets.flags.writeable = False
    return offsets


@register_descriptor
class RegionalColorHistogram(Descriptor):
    """Colour layout: colour histograms of a centre ellipse and the four corners (5 blocks).

    Blocks are in the order centre, top-left, top-right, bottom-right, bottom-left; each is the
    region's histogram normalised to sum 1, divided by 5 (an empty region stays all zero), so
    the vector sums to 1 and distribution metrics apply. It adds coarse spatial layout to
    ``color-hist`` while still tolerating small shifts.
    """

    name = "color-regional"
    aliases = ("hsv-regional",)
    default_metric = "hellinger"  # best of chi2/JS/intersection/L1 on COIL-100
    nonnegative = True

    def __init__(
        self, space: str = "hsv", bins: tuple[int, ...] = (9, 3, 3), max_side: int = 128
    ) -> None:
        self.space = _check_space(space)
        self.bins = _check_bins(bins, self.space)
        self.max_side = check_positive_int("max_side", max_side)

    @property
    def bins_per_region(self) -> int:
        """prod(bins): the length of one region's block."""
        return int(np.prod(self.bins))

    @property
    def dim(self) -> int:
        """5 * prod(bins)."""
        return len(REGIONS) * self.bins_per_region

    @property
    def input_spec(self) -> InputSpec:
        """RGB, shrunk to ``max_side``."""
        return InputSpec(mode="RGB", max_side=self.max_side)

    def transform_one(self, image: np.ndarray) -> np.ndarray:
        """One bincount over ``region * B + bin``, then per-region normalisation."""
        index = joint_bins(image, self.space, self.bins, self.dim)
        index += _region_offsets(index.shape[0], index.shape[1], self.bins_per_region)
        hist = np.bincount(index.ravel(), minlength=self.dim).astype(np.float64)
        blocks = hist.reshape(len(REGIONS), self.bins_per_region)
        totals = blocks.sum(axis=1, keepdims=True)
        blocks /= np.maximum(totals, 1.0) * len(REGIONS)
        return blocks.ravel().astype(np.float32)
