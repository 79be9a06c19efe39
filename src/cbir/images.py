"""The only code that opens image files.

It reads files (:func:`read_file`), decodes every format Pillow reads, applies EXIF orientation,
normalises the mode, enforces size limits (:class:`Limits`) and turns a decoded image into the
array a descriptor asks for. Anything it cannot use becomes an :class:`ImageError` whose
``reason`` a user can read.

Why reading is safe: only regular files are read, and what is checked is the file actually
opened (``fstat`` of the open descriptor), so a path swapped for a FIFO or a device after it was
looked at is still refused. The open is non-blocking, so a FIFO without a writer cannot hang the
caller, and it never makes a terminal the controlling one. A file over the byte cap is refused
from its size before any byte is read, and the read itself stops one byte past the cap, so a file
that grows while it is read cannot make it allocate more than the cap allows. Its first bytes
are read alone: when no format Pillow reads claims them, the file is refused without reading the
rest, so a huge file that is no image (a disk image named ``.jpg``) costs one small read.

Why decoding is bounded: before any pixel is decoded, the size in the header is checked against
``max_pixels``, and the bytes the decode will allocate (pixels x bytes per pixel, as Pillow
stores the mode, after a JPEG's reduced-scale draft) against ``max_decode_bytes``; high bit
depths are stretched to 8 bits block by block, never as a full-size float copy, and a large image
of a format without a draft is box-reduced to about the size the descriptors need before its mode
is converted or it is copied. A JPEG whose header claims far more pixels than its data could hold
is refused as truncated, because the decoder would silently fill the missing part with grey.
Pillow's warnings (a corrupt EXIF block) do not reach stderr: they become notes on the image
(``image.info["notes"]``).
"""

from __future__ import annotations

import io
import numbers
import os
import re
import stat
import struct
import sys
import threading
import warnings
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np
from PIL import EpsImagePlugin, Image, ImageFile, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 200_000_000
#: Files over this many bytes are refused before they are read (an uncompressed 200-megapixel
#: RGB TIFF is 600 MB).
DEFAULT_MAX_BYTES = 1 << 30
#: A decode may allocate at most this many bytes (Pillow holds an RGB pixel in 4 bytes, so a
#: 200-megapixel RGB image needs 800 MB).
DEFAULT_MAX_DECODE_BYTES = 1 << 30
#: Bytes read first, alone, to see whether the file may be an image at all (Pillow identifies a
#: format from its first 16 bytes).
SNIFF_BYTES = 1 << 16
_ID_BYTES = 16
#: Pixels stretched at a time from a high bit depth to 8 bits (bounds the float temporaries).
STRETCH_BLOCK_PIXELS = 1 << 20
#: Bytes per pixel of each mode as Pillow stores it in memory (every other mode takes 4).
_PIXEL_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}
_OTHER_PIXEL_BYTES = 4
#: The least a complete Huffman-coded JPEG spends on an 8x8 block of luma: a DC code and an
#: end-of-block code of at least one bit each (a flat block in an optimised table). A file with
#: fewer bytes than this for its header's size is mostly missing, however plain the picture.
MIN_JPEG_BITS_PER_BLOCK = 2
_JPEG_BLOCK = 8
_BITS_PER_BYTE = 8


class ImageError(Exception):
    """An image file that cannot be used; ``reason`` says why in words a user understands.

    ``file_stat`` is the file's status when it was looked at before being refused (a file too
    large, not a regular file), so a caller can record its size and time and not retry it until
    it changes; None when the file could not be looked at.
    """

    def __init__(
        self, reason: str, path: str | None = None, *, file_stat: os.stat_result | None = None
    ) -> None:
        super().__init__(reason if path is None else f"{path}: {reason}")
        self.reason = reason
        self.path = path
        self.file_stat = file_stat


#: setting -> (environment variable, unit), for the messages of :class:`Limits`
_LIMIT_SETTINGS = {
    "max_pixels": ("CBIR_MAX_PIXELS", "pixels"),
    "max_bytes": ("CBIR_MAX_BYTES", "bytes"),
    "max_decode_bytes": ("CBIR_MAX_DECODE_BYTES", "bytes"),
}


