"""The defects issue 13 found by trying cbir as a new user: each test failed before its fix."""

from __future__ import annotations

import io
import json
import os
import re
import struct
import threading
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cbir import images
from cbir.cli import app
from cbir.collection import Collection
from cbir.config import Settings
from cbir.errors import InvalidRequestError, NotFoundError
from cbir.names import from_stored, printable, to_stored
from cbir.store import ImageUpdate, Store

runner = CliRunner()
SPEC = "color-hist"


def cbir(*args: str, code: int = 0) -> str:
    result = runner.invoke(app, [str(a) for a in args], env={"CBIR_WORKERS": "1"})
    assert result.exit_code == code, result.output
    return result.output


def picture(path: Path, value: int = 0, size: int = 32) -> Path:
    rng = np.random.default_rng(value)
    a = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    a[..., value % 3] = (value * 37) % 256
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path, format="PNG")
    return path


def bytes_name(folder: Path, raw: bytes) -> Path:
    return Path(os.fsdecode(os.fsencode(folder) + b"/" + raw))


# -- 1. names that are not UTF-8 --------------------------------------------------------------


def test_names_are_stored_losslessly_and_shown_escaped() -> None:
    name = os.fsdecode(b"/old/disk/\xff\xfe.jpg")
    assert from_stored(to_stored(name)) == name
    assert to_stored("/plain/é.jpg") == "/plain/é.jpg"
    assert printable(name) == "/old/disk/\\xff\\xfe.jpg"
    assert printable("a\nb.jpg") == "a\\nb.jpg"


def test_a_name_that_is_not_utf8_is_indexed_searched_and_removed(tmp_path: Path) -> None:
    folder = tmp_path / "images"
    odd = picture(bytes_name(folder / "sub", b"\xff\xfe.png"), 1)
    label_dir = bytes_name(folder, b"\xe9t\xe9")
    labelled = picture(bytes_name(label_dir, b"a\xff.png"), 2)
    plain = picture(folder / "plain" / "b.png", 3)
    col = Collection(tmp_path / "col", settings=Settings(collection=tmp_path / "col", workers=1))
    report = col.add(folder, descriptors=[SPEC], labels="folder")
    assert (report.added, report.skipped) == (3, [])
    paths = {r.path for r in col.store.images(status="ok")}
    assert paths == {str(odd), str(labelled), str(plain)}
    labels = {r.path: r.label for r in col.store.images()}
    assert labels[str(labelled)] == os.fsdecode(b"\xe9t\xe9")
    hit = col.search(str(odd), k=1).hits[0]
    assert hit.path == str(odd) and Path(hit.path).read_bytes() == odd.read_bytes()
    assert col.remove([label_dir]) == 1
    col.close()
    shown = runner.invoke(
        app, ["search", str(odd), "-k", "1", "-c", str(tmp_path / "col")], env={"COLUMNS": "400"}
    ).output
    assert "\\xff\\xfe.png" in shown
    assert json.loads(cbir("search", odd, "-k", "1", "--json", "-c", tmp_path / "col"))[
        "hits"
    ][0]["path"] == str(odd)


# -- 3. a reader never sees a segment vanish ------------------------------------------------


def test_a_read_survives_compactions_that_keep_removing_its_files(tmp_path: Path) -> None:
    writer = Store(tmp_path / "col")
    record = writer.add_descriptor("d", "d", {}, 4, "euclidean")
    for n in range(3):
        writer.write_batch(
            [ImageUpdate(f"/i/{n}", 1, 1, "h", "ok", vectors={"d": np.full(4, n, np.float32)})]
        )
    reader = Store(tmp_path / "col")
    opened = reader._open_segment
    compactions = {"left": 6}  # more than any fixed number of retries

    def open_after_a_compaction(descriptor_id: int, file: str) -> np.ndarray:
        if compactions["left"]:
            compactions["left"] -= 1
            writer.compact(record.id, force=True)  # the file this read named is gone now
        return opened(descriptor_id, file)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(reader, "_open_segment", open_after_a_compaction)
        _, vectors = reader.load_vectors(record.id)
    assert vectors[:, 0].tolist() == [0.0, 1.0, 2.0] and compactions["left"] == 0
    reader.close()
    writer.close()


