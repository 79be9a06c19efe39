"""Collections on disk: incremental indexing, bad files, removal, interruption, search, export."""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cbir.collection import Collection, IndexInterrupted
from cbir.config import Settings
from cbir.errors import BusyError, NotFoundError, UnavailableError
from cbir.images import ImageError
from cbir.search import rrf_fuse
from cbir.store import ImageUpdate
from tests.conftest import COLOURS, colour_image


def _open(settings: Settings, **kw: object) -> Collection:
    s = replace(settings, **kw)
    return Collection(s.collection, settings=s)


def _assert_consistent(col: Collection) -> None:
    """Every ok image has exactly one vector per descriptor, and they are readable."""
    n_ok = col.store.counts()["ok"]
    for d in col.descriptors:
        ids, matrix = col.store.load_vectors(d.id)
        assert len(ids) == n_ok == len(set(ids.tolist()))
        assert matrix.shape == (n_ok, d.dim)
        assert np.isfinite(matrix).all()


def test_search_finds_images_of_the_same_class(colour_set, settings, tmp_path):
    root, _paths = colour_set
    with _open(settings) as col:
        report = col.add(root, descriptors=["color-hist"], labels="folder")
        assert report.added == 20 and not report.skipped
        query = tmp_path / "query.png"
        colour_image(COLOURS["blue"], np.random.default_rng(99)).save(query)
        hits = col.search(query, k=5)
    assert [h.label for h in hits] == ["blue"] * 5
    assert [h.rank for h in hits] == [1, 2, 3, 4, 5]
    assert all(a.score <= b.score for a, b in itertools.pairwise(hits))
    first = hits[0]
    assert first.to_dict() == {
        "rank": 1, "id": first.id, "path": first.path, "score": first.score, "label": "blue"
    }  # fmt: skip
    with pytest.raises(AttributeError):  # a hit cannot be changed under its result
        setattr(first, "score", 0.0)  # noqa: B010


def test_second_run_leaves_unchanged_files_alone(colour_set, settings):
    root, _ = colour_set
    with _open(settings) as col:
        col.add(root, descriptors=["color-hist"])
        again = col.add(root)
    assert (again.added, again.updated, again.extracted, again.unchanged) == (0, 0, 0, 20)