@dataclass(frozen=True)
class Limits:
    """What one image may cost: ``max_pixels`` decoded pixels, ``max_bytes`` bytes of file and
    ``max_decode_bytes`` bytes allocated by its decode.

    Larger images are refused (skipped when indexing) with a reason naming the limit. Each must
    be a whole number of at least 1; anything else is a ``ValueError`` naming the setting, its
    environment variable and the allowed range.
    """

    max_pixels: int = DEFAULT_MAX_PIXELS
    max_bytes: int = DEFAULT_MAX_BYTES
    max_decode_bytes: int = DEFAULT_MAX_DECODE_BYTES

    def __post_init__(self) -> None:
        for name, (env, unit) in _LIMIT_SETTINGS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(
                    f"{name} ({env}) must be a whole number of {unit}, 1 or more; got {value!r}"
                )
            object.__setattr__(self, name, int(value))


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class InputSpec:
    """What a descriptor wants to see.

    ``mode`` is ``"RGB"`` (H x W x 3 uint8) or ``"L"`` (H x W uint8). ``size`` is an exact
    ``(width, height)`` resize (e.g. HOG); otherwise ``max_side`` shrinks the image so its longer
    side is at most that many pixels (never enlarging); ``None`` keeps the decoded size.
    """

    mode: Literal["RGB", "L"] = "RGB"
    max_side: int | None = 256
    size: tuple[int, int] | None = None

    @property
    def decode_side(self) -> int | None:
        """The smallest longer side the decoder must deliver for this spec (None: full size)."""
        if self.size is not None:
            return max(self.size)
        return self.max_side


# --------------------------------------------------------------------------------------------
# Which files are images
# --------------------------------------------------------------------------------------------


def _openable_extensions() -> frozenset[str]:
    """Extensions of the formats Pillow can actually decode here (not merely identify)."""
    extensions = Image.registered_extensions()  # also imports every plugin
    formats = set()
    for name, (factory, _accept) in Image.OPEN.items():
        # Stub plugins (BUFR, GRIB, HDF5, WMF off Windows) identify a file but cannot decode it.
        if isinstance(factory, type) and issubclass(factory, ImageFile.StubImageFile):
            continue
        formats.add(name)
    if "JPEG" in formats:
        formats.add("MPO")  # multi-picture JPEGs are opened by the JPEG plugin
    formats.discard("MPEG")  # identify-only: Pillow has no MPEG decoder
    if not EpsImagePlugin.has_ghostscript():
        formats.discard("EPS")  # EPS is rasterised by Ghostscript, which is not installed
    return frozenset(ext.lower() for ext, fmt in extensions.items() if fmt in formats)


#: Lower-case extensions (with the dot) of the formats Pillow can decode: used to pick the image
#: files in a folder, so a folder of photos does not produce an error for every ``.txt`` beside
#: them, and formats Pillow only identifies are left out.
IMAGE_EXTENSIONS: frozenset[str] = _openable_extensions()


# --------------------------------------------------------------------------------------------
# Pillow's decompression-bomb guard
# --------------------------------------------------------------------------------------------

_guard_lock = threading.Lock()
_guard_limits: list[int] = []
_guard_saved: list[tuple[int | None, warnings.catch_warnings]] = []
#: The notes of the decode running in this thread (``notes.items``), while one runs.
_notes = threading.local()


def _note_or_show(show: Callable[..., None]) -> Callable[..., None]:
    """A ``warnings.showwarning`` that keeps a warning raised by a decode of this thread as a
    note on its image, and shows any other warning as ``show`` would."""

    def showwarning(message: Warning | str, category: type[Warning], *args: object,
                    **kwargs: object) -> None:  # fmt: skip
        items = getattr(_notes, "items", None)
        if items is None:
            show(message, category, *args, **kwargs)
        else:
            items.append(" ".join(str(message).split()))

    return showwarning


