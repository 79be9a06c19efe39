"""Turning files into vectors, on every core, in chunks.

Each file is read once: the same bytes are hashed (to notice changed content) and decoded, at the
smallest size the requested descriptors allow, and every descriptor gets its array from that one
decode. Work is shipped to worker processes in chunks of paths; the parent only writes results.
"""

from __future__ import annotations

import contextlib
import hashlib
import multiprocessing
import os
import signal
import stat
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from itertools import islice
from typing import Any

import numpy as np

from cbir import images
from cbir.features import Descriptor, create_descriptor
from cbir.store import ImageUpdate


@dataclass(frozen=True)
class Task:
    """One file (or in-memory image) to (re)process.

    ``specs`` are extracted when the content is new or changed; when the file's hash still equals
    ``known_sha256`` only ``specs_if_unchanged`` are (the descriptors it lacks), and a file that
    lacks none comes back "unchanged" without being decoded. With ``array`` set (images that
    come as arrays, e.g. CIFAR batches), ``path`` is only a name and nothing is read.
    """

    path: str
    specs: tuple[str, ...]
    known_sha256: str | None = None
    specs_if_unchanged: tuple[str, ...] = ()
    label: str | None = None
    array: np.ndarray | None = None


_DESCRIPTORS: dict[tuple[str, str | None, int], Descriptor] = {}
#: spec -> file of what a fitted descriptor learned (``Store.save_state``), for this call
StateFiles = Mapping[str, str]


def _descriptor(spec: str, states: StateFiles | None = None) -> Descriptor:
    """One descriptor object per spec (and fitted state) and process: models, tables and
    vocabularies are loaded once."""
    state_file = (states or {}).get(spec)
    stamp = os.stat(state_file).st_mtime_ns if state_file else 0
    key = (spec, state_file, stamp)
    if key not in _DESCRIPTORS:
        descriptor = create_descriptor(spec)
        if state_file:
            with np.load(state_file, allow_pickle=False) as data:
                descriptor.set_state({k: data[k] for k in data.files})
        _DESCRIPTORS[key] = descriptor
    return _DESCRIPTORS[key]


def _init_worker() -> None:
    # The parent handles Ctrl-C and tells the workers to stop; each worker uses one thread so
    # two workers on two cores do not fight over them.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ["CBIR_WORKER"] = "1"  # read by the deep backbones: one PyTorch thread each
    import cv2
    from threadpoolctl import threadpool_limits

    cv2.setNumThreads(1)
    threadpool_limits(1)  # NumPy's BLAS too (bovw's word assignment, cnnp's head)


def _read(path: str) -> tuple[bytes, os.stat_result]:
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise images.ImageError("not a regular file")
        with open(path, "rb") as fh:
            return fh.read(), st
    except OSError as exc:
        raise images.ImageError(f"cannot read file: {exc.strerror or exc}") from exc


def extract_chunk(
    tasks: Sequence[Task], max_pixels: int, states: StateFiles | None = None
) -> list[ImageUpdate]:
    """Process a chunk of files; never raises for a bad file, which comes back as skipped."""
    updates: list[ImageUpdate] = []
    decoded: list[tuple[ImageUpdate, dict[str, np.ndarray]]] = []
    for task in tasks:
        update = ImageUpdate(
            path=task.path, size=None, mtime_ns=None, sha256=None, status="ok", label=task.label
        )
        updates.append(update)
        try:
            if task.array is not None:
                data = np.ascontiguousarray(task.array)
            else:
                data, st = _read(task.path)
                update.size, update.mtime_ns = st.st_size, st.st_mtime_ns
            update.sha256 = hashlib.sha256(data).hexdigest()
            specs = task.specs
            if update.sha256 == task.known_sha256:
                specs = task.specs_if_unchanged
                if not specs:
                    update.status = "unchanged"
                    continue
            descriptors = [_descriptor(s, states) for s in specs]
            side = _decode_side(descriptors)
            if isinstance(data, np.ndarray):
                image = images.from_array(data)
            else:
                image = images.decode(data, max_side=side, max_pixels=max_pixels, shrink=False)
            update.width, update.height = image.info.get("original_size", image.size)
            arrays = images.prepare_arrays(image, [d.input_spec for d in descriptors])
            decoded.append((update, dict(zip(specs, arrays, strict=True))))
        except images.ImageError as exc:
            update.status, update.reason = "skipped", exc.reason
        except Exception as exc:  # a decoder bug must not end the run
            update.status, update.reason = "skipped", f"{type(exc).__name__}: {exc}"
    _transform_all(decoded, states)
    return updates


def _decode_side(descriptors: Sequence[Descriptor]) -> int | None:
    sides = [d.input_spec.decode_side for d in descriptors]
    return None if not sides or any(s is None for s in sides) else max(s for s in sides if s)


