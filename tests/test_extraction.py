"""Tests for cbir.extraction: cancellation, crash isolation, limits. Images are generated here."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from cbir import extraction, images
from cbir.config import Settings
from cbir.extraction import CRASH_REASON, Task, WorkerCrashError, extract_chunk, run_tasks
from cbir.features import create_descriptor, registry
from cbir.store import ImageUpdate

#: The colour of an image that makes the ``crashy`` test plug-in kill its process.
MAGIC = (13, 37, 251)
SIDE = 16  # pixels a side of the generated images
N_TASKS = 40
KILLER = 17  # index of the image that kills its worker
#: Seconds a test waits for something that should take well under one.
PATIENCE = 60

CRASHY_PLUGIN = f'''
"""A test-only descriptor: mean colour, but it kills its process on a {MAGIC} image."""

import os

import numpy as np

from cbir.features import Descriptor, register_descriptor
from cbir.images import InputSpec

MAGIC = {MAGIC}


@register_descriptor
class Crashy(Descriptor):
    """Mean RGB colour; calls os._exit(1) when an image's top-left pixel is MAGIC."""

    name = "crashy"
    default_metric = "euclidean"

    def __init__(self) -> None:
        pass

    @property
    def dim(self) -> int:
        return 3

    @property
    def input_spec(self) -> InputSpec:
        return InputSpec(mode="RGB", max_side=32)

    def transform(self, images):
        for image in images:
            if tuple(int(v) for v in image[0, 0]) == MAGIC:
                os._exit(1)
        out = [np.asarray(image, np.float32).reshape(-1, 3).mean(axis=0) for image in images]
        return np.asarray(out, np.float32).reshape(len(images), 3)
