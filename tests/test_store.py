"""The collection store: the change feed, the format upgrade, threads, processes, error kinds."""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import subprocess
import sys
import textwrap
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from cbir import store as store_module
from cbir.errors import (
    BusyError,
    CorruptError,
    InvalidRequestError,
    NotFoundError,
    UnavailableError,
)
from cbir.store import ImageUpdate, Store

FIXTURE_V1 = Path(__file__).parent / "fixtures" / "collection-v1"
#: a child process imports this checkout's cbir, whatever is installed
ENV = {**os.environ, "PYTHONPATH": str(Path(store_module.__file__).resolve().parents[1])}
DIM = 8
SMALL_DIM = 4


def vector(n: int, dim: int = DIM) -> np.ndarray:
    """The vector of image number ``n``: known to every test without storing it."""
    return (np.arange(dim, dtype=np.float32) + 1) * n


def update(n: int, *specs: str, status: str = "ok") -> ImageUpdate:
    """The extraction result of image ``/img/<n>.png`` with vectors for ``specs``."""
    dims = {"a": DIM, "b": SMALL_DIM}
    return ImageUpdate(
        path=f"/img/{n}.png",
        size=100 + n,
        mtime_ns=n,
        sha256=f"{n:064x}",
        status=status,
        reason="broken" if status == "skipped" else None,
        vectors={} if status != "ok" else {s: vector(n, dims[s]) for s in specs},
    )


def image_number(path: str) -> int:
    return int(Path(path).stem)


@pytest.fixture
def store(tmp_path: Path):
    with Store(tmp_path / "col") as s:
        s.add_descriptor("a", "a", {}, DIM, "euclidean")
        s.add_descriptor("b", "b", {}, SMALL_DIM, "euclidean")
        s.release()
        yield s


def ids_of(s: Store, *numbers: int) -> list[int]:
    return sorted(s.image_by_path(f"/img/{n}.png").id for n in numbers)


def spec_id(s: Store, spec: str) -> int:
    return next(d.id for d in s.descriptors() if d.spec == spec)


# -- the change feed ------------------------------------------------------------------------------
def test_generations_bump_with_every_change_of_vectors(store: Store) -> None:
    a, b = spec_id(store, "a"), spec_id(store, "b")
    assert store.generations() == {a: 0, b: 0}

    store.write_batch([update(n, "a", "b") for n in range(3)])
    assert store.generations() == {a: 1, b: 1}
    assert store.changes_since(a, 0).added.tolist() == ids_of(store, 0, 1, 2)

    store.write_batch([update(0, "a")])  # only a's vector of image 0 re-extracted
    assert store.generations() == {a: 2, b: 1}

    store.write_batch([update(1, status="unchanged")])  # nothing written: no bump
    assert store.generations() == {a: 2, b: 1}

    store.write_batch([update(1, status="skipped")])  # image 1 loses both vectors
    assert store.generations() == {a: 3, b: 2}
    assert store.changes_since(a, 2).removed.tolist() == ids_of(store, 1)
    assert store.changes_since(b, 1).removed.tolist() == ids_of(store, 1)

    (two,) = ids_of(store, 2)
    (skipped,) = ids_of(store, 1)
    assert store.remove_images([two]) == 1
    assert store.generations() == {a: 4, b: 3}
    assert store.changes_since(a, 3).removed.tolist() == [two]
    store.remove_images([skipped])  # it had no vectors left: nothing changes for them
    assert store.generations() == {a: 4, b: 3}

    (zero,) = ids_of(store, 0)
    store.write_vectors(b, np.array([zero]), vector(7, SMALL_DIM)[None])
    assert store.generations() == {a: 4, b: 4}
    assert store.changes_since(b, 3).added.tolist() == [zero]
    assert store.generation(b) == 4


