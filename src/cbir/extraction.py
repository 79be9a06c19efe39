"""Turning files into vectors, on every core, in chunks.

Each file is read once: the same bytes are hashed (to notice changed content) and decoded, at the
smallest size the requested descriptors allow, and every descriptor gets its array from that one
decode. Work is shipped to worker processes in chunks of tasks; the parent only delivers results.

Why a run loses nothing:

- Stopping (an event, or Ctrl-C, which sets it) only stops submitting: chunks already running
  finish and are delivered whole, so a caller never sees half a chunk, and a second Ctrl-C
  interrupts at once.
- A worker that dies (a decoder segfault, an out-of-memory kill) breaks the pool, and every chunk
  in flight fails with it, through no fault of most of them. Results delivered before are kept;
  the failed chunks are retried file by file in a fresh pool, and a file in flight when a pool
  dies again is retried alone, so the file that kills a worker on its own is reported skipped
  and the rest are delivered. Each file climbs these steps at most once each, so the retries end;
  pools that keep dying without delivering anything, even on work no crash has touched, stop
  the run with :class:`WorkerCrashError` (see :data:`MAX_FRUITLESS_RESTARTS`).
- Workers die with the parent (a parent-death signal on Linux), so a killed run leaves no worker
  or resource-tracker process behind.

Each delivered path is delivered exactly once: a chunk's results come back together or not at
all, and only what did not come back is retried.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import multiprocessing
import os
import signal
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from cbir import images
from cbir.errors import UnavailableError
from cbir.features import Descriptor, create_descriptor
from cbir.store import ImageUpdate

if TYPE_CHECKING:
    from cbir.search.region import Box


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


def _init_worker(parent_pid: int | None = None) -> None:
    """Set up a worker process: no Ctrl-C (the parent stops the run), one thread per library,
    and, given the parent's pid, death with the parent."""
    # The parent handles Ctrl-C and tells the workers to stop; each worker uses one thread so
    # two workers on two cores do not fight over them.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # held while it was spawned
    if parent_pid is not None:
        _die_with_parent(parent_pid)
    os.environ["CBIR_WORKER"] = "1"  # read by the deep backbones: one PyTorch thread each
    import cv2
    from threadpoolctl import threadpool_limits

    cv2.setNumThreads(1)
    threadpool_limits(1)  # NumPy's BLAS too (bovw's word assignment, cnnp's head)


