"""A collection on disk: an SQLite catalogue plus memory-mapped vector segments per descriptor.

Layout of a collection directory::

    catalogue.sqlite          images, descriptors, segments, vectors (which row of which file)
    vectors/<descriptor id>/<uuid>.npy   immutable float32 segments, one per flushed batch
    models/<descriptor id>.npz           what a fitted descriptor learned from the collection
    lock                      held by the one process that writes

Why segments: a batch of vectors is written to a new file (temp name, fsync, atomic rename)
*before* the transaction that makes it visible commits. A run killed at any moment therefore
leaves either the previous consistent state or the new one, plus at worst an orphan file, which
the next writer deletes. Re-extracted or removed images leave dead rows behind; ``compact``
rewrites a descriptor's live rows into one segment when enough are dead or segments are many.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sqlite3
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

FORMAT_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS images (
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
);
CREATE TABLE IF NOT EXISTS descriptors (
    id INTEGER PRIMARY KEY,
    spec TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    params TEXT NOT NULL,
    dim INTEGER NOT NULL,
    metric TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS segments (
    id INTEGER PRIMARY KEY,
    descriptor_id INTEGER NOT NULL REFERENCES descriptors(id) ON DELETE CASCADE,
    file TEXT NOT NULL UNIQUE,
    rows INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS vectors (
    descriptor_id INTEGER NOT NULL REFERENCES descriptors(id) ON DELETE CASCADE,
    image_id INTEGER NOT NULL REFERENCES images(id) ON DELETE CASCADE,
    segment_id INTEGER NOT NULL REFERENCES segments(id),
    row INTEGER NOT NULL,
    PRIMARY KEY (descriptor_id, image_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS vectors_by_segment ON vectors (segment_id);
"""


_IMAGE_COLUMNS = "id, path, sha256, size, mtime_ns, status, reason, label, width, height"


class StoreError(Exception):
    """A collection that cannot be opened or written, with the reason."""


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
    reason: str | None = None
    label: str | None = None
    width: int | None = None
    height: int | None = None
    #: descriptor spec -> 1-D vector, for the descriptors extracted this time
    vectors: dict[str, np.ndarray] = field(default_factory=dict)


