"""Texture descriptors: co-occurrence (GLCM), first-order statistics and local binary patterns.

All work on 8-bit grayscale arrays. scikit-image defines the computations, but its
implementations, one image and one Python-level pass at a time, are several times slower than
the decode they follow (docs/benchmarks.md), so they are done here vectorised with numpy/OpenCV
over whole batches and the tests check
them against scikit-image: GLCMs equal ``graycomatrix``, properties equal ``graycoprops``, LBP
codes equal ``local_binary_pattern`` except at exact ties (see :func:`lbp_planes`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Sequence

import cv2
import numpy as np

from cbir.features.base import Descriptor
from cbir.features.inputs import as_gray_uint8, check_positive_int, is_int
from cbir.features.registry import register_descriptor
from cbir.images import InputSpec


def _entropy_bits(p: np.ndarray, axis: int) -> np.ndarray:
    """-sum p log2 p along ``axis`` (0 log 0 = 0)."""
    logp = np.log2(p, where=p > 0, out=np.zeros_like(p))
    return -(p * logp).sum(axis=axis)


# --------------------------------------------------------------------------------------------
# GLCM
# --------------------------------------------------------------------------------------------
GLCM_PROPS = (
    "contrast",
    "dissimilarity",
    "homogeneity",
    "ASM",
    "energy",
    "correlation",
    "entropy",
)


#: Co-occurrence cells per chunk of ``GLCM.transform`` (512 KB of float64). The property pass
#: is memory-bound: larger chunks of small images are no faster, and from ~2^17 cells on
#: malloc starts returning their memory to the system, so each chunk page-faults it back.
_CHUNK_CELLS = 2**16
#: Same-size images up to this many pixels are counted together by :func:`pair_counts`; for
#: larger ones (from about 96 x 96) one ``calcHist`` per image and offset is as fast.
_BATCH_COUNT_PIXELS = 64 * 64
_TINY = np.finfo(np.float64).tiny  # log2(tiny) is finite, so 0 * log2(max(0, tiny)) = 0


@functools.lru_cache(maxsize=8)
def _glcm_weights(L: int) -> tuple[np.ndarray, np.ndarray]:
    """The gray levels 0..L-1 and, per flattened GLCM cell (i, j), the weights of contrast,
    dissimilarity and homogeneity as the columns of one (L*L, 3) matrix."""
    levels = np.arange(L, dtype=np.float64)
    diff2 = ((levels[:, None] - levels[None, :]) ** 2).ravel()
    linear = np.stack([diff2, np.sqrt(diff2), 1.0 / (1.0 + diff2)], axis=1)
    for a in (levels, linear):
        a.flags.writeable = False
    return levels, linear


def haralick(S: np.ndarray) -> np.ndarray:
    """The :data:`GLCM_PROPS` (rows) of each of a stack of co-occurrence matrices (M, L, L).

    ``S`` holds counts or probabilities (each matrix is normalised by its sum; an all-zero
    matrix gives zeros). Everything except entropy is a few matrix products over the stack, and
    variance and covariance come from raw moments (``T sum p l^2 - (sum p l)^2``): on integer
    counts these are exact in float64 (below 2^53: images up to 256 px at any ``levels``), so
    a flat image has exactly zero variance.
    """
    M, L, _ = S.shape
    levels, linear = _glcm_weights(L)
    flat = S.reshape(M, L * L)
    # row sums and sum_j S_ij * j of each row i, in one product: (M, L, 2)
    by_row = (S.reshape(M * L, L) @ np.stack([np.ones(L), levels], axis=1)).reshape(M, L, 2)
    rows, row_sums = by_row[..., 0], by_row[..., 1]
    cols = S.sum(axis=1)
    total = rows.sum(axis=1)
    safe = np.where(total > 0, total, 1.0)
    m_i, m_j = rows @ levels, cols @ levels
    var_i = np.maximum(total * (rows @ levels**2) - m_i * m_i, 0.0)  # = total^2 * var
    var_j = np.maximum(total * (cols @ levels**2) - m_j * m_j, 0.0)
    cov = total * (row_sums @ levels) - m_i * m_j
    std_i, std_j = np.sqrt(var_i), np.sqrt(var_j)
    ok = (std_i >= 1e-15 * total) & (std_j >= 1e-15 * total) & (total > 0)
    corr = np.divide(cov, std_i * std_j, out=np.zeros(M), where=ok)
    contrast, dissimilarity, homogeneity = (flat @ linear).T / safe
    asm = np.einsum("mk,mk->m", flat, flat) / (safe * safe)
    log = np.maximum(flat, _TINY)
    # in place: a second stack-sized temporary costs more (page faults) than the log itself
    xlogx = np.einsum("mk,mk->m", flat, np.log2(log, out=log))
    # -sum (S/T) log2(S/T) = (T log2 T - sum S log2 S) / T; exactly 0 for a single cell
    entropy = (total * np.log2(safe) - xlogx) / safe
    return np.stack([contrast, dissimilarity, homogeneity, asm, np.sqrt(asm), corr, entropy])


def glcm_properties(P: np.ndarray) -> dict[str, np.ndarray]:
    """Haralick properties of GLCMs ``P`` of shape (L, L, ...), e.g. (L, L, n_dist, n_angle).

    Same formulas as ``skimage.feature.graycoprops`` (computed in one vectorised pass instead of
    one call per property), plus entropy in bits. ``P`` may also hold counts: see
    :func:`haralick`, which does the work. Correlation is 0, not 1 or NaN, where a gray level
    distribution has no variance (flat image): a flat image has no linear dependence.
    """
    L = P.shape[0]
    stack = np.ascontiguousarray(np.moveaxis(P.reshape(L, L, -1), 2, 0), dtype=np.float64)
    props = haralick(stack)
    return {name: props[k].reshape(P.shape[2:]) for k, name in enumerate(GLCM_PROPS)}


@functools.lru_cache(maxsize=32)
def _glcm_offsets(distances: tuple[int, ...], angles: int) -> tuple[tuple[int, int], ...]:
    """(row, col) pixel offset of each (distance, angle), distance-major, as skimage rounds."""
    out = []
    for d in distances:
        for angle in np.arange(angles) * (np.pi / angles):
            dr, dc = math.sin(angle) * d, math.cos(angle) * d
            # C round(): half away from zero
            out.append(
                (
                    int(math.copysign(math.floor(abs(dr) + 0.5), dr)),
                    int(math.copysign(math.floor(abs(dc) + 0.5), dc)),
                )
            )
    return tuple(out)


@functools.lru_cache(maxsize=8)
def _quantiser(levels: int) -> np.ndarray:
    """The 256-entry ``cv2.LUT`` table of ``v * levels // 256``."""
    lut = ((np.arange(256) * levels) // 256).astype(np.uint8)
    lut.flags.writeable = False
    return lut


def pair_counts(q: np.ndarray, offsets: Sequence[tuple[int, int]], L: int) -> np.ndarray:
    """Co-occurrence counts (N, len(offsets), L, L) float32 of quantised images q (N, H, W).

    ``[n, k, i, j]``: pixels of level i whose neighbour at ``offsets[k]`` has level j (not
    symmetric); an offset longer than the image gives a zero matrix. One image: one
    ``cv2.calcHist`` of two shifted views per offset. Several: one call per offset counts
    (image, level, level) triples of the whole stack (N <= 256: the image number is a uint8
    channel), 2-4x faster for small images than one call per image.
    """
    N, H, W = q.shape
    if N > 256:
        raise ValueError(f"at most 256 images at once, got {N}")
    counts = np.zeros((N, len(offsets), L, L), dtype=np.float32)
    for k, (dr, dc) in enumerate(offsets):
        lo, hi = max(0, -dc), W - max(0, dc)  # columns of the first pixel of a pair
        h, w = H - dr, hi - lo
        if h <= 0 or w <= 0:
            continue
        first, second = q[:, :h, lo:hi], q[:, dr:, lo + dc : hi + dc]
        if N == 1:
            counts[0, k] = cv2.calcHist([first[0], second[0]], [0, 1], None, [L, L], [0, L, 0, L])
            continue
        image = np.repeat(np.arange(N, dtype=np.uint8), h * w).reshape(N * h, w)
        first = np.ascontiguousarray(first).reshape(N * h, w)
        second = np.ascontiguousarray(second).reshape(N * h, w)
        counts[:, k] = cv2.calcHist(
            [image, first, second], [0, 1, 2], None, [N, L, L], [0, N, 0, L, 0, L]
        )
    return counts


@register_descriptor
class GLCM(Descriptor):
    """Texture from gray-level co-occurrence: Haralick features (contrast, correlation, entropy...).

    The image is quantised to ``levels`` gray levels; symmetric, normalised co-occurrence matrices
    are built for each distance in ``distances`` and ``angles`` equally spaced directions in
    [0, 180) degrees (4: 0, 45, 90, 135). For each property (contrast, dissimilarity,
    homogeneity, ASM, energy, correlation, entropy) and distance the vector holds the mean and
    the range over the directions (Haralick's rotation-tolerant convention); see
    ``feature_names``. The features have very different scales, hence the Canberra default.
    """

    name = "glcm"
    default_metric = "canberra"
    nonnegative = False  # correlation can be negative

    def __init__(
        self, levels: int = 32, distances: tuple[int, ...] = (1, 2, 4), angles: int = 4
    ) -> None:
        self.levels = check_positive_int("levels", levels, 2, 256)
        values = (distances,) if is_int(distances) else distances
        try:
            values = tuple(values)
        except TypeError:
            values = ()
        if not values or not all(is_int(d) and d >= 1 for d in values):
            raise ValueError(
                f"distances must be one or more positive integers (e.g. 1x2x4), got {distances!r}"
            )
        self.distances = tuple(int(d) for d in values)
        self.angles = check_positive_int("angles", angles, 1, 36)

    @property
    def angle_values(self) -> np.ndarray:
        """The directions in radians: k * pi / angles."""
        return np.arange(self.angles) * (np.pi / self.angles)

    @property
    def feature_names(self) -> list[str]:
        """Names of the vector's entries, e.g. ``contrast_d1_mean``, ``contrast_d1_range``."""
        return [
            f"{prop}_d{d}_{stat}"
            for prop in GLCM_PROPS
            for d in self.distances
            for stat in ("mean", "range")
        ]

    @property
    def dim(self) -> int:
        """7 properties x len(distances) x (mean, range)."""
        return len(GLCM_PROPS) * len(self.distances) * 2

    @property
    def input_spec(self) -> InputSpec:
        """Grayscale, at most 256 px a side (co-occurrence distances are in pixels)."""
        return InputSpec(mode="L", max_side=256)

    @property
    def offsets(self) -> list[tuple[int, int]]:
        """(row, col) pixel offset of each (distance, angle), distance-major, as skimage rounds."""
        return list(_glcm_offsets(self.distances, self.angles))

    def _distinct_offsets(self) -> tuple[tuple[tuple[int, int], ...], np.ndarray]:
        """The distinct offsets, and where each of :attr:`offsets` is among them.

        Offsets that round to the same pixel step (45 degrees at distances 1 and 2) are counted
        and described once.
        """
        offsets = _glcm_offsets(self.distances, self.angles)
        distinct = tuple(dict.fromkeys(offsets))
        return distinct, np.array([distinct.index(o) for o in offsets], dtype=np.intp)

    def _symmetric_counts(self, grays: Sequence[np.ndarray]) -> np.ndarray:
        """Symmetric counts (n, n_distinct, levels, levels), float64, of uint8 gray images.

        Same-size images up to :data:`_BATCH_COUNT_PIXELS` are counted together.
        """
        L, lut = self.levels, _quantiser(self.levels)
        distinct = self._distinct_offsets()[0]
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, gray in enumerate(grays):
            key = gray.shape if gray.size <= _BATCH_COUNT_PIXELS else (i,)
            groups.setdefault(key, []).append(i)
        counts = np.empty((len(grays), len(distinct), L, L), dtype=np.float32)
        for members in groups.values():
            stack = np.stack([grays[i] for i in members])
            n, H, W = stack.shape
            q = cv2.LUT(stack.reshape(n * H, W), lut).reshape(n, H, W)
            counts[members] = pair_counts(q, distinct, L)
        return np.add(counts, counts.swapaxes(2, 3), dtype=np.float64)

    def matrices(self, image: np.ndarray) -> np.ndarray:
        """Symmetric normalised GLCMs of shape (levels, levels, n_distances, n_angles).

        Equal to ``graycomatrix(q, distances, angles, levels, symmetric=True, normed=True)``
        of the quantised image ``q`` (the tests check it), counted by :func:`pair_counts`.
        """
        L = self.levels
        counts = self._symmetric_counts([as_gray_uint8(image)])[0][self._distinct_offsets()[1]]
        totals = counts.sum(axis=(1, 2), keepdims=True)
        P = counts / np.maximum(totals, 1.0)  # an empty matrix (distance > image) stays zero
        return np.moveaxis(P, 0, -1).reshape(L, L, len(self.distances), self.angles)

    def transform(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Mean and range over angles of each property at each distance, for a batch.

        The properties of a chunk of images (about :data:`_CHUNK_CELLS` matrix cells, whatever
        the image sizes) are computed in one pass.
        """
        out = np.empty((len(images), self.dim), dtype=self.dtype)
        if len(images) == 0:
            return out
        grays = [as_gray_uint8(image) for image in images]
        L, n_dist, n_angle = self.levels, len(self.distances), self.angles
        distinct, where = self._distinct_offsets()
        step = min(256, max(1, _CHUNK_CELLS // (len(distinct) * L * L)))
        for lo in range(0, len(grays), step):
            chunk = grays[lo : lo + step]
            counts = self._symmetric_counts(chunk)
            props = haralick(counts.reshape(-1, L, L)).reshape(-1, len(chunk), len(distinct))
            props = props[:, :, where].reshape(-1, len(chunk), n_dist, n_angle)
            stats = np.stack([props.mean(axis=3), np.ptp(props, axis=3)], axis=3)
            out[lo : lo + step] = np.moveaxis(stats, 1, 0).reshape(len(chunk), -1)
        return np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0, copy=False)

    def transform_one(self, image: np.ndarray) -> np.ndarray:
        """The vector of one image (a batch of one, so it equals the rows of ``transform``)."""
        return self.transform([image])[0]


# --------------------------------------------------------------------------------------------
# First-order statistics
# --------------------------------------------------------------------------------------------
FOTF_FEATURES = (
    "mean",
    "variance",
    "std",
    "skewness",
    "kurtosis",
    "energy",
    "entropy",
    "smoothness",
    "min",
    "max",
    "p10",
    "p25",
    "median",
    "p75",
    "p90",
)
_PERCENTILES = (10.0, 25.0, 50.0, 75.0, 90.0)


def histogram_percentiles(counts: np.ndarray, q: Sequence[float]) -> np.ndarray:
    """Percentiles of the images behind 256-bin ``counts`` (n, 256), as numpy's default.

    numpy's "linear" method on the sorted pixels: position ``q/100 * (N - 1)``, interpolated
    between the two sorted values around it. The k-th sorted value is the first gray level whose
    cumulative count exceeds k, so this is O(256) per image instead of a sort of all pixels.
    """
    counts = np.asarray(counts, dtype=np.int64)
    cum = np.cumsum(counts, axis=1)  # (n, 256)
    N = cum[:, -1:]
    pos = (N - 1) * (np.asarray(q, dtype=np.float64)[None, :] / 100.0)  # (n, k)
    lo = np.floor(pos)
    frac = pos - lo
    lo = lo.astype(np.int64)
    hi = np.minimum(lo + 1, N - 1)

    def kth(k: np.ndarray) -> np.ndarray:
        return (cum[:, None, :] <= k[:, :, None]).sum(axis=2).astype(np.float64)

    a, b = kth(lo), kth(hi)
    return a + (b - a) * frac


def first_order_stats(counts: np.ndarray) -> np.ndarray:
    """The :data:`FOTF_FEATURES` of images given their 256-bin gray histograms (n, 256)."""
    counts = np.asarray(counts, dtype=np.float64)
    v = np.arange(256, dtype=np.float64)
    p = counts / counts.sum(axis=1, keepdims=True)
    mean = p @ v
    d = v[None, :] - mean[:, None]
    var = (p * d**2).sum(axis=1)
    std = np.sqrt(var)
    varying = var > 1e-12
    safe_var = np.where(varying, var, 1.0)
    skew = np.where(varying, (p * d**3).sum(axis=1) / safe_var**1.5, 0.0)
    kurt = np.where(varying, (p * d**4).sum(axis=1) / safe_var**2 - 3.0, 0.0)
    energy = (p**2).sum(axis=1)
    entropy = _entropy_bits(p, axis=1)
    smoothness = 1.0 - 1.0 / (1.0 + var / 255.0**2)
    present = counts > 0
    vmin = present.argmax(axis=1).astype(np.float64)
    vmax = 255.0 - present[:, ::-1].argmax(axis=1)
    pct = histogram_percentiles(counts.astype(np.int64), _PERCENTILES)
    columns = [mean, var, std, skew, kurt, energy, entropy, smoothness, vmin, vmax]
    return np.column_stack([*columns, pct])


@register_descriptor
class FirstOrderTexture(Descriptor):
    """Gray-level distribution statistics: mean, variance, skewness, kurtosis, entropy, percentiles.

    First-order texture features (Gonzalez & Woods): ignore pixel arrangement, describe
    brightness, contrast and the histogram's shape. Intensities are in 0..255 units, entropy in
    bits, smoothness is 1 - 1/(1 + var/255^2); skewness and kurtosis (excess) are 0 for a flat
    image. See ``feature_names`` for the order. Computed from the 256-bin histogram only.
    """

    name = "fotf"
    default_metric = "canberra"
    nonnegative = False  # skewness and excess kurtosis can be negative

    def __init__(self) -> None:
        pass

    @property
    def feature_names(self) -> list[str]:
        """Names of the vector's entries."""
        return list(FOTF_FEATURES)

    @property
    def dim(self) -> int:
        """Number of statistics (15)."""
        return len(FOTF_FEATURES)

    @property
    def input_spec(self) -> InputSpec:
        """Grayscale, at most 256 px a side."""
        return InputSpec(mode="L", max_side=256)

    def transform(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """One bincount per image, then the statistics of the whole batch at once."""
        if len(images) == 0:
            return np.empty((0, self.dim), dtype=self.dtype)
        counts = np.stack([np.bincount(as_gray_uint8(im).ravel(), minlength=256) for im in images])
        out = first_order_stats(counts)
        return np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0).astype(self.dtype)

    def transform_one(self, image: np.ndarray) -> np.ndarray:
        """The statistics of one image."""
        return self.transform([image])[0]


# --------------------------------------------------------------------------------------------
# LBP
# --------------------------------------------------------------------------------------------
LBP_METHODS = ("uniform", "ror", "nri_uniform", "default")
_MAX_P_LUT = 16  # "default" and "ror" need 2**P bins / a 2**P lookup table
_MAX_P = 32
_MAX_R = 64.0
_UNIT = 100_000  # sample offsets are rounded to 5 decimals, as in skimage


@functools.lru_cache(maxsize=16)
def ror_lut(P: int) -> np.ndarray:
    """Maps each P-bit LBP code to a dense index of its rotation-invariant class.

    The class of a code is the minimum over its P cyclic bit rotations (what skimage's ``ror``
    returns); the distinct minima, sorted, are numbered 0..n-1. Read-only, cached per P.
    """
    codes = np.arange(2**P, dtype=np.int64)
    mask = 2**P - 1
    smallest = codes.copy()
    for k in range(1, P):
        smallest = np.minimum(smallest, ((codes >> k) | (codes << (P - k))) & mask)
    classes = np.unique(smallest)
    lut = np.searchsorted(classes, smallest).astype(np.intp)
    lut.flags.writeable = False
    return lut


def lbp_n_bins(P: int, method: str) -> int:
    """Number of distinct codes (histogram bins) of an LBP method."""
    if method == "uniform":
        return P + 2
    if method == "nri_uniform":
        return P * (P - 1) + 3
    if method == "default":
        return 2**P
    if method == "ror":
        return int(ror_lut(P)[-1]) + 1  # the all-ones code is the largest class
    raise ValueError(f"method must be one of {', '.join(LBP_METHODS)}, got {method!r}")


def codes_from_bits(bits: np.ndarray, method: str) -> np.ndarray:
    """LBP codes from neighbour bits of shape (P, ...), with skimage's definitions.

    ``uniform``: number of ones if the pattern has <= 2 transitions, else P + 1.
    ``nri_uniform``: skimage's index of (number of ones, rotation) of uniform patterns,
    P(P-1) + 2 for the others. ``default``: sum bit_i 2**i. ``ror``: dense class of
    :func:`ror_lut`.
    """
    P = bits.shape[0]
    if method in ("default", "ror"):
        code = np.zeros(bits.shape[1:], dtype=np.intp)
        for i in range(P):
            code += bits[i] * (1 << i)
        return ror_lut(P)[code] if method == "ror" else code
    n_ones = bits.sum(axis=0, dtype=np.intp)
    # skimage counts the P - 1 transitions between neighbours i, i + 1 (not the wrap-around):
    # a circular pattern has <= 2 transitions exactly when it has <= 2 of these.
    uniform = np.not_equal(bits[:-1], bits[1:]).sum(axis=0, dtype=np.intp) <= 2
    if method == "uniform":
        return np.where(uniform, n_ones, P + 1)
    first_one = bits.argmax(axis=0)
    first_zero = (~bits).argmax(axis=0)
    rot = np.where(first_one == 0, n_ones - first_zero, P - first_one)
    code = 1 + (n_ones - 1) * P + rot
    code = np.where(n_ones == 0, 0, np.where(n_ones == P, P * (P - 1) + 1, code))
    return np.where(uniform, code, P * (P - 1) + 2).astype(np.intp)


@functools.lru_cache(maxsize=32)
def code_lut(P: int, method: str) -> np.ndarray:
    """``codes_from_bits`` of every P-bit default code (P <= 16), smallest unsigned dtype.

    Padded to 256 entries for P < 8 so ``cv2.LUT`` can apply it to a uint8 code image.
    """
    codes = np.arange(2**P, dtype=np.int64)
    bits = ((codes[None, :] >> np.arange(P)[:, None]) & 1).astype(bool)
    lut = codes_from_bits(bits, method)
    lut = lut.astype(np.uint8 if lut.max() < 256 else np.uint16)
    if P < 8:  # cv2.LUT wants 256 entries; codes >= 2**P never occur
        lut = np.concatenate([lut, np.zeros(256 - lut.size, dtype=lut.dtype)])
    lut.flags.writeable = False
    return lut


def _sample_offsets(P: int, R: float) -> list[tuple[int, int, int, int]]:
    """(row, col) of each sample point as integer part and fraction in 1e-5 units.

    skimage's positions: (-R sin(2 pi i / P), R cos(2 pi i / P)) rounded to 5 decimals, with R
    as a C float. Keeping them as integers makes the bilinear weights exact integers too.
    """
    Rf = float(np.float32(R))
    angle = 2 * np.pi * np.arange(P, dtype=np.float64) / P
    rows = np.rint(np.round(-Rf * np.sin(angle), 5) * _UNIT).astype(np.int64)
    cols = np.rint(np.round(Rf * np.cos(angle), 5) * _UNIT).astype(np.int64)
    out = []
    for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
        r0, fr = divmod(r, _UNIT)
        c0, fc = divmod(c, _UNIT)
        out.append((r0, fr, c0, fc))
    return out


def lbp_planes(gray: np.ndarray, P: int, R: float) -> Iterator[np.ndarray]:
    """Yield, for each sample point i, the (H, W) uint8 mask (255 / 0) "neighbour i >= centre".

    The neighbour is the bilinear interpolation at skimage's sample position, 0 outside the
    image. It is compared exactly: with offsets in 1e-5 units the weights are integers summing to
    1e10, so ``sum w_k v_k >= 1e10 * centre`` involves integers below 2**53, exact in float64
    whatever the summation order. This agrees with skimage except where the two sides are
    exactly equal (a tie), which skimage resolves by float rounding noise and this resolves as
    LBP defines, s(0) = 1; points on the pixel grid need no interpolation at all.
    """
    H, W = gray.shape
    pad = math.ceil(float(np.float32(R))) + 1
    padded = cv2.copyMakeBorder(gray, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=0)
    padded_f: np.ndarray | None = None
    centre: np.ndarray | None = None
    buf: np.ndarray | None = None
    for r0, fr, c0, fc in _sample_offsets(P, R):
        if fr == 0 and fc == 0:
            neighbour = padded[pad + r0 : pad + r0 + H, pad + c0 : pad + c0 + W]
            yield cv2.compare(neighbour, gray, cv2.CMP_GE)
            continue
        if padded_f is None:
            padded_f = padded.astype(np.float64)
            centre = gray * float(_UNIT * _UNIT)
            buf = np.empty_like(padded_f)
        u, v = _UNIT - fr, _UNIT - fc
        kernel = np.array([[u * v, u * fc], [fr * v, fr * fc]], dtype=np.float64)
        # 2x2 correlation, anchor top-left: buf[y, x] = sum kernel[i, j] * padded[y + i, x + j]
        cv2.filter2D(
            padded_f, cv2.CV_64F, kernel, dst=buf, anchor=(0, 0), borderType=cv2.BORDER_CONSTANT
        )
        window = buf[pad + r0 : pad + r0 + H, pad + c0 : pad + c0 + W]
        yield cv2.compare(window, centre, cv2.CMP_GE)


def lbp_codes(gray: np.ndarray, P: int, R: float, method: str) -> np.ndarray:
    """(H, W) integer LBP codes in ``0..lbp_n_bins(P, method) - 1`` (skimage's definitions).

    For P <= 16 the default code is accumulated bytewise (``code |= mask & 2**i``) and mapped
    through :func:`code_lut`; larger P (uniform / nri_uniform only) use
    :func:`codes_from_bits`.
    """
    if P > _MAX_P_LUT:
        bits = np.stack([mask != 0 for mask in lbp_planes(gray, P, R)])
        return codes_from_bits(bits, method)
    n_bytes = 1 if P <= 8 else 2
    code_bytes = np.zeros((*gray.shape, n_bytes), dtype=np.uint8)  # little-endian code
    for i, mask in enumerate(lbp_planes(gray, P, R)):
        byte = code_bytes[..., i // 8]
        np.bitwise_or(byte, mask & (1 << (i % 8)), out=byte)
    code = code_bytes.view("<u2" if n_bytes == 2 else np.uint8)[..., 0]
    if method == "default":
        return code
    lut = code_lut(P, method)
    if n_bytes == 1:
        return cv2.LUT(np.ascontiguousarray(code), lut)
    return lut[code]


@register_descriptor
class LBP(Descriptor):
    """Micro-texture: histogram of local binary patterns (P neighbours on a circle of radius R).

    ``method``: ``uniform`` (rotation-invariant uniform patterns, P + 2 bins, the default),
    ``ror`` (all rotation-invariant patterns, one bin per class), ``nri_uniform``
    (non-rotation-invariant uniform, P(P-1) + 3 bins) or ``default`` (raw codes, 2**P bins,
    P <= 16). Invariant to brightness and contrast changes; the histogram sums to 1. Codes are
    skimage's ``local_binary_pattern`` codes (``ror`` renumbered densely), with exact ties
    between an interpolated neighbour and the centre counted as >= (skimage leaves those to
    float rounding).
    """

    name = "lbp"
    default_metric = "chi2"
    nonnegative = True

    def __init__(self, P: int = 8, R: float = 1.0, method: str = "uniform") -> None:
        if not isinstance(method, str) or method.lower() not in LBP_METHODS:
            raise ValueError(f"method must be one of {', '.join(LBP_METHODS)}, got {method!r}")
        self.method = method.lower()
        high = _MAX_P_LUT if self.method in ("default", "ror") else _MAX_P
        if not is_int(P) or not 2 <= P <= high:
            raise ValueError(
                f"P (number of neighbours) must be an integer in 2..{high} for method "
                f"{self.method!r}, got {P!r}"
            )
        self.P = int(P)
        if (
            not isinstance(R, int | float | np.integer | np.floating)
            or isinstance(R, bool)
            or not 0 < R <= _MAX_R
        ):
            raise ValueError(f"R (radius in pixels) must be a number in (0, {_MAX_R:g}], got {R!r}")
        self.R = float(R)

    @property
    def dim(self) -> int:
        """Number of pattern bins: P + 2 for uniform, P(P-1) + 3 for nri_uniform, ..."""
        return lbp_n_bins(self.P, self.method)

    @property
    def input_spec(self) -> InputSpec:
        """Grayscale, at most 256 px a side (R is in pixels of that image)."""
        return InputSpec(mode="L", max_side=256)

    def transform_one(self, image: np.ndarray) -> np.ndarray:
        """Normalised histogram of the codes, exactly ``dim`` bins."""
        codes = lbp_codes(as_gray_uint8(image), self.P, self.R, self.method)
        hist = np.bincount(codes.ravel(), minlength=self.dim).astype(np.float64)
        return (hist / codes.size).astype(np.float32)