@contextmanager
def _pillow_guard(max_pixels: int) -> Iterator[None]:
    """Make Pillow's decompression-bomb guard enforce ``max_pixels`` while we decode.

    Pillow's guard is a module global checked inside ``Image.open`` (and again for GIF frames and
    TIFF tiles during loading): a warning above ``MAX_IMAGE_PIXELS`` and an error above twice
    that. Its default (~89 MP) is below :data:`DEFAULT_MAX_PIXELS`, so left alone it would refuse
    images our limit allows, and its warning would let oversized images through. So while we
    decode, the limit is ours and the warning is an error; Pillow's other warnings (every one,
    not once per place) are kept as notes of the decode that raised them. The first caller in
    saves Pillow's state and the last one out restores it, so concurrent decodes cannot leave it
    changed; while several decode at once the largest of their limits applies and each still
    checks its own.
    """
    with _guard_lock:
        if not _guard_limits:
            scope = warnings.catch_warnings()
            scope.__enter__()
            warnings.simplefilter("always", UserWarning)
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            warnings.showwarning = _note_or_show(warnings.showwarning)
            _guard_saved.append((Image.MAX_IMAGE_PIXELS, scope))
        _guard_limits.append(max_pixels)
        Image.MAX_IMAGE_PIXELS = max(_guard_limits)
    try:
        yield
    finally:
        with _guard_lock:
            _guard_limits.remove(max_pixels)
            if _guard_limits:
                Image.MAX_IMAGE_PIXELS = max(_guard_limits)
            else:
                saved, scope = _guard_saved.pop()
                Image.MAX_IMAGE_PIXELS = saved
                scope.__exit__(None, None, None)


def _megapixels(pixels: int) -> str:
    mp = pixels / 1e6
    return f"{mp:.1f}".removesuffix(".0") if mp >= 1 else f"{mp:.2g}"


def _too_big(pixels: int, max_pixels: int, dims: tuple[int, int] | None = None) -> str:
    what = f"{dims[0]}x{dims[1]} = " if dims else ""
    return (
        f"image is {what}{_megapixels(pixels)} megapixels, over the limit of "
        f"{_megapixels(max_pixels)} megapixels (set max_pixels / CBIR_MAX_PIXELS to allow it)"
    )


def _bomb_reason(exc: Exception, max_pixels: int) -> str:
    """Pillow's bomb error/warning in our words.

    Pillow raises inside ``Image.open`` before the caller sees the header, and its message has
    the pixel count but not the width and height, so the reason gives the count only.
    """
    match = re.search(r"\((\d+) pixels\)", str(exc))
    if match:
        return _too_big(int(match.group(1)), max_pixels)
    return f"image is over the limit of {_megapixels(max_pixels)} megapixels ({exc})"


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------

