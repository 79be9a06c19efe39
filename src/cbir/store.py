"""A collection on disk: an SQLite catalogue plus memory-mapped vector segments per descriptor.

Layout of a collection directory::

    catalogue.sqlite          images, descriptors, segments, vectors (which row of which file),
                              the change feed (a generation per descriptor and a log)
    vectors/<descriptor id>/<uuid>.npy   immutable float32 segments, one per flushed batch
    models/<descriptor id>.npz           what a fitted descriptor learned from the collection
    lock                      held by the one process that writes

Why segments: a batch of vectors is written to a new file (temp name, fsync, atomic rename)
*before* the transaction that makes it visible commits. A run killed at any moment therefore
leaves either the previous consistent state or the new one, plus at worst an orphan file, which
the next writer deletes. Re-extracted or removed images leave dead rows behind; ``compact``
rewrites a descriptor's live rows into one segment when enough are dead or segments are many.

The change feed: every descriptor has a generation, bumped in the same transaction as every
write or removal of its vectors, and a log of (generation, image id, added | removed). An index
built at generation ``g`` asks :meth:`Store.changes_since` what changed after ``g`` and applies
only that, instead of reloading every vector; the log is pruned to a bound (see
``LOG_MIN_ROWS``), below which the answer is "rebuild" (``reset``). Dropping all of a
descriptor's vectors (a refit, a new vector length) is such a reset too. Compaction moves rows
between files without changing any vector, so it bumps nothing.

Processes and threads:

- One process writes at a time: the writer holds an exclusive ``flock`` on ``lock``. Within a
  process, one thread at a time: the thread that called :meth:`Store.acquire` owns the writer
  until it calls :meth:`Store.release`; a write method called by a thread that does not own it
  takes the writer for that one call. A thread that wants to write while another thread or
  process holds the writer gets :class:`~cbir.errors.BusyError` at once rather than waiting: a
  writer usually holds the lock for a whole indexing run, a caller that waited would hang for that
  long, and the caller (a CLI run, a request of the service) knows best whether to retry.
- Every thread has its own SQLite connection (opened on first use, all closed by
  :meth:`Store.close`), as SQLite connections must not be shared by threads mid-statement. The
  catalogue is in WAL mode, so readers read the last committed state and never wait for the
  writer, nor the writer for them. A read that needs several queries runs them in one read
  transaction, so it sees one snapshot.
- Why writes are safe: they are serialised (the in-process lock and the ``flock``); each is
  new files first, then one transaction; and compaction deletes a replaced segment file only
  after the commit that stops referring to it. A fitted state is the one file replaced in
  place: written under a temporary name first, and renamed over the old one only after the
  commit that drops the vectors the old one made, so no vector ever sits beside a state it was
  not made by. A reader whose snapshot still names a deleted segment file finds it gone, and
  reads again from a fresh snapshot, as often as compaction does that (a file it has already
  mapped stays readable after the deletion); a file missing that the newest snapshot still
  names is corruption, which :meth:`Store.verify` (``cbir check``) finds with the rest.
- A new collection's directory and catalogue are made on first use, not when the store is
  opened, so a command that fails before it reads or writes leaves nothing behind. File names
  that are not UTF-8 are stored losslessly (``cbir.names``).

Format versions: 1 had no change feed. This code reads version 1 as it is (every generation 0:
its vectors are the state at generation 0) and upgrades it in place to version 2 when it first
takes the write lock; a newer format than it knows is refused.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import itertools
import json
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from cbir.errors import (
    BusyError,
    CorruptError,
    InvalidRequestError,
    NotFoundError,
    UnavailableError,
)
from cbir.faults import pause_point
from cbir.names import BYTES_MARK, from_stored, to_stored

#: The catalogue format this code writes (and the newest it reads). 2 added the change feed.
FORMAT_VERSION = 2

#: A descriptor's change log is pruned once it holds more rows than the larger of this floor
#: (so a reader a few batches behind a small collection never has to rebuild) ...
LOG_MIN_ROWS = 10_000
#: ... and this many rows per stored vector of the descriptor (measured when the log passes the
#: previous bound): past that, replaying the log costs more than reloading every vector.
LOG_ROWS_PER_VECTOR = 2
#: Pruning keeps the newest generations holding at most this fraction of the bound, so that it
#: runs once per many writes rather than on every write once the bound is reached.
LOG_KEEP_FRACTION = 0.5

#: A descriptor is compacted when it has more segment files than this (each read opens them all)
MAX_SEGMENTS = 8
#: ... or when more than this fraction of its stored rows are dead (replaced or removed).
MAX_DEAD_FRACTION = 0.25
#: Rows copied at a time by compaction: bounds its memory, whatever the collection's size.
COMPACT_BLOCK_ROWS = 65536
#: How long an SQLite statement waits for a lock held by another connection (WAL checkpoints,
#: two processes creating the same new collection) before it fails.
SQLITE_TIMEOUT_SECONDS = 30.0
#: The oldest SQLite with what the catalogue's statements use (RETURNING; JSON functions, which
#: SQLite builds in from 3.38 and distributions enabled before).
MIN_SQLITE = (3, 35, 0)

_ADDED = "added"
_REMOVED = "removed"

#: Version 1: the catalogue and its vector segments.
_SCHEMA_V1 = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS images (
        id INTEGER PRIMARY KEY,
        path TEXT NOT NULL UNIQUE,
        sha256 TEXT,
        size INTEGER,
        mtime_ns INTEGER,
        status TEXT NOT NULL CHECK (status IN ('ok', 'skipped')),
        reason TEXT,
        label TEXT,
        width INTEGER,
        height INTEGER,
        updated_at REAL NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS descriptors (
        id INTEGER PRIMARY KEY,
        spec TEXT NOT NULL UNIQUE,
        name TEXT NOT NULL,
        params TEXT NOT NULL,
        dim INTEGER NOT NULL,
        metric TEXT NOT NULL,
        created_at REAL NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS segments (
        id INTEGER PRIMARY KEY,
        descriptor_id INTEGER NOT NULL REFERENCES descriptors(id) ON DELETE CASCADE,
        file TEXT NOT NULL UNIQUE,
        rows INTEGER NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS vectors (
        descriptor_id INTEGER NOT NULL REFERENCES descriptors(id) ON DELETE CASCADE,
        image_id INTEGER NOT NULL REFERENCES images(id) ON DELETE CASCADE,
        segment_id INTEGER NOT NULL REFERENCES segments(id),
        row INTEGER NOT NULL,
        PRIMARY KEY (descriptor_id, image_id)
    ) WITHOUT ROWID""",
    "CREATE INDEX IF NOT EXISTS vectors_by_segment ON vectors (segment_id)",
)

#: Version 2 adds the change feed, and an index that lets removing an image find its vectors
#: (and the log record them) without scanning every vector.
_SCHEMA_V2 = (
    """CREATE TABLE IF NOT EXISTS feed (
        descriptor_id INTEGER PRIMARY KEY REFERENCES descriptors(id) ON DELETE CASCADE,
        generation INTEGER NOT NULL,  -- bumped by each transaction writing or dropping vectors
        floor INTEGER NOT NULL,       -- the log holds every change after this generation
        logged INTEGER NOT NULL,      -- rows in its log (at most; recounted when pruning)
        log_bound INTEGER NOT NULL    -- prune once logged exceeds this (re-measured then)
    )""",
    """CREATE TABLE IF NOT EXISTS changes (
        descriptor_id INTEGER NOT NULL REFERENCES descriptors(id) ON DELETE CASCADE,
        generation INTEGER NOT NULL,
        image_id INTEGER NOT NULL,    -- no foreign key: a removed image stays in the log
        op TEXT NOT NULL CHECK (op IN ('added', 'removed')),
        PRIMARY KEY (descriptor_id, generation, image_id)
    ) WITHOUT ROWID""",
    "CREATE INDEX IF NOT EXISTS vectors_by_image ON vectors (image_id)",
)

_IMAGE_COLUMNS = "id, path, sha256, size, mtime_ns, status, reason, label, width, height"

#: Image ids a write works on, in a per-connection temporary table (any number of them, no
#: host-parameter limit).
_SCRATCH_TABLE = "scratch_ids"
_SCRATCH = f"temp.{_SCRATCH_TABLE}"
#: Where compaction puts each live image's row in the new segment.
_MOVED_TABLE = "moved_rows"
_MOVED = f"temp.{_MOVED_TABLE}"

_T = TypeVar("_T")
#: Hit names (path, label) kept between searches while the catalogue is unchanged.
MAX_CACHED_NAMES = 100_000
#: Up to this many ids a query binds one per placeholder, more as one JSON list: SQLite's
#: oldest default limit of bound variables. Placeholders cost the hits of a search least.
MAX_BOUND_IDS = 999
#: Segment memory maps kept open between reads of a few rows (a re-rank's candidates).
MAX_MAPPED_SEGMENTS = 256
#: The catalogue is read through a memory map up to this size: the rows of a search's hits cost
#: no system call each.
SQLITE_MMAP_BYTES = 1 << 30
#: Numbers the connections a store opens (a change token names the connection it was read on).
_CONNECTION_SERIALS = itertools.count(1)