class Store:
    """The catalogue and vector files of one collection directory."""

    def __init__(self, root: str | Path, *, create: bool = True) -> None:
        self.root = Path(root)
        db = self.root / "catalogue.sqlite"
        if not db.exists():
            if not create:
                raise StoreError(
                    f"no collection at {self.root} (run `cbir index DIR` to create one, "
                    "or choose another with --collection / CBIR_COLLECTION)"
                )
            if self.root.exists() and not self.root.is_dir():
                raise StoreError(f"{self.root} exists and is not a directory")
            self.root.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(db, timeout=30.0, isolation_level=None)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the catalogue {db}: {exc}") from exc
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(_SCHEMA)
        version = self._meta("format_version")
        if version is None:
            self._db.execute(
                "INSERT OR IGNORE INTO meta VALUES ('format_version', ?)", (str(FORMAT_VERSION),)
            )
        elif int(version) > FORMAT_VERSION:
            raise StoreError(
                f"{self.root} was written by a newer cbir (format {version}); "
                f"this one reads format {FORMAT_VERSION}: upgrade cbir"
            )
        self._lock_file: Any = None

    # -- plumbing --------------------------------------------------------------------------------
    def close(self) -> None:
        """Close the catalogue and release the write lock."""
        self.release()
        self._db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def acquire(self) -> None:
        """Take the collection's write lock (one writer at a time) and clean up after crashes."""
        if self._lock_file is not None:
            return
        handle = open(self.root / "lock", "a+")  # noqa: SIM115 - held until release()
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise StoreError(
                f"{self.root} is being written by another cbir process; wait for it to finish"
            ) from None
        self._lock_file = handle
        self._remove_orphans()

    def release(self) -> None:
        """Give the write lock back."""
        if self._lock_file is not None:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None

    def _require_lock(self) -> None:
        if self._lock_file is None:
            self.acquire()

    def _segment_path(self, descriptor_id: int, file: str) -> Path:
        return self.root / "vectors" / str(descriptor_id) / file

    def _remove_orphans(self) -> None:
        """Delete vector files no committed segment refers to (left by a killed run)."""
        vectors_dir = self.root / "vectors"
        if not vectors_dir.is_dir():
            return
        known = {
            (str(r["descriptor_id"]), r["file"])
            for r in self._db.execute("SELECT descriptor_id, file FROM segments")
        }
        for sub in vectors_dir.iterdir():
            if not sub.is_dir():
                continue
            for f in sub.iterdir():
                if (sub.name, f.name) not in known:
                    f.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                sub.rmdir()  # only succeeds when empty (a dropped descriptor)

    # -- descriptors -----------------------------------------------------------------------------
    def descriptors(self) -> list[DescriptorRecord]:
        """The descriptors this collection holds, in the order they were added."""
        return [
            DescriptorRecord(
                id=r["id"],
                spec=r["spec"],
                name=r["name"],
                params=json.loads(r["params"]),
                dim=r["dim"],
                metric=r["metric"],
            )
            for r in self._db.execute("SELECT * FROM descriptors ORDER BY id")
        ]

    def add_descriptor(
        self, spec: str, name: str, params: dict[str, Any], dim: int, metric: str
    ) -> DescriptorRecord:
        """Record a descriptor (idempotent: an existing spec is returned as it is)."""
        self._require_lock()
        with self._transaction() as db:
            db.execute(
                "INSERT OR IGNORE INTO descriptors (spec, name, params, dim, metric, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (spec, name, json.dumps(params), dim, metric, time.time()),
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
        return [ImageRecord(*r) for r in self._db.execute(sql + " ORDER BY id", args)]

    def image_by_path(self, path: str) -> ImageRecord | None:
        row = self._db.execute(
            f"SELECT {_IMAGE_COLUMNS} FROM images WHERE path = ?",
            (path,),
        ).fetchone()
        return None if row is None else ImageRecord(*row)

    def ids_under(self, path: str) -> list[int]:
        """Ids of the image at ``path`` or of every image below the folder ``path``."""
        prefix = path.rstrip(os.sep) + os.sep
        rows = self._db.execute(
            "SELECT id FROM images WHERE path = ? OR substr(path, 1, ?) = ?",
            (path, len(prefix), prefix),
        )
        return [r[0] for r in rows]

    def present_descriptors(self) -> dict[int, set[int]]:
        """image id -> ids of the descriptors it has vectors for."""
        out: dict[int, set[int]] = {}
        for image_id, descriptor_id in self._db.execute(
            "SELECT image_id, descriptor_id FROM vectors"
        ):
            out.setdefault(image_id, set()).add(descriptor_id)
        return out

    def counts(self) -> dict[str, int]:
        """Number of images by status ("ok", "skipped")."""
        out = {
            r[0]: r[1]
            for r in self._db.execute("SELECT status, COUNT(*) FROM images GROUP BY status")
        }
        return {"ok": out.get("ok", 0), "skipped": out.get("skipped", 0)}

    def vector_counts(self) -> dict[int, int]:
        """descriptor id -> number of images with a vector for it."""
        return dict(
            self._db.execute(
                "SELECT descriptor_id, COUNT(*) FROM vectors GROUP BY descriptor_id"
            ).fetchall()
        )

    def labels(self, image_ids: Sequence[int] | np.ndarray) -> list[str | None]:
        """Labels of ``image_ids``, in that order."""
        return [r.label for r in self.records(image_ids)]

    def records(self, image_ids: Sequence[int] | np.ndarray) -> list[ImageRecord]:
        """Catalogue rows of ``image_ids``, in that order (a KeyError names a missing id)."""
        ids = [int(i) for i in image_ids]
        found: dict[int, ImageRecord] = {}
        for start in range(0, len(ids), 900):  # SQLite's host-parameter limit
            chunk = ids[start : start + 900]
            marks = ",".join("?" * len(chunk))
            for r in self._db.execute(
                f"SELECT {_IMAGE_COLUMNS} FROM images WHERE id IN ({marks})",
                chunk,
            ):
                found[r[0]] = ImageRecord(*r)
        return [found[i] for i in ids]

    def set_labels(self, labels: dict[str, str | None]) -> None:
        """Set the label of images by path."""
        self._require_lock()
        with self._transaction() as db:
            db.executemany(
                "UPDATE images SET label = ? WHERE path = ?", [(v, k) for k, v in labels.items()]
            )

    def remove_images(self, image_ids: Iterable[int]) -> int:
        """Drop images and their vectors; returns how many were removed."""
        self._require_lock()
        ids = [(int(i),) for i in image_ids]
        with self._transaction() as db:
            # rowcount counts the images only, not the vectors deleted by the cascade
            removed = db.executemany("DELETE FROM images WHERE id = ?", ids).rowcount
        for d in self.descriptors():
            self.compact(d.id)
        return removed

    # -- writing extraction results --------------------------------------------------------------
    def write_batch(self, updates: Sequence[ImageUpdate]) -> None:
        """Write one batch of results atomically: new segment files first, then one transaction."""
        if not updates:
            return
        self._require_lock()
        by_spec = {d.spec: d for d in self.descriptors()}
        staged: list[tuple[DescriptorRecord, str, list[str]]] = []
        for spec, record in by_spec.items():
            rows = [u for u in updates if u.status == "ok" and spec in u.vectors]
            if not rows:
                continue
            paths = [u.path for u in rows]
            matrix = np.ascontiguousarray(np.stack([u.vectors[spec] for u in rows]), np.float32)
            if matrix.shape[1] != record.dim:
                raise StoreError(
                    f"descriptor {spec} produced {matrix.shape[1]} values, expected {record.dim}"
                )
            staged.append((record, self._write_segment(record.id, matrix), paths))
        now = time.time()
        try:
            with self._transaction() as db:
                for u in updates:
                    if u.status == "unchanged":
                        db.execute(
                            "UPDATE images SET mtime_ns = ?, size = ?, label = COALESCE(?, label), "
                            "updated_at = ? WHERE path = ?",
                            (u.mtime_ns, u.size, u.label, now, u.path),
                        )
                        continue
                    db.execute(
                        "INSERT INTO images (path, sha256, size, mtime_ns, status, reason, label, "
                        "width, height, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                        "ON CONFLICT(path) DO UPDATE SET sha256 = excluded.sha256, "
                        "size = excluded.size, mtime_ns = excluded.mtime_ns, "
                        "status = excluded.status, reason = excluded.reason, "
                        "label = COALESCE(excluded.label, images.label), "
                        "width = excluded.width, height = excluded.height, "
                        "updated_at = excluded.updated_at",
                        (
                            u.path,
                            u.sha256,
                            u.size,
                            u.mtime_ns,
                            u.status,
                            u.reason,
                            u.label,
                            u.width,
                            u.height,
                            now,
                        ),
                    )
                    if u.status == "skipped":
                        db.execute(
                            "DELETE FROM vectors WHERE image_id = "
                            "(SELECT id FROM images WHERE path = ?)",
                            (u.path,),
                        )
                for record, file, paths in staged:
                    seg = _insert_segment(db, record.id, file, len(paths))
                    db.executemany(
                        "INSERT OR REPLACE INTO vectors (descriptor_id, image_id, segment_id, row) "
                        "SELECT ?, id, ?, ? FROM images WHERE path = ?",
                        [(record.id, seg, row, p) for row, p in enumerate(paths)],
                    )
        except BaseException:
            for record, file, _ in staged:
                self._segment_path(record.id, file).unlink(missing_ok=True)
            raise

    def _rewrite_live_rows(self, descriptor_id: int, live: int) -> tuple[str | None, np.ndarray]:
        """Stream a descriptor's live rows into one new segment (bounded memory)."""
        if live == 0:
            return None, np.empty(0, dtype=np.int64)
        dim = next(d.dim for d in self.descriptors() if d.id == descriptor_id)
        folder = self.root / "vectors" / str(descriptor_id)
        name = f"{uuid.uuid4().hex}.npy"
        tmp = folder / f".tmp-{name}"
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(live, dim))
        all_ids = []
        at = 0
        for ids, block in self.iter_vector_blocks(descriptor_id, 65536):
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
        self, descriptor_id: int
    ) -> tuple[np.ndarray, list[tuple[str, np.ndarray, np.ndarray]]]:
        """Image ids in search order and, per segment, (file, rows, positions in that order)."""
        cur = self._db.execute(
            "SELECT v.image_id, v.segment_id, v.row FROM vectors v "
            "WHERE v.descriptor_id = ? ORDER BY v.segment_id, v.row",
            (descriptor_id,),
        )
        table = np.array(cur.fetchall(), dtype=np.int64).reshape(-1, 3)
        files = dict(
            self._db.execute(
                "SELECT id, file FROM segments WHERE descriptor_id = ?", (descriptor_id,)
            ).fetchall()
        )
        ids = table[:, 0]
        parts = []
        if len(table):
            seg_ids, starts = np.unique(table[:, 1], return_index=True)
            bounds = [*starts.tolist(), len(table)]
            for i, seg in enumerate(seg_ids.tolist()):
                lo, hi = bounds[i], bounds[i + 1]
                parts.append((files[seg], table[lo:hi, 2], np.arange(lo, hi)))
        return ids, parts

    def _open_segment(self, descriptor_id: int, file: str) -> np.ndarray:
        path = self._segment_path(descriptor_id, file)
        try:
            return np.load(path, mmap_mode="r", allow_pickle=False)
        except OSError as exc:
            raise StoreError(f"vector file {path} is missing or unreadable: {exc}") from exc

    def vector_count(self, descriptor_id: int) -> int:
        return self._db.execute(
            "SELECT COUNT(*) FROM vectors WHERE descriptor_id = ?", (descriptor_id,)
        ).fetchone()[0]

    def load_vectors(self, descriptor_id: int) -> tuple[np.ndarray, np.ndarray]:
        """All vectors of a descriptor in RAM: ``(image_ids, matrix)``."""
        dim = next(d.dim for d in self.descriptors() if d.id == descriptor_id)
        ids, parts = self._vector_locations(descriptor_id)
        matrix = np.empty((len(ids), dim), dtype=np.float32)
        for file, rows, positions in parts:
            matrix[positions] = self._open_segment(descriptor_id, file)[rows]
        return ids, matrix

    def iter_vector_blocks(
        self, descriptor_id: int, block_rows: int
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Stream ``(image_ids, block)`` of at most ``block_rows`` rows from the mapped files."""
        ids, parts = self._vector_locations(descriptor_id)
        for file, rows, positions in parts:
            mm = self._open_segment(descriptor_id, file)
            for lo in range(0, len(rows), block_rows):
                sel = rows[lo : lo + block_rows]
                yield ids[positions[lo : lo + block_rows]], np.asarray(mm[sel], dtype=np.float32)

    def vectors_for(self, descriptor_id: int, image_ids: Sequence[int]) -> np.ndarray:
        """Stored vectors of some images, in the order given (KeyError if one has none)."""
        dim = next(d.dim for d in self.descriptors() if d.id == descriptor_id)
        out = np.empty((len(image_ids), dim), dtype=np.float32)
        for k, image_id in enumerate(image_ids):
            row = self._db.execute(
                "SELECT s.file, v.row FROM vectors v JOIN segments s ON s.id = v.segment_id "
                "WHERE v.descriptor_id = ? AND v.image_id = ?",
                (descriptor_id, int(image_id)),
            ).fetchone()
            if row is None:
                raise KeyError(image_id)
            out[k] = self._open_segment(descriptor_id, row[0])[row[1]]
        return out

    def write_vectors(self, descriptor_id: int, image_ids: np.ndarray, matrix: np.ndarray) -> None:
        """Store vectors of images already in the catalogue (e.g. computed from another
        descriptor's vectors): one new segment, then one transaction."""
        if len(image_ids) == 0:
            return
        self._require_lock()
        matrix = np.ascontiguousarray(matrix, dtype=np.float32)
        dim = next(d.dim for d in self.descriptors() if d.id == descriptor_id)
        if matrix.shape != (len(image_ids), dim):
            raise StoreError(
                f"expected {len(image_ids)} vectors of {dim} values, got {matrix.shape}"
            )
        file = self._write_segment(descriptor_id, matrix)
        try:
            with self._transaction() as db:
                seg = _insert_segment(db, descriptor_id, file, len(image_ids))
                db.executemany(
                    "INSERT OR REPLACE INTO vectors (descriptor_id, image_id, segment_id, row) "
                    "VALUES (?, ?, ?, ?)",
                    [(descriptor_id, int(i), seg, row) for row, i in enumerate(image_ids)],
                )
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
        return np.array([r[0] for r in self._db.execute(sql + " ORDER BY id", args)], np.int64)

    # -- fitted descriptors ----------------------------------------------------------------------
    def _state_path(self, descriptor_id: int) -> Path:
        return self.root / "models" / f"{descriptor_id}.npz"

    def save_state(
        self, descriptor_id: int, state: dict[str, np.ndarray], *, images: int | None = None
    ) -> None:
        """Keep what a descriptor learned (arrays only, no pickles), replacing any earlier fit;
        vectors made with an earlier fit are dropped with it. Temp name, fsync, atomic rename.
        ``images``: how many images it learned from (see :meth:`fitted_images`)."""
        self._require_lock()
        path = self._state_path(descriptor_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".tmp-{uuid.uuid4().hex}.npz")
        with open(tmp, "wb") as fh:
            np.savez(fh, **{k: np.asarray(v) for k, v in state.items()})
            fh.flush()
            os.fsync(fh.fileno())
        with self._transaction() as db:
            db.execute("DELETE FROM vectors WHERE descriptor_id = ?", (descriptor_id,))
            db.execute("DELETE FROM meta WHERE key = ?", (f"fitted_images:{descriptor_id}",))
            if images is not None:
                db.execute(
                    "INSERT INTO meta VALUES (?, ?)",
                    (f"fitted_images:{descriptor_id}", str(int(images))),
                )
            os.replace(tmp, path)
        self.compact(descriptor_id)

    def fitted_images(self, descriptor_id: int) -> int | None:
        """How many images a descriptor's current fit learned from (None: not recorded)."""
        value = self._meta(f"fitted_images:{descriptor_id}")
        return None if value is None else int(value)

    def set_dim(self, descriptor_id: int, dim: int) -> None:
        """Record a vector length learned by fitting (e.g. cnnp's class count); vectors of the
        old length are dropped."""
        self._require_lock()
        with self._transaction() as db:
            db.execute("DELETE FROM vectors WHERE descriptor_id = ?", (descriptor_id,))
            db.execute("UPDATE descriptors SET dim = ? WHERE id = ?", (int(dim), descriptor_id))
        self.compact(descriptor_id)

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
        segments are many; returns True when it did."""
        self._require_lock()
        segs = self._db.execute(
            "SELECT id, file, rows FROM segments WHERE descriptor_id = ?", (descriptor_id,)
        ).fetchall()
        live = self.vector_count(descriptor_id)
        total = sum(s["rows"] for s in segs)
        empty = [
            s
            for s in segs
            if not self._db.execute(
                "SELECT 1 FROM vectors WHERE segment_id = ? LIMIT 1", (s["id"],)
            ).fetchone()
        ]
        needed = force or len(segs) > 8 or (total and (total - live) > 0.25 * total)
        if not needed:
            if empty:  # drop fully dead segments cheaply
                with self._transaction() as db:
                    db.executemany("DELETE FROM segments WHERE id = ?", [(s["id"],) for s in empty])
                for s in empty:
                    self._segment_path(descriptor_id, s["file"]).unlink(missing_ok=True)
            return False
        new_file, ids = self._rewrite_live_rows(descriptor_id, live)
        with self._transaction() as db:
            if new_file is not None:
                seg = _insert_segment(db, descriptor_id, new_file, len(ids))
                db.executemany(
                    "UPDATE vectors SET segment_id = ?, row = ? "
                    "WHERE descriptor_id = ? AND image_id = ?",
                    [(seg, row, descriptor_id, int(i)) for row, i in enumerate(ids.tolist())],
                )
            db.executemany("DELETE FROM segments WHERE id = ?", [(s["id"],) for s in segs])
        for s in segs:
            self._segment_path(descriptor_id, s["file"]).unlink(missing_ok=True)
        return True


def _insert_segment(db: sqlite3.Connection, descriptor_id: int, file: str, rows: int) -> int:
    """Record a segment file inside the caller's transaction; returns its id."""
    cur = db.execute(
        "INSERT INTO segments (descriptor_id, file, rows) VALUES (?, ?, ?)",
        (descriptor_id, file, rows),
    )
    return int(cur.lastrowid or 0)