#: ``PR_SET_PDEATHSIG`` of ``<linux/prctl.h>``
_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent_pid: int) -> None:
    """Ask Linux to SIGKILL this process when its parent dies; elsewhere do nothing.

    Without it a SIGKILLed parent leaves its idle workers waiting on their queue for ever (each
    holds the queue's write end too), and with them the resource tracker, which exits only once
    every process holding its pipe has. The signal is sent when the parent *thread* that spawned
    the worker ends; :func:`run_tasks` spawns from the calling thread and shuts its pools down
    before it returns, so that thread outlives the workers. If the parent died before the
    signal was set, the worker has already been re-parented, and exits now.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # no C library to ask (an unusual build): skip it
        return
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    if prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0 and os.getppid() != parent_pid:
        os._exit(1)


def extract_chunk(
    tasks: Sequence[Task], limits: images.Limits, states: StateFiles | None = None
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
                data, st = images.read_file(task.path, limits.max_bytes)
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
                image = images.decode(
                    data,
                    max_side=side,
                    max_pixels=limits.max_pixels,
                    max_decode_bytes=limits.max_decode_bytes,
                    shrink=False,
                )
            update.width, update.height = image.info.get("original_size", image.size)
            update.reason = "; ".join(image.info.get("notes", ())) or None  # kept, with notes
            arrays = images.prepare_arrays(image, [d.input_spec for d in descriptors])
            decoded.append((update, dict(zip(specs, arrays, strict=True))))
        except images.ImageError as exc:
            update.status, update.reason = "skipped", exc.reason
            if exc.file_stat is not None:  # refused from its status: not retried until it changes
                update.size, update.mtime_ns = exc.file_stat.st_size, exc.file_stat.st_mtime_ns
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
def _stop_event(cancel: threading.Event | None) -> Iterator[threading.Event]:
    """The event that stops a run: ``cancel``, or a new one; in the main thread the first
    Ctrl-C sets it (a flag the loop checks, so it never lands mid-write).

    A second Ctrl-C gets the previous behaviour back (Python's: KeyboardInterrupt at once).
    Other threads cannot set signal handlers, so there only the event stops a run. A Ctrl-C
    that was being ignored stays ignored.
    """
    stop = cancel if cancel is not None else threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = signal.getsignal(signal.SIGINT)
    if previous is signal.SIG_IGN:
        yield stop
        return
    restore = signal.default_int_handler if previous is None else previous  # None: set in C

    def on_sigint(signum: int, frame: object) -> None:
        stop.set()
        signal.signal(signal.SIGINT, restore)

    signal.signal(signal.SIGINT, on_sigint)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, restore)


@contextlib.contextmanager
def _sigint_held() -> Iterator[None]:
    """Hold SIGINT back while worker processes may be spawned (on submit).

    A blocked signal stays blocked across fork and exec, so a Ctrl-C that reaches the whole
    process group cannot kill a worker before its initializer ignores it (which would break the
    pool). Blocking, unlike ignoring, keeps the signal pending: the parent receives it as soon
    as the spawn is over, so a Ctrl-C pressed meanwhile still stops the run.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class WorkerCrashError(UnavailableError):
    """Extraction workers keep dying before they deliver anything (out of memory, a broken
    install or plug-in): the run stopped; what was delivered before is kept."""


#: A pool that dies before delivering any result, this many times in a row (not counting a death
#: that singled out the file that caused it), means the workers cannot run here at all:
#: :func:`run_tasks` then raises :class:`WorkerCrashError` instead of trying again. After such a
#: death the next pool first runs, on its own, a chunk no crash has touched: if it comes back,
#: workers can run and the crashes are the files' (the count starts again), so a cluster of bad
#: files is isolated to the last one; if it dies too, the machine is the likelier cause (memory,
#: a broken install or plug-in), and no file is blamed for it.
MAX_FRUITLESS_RESTARTS = 3
#: Chunks kept in flight per worker process: enough that none waits for the parent.
CHUNKS_PER_WORKER = 3
#: How often (seconds) the parent looks at the stop event while it waits for results.
POLL_SECONDS = 0.25
#: The reason given for a file whose worker died while processing it, again when on its own.
CRASH_REASON = (
    "the decoder crashed (the worker process died while reading this file, "
    "also when it was retried on its own)"
)

# How a piece of work runs after crashes: a chunk; one file, as many at once as there are
# workers; one file with nothing else in flight. A failed piece moves one step down.
_CHUNK, _SINGLE, _ALONE = 0, 1, 2


@dataclass
class _Work:
    tasks: tuple[Task, ...]
    step: int
    #: position of its first task in the run: retries go in the order of the run
    order: int
    #: a chunk no crash has touched, run on its own to see whether workers can run at all
    probe: bool = False


def run_tasks(
    tasks: Sequence[Task],
    *,
    workers: int,
    limits: images.Limits,
    on_result: Callable[[ImageUpdate], None],
    states: StateFiles | None = None,
    cancel: threading.Event | None = None,
    chunk_size: int = 16,
) -> bool:
    """Process ``tasks`` on ``workers`` processes, calling ``on_result`` in the calling thread
    once for each task delivered; True when every task was delivered, False when stopped.

    ``cancel`` (or, in the main thread, the first Ctrl-C, which sets it) stops the run: no new
    chunk starts, the chunks already running finish and are delivered, then it returns False.
    A second Ctrl-C raises KeyboardInterrupt at once. It may be called from any thread; in a
    thread other than the main one only ``cancel`` stops it.

    With ``workers > 1`` the work runs in a pool of worker processes (at most one per chunk),
    chunks submitted a few at a time so memory stays bounded; a small run gets smaller chunks so
    every worker has some. A worker that dies loses nothing: see the module's docstring. When
    :data:`MAX_FRUITLESS_RESTARTS` fresh pools in a row die before delivering anything, it
    raises :class:`WorkerCrashError`, after delivering everything that had finished; what it
    did not deliver is not recorded, so running again continues with it. With ``workers <= 1``
    (the only in-process case: a small run with more workers still gets a pool) the work runs
    in this process, a chunk at a time, checking the event between chunks: a crash there (e.g.
    ``os._exit`` or a segfault in a decoder) ends the process itself.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    with _stop_event(cancel) as stop:
        if workers <= 1:
            chunks = [tasks[i : i + chunk_size] for i in range(0, len(tasks), chunk_size)]
            for chunk in chunks:
                if stop.is_set():
                    return False
                for update in extract_chunk(chunk, limits, states):
                    on_result(update)
            return True
        size = max(1, min(chunk_size, -(-len(tasks) // workers)))
        chunks = [tasks[i : i + size] for i in range(0, len(tasks), size)]
        return _PoolRun(chunks, workers, limits, on_result, stop, states).run()


def _starts(chunks: Sequence[Sequence[Task]]) -> Iterator[tuple[Sequence[Task], int]]:
    start = 0
    for chunk in chunks:
        yield chunk, start
        start += len(chunk)


class _PoolRun:
    """One run on worker processes, through as many pools as crashes need."""

    def __init__(
        self,
        chunks: Sequence[Sequence[Task]],
        workers: int,
        limits: images.Limits,
        on_result: Callable[[ImageUpdate], None],
        stop: threading.Event,
        states: StateFiles | None,
    ) -> None:
        self.workers = workers
        self.limits = limits
        self.on_result = on_result
        self.stop = stop
        self.states = states
        self.queues: dict[int, deque[_Work]] = {
            _CHUNK: deque(_Work(tuple(c), _CHUNK, start) for c, start in _starts(chunks)),
            _SINGLE: deque(),
            _ALONE: deque(),
        }
        self.inflight: dict[Future[list[ImageUpdate]], _Work] = {}
        self.undelivered = sum(len(c) for c in chunks)
        self.fruitless = 0  # pools in a row that died without delivering anything
        self.probe_next = False  # the next pool first runs a probe (after a fruitless death)

    def run(self) -> bool:
        pool: ProcessPoolExecutor | None = None
        broken = False  # the current pool died; its work in flight is failing
        fruitful = False  # the current pool delivered something
        failed: list[_Work] = []
        try:
            while True:
                stopping = self.stop.is_set()
                if stopping:
                    for future in self.inflight:
                        future.cancel()  # chunks not started yet; running ones still deliver
                if not self.inflight and (stopping or not self._queued()):
                    break
                if pool is None and not self.inflight:
                    pool, broken, fruitful, failed = self._new_pool(), False, False, []
                if not (stopping or broken) and pool is not None:
                    broken = self._fill(pool)
                if self.inflight:
                    done, _ = wait(self.inflight, timeout=POLL_SECONDS, return_when=FIRST_COMPLETED)
                    for future in done:
                        work = self.inflight.pop(future)
                        if future.cancelled():
                            continue
                        if isinstance(future.exception(), BrokenProcessPool):
                            broken = True
                            failed.append(work)
                            continue
                        for update in future.result():
                            self.on_result(update)
                        self.undelivered -= len(work.tasks)
                        fruitful = True
                if broken and not self.inflight and pool is not None:
                    pool.shutdown(wait=True, cancel_futures=True)
                    pool = None
                    if not self.stop.is_set():
                        self._recover(failed, fruitful)
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        return self.undelivered == 0

    def _queued(self) -> bool:
        return any(self.queues.values())

    def _new_pool(self) -> ProcessPoolExecutor:
        pending = sum(len(q) for q in self.queues.values())
        return ProcessPoolExecutor(
            max_workers=max(1, min(self.workers, pending)),
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=(os.getpid(),),
        )

    def _next(self) -> _Work | None:
        """The next piece of work that may start now, by the rules of its step."""
        if any(w.step == _ALONE or w.probe for w in self.inflight.values()):
            return None
        if self.probe_next and self.queues[_CHUNK]:
            if self.inflight:
                return None
            self.probe_next = False
            work = self.queues[_CHUNK].popleft()
            work.probe = True
            return work
        if self.queues[_ALONE]:
            return None if self.inflight else self.queues[_ALONE].popleft()
        if self.queues[_SINGLE]:
            if len(self.inflight) < self.workers:
                return self.queues[_SINGLE].popleft()
            return None
        if self.queues[_CHUNK] and len(self.inflight) < self.workers * CHUNKS_PER_WORKER:
            return self.queues[_CHUNK].popleft()
        return None

    def _fill(self, pool: ProcessPoolExecutor) -> bool:
        """Submit what may start; True when the pool turned out to be broken."""
        with _sigint_held():  # workers start on submit and inherit it: no Ctrl-C mid-import
            while (work := self._next()) is not None:
                try:
                    future = pool.submit(extract_chunk, work.tasks, self.limits, self.states)
                except BrokenProcessPool:
                    work.probe = False
                    self.queues[work.step].appendleft(work)  # never ran: no suspicion
                    return True
                self.inflight[future] = work
        return False

    def _recover(self, failed: list[_Work], fruitful: bool) -> None:
        """After a pool died: blame the file that died alone, move the rest one step down."""
        if fruitful:
            self.fruitless = 0
        if len(failed) == 1 and failed[0].step >= _SINGLE:
            self._blame(failed[0].tasks[0])  # suspected before, and on its own this time
            return
        for work in sorted(failed, key=lambda w: w.order):
            if work.step == _CHUNK:
                self.queues[_SINGLE].extend(
                    _Work((t,), _SINGLE, work.order + i) for i, t in enumerate(work.tasks)
                )
            elif work.step == _SINGLE:
                self.queues[_ALONE].append(_Work(work.tasks, _ALONE, work.order))
            else:  # not reached: nothing runs beside a piece run alone
                self._blame(work.tasks[0])
        self.fruitless = 0 if fruitful else self.fruitless + 1
        self.probe_next = not fruitful
        if self.fruitless >= MAX_FRUITLESS_RESTARTS:
            raise WorkerCrashError(
                f"extraction worker processes died {self.fruitless} times in a row before "
                "finishing any file (out of memory? a broken install or descriptor plug-in?); "
                "the files finished before are kept and running again continues; fewer workers "
                "(CBIR_WORKERS) need less memory, and CBIR_WORKERS=1 shows the error in-process"
            )

    def _blame(self, task: Task) -> None:
        self.on_result(crashed(task))
        self.undelivered -= 1


def crashed(task: Task) -> ImageUpdate:
    """The result of a file that killed its worker on its own: skipped with
    :data:`CRASH_REASON`, with its size and time, so it is not retried until it changes."""
    update = ImageUpdate(
        path=task.path,
        size=None,
        mtime_ns=None,
        sha256=None,
        status="skipped",
        reason=CRASH_REASON,
        label=task.label,
    )
    if task.array is None:
        with contextlib.suppress(OSError):
            st = os.stat(task.path)
            update.size, update.mtime_ns = st.st_size, st.st_mtime_ns
    return update


def extract_arrays(
    source: str | os.PathLike[str] | bytes,
    descriptor: Descriptor,
    *,
    limits: images.Limits,
    decoded_with: Sequence[Descriptor] = (),
    box: Box | None = None,
) -> np.ndarray:
    """The array a descriptor sees for one image (path or encoded bytes); raises ImageError.
    ``box``: only that part of the image (a region query).

    ``decoded_with``: the other descriptors the pipeline extracts together with this one. The
    image is then decoded at the size their one shared decode uses (:func:`extract_chunk`), so
    the array, and the vector, equal what indexing the file would store: a JPEG's reduced-size
    draft decode differs slightly from a full decode shrunk to the same size.
    """
    spec = descriptor.input_spec
    data = source if isinstance(source, bytes) else images.read_file(source, limits.max_bytes)[0]
    side = _decode_side([descriptor, *decoded_with])
    image = images.decode(
        data,
        max_side=side,
        max_pixels=limits.max_pixels,
        max_decode_bytes=limits.max_decode_bytes,
        shrink=False,
    )
    if box is not None:
        image = box.crop(image)
    return images.to_array(image, spec)


def extract_images(
    sources: Sequence[str | os.PathLike[str] | bytes],
    descriptor: Descriptor,
    *,
    limits: images.Limits,
    decoded_with: Sequence[Descriptor] = (),
) -> np.ndarray:
    """Vectors of a few query images (paths or encoded bytes), in-process; raises ImageError.
    ``decoded_with`` as in :func:`extract_arrays`."""
    arrays = [
        extract_arrays(s, descriptor, limits=limits, decoded_with=decoded_with) for s in sources
    ]
    return np.asarray(descriptor.transform(arrays), dtype=np.float32)