class _SegmentVanishedError(Exception):
    """A segment file named by a read's snapshot is gone (compacted away, or lost)."""

    def __init__(self, path: Path, cause: OSError) -> None:
        super().__init__(str(path))
        self.path = path
        self.cause = cause


@dataclass(frozen=True)
class Finding:
    """One thing a check found (``cbir check``): ``what`` names its kind, ``message`` says it
    in words; an ``error`` cannot be trusted, a note is harmless or redone by the next run;
    ``repaired`` when the check removed it."""

    what: str
    message: str
    error: bool
    repaired: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"what": self.what, "message": self.message, "error": self.error,
                "repaired": self.repaired}  # fmt: skip


@dataclass(frozen=True)
class DescriptorRecord:
    """A descriptor a collection holds vectors for."""

    id: int
    spec: str
    name: str
    params: dict[str, Any]
    dim: int
    metric: str


@dataclass(frozen=True)
class ImageRecord:
    """One catalogue row."""

    id: int
    path: str
    sha256: str | None
    size: int | None
    mtime_ns: int | None
    status: str
    #: why it was skipped; for an image kept, what was odd about it (notes), or None
    reason: str | None
    label: str | None
    width: int | None = None
    height: int | None = None


@dataclass
class ImageUpdate:
    """What one extraction produced for a file, ready to be written in a batch."""

    path: str
    size: int | None
    mtime_ns: int | None
    sha256: str | None
    status: str  # "ok" | "skipped" | "unchanged"
    #: why it was skipped; for an image kept, what was odd about it (notes), or None
    reason: str | None = None
    label: str | None = None
    width: int | None = None
    height: int | None = None
    #: descriptor spec -> 1-D vector, for the descriptors extracted this time
    vectors: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True)
class Changes:
    """What happened to a descriptor's vectors after some generation (see ``changes_since``)."""

    #: the descriptor's generation now: ask for changes since this one next time
    generation: int
    #: int64 image ids whose vectors were written (new or replaced) since
    added: np.ndarray
    #: int64 image ids whose vectors are gone since (and not written again)
    removed: np.ndarray
    #: the log does not reach back that far, or every vector was replaced: rebuild from scratch
    reset: bool


def _no_ids() -> np.ndarray:
    return np.empty(0, dtype=np.int64)


def _among(ids: list[int]) -> tuple[str, tuple[Any, ...]]:
    """The right side of ``id IN ...`` for a list of ids, and what it binds."""
    if len(ids) <= MAX_BOUND_IDS:
        return f"({','.join('?' * len(ids))})", tuple(ids)
    return "(SELECT value FROM json_each(?))", (json.dumps(ids),)


class _Pin:
    """The block of :meth:`Store.pinned`: a class rather than a generator-based context manager,
    as it wraps every search and costs less to enter."""

    __slots__ = ("outer", "store")

    def __init__(self, store: Store) -> None:
        self.store = store
        self.outer = False

    def __enter__(self) -> None:
        store = self.store
        self.outer = getattr(store._local, "pinned_version", None) is not None
        if not self.outer:
            (version,) = store._conn().execute("PRAGMA data_version").fetchone()
            store._local.pinned_version = int(version)

    def __exit__(self, *exc: object) -> None:
        if not self.outer:
            self.store._local.pinned_version = None