_NOT_AN_IMAGE = "not an image file Pillow can read"
_DRAFT_FORMATS = frozenset({"JPEG", "MPO"})
_HIGH_DEPTH_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I", "F"})
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
# Errors Pillow raises for data that ends early or does not follow the format.
_CORRUPT_ERRORS = (OSError, SyntaxError, EOFError, struct.error, zlib.error)


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def decode(
    data: bytes,
    *,
    max_side: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_decode_bytes: int = DEFAULT_MAX_DECODE_BYTES,
    shrink: bool = True,
) -> Image.Image:
    """Decode image file bytes to an RGB image, ready for :func:`to_array`.

    Takes bytes, not a path, because the caller reads each file once, hashes the bytes and
    decodes the same bytes. The first frame of animations and multi-page files is used; EXIF
    orientation is applied; transparency is composited over white; every mode becomes 8-bit RGB.
    With ``max_side`` the longer side is shrunk to at most that (never enlarged), and JPEGs are
    decoded at a reduced DCT scale (draft mode), which skips most of the inverse DCT, colour
    conversion and resizing work (entropy decoding still reads the whole file).
    ``shrink=False`` stops after the draft decode (the longer side is then at least
    ``max_side``): for callers that resize anyway, as :func:`prepare_arrays` does, with a
    faster filter. ``image.info["original_size"]`` holds the full (oriented) size, and
    ``image.info["notes"]`` what Pillow warned about (e.g. a corrupt EXIF block), in words.
    Images over ``max_pixels``, or whose decode would allocate more than ``max_decode_bytes``,
    are refused from the header, before any pixel is decoded (see the module docstring).
    """
    if max_side is not None and max_side < 1:
        raise ValueError(f"max_side must be a positive number of pixels, got {max_side}")
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be positive, got {max_pixels}")
    if max_decode_bytes < 1:
        raise ValueError(f"max_decode_bytes must be positive, got {max_decode_bytes}")
    if len(data) == 0:
        raise ImageError("empty file (0 bytes)")
    _notes.items = []
    try:
        with _pillow_guard(max_pixels):
            image = _decode(
                data, max_side if shrink else None, max_pixels, max_decode_bytes, max_side
            )
        image.info["notes"] = _notes.items
        return image
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(_NOT_AN_IMAGE) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(_bomb_reason(exc, max_pixels)) from exc
    except _CORRUPT_ERRORS as exc:
        raise ImageError(f"truncated or corrupt image data: {_describe(exc)}") from exc
    except Exception as exc:  # anything else Pillow raises must still be a readable ImageError
        raise ImageError(f"cannot decode image: {type(exc).__name__}: {exc}") from exc
    finally:
        del _notes.items


def _decode(
    data: bytes, max_side: int | None, max_pixels: int, max_decode_bytes: int,
    draft_side: int | None,
) -> Image.Image:  # fmt: skip
    # Not closed with a ``with``: closing would invalidate the pixels the result may share
    # (copying them would double the peak), and an image read from bytes holds no file.
    im = Image.open(io.BytesIO(data))
    width, height = im.size
    # Pillow's guard in Image.open normally refuses first; this check applies (and names the
    # size) when a concurrent decode with a larger limit has raised Pillow's.
    if width * height > max_pixels:
        raise ImageError(_too_big(width * height, max_pixels, (width, height)))
    if im.format in _DRAFT_FORMATS:
        _check_jpeg_data(len(data), width, height)
        if draft_side is not None:
            _draft(im, draft_side)
    allocated = im.size[0] * im.size[1] * _PIXEL_BYTES.get(im.mode, _OTHER_PIXEL_BYTES)
    if allocated > max_decode_bytes:
        raise ImageError(
            f"decoding this {width}x{height} {im.mode} image would allocate {allocated} bytes, "
            f"over the limit of {max_decode_bytes} bytes (set max_decode_bytes / "
            "CBIR_MAX_DECODE_BYTES to allow it)"
        )
    im.load()
    stored = im.size  # after any draft reduction
    _apply_orientation(im)
    swapped = im.size != stored  # EXIF orientations 5-8 swap width and height
    reduce_to = None if im.format in _DRAFT_FORMATS else draft_side  # a draft did it already
    result = _shrink(_to_rgb(im, reduce_to), max_side)
    result.info["original_size"] = (height, width) if swapped else (width, height)
    return result


