"""Shape descriptors: histograms of oriented gradients (HOG) on a fixed-size grayscale image.

``skimage.feature.hog`` loops over orientations and blocks in Python/Cython and takes ~4 ms on a
128 px image; the same computation is done here with one weighted ``np.bincount`` and a vectorised
block normalisation (~0.5 ms). The tests check the output against ``skimage.feature.hog``.
"""

from __future__ import annotations

import functools

import cv2
import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from cbir.features.base import Descriptor
from cbir.features.inputs import as_gray_uint8, check_positive_int
from cbir.features.registry import register_descriptor
from cbir.images import InputSpec

BLOCK_NORMS = ("L2-Hys", "L2", "L1", "L1-sqrt")
_EPS = 1e-5  # skimage's block normalisation epsilon


@functools.lru_cache(maxsize=16)
def _cell_index(height: int, width: int, cell: int) -> np.ndarray:
    """(H, W) intp cell number of each pixel; ``n_cells`` for the margin no cell covers."""
    n_r, n_c = height // cell, width // cell

    def axis_cells(length: int, n: int) -> np.ndarray:
        k = np.arange(length) // cell
        return np.where(k < n, k, -1)

    rows, cols = axis_cells(height, n_r), axis_cells(width, n_c)
    index = rows[:, None] * n_c + cols[None, :]
    index[(rows[:, None] < 0) | (cols[None, :] < 0)] = n_r * n_c
    index = index.astype(np.intp)
    index.flags.writeable = False
    return index


def _mod180(degrees: np.ndarray) -> np.ndarray:
    """``degrees % 180`` for values in about [-180, 180], bit for bit, without numpy's slow fmod."""
    out = np.where(degrees >= 180, degrees - 180, np.where(degrees < 0, degrees + 180, degrees))
    return np.where(degrees < -180, (degrees + 180) + 180, out)


@functools.lru_cache(maxsize=16)
def _bin_edges(n: int) -> np.ndarray:
    """skimage's orientation bin edges ``180 / n * i`` (stored as C floats), i = 0..n."""
    edges = ((180.0 / n) * np.arange(n + 1)).astype(np.float32).astype(np.float64)
    edges.flags.writeable = False
    return edges


def _orientation_bins(orientation: np.ndarray, n: int) -> np.ndarray:
    """Bin i such that edge_i <= o < edge_i+1 (n when o >= edge_n, i.e. no bin, as skimage).

    Same as ``searchsorted(edges, o, "right") - 1`` but 3x faster: divide, then fix the
    off-by-one where the float32 edges disagree with the division.
    """
    edges = _bin_edges(n)
    bins = (orientation * (n / 180.0)).astype(np.intp)
    np.clip(bins, 0, n, out=bins)
    bins -= orientation < edges[bins]
    bins += (bins < n) & (orientation >= edges[np.minimum(bins + 1, n)])
    return bins