def test_a_refit_or_a_new_length_resets_the_feed(store: Store) -> None:
    a, b = spec_id(store, "a"), spec_id(store, "b")
    store.write_batch([update(n, "a", "b") for n in range(3)])
    before = store.generation(a)
    store.save_state(a, {"w": np.ones(3)}, images=3)
    now = store.generation(a)
    assert now > before
    assert store.vector_count(a) == 0
    assert store.changes_since(a, before).reset  # every vector went: rebuild
    assert not store.changes_since(a, now).reset
    store.write_batch([update(0, "a")])
    after = store.changes_since(a, now)
    assert not after.reset and after.added.tolist() == ids_of(store, 0)

    before = store.generation(b)
    store.set_dim(b, SMALL_DIM + 1)
    assert store.changes_since(b, before).reset
    assert store.descriptors()[1].dim == SMALL_DIM + 1


def test_compaction_moves_rows_without_bumping(store: Store) -> None:
    a = spec_id(store, "a")
    for n in range(store_module.MAX_SEGMENTS + 2):  # one segment per batch
        store.write_batch([update(n, "a")])
    store.write_batch([update(0, "a")])  # a dead row too
    gens = store.generations()
    ids, before = store.load_vectors(a)
    assert store.compact(a, force=True)
    assert store.generations() == gens
    ids_after, after = store.load_vectors(a)
    order, order_after = np.argsort(ids), np.argsort(ids_after)
    assert np.array_equal(ids[order], ids_after[order_after])
    assert np.array_equal(before[order], after[order_after])
    assert len(list((store.root / "vectors" / str(a)).iterdir())) == 1


def test_changes_since_keeps_the_last_change_of_each_image(store: Store) -> None:
    a = spec_id(store, "a")
    store.write_batch([update(n, "a") for n in range(4)])  # generation 1
    zero, one, two, three = ids_of(store, 0, 1, 2, 3)
    store.write_batch([update(1, status="skipped")])  # 1 removed ...
    store.write_batch([update(1, "a")])  # ... then written again: added
    store.remove_images([two])  # 2 removed
    store.write_batch([update(0, "a")])  # 0 replaced
    store.write_batch([update(0, "a")])  # and replaced again: once in the answer

    since_first = store.changes_since(a, 1)
    assert not since_first.reset
    assert since_first.added.tolist() == [zero, one]
    assert since_first.removed.tolist() == [two]
    assert since_first.added.dtype == np.int64 and since_first.removed.dtype == np.int64

    since_start = store.changes_since(a, 0)  # 2 was added, then removed: removed
    assert since_start.added.tolist() == [zero, one, three]
    assert since_start.removed.tolist() == [two]
    assert since_start.generation == store.generation(a)

    now = store.generation(a)
    assert store.changes_since(a, now).added.size == 0
    assert store.changes_since(a, now + 5).reset  # not a generation this collection had
    with pytest.raises(NotFoundError):
        store.changes_since(99, 0)