def _check_jpeg_data(n_bytes: int, width: int, height: int) -> None:
    """Refuse a JPEG whose file is too small to hold its header's size (see
    :data:`MIN_JPEG_BITS_PER_BLOCK`): the decoder would fill what is missing with grey."""
    blocks = -(-width // _JPEG_BLOCK) * -(-height // _JPEG_BLOCK)
    least = blocks * MIN_JPEG_BITS_PER_BLOCK // _BITS_PER_BYTE
    if n_bytes < least:
        raise ImageError(
            f"truncated image data: the header says {width}x{height}, which takes at least "
            f"{least} bytes, but the file has {n_bytes}: most of the image is missing"
        )


def _draft(im: ImageFile.ImageFile, max_side: int) -> None:
    """Ask the JPEG decoder for a 1/2, 1/4 or 1/8 DCT scale that keeps the longer side >= max_side.

    ``draft`` picks the largest scale s in (8, 4, 2, 1) with s <= min(W // w, H // h) for the
    requested (w, h), so the result is never smaller than requested. Asking for the image's own
    aspect ratio (not a square) lets a long panorama shrink as much as a square photo would. The
    request is in the stored (pre-EXIF) orientation, which is fine: rotation keeps the longer
    side's length, and :func:`_shrink` brings it down to exactly ``max_side`` afterwards.
    """
    width, height = im.size
    longer = max(width, height)
    if longer <= max_side:
        return
    request = (max(1, width * max_side // longer), max(1, height * max_side // longer))
    im.draft("RGB", request)


def _apply_orientation(im: Image.Image) -> None:
    """Apply EXIF orientation in place; a malformed EXIF block leaves the pixels as stored."""
    # Broken metadata is no reason to lose an otherwise fine image.
    with suppress(Exception):
        ImageOps.exif_transpose(im, in_place=True)


def _reduced(im: Image.Image, side: int | None) -> Image.Image:
    """Box-average ``im`` by the largest whole factor that keeps its longer side at least
    ``side``: what a JPEG's draft does while decoding, for the formats that have none, so a huge
    PNG or TIFF is converted and copied at about the size the descriptors need, not its own."""
    factor = 0 if side is None else max(im.size) // side
    return im.reduce(factor) if factor >= 2 else im


def _to_rgb(im: Image.Image, reduce_to: int | None = None) -> Image.Image:
    """Any Pillow mode to 8-bit RGB (transparency over white, high bit depths stretched);
    with ``reduce_to``, reduced (:func:`_reduced`) as early as gives the same pixels: grey and
    RGB before converting, other modes (alpha is composited per pixel) after."""
    if im.mode in _HIGH_DEPTH_MODES:
        im = _stretch_to_8bit(im)
    if im.mode in ("L", "RGB") and "transparency" not in im.info:
        im, reduce_to = _reduced(im, reduce_to), None
    return _reduced(_as_rgb(im), reduce_to)


def _as_rgb(im: Image.Image) -> Image.Image:
    mode = im.mode
    if mode in ("P", "L", "RGB", "1") and "transparency" in im.info:
        im, mode = im.convert("RGBA"), "RGBA"
    if mode in _ALPHA_MODES:
        if mode == "La":
            im = im.convert("LA")
        rgba = im.convert("RGBA")
        out = Image.new("RGB", rgba.size, (255, 255, 255))
        out.paste(rgba, mask=rgba)
        return out
    if mode == "RGB":
        return im
    return im.convert("RGB")


def _stretch_to_8bit(im: Image.Image) -> Image.Image:
    """Min-max stretch a 16/32-bit integer or float image to 8-bit grey.

    A fixed shift (16 -> 8 bits) would make the common 12-bit scientific and medical data stored
    in 16-bit containers nearly black, and float images have no fixed range at all; stretching
    each image's own range maps its darkest pixel to 0 and brightest to 255. A constant image
    becomes 0. NaN is treated as the minimum and infinities are clipped.
    """
    return Image.fromarray(_stretch_array(np.asarray(im)))


def _stretch_array(array: np.ndarray) -> np.ndarray:
    """The min-max stretch of :func:`_stretch_to_8bit` on an array of any shape and dtype,
    :data:`STRETCH_BLOCK_PIXELS` at a time (a full-size float copy of a 14,000² 16-bit image
    would be 800 MB, and each step of the arithmetic another)."""
    flat = np.ascontiguousarray(array).reshape(-1)
    blocks = range(0, len(flat), STRETCH_BLOCK_PIXELS)
    lo, hi = np.inf, -np.inf
    for start in blocks:
        values = flat[start : start + STRETCH_BLOCK_PIXELS].astype(np.float32)
        values = values[np.isfinite(values)]
        if values.size:
            lo, hi = min(lo, float(values.min())), max(hi, float(values.max()))
    out = np.zeros(len(flat), dtype=np.uint8)
    if hi > lo:
        scale = np.float32(255.0 / (hi - lo))
        for start in blocks:
            scaled = flat[start : start + STRETCH_BLOCK_PIXELS].astype(np.float32)
            scaled -= np.float32(lo)
            scaled *= scale
            np.nan_to_num(scaled, copy=False, nan=0.0, posinf=255.0, neginf=0.0)
            np.clip(scaled, 0.0, 255.0, out=scaled)
            out[start : start + STRETCH_BLOCK_PIXELS] = np.rint(scaled, out=scaled)
    return out.reshape(array.shape)


def _fit(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    """``size`` scaled so its longer side is ``max_side`` (callers ensure it is larger)."""
    width, height = size
    scale = max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _shrink(im: Image.Image, max_side: int | None) -> Image.Image:
    """Shrink so the longer side is <= max_side (never enlarging), as ``thumbnail`` does.

    Bicubic with ``reducing_gap=2``: Pillow first box-reduces by an integer factor (fast on
    large non-JPEG images, which get no draft) and resamples the rest with an antialiased
    bicubic filter: faster than Lanczos at the same job, with no visible difference at the
    factors left after a JPEG draft.
    """
    if max_side is None or max(im.size) <= max_side:
        return im
    return im.resize(_fit(im.size, max_side), Image.Resampling.BICUBIC, reducing_gap=2.0)


def from_array(array: np.ndarray) -> Image.Image:
    """An in-memory image (H x W grey, H x W x 3 RGB or H x W x 4 RGBA; any integer or float
    dtype) as the RGB image :func:`decode` would give, for data sets that ship arrays."""
    a = np.asarray(array)
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (1, 3, 4)) or a.size == 0:
        raise ImageError(f"not an image array: shape {a.shape}")
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.dtype != np.uint8:
        a = _stretch_array(a)
    image = Image.fromarray(np.ascontiguousarray(a))
    image = _to_rgb(image)
    image.info["original_size"] = image.size
    return image


def load(
    path: str | os.PathLike[str],
    *,
    max_side: int | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> Image.Image:
    """:func:`read_file` and :func:`decode`; errors carry the path (for queries and tools)."""
    name = os.fspath(path)
    try:
        data, _ = read_file(name, limits.max_bytes)
        return decode(
            data,
            max_side=max_side,
            max_pixels=limits.max_pixels,
            max_decode_bytes=limits.max_decode_bytes,
        )
    except ImageError as exc:
        raise ImageError(exc.reason, name, file_stat=exc.file_stat) from exc


# --------------------------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------------------------

_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
#: Read-only; a FIFO opens at once instead of waiting for a writer; a terminal never becomes the
#: controlling one; binary on Windows. A flag the platform lacks is 0. (``os.open`` already makes
#: the descriptor non-inheritable.)
_OPEN_FLAGS = os.O_RDONLY | _NONBLOCK | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_BINARY", 0)
#: Bytes asked for by each read once a file has grown past its size, looking for its end.
_READ_BLOCK = 1 << 16
_KILO = 1000
_UNITS = ("bytes", "kB", "MB", "GB", "TB", "PB")
_FILE_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)
_RAISE_BYTES = "set max_bytes / CBIR_MAX_BYTES to allow it"


def _os_reason(exc: OSError) -> str:
    return f"cannot read file: {exc.strerror or exc}"


def _not_regular(mode: int) -> str:
    kind = next((name for test, name in _FILE_KINDS if test(mode)), "a special file")
    return f"not a regular file ({kind})"


def _bytes_text(n: int) -> str:
    """``1073741824 bytes (1.1 GB)``: exact, for the setting, and readable."""
    value, unit = float(n), 0
    while value >= _KILO and unit < len(_UNITS) - 1:
        value, unit = value / _KILO, unit + 1
    return f"{n} bytes" if unit == 0 else f"{n} bytes ({value:.1f} {_UNITS[unit]})"


def read_file(path: str | os.PathLike[str], max_bytes: int) -> tuple[bytes, os.stat_result]:
    """The bytes of a regular file of at most ``max_bytes`` bytes, and its status.

    Refused with an :class:`ImageError` (never blocking, never reading): a missing or unreadable
    file, a directory, FIFO, device or socket, and a file larger than ``max_bytes`` (from its
    size). The path is looked at first so special files are not even opened (opening some
    devices has effects); then it is opened non-blocking and the open descriptor is checked
    again, which is what decides, so a file replaced between the two looks is still refused.
    At most ``max_bytes + 1`` bytes are read, so a file that grows while it is read is refused
    without reading the rest. The status returned is the open file's, taken before reading: if
    the file changes while it is read, its recorded time is older than the change, so the next
    run sees it changed.
    """
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, numbers.Integral) or max_bytes < 1:
        raise ValueError(f"max_bytes must be a whole number of bytes, 1 or more; got {max_bytes!r}")
    name = os.fspath(path)
    try:
        looked = os.stat(name)
        if not stat.S_ISREG(looked.st_mode):
            raise ImageError(_not_regular(looked.st_mode), file_stat=looked)
        _check_size(looked, max_bytes)
        fd = os.open(name, _OPEN_FLAGS)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ImageError(
                    f"{_not_regular(st.st_mode)}; it was replaced while being opened",
                    file_stat=st,
                )
            _check_size(st, max_bytes)
            if _NONBLOCK:
                os.set_blocking(fd, True)  # regular files ignore it on Linux; not everywhere
            return _read_at_most(fd, st, max_bytes), st
        finally:
            os.close(fd)
    except OSError as exc:
        raise ImageError(_os_reason(exc)) from exc


def _check_size(st: os.stat_result, max_bytes: int) -> None:
    if st.st_size > max_bytes:
        raise ImageError(
            f"file is {_bytes_text(st.st_size)}, over the limit of {_bytes_text(max_bytes)} "
            f"({_RAISE_BYTES})",
            file_stat=st,
        )


def _might_be_image(head: bytes) -> bool:
    """Whether some format Pillow reads claims a file that starts with ``head``: its quick
    check of the first bytes, or, for the few formats without one (TGA, IM, SPIDER...), their
    header parsed from ``head``."""
    prefix = head[:_ID_BYTES]
    unclaimed = []
    for name in Image.ID:
        _factory, accept = Image.OPEN[name]
        if accept is None:
            unclaimed.append(name)
        elif accept(prefix):
            return True
    try:
        with _pillow_guard(sys.maxsize):  # the header only: no pixel limit to apply here
            Image.open(io.BytesIO(head), formats=unclaimed).close()
    except UnidentifiedImageError:
        return False
    except Exception:  # a header that claims the file but looks odd: let decode say why
        return True
    return True


def _read_at_most(fd: int, st: os.stat_result, max_bytes: int) -> bytes:
    """Read to the end of the file, but never more than ``max_bytes + 1`` bytes in all; the
    first :data:`SNIFF_BYTES` alone, refused at once when no format claims them."""
    cap = max_bytes + 1
    head = os.read(fd, min(SNIFF_BYTES, cap))
    if head and not _might_be_image(head):
        raise ImageError(_NOT_AN_IMAGE, file_stat=st)
    chunks: list[bytes] = [head]
    total = len(head)
    # one more than expected: the end of the file in one read, usually
    want = st.st_size - total + 1 if total <= st.st_size else _READ_BLOCK
    while head and total < cap:
        chunk = os.read(fd, min(want, cap - total))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
        # the rest of what is expected plus one; past that (it grew), whole blocks
        want = st.st_size - total + 1 if total <= st.st_size else _READ_BLOCK
    if total > max_bytes:
        raise ImageError(
            f"file grew past the limit of {_bytes_text(max_bytes)} while being read "
            f"({_RAISE_BYTES})",
            file_stat=st,
        )
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)  # the head alone: no copy


# --------------------------------------------------------------------------------------------
# Arrays for descriptors
# --------------------------------------------------------------------------------------------


def _target_size(size: tuple[int, int], spec: InputSpec) -> tuple[int, int]:
    if spec.size is not None:
        width, height = spec.size
        if width < 1 or height < 1:
            raise ValueError(f"InputSpec.size must be positive, got {spec.size}")
        return int(width), int(height)
    if spec.max_side is not None:
        if spec.max_side < 1:
            raise ValueError(f"InputSpec.max_side must be positive, got {spec.max_side}")
        if max(size) > spec.max_side:
            return _fit(size, spec.max_side)
    return size


def _base_array(image: Image.Image) -> np.ndarray:
    """The image as an RGB or L array (decode returns RGB; this covers images made elsewhere)."""
    return np.asarray(image if image.mode in ("RGB", "L") else _to_rgb(image))


def _resized(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize with OpenCV: an integer box reduction, then bilinear for what is left.

    OpenCV's area averaging is fast only for whole-number factors (for others, such as 640x480
    to 256x192, it takes longer than the JPEG decode itself). So a
    shrink by a factor f first averages k x k blocks (k = floor(f), after cropping fewer than k
    edge pixels) and then resamples the remaining factor, below 2, bilinearly, which aliases
    little at such factors; the same two-step plan as Pillow's ``reducing_gap``.
    """
    height, width = array.shape[:2]
    if (width, height) == size:
        return array
    k = min(width // size[0], height // size[1])
    if k >= 2:
        array = array[: height - height % k, : width - width % k]
        reduced = (array.shape[1] // k, array.shape[0] // k)
        array = cv2.resize(array, reduced, interpolation=cv2.INTER_AREA)
        if reduced == size:
            return array
    return cv2.resize(array, size, interpolation=cv2.INTER_LINEAR)


def _in_mode(array: np.ndarray, mode: str) -> np.ndarray:
    """Read-only C-contiguous uint8 array in ``mode``: shared, so no descriptor may write it."""
    if mode not in ("RGB", "L"):
        raise ValueError(f"InputSpec.mode must be 'RGB' or 'L', got {mode!r}")
    if (array.ndim == 3) != (mode == "RGB"):
        array = np.asarray(Image.fromarray(array).convert(mode))  # Pillow's ITU-R 601-2 luma
    array = np.ascontiguousarray(array, dtype=np.uint8)
    array.flags.writeable = False
    return array


def to_array(image: Image.Image, spec: InputSpec) -> np.ndarray:
    """The array one descriptor wants: (H, W, 3) for "RGB", (H, W) for "L", uint8, read-only.

    ``spec.size`` resizes to exactly (width, height); otherwise the longer side is shrunk to
    ``spec.max_side`` if larger (never enlarged). The result is read-only because
    :func:`prepare_arrays` hands the same array to every descriptor with the same spec.
    """
    return prepare_arrays(image, [spec])[0]


def prepare_arrays(image: Image.Image, specs: Sequence[InputSpec]) -> list[np.ndarray]:
    """One decoded image to the arrays for several descriptors, in the order of ``specs``.

    Several descriptors usually want the same thing (RGB or grey at 256 px), so each distinct
    result is computed once and the same read-only array object is returned for each of them;
    an "L" spec reuses the resize of an "RGB" spec of the same size. The arrays equal what
    :func:`to_array` returns for each spec.
    """
    base = _base_array(image)
    base_size = (base.shape[1], base.shape[0])
    resized: dict[tuple[int, int], np.ndarray] = {}
    arrays: dict[tuple[str, tuple[int, int]], np.ndarray] = {}
    gray_base: np.ndarray | None = None
    out: list[np.ndarray] = []
    for spec in specs:
        size = _target_size(base_size, spec)
        key = (spec.mode, size)
        if key not in arrays:
            if (
                spec.mode == "L"
                and base.ndim == 3
                and size[0] * size[1] > base.shape[0] * base.shape[1]
            ):
                # Enlarging (e.g. 32 px CIFAR to HOG's 128 px): go grey first, a third the work.
                gray_base = _in_mode(base, "L") if gray_base is None else gray_base
                arrays[key] = _in_mode(_resized(gray_base, size), "L")
            else:
                if size not in resized:
                    resized[size] = _resized(base, size)
                arrays[key] = _in_mode(resized[size], spec.mode)
        out.append(arrays[key])
    return out
