"""Extraction on Ray: chunks of tasks run on a few Ray actors, and their results come home.

How it runs. A small pool of actors (one CPU each: ``workers`` of them, or, with
``fill_cluster``, one per CPU of the cluster it connects to) each keep the descriptors they
built, with their models, tables and fitted states, for the whole run: a model is loaded once
per actor, not once per chunk. Chunks go to the actors at most :data:`CHUNKS_PER_ACTOR` at a
time each, so memory stays bounded on both sides, and each chunk's results come back whole and
are handed to ``on_result`` in the calling thread. The actors read the files themselves: on a
cluster every node must see them at the paths given (a shared file system) and have cbir
installed, with the extras of the descriptors. What fitted descriptors learned travels with the
work, through Ray's object store, so the collection's own folder need not be shared.

Why a run loses nothing (the rules of the local pool, :mod:`cbir.extraction`, in spirit):

- Nothing is written where the work runs. The caller writes what it is handed in atomic
  batches (``Ingest``, :mod:`cbir.store`), so a run killed at any moment keeps every batch
  written, and the same command continues with the rest. A chunk's results come back together
  or not at all, and each delivered path is delivered exactly once.
- Stopping (``cancel``, or in the main thread the first Ctrl-C, which sets it) stops
  submitting: the chunks already sent finish and are delivered, then it returns False. A second
  Ctrl-C interrupts at once. Ray's actors run in process groups of their own, so a Ctrl-C at
  the terminal does not reach them.
- An actor that dies (a decoder segfault, an out-of-memory kill, a lost node) fails only the
  chunks it held. Results delivered before are kept; its chunks are retried file by file, each
  file on an actor that holds nothing else, so a file whose actor dies again while it holds only
  that file killed it: it is reported skipped (:data:`~cbir.extraction.CRASH_REASON`) and the
  rest are delivered. Each file is retried at most once, so the retries end. Actors that keep
  dying before anything is delivered, even on a chunk no crash has touched (run on its own after
  such a death), stop the run with :class:`~cbir.extraction.WorkerCrashError` once the chunks in
  flight are delivered (:data:`~cbir.extraction.MAX_FRUITLESS_RESTARTS`). Work that fails after
  a stop is not retried: it was not delivered, so the next run does it.
- The simple version of the local pool's rule: there the file is singled out in steps, here
  one retry on an actor of its own does it, since an actor's death fails nothing but what that
  actor held.

Ray is an optional extra (``cbir[ray]``), imported only inside this module's functions. A run
connects to the cluster at ``address`` (or ``RAY_ADDRESS``); without one it starts a local Ray
instance with ``workers`` CPUs. It disconnects when it is done, and stops only an instance it
started; a Ray connection the caller opened is used as it is and left open.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import logging
import os
import shutil
import signal
import socket
import tempfile
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from cbir import images
from cbir.errors import UnavailableError
from cbir.extraction import (
    MAX_FRUITLESS_RESTARTS,
    POLL_SECONDS,
    StateFiles,
    Task,
    WorkerCrashError,
    _init_worker,
    _starts,
    _stop_event,
    crashed,
    extract_chunk,
)
from cbir.store import ImageUpdate

INSTALL_HINT = "pip install 'cbir[ray]'"
#: Chunks sent to one actor at a time: one running and one waiting, so no actor waits for us.
CHUNKS_PER_ACTOR = 2
#: Seconds a cluster's address gets to answer before the run gives up on it.
CONNECT_SECONDS = 10.0
#: Seconds the actors get to delete their copies of fitted states at the end of a run.
CLOSE_SECONDS = 10.0
#: What every connection this module opens asks of Ray: its output off the user's terminal.
_QUIET: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.WARNING}
#: The logger of Ray's notices about token authentication when it starts a local instance.
_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"


def require_ray() -> ModuleType:
    """The ``ray`` module, or :class:`UnavailableError` with the command that installs it."""
    try:
        import ray
    except ImportError as exc:
        raise UnavailableError(
            f"the ray executor needs Ray, which is not installed here ({exc}): {INSTALL_HINT}"
        ) from None
    return ray


def run_tasks_ray(
    tasks: Sequence[Task],
    *,
    workers: int,
    limits: images.Limits,
    on_result: Callable[[ImageUpdate], None],
    states: StateFiles | None = None,
    cancel: threading.Event | None = None,
    chunk_size: int = 16,
    address: str | None = None,
    fill_cluster: bool = False,
) -> bool:
    """:func:`cbir.extraction.run_tasks` on Ray actors: the same arguments and promises.

    ``address``: the Ray cluster to connect to (``ray://host:10001``, ``host:6379``, or
    ``auto`` for the cluster ``ray start`` began on this machine); without it, ``RAY_ADDRESS``;
    without that, a local Ray instance with ``workers`` CPUs is started for this run and stopped
    after it. ``workers`` actors are used (at most one per CPU of the cluster), or with
    ``fill_cluster`` one per CPU of a cluster it connects to. See the module's docstring for
    what a dying actor costs; after :data:`~cbir.extraction.MAX_FRUITLESS_RESTARTS` deaths in a
    row before anything is delivered it raises :class:`~cbir.extraction.WorkerCrashError`.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    ray = require_ray()
    if not tasks:
        return True
    with _quiet_workers(), _connected(ray, address, workers) as started:
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        actors = max(1, workers) if started else (cpus if fill_cluster else min(workers, cpus))
        actors = max(1, min(actors, len(tasks)))
        size = max(1, min(chunk_size, -(-len(tasks) // actors)))
        chunks = [tasks[i : i + size] for i in range(0, len(tasks), size)]
        with _stop_event(cancel) as stop:
            run = _RayRun(ray, chunks, actors, limits, on_result, stop, states)
            return run.run()


@contextlib.contextmanager
def _connected(ray: ModuleType, address: str | None, workers: int) -> Iterator[bool]:
    """Ray connected for one run; yields whether a local instance was started for it."""
    if ray.is_initialized():  # the caller's own connection: used as it is and left open
        yield False
        return
    target = address or os.environ.get("RAY_ADDRESS") or None
    main = threading.current_thread() is threading.main_thread()
    sigterm = signal.getsignal(signal.SIGTERM) if main else None  # ray.init sets its own
    try:
        if target:
            _check_reachable(target)
            ray.init(address=target, **_QUIET)
        else:
            # Ray tells a new local instance that it enabled token authentication (its
            # default, right for an instance only this run uses): not the user's concern
            notice = logging.getLogger(_AUTH_LOGGER)
            level = notice.level
            notice.setLevel(logging.ERROR)
            try:
                ray.init(
                    address="local", num_cpus=max(1, workers), include_dashboard=False, **_QUIET
                )
            finally:
                notice.setLevel(level)
    except (ConnectionError, TimeoutError) as exc:
        raise UnavailableError(f"cannot reach the Ray cluster at {target}: {exc}") from None
    try:
        yield not target
    finally:
        ray.shutdown()  # a connection is closed; an instance started here is stopped
        if main and sigterm is not None:
            signal.signal(signal.SIGTERM, sigterm)


def _check_reachable(target: str) -> None:
    """Fail at once when nothing listens at a cluster's ``host:port``: Ray itself retries an
    unreachable address for many minutes. Forms without a port (``auto``) are left to Ray."""
    host, _, port = target.split("://", 1)[-1].rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_SECONDS):
            pass
    except OSError as exc:
        raise UnavailableError(
            f"cannot reach the Ray cluster at {target}: {exc.strerror or exc} (is it running, "
            "and is the address right? --address, CBIR_RAY_ADDRESS or RAY_ADDRESS)"
        ) from None


@contextlib.contextmanager
def _quiet_workers() -> Iterator[None]:
    """Keep what Ray relays from its processes (a dead worker's report) off the terminal while
    cbir runs on it: cbir reports each skipped file itself, and Ray's logs (under its session
    folder) keep the rest. It is the switch Ray's own debugger uses; without it, nothing is
    muted."""
    module = importlib.import_module("ray._private.worker")
    previous = getattr(module, "_worker_logs_enabled", None)
    if previous is None:
        yield
        return
    module._worker_logs_enabled = False
    try:
        yield
    finally:
        module._worker_logs_enabled = previous


class _Extractor:
    """The body of one Ray actor: a worker process that keeps its descriptors loaded."""

    def __init__(self) -> None:
        _init_worker()
        self._folder = Path(tempfile.mkdtemp(prefix="cbir-ray-states-"))
        self._files: dict[str, str] = {}  # state key -> this actor's copy of the file

    def extract(
        self, tasks: Sequence[Task], limits: images.Limits, states: dict[str, tuple[str, Any]]
    ) -> list[ImageUpdate]:
        """:func:`cbir.extraction.extract_chunk`, with the fitted states ``states`` maps
        spec -> (key, object ref of the file's bytes) to: fetched once per actor."""
        import ray

        files = {}
        for spec, (key, ref) in states.items():
            if key not in self._files:
                path = self._folder / f"{key}.npz"
                path.write_bytes(ray.get(ref))
                self._files[key] = str(path)
            files[spec] = self._files[key]
        return extract_chunk(tasks, limits, files)

    def close(self) -> None:
        shutil.rmtree(self._folder, ignore_errors=True)


@dataclass
class _Work:
    tasks: tuple[Task, ...]
    #: position of its first task in the run: retries go in the order of the run
    order: int
    #: a file retried on an actor of its own after the actor of its chunk died
    single: bool = False
    #: a chunk no crash has touched, run on its own to see whether actors can run at all
    probe: bool = False


@dataclass
class _Slot:
    """One actor and the work it holds (object ref -> work)."""

    actor: Any
    held: dict[Any, _Work] = field(default_factory=dict)

    def takes(self, work: _Work) -> bool:
        if any(w.single or w.probe for w in self.held.values()):
            return False
        return not self.held if work.single else len(self.held) < CHUNKS_PER_ACTOR


class _RayRun:
    """One run on a pool of actors, replacing those that die."""

    def __init__(
        self,
        ray: ModuleType,
        chunks: Sequence[Sequence[Task]],
        actors: int,
        limits: images.Limits,
        on_result: Callable[[ImageUpdate], None],
        stop: threading.Event,
        states: StateFiles | None,
    ) -> None:
        self.ray = ray
        self.remote = ray.remote(num_cpus=1, max_restarts=0)(_Extractor)
        self.deaths = _death_errors(ray)
        self.limits = limits
        self.on_result = on_result
        self.stop = stop
        self.states = _shipped_states(ray, states)
        self.chunks = deque(_Work(tuple(c), start) for c, start in _starts(chunks))
        self.singles: deque[_Work] = deque()
        self.slots: list[_Slot | None] = [None] * actors
        self.where: dict[Any, _Slot] = {}  # object ref in flight -> the slot that holds it
        self.undelivered = sum(len(c) for c in chunks)
        self.fruitless = 0  # actor deaths in a row with nothing delivered before each
        self.delivered_since_death = False
        self.probe_next = False
        self.failure: WorkerCrashError | None = None

    def run(self) -> bool:
        try:
            while True:
                stopping = self.stop.is_set() or self.failure is not None
                if not self.where and (stopping or not (self.chunks or self.singles)):
                    break
                if not stopping:
                    self._fill()
                if not self.where:  # pragma: no cover - a bug in _next, not a state to wait in
                    raise RuntimeError("work is queued but none can start")
                self._collect()
        except BaseException:
            self._close(graceful=False)
            raise
        self._close(graceful=True)
        if self.failure is not None:
            raise self.failure
        return self.undelivered == 0

    def _next(self) -> tuple[int, _Work] | None:
        """The next piece of work that may start now and the slot it goes to."""
        held = [slot.held[ref] for ref, slot in self.where.items()]
        if any(w.probe for w in held):
            return None
        if self.probe_next and self.chunks:
            if held:
                return None
            self.probe_next = False
            work = self.chunks.popleft()
            work.probe = True
            return 0, work
        queue = self.singles or self.chunks
        if not queue:
            return None
        slot = self._free_slot(queue[0])
        return None if slot is None else (slot, queue.popleft())

    def _free_slot(self, work: _Work) -> int | None:
        """The slot holding least that may take ``work`` (an empty one for a single file); an
        actor that is there before one to be started."""
        free = [
            (0 if slot is None else len(slot.held), slot is None, i)
            for i, slot in enumerate(self.slots)
            if slot is None or slot.takes(work)
        ]
        return min(free)[2] if free else None

    def _fill(self) -> None:
        while (pick := self._next()) is not None:
            index, work = pick
            slot = self.slots[index]
            if slot is None:
                slot = self.slots[index] = _Slot(self.remote.remote())
            ref = slot.actor.extract.remote(work.tasks, self.limits, self.states)
            slot.held[ref] = work
            self.where[ref] = slot

    def _collect(self) -> None:
        """Wait a little for a result; deliver what came, or recover from a dead actor."""
        ready, _ = self.ray.wait(list(self.where), num_returns=1, timeout=POLL_SECONDS)
        for ref in ready:
            slot = self.where.get(ref)
            if slot is None:  # went with its dead actor
                continue
            try:
                updates = self.ray.get(ref)
            except self.deaths as exc:
                self._died(slot, exc)
                continue
            del self.where[ref]
            work = slot.held.pop(ref)
            for update in updates:
                self.on_result(update)
            self.undelivered -= len(work.tasks)
            self.delivered_since_death = True
            self.probe_next = False  # actors evidently run

    def _died(self, slot: _Slot, exc: BaseException) -> None:
        """An actor died: every piece it held failed with it."""
        failed = sorted(slot.held.values(), key=lambda w: w.order)
        for ref in slot.held:
            del self.where[ref]
        slot.held.clear()
        self.slots[self.slots.index(slot)] = None
        with contextlib.suppress(Exception):
            self.ray.kill(slot.actor, no_restart=True)
        if self.stop.is_set() or self.failure is not None:
            return  # not delivered, so not recorded: the next run does them
        if len(failed) == 1 and failed[0].single:  # the file alone on its actor killed it
            self.on_result(crashed(failed[0].tasks[0]))
            self.undelivered -= 1
            return
        fruitful, self.delivered_since_death = self.delivered_since_death, False
        self.fruitless = 0 if fruitful else self.fruitless + 1
        self.probe_next = not fruitful
        for work in failed:
            self.singles.extend(
                _Work((t,), work.order + i, single=True) for i, t in enumerate(work.tasks)
            )
        if self.fruitless >= MAX_FRUITLESS_RESTARTS:
            cause = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            self.failure = WorkerCrashError(
                f"Ray extraction actors died {self.fruitless} times in a row before finishing "
                "any file (out of memory? cbir, or a descriptor's extra or plug-in, missing on "
                "a node?); the files finished before are kept and running again continues; "
                f"the executor local shows the error in-process. Ray said: {cause}"
            )

    def _close(self, graceful: bool) -> None:
        """End the actors; given time (a run that ended normally), they tidy up first."""
        live = [s for s in self.slots if s is not None]
        if graceful and live:
            with contextlib.suppress(Exception):
                self.ray.get([s.actor.close.remote() for s in live], timeout=CLOSE_SECONDS)
        for slot in live:
            with contextlib.suppress(Exception):
                self.ray.kill(slot.actor, no_restart=True)
        self.slots = [None] * len(self.slots)


def _death_errors(ray: ModuleType) -> tuple[type[BaseException], ...]:
    """The errors of a result that means its actor (or node) died, not that the code failed."""
    names = (
        "RayActorError",
        "WorkerCrashedError",
        "ObjectLostError",
        "OutOfMemoryError",
        "NodeDiedError",
    )
    found = (getattr(ray.exceptions, name, None) for name in names)
    return tuple(e for e in found if isinstance(e, type) and issubclass(e, BaseException))


def _shipped_states(ray: ModuleType, states: StateFiles | None) -> dict[str, tuple[str, Any]]:
    """spec -> (key, object ref of the bytes) of each fitted state file, put once per run.
    The key names the file's version (path, size, time), as the local workers' cache does."""
    shipped: dict[str, tuple[str, Any]] = {}
    for spec, file in (states or {}).items():
        st = os.stat(file)
        key = hashlib.sha256(f"{spec}|{file}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()
        shipped[spec] = (key, ray.put(Path(file).read_bytes()))
    return shipped
