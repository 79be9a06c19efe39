"""The index manager: which index serves a descriptor, the cache, and keeping it current.

One manager belongs to one open collection. For a (descriptor, metric) pair it holds an index
and the change-feed generation that index reflects. Before every search it compares that with
the store's generation (one cheap query) and, when another process or thread has written or
removed vectors meanwhile, applies just those changes (``Store.changes_since``); a reset (a
refit replaced every vector, or the log no longer reaches back) rebuilds the index. So a
long-running process searches what ``cbir index`` added in another process without reopening.

Which index (``Settings.index``): a kind by name, or ``auto``: exact search below
``Settings.auto_threshold`` images, above it an HNSW graph when its vectors fit the memory budget,
else IVF-PQ, which keeps only compact codes in RAM and re-ranks from the segment files.

The memory policy of exact search: a descriptor whose vectors fit the budget is held in RAM
(:class:`~cbir.index.exact.ExactIndex`); a larger one is scanned block by block from the
memory-mapped segment files at each search (:class:`SegmentScan`), always current.

Approximate indexes are saved under the collection's ``indexes/`` folder with a small record of
the change-feed generation they reflect, written after the index (a crash between the two leaves
an older generation on record, and replaying changes already applied is harmless). Opening a
collection loads a saved index and catches it up; a missing, unreadable or mismatched one is
rebuilt, never trusted. Updated indexes are saved again when the collection is closed.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from cbir.config import Settings
from cbir.errors import CorruptError, InvalidRequestError
from cbir.index.base import (
    SearchParams,
    VectorIndex,
    check_query,
    create_index,
    index_kinds,
    load_index,
)
from cbir.index.exact import scan
from cbir.metrics import Metric, as_matrix, get_metric
from cbir.metrics.base import Prepared
from cbir.store import DescriptorRecord, Store

#: Bytes of one stored value (float32).
VALUE_BYTES = 4
#: Copies of a descriptor's vectors alive while an index is built in RAM: the loaded matrix and
#: its prepared form.
BUILD_COPIES = 2
#: An HNSW index holds its vectors and about this much again in links (M=32: 256 bytes a row).
HNSW_OVERHEAD = 2
#: Vectors an index that learns (IVF lists, PQ codebooks) is trained on, drawn evenly.
TRAIN_SAMPLE = 100_000
#: The approximate kinds ``auto`` chooses: in RAM, and compact codes with a re-rank from disk.
AUTO_IN_RAM, AUTO_COMPACT = "hnsw", "ivf-pq"


def choose_kind(settings: Settings, n: int, dim: int) -> str:
    """The index kind for ``n`` vectors of ``dim`` values under the settings."""
    if settings.index != "auto":
        if settings.index not in index_kinds():
            raise InvalidRequestError(
                f"unknown index {settings.index!r}; choose auto or one of: "
                f"{', '.join(index_kinds())}"
            )
        return settings.index
    if n < settings.auto_threshold:
        return "exact"
    fits = n * dim * VALUE_BYTES * HNSW_OVERHEAD <= settings.memory_budget
    return AUTO_IN_RAM if fits else AUTO_COMPACT


class SegmentScan:
    """Exact search that reads a descriptor's vectors from the store at every query (bounded
    memory, always current). Not a registered kind: it is a view of one store."""

    kind: ClassVar[str] = "exact-stream"
    approximate: ClassVar[bool] = False

    def __init__(self, store: Store, record: DescriptorRecord, metric: Metric, block_rows: int):
        self.store, self.record, self.metric = store, record, metric
        self.dim, self.block_rows = record.dim, block_rows

    def __len__(self) -> int:
        return self.store.vector_count(self.record.id)

    def search(
        self,
        queries: np.ndarray,
        k: int,
        *,
        exclude: np.ndarray | None = None,
        params: SearchParams | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        Q = check_query(queries, k, self.dim)

        def blocks() -> Iterator[tuple[np.ndarray, Prepared]]:
            for ids, block in self.store.iter_vector_blocks(self.record.id, self.block_rows):
                yield ids, self.metric.prepare(as_matrix(block))

        return scan(self.metric, Q, blocks(), min(k, len(self)), exclude=exclude)


SearchIndex = VectorIndex | SegmentScan


@dataclass
class _Entry:
    index: SearchIndex
    generation: int
    kind: str
    saved: int = -1  # the generation of the saved copy (-1: none)


class IndexManager:
    """The indexes of one collection's descriptors, each kept in step with the store."""

    def __init__(self, store: Store, settings: Settings) -> None:
        self.store = store
        self.settings = settings
        self._entries: dict[tuple[int, str, bool], _Entry] = {}
        self._lock = threading.Lock()

    def index(
        self, record: DescriptorRecord, metric: str | Metric, *, exact: bool = False
    ) -> SearchIndex:
        """The index of a descriptor under a metric, up to date with the store; ``exact``
        asks for exact search whatever the settings choose."""
        m = get_metric(metric)
        key = (record.id, m.name, exact)
        with self._lock:
            entry = self._entries.get(key)
            generation = self.store.generation(record.id)
            current = entry is not None and entry.generation == generation
            if current and entry.index.dim == record.dim:
                return entry.index  # nothing changed: the one query above is all it costs
            n = self.store.vector_count(record.id)
            kind = "exact" if exact else choose_kind(self.settings, n, record.dim)
            if entry is not None and (entry.kind != kind or entry.index.dim != record.dim):
                entry = None  # grown past the threshold, or a refit changed the vector length
            if entry is None and kind != "exact":
                entry = self._load_saved(record, m, kind)
            if entry is not None and entry.generation != generation:
                entry = self._catch_up(entry, record)
            if entry is not None and getattr(entry.index, "stale", False):
                entry = None  # many removals, or grown far past what it learned from
            if entry is None:
                entry = self._build(record, m, kind)
            self._entries[key] = entry
            return entry.index

    def save(self) -> None:
        """Save the approximate indexes updated since they were saved (or built)."""
        with self._lock:
            for (descriptor_id, metric, _), entry in self._entries.items():
                if isinstance(entry.index, SegmentScan) or entry.saved == entry.generation:
                    continue
                if entry.kind != "exact":
                    with contextlib.suppress(OSError):  # a read-only collection keeps none
                        self._save(descriptor_id, metric, entry.kind, entry.index, entry)

    # -- building ------------------------------------------------------------------------------
    def _build(self, record: DescriptorRecord, metric: Metric, kind: str) -> _Entry:
        # the generation is read before the vectors: a write in between is applied again by
        # the next catch-up, which is harmless (add replaces, remove ignores what is gone)
        generation = self.store.generation(record.id)
        if kind != "exact":
            return self._build_approximate(record, metric, kind, generation)
        n = self.store.vector_count(record.id)
        if n * record.dim * VALUE_BYTES * BUILD_COPIES > self.settings.memory_budget:
            scan_ = SegmentScan(self.store, record, metric, self.settings.block_rows)
            return _Entry(scan_, generation, kind)
        index = create_index(
            "exact", metric=metric, dim=record.dim, block_rows=self.settings.block_rows
        )
        index.add(*self.store.load_vectors(record.id))
        return _Entry(index, generation, kind)

    def _build_approximate(
        self, record: DescriptorRecord, metric: Metric, kind: str, generation: int
    ) -> _Entry:
        index: Any = create_index(
            kind,
            metric=metric,
            dim=record.dim,
            source=self._source(record),
            label=self._label(record, metric),
            home=self.store.root / "indexes",
            **self.settings.index_params,
        )
        n = self.store.vector_count(record.id)
        if n:
            index.train(self._sample(record, n), expected=n)
            for ids, block in self.store.iter_vector_blocks(record.id, self.settings.block_rows):
                index.add(ids, block)
        entry = _Entry(index, generation, kind)
        with contextlib.suppress(OSError):
            self._save(record.id, metric.name, kind, index, entry)
        return entry

    def _sample(self, record: DescriptorRecord, n: int) -> np.ndarray:
        """Up to :data:`TRAIN_SAMPLE` vectors, evenly spread over the collection."""
        step = max(1, n // TRAIN_SAMPLE)
        rows = []
        for _, block in self.store.iter_vector_blocks(record.id, self.settings.block_rows):
            rows.append(block[::step])
        return np.concatenate(rows)[:TRAIN_SAMPLE]

    def _label(self, record: DescriptorRecord, metric: Metric) -> str:
        """A name for the index unique to this collection, descriptor and metric (an index
        that lives in a server is stored under it)."""
        return f"cbir_{self.store.uuid[:16]}_{record.id}_{metric.name}"

    def _source(self, record: DescriptorRecord) -> Any:
        """Reads full vectors for an approximate index's exact re-rank."""
        store, descriptor_id = self.store, record.id

        def vectors(ids: np.ndarray) -> np.ndarray:
            return store.vectors_for(descriptor_id, ids)

        return vectors

    # -- saved copies --------------------------------------------------------------------------
    def _paths(self, descriptor_id: int, metric: str, kind: str) -> tuple[Path, Path]:
        folder = self.store.root / "indexes"
        name = f"{descriptor_id}-{metric}-{kind}"
        return folder / f"{name}.npz", folder / f"{name}.json"

    def _save(
        self, descriptor_id: int, metric: str, kind: str, index: VectorIndex, entry: _Entry
    ) -> None:
        """The index file, then the record of the generation it reflects (see the module)."""
        index_file, record_file = self._paths(descriptor_id, metric, kind)
        index_file.parent.mkdir(exist_ok=True)
        index.save(index_file)
        tmp = record_file.with_name(f".tmp-{os.getpid()}-{record_file.name}")
        record = {
            "generation": entry.generation,
            "dim": index.dim,
            "params": _jsonable(self.settings.index_params),  # built with these; others rebuild
            # what `cbir info` reports, without loading the index
            "vectors": len(index),
            "ram_bytes": index.memory_bytes() if hasattr(index, "memory_bytes") else None,
            "file_bytes": index_file.stat().st_size,
            "reads_vectors": bool(getattr(index, "needs_rerank", False)),
        }
        tmp.write_text(json.dumps(record))
        os.replace(tmp, record_file)
        entry.saved = entry.generation

    def saved(self) -> list[dict[str, Any]]:
        """What the saved indexes hold, from their records (the indexes are not loaded):
        descriptor id, metric, kind, generation, vectors, bytes in RAM and in the index file,
        and whether searches read full vectors from the segments (for a re-rank)."""
        found = []
        for record_file in sorted((self.store.root / "indexes").glob("*.json")):
            descriptor_id, _, rest = record_file.stem.partition("-")
            metric, _, kind = rest.partition("-")
            try:
                record = json.loads(record_file.read_text())
                found.append({"descriptor_id": int(descriptor_id), "metric": metric,
                              "kind": kind, **record})  # fmt: skip
            except (OSError, ValueError):
                continue  # unreadable: rebuilt when it is next used
        return found

    def discard(self, descriptor_id: int, metric: str, kind: str) -> None:
        """Forget a saved index (its record first, then its file): it is rebuilt when next
        used (``cbir check --repair`` of one that cannot be trusted)."""
        with self._lock:
            self._entries = {k: e for k, e in self._entries.items()
                             if (k[0], k[1], e.kind) != (descriptor_id, metric, kind)}  # fmt: skip
            for path in reversed(self._paths(descriptor_id, metric, kind)):
                path.unlink(missing_ok=True)

    def _load_saved(self, record: DescriptorRecord, metric: Metric, kind: str) -> _Entry | None:
        index_file, record_file = self._paths(record.id, metric.name, kind)
        try:
            saved = json.loads(record_file.read_text())
            index = load_index(index_file, source=self._source(record))
        except (OSError, ValueError, KeyError, CorruptError):
            return None  # none, or not trustworthy: rebuilt
        fits = index.kind == kind and index.metric.name == metric.name and index.dim == record.dim
        fits = fits and saved.get("params") == _jsonable(self.settings.index_params)
        generation = saved.get("generation")
        if not fits or not isinstance(generation, int):
            return None
        if generation > self.store.generation(record.id):
            return None  # from another life of the collection
        return _Entry(index, generation, kind, saved=generation)

    def _catch_up(self, entry: _Entry, record: DescriptorRecord) -> _Entry | None:
        """Apply the changes since the entry's generation; None when it must be rebuilt."""
        if isinstance(entry.index, SegmentScan):
            return replace(entry, generation=self.store.generation(record.id))
        changes = self.store.changes_since(record.id, entry.generation)
        if changes.reset:
            return None
        index = entry.index
        index.remove(changes.removed)
        if len(changes.added):
            try:
                vectors = self.store.vectors_for(record.id, changes.added.tolist())
            except KeyError:  # removed again since: the log will say so; rebuild now
                return None
            index.add(changes.added, vectors)
        return replace(entry, generation=changes.generation)


def _jsonable(params: Any) -> Any:
    """Index parameters as they read back from JSON (tuples become lists)."""
    return json.loads(json.dumps(dict(params), default=str))