def test_changed_file_is_reextracted_and_touched_file_is_not(colour_set, settings):
    root, paths = colour_set
    with _open(settings) as col:
        col.add(root, descriptors=["color-hist"], labels="folder")
        red = paths["red"][0]
        before = col.search(red, k=1, metric="euclidean")[0]
        assert before.path == str(red.resolve()) and before.score == pytest.approx(0, abs=1e-6)
        # Same bytes, new mtime: hashed, found unchanged, not decoded again.
        st = os.stat(red)
        os.utime(red, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        touched = col.add(root)
        assert (touched.updated, touched.extracted, touched.unchanged) == (0, 0, 20)
        # New content: re-extracted, and the stored vector follows the new content.
        colour_image(COLOURS["green"], np.random.default_rng(5)).save(red)
        os.utime(red, ns=(st.st_atime_ns, st.st_mtime_ns + 2 * 10**9))
        changed = col.add(root)
        assert (changed.updated, changed.extracted) == (1, 1)
        hits = col.search(red, k=5, exclude_queries=True)
        assert [h.label for h in hits].count("green") == 5
        _assert_consistent(col)


def test_adding_a_descriptor_extracts_it_for_existing_images(colour_set, settings):
    root, _ = colour_set
    with _open(settings) as col:
        col.add(root, descriptors=["color-hist"])
        report = col.add(root, descriptors=["lbp"])
        assert (report.updated, report.extracted) == (20, 20)
        info = col.info()
    assert [(d["name"], d["vectors"]) for d in info["descriptors"]] == [
        ("color-hist", 20),
        ("lbp", 20),
    ]


def test_new_collection_gets_the_default_descriptors(colour_set, settings):
    root, _ = colour_set
    with _open(settings) as col:
        col.add(root)
        # a descriptor fitted on the collection (cnn, centred) keeps its raw base beside it
        names = list(dict.fromkeys(d.name for d in col.descriptors))
        assert names == list(settings.default_descriptors)
        assert col.descriptor().name == settings.default_descriptors[0]
        _assert_consistent(col)


def test_bad_files_are_skipped_with_reasons_and_the_run_goes_on(colour_set, settings):
    root, _ = colour_set
    bad = root / "bad"
    bad.mkdir()
    (bad / "empty.jpg").write_bytes(b"")
    (bad / "text.png").write_text("this is not a picture")
    good = root / "red" / "00.png"
    (bad / "truncated.png").write_bytes(good.read_bytes()[:200])
    (root / "notes.txt").write_text("ignored: not an image extension")
    with _open(settings) as col:
        report = col.add(root, descriptors=["color-hist"])
        reasons = dict(report.skipped)
        assert report.added == 20
        assert set(reasons) == {
            str((bad / n).resolve()) for n in ("empty.jpg", "text.png", "truncated.png")
        }
        assert "empty" in reasons[str((bad / "empty.jpg").resolve())]
        assert all(reason for reason in reasons.values())
        assert {f["path"] for f in col.info()["skipped_files"]} == set(reasons)
        # Unchanged bad files are not retried; a repaired one is picked up.
        again = col.add(root)
        assert again.still_skipped == 3 and not again.skipped
        retried = col.add(root, retry_skipped=True)
        assert len(retried.skipped) == 3 and retried.still_skipped == 0
        colour_image(COLOURS["red"], np.random.default_rng(1)).save(bad / "text.png", "PNG")
        repaired = col.add(root)
        assert repaired.added == 1 and len(col) == 21
        _assert_consistent(col)


def test_remove_drops_files_folders_and_missing_ones(colour_set, settings):
    root, paths = colour_set
    with _open(settings) as col:
        col.add(root, descriptors=["color-hist"], labels="folder")
        assert col.remove([paths["red"][0]]) == 1
        assert col.remove([root / "green"]) == 5
        paths["blue"][0].unlink()
        report = col.add(root / "blue")
        assert report.missing == [str(paths["blue"][0].resolve())]
        assert col.remove(missing=True) == 1
        assert len(col) == 13
        hits = col.search(np.zeros(col.descriptor().dim) + 1, k=100, metric="euclidean")
        assert {h.label for h in hits} == {"red", "blue", "yellow"} and len(hits) == 13
        with pytest.raises(NotFoundError, match="not in the collection"):
            col.remove([root / "nowhere.png"])
        _assert_consistent(col)


def test_interrupted_run_keeps_finished_work_and_resumes(colour_set, settings):
    root, _ = colour_set
    seen = []

    def stop_after_ten(done: int, total: int) -> None:
        seen.append(done)
        if done == 10:
            raise KeyboardInterrupt

    with _open(settings, flush_every=4) as col:
        with pytest.raises(IndexInterrupted) as stop:
            col.add(root, descriptors=["color-hist", "lbp"], progress=stop_after_ten)
        assert stop.value.report.interrupted
    with _open(settings) as col:  # reopened, as after a killed process
        assert len(col) == 10
        _assert_consistent(col)
        report = col.add(root)
        assert (report.added, report.unchanged) == (10, 10)
        assert len(col) == 20
        _assert_consistent(col)


def test_a_failed_commit_leaves_the_catalogue_and_no_new_files(colour_set, settings, monkeypatch):
    root, _ = colour_set
    with _open(settings) as col:
        col.add(root / "red", descriptors=["color-hist"])
        files_before = sorted((col.path / "vectors").rglob("*"))
        d = col.descriptors[0]
        update = ImageUpdate(
            path=str(root / "new.png"),
            size=1,
            mtime_ns=1,
            sha256="ab",
            status="ok",
            vectors={d.spec: np.ones(d.dim, np.float32)},
        )

        @contextlib.contextmanager
        def failing_commit():
            raise RuntimeError("disk full")
            yield

        monkeypatch.setattr(col.store, "_transaction", failing_commit)
        with pytest.raises(RuntimeError, match="disk full"):
            col.store.write_batch([update])
        monkeypatch.undo()
        assert len(col) == 5
        assert sorted((col.path / "vectors").rglob("*")) == files_before
        _assert_consistent(col)


def _start_index(root: Path, col_dir: Path, workers: int, flush_every: int) -> subprocess.Popen:
    """`cbir index` in its own process (and process group), as a user would run it."""
    env = {**os.environ, "CBIR_FLUSH_EVERY": str(flush_every), "CBIR_WORKERS": str(workers)}
    cmd = [sys.executable, "-m", "cbir.cli", "index", str(root), "-c", str(col_dir),
           "-d", "color-hist", "-d", "lbp", "-d", "hog"]  # fmt: skip
    from tests.conftest import sigint_default_in_child

    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True,
                            preexec_fn=sigint_default_in_child)  # fmt: skip