class Store:
    """The catalogue and vector files of one collection directory, safe to share by threads.

    One class, longer than the rest of cbir's, on purpose: every method goes through the same
    per-thread connections, the same writer (lock and transaction) and the same snapshot rule
    for reads, which are what make the collection safe (module docstring). Splitting it would
    hand those to several objects that must agree; the sections below (plumbing, format,
    transactions, writer, change feed, descriptors, images, writing, reading, fitted state,
    housekeeping) are its parts.
    """

    def __init__(self, root: str | Path, *, create: bool = True) -> None:
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise InvalidRequestError(
                f"{self.root} is a file, not a collection directory (choose a folder with "
                "--collection / CBIR_COLLECTION)"
            )
        self._path = self.root / "catalogue.sqlite"
        if not create and not self._path.exists():
            raise NotFoundError(
                f"no collection at {self.root} (run `cbir index DIR` to create one, "
                "or choose another with --collection / CBIR_COLLECTION)"
            )
        # per thread: its connection, and what searches read on every query (descriptors,
        # generations, hit names) kept until the catalogue changes, as (change token, value) by
        # what it is (a token is its thread's connection's: threads cannot share one)
        self._local = threading.local()
        self._maps: dict[tuple[int, str], np.ndarray] = {}  # see _mapped_segment
        self._maps_lock = threading.Lock()
        self._commits = 0  # transactions this store committed (its own connections' changes)
        #: every thread's connection, by thread: close() closes them all
        self._connections: dict[threading.Thread, sqlite3.Connection] = {}
        self._connections_lock = threading.Lock()
        self._closed = False
        # the writer: the in-process lock, the thread holding it and its flock'ed file
        self._write_lock = threading.Lock()
        self._writer: threading.Thread | None = None
        self._lock_file: Any = None
        if sqlite3.sqlite_version_info < MIN_SQLITE:
            raise UnavailableError(
                f"cbir needs SQLite {'.'.join(map(str, MIN_SQLITE))} or newer; this Python "
                f"has {sqlite3.sqlite_version}"
            )
        #: the catalogue's format; None until a new collection is made, on first use, so that
        #: a command that fails before it reads or writes anything leaves no empty collection
        self._format: int | None = None
        self._create_lock = threading.Lock()
        if self._path.exists():
            self._conn()

    def _prepare(self, db: sqlite3.Connection) -> int:
        """Check (or create) the catalogue on the first connection; returns its format."""
        version = self._read_format(db)
        if version is None:
            db.execute("PRAGMA journal_mode=WAL")  # persists in the file
            self._create(db)
            version = FORMAT_VERSION
        self._check_format(version)
        return version

    # -- plumbing --------------------------------------------------------------------------------
    def close(self) -> None:
        """Release the write lock and close every thread's connection (call it when no other
        thread is using the store)."""
        if self._writer is not None:
            self._give_back()
        self._closed = True
        self._close_connections()
        self._maps.clear()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _conn(self) -> sqlite3.Connection:
        """This thread's connection, opened on first use (the first one of a new collection
        makes its directory and catalogue)."""
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is not None:
            return db
        if self._closed:
            raise sqlite3.ProgrammingError(f"the store of {self.root} is closed")
        with self._create_lock:
            if self._format is None:
                self.root.mkdir(parents=True, exist_ok=True)
                db = self._connect()
                try:
                    self._format = self._prepare(db)
                except BaseException:
                    self._close_connections()
                    raise
                return db
        return self._connect()

    def _connect(self) -> sqlite3.Connection:
        """Open this thread's connection."""
        try:
            # check_same_thread=False only so that close() may close every thread's connection;
            # each connection is used by its own thread alone
            db = sqlite3.connect(
                self._path,
                timeout=SQLITE_TIMEOUT_SECONDS,
                isolation_level=None,
                check_same_thread=False,
            )
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA foreign_keys=ON")
            db.execute(f"PRAGMA mmap_size={SQLITE_MMAP_BYTES}")
        except sqlite3.Error as exc:
            raise CorruptError(f"cannot open the catalogue {self._path}: {exc}") from exc
        with self._connections_lock:
            # a service may run each request in a new thread: close the connections of threads
            # that have ended, so their number stays that of the live threads
            ended = [t for t in self._connections if not t.is_alive()]
            for t in ended:
                self._connections.pop(t).close()
            self._connections[threading.current_thread()] = db
        self._local.db = db
        self._local.serial = next(_CONNECTION_SERIALS)
        return db

    def change_token(self) -> tuple[int, int, int]:
        """Equal between two calls in one thread only if nobody changed the catalogue in
        between: SQLite's ``data_version`` (bumped by other connections' commits, from any
        process) and this store's own commits, on this thread's connection. Inside
        :meth:`pinned`, other connections' commits are those seen when the pin was taken."""
        db = self._conn()
        version = getattr(self._local, "pinned_version", None)
        if version is None:
            (version,) = db.execute("PRAGMA data_version").fetchone()
        return (self._local.serial, int(version), self._commits)

    def pinned(self) -> _Pin:
        """A block in which this thread reads what other connections committed once, at its
        start: a search asks the catalogue several things (its descriptors, their generations,
        the names of its hits), each cached under the change token, and one read of SQLite's
        ``data_version`` serves them all. A commit from elsewhere during the block is seen by
        the next one; this store's own commits still count at once. Nested pins keep the
        outer one."""
        return _Pin(self)

    def _cache(self, name: str, token: tuple[int, int, int], make: Callable[[], _T]) -> _T:
        """``make()``, or what it gave this thread under the same change token."""
        cached: dict[str, tuple[tuple[int, int, int], Any]] | None
        cached = getattr(self._local, "cached", None)
        if cached is None:
            cached = self._local.cached = {}
        held = cached.get(name)
        if held is not None and held[0] == token:
            return held[1]
        value = make()
        cached[name] = (token, value)
        return value

    def _close_connections(self) -> None:
        with self._connections_lock:
            connections, self._connections = self._connections, {}
        for db in connections.values():
            db.close()
        self._local = threading.local()

    @property
    def uuid(self) -> str:
        """This collection's identity, made when it was created (or first asked for): what
        names its indexes in a server, whichever path the collection is opened by."""
        value = self._meta("uuid")
        if value is None:  # a collection made before identities were recorded
            with contextlib.suppress(sqlite3.Error), self._transaction() as db:
                db.execute("INSERT OR IGNORE INTO meta VALUES ('uuid', ?)", (uuid.uuid4().hex,))
            value = self._meta("uuid")
        if value is None:  # read-only: named by its place instead
            value = hashlib.sha1(str(self.root.resolve()).encode()).hexdigest()
        return value

    def _meta(self, key: str) -> str | None:
        row = self._conn().execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    # -- format ------------------------------------------------------------------------------------
    def _read_format(self, db: sqlite3.Connection) -> int | None:
        """The catalogue's format version, or None for a catalogue not created yet."""
        try:
            row = db.execute("SELECT value FROM meta WHERE key = 'format_version'").fetchone()
        except sqlite3.OperationalError:
            tables = db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0]
            if tables:
                raise CorruptError(
                    f"{self._path} is not a cbir catalogue (it has no meta table)"
                ) from None
            return None
        except sqlite3.DatabaseError as exc:
            raise CorruptError(f"{self._path} is not a readable cbir catalogue: {exc}") from exc
        return None if row is None else int(row[0])

    def _check_format(self, version: int) -> None:
        if version > FORMAT_VERSION:
            raise UnavailableError(
                f"{self.root} was written by a newer cbir (format {version}); this one reads "
                f"formats up to {FORMAT_VERSION}: upgrade cbir"
            )

    def _create(self, db: sqlite3.Connection) -> None:
        """Create a new collection's catalogue (idempotent: two processes may race here)."""
        with self._transaction_on(db):
            for statement in (*_SCHEMA_V1, *_SCHEMA_V2):
                db.execute(statement)
            db.execute(
                "INSERT OR IGNORE INTO meta VALUES ('format_version', ?)", (str(FORMAT_VERSION),)
            )
            db.execute("INSERT OR IGNORE INTO meta VALUES ('uuid', ?)", (uuid.uuid4().hex,))

    def _upgrade(self) -> None:
        """Bring the catalogue to FORMAT_VERSION in place (the caller holds the write lock)."""
        db = self._conn()
        version = self._read_format(db) or FORMAT_VERSION
        self._check_format(version)
        if version < FORMAT_VERSION:
            with self._transaction_on(db):
                for statement in _SCHEMA_V2:
                    db.execute(statement)
                # the vectors as they are make generation 0, whose log is empty
                db.execute("INSERT OR IGNORE INTO feed SELECT id, 0, 0, 0, 0 FROM descriptors")
                db.execute(
                    "UPDATE meta SET value = ? WHERE key = 'format_version'",
                    (str(FORMAT_VERSION),),
                )
        self._format = FORMAT_VERSION

    def _has_feed(self) -> bool:
        """Whether the catalogue has the change feed yet (another process may have just
        upgraded it)."""
        self._conn()
        assert self._format is not None  # set by the first connection
        if self._format < FORMAT_VERSION:
            self._format = self._read_format(self._conn()) or FORMAT_VERSION
        return self._format >= FORMAT_VERSION

    # -- transactions --------------------------------------------------------------------------
    @contextlib.contextmanager
    def _transaction_on(self, db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        self._commits += 1  # what this store reads is read again

    def _transaction(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        """One write transaction on this thread's connection."""
        return self._transaction_on(self._conn())

    @contextlib.contextmanager
    def _snapshot(self) -> Iterator[sqlite3.Connection]:
        """Run several reads against one committed state (inside a transaction: that one)."""
        db = self._conn()
        if db.in_transaction:
            yield db
            return
        db.execute("BEGIN")
        try:
            yield db
        finally:
            db.execute("COMMIT")  # ends the read snapshot; nothing was written

    def _read_segments(self, read: Callable[[sqlite3.Connection], _T]) -> _T:
        """``read`` in a snapshot, again in a fresh one as long as the segment file it found
        gone is no longer named by the newest snapshot (compacted away meanwhile, as often as
        that happens); a file missing that the newest snapshot still names is corruption."""
        while True:
            try:
                with self._snapshot() as db:
                    return read(db)
            except _SegmentVanishedError as gone:
                if self._conn().in_transaction or self._names_segment(gone.path.name):
                    raise CorruptError(
                        f"vector file {gone.path} is missing or unreadable: {gone.cause}"
                    ) from gone.cause

    def _names_segment(self, file: str) -> bool:
        """Whether the newest committed state still names this segment file."""
        row = self._conn().execute("SELECT 1 FROM segments WHERE file = ?", (file,)).fetchone()
        return row is not None

    # -- the writer ----------------------------------------------------------------------------
    def acquire(self) -> None:
        """Make this thread the collection's writer until :meth:`release`: take the in-process
        lock and the ``flock`` (``BusyError`` at once if another thread or process holds them),
        upgrade an older format, and delete what a killed run left behind."""
        me = threading.current_thread()
        if self._writer is me:
            return
        self._conn()  # a new collection is made now, before its lock file
        if not self._write_lock.acquire(blocking=False):
            raise BusyError(
                f"{self.root} is being written by another thread of this process; "
                "wait for it to finish"
            )
        try:
            handle = open(self.root / "lock", "a+")  # noqa: SIM115 - held until release()
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                raise BusyError(
                    f"{self.root} is being written by another cbir process; wait for it to finish"
                ) from None
            try:
                self._upgrade()
                self._remove_orphans()
            except BaseException:
                fcntl.flock(handle, fcntl.LOCK_UN)
                handle.close()
                raise
        except BaseException:
            self._write_lock.release()
            raise
        self._lock_file = handle
        self._writer = me

    def release(self) -> None:
        """Give the write lock back (only the thread holding it can)."""
        if self._writer is threading.current_thread():
            self._give_back()

    def _give_back(self) -> None:
        if self._lock_file is not None:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None
        self._writer = None
        self._write_lock.release()

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """Hold the writer for one write: this thread's own, or taken for this call only."""
        if self._writer is threading.current_thread():
            yield
            return
        self.acquire()
        try:
            yield
        finally:
            self.release()

    def _segment_path(self, descriptor_id: int, file: str) -> Path:
        return self.root / "vectors" / str(descriptor_id) / file

    def _orphan_files(self) -> list[Path]:
        """Vector files no committed segment refers to, and half-saved fitted states (left by
        a killed run)."""
        half_saved = sorted((self.root / "models").glob(".tmp-*"))
        vectors_dir = self.root / "vectors"
        if not vectors_dir.is_dir():
            return half_saved
        known = {
            (str(r["descriptor_id"]), r["file"])
            for r in self._conn().execute("SELECT descriptor_id, file FROM segments")
        }
        return half_saved + [
            f
            for sub in vectors_dir.iterdir()
            if sub.is_dir()
            for f in sub.iterdir()
            if (sub.name, f.name) not in known
        ]

    def _remove_orphans(self) -> None:
        """Delete vector files no committed segment refers to (left by a killed run)."""
        for f in self._orphan_files():
            f.unlink(missing_ok=True)
        vectors_dir = self.root / "vectors"
        for sub in vectors_dir.iterdir() if vectors_dir.is_dir() else ():
            with contextlib.suppress(OSError):
                sub.rmdir()  # only succeeds when empty (a dropped descriptor)

    # -- the change feed -------------------------------------------------------------------------
    def generation(self, descriptor_id: int) -> int:
        """A descriptor's generation: bumped by every write or removal of its vectors."""
        gens = self.generations()
        if descriptor_id not in gens:
            raise NotFoundError(f"this collection has no descriptor with id {descriptor_id}")
        return gens[descriptor_id]

    def generations(self) -> dict[int, int]:
        """Every descriptor's generation in one query: cheap enough to ask before each search
        whether an index is still in step."""
        return dict(self._cache("generations", self.change_token(), self._read_generations))

    def _read_generations(self) -> dict[int, int]:
        if not self._has_feed():
            # format 1: the vectors as they are are generation 0
            return {r[0]: 0 for r in self._conn().execute("SELECT id FROM descriptors")}
        return dict(self._conn().execute("SELECT descriptor_id, generation FROM feed").fetchall())

    def changes_since(self, descriptor_id: int, generation: int) -> Changes:
        """What happened to a descriptor's vectors after ``generation``, the last change of each
        image winning (written then removed: removed; removed then written: added).

        ``reset`` when the log does not reach back to ``generation`` (pruned, every vector
        dropped since, or ``generation`` is not one this collection had, e.g. it was replaced):
        then reload every vector. Read the generation *before* loading vectors: changes applied
        twice are harmless (an added vector is its current value, a removed id may be absent).
        """
        descriptor_id, generation = int(descriptor_id), int(generation)
        with self._snapshot() as db:
            if not self._has_feed():
                row = db.execute("SELECT 0, 0 FROM descriptors WHERE id = ?", (descriptor_id,))
            else:
                row = db.execute(
                    "SELECT generation, floor FROM feed WHERE descriptor_id = ?", (descriptor_id,)
                )
            found = row.fetchone()
            if found is None:
                raise NotFoundError(f"this collection has no descriptor with id {descriptor_id}")
            now, floor = int(found[0]), int(found[1])
            if generation < floor or generation > now:
                return Changes(now, _no_ids(), _no_ids(), reset=True)
            if generation == now:
                return Changes(now, _no_ids(), _no_ids(), reset=False)
            rows = db.execute(
                "SELECT image_id, op = ? FROM changes WHERE descriptor_id = ? AND generation > ? "
                "ORDER BY generation",
                (_ADDED, descriptor_id, generation),
            ).fetchall()
        table = np.array(rows, dtype=np.int64).reshape(-1, 2)
        # the last change of each image: its first occurrence in the reversed log
        latest = table[::-1]
        ids, first = np.unique(latest[:, 0], return_index=True)
        added = latest[first, 1].astype(bool)
        return Changes(now, ids[added], ids[~added], reset=False)

    # -- descriptors -----------------------------------------------------------------------------
    def descriptors(self) -> list[DescriptorRecord]:
        """The descriptors this collection holds, in the order they were added."""
        return list(self._cache("descriptors", self.change_token(), self._read_descriptors))

    def _read_descriptors(self) -> list[DescriptorRecord]:
        return [
            DescriptorRecord(
                id=r["id"],
                spec=r["spec"],
                name=r["name"],
                params=json.loads(r["params"]),
                dim=r["dim"],
                metric=r["metric"],
            )
            for r in self._conn().execute("SELECT * FROM descriptors ORDER BY id")
        ]

    def _dim(self, db: sqlite3.Connection, descriptor_id: int) -> int:
        row = db.execute("SELECT dim FROM descriptors WHERE id = ?", (descriptor_id,)).fetchone()
        if row is None:
            raise NotFoundError(f"this collection has no descriptor with id {descriptor_id}")
        return int(row[0])

    def add_descriptor(
        self, spec: str, name: str, params: dict[str, Any], dim: int, metric: str
    ) -> DescriptorRecord:
        """Record a descriptor (idempotent: an existing spec is returned as it is)."""
        with self._writing(), self._transaction() as db:
            db.execute(
                "INSERT OR IGNORE INTO descriptors (spec, name, params, dim, metric, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (spec, name, json.dumps(params), dim, metric, time.time()),
            )
            db.execute(
                "INSERT OR IGNORE INTO feed SELECT id, 0, 0, 0, 0 FROM descriptors WHERE spec = ?",
                (spec,),
            )
        return next(d for d in self.descriptors() if d.spec == spec)

    # -- images ----------------------------------------------------------------------------------
    def images(self, *, status: str | None = None) -> list[ImageRecord]:
        """Catalogue rows, optionally only those with ``status`` ("ok" or "skipped")."""
        sql = f"SELECT {_IMAGE_COLUMNS} FROM images"
        args: tuple[Any, ...] = ()
        if status is not None:
            sql += " WHERE status = ?"
            args = (status,)
        return [_image_record(r) for r in self._conn().execute(sql + " ORDER BY id", args)]

    def named_images(self) -> tuple[np.ndarray, list[str], list[str | None]]:
        """Ids (ascending, int64), paths and labels of the indexed ("ok") images, in one read
        without the rest of their rows: what a filter by label or folder is decided on."""
        cursor = self._conn().cursor()
        cursor.row_factory = None
        rows = cursor.execute(
            "SELECT id, path, label FROM images WHERE status = 'ok' ORDER BY id"
        ).fetchall()
        ids = np.fromiter((r[0] for r in rows), np.int64, len(rows))
        paths = [from_stored(r[1]) for r in rows]
        labels = [from_stored(r[2]) for r in rows]
        return ids, paths, labels

    def image_by_path(self, path: str) -> ImageRecord | None:
        """The catalogue row of the image at ``path``, if it has one."""
        row = (
            self._conn()
            .execute(
                f"SELECT {_IMAGE_COLUMNS} FROM images WHERE path = ?",
                (to_stored(path),),
            )
            .fetchone()
        )
        return None if row is None else _image_record(row)

    def ids_under(self, path: str) -> list[int]:
        """Ids of the image at ``path`` or of every image below the folder ``path``."""
        prefix = path.rstrip(os.sep) + os.sep
        stored = to_stored(prefix)
        db = self._conn()
        found = []
        if not stored.startswith(BYTES_MARK):
            found = [
                r[0]
                for r in db.execute(
                    "SELECT id FROM images WHERE path = ? OR substr(path, 1, ?) = ?",
                    (to_stored(path), len(stored), stored),
                )
            ]
        # names stored as bytes (see cbir.names) are few: compared here, decoded
        for image_id, name in db.execute(
            "SELECT id, path FROM images WHERE substr(path, 1, 1) = ?", (BYTES_MARK,)
        ).fetchall():
            text = from_stored(name) or ""
            if text == path or text.startswith(prefix):
                found.append(image_id)
        return found

    def present_descriptors(self) -> dict[int, set[int]]:
        """image id -> ids of the descriptors it has vectors for."""
        out: dict[int, set[int]] = {}
        for image_id, descriptor_id in self._conn().execute(
            "SELECT image_id, descriptor_id FROM vectors"
        ):
            out.setdefault(image_id, set()).add(descriptor_id)
        return out

    def counts(self) -> dict[str, int]:
        """Number of images by status ("ok", "skipped")."""
        out = {
            r[0]: r[1]
            for r in self._conn().execute("SELECT status, COUNT(*) FROM images GROUP BY status")
        }
        return {"ok": out.get("ok", 0), "skipped": out.get("skipped", 0)}

    def vector_counts(self) -> dict[int, int]:
        """descriptor id -> number of images with a vector for it."""
        return dict(
            self._conn()
            .execute("SELECT descriptor_id, COUNT(*) FROM vectors GROUP BY descriptor_id")
            .fetchall()
        )

    def labels(self, image_ids: Sequence[int] | np.ndarray) -> list[str | None]:
        """Labels of ``image_ids``, in that order."""
        return [r.label for r in self.records(image_ids)]

    def records(self, image_ids: Sequence[int] | np.ndarray) -> list[ImageRecord]:
        """Catalogue rows of ``image_ids``, in that order (a KeyError names a missing id)."""
        ids = [int(i) for i in image_ids]
        cursor = self._conn().cursor()
        cursor.row_factory = None  # plain tuples: this runs for the hits of every search
        among, bound = _among(ids)
        rows = cursor.execute(f"SELECT {_IMAGE_COLUMNS} FROM images WHERE id IN {among}", bound)
        found = {r[0]: _image_record(r) for r in rows}
        return [found[i] for i in ids]

    def names(self, image_ids: Sequence[int] | np.ndarray) -> list[tuple[str, str | None]]:
        """``(path, label)`` of ``image_ids``, in that order: what a search shows of its hits,
        read without the rest of each row (a KeyError names a missing id)."""
        ids = image_ids.tolist() if isinstance(image_ids, np.ndarray) else list(map(int, image_ids))
        known: dict[int, tuple[str, str | None]] = self._cache("names", self.change_token(), dict)
        wanted = [i for i in ids if i not in known]
        if wanted:
            cursor = self._conn().cursor()
            cursor.row_factory = None
            among, bound = _among(wanted)
            rows = cursor.execute(
                f"SELECT id, path, label FROM images WHERE id IN {among}", bound
            ).fetchall()
            if len(known) > MAX_CACHED_NAMES:
                known.clear()
            for image_id, path, label in rows:
                known[image_id] = (from_stored(path), from_stored(label))
        return [known[i] for i in ids]

    def set_labels(self, labels: dict[str, str | None]) -> None:
        """Set the label of images by path."""
        with self._writing(), self._transaction() as db:
            db.executemany(
                "UPDATE images SET label = ? WHERE path = ?",
                [(None if v is None else to_stored(v), to_stored(k)) for k, v in labels.items()],
            )

    def remove_images(self, image_ids: Iterable[int]) -> int:
        """Drop images and their vectors; returns how many were removed."""
        ids = [int(i) for i in image_ids]
        with self._writing():
            with self._transaction() as db:
                _fill_scratch(db, ids)
                feed = _Feed(db)
                feed.remove_scratch()  # logged before the cascade deletes the vectors
                removed = db.execute(
                    f"DELETE FROM images WHERE id IN (SELECT id FROM {_SCRATCH})"
                ).rowcount
                feed.finish()
                pause_point("remove-commit")
            for d in self.descriptors():
                self.compact(d.id)
        return removed

    # -- writing extraction results --------------------------------------------------------------
    def write_batch(self, updates: Sequence[ImageUpdate]) -> None:
        """Write one batch of results atomically: new segment files first, then one transaction
        (which also bumps the generation of every descriptor whose vectors it changes)."""
        if not updates:
            return
        with self._writing():
            self._write_batch(updates)

    def _write_batch(self, updates: Sequence[ImageUpdate]) -> None:
        staged: list[tuple[DescriptorRecord, str, list[str]]] = []
        try:
            for record in self.descriptors():
                rows = [u for u in updates if u.status == "ok" and record.spec in u.vectors]
                if not rows:
                    continue
                wrong = [u for u in rows if np.shape(u.vectors[record.spec]) != (record.dim,)]
                if wrong:
                    raise CorruptError(
                        f"descriptor {record.spec} produced "
                        f"{np.size(wrong[0].vectors[record.spec])} values for {wrong[0].path}, "
                        f"expected {record.dim}"
                    )
                matrix = np.ascontiguousarray(
                    np.stack([u.vectors[record.spec] for u in rows]), np.float32
                )
                staged.append(
                    (
                        record,
                        self._write_segment(record.id, matrix),
                        [to_stored(u.path) for u in rows],
                    )
                )
            now = time.time()
            pause_point("batch-files")
            with self._transaction() as db:
                db.executemany(
                    "UPDATE images SET mtime_ns = ?, size = ?, label = COALESCE(?, label), "
                    "updated_at = ? WHERE path = ?",
                    [
                        (u.mtime_ns, u.size, _stored_label(u), now, to_stored(u.path))
                        for u in updates
                        if u.status == "unchanged"
                    ],
                )
                db.executemany(
                    "INSERT INTO images (path, sha256, size, mtime_ns, status, reason, label, "
                    "width, height, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT(path) DO UPDATE SET sha256 = excluded.sha256, "
                    "size = excluded.size, mtime_ns = excluded.mtime_ns, "
                    "status = excluded.status, reason = excluded.reason, "
                    "label = COALESCE(excluded.label, images.label), "
                    "width = excluded.width, height = excluded.height, "
                    "updated_at = excluded.updated_at",
                    [(*_image_columns(u), now) for u in updates if u.status != "unchanged"],
                )
                feed = _Feed(db)
                skipped = [to_stored(u.path) for u in updates if u.status == "skipped"]
                if skipped:
                    _fill_scratch(db, skipped, by_path=True)
                    feed.remove_scratch()
                    db.execute(f"DELETE FROM vectors WHERE image_id IN (SELECT id FROM {_SCRATCH})")
                for record, file, paths in staged:
                    seg = _insert_segment(db, record.id, file, len(paths))
                    db.execute(
                        "INSERT OR REPLACE INTO vectors (descriptor_id, image_id, segment_id, row) "
                        "SELECT ?, i.id, ?, p.key FROM json_each(?) p "
                        "JOIN images i ON i.path = p.value",
                        (record.id, seg, json.dumps(paths)),
                    )
                    feed.log_segment(record.id, seg)
                feed.finish()
                pause_point("batch-commit")
        except BaseException:
            for record, file, _ in staged:
                self._segment_path(record.id, file).unlink(missing_ok=True)
            raise

    def _rewrite_live_rows(self, descriptor_id: int, live: int) -> tuple[str | None, np.ndarray]:
        """Stream a descriptor's live rows into one new segment (bounded memory)."""
        if live == 0:
            return None, _no_ids()
        dim = self._dim(self._conn(), descriptor_id)
        folder = self.root / "vectors" / str(descriptor_id)
        name = f"{uuid.uuid4().hex}.npy"
        tmp = folder / f".tmp-{name}"
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(live, dim))
        all_ids = []
        at = 0
        for ids, block in self.iter_vector_blocks(descriptor_id, COMPACT_BLOCK_ROWS):
            out[at : at + len(ids)] = block
            all_ids.append(ids)
            at += len(ids)
        out.flush()
        del out
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, folder / name)
        return name, np.concatenate(all_ids)

    def _write_segment(self, descriptor_id: int, matrix: np.ndarray) -> str:
        """Write ``matrix`` as a new immutable .npy file: temp name, fsync, atomic rename."""
        folder = self.root / "vectors" / str(descriptor_id)
        folder.mkdir(parents=True, exist_ok=True)
        name = f"{uuid.uuid4().hex}.npy"
        tmp = folder / f".tmp-{name}"
        with open(tmp, "wb") as fh:
            np.save(fh, matrix, allow_pickle=False)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, folder / name)
        return name

    # -- reading vectors -------------------------------------------------------------------------
    def _vector_locations(
        self, db: sqlite3.Connection, descriptor_id: int
    ) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray, np.ndarray]]]:
        """Image ids in search order and, per segment, (its mapped file, rows, positions in
        that order); the files are opened in the caller's snapshot."""
        cur = db.execute(
            "SELECT image_id, segment_id, row FROM vectors "
            "WHERE descriptor_id = ? ORDER BY segment_id, row",
            (descriptor_id,),
        )
        table = np.array(cur.fetchall(), dtype=np.int64).reshape(-1, 3)
        files = self._segment_files(db, descriptor_id)
        ids = table[:, 0]
        parts = []
        if len(table):
            seg_ids, starts = np.unique(table[:, 1], return_index=True)
            bounds = [*starts.tolist(), len(table)]
            for i, seg in enumerate(seg_ids.tolist()):
                lo, hi = bounds[i], bounds[i + 1]
                mapped = self._open_segment(descriptor_id, files[seg])
                parts.append((mapped, table[lo:hi, 2], np.arange(lo, hi)))
        return ids, parts

    def _segment_files(self, db: sqlite3.Connection, descriptor_id: int) -> dict[int, str]:
        return dict(
            db.execute(
                "SELECT id, file FROM segments WHERE descriptor_id = ?", (descriptor_id,)
            ).fetchall()
        )

    def _mapped_segment(self, descriptor_id: int, file: str, listed: dict[int, str]) -> np.ndarray:
        """A segment's memory map, kept between reads (segment files never change, so a map
        stays right; opening one costs more than the rows a re-rank reads from it). Maps of
        files the snapshot no longer lists (``listed``: compacted away) are let go, so their
        disk space is freed."""
        key = (descriptor_id, file)
        mapped = self._maps.get(key)
        if mapped is None:
            mapped = self._open_segment(descriptor_id, file)
            with self._maps_lock:
                current = set(listed.values())
                stale = [k for k in self._maps if k[0] == descriptor_id and k[1] not in current]
                for gone in stale:
                    del self._maps[gone]
                while len(self._maps) >= MAX_MAPPED_SEGMENTS:
                    del self._maps[next(iter(self._maps))]  # the oldest first
                self._maps[key] = mapped
        return mapped

    def _open_segment(self, descriptor_id: int, file: str) -> np.ndarray:
        path = self._segment_path(descriptor_id, file)
        try:
            return np.load(path, mmap_mode="r", allow_pickle=False)
        except FileNotFoundError as exc:
            raise _SegmentVanishedError(path, exc) from exc
        except (OSError, ValueError) as exc:
            raise CorruptError(f"vector file {path} is missing or unreadable: {exc}") from exc

    def vector_count(self, descriptor_id: int) -> int:
        """How many images have a vector of this descriptor."""
        return (
            self._conn()
            .execute("SELECT COUNT(*) FROM vectors WHERE descriptor_id = ?", (descriptor_id,))
            .fetchone()[0]
        )

    def load_vectors(self, descriptor_id: int) -> tuple[np.ndarray, np.ndarray]:
        """All vectors of a descriptor in RAM: ``(image_ids, matrix)``, from one snapshot."""

        def read(db: sqlite3.Connection) -> tuple[np.ndarray, np.ndarray]:
            dim = self._dim(db, descriptor_id)
            ids, parts = self._vector_locations(db, descriptor_id)
            matrix = np.empty((len(ids), dim), dtype=np.float32)
            for mapped, rows, positions in parts:
                matrix[positions] = mapped[rows]
            return ids, matrix

        return self._read_segments(read)

    def iter_vector_blocks(
        self, descriptor_id: int, block_rows: int
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Stream ``(image_ids, block)`` of at most ``block_rows`` rows from the mapped files
        (of one snapshot: the files are mapped before the first block)."""
        ids, parts = self._read_segments(lambda db: self._vector_locations(db, descriptor_id))
        for mapped, rows, positions in parts:
            for lo in range(0, len(rows), block_rows):
                sel = rows[lo : lo + block_rows]
                block = np.asarray(mapped[sel], dtype=np.float32)
                yield ids[positions[lo : lo + block_rows]], block

    def vectors_for(self, descriptor_id: int, image_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Stored vectors of some images, in the order given (KeyError if one has none); one
        query whatever their number."""
        wanted = np.asarray(image_ids, dtype=np.int64).reshape(-1)

        def read(db: sqlite3.Connection) -> np.ndarray:
            dim = self._dim(db, descriptor_id)
            out = np.empty((len(wanted), dim), dtype=np.float32)
            if not len(wanted):
                return out
            # the ids drive the join: one primary-key lookup each (SQLite's plan for
            # "IN (SELECT value FROM json_each(?))" probes the list once per row it scans)
            rows = db.execute(
                "SELECT v.image_id, v.segment_id, v.row FROM json_each(?) AS j "
                "CROSS JOIN vectors AS v ON v.descriptor_id = ? AND v.image_id = j.value",
                (json.dumps(wanted.tolist()), descriptor_id),
            ).fetchall()
            table = np.array(rows, dtype=np.int64).reshape(-1, 3)
            table = table[np.argsort(table[:, 0], kind="stable")]
            at = np.minimum(np.searchsorted(table[:, 0], wanted), max(len(table) - 1, 0))
            missing = ~np.isin(wanted, table[:, 0])
            if missing.any():
                raise KeyError(int(wanted[missing][0]))
            seg_of, row_of = table[at, 1], table[at, 2]
            files = self._segment_files(db, descriptor_id)
            for seg in np.unique(seg_of).tolist():
                sel = seg_of == seg
                out[sel] = self._mapped_segment(descriptor_id, files[seg], files)[row_of[sel]]
            return out

        return self._read_segments(read)

    def write_vectors(self, descriptor_id: int, image_ids: np.ndarray, matrix: np.ndarray) -> None:
        """Store vectors of images already in the catalogue (e.g. computed from another
        descriptor's vectors): one new segment, then one transaction."""
        if len(image_ids) == 0:
            return
        with self._writing():
            matrix = np.ascontiguousarray(matrix, dtype=np.float32)
            dim = self._dim(self._conn(), descriptor_id)
            if matrix.shape != (len(image_ids), dim):
                raise CorruptError(
                    f"expected {len(image_ids)} vectors of {dim} values, got {matrix.shape}"
                )
            file = self._write_segment(descriptor_id, matrix)
            ids = np.asarray(image_ids, dtype=np.int64).tolist()
            try:
                with self._transaction() as db:
                    seg = _insert_segment(db, descriptor_id, file, len(ids))
                    db.execute(
                        "INSERT OR REPLACE INTO vectors (descriptor_id, image_id, segment_id, row) "
                        "SELECT ?, value, ?, key FROM json_each(?)",
                        (descriptor_id, seg, json.dumps(ids)),
                    )
                    feed = _Feed(db)
                    feed.log_segment(descriptor_id, seg)
                    feed.finish()
            except BaseException:
                self._segment_path(descriptor_id, file).unlink(missing_ok=True)
                raise

    def ids_without(self, descriptor_id: int, having: int | None = None) -> np.ndarray:
        """Ids of good images that lack vectors of ``descriptor_id`` (and, with ``having``,
        have vectors of that other descriptor)."""
        sql = (
            "SELECT id FROM images WHERE status = 'ok' AND id NOT IN "
            "(SELECT image_id FROM vectors WHERE descriptor_id = ?)"
        )
        args: tuple[int, ...] = (descriptor_id,)
        if having is not None:
            sql += " AND id IN (SELECT image_id FROM vectors WHERE descriptor_id = ?)"
            args += (having,)
        rows = self._conn().execute(sql + " ORDER BY id", args).fetchall()
        return np.array([r[0] for r in rows], np.int64)

    # -- fitted descriptors ----------------------------------------------------------------------
    def _state_path(self, descriptor_id: int) -> Path:
        return self.root / "models" / f"{descriptor_id}.npz"

    def save_state(
        self, descriptor_id: int, state: dict[str, np.ndarray], *, images: int | None = None
    ) -> None:
        """Keep what a descriptor learned (arrays only, no pickles), replacing any earlier fit;
        vectors made with an earlier fit are dropped with it (a reset of its change feed).
        Temp name, fsync, the transaction that drops the vectors, then the atomic rename.
        ``images``: how many images it learned from (see :meth:`fitted_images`)."""
        with self._writing():
            path = self._state_path(descriptor_id)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".tmp-{uuid.uuid4().hex}.npz")
            with open(tmp, "wb") as fh:
                np.savez(fh, **{k: np.asarray(v) for k, v in state.items()})
                fh.flush()
                os.fsync(fh.fileno())
            pause_point("state-file")
            with self._transaction() as db:
                _Feed(db).reset(descriptor_id)
                db.execute("DELETE FROM vectors WHERE descriptor_id = ?", (descriptor_id,))
                db.execute("DELETE FROM meta WHERE key = ?", (f"fitted_images:{descriptor_id}",))
                if images is not None:
                    db.execute(
                        "INSERT INTO meta VALUES (?, ?)",
                        (f"fitted_images:{descriptor_id}", str(int(images))),
                    )
                pause_point("state-commit")
            # after the commit: a run killed before it keeps the old state with the vectors it
            # made; killed between the two, the old state stays with no vectors (the next run
            # extracts them with it); either way vectors never meet a state they were not made by
            os.replace(tmp, path)
            self.compact(descriptor_id)

    def fitted_images(self, descriptor_id: int) -> int | None:
        """How many images a descriptor's current fit learned from (None: not recorded)."""
        value = self._meta(f"fitted_images:{descriptor_id}")
        return None if value is None else int(value)

    def set_dim(self, descriptor_id: int, dim: int) -> None:
        """Record a vector length learned by fitting (e.g. cnnp's class count); vectors of the
        old length are dropped (a reset of its change feed)."""
        with self._writing():
            with self._transaction() as db:
                _Feed(db).reset(descriptor_id)
                db.execute("DELETE FROM vectors WHERE descriptor_id = ?", (descriptor_id,))
                db.execute("UPDATE descriptors SET dim = ? WHERE id = ?", (int(dim), descriptor_id))
            self.compact(descriptor_id)

    def state_stamp(self, descriptor_id: int) -> int | None:
        """When a descriptor's fitted state was last written (ns), None if never: a cache of
        the fitted descriptor is current while this stays the same."""
        try:
            return self._state_path(descriptor_id).stat().st_mtime_ns
        except FileNotFoundError:
            return None

    def has_state(self, descriptor_id: int) -> bool:
        """Whether a descriptor was fitted on this collection."""
        return self._state_path(descriptor_id).exists()

    def load_state(self, descriptor_id: int) -> dict[str, np.ndarray] | None:
        """What a fitted descriptor learned, or None if it was never fitted."""
        path = self._state_path(descriptor_id)
        if not path.exists():
            return None
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}

    # -- housekeeping ----------------------------------------------------------------------------
    def compact(self, descriptor_id: int, *, force: bool = False) -> bool:
        """Rewrite a descriptor's live rows into one segment when many rows are dead or
        segments are many; returns True when it did. Vectors do not change: no generation
        bump."""
        with self._writing():
            return self._compact(descriptor_id, force)

    def _compact(self, descriptor_id: int, force: bool) -> bool:
        db = self._conn()
        segs = db.execute(
            "SELECT id, file, rows, EXISTS (SELECT 1 FROM vectors v WHERE v.segment_id = s.id) "
            "AS used FROM segments s WHERE descriptor_id = ?",
            (descriptor_id,),
        ).fetchall()
        live = self.vector_count(descriptor_id)
        total = sum(s["rows"] for s in segs)
        empty = [s for s in segs if not s["used"]]
        dead = total - live
        needed = force or len(segs) > MAX_SEGMENTS or dead > MAX_DEAD_FRACTION * total
        if not needed:
            if empty:  # drop fully dead segments cheaply
                with self._transaction() as tx:
                    tx.executemany("DELETE FROM segments WHERE id = ?", [(s["id"],) for s in empty])
                for s in empty:
                    self._segment_path(descriptor_id, s["file"]).unlink(missing_ok=True)
            return False
        new_file, ids = self._rewrite_live_rows(descriptor_id, live)
        pause_point("compact-files")
        with self._transaction() as tx:
            if new_file is not None:
                seg = _insert_segment(tx, descriptor_id, new_file, len(ids))
                # through a keyed temporary table: SQLite joins json_each to vectors row by row
                tx.execute(
                    f"CREATE TEMP TABLE IF NOT EXISTS {_MOVED_TABLE} "
                    "(image_id INTEGER PRIMARY KEY, row INTEGER NOT NULL)"
                )
                tx.execute(f"DELETE FROM {_MOVED}")
                tx.execute(
                    f"INSERT INTO {_MOVED} SELECT value, key FROM json_each(?)",
                    (json.dumps(ids.tolist()),),
                )
                tx.execute(
                    f"UPDATE vectors SET segment_id = ?, row = m.row FROM {_MOVED} AS m "
                    "WHERE vectors.descriptor_id = ? AND vectors.image_id = m.image_id",
                    (seg, descriptor_id),
                )
            tx.executemany("DELETE FROM segments WHERE id = ?", [(s["id"],) for s in segs])
            pause_point("compact-commit")
        pause_point("compact-unlink")
        # only now, after the commit that stops naming them: readers of older snapshots retry
        for s in segs:
            self._segment_path(descriptor_id, s["file"]).unlink(missing_ok=True)
        return True

    # -- checking ----------------------------------------------------------------------------
    def writer_active(self) -> bool:
        """Whether another process (or thread) is writing the collection now."""
        if self._writer is not None:
            return self._writer is not threading.current_thread()
        lock = self.root / "lock"
        if not lock.exists():
            return False
        with open(lock, "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(handle, fcntl.LOCK_UN)
        return False

    def verify(self, *, repair: bool = False) -> tuple[list[Finding], dict[str, int]]:
        """Check the catalogue and the vector files against each other (``cbir check``).

        Errors are what cannot be trusted: the catalogue's own integrity, segment files listed
        but missing, unreadable or of the wrong shape, rows past a file's end, vectors that are
        not finite, vectors of skipped images, duplicate paths, a change feed out of order.
        Notes are harmless: files no segment lists (left by a killed run), good images still
        lacking a descriptor's vectors (the next ``cbir index`` extracts them). With ``repair``
        (the caller holds the writer) what cannot be trusted is removed, each removal of vectors
        logged in the change feed, so the next ``cbir index`` redoes those images and indexes
        follow. Returns the findings and what was looked at.

        Without ``repair`` it reads one snapshot, so a writer running meanwhile cannot make it
        see half a change; a segment file that writer compacts away during the check is then a
        note, not an error.
        """
        if repair:
            if self._writer is not threading.current_thread():
                raise BusyError("repairing needs the writer: call acquire() first")
            return self._verify(repair=True)
        with self._snapshot():
            return self._verify(repair=False)

    def _verify(self, *, repair: bool) -> tuple[list[Finding], dict[str, int]]:
        findings: list[Finding] = []
        db = self._conn()
        seen = {"images": 0, "vectors": 0, "segments": 0}
        problems = [r[0] for r in db.execute("PRAGMA integrity_check").fetchall()]
        if problems != ["ok"]:
            findings.append(Finding("catalogue", "the catalogue is damaged: "
                                    + "; ".join(problems[:5]), error=True))  # fmt: skip
            return findings, seen  # nothing below can be believed
        seen["images"] = db.execute("SELECT COUNT(*) FROM images").fetchone()[0]
        dupes = db.execute(
            "SELECT path, COUNT(*) FROM images GROUP BY path HAVING COUNT(*) > 1"
        ).fetchall()
        if dupes:
            findings.append(Finding("duplicate-paths", f"{len(dupes)} paths are catalogued "
                                    "more than once", error=True, repaired=repair))  # fmt: skip
            if repair:
                with self._transaction() as tx:
                    tx.execute("DELETE FROM images WHERE id NOT IN "
                               "(SELECT MIN(id) FROM images GROUP BY path)")  # fmt: skip
        self._verify_feed(findings, repair)
        for record in self.descriptors():
            self._verify_descriptor(record, findings, seen, repair)
        self._verify_skipped(findings, repair)
        orphans = self._orphan_files()
        if orphans:
            busy = "; a writer is running, and may be about to list them" if (
                self.writer_active()) else ""  # fmt: skip
            findings.append(Finding("orphan-files", f"{len(orphans)} vector files are listed by "
                                    f"no segment (left by a killed run: harmless, deleted by the "
                                    f"next writer){busy}", error=False,
                                    repaired=repair))  # fmt: skip
            if repair:
                self._remove_orphans()
        bare = db.execute(
            "SELECT COUNT(*) FROM images WHERE status = 'ok' AND id NOT IN "
            "(SELECT image_id FROM vectors)"
        ).fetchone()[0]
        if bare:
            findings.append(Finding("images-without-vectors", f"{bare} images have no vectors "
                                    "at all (the next cbir index extracts them)", error=False,
                                    repaired=repair))  # fmt: skip
            if repair:  # as if never indexed: the next run redoes them from the start
                with self._transaction() as tx:
                    tx.execute("DELETE FROM images WHERE status = 'ok' AND id NOT IN "
                               "(SELECT image_id FROM vectors)")  # fmt: skip
        return findings, seen

    def _verify_feed(self, findings: list[Finding], repair: bool) -> None:
        """Every descriptor has a feed; its log lies between its floor and its generation."""
        if not self._has_feed():
            return
        db = self._conn()
        bad = db.execute(
            "SELECT d.id FROM descriptors d LEFT JOIN feed f ON f.descriptor_id = d.id "
            "WHERE f.descriptor_id IS NULL OR f.generation < f.floor OR EXISTS (SELECT 1 FROM "
            "changes c WHERE c.descriptor_id = d.id AND (c.generation > f.generation "
            "OR c.generation <= f.floor))"
        ).fetchall()
        if bad:
            findings.append(Finding("change-feed", f"the change feed of {len(bad)} descriptors "
                                    "is out of order (indexes of them cannot be caught up)",
                                    error=True, repaired=repair))  # fmt: skip
            if repair:  # a reset: every index of them is rebuilt
                with self._transaction() as tx:
                    tx.execute("INSERT OR IGNORE INTO feed SELECT id, 0, 0, 0, 0 FROM descriptors")
                    feed = _Feed(tx)
                    for (descriptor_id,) in bad:
                        feed.reset(descriptor_id)

    def _verify_descriptor(
        self, record: DescriptorRecord, findings: list[Finding], seen: dict[str, int],
        repair: bool,
    ) -> None:  # fmt: skip
        """One descriptor's segments and vectors: present, of its shape, finite."""
        db = self._conn()
        label = record.spec
        segments = db.execute(
            "SELECT id, file, rows FROM segments WHERE descriptor_id = ?", (record.id,)
        ).fetchall()
        table = np.array(
            db.execute(
                "SELECT image_id, segment_id, row FROM vectors WHERE descriptor_id = ? "
                "ORDER BY segment_id, row",
                (record.id,),
            ).fetchall(),
            dtype=np.int64,
        ).reshape(-1, 3)
        seen["segments"] += len(segments)
        seen["vectors"] += len(table)
        untrusted: list[np.ndarray] = []
        listed = {int(s["id"]) for s in segments}
        unlisted = table[~np.isin(table[:, 1], list(listed))] if len(table) else table
        if len(unlisted):
            findings.append(Finding("vectors-without-segment", f"{len(unlisted)} vectors of "
                                    f"{label} name a segment the catalogue lacks", error=True,
                                    repaired=repair))  # fmt: skip
            untrusted.append(unlisted[:, 0])
        for seg in segments:
            rows = table[table[:, 1] == seg["id"]]
            path = self._segment_path(record.id, seg["file"])
            try:
                mapped = np.load(path, mmap_mode="r", allow_pickle=False)
                shape_ok = mapped.dtype == np.float32 and mapped.shape == (seg["rows"], record.dim)
            except (OSError, ValueError) as exc:
                mapped, shape_ok, why = None, False, f"missing or unreadable ({exc})"
            else:
                why = f"of shape {mapped.shape} {mapped.dtype}, not ({seg['rows']}, {record.dim})"
            if not shape_ok and not path.exists() and not repair and self.writer_active():
                findings.append(Finding("segment-file", f"vector file {path} of {label} went "
                                        "while a writer runs (compacted away, most likely): "
                                        "check again once it is done", error=False))  # fmt: skip
                continue
            if not shape_ok:
                findings.append(Finding("segment-file", f"vector file {path} of {label} is "
                                        f"{why}: {len(rows)} vectors lost", error=True,
                                        repaired=repair))  # fmt: skip
                untrusted.append(rows[:, 0])
                continue
            past = rows[:, 2] >= seg["rows"]
            if past.any():
                findings.append(Finding("rows-past-end", f"{int(past.sum())} vectors of {label} "
                                        f"point past the end of {path}", error=True,
                                        repaired=repair))  # fmt: skip
                untrusted.append(rows[past, 0])
                rows = rows[~past]
            finite = np.ones(len(rows), dtype=bool)
            for lo in range(0, len(rows), COMPACT_BLOCK_ROWS):
                block = np.asarray(mapped[rows[lo : lo + COMPACT_BLOCK_ROWS, 2]])
                finite[lo : lo + COMPACT_BLOCK_ROWS] = np.isfinite(block).all(axis=1)
            if not finite.all():
                findings.append(Finding("not-finite", f"{int((~finite).sum())} vectors of "
                                        f"{label} hold NaN or infinite values", error=True,
                                        repaired=repair))  # fmt: skip
                untrusted.append(rows[~finite, 0])
        lacking = db.execute(
            "SELECT COUNT(*) FROM images WHERE status = 'ok' AND id NOT IN "
            "(SELECT image_id FROM vectors WHERE descriptor_id = ?)",
            (record.id,),
        ).fetchone()[0]
        if lacking:
            findings.append(Finding("lacking-vectors", f"{lacking} images lack {label} vectors "
                                    "(the next cbir index extracts them)",
                                    error=False))  # fmt: skip
        if repair and untrusted:
            self._drop_vectors(record.id, np.unique(np.concatenate(untrusted)))
            self.compact(record.id, force=True)

    def _verify_skipped(self, findings: list[Finding], repair: bool) -> None:
        """A skipped image has no vectors (they would be found by searches)."""
        ids = [r[0] for r in self._conn().execute(
            "SELECT DISTINCT image_id FROM vectors WHERE image_id IN "
            "(SELECT id FROM images WHERE status = 'skipped')"
        )]  # fmt: skip
        if not ids:
            return
        findings.append(Finding("vectors-of-skipped", f"{len(ids)} skipped images have vectors",
                                error=True, repaired=repair))  # fmt: skip
        if repair:
            for record in self.descriptors():
                self._drop_vectors(record.id, np.asarray(ids, np.int64))

    def _drop_vectors(self, descriptor_id: int, image_ids: np.ndarray) -> None:
        """Remove some vectors of a descriptor, logged as removed in its change feed."""
        with self._transaction() as db:
            _fill_scratch(db, image_ids.tolist())
            feed = _Feed(db)
            feed.remove_scratch_of(descriptor_id)
            db.execute(
                f"DELETE FROM vectors WHERE descriptor_id = ? AND image_id IN "
                f"(SELECT id FROM {_SCRATCH})",
                (descriptor_id,),
            )
            feed.finish()

    def clear_vectors(self, descriptor_id: int) -> None:
        """Drop every vector of a descriptor (a reset of its change feed), e.g. when what it
        learned is lost: the next ``cbir index`` fits and extracts it again."""
        with self._writing():
            with self._transaction() as db:
                _Feed(db).reset(descriptor_id)
                db.execute("DELETE FROM vectors WHERE descriptor_id = ?", (descriptor_id,))
                db.execute("DELETE FROM meta WHERE key = ?", (f"fitted_images:{descriptor_id}",))
            self._state_path(descriptor_id).unlink(missing_ok=True)
            self.compact(descriptor_id)


class _Feed:
    """The change feed inside one write transaction: bumps each descriptor it touches once,
    logs the image ids, and prunes the log to its bound when the transaction is done."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.bumped: dict[int, int] = {}

    def generation(self, descriptor_id: int) -> int:
        """The descriptor's generation in this transaction (bumped on first use)."""
        if descriptor_id not in self.bumped:
            row = self.db.execute(
                "INSERT INTO feed (descriptor_id, generation, floor, logged, log_bound) "
                "VALUES (?, 1, 0, 0, 0) ON CONFLICT (descriptor_id) "
                "DO UPDATE SET generation = generation + 1 RETURNING generation",
                (descriptor_id,),
            ).fetchone()
            self.bumped[descriptor_id] = int(row[0])
        return self.bumped[descriptor_id]

    def _log(self, descriptor_id: int, op: str, select_ids: str, args: tuple[Any, ...]) -> None:
        generation = self.generation(descriptor_id)
        logged = self.db.execute(
            "INSERT OR REPLACE INTO changes (descriptor_id, generation, image_id, op) "
            f"SELECT ?, ?, image_id, ? FROM ({select_ids})",
            (descriptor_id, generation, op, *args),
        ).rowcount
        self.db.execute(
            "UPDATE feed SET logged = logged + ? WHERE descriptor_id = ?", (logged, descriptor_id)
        )

    def log_segment(self, descriptor_id: int, segment_id: int) -> None:
        """Log every vector of a segment just written as added."""
        self._log(
            descriptor_id,
            _ADDED,
            "SELECT image_id FROM vectors WHERE segment_id = ?",
            (segment_id,),
        )

    def remove_scratch(self) -> None:
        """Log as removed, per descriptor, the vectors of the images in the scratch table
        (before the caller deletes them)."""
        touched = self.db.execute(
            f"SELECT DISTINCT descriptor_id FROM vectors WHERE image_id IN "
            f"(SELECT id FROM {_SCRATCH})"
        ).fetchall()
        for (descriptor_id,) in touched:
            self.remove_scratch_of(descriptor_id)

    def remove_scratch_of(self, descriptor_id: int) -> None:
        """Log as removed the vectors of one descriptor of the images in the scratch table."""
        self._log(
            descriptor_id,
            _REMOVED,
            f"SELECT image_id FROM vectors WHERE descriptor_id = ? "
            f"AND image_id IN (SELECT id FROM {_SCRATCH})",
            (descriptor_id,),
        )

    def reset(self, descriptor_id: int) -> None:
        """Every vector of the descriptor is dropped: the log restarts at the new generation."""
        generation = self.generation(descriptor_id)
        self.db.execute("DELETE FROM changes WHERE descriptor_id = ?", (descriptor_id,))
        self.db.execute(
            "UPDATE feed SET floor = ?, logged = 0 WHERE descriptor_id = ?",
            (generation, descriptor_id),
        )

    def finish(self) -> None:
        """Prune the log of every descriptor this transaction touched, when past its bound.

        The bound is max(LOG_MIN_ROWS, LOG_ROWS_PER_VECTOR x vector count); the vector count is
        measured only when the log passes the last bound, so a write costs no count."""
        for descriptor_id in self.bumped:
            logged, bound = self.db.execute(
                "SELECT logged, log_bound FROM feed WHERE descriptor_id = ?", (descriptor_id,)
            ).fetchone()
            if logged <= max(LOG_MIN_ROWS, bound):
                continue
            vectors = self.db.execute(
                "SELECT COUNT(*) FROM vectors WHERE descriptor_id = ?", (descriptor_id,)
            ).fetchone()[0]
            bound = max(LOG_MIN_ROWS, LOG_ROWS_PER_VECTOR * vectors)
            if logged > bound:
                self._prune(descriptor_id, int(bound * LOG_KEEP_FRACTION))
            self.db.execute(
                "UPDATE feed SET log_bound = ? WHERE descriptor_id = ?", (bound, descriptor_id)
            )

    def _prune(self, descriptor_id: int, keep: int) -> None:
        """Drop the oldest generations, keeping at most ``keep`` rows (whole generations)."""
        oldest_dropped = self.db.execute(
            "SELECT generation FROM changes WHERE descriptor_id = ? "
            "ORDER BY generation DESC LIMIT 1 OFFSET ?",
            (descriptor_id, keep),
        ).fetchone()
        if oldest_dropped is not None:
            floor = int(oldest_dropped[0])
            self.db.execute(
                "DELETE FROM changes WHERE descriptor_id = ? AND generation <= ?",
                (descriptor_id, floor),
            )
            self.db.execute(
                "UPDATE feed SET floor = ? WHERE descriptor_id = ?", (floor, descriptor_id)
            )
        self.db.execute(
            "UPDATE feed SET logged = (SELECT COUNT(*) FROM changes WHERE descriptor_id = ?) "
            "WHERE descriptor_id = ?",
            (descriptor_id, descriptor_id),
        )


def _fill_scratch(db: sqlite3.Connection, values: Sequence[Any], *, by_path: bool = False) -> None:
    """Put image ids (or the ids of the images at some paths) in this connection's scratch
    table, inside the caller's transaction."""
    db.execute(f"CREATE TEMP TABLE IF NOT EXISTS {_SCRATCH_TABLE} (id INTEGER PRIMARY KEY)")
    db.execute(f"DELETE FROM {_SCRATCH}")
    source = (
        "SELECT i.id FROM json_each(?) p JOIN images i ON i.path = p.value"
        if by_path
        else "SELECT value FROM json_each(?)"
    )
    db.execute(f"INSERT OR IGNORE INTO {_SCRATCH} (id) {source}", (json.dumps(list(values)),))


def _stored_label(u: ImageUpdate) -> str | None:
    return None if u.label is None else to_stored(u.label)


def _image_columns(u: ImageUpdate) -> tuple[Any, ...]:
    # a reason is text for people: an undecodable byte in one is shown escaped
    reason = None if u.reason is None else u.reason.encode("utf-8", "backslashreplace").decode()
    return (to_stored(u.path), u.sha256, u.size, u.mtime_ns, u.status,
            reason, _stored_label(u), u.width, u.height)  # fmt: skip


def _image_record(row: Sequence[Any]) -> ImageRecord:
    """A catalogue row as a record, its name and label as they were given (cbir.names)."""
    record = ImageRecord(*row)
    if record.path.startswith(BYTES_MARK) or (record.label or "").startswith(BYTES_MARK):
        record = replace(record, path=from_stored(record.path), label=from_stored(record.label))
    return record


def _insert_segment(db: sqlite3.Connection, descriptor_id: int, file: str, rows: int) -> int:
    """Record a segment file inside the caller's transaction; returns its id."""
    cur = db.execute(
        "INSERT INTO segments (descriptor_id, file, rows) VALUES (?, ?, ?)",
        (descriptor_id, file, rows),
    )
    return int(cur.lastrowid or 0)
