"""Exact nearest-neighbour search under any registered metric.

The collection side is prepared once (``Metric.prepare``) and compared with the queries block by
block, keeping a running top-k, so the largest temporary is ``queries x block_rows`` distances
whatever the collection's size. When the vectors do not fit the memory budget, blocks are read
from the memory-mapped segment files for every query batch instead of being held in RAM.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import numpy as np

from cbir.metrics import Metric, as_matrix, get_metric, take_rows

BlockSource = Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]]


class ExactIndex:
    """Brute-force k-NN: exact for every metric, vectorised over blocks of the collection."""

    def __init__(self, metric: str | Metric = "euclidean", *, block_rows: int = 16384) -> None:
        if block_rows < 1:
            raise ValueError(f"block_rows must be a positive integer, got {block_rows}")
        self.metric = get_metric(metric)
        self.block_rows = block_rows
        self._ids: np.ndarray = np.empty(0, dtype=np.int64)
        self._prepared = None
        self._source: BlockSource | None = None
        self.dim: int | None = None

    # -- building ------------------------------------------------------------------------------
    def add_all(self, ids: np.ndarray, vectors: np.ndarray) -> ExactIndex:
        """Hold ``vectors`` (rows named by ``ids``) in RAM, prepared for the metric."""
        vectors = as_matrix(vectors)
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids) != len(vectors):
            raise ValueError(f"{len(ids)} ids for {len(vectors)} vectors")
        self._ids, self.dim = ids, vectors.shape[1]
        self._prepared = self.metric.prepare(vectors) if len(ids) else None
        self._source = None
        return self

    def stream_from(self, source: BlockSource, dim: int) -> ExactIndex:
        """Read ``(ids, block)`` pairs from ``source()`` at each search (bounded memory)."""
        self._source, self.dim = source, dim
        self._prepared, self._ids = None, np.empty(0, dtype=np.int64)
        return self

    def __len__(self) -> int:
        if self._source is not None:
            return sum(len(ids) for ids, _ in self._source())
        return len(self._ids)

    def _blocks(self) -> Iterator[tuple[np.ndarray, object]]:
        if self._source is not None:
            for ids, block in self._source():
                for lo in range(0, len(ids), self.block_rows):
                    sub = block[lo : lo + self.block_rows]
                    yield ids[lo : lo + self.block_rows], self.metric.prepare(as_matrix(sub))
            return
        for lo in range(0, len(self._ids), self.block_rows):
            rows = slice(lo, lo + self.block_rows)
            yield self._ids[rows], take_rows(self._prepared, rows)

    # -- searching ------------------------------------------------------------------------------
    def search(
        self,
        queries: np.ndarray,
        k: int,
        *,
        reduce: str | None = None,
        exclude: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest rows for each query: ``(distances, ids)``, each ``(m, k')``.

        ``k' = min(k, n)``; rows are sorted by distance, ties by id. ``reduce="min"`` first
        takes, for each collection row, the smallest distance to any query (one result list for
        the whole query set). ``exclude`` ids never appear in the results.
        """
        if k < 1:
            raise ValueError(f"k must be a positive integer, got {k}")
        Q = as_matrix(queries, self.dim)
        PQ = self.metric.prepare(Q)
        m = 1 if reduce == "min" else len(Q)
        best_d = np.full((m, 0), np.inf)
        best_i = np.full((m, 0), -1, dtype=np.int64)
        for ids, block in self._blocks():
            D = self.metric.compare(PQ, block)
            if reduce == "min":
                D = D.min(axis=0, keepdims=True)
            if exclude is not None and len(exclude):
                D[:, np.isin(ids, exclude)] = np.inf
            cand_i = np.broadcast_to(ids, D.shape)
            best_d, best_i = _merge_topk(best_d, best_i, D, cand_i, k)
        order = np.lexsort((best_i, best_d), axis=-1)
        best_d = np.take_along_axis(best_d, order, axis=1)
        best_i = np.take_along_axis(best_i, order, axis=1)
        keep = np.isfinite(best_d).all(axis=0) if exclude is not None else slice(None)
        return best_d[:, keep], best_i[:, keep]


def _merge_topk(
    best_d: np.ndarray, best_i: np.ndarray, D: np.ndarray, ids: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Keep the ``k`` smallest of the running best and a new block, for every query at once."""
    all_d = np.concatenate([best_d, D], axis=1)
    all_i = np.concatenate([best_i, ids], axis=1)
    if all_d.shape[1] <= k:
        return all_d, all_i
    part = np.argpartition(all_d, k - 1, axis=1)[:, :k]
    top_d = np.take_along_axis(all_d, part, axis=1)
    kth = top_d.max(axis=1, keepdims=True)
    if ((all_d <= kth).sum(axis=1) > k).any():
        # Ties straddle the cut: which of them survive must not depend on block boundaries,
        # so fall back to a full (distance, id) sort; rare with real descriptors.
        part = np.lexsort((all_i, all_d), axis=-1)[:, :k]
        top_d = np.take_along_axis(all_d, part, axis=1)
    return top_d, np.take_along_axis(all_i, part, axis=1)