def _transform_all(
    decoded: list[tuple[ImageUpdate, dict[str, np.ndarray]]], states: StateFiles | None
) -> None:
    """Run each descriptor once over the whole chunk; isolate a failing image if one fails."""
    specs = {s for _, arrays in decoded for s in arrays}
    for spec in sorted(specs):
        members = [
            (u, arrays[spec]) for u, arrays in decoded if spec in arrays and u.status == "ok"
        ]
        descriptor = _descriptor(spec, states)
        try:
            out = descriptor.transform([a for _, a in members])
            for (u, _), vec in zip(members, out, strict=True):
                u.vectors[spec] = vec
        except Exception:
            for u, a in members:
                try:
                    u.vectors[spec] = descriptor.transform([a])[0]
                except Exception as exc:
                    u.status = "skipped"
                    u.reason = f"descriptor {descriptor.name} failed: {type(exc).__name__}: {exc}"
                    u.vectors.clear()
    for u, _ in decoded:
        if u.status == "ok" and not all(np.isfinite(v).all() for v in u.vectors.values()):
            u.status, u.reason = "skipped", "a descriptor produced NaN or infinite values"
            u.vectors.clear()


@contextlib.contextmanager
def _deferred_interrupt() -> Iterator[threading.Event]:
    """Turn the first Ctrl-C into a flag the loop checks, so it never lands mid-write.

    A second Ctrl-C gets Python's default behaviour back and interrupts at once.
    """
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop  # signal handlers can only be set from the main thread
        return
    previous = signal.getsignal(signal.SIGINT)

    def on_sigint(signum: int, frame: object) -> None:
        stop.set()
        signal.signal(signal.SIGINT, previous)

    signal.signal(signal.SIGINT, on_sigint)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[None]:
    """Ignore SIGINT while worker processes are spawned.

    An ignored signal stays ignored across fork and exec, and Python keeps it so at start-up, so
    a Ctrl-C that reaches the whole process group cannot kill a worker before its initializer
    runs (which would break the pool). The parent's own Ctrl-C handling resumes afterwards.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def run_tasks(
    tasks: Sequence[Task],
    *,
    workers: int,
    max_pixels: int,
    chunk_size: int = 16,
    on_result: Callable[[ImageUpdate], None],
    states: StateFiles | None = None,
) -> None:
    """Process ``tasks`` on ``workers`` processes, calling ``on_result`` in the parent for each.

    Chunks are submitted a few at a time so memory stays bounded. Ctrl-C stops submitting,
    lets the chunks already running finish (their results are delivered, nothing is written
    half-way), then raises KeyboardInterrupt for the caller to report.
    """
    chunks = [tasks[i : i + chunk_size] for i in range(0, len(tasks), chunk_size)]
    with _deferred_interrupt() as stop:
        if workers <= 1 or len(chunks) <= 2:
            for chunk in chunks:
                if stop.is_set():
                    break
                for update in extract_chunk(chunk, max_pixels, states):
                    on_result(update)
        else:
            _run_pool(chunks, workers, max_pixels, on_result, stop, states)
        if stop.is_set():
            raise KeyboardInterrupt


def _run_pool(
    chunks: list[Sequence[Task]],
    workers: int,
    max_pixels: int,
    on_result: Callable[[ImageUpdate], None],
    stop: threading.Event,
    states: StateFiles | None,
) -> None:
    ctx = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker)
    todo = iter(chunks)

    def submit(chunk: Sequence[Task]) -> Any:
        return pool.submit(extract_chunk, chunk, max_pixels, states)

    try:
        with _sigint_ignored():  # the workers start now and inherit it: no Ctrl-C mid-import
            pending = {submit(c) for c in islice(todo, workers * 3)}
        while pending:
            done, pending = wait(pending, timeout=0.25, return_when=FIRST_COMPLETED)
            for future in done:
                if future.cancelled():
                    continue
                for update in future.result():
                    on_result(update)
                if not stop.is_set():
                    pending |= {submit(c) for c in islice(todo, 1)}
            if stop.is_set():
                for future in pending:
                    future.cancel()  # chunks not started yet; running ones still deliver
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def extract_arrays(
    source: str | os.PathLike[str] | bytes, descriptor: Descriptor, *, max_pixels: int
) -> np.ndarray:
    """The array a descriptor sees for one image (path or encoded bytes); raises ImageError."""
    spec = descriptor.input_spec
    data = source if isinstance(source, bytes) else _read(os.fspath(source))[0]
    image = images.decode(data, max_side=spec.decode_side, max_pixels=max_pixels, shrink=False)
    return images.to_array(image, spec)


def extract_images(
    sources: Sequence[str | os.PathLike[str] | bytes], descriptor: Descriptor, *, max_pixels: int
) -> np.ndarray:
    """Vectors of a few query images (paths or encoded bytes), in-process; raises ImageError."""
    arrays = [extract_arrays(s, descriptor, max_pixels=max_pixels) for s in sources]
    return np.asarray(descriptor.transform(arrays), dtype=np.float32)