'''


# -- helpers -------------------------------------------------------------------------------------


def write_images(folder: Path, n: int, killers: tuple[int, ...] = ()) -> list[Path]:
    """``n`` small noisy PNGs; those at ``killers`` are all MAGIC."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        if i in killers:
            a = np.empty((SIDE, SIDE, 3), np.uint8)
            a[:] = MAGIC
        else:
            a = np.random.default_rng(i).integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)
            a[0, 0] = (0, 0, 0)  # never MAGIC
        path = folder / f"{i:03d}.png"
        Image.fromarray(a).save(path)
        paths.append(path)
    return paths


def mean_colour(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), np.float32).reshape(-1, 3).mean(axis=0)


def tasks_for(paths: list[Path], spec: str = "fotf") -> list[Task]:
    return [Task(path=str(p), specs=(spec,)) for p in paths]


class Collect:
    """An ``on_result`` that keeps every update (and can act on the first)."""

    def __init__(self, on_first: Callable[[], None] | None = None) -> None:
        self.updates: list[ImageUpdate] = []
        self.on_first = on_first

    def __call__(self, update: ImageUpdate) -> None:
        self.updates.append(update)
        if len(self.updates) == 1 and self.on_first is not None:
            self.on_first()

    @property
    def by_path(self) -> dict[str, ImageUpdate]:
        counts = Counter(u.path for u in self.updates)
        assert max(counts.values(), default=1) == 1, "a path was delivered twice"
        return {u.path: u for u in self.updates}


@pytest.fixture
def crashy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Install the ``crashy`` plug-in as a real package (module + dist-info with an entry point
    under ``cbir.descriptors``) on PYTHONPATH, so spawned workers find it as users' would."""
    registry.descriptor_names()  # the built-ins, loaded before the plug-in can be seen
    root = tmp_path / "plugins"
    dist = root / "crashy_plugin-0.0.dist-info"
    dist.mkdir(parents=True)
    (root / "crashy_plugin.py").write_text(textwrap.dedent(CRASHY_PLUGIN))
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: crashy-plugin\nVersion: 0.0\n")
    (dist / "entry_points.txt").write_text("[cbir.descriptors]\ncrashy = crashy_plugin:Crashy\n")
    path = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))
    monkeypatch.setenv("PYTHONPATH", path)
    monkeypatch.syspath_prepend(str(root))
    # A registry of our own for the test (with the built-ins), so the plug-in is gone afterwards.
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_ALIASES", dict(registry._ALIASES))
    monkeypatch.setattr(registry, "_loaded", False)
    yield
    sys.modules.pop("crashy_plugin", None)
    for key in [k for k in extraction._DESCRIPTORS if k[0] == "crashy"]:
        del extraction._DESCRIPTORS[key]


# -- a worker that dies loses nothing ----------------------------------------------------------


def test_the_file_that_kills_its_worker_is_skipped_and_the_rest_delivered(
    tmp_path: Path, crashy: None
) -> None:
    paths = write_images(tmp_path / "images", N_TASKS, killers=(KILLER,))
    got = Collect()
    finished = run_tasks(
        tasks_for(paths, "crashy"), workers=2, limits=images.Limits(), on_result=got
    )
    assert finished
    by_path = got.by_path
    assert sorted(by_path) == sorted(map(str, paths))
    killer = by_path.pop(str(paths[KILLER]))
    assert (killer.status, killer.reason) == ("skipped", CRASH_REASON)
    assert killer.size == paths[KILLER].stat().st_size  # recorded: not retried until it changes
    for path, update in by_path.items():
        assert update.status == "ok", update.reason
        np.testing.assert_allclose(update.vectors["crashy"], mean_colour(Path(path)), rtol=1e-5)


def test_collection_lists_the_file_that_kills_its_worker(tmp_path: Path, crashy: None) -> None:
    import cbir

    killer = N_TASKS - 1  # the last: once it is isolated no work is left, so one pool fewer
    paths = write_images(tmp_path / "images", N_TASKS, killers=(killer,))
    settings = Settings(collection=tmp_path / "col", workers=2)
    with cbir.Collection(tmp_path / "col", settings=settings) as col:
        col.add(tmp_path / "images", descriptors=["crashy"])
        skipped = {Path(p).name: reason for p, reason in col.skipped()}
        assert skipped == {paths[killer].name: CRASH_REASON}
        assert len(col) == N_TASKS - 1


class FakePool:
    """A stand-in for ProcessPoolExecutor that breaks like one, in threads and at once.

    Up to ``max_workers`` submitted pieces run together; if one of them holds a path in
    ``killers`` the pool breaks: every piece not finished fails with BrokenProcessPool and
    further submits raise it. Pieces that were not started can be cancelled.
    """

    killers: frozenset[str] = frozenset()
    created = 0

    def __init__(self, max_workers: int, **kwargs: Any) -> None:
        FakePool.created += 1
        self.max_workers = max_workers
        self.queue: list[tuple[Future[Any], Callable[..., Any], tuple[Any, ...]]] = []
        self.lock = threading.Lock()
        self.broken = False
        self.closed = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        with self.lock:
            if self.broken:
                raise BrokenProcessPool("a fake worker died")
            future: Future[Any] = Future()
            self.queue.append((future, fn, args))
            return future

    def _run(self) -> None:
        while not self.closed.wait(0.002):
            with self.lock:
                batch = [item for item in self.queue if not item[0].cancelled()]
                batch = batch[: self.max_workers]
                if not batch:
                    continue
                if any(t.path in self.killers for _, _, args in batch for t in args[0]):
                    self.broken = True
                    victims, self.queue = self.queue, []
                else:
                    victims = []
                    self.queue = [item for item in self.queue if item not in batch]
            for future, _, _ in victims:
                if future.set_running_or_notify_cancel():
                    future.set_exception(BrokenProcessPool("a fake worker died"))
            if victims:
                return
            for future, fn, args in batch:
                if future.set_running_or_notify_cancel():
                    future.set_result(fn(*args))

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        self.closed.set()
        self.thread.join()
        for future, _, _ in self.queue:
            future.cancel()


@pytest.fixture
def fake_pool(monkeypatch: pytest.MonkeyPatch) -> type[FakePool]:
    monkeypatch.setattr(extraction, "ProcessPoolExecutor", FakePool)
    monkeypatch.setattr(FakePool, "created", 0)
    return FakePool


@pytest.mark.parametrize(
    "killers",
    [(0,), (5, 6), (3, 9, 10, 11, 39), tuple(range(8))],
    ids=["first", "adjacent", "several", "a whole chunk and more"],
)
def test_recovery_isolates_every_killer(
    tmp_path: Path, fake_pool: type[FakePool], monkeypatch: pytest.MonkeyPatch, killers: tuple
) -> None:
    paths = write_images(tmp_path / "images", N_TASKS)
    monkeypatch.setattr(fake_pool, "killers", frozenset(str(paths[i]) for i in killers))
    got = Collect()
    assert run_tasks(
        tasks_for(paths), workers=2, limits=images.Limits(), on_result=got, chunk_size=4
    )
    by_path = got.by_path
    assert sorted(by_path) == sorted(map(str, paths))
    for i, path in enumerate(paths):
        update = by_path[str(path)]
        if i in killers:
            assert (update.status, update.reason) == ("skipped", CRASH_REASON)
        else:
            assert update.status == "ok", (i, update.reason)
            assert update.vectors["fotf"].shape == (15,)


def test_workers_that_always_die_stop_the_run(
    tmp_path: Path, fake_pool: type[FakePool], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A machine that kills every worker: the run must end, blaming at most one file per worker
    # (those that died alone), and say why.
    paths = write_images(tmp_path / "images", 8)
    monkeypatch.setattr(fake_pool, "killers", frozenset(map(str, paths)))
    got = Collect()
    with pytest.raises(WorkerCrashError, match="died 3 times in a row") as info:
        run_tasks(tasks_for(paths), workers=2, limits=images.Limits(), on_result=got, chunk_size=4)
    assert "CBIR_WORKERS" in str(info.value)
    assert info.value.kind == "unavailable"
    assert 0 < len(got.by_path) <= 2
    assert all(u.reason == CRASH_REASON for u in got.updates)
    assert fake_pool.created <= extraction.MAX_FRUITLESS_RESTARTS + 2


# -- cancellation --------------------------------------------------------------------------------


def cancel_after_first(cancel: threading.Event) -> tuple[Collect, threading.Thread]:
    """An ``on_result`` whose first call waits until another thread has set ``cancel``."""
    first = threading.Event()

    def on_first() -> None:
        first.set()
        assert cancel.wait(PATIENCE)

    def canceller() -> None:
        assert first.wait(PATIENCE)
        cancel.set()

    return Collect(on_first), threading.Thread(target=canceller, daemon=True)


@pytest.mark.parametrize(("workers", "in_thread"), [(2, True), (1, False), (1, True)])
def test_an_event_set_from_another_thread_stops_the_run(
    tmp_path: Path, workers: int, in_thread: bool
) -> None:
    paths = write_images(tmp_path / "images", N_TASKS)
    cancel = threading.Event()
    got, canceller = cancel_after_first(cancel)
    canceller.start()
    outcome: list[bool] = []

    def run() -> None:
        outcome.append(
            run_tasks(
                tasks_for(paths),
                workers=workers,
                limits=images.Limits(),
                on_result=got,
                cancel=cancel,
                chunk_size=2,
            )
        )

    if in_thread:
        runner = threading.Thread(target=run)
        runner.start()
        runner.join(PATIENCE)
        assert not runner.is_alive()
    else:
        run()
    canceller.join(PATIENCE)
    assert outcome == [False]
    by_path = got.by_path
    assert 0 < len(by_path) < N_TASKS
    assert set(by_path) <= set(map(str, paths))
    assert all(u.status == "ok" for u in got.updates)
    if workers == 1:
        assert len(by_path) == 2  # the chunk that was running, whole


def test_first_ctrl_c_stops_and_sets_the_event(tmp_path: Path, sigint_default: None) -> None:
    paths = write_images(tmp_path / "images", 8)
    before = signal.getsignal(signal.SIGINT)
    cancel = threading.Event()
    got = Collect(lambda: signal.raise_signal(signal.SIGINT))
    finished = run_tasks(
        tasks_for(paths),
        workers=1,
        limits=images.Limits(),
        on_result=got,
        cancel=cancel,
        chunk_size=2,
    )
    assert not finished and cancel.is_set()
    assert len(got.by_path) == 2
    assert signal.getsignal(signal.SIGINT) is before


def test_second_ctrl_c_interrupts_at_once(tmp_path: Path, sigint_default: None) -> None:
    paths = write_images(tmp_path / "images", 8)
    before = signal.getsignal(signal.SIGINT)

    def twice() -> None:
        signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        run_tasks(
            tasks_for(paths),
            workers=1,
            limits=images.Limits(),
            on_result=Collect(twice),
            chunk_size=2,
        )
    assert signal.getsignal(signal.SIGINT) is before


def test_a_run_that_finishes_returns_true(tmp_path: Path) -> None:
    paths = write_images(tmp_path / "images", 5)
    got = Collect()
    assert run_tasks(tasks_for(paths), workers=1, limits=images.Limits(), on_result=got)
    assert sorted(got.by_path) == sorted(map(str, paths))
    assert run_tasks([], workers=2, limits=images.Limits(), on_result=got)


# -- workers die with their parent ---------------------------------------------------------------

PARENT_SCRIPT = """
import sys, time
from cbir import images
from cbir.extraction import Task, run_tasks

def on_result(update):
    print("ready", flush=True)
    time.sleep(600)

tasks = [Task(path=p, specs=("fotf",)) for p in sys.argv[1:]]
run_tasks(tasks, workers=2, limits=images.Limits(), on_result=on_result, chunk_size=1)
"""


def children_of(pid: int) -> set[int]:
    """Living processes whose parent is ``pid`` (from /proc)."""
    out = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                out.add(int(entry.name))
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux's")
def test_workers_die_with_a_killed_parent(tmp_path: Path) -> None:
    paths = write_images(tmp_path / "images", 8)
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT_SCRIPT, *map(str, paths)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        ready, _, _ = select.select([parent.stdout], [], [], PATIENCE)
        assert ready and parent.stdout.readline().strip() == "ready"
        children = children_of(parent.pid)
        assert len(children) >= 2  # the workers (and the resource tracker)
    finally:
        parent.kill()
        parent.wait()
        parent.stdout.close()
    deadline = time.monotonic() + PATIENCE
    while any(alive(c) for c in children) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [c for c in children if alive(c)]


# -- limits and odd files ------------------------------------------------------------------------


def test_chunk_skips_files_over_max_bytes_and_records_their_size(tmp_path: Path) -> None:
    paths = write_images(tmp_path / "images", 2)
    small = images.Limits(max_bytes=paths[0].stat().st_size - 1)
    updates = extract_chunk(tasks_for(paths[:1]), small)
    assert updates[0].status == "skipped"
    assert "CBIR_MAX_BYTES" in updates[0].reason
    assert updates[0].size == paths[0].stat().st_size  # not retried until it changes
    assert extract_chunk(tasks_for(paths[1:]), images.Limits())[0].status == "ok"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_chunk_skips_a_fifo_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    done: list[list[ImageUpdate]] = []
    worker = threading.Thread(
        target=lambda: done.append(extract_chunk(tasks_for([fifo]), images.Limits())),
        daemon=True,
    )
    worker.start()
    worker.join(PATIENCE)
    if worker.is_alive():  # release it before failing
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("reading a FIFO blocked")
    (update,) = done[0]
    assert (update.status, update.reason) == ("skipped", "not a regular file (a FIFO (named pipe))")


def test_extract_images_and_arrays_take_limits(tmp_path: Path) -> None:
    paths = write_images(tmp_path / "images", 2)
    d = create_descriptor("fotf")
    vectors = extraction.extract_images(
        [paths[0], paths[1].read_bytes()], d, limits=images.Limits()
    )
    assert vectors.shape == (2, d.dim)
    with pytest.raises(images.ImageError, match="over the limit of 10 bytes"):
        extraction.extract_arrays(paths[0], d, limits=images.Limits(max_bytes=10))
    with pytest.raises(images.ImageError, match=r"over the limit of 0\.0001 megapixels"):
        extraction.extract_arrays(paths[0], d, limits=images.Limits(max_pixels=100))