def _wait_for_catalogued(proc: subprocess.Popen, col_dir: Path, count: int) -> int:
    """Poll the catalogue (as another reader would) until ``count`` images are in it."""
    done, deadline = 0, time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and done < count:
        time.sleep(0.01)
        with contextlib.suppress(sqlite3.Error):
            con = sqlite3.connect(col_dir / "catalogue.sqlite", timeout=1)
            done = con.execute("SELECT COUNT(*) FROM images").fetchone()[0]
            con.close()
    return done


def test_a_killed_index_run_loses_nothing_and_resumes(tmp_path):
    from tests.conftest import write_colour_set

    write_colour_set(tmp_path / "many", per_class=40, size=320)
    proc = _start_index(tmp_path / "many", tmp_path / "col", workers=1, flush_every=4)
    _wait_for_catalogued(proc, tmp_path / "col", 12)
    proc.kill()
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    with Collection(tmp_path / "col", settings=Settings(workers=1)) as col:
        assert 12 <= len(col) < 160
        _assert_consistent(col)
        report = col.add(tmp_path / "many")
        assert report.added + report.unchanged == 160 and len(col) == 160
        _assert_consistent(col)


def test_ctrl_c_stops_two_workers_cleanly_and_keeps_the_work(tmp_path):
    from tests.conftest import write_colour_set

    write_colour_set(tmp_path / "many", per_class=60, size=320)
    proc = _start_index(tmp_path / "many", tmp_path / "col", workers=2, flush_every=8)
    _wait_for_catalogued(proc, tmp_path / "col", 24)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole group
    _stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and "run the same command again" in " ".join(stderr.split())
    with Collection(tmp_path / "col", settings=Settings(workers=1)) as col:
        kept = len(col)
        assert 24 <= kept < 240
        _assert_consistent(col)
        report = col.add(tmp_path / "many")
        assert report.unchanged == kept and len(col) == 240
        _assert_consistent(col)


def test_orphan_files_of_a_killed_run_are_removed(colour_set, settings):
    root, _ = colour_set
    with _open(settings) as col:
        col.add(root / "red", descriptors=["color-hist"])
        folder = next((col.path / "vectors").iterdir())
        orphan, tmp = folder / "deadbeef.npy", folder / ".tmp-x.npy"
        np.save(orphan, np.zeros((2, 3), np.float32))
        tmp.write_bytes(b"partial")
    with _open(settings) as col:
        col.add(root / "red")
        assert not orphan.exists() and not tmp.exists()
        _assert_consistent(col)


def test_one_writer_at_a_time(colour_set, settings):
    root, _ = colour_set
    with _open(settings) as first, _open(settings) as second:
        first.add(root / "red", descriptors=["color-hist"])
        first.store.acquire()
        with pytest.raises(BusyError, match="another cbir process"):
            second.add(root / "blue")


def test_multi_image_queries_and_combination_modes(colour_set, settings):
    root, paths = colour_set
    with _open(settings) as col:
        col.add(root, descriptors=["color-hist"], labels="folder")
        red, yellow = paths["red"][1], paths["yellow"][1]
        mean = col.search([red, red], k=3, combine="mean")
        single = col.search(red, k=3)
        assert [h.id for h in mean] == [h.id for h in single]
        both = col.search([red, yellow], k=8, combine="min", exclude_queries=True)
        assert {h.label for h in both} == {"red", "yellow"}
        assert str(red.resolve()) not in {h.path for h in both}
        fused = col.search([red, yellow], k=10, combine="rrf")
        own = [[h.id for h in col.search(q, k=20)] for q in (red, yellow)]
        assert [h.id for h in fused] == rrf_fuse(np.array(own), 10)[0].tolist()
        assert {str(red.resolve()), str(yellow.resolve())} <= {h.path for h in fused}
        assert all(a.score >= b.score for a, b in itertools.pairwise(fused))
        with pytest.raises(ValueError, match="combine must be one of"):
            col.search(red, combine="vote")


def test_streaming_search_over_budget_equals_in_memory(colour_set, settings):
    root, paths = colour_set
    with _open(settings) as col:
        col.add(root, descriptors=["color-hist"])
        expected = [(h.id, h.score) for h in col.search(paths["blue"][2], k=7)]
    with _open(settings, memory_budget=0, block_rows=3) as col:
        streamed = [(h.id, h.score) for h in col.search(paths["blue"][2], k=7)]
    assert [i for i, _ in streamed] == [i for i, _ in expected]
    assert np.allclose([s for _, s in streamed], [s for _, s in expected])


