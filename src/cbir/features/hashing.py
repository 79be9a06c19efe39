"""Perceptual hashes: average, difference, DCT and wavelet hashes of a small grayscale image.

Each descriptor outputs the hash bits as a float32 0/1 vector of ``hash_size ** 2`` entries
(the store keeps float32 vectors) and compares them with the ``hamming`` metric. Two images
whose hashes differ in a few bits look alike; :mod:`cbir.duplicates` uses them to find near
duplicates (recompressed, resized, lightly edited copies).

The definitions are those of the ``imagehash`` library (4.3), operation for operation: the
grayscale image is shrunk with Pillow's Lanczos filter to a tiny square, then
``ahash`` thresholds pixels at their mean, ``dhash`` compares horizontal neighbours, ``phash``
thresholds the low-frequency corner of a 2-D DCT-II at its median and ``whash`` thresholds the
Haar LL band at its median after removing the image mean. For the same grayscale array the bits
equal ``imagehash.<kind>(PIL.Image.fromarray(array))`` exactly (the tests check it). We do not
call ``imagehash`` itself: it hashes one PIL image at a time and wraps each result in an object,
while ``transform`` gets a whole chunk of images, so here only the Lanczos resize runs per image
and the arithmetic (mean, DCT, wavelet transform, median) runs once over the stacked chunk.
That keeps ``imagehash`` a test-only reference; ``whash`` needs PyWavelets at run time.

What is hashed differs from ``imagehash`` on a file: indexing decodes a file once at the small
size its hashes ask for (a JPEG in draft mode, then a box shrink to ``input_spec``), not at
full size, so a collection's hash of a file can differ from ``imagehash``'s hash of the same
file by several bits (most for ``phash``, whose DCT sees the fine structure the shrink
averages). Near-duplicate search compares hashes made the same way on both sides, so it is
not affected; a user who compares cbir's hashes with another tool's should hash the same
decoded array (``transform``), not the file.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from cbir.features.base import Descriptor
from cbir.features.inputs import as_gray_uint8, check_positive_int
from cbir.features.registry import register_descriptor
from cbir.images import InputSpec

#: Longest side the pipeline hands a hash (at least): enough detail for a Lanczos shrink to the
#: hash grid, and small enough that JPEGs decode in draft mode at 1/8 scale.
MIN_INPUT_SIDE = 64
#: Largest accepted ``hash_size`` (4096 bits); larger grids would need full-size decoding.
MAX_HASH_SIZE = 64


def lanczos_grid(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The grey image resized to ``size`` = (width, height) with Pillow's Lanczos filter, as
    ``imagehash`` does (its ``ANTIALIAS``): any aspect ratio is squashed to the grid."""
    gray = Image.fromarray(as_gray_uint8(image))
    return np.asarray(gray.resize(size, Image.Resampling.LANCZOS))


def _check_hash_size(value: object, power_of_two: bool = False) -> int:
    size = check_positive_int("hash_size", value, low=2, high=MAX_HASH_SIZE)
    if power_of_two and size & (size - 1):
        raise ValueError(f"hash_size must be a power of 2 for whash, got {size}")
    return size