def hog_features(
    gray: np.ndarray,
    orientations: int = 9,
    pixels_per_cell: int = 16,
    cells_per_block: int = 2,
    block_norm: str = "L2-Hys",
) -> np.ndarray:
    """``skimage.feature.hog(gray, ...)`` with square cells and blocks, vectorised (float64)."""
    image = gray.astype(np.float64)
    H, W = image.shape
    c, b, n = pixels_per_cell, cells_per_block, orientations
    g_row = np.zeros_like(image)
    g_col = np.zeros_like(image)
    g_row[1:-1, :] = image[2:, :] - image[:-2, :]
    g_col[:, 1:-1] = image[:, 2:] - image[:, :-2]
    # gradients are integers, so sqrt(x^2 + y^2) is as exact as np.hypot, and 7x faster
    magnitude = np.sqrt(g_col * g_col + g_row * g_row)
    orientation = _mod180(np.arctan2(g_row, g_col) * (180 / np.pi))
    bins = _orientation_bins(orientation, n)
    n_r, n_c = H // c, W // c
    n_cells = n_r * n_c
    cells = _cell_index(H, W, c)
    index = np.where((bins < n) & (cells < n_cells), cells * n + bins, n_cells * n)
    hist = np.bincount(index.ravel(), weights=magnitude.ravel(), minlength=(n_cells + 1) * n)
    hist = hist[: n_cells * n].reshape(n_r, n_c, n) / (c * c)
    # (blocks_r, blocks_c, n, b, b) -> (blocks_r, blocks_c, b, b, n), skimage's output order
    blocks = sliding_window_view(hist, (b, b), axis=(0, 1)).transpose(0, 1, 3, 4, 2)
    axes = (2, 3, 4)
    if block_norm == "L1":
        out = blocks / (np.abs(blocks).sum(axis=axes, keepdims=True) + _EPS)
    elif block_norm == "L1-sqrt":
        out = np.sqrt(blocks / (np.abs(blocks).sum(axis=axes, keepdims=True) + _EPS))
    else:
        out = blocks / np.sqrt((blocks**2).sum(axis=axes, keepdims=True) + _EPS**2)
        if block_norm == "L2-Hys":
            out = np.minimum(out, 0.2)
            out = out / np.sqrt((out**2).sum(axis=axes, keepdims=True) + _EPS**2)
    return out.ravel()


@register_descriptor
class HOG(Descriptor):
    """Shape and layout of edges: histograms of oriented gradients over a grid of cells.

    The image is resized to ``size`` x ``size`` gray; each cell of ``pixels_per_cell`` pixels
    holds a histogram of ``orientations`` unsigned gradient directions weighted by magnitude,
    normalised over blocks of ``cells_per_block`` x ``cells_per_block`` cells (``block_norm``).
    Sensitive to layout and orientation by design; insensitive to colour and brightness.
    """

    name = "hog"
    default_metric = "euclidean"
    nonnegative = True

    def __init__(
        self,
        size: int = 128,
        orientations: int = 9,
        pixels_per_cell: int = 16,
        cells_per_block: int = 2,
        block_norm: str = "L2-Hys",
    ) -> None:
        self.size = check_positive_int("size", size, 2, 4096)
        self.orientations = check_positive_int("orientations", orientations, 1, 180)
        self.pixels_per_cell = check_positive_int("pixels_per_cell", pixels_per_cell, 1)
        self.cells_per_block = check_positive_int("cells_per_block", cells_per_block, 1)
        if self.size // self.pixels_per_cell < self.cells_per_block:
            raise ValueError(
                f"size ({self.size}) must hold at least cells_per_block ({self.cells_per_block}) "
                f"cells of pixels_per_cell ({self.pixels_per_cell}) pixels"
            )
        if block_norm not in BLOCK_NORMS:
            allowed = ", ".join(BLOCK_NORMS)
            raise ValueError(f"block_norm must be one of {allowed}, got {block_norm!r}")
        self.block_norm = block_norm

    @property
    def n_blocks(self) -> int:
        """Blocks along each side."""
        return self.size // self.pixels_per_cell - self.cells_per_block + 1

    @property
    def dim(self) -> int:
        """blocks^2 * cells_per_block^2 * orientations (1764 with the defaults)."""
        return self.n_blocks**2 * self.cells_per_block**2 * self.orientations

    @property
    def input_spec(self) -> InputSpec:
        """Grayscale resized to exactly size x size: HOG cells are a fixed grid."""
        return InputSpec(mode="L", max_side=self.size, size=(self.size, self.size))

    def transform_one(self, image: np.ndarray) -> np.ndarray:
        """HOG of one image (resized here too if it is not size x size)."""
        gray = as_gray_uint8(image)
        if gray.shape != (self.size, self.size):
            shrink = gray.shape[0] >= self.size and gray.shape[1] >= self.size
            interp = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
            gray = cv2.resize(gray, (self.size, self.size), interpolation=interp)
        features = hog_features(
            gray, self.orientations, self.pixels_per_cell, self.cells_per_block, self.block_norm
        )
        return features.astype(np.float32)