def test_searches_while_a_writer_adds_and_compacts_never_fail(tmp_path: Path) -> None:
    writer = Store(tmp_path / "col")
    record = writer.add_descriptor("d", "d", {}, 4, "euclidean")
    done = threading.Event()
    failures: list[BaseException] = []
    reads = [0]

    def read() -> None:
        reader = Store(tmp_path / "col")
        try:
            while not done.is_set():
                ids, _ = reader.load_vectors(record.id)
                if len(ids):
                    reader.vectors_for(record.id, ids[:3])
                for _ in reader.iter_vector_blocks(record.id, 2):
                    pass
                reads[0] += 1
        except BaseException as exc:
            failures.append(exc)
        finally:
            reader.close()

    readers = [threading.Thread(target=read) for _ in range(2)]
    for t in readers:
        t.start()
    for n in range(40):
        writer.write_batch([ImageUpdate(f"/i/{n % 7}", 1, n, "h", "ok",
                                        vectors={"d": np.full(4, n, np.float32)})])  # fmt: skip
        writer.compact(record.id, force=True)
    done.set()
    for t in readers:
        t.join()
    writer.close()
    assert not failures and reads[0] > 0


# -- 4. bounded memory and time --------------------------------------------------------------


def test_a_decode_that_would_allocate_too_much_is_refused_from_the_header() -> None:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((600, 500), np.uint16)).save(buf, format="PNG")
    data = buf.getvalue()
    # 600 x 500 pixels of 2 bytes: 600,000 bytes
    with pytest.raises(images.ImageError, match="600000 bytes"):
        images.decode(data, max_decode_bytes=599_999)
    assert images.decode(data, max_decode_bytes=600_000).size == (500, 600)
    with pytest.raises(ValueError, match="CBIR_MAX_DECODE_BYTES"):
        images.Limits(max_decode_bytes=0)


def test_a_large_file_that_is_no_image_is_refused_without_being_read(tmp_path: Path) -> None:
    sparse = tmp_path / "huge.jpg"
    with open(sparse, "wb") as fh:
        fh.truncate(1 << 30)  # 1 GiB of holes
    reads: list[int] = []
    real_read = os.read

    def counting_read(fd: int, n: int) -> bytes:
        chunk = real_read(fd, n)
        reads.append(len(chunk))
        return chunk

    with pytest.MonkeyPatch.context() as m:
        m.setattr(images.os, "read", counting_read)
        with pytest.raises(images.ImageError, match="not an image file"):
            images.read_file(sparse, 2 << 30)
    assert sum(reads) <= images.SNIFF_BYTES


def test_a_16_bit_grey_image_is_stretched_without_float_copies_of_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(images, "STRETCH_BLOCK_PIXELS", 1 << 16)
    ramp = (np.arange(1500 * 1000, dtype=np.uint32) % 4096).astype(np.uint16).reshape(1000, 1500)
    tracemalloc.start()
    try:
        grey = images._stretch_array(ramp)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    expected = np.rint(ramp.astype(np.float64) * 255 / 4095).astype(np.uint8)
    assert np.abs(grey.astype(int) - expected).max() <= 1
    # the result (half the input's bytes) and a few blocks; a float copy alone is twice it
    assert peak < ramp.nbytes, peak
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, format="PNG")
    assert np.array_equal(np.asarray(images.decode(buf.getvalue()))[..., 0], grey)


# -- 5. settings refused before any work ----------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [
        ("workers", -1, "0 or more"),
        ("max_pixels", 0, "1 or more"),
        ("max_bytes", -5, "1 or more"),
        ("flush_every", 0, "1 or more"),
        ("flush_seconds", 0.0, "more than 0"),
        ("block_rows", 0, "1 or more"),
        ("memory_budget", -1, "0 or more"),
    ],
)
def test_settings_out_of_range_are_refused_naming_the_range(
    tmp_path: Path, field: str, value: object, allowed: str
) -> None:
    with pytest.raises(InvalidRequestError, match=allowed) as caught:
        Settings(collection=tmp_path, **{field: value})
    assert field in str(caught.value)


def test_cbir_index_refuses_bad_flags_before_any_work(tmp_path: Path) -> None:
    picture(tmp_path / "images" / "a.png")
    out = cbir("index", tmp_path / "images", "--max-pixels", "0", "-c", tmp_path / "c1", code=2)
    assert "max_pixels" in out and "1 or more" in out
    out = cbir("index", tmp_path / "images", "--workers", "-1", "-c", tmp_path / "c2", code=2)
    assert "workers" in out and "0 or more" in out
    assert not (tmp_path / "c1").exists() and not (tmp_path / "c2").exists()
    bad_env = runner.invoke(
        app, ["index", str(tmp_path / "images"), "-c", str(tmp_path / "c3")],
        env={"CBIR_FLUSH_EVERY": "0"},
    )  # fmt: skip
    assert bad_env.exit_code == 2 and "CBIR_FLUSH_EVERY" in bad_env.output


# -- 6. a dangling symlink is stored as skipped ---------------------------------------------