def test_clear_errors_for_wrong_arguments(colour_set, settings, tmp_path):
    root, paths = colour_set
    with _open(settings) as col:
        col.add(root / "red", descriptors=["glcm"])
        with pytest.raises(ValueError, match="compares histograms"):
            col.search(paths["red"][0], metric="kl")
        with pytest.raises(ValueError, match=r"unknown metric 'nope'.*euclidean"):
            col.search(paths["red"][0], metric="nope")
        with pytest.raises(NotFoundError, match=r"no vectors for 'lbp'.*--descriptor lbp"):
            col.search(paths["red"][0], descriptor="lbp")
        with pytest.raises(ValueError, match="unknown descriptor"):
            col.search(paths["red"][0], descriptor="sift9000")
        with pytest.raises(ImageError, match=r"not an image|empty"):
            bad = tmp_path / "q.jpg"
            bad.write_bytes(b"")
            col.search(bad)
        with pytest.raises(ValueError, match="labels must be one of"):
            col.add(root, labels="filename")
    with pytest.raises(NotFoundError, match="no collection"):
        Collection(tmp_path / "absent", create=False)


def test_multiprocess_extraction_matches_in_process(tmp_path, settings):
    from tests.conftest import write_colour_set

    root = tmp_path / "many"
    write_colour_set(root, per_class=14)  # 56 images: several chunks for two workers
    with _open(settings, collection=tmp_path / "a", workers=1) as one:
        one.add(root, descriptors=["color-hist", "lbp"])
        ids1, v1 = one.vectors("lbp")
        paths1 = [r.path for r in one.store.records(ids1)]
    with _open(settings, collection=tmp_path / "b", workers=2) as two:
        two.add(root, descriptors=["color-hist", "lbp"])
        ids2, v2 = two.vectors("lbp")
        paths2 = [r.path for r in two.store.records(ids2)]
    order1, order2 = np.argsort(paths1), np.argsort(paths2)
    assert len(paths1) == 56
    np.testing.assert_array_equal(np.array(paths1)[order1], np.array(paths2)[order2])
    np.testing.assert_allclose(v1[order1], v2[order2])


@pytest.mark.parametrize("fmt", ["npy", "parquet"])
def test_export_writes_catalogue_and_aligned_vectors(colour_set, settings, tmp_path, fmt):
    root, _ = colour_set
    (root / "broken.jpg").write_bytes(b"\xff\xd8 nope")
    with _open(settings) as col:
        col.add(root, descriptors=["color-hist"], labels="folder")
        ids, matrix = col.vectors()
        by_id = dict(zip(ids.tolist(), matrix, strict=True))
        files = col.export(tmp_path / "out", format=fmt)
    assert all(f.exists() for f in files)
    if fmt == "npy":
        import csv

        vectors = np.load(tmp_path / "out" / "vectors.npy")
        with open(tmp_path / "out" / "vectors.csv") as fh:
            rows = list(csv.DictReader(fh))
        with open(tmp_path / "out" / "catalogue.csv") as fh:
            catalogue = list(csv.DictReader(fh))
        row_ids = [int(r["id"]) for r in rows]
        assert {r["status"] for r in catalogue} == {"ok", "skipped"} and len(catalogue) == 21
    else:
        import pyarrow.parquet as pq

        table = pq.read_table(tmp_path / "out" / "vectors.parquet")
        vectors = np.array(table.column("vector").to_pylist(), dtype=np.float32)
        row_ids = table.column("id").to_pylist()
        assert pq.read_table(tmp_path / "out" / "catalogue.parquet").num_rows == 21
    assert vectors.shape == (20, matrix.shape[1])
    for row, image_id in enumerate(row_ids):
        np.testing.assert_array_equal(vectors[row], by_id[image_id])


def test_collection_reads_settings_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("CBIR_COLLECTION", str(tmp_path / "env-col"))
    monkeypatch.setenv("CBIR_WORKERS", "1")
    col = Collection()
    assert col.path == tmp_path / "env-col" and col.settings.worker_count == 1
    col.close()
    monkeypatch.setenv("CBIR_WORKERS", "two")
    with pytest.raises(ValueError, match="CBIR_WORKERS must be an integer"):
        Settings.from_env()


def test_relative_and_absolute_paths_name_the_same_image(colour_set, settings, monkeypatch):
    root, paths = colour_set
    monkeypatch.chdir(root)
    with _open(settings) as col:
        col.add(Path("red"), descriptors=["color-hist"])
        col.add(root / "red")
        assert len(col) == 5
        assert col.search(Path("red") / "00.png", k=1)[0].path == str(paths["red"][0].resolve())


