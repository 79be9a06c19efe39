"""Tests for cbir.images: every image is generated here, in memory or under tmp_path."""

from __future__ import annotations

import io
import os
import shutil
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import warnings
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageFile, JpegImagePlugin, features

from cbir import images
from cbir.images import (
    ImageError,
    InputSpec,
    Limits,
    decode,
    load,
    prepare_arrays,
    read_file,
    to_array,
)

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


# -- helpers -------------------------------------------------------------------------------------


def encode(im: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **params)
    return buf.getvalue()


def quadrants(width: int = 64, height: int = 48) -> Image.Image:
    """Red | green over blue | white: tells position, colour and orientation apart."""
    a = np.empty((height, width, 3), np.uint8)
    h2, w2 = height // 2, width // 2
    a[:h2, :w2], a[:h2, w2:], a[h2:, :w2], a[h2:, w2:] = RED, GREEN, BLUE, WHITE
    return Image.fromarray(a)


def mean_colour(im: Image.Image, box: tuple[float, float, float, float]) -> np.ndarray:
    """Mean RGB inside ``box`` given as fractions (left, top, right, bottom) of the image."""
    a = np.asarray(im).astype(float)
    h, w = a.shape[:2]
    left, top, right, bottom = box
    return a[int(top * h) : int(bottom * h), int(left * w) : int(right * w)].reshape(-1, 3).mean(0)


def assert_colour(im: Image.Image, box: tuple[float, ...], colour: tuple[int, ...], tol: float):
    got = mean_colour(im, box)  # type: ignore[arg-type]
    assert np.abs(got - np.array(colour)).max() <= tol, f"{got} != {colour} in {box}"


def assert_quadrants(im: Image.Image, tol: float) -> None:
    assert_colour(im, (0.1, 0.1, 0.4, 0.4), RED, tol)
    assert_colour(im, (0.6, 0.1, 0.9, 0.4), GREEN, tol)
    assert_colour(im, (0.1, 0.6, 0.4, 0.9), BLUE, tol)
    assert_colour(im, (0.6, 0.6, 0.9, 0.9), WHITE, tol)


