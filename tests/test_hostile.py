"""A corpus of hostile files, made here, indexed as a user would: each kind is indexed correctly
or skipped with a precise reason, none crashes or hangs the run, and the run's memory (the
indexing process and its two workers together) stays under a stated bound. Then the image
loader is fuzzed from real small images mutated byte-wise."""

from __future__ import annotations

import inspect
import io
import json
import os
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, features

import cbir
from cbir import images
from cbir.collection import Collection
from cbir.config import Settings

SPECS = ("color-hist", "fotf")
#: The run's own limit on what a decode may allocate: the decode-bytes kind is over it.
DECODE_BYTES = 64 << 20
#: What the indexing process and its two workers may hold together (resident), at most, over
#: the whole run: three interpreters with NumPy, OpenCV and Pillow loaded, plus decodes bounded
#: by DECODE_BYTES. Without the bounds, one file of the corpus alone would need more.
PEAK_RSS_BOUND = 640 << 20
PATIENCE = 120


def png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def encoded(im: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **params)
    return buf.getvalue()


def noise(size: tuple[int, int] = (48, 40), mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    bands = len(mode) if mode in ("RGB", "RGBA", "CMYK", "LA") else 1
    a = rng.integers(0, 256, (size[1], size[0], bands), dtype=np.uint8)
    return Image.fromarray(a[..., 0] if bands == 1 else a, "RGB" if bands == 3 else None).convert(
        mode
    )


def frames(fmt: str, **params: object) -> bytes:
    first, *rest = [noise(seed=i) for i in range(3)]
    return encoded(first, fmt, save_all=True, append_images=rest, **params)


def bomb_png() -> bytes:
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr)
            + png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) + png_chunk(b"IEND", b""))  # fmt: skip


