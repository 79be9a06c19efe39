"""A long-running process and the collection changing under it: the change feed keeps its
indexes current, and a run can be stopped from another thread.

These are what a search service relies on: ``cbir index`` in another process adds images, and
searches here find them without reopening; a removal here or there drops them from results.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from cbir.collection import Collection, IndexInterrupted, IndexReport
from cbir.config import Settings
from cbir.index.exact import ExactIndex
from cbir.index.manager import SegmentScan
from tests.conftest import write_colour_set


def _cli(*args: object) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "cbir.cli", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                          env={"CBIR_WORKERS": "1", "PATH": "/usr/bin:/bin"})  # fmt: skip


def test_a_search_here_sees_what_another_process_indexed(tmp_path):
    write_colour_set(tmp_path / "a", per_class=3, seed=1)
    write_colour_set(tmp_path / "b", per_class=3, seed=2)
    col_dir = tmp_path / "col"
    assert _cli("index", tmp_path / "a", "-c", col_dir, "-d", "color-hist").returncode == 0
    with Collection(col_dir, settings=Settings(collection=col_dir, workers=1)) as col:
        query = tmp_path / "b" / "red" / "00.png"
        before = col.search(query, k=50)
        assert len(before) == 12
        index = col.index(col.descriptor(), "hellinger")
        # another process adds the second folder while this one keeps its index in RAM
        done = _cli("index", tmp_path / "b", "-c", col_dir)
        assert done.returncode == 0, done.stderr
        after = col.search(query, k=50)
        assert len(after) == 24
        assert after[0].path == str(query.resolve())
        assert after[0].score == pytest.approx(0, abs=1e-6)
        # caught up in place, not rebuilt: the same index object, now with every image
        assert col.index(col.descriptor(), "hellinger") is index and len(index) == 24
        # and the same as a fresh process would rank
        with Collection(col_dir, settings=Settings(collection=col_dir, workers=1)) as fresh:
            want = fresh.search(query, k=50)
        assert [h.id for h in after] == [h.id for h in want]
        # a removal in the other process drops its images from this one's results
        assert _cli("remove", tmp_path / "b" / "red", "-c", col_dir).returncode == 0
        gone = col.search(query, k=50)
        assert len(gone) == 21 and not any("/b/red/" in h.path for h in gone)


def test_removal_in_this_process_and_a_refit_are_followed(tmp_path):
    write_colour_set(tmp_path / "img", per_class=3)
    settings = Settings(collection=tmp_path / "col", workers=1)
    with Collection(settings=settings) as col:
        col.add(tmp_path / "img", descriptors=["color-hist"])
        query = np.full(col.descriptor().dim, 1.0, np.float32)
        assert len(col.search(query, k=50, metric="euclidean")) == 12
        col.remove([tmp_path / "img" / "blue"])
        hits = col.search(query, k=50, metric="euclidean")
        assert len(hits) == 9 and not any("/blue/" in h.path for h in hits)


def test_the_memory_budget_chooses_ram_or_streaming(tmp_path):
    write_colour_set(tmp_path / "img", per_class=2)
    settings = Settings(collection=tmp_path / "col", workers=1)
    with Collection(settings=settings) as col:
        col.add(tmp_path / "img", descriptors=["color-hist"])
        record = col.descriptor()
        assert isinstance(col.index(record, "chi2"), ExactIndex)
        result = col.search(tmp_path / "img" / "red" / "00.png", k=3)
        assert result.indexes == ("exact",)
    with Collection(settings=Settings(collection=tmp_path / "col", memory_budget=0)) as col:
        assert isinstance(col.index(col.descriptor(), "chi2"), SegmentScan)
        streamed = col.search(tmp_path / "img" / "red" / "00.png", k=3)
        assert streamed.indexes == ("exact-stream",)
        assert [h.id for h in streamed] == [h.id for h in result]


def test_an_index_run_stopped_from_another_thread_keeps_its_work(tmp_path):
    write_colour_set(tmp_path / "img", per_class=30, size=64)  # 120 images
    settings = Settings(collection=tmp_path / "col", workers=1, flush_every=8)
    stop = threading.Event()
    outcome: dict[str, IndexReport] = {}

    def progress(done: int, total: int) -> None:
        if done == 20:
            stop.set()  # as a server's "cancel job" would, from its own thread

    def job() -> None:
        with Collection(settings=settings) as col:
            try:
                col.add(tmp_path / "img", descriptors=["fotf"], progress=progress, cancel=stop)
            except IndexInterrupted as exc:
                outcome["report"] = exc.report

    worker = threading.Thread(target=job)
    worker.start()
    worker.join(timeout=120)
    assert not worker.is_alive()
    report = outcome["report"]
    assert report.interrupted and 20 <= report.added < 120
    with Collection(settings=settings) as col:
        kept = len(col)
        assert kept == report.added
        again = col.add(tmp_path / "img")
        assert again.unchanged == kept and again.added == 120 - kept and len(col) == 120


def test_searches_from_several_threads_while_one_indexes(tmp_path):
    write_colour_set(tmp_path / "first", per_class=4, seed=3)
    write_colour_set(tmp_path / "second", per_class=10, seed=4, size=64)
    settings = Settings(collection=tmp_path / "col", workers=1, flush_every=4)
    with Collection(settings=settings) as col:
        col.add(tmp_path / "first", descriptors=["color-hist"])
        query = tmp_path / "first" / "green" / "01.jpg"
        errors: list[BaseException] = []
        sizes: list[int] = []
        stop = threading.Event()

        def searcher() -> None:
            while not stop.is_set():
                try:
                    result = col.search(query, k=100)
                    sizes.append(len(result))
                    assert result[0].path == str(Path(query).resolve())
                except BaseException as exc:  # pragma: no cover - reported below
                    errors.append(exc)
                    return

        threads = [threading.Thread(target=searcher) for _ in range(3)]
        for t in threads:
            t.start()
        col.add(tmp_path / "second")
        stop.set()
        for t in threads:
            t.join()
        assert not errors, errors[0]
        assert min(sizes) >= 16 and len(col.search(query, k=100)) == 56


def test_a_new_vector_length_rebuilds_a_streamed_index(tmp_path):
    """A refit that changes the vector length (cnnp's classes) must not leave a stale index."""
    write_colour_set(tmp_path / "img", per_class=2)
    settings = Settings(collection=tmp_path / "col", workers=1, memory_budget=0)
    with Collection(settings=settings) as col:
        col.add(tmp_path / "img", descriptors=["fotf"])
        record = col.descriptor()
        assert len(col.search(np.ones(record.dim), k=3)) == 3
        ids, _ = col.vectors()
        col.store.set_dim(record.id, 4)
        col.store.write_vectors(record.id, ids, np.ones((len(ids), 4), np.float32))
        col.store.release()
        hits = col.search(np.ones(4), k=3)
        assert len(hits) == 3 and hits[0].score == pytest.approx(0, abs=1e-6)