def test_the_log_is_pruned_and_a_reader_behind_the_floor_rebuilds(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    bound_floor = 6
    monkeypatch.setattr(store_module, "LOG_MIN_ROWS", bound_floor)
    monkeypatch.setattr(store_module, "LOG_ROWS_PER_VECTOR", 1)
    a = spec_id(store, "a")
    store.write_batch([update(n, "a") for n in range(2)])
    # the ids with a vector after each generation, as a reader would have them
    states = {0: set(), 1: set(ids_of(store, 0, 1))}
    for step in range(30):  # add an image, rewrite one, skip the new one: few vectors, long log
        n = 10 + step
        if step % 3 == 0:
            store.write_batch([update(n, "a")])
        elif step % 3 == 1:
            store.write_batch([update(0, "a")])
        else:
            store.write_batch([update(n - 2, status="skipped")])
        states[store.generation(a)] = {int(i) for i in store.load_vectors(a)[0]}
    assert len(states) == store.generation(a) + 1  # one generation per write

    with sqlite3.connect(store.root / "catalogue.sqlite") as raw:
        rows = raw.execute("SELECT COUNT(*) FROM changes WHERE descriptor_id = ?", (a,)).fetchone()
    assert rows[0] <= bound_floor

    now = store.generation(a)
    assert store.changes_since(a, 0).reset
    assert store.changes_since(a, 1).reset
    resets = [g for g in range(now + 1) if store.changes_since(a, g).reset]
    assert resets == list(range(len(resets)))  # a floor: everything older rebuilds
    assert len(resets) < now  # and the recent past is still answered
    for g in range(len(resets), now + 1):  # a reader at g catches up exactly
        changes = store.changes_since(a, g)
        assert not changes.reset
        added, removed = set(changes.added.tolist()), set(changes.removed.tolist())
        assert not added & removed
        assert (states[g] - removed) | added == states[now]


def test_another_process_changes_are_seen_without_reopening(store: Store) -> None:
    a = spec_id(store, "a")
    store.write_batch([update(0, "a")])
    seen = store.generation(a)
    snippet = textwrap.dedent(
        f"""
        import numpy as np
        from cbir.store import ImageUpdate, Store
        with Store({str(store.root)!r}, create=False) as s:
            s.write_batch([
                ImageUpdate(path=f"/img/{{n}}.png", size=1, mtime_ns=1, sha256=None,
                            status="ok", vectors={{"a": (np.arange({DIM}) + 1.0) * n}})
                for n in (5, 6, 7)
            ])
        """
    )
    subprocess.run([sys.executable, "-c", snippet], check=True, env=ENV, timeout=60)
    changes = store.changes_since(a, seen)
    assert not changes.reset
    assert changes.added.tolist() == ids_of(store, 5, 6, 7)
    got = store.vectors_for(a, changes.added)
    expected = np.stack([vector(n) for n in (5, 6, 7)])
    assert np.array_equal(got, expected)


def test_what_searches_keep_between_queries_follows_every_change(store: Store) -> None:
    """Descriptors, generations and hit names are kept between searches; a change by this
    store, by another thread's connection or by another process is seen at the next read."""
    store.write_batch([update(n, "a") for n in (1, 2)])
    one, two = ids_of(store, 1, 2)
    assert store.names([two, one]) == [("/img/2.png", None), ("/img/1.png", None)]
    store.set_labels({"/img/1.png": "cat"})  # this store
    assert store.names([one]) == [("/img/1.png", "cat")]
    with Store(store.root, create=False) as other:  # another connection
        other.set_labels({"/img/2.png": "dog"})
        other.add_descriptor("c", "c", {}, DIM, "cosine")
    assert store.names([one, two]) == [("/img/1.png", "cat"), ("/img/2.png", "dog")]
    assert [d.spec for d in store.descriptors()] == ["a", "b", "c"]
    before = store.generation(spec_id(store, "a"))
    snippet = textwrap.dedent(
        f"""
        from cbir.store import Store
        with Store({str(store.root)!r}, create=False) as s:
            s.remove_images([{one}])
            s.set_labels({{"/img/2.png": "owl"}})
        """
    )
    subprocess.run([sys.executable, "-c", snippet], check=True, env=ENV, timeout=60)
    assert store.generation(spec_id(store, "a")) > before
    assert store.names([two]) == [("/img/2.png", "owl")]
    with pytest.raises(KeyError):
        store.names([one])


def test_a_pinned_block_sees_other_commits_at_its_next_read_and_its_own_at_once(
    store: Store,
) -> None:
    """Inside ``pinned()`` (what a search runs in) the catalogue is read as it was at the start
    for other connections' commits, while this store's own still count; after it, the next read
    sees everything."""
    store.write_batch([update(1, "a")])
    (one,) = ids_of(store, 1)
    assert store.names([one]) == [("/img/1.png", None)]
    with store.pinned():
        with Store(store.root, create=False) as other:
            other.set_labels({"/img/1.png": "cat"})
        assert store.names([one]) == [("/img/1.png", None)]  # one reading for the block
        with store.pinned():  # nested: the outer pin holds
            assert store.names([one]) == [("/img/1.png", None)]
        store.set_labels({"/img/1.png": "dog"})  # this store's commit counts at once
        assert store.names([one]) == [("/img/1.png", "dog")]
    with Store(store.root, create=False) as other:
        other.set_labels({"/img/1.png": "owl"})
    assert store.names([one]) == [("/img/1.png", "owl")]


def test_threads_that_take_turns_keep_what_they_read(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A service searches from several threads in turn: each keeps its own reading of the
    descriptors while the catalogue is unchanged, instead of the threads evicting each
    other's."""
    reads = []
    read = store._read_descriptors
    monkeypatch.setattr(store, "_read_descriptors", lambda: reads.append(1) or read())
    with ThreadPoolExecutor(1) as a, ThreadPoolExecutor(1) as b:
        for _ in range(5):
            for pool in (a, b):
                assert [d.spec for d in pool.submit(store.descriptors).result()] == ["a", "b"]
    assert len(reads) == 2  # once per thread


def test_names_and_records_of_more_ids_than_a_query_binds(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past ``MAX_BOUND_IDS`` the ids go to SQLite as one JSON list: same rows, same order."""
    store.write_batch([update(n, "a") for n in range(6)])
    ids = ids_of(store, *range(6))[::-1]
    paths = [f"/img/{n}.png" for n in range(5, -1, -1)]
    for bound in (len(ids), 2):
        monkeypatch.setattr(store_module, "MAX_BOUND_IDS", bound)
        store.set_labels({"/img/0.png": f"read with {bound}"})  # a commit: names read again
        assert [p for p, _ in store.names(np.asarray(ids))] == paths
        assert store.names([ids[-1]]) == [("/img/0.png", f"read with {bound}")]
        assert [r.path for r in store.records(ids)] == paths


# -- reading vectors ------------------------------------------------------------------------------
def test_vectors_for_keeps_the_order_given(store: Store) -> None:
    a = spec_id(store, "a")
    store.write_batch([update(n, "a") for n in range(3)])
    store.write_batch([update(n, "a") for n in range(3, 6)])  # two segments
    order = (4, 1, 4, 0)
    ids = [store.image_by_path(f"/img/{n}.png").id for n in order]
    assert np.array_equal(store.vectors_for(a, ids), np.stack([vector(n) for n in order]))
    assert store.vectors_for(a, []).shape == (0, DIM)
    with pytest.raises(KeyError):
        store.vectors_for(a, [*ids, 12345])


# -- the version-1 format -------------------------------------------------------------------------
@pytest.fixture
def v1(tmp_path: Path) -> Path:
    path = tmp_path / "v1"
    shutil.copytree(FIXTURE_V1, path, ignore=shutil.ignore_patterns("README.md"))
    return path


def _raw(path: Path, sql: str, args: tuple = ()) -> list[tuple]:
    with sqlite3.connect(path / "catalogue.sqlite") as db:
        return db.execute(sql, args).fetchall()


def _v1_vectors(path: Path, descriptor_id: int) -> dict[int, np.ndarray]:
    """image id -> vector, straight from the fixture's files."""
    rows = _raw(
        path,
        "SELECT v.image_id, s.file, v.row FROM vectors v JOIN segments s ON s.id = v.segment_id "
        "WHERE v.descriptor_id = ?",
        (descriptor_id,),
    )
    return {i: np.load(path / "vectors" / str(descriptor_id) / f)[row] for i, f, row in rows}


def test_a_version_1_collection_is_read_as_it_is(v1: Path) -> None:
    catalogue = v1 / "catalogue.sqlite"
    digest = hashlib.sha256(catalogue.read_bytes()).hexdigest()
    with Store(v1, create=False) as s:
        descriptors = s.descriptors()
        assert [d.name for d in descriptors] == ["color-hist", "lbp"]
        assert s.counts() == {"ok": 8, "skipped": 0}
        assert s.generations() == {d.id: 0 for d in descriptors}
        for d in descriptors:
            ids, matrix = s.load_vectors(d.id)
            expected = _v1_vectors(v1, d.id)
            assert sorted(ids.tolist()) == sorted(expected) and len(ids) == 8
            assert np.array_equal(matrix, np.stack([expected[i] for i in ids.tolist()]))
            assert np.array_equal(s.vectors_for(d.id, ids[:3]), matrix[:3])
            nothing = s.changes_since(d.id, 0)
            assert not nothing.reset and nothing.added.size == nothing.removed.size == 0
            assert s.changes_since(d.id, 1).reset
        assert set(s.labels(ids)) == {"red", "green", "blue", "yellow"}
    assert hashlib.sha256(catalogue.read_bytes()).hexdigest() == digest  # not written
    assert _raw(v1, "SELECT value FROM meta WHERE key = 'format_version'") == [("1",)]


def test_a_version_1_collection_is_upgraded_on_its_first_write(v1: Path) -> None:
    with Store(v1, create=False) as s:
        hist = s.descriptors()[0]
        before = {d.id: s.load_vectors(d.id) for d in s.descriptors()}
        first = s.images()[0]
        s.set_labels({first.path: "relabelled"})  # the first write takes the lock: upgrade
        assert _raw(v1, "SELECT value FROM meta WHERE key = 'format_version'") == [("2",)]
        assert s.generations() == {d.id: 0 for d in s.descriptors()}
        assert s.records([first.id])[0].label == "relabelled"
        for d in s.descriptors():  # the vectors are still the fixture's
            ids, matrix = s.load_vectors(d.id)
            assert np.array_equal(ids, before[d.id][0])
            assert np.array_equal(matrix, before[d.id][1])
        new = np.full(hist.dim, 0.5, np.float32)
        s.write_vectors(hist.id, np.array([first.id]), new[None])
        assert s.generation(hist.id) == 1
        changes = s.changes_since(hist.id, 0)
        assert changes.added.tolist() == [first.id] and not changes.reset
        assert np.array_equal(s.vectors_for(hist.id, [first.id])[0], new)
    with Store(v1, create=False) as again:
        assert again.generation(hist.id) == 1


def test_a_newer_format_is_refused(v1: Path) -> None:
    with sqlite3.connect(v1 / "catalogue.sqlite") as db:
        db.execute("UPDATE meta SET value = '3' WHERE key = 'format_version'")
    with pytest.raises(UnavailableError) as err:
        Store(v1, create=False)
    message = str(err.value)
    assert "format 3" in message and f"up to {store_module.FORMAT_VERSION}" in message
    assert "upgrade cbir" in message


# -- threads --------------------------------------------------------------------------------------
def test_readers_in_threads_see_consistent_states_while_one_thread_writes(store: Store) -> None:
    a = spec_id(store, "a")
    batches, per_batch = 24, 5
    done = threading.Event()

    def write() -> None:
        try:
            for k in range(batches):
                store.write_batch([update(k * per_batch + j, "a") for j in range(per_batch)])
                store.compact(a)  # runs now and then: segment files vanish under readers
        finally:
            done.set()

    def read() -> int:
        seen, reads = 0, 0
        while not done.is_set() or reads < 2:
            before = store.generations()[a]
            ids, matrix = store.load_vectors(a)
            after = store.generations()[a]
            assert before * per_batch <= len(ids) <= after * per_batch
            assert len(ids) >= seen  # counts never go down
            seen = len(ids)
            numbers = [image_number(r.path) for r in store.records(ids)]
            expected = np.stack([vector(n) for n in numbers]) if numbers else matrix
            assert np.array_equal(matrix, expected)
            some = ids[::7]
            assert np.array_equal(store.vectors_for(a, some), matrix[::7])
            reads += 1
        return reads

    with ThreadPoolExecutor(max_workers=5) as pool:
        readers = [pool.submit(read) for _ in range(4)]
        writer = pool.submit(write)
        writer.result(timeout=120)
        assert all(r.result(timeout=120) >= 2 for r in readers)
    assert store.vector_count(a) == batches * per_batch


def test_a_second_writer_thread_gets_busy(store: Store) -> None:
    holding, leave = threading.Event(), threading.Event()

    def hold() -> None:
        store.acquire()
        holding.set()
        leave.wait(30)
        store.release()

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        assert holding.wait(30)
        with pytest.raises(BusyError, match="another thread"):
            store.acquire()
        with pytest.raises(BusyError, match="another thread"):
            store.write_batch([update(0, "a")])
        store.release()  # not the holder: gives nothing back
        assert store.counts()["ok"] == 0  # reading goes on meanwhile
    finally:
        leave.set()
        thread.join(30)
    store.write_batch([update(0, "a")])  # free again
    assert store.counts()["ok"] == 1


def _open_catalogues(root: Path) -> int:
    """File descriptors of this process open on the catalogue (one per SQLite connection)."""
    fds = Path("/proc/self/fd")
    return sum(1 for fd in fds.iterdir() if os.path.realpath(fd) == str(root / "catalogue.sqlite"))


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
def test_connections_of_ended_threads_are_closed(tmp_path: Path) -> None:
    s = Store(tmp_path / "col")
    root = s.root.resolve()
    threads = 40
    for _ in range(threads):  # a service running each request in a new thread
        thread = threading.Thread(target=s.counts)
        thread.start()
        thread.join()
    # the main thread's and the last thread's, and a descriptor SQLite may keep for reuse; not
    # one per thread
    assert _open_catalogues(root) < threads // 4
    s.close()
    assert _open_catalogues(root) == 0


# -- error kinds ----------------------------------------------------------------------------------
def test_a_missing_collection_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="no collection at"):
        Store(tmp_path / "nothing", create=False)
    assert not (tmp_path / "nothing").exists()


def test_a_file_is_not_a_collection_directory(tmp_path: Path) -> None:
    file = tmp_path / "photo.jpg"
    file.write_bytes(b"not a folder")
    for create in (True, False):
        with pytest.raises(InvalidRequestError, match="is a file, not a collection directory"):
            Store(file, create=create)


def test_a_second_writer_process_gets_busy(store: Store) -> None:
    snippet = textwrap.dedent(
        f"""
        import sys
        from cbir.store import Store
        s = Store({str(store.root)!r}, create=False)
        s.acquire()
        print("holding", flush=True)
        sys.stdin.readline()
        s.close()
        """
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", snippet],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "holding"
        with pytest.raises(BusyError, match="another cbir process"):
            store.acquire()
        with pytest.raises(BusyError):
            store.write_batch([update(0, "a")])
    finally:
        holder.communicate("\n", timeout=30)  # returns once it has exited: the lock is free
    store.write_batch([update(0, "a")])
    assert store.counts()["ok"] == 1


def test_lost_vectors_and_wrong_lengths_are_corrupt(store: Store) -> None:
    a = spec_id(store, "a")
    with pytest.raises(CorruptError, match=f"expected {SMALL_DIM}"):
        store.write_batch([update(0, "a", "b"), _wrong_length()])
    assert store.counts()["ok"] == 0  # nothing of the batch was written ...
    assert not any((store.root / "vectors").rglob("*.npy"))  # ... nor left behind
    with pytest.raises(CorruptError, match="expected"):
        store.write_vectors(a, np.array([1]), np.ones((1, DIM + 1)))
    store.write_batch([update(0, "a")])
    for f in (store.root / "vectors" / str(a)).iterdir():
        f.unlink()
    with pytest.raises(CorruptError, match="missing or unreadable"):
        store.load_vectors(a)
    assert not hasattr(store_module, "StoreError")


def _wrong_length() -> ImageUpdate:
    u = update(1, "a", "b")
    u.vectors["b"] = np.ones(SMALL_DIM - 1, np.float32)
    return u
