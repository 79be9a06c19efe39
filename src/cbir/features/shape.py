"""Shape descriptors: histograms of oriented gradients (HOG) on a fixed-size grayscale image.

``skimage.feature.hog`` loops over orientations and blocks in Python/Cython, one image at a
time, slower than the decode it follows. Here each pixel's orientation bin and magnitude are
looked up in a table of all 511^2 integer gradients, the cell histograms of a batch of images
are one weighted ``np.bincount`` and the block normalisation is vectorised over the batch (the
rates are in docs/benchmarks.md). The tests check the output against ``skimage.feature.hog``."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import cv2
import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from cbir.features.base import Descriptor
from cbir.features.inputs import as_gray_uint8, check_positive_int
from cbir.features.registry import register_descriptor
from cbir.images import InputSpec

BLOCK_NORMS = ("L2-Hys", "L2", "L1", "L1-sqrt")
_EPS = 1e-5  # skimage's block normalisation epsilon


_G = 255  # a central difference of uint8 pixels lies in -255..255
_SIDE = 2 * _G + 1  # distinct values of one gradient component
#: Pixels per ``hog_features`` call in ``HOG.transform``. Its temporaries (~20 bytes a pixel)
#: then stay near 1 MB, in cache and reused by malloc: one call on 64 images of 128 px is about
#: twice as slow as 16 calls on 4, mostly page faults on fresh memory.
_CHUNK_PIXELS = 2**16


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


@functools.lru_cache(maxsize=16)
def _gradient_tables(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Orientation bin (uint8, n = no bin) and magnitude of every integer gradient.

    Entry ``(g_row + 255) * 511 + (g_col + 255)``. The 511^2 gradients of a uint8 image are few
    enough to tabulate with skimage's float64 formulas once, so per pixel two gathers replace
    arctan2, the modulo and the bin search (the slow part), with exactly the same bins.
    """
    g = np.arange(-_G, _G + 1, dtype=np.float64)
    g_row, g_col = g[:, None], g[None, :]
    orientation = _mod180(np.arctan2(g_row, g_col) * (180 / np.pi))
    bins = _orientation_bins(orientation, n).astype(np.uint8).ravel()
    magnitude = np.sqrt(g_col * g_col + g_row * g_row).ravel()
    for a in (bins, magnitude):
        a.flags.writeable = False
    return bins, magnitude


def _gradient_codes(gray: np.ndarray) -> np.ndarray:
    """(N, H, W) int32 ``(g_row + 255) * 511 + (g_col + 255)``: the index into
    :func:`_gradient_tables` of each pixel's central differences (0 on the border, as skimage).
    """
    x = gray.astype(np.int32)
    code = np.empty_like(x)
    np.subtract(x[:, 2:, :], x[:, :-2, :], out=code[:, 1:-1, :])
    code[:, 0, :] = code[:, -1, :] = 0
    code *= _SIDE
    code[:, :, 1:-1] += x[:, :, 2:]
    code[:, :, 1:-1] -= x[:, :, :-2]
    code += _G * _SIDE + _G
    return code


def _cell_histograms(gray: np.ndarray, c: int, n: int) -> np.ndarray:
    """(N, n_r, n_c, n) sums of gradient magnitude per cell and orientation bin (as skimage).

    The pixels are gathered cell position-major, so consecutive ``bincount`` items fall in
    different cells: a run of same-bin pixels would otherwise make each add wait for the last.
    """
    N, H, W = gray.shape
    n_r, n_c = H // c, W // c
    code = _gradient_codes(gray)
    # (N, n_r, c, n_c, c) -> (N, c, c, n_r, n_c), leaving out the margin no cell covers
    code = np.ascontiguousarray(
        code[:, : n_r * c, : n_c * c].reshape(N, n_r, c, n_c, c).transpose(0, 2, 4, 1, 3)
    )
    bin_table, magnitude_table = _gradient_tables(n)
    # one bincount for the batch: slot (image, cell, bin), with a slot n per cell for "no bin"
    slot_base = np.arange(N * n_r * n_c, dtype=np.intp).reshape(N, 1, 1, n_r, n_c) * (n + 1)
    slots = np.add(bin_table.take(code), slot_base, dtype=np.intp)
    hist = np.bincount(
        slots.ravel(), weights=magnitude_table.take(code).ravel(), minlength=N * n_r * n_c * (n + 1)
    )
    return hist.reshape(N, n_r, n_c, n + 1)[..., :n]


def hog_features(
    gray: np.ndarray,
    orientations: int = 9,
    pixels_per_cell: int = 16,
    cells_per_block: int = 2,
    block_norm: str = "L2-Hys",
) -> np.ndarray:
    """``skimage.feature.hog(gray, ...)`` with square cells and blocks, vectorised (float64).

    ``gray`` is one (H, W) uint8 image, giving a 1-D vector, or a stack (N, H, W) of them,
    giving (N, dim): one call for a batch saves numpy's per-call overhead on small images.
    """
    gray = np.asarray(gray)
    if gray.dtype != np.uint8:
        raise ValueError(f"expected uint8 images, got dtype {gray.dtype}")
    stack = gray[None] if gray.ndim == 2 else gray
    c, b, n = pixels_per_cell, cells_per_block, orientations
    N = stack.shape[0]
    hist = _cell_histograms(stack, c, n) / (c * c)
    # (N, blocks_r, blocks_c, n, b, b) -> (N, blocks_r, blocks_c, b * b * n), skimage's order;
    # contiguous, so each block sums along the last axis whatever N (transform == transform_one)
    blocks = sliding_window_view(hist, (b, b), axis=(1, 2)).transpose(0, 1, 2, 4, 5, 3)
    blocks = np.ascontiguousarray(blocks).reshape(N, -1, b * b * n)
    if block_norm == "L1":
        out = blocks / (np.abs(blocks).sum(axis=-1, keepdims=True) + _EPS)
    elif block_norm == "L1-sqrt":
        out = np.sqrt(blocks / (np.abs(blocks).sum(axis=-1, keepdims=True) + _EPS))
    else:
        out = blocks / np.sqrt((blocks * blocks).sum(axis=-1, keepdims=True) + _EPS**2)
        if block_norm == "L2-Hys":
            out = np.minimum(out, 0.2)
            out /= np.sqrt((out * out).sum(axis=-1, keepdims=True) + _EPS**2)
    out = out.reshape(N, -1)
    return out[0] if gray.ndim == 2 else out


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

    def _gray(self, image: np.ndarray) -> np.ndarray:
        """``image`` as size x size uint8 gray, resized here if the caller did not."""
        gray = as_gray_uint8(image)
        if gray.shape != (self.size, self.size):
            shrink = gray.shape[0] >= self.size and gray.shape[1] >= self.size
            interp = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
            gray = cv2.resize(gray, (self.size, self.size), interpolation=interp)
        return gray

    def transform(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """HOG of a batch: stacked, then in chunks of about :data:`_CHUNK_PIXELS` pixels."""
        out = np.empty((len(images), self.dim), dtype=self.dtype)
        if len(images) == 0:
            return out
        grays = [self._gray(image) for image in images]
        step = max(1, _CHUNK_PIXELS // (self.size * self.size))
        for lo in range(0, len(grays), step):
            out[lo : lo + step] = hog_features(
                np.stack(grays[lo : lo + step]),
                self.orientations,
                self.pixels_per_cell,
                self.cells_per_block,
                self.block_norm,
            )
        return out

    def transform_one(self, image: np.ndarray) -> np.ndarray:
        """HOG of one image (a batch of one, so it equals the rows of ``transform``)."""
        return self.transform([image])[0]
