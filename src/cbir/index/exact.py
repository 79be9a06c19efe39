"""Exact nearest-neighbour search under any registered metric.

The collection side is prepared once (``Metric.prepare``) and compared with the queries block by
block, keeping a running top-k, so the largest temporary is ``queries x block_rows`` distances
whatever the collection's size. :class:`ExactIndex` holds the prepared rows in RAM;
:func:`scan` does the same over blocks read from anywhere (the index manager streams them from
the memory-mapped segment files when a collection does not fit its memory budget).

Updates never change arrays a search is reading: ``add`` and ``remove`` build new arrays and swap
one attribute, and a search works on the pair it took at its start, so searches from several
threads may run while another thread updates the index.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import Any, ClassVar

import numpy as np

from cbir.errors import CorruptError
from cbir.index.base import (
    MISSING,
    SearchParams,
    atomic_save,
    check_query,
    check_rows,
    positive_int,
    register_index,
)
from cbir.metrics import Metric, get_metric, take_rows
from cbir.metrics.base import Prepared

#: Rows compared with the queries at a time (bounds the distance matrix in memory).
DEFAULT_BLOCK_ROWS = 16384


@register_index
class ExactIndex:
    """Brute-force k-NN: exact for every metric, vectorised over blocks of the collection."""

    kind: ClassVar[str] = "exact"
    approximate: ClassVar[bool] = False

    def __init__(
        self, metric: str | Metric = "euclidean", *, dim: int, block_rows: int = DEFAULT_BLOCK_ROWS
    ) -> None:
        self.block_rows = positive_int("block_rows", block_rows)
        self.metric = get_metric(metric)
        self.dim = dim
        # (ids, prepared rows): replaced whole on every update, never modified in place
        self._data: tuple[np.ndarray, Prepared | None] = (np.empty(0, np.int64), None)

    def __len__(self) -> int:
        return len(self._data[0])

    @property
    def ids(self) -> np.ndarray:
        """The ids held, in row order."""
        return self._data[0]

    # -- updating ------------------------------------------------------------------------------
    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        ids, vectors = check_rows(ids, vectors, self.dim)
        if not len(ids):
            return
        held, prepared = self._kept(ids)
        new = self.metric.prepare(vectors)
        joined = new if prepared is None else _concat(prepared, new)
        self._data = (np.concatenate([held, ids]), joined)

    def remove(self, ids: np.ndarray) -> int:
        before = len(self)
        self._data = self._kept(np.asarray(ids, dtype=np.int64).reshape(-1))
        return before - len(self)

    def _kept(self, drop: np.ndarray) -> tuple[np.ndarray, Prepared | None]:
        """The held rows without those of ``drop``."""
        held, prepared = self._data
        if not len(drop) or prepared is None:
            return held, prepared
        keep = ~np.isin(held, drop)
        if keep.all():
            return held, prepared
        return held[keep], (take_rows(prepared, keep) if keep.any() else None)

    # -- searching -----------------------------------------------------------------------------
    def search(
        self,
        queries: np.ndarray,
        k: int,
        *,
        exclude: np.ndarray | None = None,
        params: SearchParams | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest rows for each query: ``(distances, ids)``, each ``(m, min(k, n))``,
        sorted by distance, ties by id; ``exclude`` ids never appear (their slots are padded)."""
        Q = check_query(queries, k, self.dim)
        ids, prepared = self._data

        def blocks() -> Iterator[tuple[np.ndarray, Prepared]]:
            for lo in range(0, len(ids), self.block_rows):
                rows = slice(lo, lo + self.block_rows)
                yield ids[rows], take_rows(prepared, rows)

        return scan(self.metric, Q, blocks(), min(k, len(ids)), exclude=exclude)

    # -- saving --------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> None:
        ids, prepared = self._data
        parts = () if prepared is None else prepared if isinstance(prepared, tuple) else (prepared,)
        atomic_save(
            path,
            kind=np.array(self.kind),
            metric=np.array(self.metric.name),
            dim=np.array(self.dim),
            tuple_rows=np.array(isinstance(prepared, tuple)),
            ids=ids,
            **{f"rows{n}": p for n, p in enumerate(parts)},
        )

    @classmethod
    def load(cls, path: str | os.PathLike[str], source: object = None) -> ExactIndex:
        """Read a saved exact index (it holds its rows: ``source`` is not needed)."""
        try:
            with np.load(path, allow_pickle=False) as data:
                index = cls(str(data["metric"]), dim=int(data["dim"]))
                parts = [data[f"rows{n}"] for n in range(_row_parts(data.files))]
                ids = data["ids"]
                tuple_rows = bool(data["tuple_rows"])
        except (OSError, KeyError, ValueError) as exc:
            raise CorruptError(
                f"{path} is not a saved exact index ({exc}); it will be rebuilt"
            ) from exc
        prepared: Any = tuple(parts) if tuple_rows else (parts[0] if parts else None)
        if prepared is not None and any(len(p) != len(ids) for p in parts):
            raise CorruptError(f"{path} holds {len(ids)} ids but rows of another length")
        index._data = (ids.astype(np.int64), prepared if len(ids) else None)
        return index


def scan(
    metric: Metric,
    queries: np.ndarray,
    blocks: Iterable[tuple[np.ndarray, Prepared]],
    k: int,
    *,
    exclude: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top ``k`` of prepared ``(ids, rows)`` blocks for every query (the rows prepared by
    ``metric``); rows with fewer than ``k`` results (``exclude``) are padded with ``MISSING``."""
    PQ = metric.prepare(queries)
    m = len(queries)
    best_d = np.full((m, 0), np.inf)
    best_i = np.full((m, 0), MISSING, dtype=np.int64)
    drop = None if exclude is None or not len(exclude) else np.asarray(exclude, np.int64)
    if k > 0:
        for ids, block in blocks:
            D = metric.compare(PQ, block)
            if drop is not None:
                D[:, np.isin(ids, drop)] = np.inf
            best_d, best_i = _merge_topk(best_d, best_i, D, np.broadcast_to(ids, D.shape), k)
    order = np.lexsort((best_i, best_d), axis=-1)
    best_d = np.take_along_axis(best_d, order, axis=1)
    best_i = np.take_along_axis(best_i, order, axis=1)
    best_i[~np.isfinite(best_d)] = MISSING
    return best_d, best_i


def _row_parts(files: list[str]) -> int:
    """How many arrays of prepared rows a saved index holds (``rows0``, ``rows1``, ...)."""
    return sum(name.startswith("rows") for name in files)


def _concat(a: Prepared, b: Prepared) -> Prepared:
    if isinstance(a, tuple):
        return tuple(np.concatenate([x, y]) for x, y in zip(a, b, strict=True))
    return np.concatenate([a, b])


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
