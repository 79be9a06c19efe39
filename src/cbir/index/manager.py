"""The index manager: which index serves a descriptor, the cache, and keeping it current.

One manager belongs to one open collection. For a (descriptor, metric) pair it holds an index
and the change-feed generation that index reflects. Before every search it compares that with
the store's generation (one cheap query) and, when another process or thread has written or
removed vectors meanwhile, applies just those changes (``Store.changes_since``); a reset (a
refit replaced every vector, or the log no longer reaches back) rebuilds the index. So a
long-running process searches what ``cbir index`` added in another process without reopening.

The memory policy: a descriptor whose vectors, prepared for the metric, fit the settings' memory
budget is held in RAM (:class:`~cbir.index.exact.ExactIndex`); a larger one is scanned block by
block from the memory-mapped segment files at each search (:class:`SegmentScan`), which is
always current and needs no updates.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from cbir.config import Settings
from cbir.index.base import VectorIndex, check_query, create_index
from cbir.index.exact import scan
from cbir.metrics import Metric, as_matrix, get_metric
from cbir.metrics.base import Prepared
from cbir.store import DescriptorRecord, Store

#: Bytes of one stored value (float32).
VALUE_BYTES = 4
#: Copies of a descriptor's vectors alive while an index is built in RAM: the loaded matrix and
#: its prepared form.
BUILD_COPIES = 2


class SegmentScan:
    """Exact search that reads a descriptor's vectors from the store at every query (bounded
    memory, always current). Not a registered kind: it is a view of one store."""

    kind: ClassVar[str] = "exact-stream"

    def __init__(self, store: Store, record: DescriptorRecord, metric: Metric, block_rows: int):
        self.store, self.record, self.metric = store, record, metric
        self.dim, self.block_rows = record.dim, block_rows

    def __len__(self) -> int:
        return self.store.vector_count(self.record.id)

    def search(
        self, queries: np.ndarray, k: int, *, exclude: np.ndarray | None = None
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


class IndexManager:
    """The indexes of one collection's descriptors, each kept in step with the store."""

    def __init__(self, store: Store, settings: Settings) -> None:
        self.store = store
        self.settings = settings
        self._entries: dict[tuple[int, str], _Entry] = {}
        self._lock = threading.Lock()

    def index(self, record: DescriptorRecord, metric: str | Metric) -> SearchIndex:
        """The index of a descriptor under a metric, up to date with the store."""
        m = get_metric(metric)
        key = (record.id, m.name)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry.index.dim != record.dim:
                entry = None  # a refit changed the vector length (e.g. cnnp's classes)
            generation = self.store.generation(record.id)
            if entry is not None and entry.generation != generation:
                entry = self._catch_up(entry, record)
            if entry is None:
                entry = self._build(record, m)
            self._entries[key] = entry
            return entry.index

    def _build(self, record: DescriptorRecord, metric: Metric) -> _Entry:
        # the generation is read before the vectors: a write in between is applied again by
        # the next catch-up, which is harmless (add replaces, remove ignores what is gone)
        generation = self.store.generation(record.id)
        n = self.store.vector_count(record.id)
        if n * record.dim * VALUE_BYTES * BUILD_COPIES > self.settings.memory_budget:
            scan_ = SegmentScan(self.store, record, metric, self.settings.block_rows)
            return _Entry(scan_, generation)
        index = create_index(
            "exact", metric=metric, dim=record.dim, block_rows=self.settings.block_rows
        )
        index.add(*self.store.load_vectors(record.id))
        return _Entry(index, generation)

    def _catch_up(self, entry: _Entry, record: DescriptorRecord) -> _Entry | None:
        """Apply the changes since the entry's generation; None when it must be rebuilt."""
        if isinstance(entry.index, SegmentScan):
            return _Entry(entry.index, self.store.generation(record.id))
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
        return _Entry(index, changes.generation)
