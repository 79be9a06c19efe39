"""The searcher: from what a user asks (query images or vectors, and a :class:`SearchRequest`)
to a :class:`SearchResult`, through the collection's indexes. One path for every face.

Query images already in the collection and unchanged on disk use their stored vectors; others
are decoded and described in this process with the collection's fitted descriptors.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cbir import holdings, images
from cbir.config import Settings
from cbir.errors import InvalidRequestError, NotFoundError
from cbir.extraction import extract_arrays
from cbir.features import Descriptor, create_descriptor
from cbir.index.manager import IndexManager
from cbir.search.combine import RRF_DEPTH, expand_query, ranked_ids, rrf_fuse
from cbir.search.request import SearchRequest
from cbir.search.result import Hit, ScoreKind, SearchResult
from cbir.store import DescriptorRecord, ImageRecord, Store

QueryLike = str | os.PathLike[str] | bytes | np.ndarray
Query = QueryLike | Sequence[QueryLike]


class Searcher:
    """Searches one collection's store through its index manager."""

    def __init__(self, store: Store, settings: Settings, indexes: IndexManager) -> None:
        self.store = store
        self.settings = settings
        self.indexes = indexes

    def search(self, query: Query, request: SearchRequest) -> SearchResult:
        """Rank the collection for ``query`` as ``request`` says."""
        started = time.perf_counter()
        records = [holdings.find(self.store, spec) for spec in request.descriptors]
        metrics = [
            holdings.check_metric(r, m) for r, m in zip(records, request.metrics, strict=True)
        ]
        depth = max(request.k, RRF_DEPTH) if request.fused else request.k
        rankings, kinds, n_queries = [], [], 0
        for record, metric in zip(records, metrics, strict=True):
            index = self.indexes.index(record, metric, exact=request.exact)
            if not len(index):
                raise NotFoundError(
                    f"the collection at {self.store.root} holds no images with "
                    f"{holdings.short_label(record.spec)} vectors yet: add some with "
                    "`cbir index DIR`"
                )
            vectors, query_ids = self.query_vectors(query, record)
            n_queries = len(vectors)
            kinds.append(index.kind)
            exclude = np.asarray(query_ids, np.int64) if request.exclude_queries else None
            if request.expand:
                top, _ = ranked_ids(
                    index,
                    vectors,
                    request.expand,
                    combine=request.combine,
                    exclude=exclude,
                    params=request.params,
                )
                vectors = expand_query(vectors, self.store.vectors_for(record.id, top.tolist()))
            rankings.append(
                ranked_ids(
                    index,
                    vectors,
                    depth,
                    combine=request.combine,
                    exclude=exclude,
                    params=request.params,
                )
            )
        if len(rankings) == 1:
            ids, scores = rankings[0]
        else:
            cut = min(len(r[0]) for r in rankings)
            ids, scores = rrf_fuse(np.stack([r[0][:cut] for r in rankings]), request.k)
        score: ScoreKind = "distance"
        if request.fused or (request.combine == "rrf" and n_queries > 1 and not request.expand):
            score = "rrf"
        hits = tuple(
            Hit(rank=n + 1, id=i, path=path, score=s, label=label)
            for n, (i, (path, label), s) in enumerate(
                zip(ids.tolist(), self.store.names(ids), scores.tolist(), strict=True)
            )
        )
        return SearchResult(
            hits=hits,
            descriptors=tuple(holdings.short_label(r.spec) for r in records),
            specs=tuple(r.spec for r in records),
            metrics=tuple(metrics),
            score=score,
            combine=request.combine,
            queries=n_queries,
            expand=request.expand,
            seconds=time.perf_counter() - started,
            indexes=tuple(kinds),
        )

    def query_vectors(
        self, query: Query, record: DescriptorRecord
    ) -> tuple[np.ndarray, list[int]]:
        """Vectors for the query items, and the catalogue ids of those in the collection."""
        if isinstance(query, np.ndarray):
            return self._checked(_as_vectors(query), record), []
        items = [query] if isinstance(query, str | bytes | os.PathLike) else list(query)
        if not items:
            raise InvalidRequestError("no query given")
        rows: list[np.ndarray] = []
        ids: list[int] = []
        to_describe: list[tuple[int, str | bytes]] = []  # (row, image) decoded here
        for item in items:
            if isinstance(item, np.ndarray):
                rows.extend(_as_vectors(item))
                continue
            if not isinstance(item, bytes):
                path = str(Path(item).expanduser().resolve())
                stored = self._stored(path, record)
                if stored is not None:
                    ids.append(stored[0])
                    rows.append(stored[1])
                    continue
                item = path
            to_describe.append((len(rows), item))
            rows.append(np.empty(0, np.float32))  # filled below, in one batch
        if to_describe:
            described = self._describe(to_describe, record)
            for (row, _), vector in zip(to_describe, described, strict=True):
                rows[row] = vector
        return self._checked(np.stack(rows), record), ids

    def _describe(
        self, items: list[tuple[int, str | bytes]], record: DescriptorRecord
    ) -> np.ndarray:
        """Vectors of query images (paths or encoded bytes): each decoded as indexing decodes
        it, then described in one batch; an unusable image is named in the error."""
        descriptor = holdings.instance(self.store, record)
        together = self._decoded_with(record)
        arrays = []
        for _, item in items:
            try:
                arrays.append(
                    extract_arrays(
                        item, descriptor, limits=self.settings.limits, decoded_with=together
                    )
                )
            except images.ImageError as exc:
                name = "query bytes" if isinstance(item, bytes) else str(item)
                raise images.ImageError(exc.reason, name) from None
        return np.asarray(descriptor.transform(arrays), dtype=np.float32)

    def _decoded_with(self, record: DescriptorRecord) -> list[Descriptor]:
        """The descriptors indexing decodes together with ``record``'s (its base's, for a
        derived one), so a query image is decoded as an indexed one was. One that cannot run
        here is left out: searching with another descriptor must not need its extra."""
        d = create_descriptor(record.spec)
        own = d.base.spec if holdings.derives(d) else record.spec
        together = holdings.extracted_together(self.store, runnable_only=True)
        return [create_descriptor(s) for s in together if s != own]

    def _stored(self, path: str, record: DescriptorRecord) -> tuple[int, np.ndarray] | None:
        """The id and stored vector of a query file the collection holds, unchanged on disk."""
        rec = self.store.image_by_path(path)
        if rec is None or rec.status != "ok" or not unchanged(rec):
            return None
        try:
            return rec.id, self.store.vectors_for(record.id, [rec.id])[0]
        except KeyError:
            return None

    @staticmethod
    def _checked(matrix: np.ndarray, record: DescriptorRecord) -> np.ndarray:
        if matrix.shape[1] != record.dim:
            raise InvalidRequestError(
                f"query vectors have {matrix.shape[1]} dimensions; descriptor "
                f"{holdings.short_label(record.spec)} has {record.dim}"
            )
        return matrix


def _as_vectors(array: np.ndarray) -> np.ndarray:
    """A query array as rows of vectors; an image array is refused with what to give instead."""
    if array.ndim > 2:
        raise InvalidRequestError(
            f"a query array is a vector or a matrix of vectors, got shape {array.shape}; "
            "give an image as a file path or its encoded bytes"
        )
    return np.atleast_2d(array).astype(np.float32)


def unchanged(rec: ImageRecord) -> bool:
    """Whether a catalogued file is still as it was indexed (same size and modification time)."""
    try:
        st = os.stat(rec.path)
    except OSError:
        return False
    return (st.st_size, st.st_mtime_ns) == (rec.size, rec.mtime_ns)