def test_late_fusion_merges_the_descriptors_rankings_by_reciprocal_rank(colour_set, settings):
    root, paths = colour_set
    query = paths["red"][0]
    with _open(settings) as col:
        col.add(root, descriptors=["color-hist", "lbp"], labels="folder")
        n = len(col)
        alone = {
            d: [h.id for h in col.search(query, n, descriptor=d)] for d in ("color-hist", "lbp")
        }
        fused = col.search(query, 5, descriptor=["color-hist", "lbp"])
        ids, scores = rrf_fuse(np.array([alone["color-hist"], alone["lbp"]]), 5)
        assert [h.id for h in fused] == ids.tolist()
        np.testing.assert_allclose([h.score for h in fused], scores)
        assert fused[0].score == pytest.approx(2 / 61)  # the query itself is first in both
        # one metric per descriptor, or none
        with_metrics = col.search(query, 5, descriptor=["color-hist", "lbp"], metric=["l1", None])
        assert len(with_metrics) == 5
        with pytest.raises(ValueError, match="one metric per descriptor"):
            col.search(query, 5, descriptor=["color-hist", "lbp"], metric=["l1"])


def test_query_expansion_searches_again_with_the_query_averaged_with_its_top_results(
    colour_set, settings
):
    root, paths = colour_set
    query = paths["red"][1]
    with _open(settings) as col:
        col.add(root, descriptors=["color-hist"])
        record = col.descriptor()
        q = col.query_vectors(str(query), record)[0]
        top = [h.id for h in col.search(query, 3)]
        expanded = np.vstack([q, col.store.vectors_for(record.id, top)]).mean(0)
        want = [h.id for h in col.search(expanded, 5)]
        assert [h.id for h in col.search(query, 5, expand=3)] == want
        with pytest.raises(ValueError, match=r"expand must be an integer in 0\.\.100"):
            col.search(query, 5, expand=-1)


def test_a_copy_of_an_indexed_jpeg_is_found_at_distance_zero(tmp_path, settings):
    """A query is decoded as indexing decoded it (one decode at the size every descriptor of
    the collection needs), so a byte-identical copy gets the stored vector exactly, whatever
    other descriptors were indexed with it (a JPEG's draft decode at a descriptor's own size
    differs from a larger decode shrunk)."""
    rng = np.random.default_rng(5)
    folder = tmp_path / "img"
    folder.mkdir()
    for name in ("a", "b"):
        noise = rng.integers(0, 256, (300, 300, 3), dtype=np.uint8)
        Image.fromarray(noise).save(folder / f"{name}.jpg", quality=90)
    copy = tmp_path / "copy.jpg"
    copy.write_bytes((folder / "a.jpg").read_bytes())
    with _open(settings) as col:
        col.add(folder, descriptors=["color-hist", "lbp"])
        for spec in ("color-hist", "lbp"):
            hits = col.search(copy, k=2, descriptor=spec)
            assert hits[0].path == str((folder / "a.jpg").resolve()), spec
            assert hits[0].score == pytest.approx(0, abs=1e-6), spec


def test_a_descriptor_that_cannot_run_here_does_not_block_the_others(
    colour_set, settings, tmp_path, monkeypatch
):
    """A collection indexed where an extra was installed, opened where it is not: info and a
    search with another descriptor still work; only that descriptor says what to install."""
    from cbir.features import get_descriptor_class
    from cbir.holdings import short_label

    root, paths = colour_set
    with _open(settings) as col:
        col.add(root, descriptors=["color-hist", "lbp"])
    monkeypatch.setattr(
        get_descriptor_class("lbp"),
        "missing_requirements",
        classmethod(lambda cls, params: "pip install 'cbir[imaginary]'"),
    )
    short_label.cache_clear()  # labels are cached by spec; this test changes what can run
    try:
        outside = tmp_path / "query.png"
        outside.write_bytes(paths["red"][0].read_bytes())
        with _open(settings) as col:
            assert [d["vectors"] for d in col.info()["descriptors"]] == [20, 20]
            hits = col.search(outside, k=3, descriptor="color-hist")
            assert hits[0].path == str(paths["red"][0].resolve())
            with pytest.raises(UnavailableError, match=r"cannot run here.*imaginary"):
                col.search(outside, k=3, descriptor="lbp")
    finally:
        short_label.cache_clear()


def test_an_image_array_as_query_says_what_to_give(colour_set, settings):
    root, _ = colour_set
    with _open(settings) as col:
        col.add(root / "red", descriptors=["color-hist"])
        with pytest.raises(ValueError, match=r"vector or a matrix of vectors.*file path"):
            col.search(np.zeros((8, 8, 3), np.uint8))