def test_a_dangling_symlink_is_kept_as_skipped_and_not_retried(tmp_path: Path) -> None:
    folder = tmp_path / "images"
    picture(folder / "a.png")
    (folder / "gone.png").symlink_to(tmp_path / "nowhere.png")
    (folder / "loop.png").symlink_to(folder / "loop.png")
    settings = Settings(collection=tmp_path / "col", workers=1)
    with Collection(settings=settings) as col:
        first = col.add(folder, descriptors=[SPEC])
        assert {Path(p).name for p, _ in first.skipped} == {"gone.png", "loop.png"}
        skipped = dict(col.skipped())
        assert "No such file" in skipped[str(folder / "gone.png")]
        assert str(folder / "loop.png") in skipped
        again = col.add(folder)
        assert (again.skipped, again.still_skipped) == ([], 2)


# -- 7. a JPEG whose header claims far more than its data ------------------------------------


def test_a_jpeg_mostly_missing_its_data_is_skipped_as_truncated() -> None:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(buf, "JPEG")
    data = bytearray(buf.getvalue())
    sof = data.find(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", 14000, 14000)  # height, width
    with pytest.raises(images.ImageError, match="truncated"):
        images.decode(bytes(data), max_side=256)
    flat = io.BytesIO()  # a real large flat picture costs little, but not that little
    Image.new("RGB", (2048, 2048), (128, 128, 128)).save(flat, "JPEG", quality=50)
    assert images.decode(flat.getvalue(), max_side=256).size == (256, 256)


# -- 8. no collection made by a failed command ----------------------------------------------


def test_a_failed_index_creates_no_collection(tmp_path: Path) -> None:
    picture(tmp_path / "images" / "a.png")
    cbir("index", tmp_path / "images", "-d", "nosuch", "-c", tmp_path / "c1", code=2)
    cbir("index", tmp_path / "missing", "-c", tmp_path / "c2", code=3)
    assert not (tmp_path / "c1").exists() and not (tmp_path / "c2").exists()
    (tmp_path / "file").write_text("x")
    assert "is a file" in cbir("info", "-c", tmp_path / "file", code=2)


# -- 9. results flushed by time as well as by count -----------------------------------------


def test_results_are_committed_every_few_seconds_not_only_every_batch(tmp_path: Path) -> None:
    folder = tmp_path / "images"
    for i in range(12):
        picture(folder / f"{i:02d}.png", i)
    settings = Settings(
        collection=tmp_path / "col", workers=1, flush_every=10_000, flush_seconds=0.05
    )
    committed: list[int] = []
    with Collection(settings=settings) as col:
        reader = Store(tmp_path / "col")
        clock = threading.Event()

        def progress(done: int, total: int) -> None:
            if done == 8:
                committed.append(reader.counts()["ok"])
            clock.wait(0.03)

        col.add(folder, descriptors=[SPEC], progress=progress)
        reader.close()
    assert committed and committed[0] >= 1


# -- 10. small things ------------------------------------------------------------------------


def test_search_on_an_empty_collection_says_so(tmp_path: Path) -> None:
    picture(tmp_path / "q.png")
    with Collection(tmp_path / "col", settings=Settings(workers=1)) as col:
        col.store.add_descriptor(SPEC, SPEC, {}, 288, "hellinger")
        with pytest.raises(NotFoundError, match="no images"):
            col.search(str(tmp_path / "q.png"))
    out = cbir("search", tmp_path / "q.png", "-c", tmp_path / "col", code=3)
    assert "cbir index" in out


def test_exif_warnings_become_notes_on_the_image(tmp_path: Path) -> None:
    im = Image.fromarray(np.full((16, 16, 3), 90, np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 1
    buf = io.BytesIO()
    im.save(buf, "JPEG", exif=exif.tobytes())
    data = bytearray(buf.getvalue())
    start = data.find(b"Exif\x00\x00") + 6
    data[start + 4 : start + 8] = struct.pack("<I", 0xFFFFF0)  # IFD offset past the end
    path = tmp_path / "images" / "bad-exif.jpg"
    path.parent.mkdir()
    path.write_bytes(bytes(data))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning that leaks fails the test
        image = images.decode(bytes(data))
        with Collection(tmp_path / "col", settings=Settings(workers=1)) as col:
            col.add(path.parent, descriptors=[SPEC])
            (record,) = col.store.images(status="ok")
    assert image.info["notes"] and "EXIF" in image.info["notes"][0]
    assert record.reason is not None and "EXIF" in record.reason


def test_help_texts_have_no_stray_gaps() -> None:
    for command in ("index", "search", "info", "check", "remove", "export", "fit", "duplicates"):
        text = " ".join(runner.invoke(app, [command, "--help"], env={"COLUMNS": "400"}).output
                        .replace("│", " ").split())  # fmt: skip
        assert not re.search(r"\s[.;,](\s|$)", text), (command, text)