def flat_png(width: int, height: int) -> bytes:
    """A real, complete black RGB PNG, compressed row by row (never whole in memory)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    packer, row = zlib.compressobj(1), bytes(1 + 3 * width)  # filter byte + pixels
    data = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", data)
            + png_chunk(b"IEND", b""))  # fmt: skip


def with_jpeg_size(data: bytes, width: int, height: int) -> bytes:
    out = bytearray(data)
    sof = out.find(b"\xff\xc0")
    out[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(out)


def bomb_gif() -> bytes:
    data = bytearray(encoded(noise(mode="P"), "GIF"))
    data[6:10] = struct.pack("<HH", 65535, 65535)  # logical screen
    pos = data.find(b"\x2c")  # image descriptor: frame as large as the screen
    data[pos + 5 : pos + 9] = struct.pack("<HH", 65535, 65535)
    return bytes(data)


def rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: a 48x40 file is shown 40x48
    return encoded(noise(), "JPEG", exif=exif.tobytes())


def corrupt_exif_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 1
    data = bytearray(encoded(noise(), "JPEG", exif=exif.tobytes()))
    start = data.find(b"Exif\x00\x00") + 6
    data[start + 4 : start + 8] = struct.pack("<I", 0xFFFFF0)
    return bytes(data)


def rgb16_png() -> bytes:
    a = np.random.default_rng(0).integers(0, 65536, (40, 48, 3), dtype=np.uint16)
    ok, buf = cv2.imencode(".png", a)
    assert ok
    return buf.tobytes()


def float_tiff_with_nan() -> bytes:
    a = np.random.default_rng(0).random((40, 48), dtype=np.float32)
    a[:5] = np.nan
    return encoded(Image.fromarray(a, "F"), "TIFF")


def palette_with_transparency() -> bytes:
    im = noise(mode="P")
    return encoded(im, "PNG", transparency=0)


def sparse(path: Path, size: int) -> None:
    with open(path, "wb") as fh:
        fh.truncate(size)  # holes: no disk used


def truncated(fmt: str) -> Callable[[], bytes]:
    def make() -> bytes:
        data = encoded(noise((256, 256)), fmt)
        return data[: len(data) // 2]

    return make


#: name -> (bytes, or a callable making the file at a path; what must happen: "ok", or a piece
#: of the reason it is skipped with)
Maker = Callable[[], bytes] | Callable[[Path], None]
KINDS: dict[str, tuple[Maker, str]] = {
    "zero-bytes.jpg": (lambda: b"", "empty file"),
    "truncated.jpg": (truncated("JPEG"), "truncated"),
    "truncated.png": (truncated("PNG"), "truncated"),
    "truncated.gif": (truncated("GIF"), "truncated"),
    "truncated.tif": (truncated("TIFF"), "truncated"),
    "png-named.jpg": (lambda: encoded(noise(), "PNG"), "ok"),
    "text.jpg": (lambda: b"just some text\n" * 100, "not an image"),
    "executable.jpg": (lambda: Path(sys.executable).read_bytes()[:20_000], "not an image"),
    "drawing-svg.png": (lambda: b'<svg xmlns="http://www.w3.org/2000/svg"/>', "not an image"),
    "bomb.png": (bomb_png, "megapixels, over the limit"),
    "bomb.jpg": (lambda: with_jpeg_size(encoded(noise(), "JPEG"), 60000, 60000), "megapixels"),
    "bomb.gif": (bomb_gif, "megapixels"),
    "forged-header.jpg": (lambda: with_jpeg_size(encoded(noise((256, 256)), "JPEG"), 14000,
                                                 14000), "most of the image is missing"),
    # 144 megapixels, under the pixel limit: 576 MB decoded, 1 GB with its array copy
    "decode-too-big.png": (lambda: flat_png(12000, 12000), "would allocate"),
    "one-pixel.png": (lambda: encoded(noise((1, 1)), "PNG"), "ok"),
    "long-100000x1.png": (lambda: encoded(noise((100_000, 1)), "PNG"), "ok"),
    "grey16.png": (lambda: encoded(Image.fromarray(np.arange(48 * 40, dtype=np.uint16)
                                                   .reshape(40, 48) * 30), "PNG"), "ok"),
    "rgb16.png": (rgb16_png, "ok"),
    "cmyk.jpg": (lambda: encoded(noise(mode="CMYK"), "JPEG"), "ok"),
    "palette-transparent.png": (palette_with_transparency, "ok"),
    "grey-alpha-LA.png": (lambda: encoded(noise(mode="LA"), "PNG"), "ok"),
    "one-bit.png": (lambda: encoded(noise(mode="1"), "PNG"), "ok"),
    "float-nan.tif": (float_tiff_with_nan, "ok"),
    "animated.gif": (lambda: frames("GIF"), "ok"),
    "multi-page.tif": (lambda: frames("TIFF"), "ok"),
    "exif-rotated.jpg": (rotated_jpeg, "ok"),
    "corrupt-exif.jpg": (corrupt_exif_jpeg, "ok"),
    "newline\nin-name.png": (lambda: encoded(noise(), "PNG"), "ok"),
    "unicode-名前-é.png": (lambda: encoded(noise(), "PNG"), "ok"),
    os.fsdecode(b"not-utf8-\xff\xfe.png"): (lambda: encoded(noise(), "PNG"), "ok"),
    "symlink-good.png": (lambda p: p.symlink_to(p.parent / "one-pixel.png"), "ok"),
    "symlink-dangling.png": (lambda p: p.symlink_to(p.parent / "nowhere.png"),
                             "symbolic link"),
    "symlink-loop.png": (lambda p: p.symlink_to(p), "symbolic link"),
    "fifo.png": (lambda p: os.mkfifo(p), "FIFO"),
    "device.png": (lambda p: p.symlink_to("/dev/zero"), "character device"),
    "sparse-1GiB.jpg": (lambda p: sparse(p, 1 << 30), "not an image"),
}  # fmt: skip
if features.check("webp"):
    KINDS["truncated.webp"] = (truncated("WEBP"), "truncated")
    KINDS["animated.webp"] = (lambda: frames("WEBP"), "ok")


def make_corpus(folder: Path) -> dict[str, str]:
    """Every kind under ``folder``; returns path -> what must happen."""
    folder.mkdir(parents=True)
    expected = {}
    for name, (make, outcome) in sorted(KINDS.items(), key=lambda kv: kv[0].startswith("sym")):
        path = folder / name
        if inspect.signature(make).parameters:  # makes the file itself
            make(path)
        else:
            path.write_bytes(make())
        expected[str(path)] = outcome
    return expected


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and every process below it (from /proc)."""
    parents, rss = {}, {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parents[int(entry.name)] = int(fields[1])
            rss[int(entry.name)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
    tree, frontier = {pid}, {pid}
    while frontier:
        frontier = {p for p, parent in parents.items() if parent in frontier} - tree
        tree |= frontier
    return sum(rss.get(p, 0) for p in tree)


def test_the_corpus_has_at_least_30_kinds() -> None:
    assert len(KINDS) >= 30


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_every_hostile_kind_is_indexed_or_skipped_with_its_reason(tmp_path: Path) -> None:
    expected = make_corpus(tmp_path / "hostile")
    col = tmp_path / "col"
    src = str(Path(cbir.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
           "CBIR_WORKERS": "2", "CBIR_MAX_DECODE_BYTES": str(DECODE_BYTES)}  # fmt: skip
    args = [sys.executable, "-m", "cbir.cli", "index", str(tmp_path / "hostile"), "--json",
            "-c", str(col), *(a for s in SPECS for a in ("-d", s))]  # fmt: skip
    started = time.monotonic()
    child = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    peak = 0
    while child.poll() is None and time.monotonic() - started < PATIENCE:
        peak = max(peak, tree_rss(child.pid))
        time.sleep(0.02)
    if child.poll() is None:
        child.kill()
    out, err = child.communicate()
    assert child.returncode == 0, err.decode(errors="replace")[-3000:]
    report = json.loads(out)
    assert b"Warning" not in err and b"Traceback" not in err  # nothing leaks to stderr
    with Collection(col, settings=Settings(collection=col, workers=1), create=False) as c:
        records = {r.path: r for r in c.store.images()}
        assert c.check().ok
    for path, outcome in expected.items():
        record = records[path]
        if outcome == "ok":
            assert record.status == "ok", (path, record.reason)
        else:
            assert record.status == "skipped" and outcome in (record.reason or ""), (
                path,
                record.reason,
            )
    rotated = records[str(tmp_path / "hostile" / "exif-rotated.jpg")]
    assert (rotated.width, rotated.height) == (40, 48)
    assert "EXIF" in (records[str(tmp_path / "hostile" / "corrupt-exif.jpg")].reason or "")
    assert report["scanned"] == len(expected)
    assert peak < PEAK_RSS_BOUND, f"{peak / 2**20:.0f} MiB"
    print(f"hostile corpus: {len(expected)} kinds, peak RSS of the run {peak / 2**20:.0f} MiB, "
          f"{time.monotonic() - started:.1f} s")  # fmt: skip


def test_files_deleted_or_truncated_mid_run_are_skipped_and_the_run_goes_on(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(40):
        (folder / f"{i:02d}.png").write_bytes(encoded(noise((256, 256), seed=i), "PNG"))
    doomed, cut = folder / "38.png", folder / "39.png"

    def progress(done: int, total: int) -> None:
        if done == 1:  # the last chunk is not read yet (in-process: 16 files a chunk)
            doomed.unlink()
            cut.write_bytes(cut.read_bytes()[:3000])

    with Collection(tmp_path / "col", settings=Settings(workers=1)) as c:
        report = c.add(folder, descriptors=list(SPECS), progress=progress)
        reasons = dict(report.skipped)
    assert report.added == 38
    assert "No such file" in reasons[str(doomed)] and "truncated" in reasons[str(cut)]


NOBODY = 65534


@pytest.mark.skipif(not hasattr(os, "fork") or os.geteuid() != 0, reason="switches user")
def test_an_unreadable_file_is_skipped_as_such_for_a_user_who_cannot_read_it(
    tmp_path: Path,
) -> None:
    path = tmp_path / "secret.png"
    path.write_bytes(encoded(noise(), "PNG"))
    path.chmod(0)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child becomes nobody, who cannot read the file, and says why it failed
        try:
            os.setuid(NOBODY)
            try:
                images.read_file(path, 1 << 20)
                os.write(write_end, b"read it")
            except images.ImageError as exc:
                os.write(write_end, exc.reason.encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        said = pipe.read().decode()
    os.waitpid(pid, 0)
    assert said == "cannot read file: Permission denied"


# -- fuzzing ----------------------------------------------------------------------------------

SEEDS = [
    encoded(noise((24, 20)), "PNG"),
    encoded(noise((24, 20)), "JPEG"),
    encoded(noise((24, 20), mode="P"), "GIF"),
    encoded(noise((24, 20)), "TIFF"),
    encoded(noise((24, 20)), "BMP"),
    rotated_jpeg(),
]
#: Examples the fuzz test tries, each a few byte-wise mutations of a seed (docs/reliability.md)
FUZZ_EXAMPLES = 5000
FUZZ_LIMITS = images.Limits(max_pixels=4_000_000, max_bytes=1 << 20, max_decode_bytes=16 << 20)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 8))):
        op = draw(st.sampled_from(("flip", "cut", "insert", "overwrite")))
        at = draw(st.integers(0, len(data)))
        if op == "flip" and at < len(data):
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "cut":
            del data[at : at + draw(st.integers(1, 64))]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        else:
            chunk = draw(st.sampled_from((b"\xff\xff\xff\xff", b"\x00\x00\x00\x00",
                                          b"\x7f\xff\xff\xff", b"\xff\xd9")))  # fmt: skip
            data[at : at + len(chunk)] = chunk
    return bytes(data)


@settings(max_examples=FUZZ_EXAMPLES, deadline=2000, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
@given(mutated())
def test_fuzzed_files_decode_or_raise_image_error_only(data: bytes) -> None:
    for spec in (images.InputSpec("RGB", 64), images.InputSpec("L", None, (32, 32))):
        try:
            image = images.decode(data, max_side=spec.decode_side,
                                  max_pixels=FUZZ_LIMITS.max_pixels,
                                  max_decode_bytes=FUZZ_LIMITS.max_decode_bytes)  # fmt: skip
        except images.ImageError as exc:
            assert exc.reason
            return
        array = images.to_array(image, spec)
        assert array.dtype == np.uint8 and array.size > 0