def gradient_jpeg(width: int, height: int, exif: Image.Exif | None = None) -> bytes:
    """A smooth JPEG with a red top half and a blue bottom half (orientation is visible)."""
    a = np.zeros((height, width, 3), np.uint8)
    a[: height // 2] = RED
    a[height // 2 :] = BLUE
    a[..., 1] = (np.arange(width) * 100 // width).astype(np.uint8)[None, :]
    params = {"exif": exif} if exif is not None else {}
    return encode(Image.fromarray(a), "JPEG", quality=90, **params)


def png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def reason_of(call: Callable[[], object]) -> str:
    with pytest.raises(ImageError) as info:
        call()
    return info.value.reason


# -- formats -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "params", "tol"),
    [
        ("JPEG", {"quality": 95}, 12),
        ("PNG", {}, 0),
        ("BMP", {}, 0),
        ("TIFF", {}, 0),
        ("TIFF", {"compression": "tiff_lzw"}, 0),
        ("GIF", {}, 0),
        ("WEBP", {"quality": 95}, 12),
        ("WEBP", {"lossless": True}, 0),
    ],
)
def test_round_trip_formats(fmt: str, params: dict, tol: float) -> None:
    if fmt == "WEBP" and not features.check("webp"):
        pytest.skip("Pillow built without WebP")
    im = decode(encode(quadrants(), fmt, **params))
    assert im.mode == "RGB"
    assert im.size == (64, 48)
    assert_quadrants(im, tol)


def test_gif_first_frame() -> None:
    frames = [Image.new("RGB", (20, 10), RED), Image.new("RGB", (20, 10), BLUE)]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)
    with Image.open(io.BytesIO(data)) as check:
        assert check.n_frames == 2
    im = decode(data)
    assert (im.mode, im.size) == ("RGB", (20, 10))
    assert_colour(im, (0, 0, 1, 1), RED, 0)


def test_multipage_tiff_first_page() -> None:
    pages = [Image.new("RGB", (16, 8), GREEN), Image.new("RGB", (16, 8), RED)]
    data = encode(pages[0], "TIFF", save_all=True, append_images=pages[1:])
    assert_colour(decode(data), (0, 0, 1, 1), GREEN, 0)


@pytest.mark.parametrize("fmt", ["TIFF", "PNG"])
def test_16_bit_12_bit_values_are_stretched(fmt: str) -> None:
    # A 12-bit sensor in a 16-bit container: 100..4095 would be nearly black shifted to 8 bits.
    values = np.linspace(100, 4095, 64).astype(np.uint16)
    src = Image.fromarray(np.tile(values, (8, 1)))
    assert src.mode == "I;16"
    im = decode(encode(src, fmt))
    a = np.asarray(im)
    assert im.mode == "RGB" and im.size == (64, 8)
    assert a.min() == 0 and a.max() == 255
    assert (np.diff(a[0, :, 0].astype(int)) >= 0).all()  # still a ramp
    assert (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all()
    assert abs(int(a[0, 32, 0]) - 129) <= 2  # linear: the middle maps to the middle


def test_16_bit_big_endian_is_stretched() -> None:
    src = Image.frombytes("I;16B", (4, 1), np.array([0, 1000, 2000, 3000], ">u2").tobytes())
    im = images._to_rgb(src)  # no common format saves I;16B, so feed the mode directly
    assert np.asarray(im)[0, :, 0].tolist() == [0, 85, 170, 255]


# -- EXIF orientation ----------------------------------------------------------------------------


def exif_with(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


@pytest.mark.parametrize(
    ("orientation", "size", "red_box"),
    [
        (1, (80, 40), (0.1, 0.1, 0.9, 0.4)),  # top
        (3, (80, 40), (0.1, 0.6, 0.9, 0.9)),  # rotated 180: bottom
        (6, (40, 80), (0.6, 0.1, 0.9, 0.9)),  # rotate 90 CW to display: stored top -> right
        (8, (40, 80), (0.1, 0.1, 0.4, 0.9)),  # rotate 90 CCW to display: stored top -> left
    ],
)
def test_exif_orientation(orientation: int, size: tuple[int, int], red_box: tuple) -> None:
    im = decode(gradient_jpeg(80, 40, exif_with(orientation)))
    assert im.size == size
    assert im.info["original_size"] == size
    assert_colour(im, red_box, (255, 50, 0), 60)
    assert mean_colour(im, red_box)[2] < 40  # and not blue


@pytest.mark.parametrize("fmt", ["TIFF", "PNG", "WEBP"])
def test_orientation_in_other_formats(fmt: str) -> None:
    # Pillow rotates TIFFs itself while loading: the orientation must not be applied twice.
    if fmt == "WEBP" and not features.check("webp"):
        pytest.skip("Pillow built without WebP")
    a = np.zeros((40, 80, 3), np.uint8)
    a[:20], a[20:] = RED, BLUE
    params = {"tiffinfo": {0x0112: 6}} if fmt == "TIFF" else {"exif": exif_with(6)}
    if fmt == "WEBP":
        params["lossless"] = True
    im = decode(encode(Image.fromarray(a), fmt, **params))
    assert im.size == (40, 80) and im.info["original_size"] == (40, 80)
    assert_colour(im, (0.6, 0, 1, 1), RED, 0)
    assert_colour(im, (0, 0, 0.4, 1), BLUE, 0)


def test_exif_orientation_with_draft_on_a_portrait() -> None:
    # Stored 2000x1500 landscape, displayed as a 1500x2000 portrait: the draft request is made in
    # stored coordinates, the shrink after rotation.
    im = decode(gradient_jpeg(2000, 1500, exif_with(6)), max_side=256)
    assert im.size == (192, 256)
    assert im.info["original_size"] == (1500, 2000)
    assert_colour(im, (0.6, 0.05, 0.95, 0.95), (255, 50, 0), 60)  # red on the right
    assert_colour(im, (0.05, 0.05, 0.4, 0.95), (0, 50, 255), 60)  # blue on the left


# -- modes ---------------------------------------------------------------------------------------


def test_palette_with_transparency_over_white() -> None:
    src = Image.new("P", (20, 10), 0)
    src.putpalette([*RED, *BLUE] + [0] * 762)
    src.paste(1, (10, 0, 20, 10))
    im = decode(encode(src, "PNG", transparency=0))  # red (index 0) is transparent
    assert im.mode == "RGB"
    assert_colour(im, (0, 0, 0.5, 1), WHITE, 0)
    assert_colour(im, (0.5, 0, 1, 1), BLUE, 0)


def test_palette_without_transparency() -> None:
    src = Image.new("P", (8, 8), 1)
    src.putpalette([*RED, *GREEN] + [0] * 762)
    assert_colour(decode(encode(src, "PNG")), (0, 0, 1, 1), GREEN, 0)


def test_rgba_is_composited_over_white() -> None:
    a = np.zeros((10, 30, 4), np.uint8)
    a[:, :10] = (*RED, 255)  # opaque red
    a[:, 10:20] = (*RED, 128)  # half-transparent red
    a[:, 20:] = (*BLUE, 0)  # fully transparent blue
    im = decode(encode(Image.fromarray(a), "PNG"))
    assert im.mode == "RGB"
    px = np.asarray(im)
    assert tuple(px[5, 5]) == RED
    assert np.abs(px[5, 15].astype(int) - (255, 127, 127)).max() <= 1
    assert tuple(px[5, 25]) == WHITE


def test_la_is_composited_over_white() -> None:
    src = Image.new("LA", (4, 4), (0, 0))  # black, fully transparent
    assert tuple(np.asarray(decode(encode(src, "PNG")))[0, 0]) == WHITE


@pytest.mark.parametrize("fmt", ["TIFF", "JPEG"])
def test_cmyk(fmt: str) -> None:
    src = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # red in CMYK
    im = decode(encode(src, fmt))
    assert im.mode == "RGB"
    assert_colour(im, (0, 0, 1, 1), RED, 10)


def test_grayscale() -> None:
    src = Image.fromarray(np.tile(np.arange(0, 256, 4, dtype=np.uint8), (4, 1)))
    assert src.mode == "L"
    a = np.asarray(decode(encode(src, "PNG")))
    assert a.shape == (4, 64, 3)
    assert (a[..., 0] == np.asarray(src)).all() and (a[..., 0] == a[..., 2]).all()


def test_one_bit() -> None:
    src = Image.new("1", (8, 8), 0)
    src.paste(1, (0, 0, 4, 8))
    a = np.asarray(decode(encode(src, "PNG")))
    assert a.shape == (8, 8, 3)
    assert (a[:, :4] == 255).all() and (a[:, 4:] == 0).all()


def test_float_image_is_stretched() -> None:
    values = np.linspace(-1.5, 3.0, 32, dtype=np.float32)
    src = Image.fromarray(np.tile(values, (4, 1)))
    assert src.mode == "F"
    a = np.asarray(decode(encode(src, "TIFF")))[..., 0]
    assert a[0, 0] == 0 and a[0, -1] == 255
    assert (np.diff(a[0].astype(int)) > 0).all()


def test_float_nan_and_constant() -> None:
    src = Image.fromarray(np.array([[np.nan, 0.0, 1.0, np.inf]], np.float32))
    assert np.asarray(images._to_rgb(src))[0, :, 0].tolist() == [0, 0, 255, 255]
    const = Image.fromarray(np.full((3, 3), 7.5, np.float32))
    assert (np.asarray(decode(encode(const, "TIFF"))) == 0).all()


def test_32_bit_integer_image_is_stretched() -> None:
    src = Image.fromarray(np.array([[-70000, 0, 70000]], np.int32))
    assert src.mode == "I"
    a = np.asarray(decode(encode(src, "TIFF")))[0, :, 0]
    assert a.tolist() == [0, 128, 255]


# -- size: draft and shrinking --------------------------------------------------------------------


def test_jpeg_draft_mode_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    original = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):  # type: ignore[no-untyped-def]
        result = original(self, mode, size)
        calls.append((size, result, self.size))
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    data = gradient_jpeg(2000, 1500)
    im = decode(data, max_side=256)
    assert im.size == (256, 192)
    assert im.info["original_size"] == (2000, 1500)
    assert len(calls) == 1
    request, result, decoded_size = calls[0]
    assert max(request) == 256
    assert result is not None  # the decoder accepted a reduced DCT scale ...
    assert decoded_size == (500, 375)  # ... of 1/4: the largest that stays >= 256
    assert_colour(im, (0.05, 0.05, 0.95, 0.4), (255, 50, 0), 60)

    calls.clear()
    assert decode(data).size == (2000, 1500)  # no max_side: no draft
    assert calls == []


def test_draft_never_goes_below_max_side() -> None:
    for size, side in [((1000, 700), 500), ((777, 333), 97), ((4000, 100), 256)]:
        im = decode(gradient_jpeg(*size), max_side=side)
        assert max(im.size) == side, (size, side, im.size)


def test_max_side_shrinks_other_formats_and_never_enlarges() -> None:
    data = encode(quadrants(600, 300), "PNG")
    im = decode(data, max_side=256)
    assert im.size == (256, 128)
    assert_quadrants(im, 2)
    assert decode(data, max_side=1000).size == (600, 300)
    assert decode(data, max_side=600).size == (600, 300)


def test_invalid_max_side() -> None:
    with pytest.raises(ValueError, match="max_side"):
        decode(encode(quadrants(), "PNG"), max_side=0)


# -- bad files -----------------------------------------------------------------------------------


@pytest.fixture
def noise_image() -> Image.Image:
    rng = np.random.default_rng(1)
    return Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    assert reason_of(lambda: load(path)) == "empty file (0 bytes)"
    assert reason_of(lambda: decode(b"")) == "empty file (0 bytes)"


def test_random_bytes_with_image_name(tmp_path: Path) -> None:
    path = tmp_path / "photo.jpg"
    path.write_bytes(np.random.default_rng(2).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(ImageError) as info:
        load(path)
    assert info.value.reason == "not an image file Pillow can read"
    assert info.value.path == str(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated(fmt: str, noise_image: Image.Image) -> None:
    data = encode(noise_image, fmt)
    reason = reason_of(lambda: decode(data[: len(data) // 2]))
    assert reason.startswith("truncated or corrupt image data: ")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_corrupt_png_checksum(noise_image: Image.Image) -> None:
    data = bytearray(encode(noise_image, "PNG"))
    data[200:260] = bytes(60)  # zeroes over compressed pixel data inside IDAT
    assert reason_of(lambda: decode(bytes(data))).startswith("truncated or corrupt image data")


def hostile_png(width: int, height: int) -> bytes:
    """A valid PNG header claiming ``width`` x ``height`` RGB, followed by almost no data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + png_chunk(b"IEND", b"")
    )


def test_decompression_bomb_header_is_refused() -> None:
    before = Image.MAX_IMAGE_PIXELS
    reason = reason_of(lambda: decode(hostile_png(100_000, 100_000)))
    assert "10000 megapixels, over the limit of 200 megapixels" in reason
    assert "CBIR_MAX_PIXELS" in reason
    assert before == Image.MAX_IMAGE_PIXELS


def test_over_a_small_max_pixels(noise_image: Image.Image, recwarn: pytest.WarningsRecorder):
    data = encode(noise_image, "PNG")  # 64 x 64 = 4096 pixels
    reason = reason_of(lambda: decode(data, max_pixels=3000))
    assert "over the limit of 0.003 megapixels" in reason
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]
    assert decode(data, max_pixels=4096).size == (64, 64)  # the limit itself is allowed


def test_our_header_check_names_the_size(noise_image: Image.Image) -> None:
    # While another decode with a larger limit is running, Pillow's guard is relaxed to that
    # limit and our own check from the header must refuse the image (and can name its size).
    data = encode(noise_image, "PNG")
    with images._pillow_guard(10**9):
        reason = reason_of(lambda: decode(data, max_pixels=3000))
    assert reason.startswith("image is 64x64 = 0.0041 megapixels, over the limit of 0.003")


def test_max_pixels_not_pillows_global_decides(
    noise_image: Image.Image, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Pillow's own limit (a global someone may have lowered, ~89 MP by default) must neither
    # refuse an image our limit allows nor be left changed.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    assert decode(encode(noise_image, "PNG")).size == (64, 64)  # 4096 pixels
    assert Image.MAX_IMAGE_PIXELS == 1000


def test_pillow_state_is_restored(noise_image: Image.Image) -> None:
    before = (Image.MAX_IMAGE_PIXELS, list(warnings.filters), ImageFile.LOAD_TRUNCATED_IMAGES)
    data = encode(noise_image, "PNG")
    decode(data)
    with pytest.raises(ImageError):
        decode(data, max_pixels=10)
    with pytest.raises(ImageError):
        decode(data[:100])
    assert (Image.MAX_IMAGE_PIXELS, list(warnings.filters), ImageFile.LOAD_TRUNCATED_IMAGES) == (
        before
    )


def test_concurrent_decodes_restore_pillow_limit(noise_image: Image.Image) -> None:
    before = Image.MAX_IMAGE_PIXELS
    data = encode(noise_image, "PNG")

    def work(i: int) -> str:
        try:
            return decode(data, max_pixels=3000 if i % 2 else 10**8).mode
        except ImageError as exc:
            return exc.reason

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(work, range(200)))
    assert results[0::2] == ["RGB"] * 100
    assert all("over the limit" in r for r in results[1::2])
    assert before == Image.MAX_IMAGE_PIXELS
    assert images._guard_limits == []


def test_other_pillow_errors_become_image_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(Image.Image, "convert", boom)
    src = Image.new("P", (4, 4), 0)
    data = encode(src, "PNG")
    assert reason_of(lambda: decode(data)) == "cannot decode image: RuntimeError: boom"


def test_directory(tmp_path: Path) -> None:
    assert reason_of(lambda: load(tmp_path)) == "not a regular file (a directory)"
    assert reason_of(lambda: read_file(tmp_path, LIMIT)) == "not a regular file (a directory)"


def test_missing_file(tmp_path: Path) -> None:
    reason = reason_of(lambda: load(tmp_path / "nope.png"))
    assert reason == "cannot read file: No such file or directory"
    assert reason_of(lambda: read_file(tmp_path / "nope.png", LIMIT)) == reason


#: A byte cap far above any file these tests write.
LIMIT = 1 << 20
#: Seconds a read that must not block is given before the test fails.
PROMPT = 10
#: The user and group ``nobody`` on most Unix systems.
NOBODY = 65534
#: Exit status of the privilege-dropping snippet when it cannot drop privileges here.
CANNOT_DROP = 77

#: Run as root: read the file given as an unprivileged user and print the reason.
UNPRIVILEGED_READ = f"""
import os, sys
from cbir.images import ImageError, load
try:
    os.setgroups([])
    os.setgid({NOBODY})
    os.setuid({NOBODY})
except OSError:
    sys.exit({CANNOT_DROP})
try:
    load(sys.argv[1])
except ImageError as exc:
    print(exc.reason)
"""


@pytest.fixture
def traversable_dir() -> Iterator[Path]:
    """A fresh folder every user may pass through (pytest's base folder is private to us)."""
    folder = Path(tempfile.mkdtemp(prefix="cbir-test-"))
    folder.chmod(0o711)
    try:
        yield folder
    finally:
        shutil.rmtree(folder)


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_permission_denied(traversable_dir: Path) -> None:
    path = traversable_dir / "secret.png"
    path.write_bytes(encode(quadrants(), "PNG"))
    path.chmod(0)
    if os.geteuid() == 0:  # root reads anything: read as nobody, in a child process
        out = subprocess.run(
            [sys.executable, "-c", UNPRIVILEGED_READ, str(path)],
            capture_output=True,
            text=True,
            timeout=PROMPT * 6,
        )
        if out.returncode == CANNOT_DROP:
            pytest.skip("cannot drop privileges to nobody here")
        assert out.returncode == 0, out.stderr
        reason = out.stdout.strip()
    else:
        reason = reason_of(lambda: load(path))
    assert reason == "cannot read file: Permission denied"


def test_read_file_returns_the_bytes_and_the_open_file_status(tmp_path: Path) -> None:
    path = tmp_path / "q.png"
    data = encode(quadrants(), "PNG")
    path.write_bytes(data)
    got, st = read_file(path, LIMIT)
    assert got == data
    assert (st.st_size, st.st_ino, st.st_mtime_ns) == (
        len(data),
        path.stat().st_ino,
        path.stat().st_mtime_ns,
    )
    assert read_file(path, len(data)) == (data, st)  # the limit itself is allowed
    (tmp_path / "empty.png").write_bytes(b"")
    assert read_file(tmp_path / "empty.png", LIMIT)[0] == b""


def refused_promptly(call: Callable[[], object], release: Path | None = None) -> ImageError:
    """The ImageError ``call`` raises, failing the test if it blocks (a FIFO is then given a
    writer, which releases the reader)."""
    outcome: list[BaseException | object] = []

    def run() -> None:
        try:
            outcome.append(call())
        except BaseException as exc:
            outcome.append(exc)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(PROMPT)
    if worker.is_alive():
        if release is not None:
            os.close(os.open(release, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("reading blocked")
    (result,) = outcome
    assert isinstance(result, ImageError), result
    return result


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_read_file_refuses_a_fifo_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    error = refused_promptly(lambda: read_file(fifo, LIMIT), release=fifo)
    assert error.reason == "not a regular file (a FIFO (named pipe))"
    assert error.file_stat is not None and stat.S_ISFIFO(error.file_stat.st_mode)
    error = refused_promptly(lambda: load(fifo), release=fifo)
    assert (error.reason, error.path) == ("not a regular file (a FIFO (named pipe))", str(fifo))


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_read_file_checks_the_file_it_opened(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The path was a regular file when looked at, then became a FIFO before it was opened:
    # the open descriptor decides, and the open does not wait for a writer.
    regular = tmp_path / "was.png"
    regular.write_bytes(b"x")
    fifo = tmp_path / "now.png"
    os.mkfifo(fifo)
    real_stat = os.stat

    def stale_stat(path: object, *args: object, **kwargs: object) -> os.stat_result:
        return real_stat(regular if os.fspath(path) == str(fifo) else path, *args, **kwargs)

    monkeypatch.setattr(images.os, "stat", stale_stat)
    error = refused_promptly(lambda: read_file(fifo, LIMIT), release=fifo)
    assert error.reason == (
        "not a regular file (a FIFO (named pipe)); it was replaced while being opened"
    )


@pytest.mark.parametrize("device", ["/dev/null", "/dev/zero"])
def test_read_file_refuses_a_device(device: str) -> None:
    if not os.path.exists(device):
        pytest.skip(f"no {device} here")
    error = refused_promptly(lambda: read_file(device, LIMIT))
    assert error.reason == "not a regular file (a character device)"


@pytest.mark.skipif(not hasattr(socket, "AF_UNIX"), reason="needs Unix sockets")
def test_read_file_refuses_a_socket(traversable_dir: Path) -> None:
    path = traversable_dir / "s.png"  # a short path: socket addresses are short
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(path))
        error = refused_promptly(lambda: read_file(path, LIMIT))
    assert error.reason == "not a regular file (a socket)"


def test_read_file_refuses_a_file_over_max_bytes_from_its_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "huge.tif"
    size = 2 * images.DEFAULT_MAX_BYTES
    with open(path, "wb") as fh:
        fh.truncate(size)  # sparse: nothing is written
    reads: list[int] = []
    real_read = os.read

    def counting_read(fd: int, n: int) -> bytes:
        reads.append(n)
        return real_read(fd, n)

    with monkeypatch.context() as m:
        m.setattr(images.os, "read", counting_read)
        error = refused_promptly(lambda: load(path))
    assert reads == []
    assert error.reason == (
        f"file is {size} bytes (2.1 GB), over the limit of {images.DEFAULT_MAX_BYTES} bytes "
        "(1.1 GB) (set max_bytes / CBIR_MAX_BYTES to allow it)"
    )
    assert error.file_stat is not None and error.file_stat.st_size == size
    small = reason_of(lambda: read_file(path, 999))
    assert small.startswith(f"file is {size} bytes (2.1 GB), over the limit of 999 bytes (")


def test_read_file_never_reads_past_the_cap_when_the_file_grows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "growing.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"x" * 42)  # claimed by PNG: read on
    cap = 100
    real_fstat, real_read = os.fstat, os.read
    read = [0]

    def fstat_then_grow(fd: int) -> os.stat_result:
        st = real_fstat(fd)
        with open(path, "ab") as fh:  # the file grows once it has been looked at
            fh.write(b"y" * 10_000)
        return st

    def counting_read(fd: int, n: int) -> bytes:
        data = real_read(fd, n)
        read[0] += len(data)
        return data

    with monkeypatch.context() as m:
        m.setattr(images.os, "fstat", fstat_then_grow)
        m.setattr(images.os, "read", counting_read)
        reason = reason_of(lambda: read_file(path, cap))
    assert reason == (
        "file grew past the limit of 100 bytes while being read "
        "(set max_bytes / CBIR_MAX_BYTES to allow it)"
    )
    assert read[0] == cap + 1


def test_read_file_rejects_a_bad_limit(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_bytes must be a whole number"):
        read_file(tmp_path, 0)


def test_limits_defaults_and_validation() -> None:
    assert Limits() == Limits(images.DEFAULT_MAX_PIXELS, images.DEFAULT_MAX_BYTES)
    assert Limits(max_bytes=np.int64(5)).max_bytes == 5
    assert type(Limits(max_bytes=np.int64(5)).max_bytes) is int
    with pytest.raises(ValueError) as info:
        Limits(max_bytes=0)
    assert str(info.value) == (
        "max_bytes (CBIR_MAX_BYTES) must be a whole number of bytes, 1 or more; got 0"
    )
    bad_values: tuple[Any, ...] = (-1, 1.5, True, "10", None)
    for bad in bad_values:
        with pytest.raises(ValueError, match=r"^max_pixels \(CBIR_MAX_PIXELS\) must be a whole"):
            Limits(max_pixels=bad)
    frozen: Any = Limits()
    with pytest.raises(AttributeError):
        frozen.max_bytes = 1


def test_load_applies_both_limits(tmp_path: Path) -> None:
    path = tmp_path / "q.png"
    path.write_bytes(encode(quadrants(64, 48), "PNG"))
    assert "over the limit of 0.0001 megapixels" in reason_of(
        lambda: load(path, limits=Limits(max_pixels=100))
    )
    assert "CBIR_MAX_BYTES" in reason_of(lambda: load(path, limits=Limits(max_bytes=10)))


def test_load_reads_and_decodes(tmp_path: Path) -> None:
    path = tmp_path / "q.png"
    path.write_bytes(encode(quadrants(600, 300), "PNG"))
    im = load(path, max_side=128)
    assert im.size == (128, 64)
    assert_quadrants(im, 2)
    assert load(str(path)).size == (600, 300)


def test_image_extensions() -> None:
    exts = images.IMAGE_EXTENSIONS
    assert {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp"} <= exts
    assert all(e.startswith(".") and e == e.lower() for e in exts)
    assert not {".pdf", ".h5", ".mpg", ".txt"} & exts  # save-only, stub and identify-only


# -- arrays for descriptors -----------------------------------------------------------------------


@pytest.fixture
def photo() -> Image.Image:
    return quadrants(300, 200)


def test_to_array_rgb_shrinks_to_max_side(photo: Image.Image) -> None:
    a = to_array(photo, InputSpec("RGB", 256))
    assert a.shape == (171, 256, 3)
    assert a.dtype == np.uint8 and a.flags.c_contiguous and not a.flags.writeable
    assert tuple(a[10, 10]) == RED and tuple(a[160, 250]) == WHITE


def test_to_array_grey_is_pillow_luma(photo: Image.Image) -> None:
    a = to_array(photo, InputSpec("L", 256))
    assert a.shape == (171, 256) and a.dtype == np.uint8 and a.flags.c_contiguous
    rgb = to_array(photo, InputSpec("RGB", 256))
    assert np.array_equal(a, np.asarray(Image.fromarray(rgb).convert("L")))
    assert a[10, 10] == 76 and a[10, 250] == 150 and a[160, 10] == 29  # ITU-R 601-2


def test_to_array_exact_size_and_never_enlarging(photo: Image.Image) -> None:
    assert to_array(photo, InputSpec("L", size=(64, 128))).shape == (128, 64)
    assert to_array(photo, InputSpec("RGB", size=(640, 480))).shape == (480, 640, 3)  # exact
    assert to_array(photo, InputSpec("RGB", 1024)).shape == (200, 300, 3)  # max_side: never
    full = to_array(photo, InputSpec("RGB", None))
    assert np.array_equal(full, np.asarray(photo))


def test_to_array_accepts_other_modes() -> None:
    rgba = Image.new("RGBA", (10, 10), (0, 0, 0, 0))
    assert (to_array(rgba, InputSpec("RGB", None)) == 255).all()
    grey = Image.new("L", (10, 10), 9)
    assert to_array(grey, InputSpec("RGB", None)).shape == (10, 10, 3)
    assert to_array(grey, InputSpec("L", 5)).shape == (5, 5)


def test_prepare_arrays_shares_equal_specs(
    photo: Image.Image, monkeypatch: pytest.MonkeyPatch
) -> None:
    specs = [
        InputSpec("RGB", 256),
        InputSpec("L", 256),
        InputSpec("RGB", 256),
        InputSpec("L", size=(64, 64)),
        InputSpec("L", 256),
        InputSpec("RGB", 512),  # larger than the image: the full-size array
    ]
    expected = [to_array(photo, s) for s in specs]
    resizes = []
    original = images._resized

    def counting(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        if (array.shape[1], array.shape[0]) != size:
            resizes.append(size)
        return original(array, size)

    monkeypatch.setattr(images, "_resized", counting)
    out = prepare_arrays(photo, specs)
    assert len(out) == len(specs)
    for got, want in zip(out, expected, strict=True):
        assert got.shape == want.shape and np.array_equal(got, want)
    assert out[0] is out[2] and out[1] is out[4]
    assert out[0] is not out[1]
    assert sorted(resizes) == [(64, 64), (256, 171)]  # one resize per distinct size
    assert all(not a.flags.writeable for a in out)