class _ImageHash(Descriptor):
    """Shared plumbing: resize each image to ``grid`` with Lanczos, then ``bits`` on the stack."""

    default_metric = "hamming"
    nonnegative = True
    binary = True  # 0/1 bits: the hamming metric applies
    hash_size: int

    @property
    def dim(self) -> int:
        """hash_size ** 2 bits."""
        return self.hash_size**2

    @property
    def grid(self) -> tuple[int, int]:
        """(width, height) of the Lanczos-resized image the bits are computed from."""
        raise NotImplementedError

    @property
    def input_spec(self) -> InputSpec:
        """Grey, longer side at most max(64, 2 x grid): JPEG draft decoding then does almost
        all the reduction. The Lanczos shrink from there sees less detail than from the full
        image, so the bits may differ from a full-size hash (module docstring)."""
        return InputSpec(mode="L", max_side=max(MIN_INPUT_SIDE, 2 * max(self.grid)))

    def bits(self, grids: np.ndarray) -> np.ndarray:
        """(n, h, w) uint8 resized images to (n, hash_size, hash_size) booleans."""
        raise NotImplementedError

    def transform(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Resize each image (Pillow), then compute all the hashes in one vectorised pass."""
        n = len(images)
        if n == 0:
            return np.empty((0, self.dim), dtype=self.dtype)
        grids = np.stack([lanczos_grid(image, self.grid) for image in images])
        return self.bits(grids).reshape(n, self.dim).astype(self.dtype)

    def transform_one(self, image: np.ndarray) -> np.ndarray:
        """The hash bits of one image (row-major over the hash grid)."""
        return self.transform([image])[0]


@register_descriptor
class AverageHash(_ImageHash):
    """Average hash: which cells of an 8x8 grey thumbnail are brighter than its mean.

    The cheapest hash; robust to recompression, scaling and uniform brightness changes, but
    a global contrast or gamma change can flip many bits (``phash`` is more robust).
    """

    name = "ahash"
    aliases = ("average-hash",)

    def __init__(self, hash_size: int = 8) -> None:
        self.hash_size = _check_hash_size(hash_size)

    @property
    def grid(self) -> tuple[int, int]:
        """hash_size x hash_size."""
        return (self.hash_size, self.hash_size)

    def bits(self, grids: np.ndarray) -> np.ndarray:
        """pixel > mean of its thumbnail (``imagehash.average_hash``)."""
        mean = grids.mean(axis=(1, 2), keepdims=True)  # float64: exact for these integer sums
        return grids > mean


@register_descriptor
class DifferenceHash(_ImageHash):
    """Difference hash: whether each pixel of a 9x8 thumbnail is brighter than its left neighbour.

    Encodes horizontal gradients, so it ignores brightness and contrast changes.
    """

    name = "dhash"
    aliases = ("difference-hash",)

    def __init__(self, hash_size: int = 8) -> None:
        self.hash_size = _check_hash_size(hash_size)

    @property
    def grid(self) -> tuple[int, int]:
        """(hash_size + 1) wide, hash_size high."""
        return (self.hash_size + 1, self.hash_size)

    def bits(self, grids: np.ndarray) -> np.ndarray:
        """right > left for each horizontal pair (``imagehash.dhash``)."""
        return grids[:, :, 1:] > grids[:, :, :-1]


@register_descriptor
class PerceptualHash(_ImageHash):
    """Perceptual hash: signs of the low-frequency DCT of a 32x32 thumbnail around their median.

    The usual choice for near-duplicates: robust to recompression, resizing, small crops,
    brightness, contrast and gamma changes. ``highfreq_factor`` sets the thumbnail to
    ``hash_size * highfreq_factor`` pixels, of which the lowest ``hash_size`` frequencies count.
    """

    name = "phash"
    aliases = ("perceptual-hash", "dct-hash")

    def __init__(self, hash_size: int = 8, highfreq_factor: int = 4) -> None:
        self.hash_size = _check_hash_size(hash_size)
        self.highfreq_factor = check_positive_int("highfreq_factor", highfreq_factor, high=16)

    @property
    def grid(self) -> tuple[int, int]:
        """hash_size * highfreq_factor square."""
        side = self.hash_size * self.highfreq_factor
        return (side, side)

    def bits(self, grids: np.ndarray) -> np.ndarray:
        """Low-frequency DCT-II coefficients > their median (``imagehash.phash``)."""
        from scipy import fft

        h = self.hash_size
        coefficients = fft.dct(fft.dct(grids, axis=1), axis=2)[:, :h, :h]
        median = np.median(coefficients.reshape(len(grids), -1), axis=1)
        return coefficients > median[:, None, None]


@register_descriptor
class WaveletHash(_ImageHash):
    """Wavelet hash: Haar LL band of a grey thumbnail (mean removed) above its median.

    Like ``ahash`` on block means, but the mean removal and median threshold give each image
    half its bits set. ``image_scale`` (a power of 2) is the thumbnail side; fixed, unlike
    ``imagehash``'s default, so the hash does not depend on the input's size or aspect ratio.
    """

    name = "whash"
    aliases = ("wavelet-hash",)

    def __init__(self, hash_size: int = 8, image_scale: int = 32) -> None:
        self.hash_size = _check_hash_size(hash_size, power_of_two=True)
        scale = check_positive_int("image_scale", image_scale, low=2, high=4 * MAX_HASH_SIZE)
        if scale & (scale - 1) or scale < self.hash_size:
            raise ValueError(
                f"image_scale must be a power of 2 and at least hash_size ({self.hash_size}), "
                f"got {scale}"
            )
        self.image_scale = scale

    @property
    def grid(self) -> tuple[int, int]:
        """image_scale square."""
        return (self.image_scale, self.image_scale)

    def bits(self, grids: np.ndarray) -> np.ndarray:
        """``imagehash.whash(mode="haar", remove_max_haar_ll=True)`` on the whole stack."""
        import pywt

        axes = (1, 2)
        pixels = grids / 255.0
        top_level = int(np.log2(self.image_scale))
        coeffs = pywt.wavedec2(pixels, "haar", level=top_level, axes=axes)
        coeffs[0] *= 0  # drop the overall mean (the coarsest LL coefficient)
        pixels = pywt.waverec2(coeffs, "haar", axes=axes)
        level = top_level - int(np.log2(self.hash_size))
        low = pywt.wavedec2(pixels, "haar", level=level, axes=axes)[0]
        median = np.median(low.reshape(len(grids), -1), axis=1)
        return low > median[:, None, None]
