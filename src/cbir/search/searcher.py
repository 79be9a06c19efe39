"""The searcher: from what a user asks (query images or vectors, and a :class:`SearchRequest`)
to a :class:`SearchResult`, through the collection's indexes. One path for every face.

Query images already in the collection and unchanged on disk use their stored vectors; others
are decoded and described in this process with the collection's fitted descriptors. A query item
may also be the catalogue id of an image (its stored vector) or a :class:`Region` of an image
(that part of it, described here). Relevance feedback moves the query vectors before ranking
(``cbir.search.feedback``); a label or folder filter leaves every other image out, and one
that keeps at most half of them is searched exactly (an approximate index searched from the
query's part of the space finds too few of the images kept when they lie elsewhere).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cbir import holdings, images
from cbir.config import Settings
from cbir.errors import InvalidRequestError, NotFoundError
from cbir.extraction import extract_arrays
from cbir.features import Descriptor, create_descriptor
from cbir.index.manager import IndexManager
from cbir.search.combine import RRF_DEPTH, expand_query, ranked_ids, rrf_fuse
from cbir.search.feedback import Feedback, rocchio
from cbir.search.region import Region
from cbir.search.request import SearchRequest
from cbir.search.result import Hit, ScoreKind, SearchResult
from cbir.store import DescriptorRecord, ImageRecord, Store

#: A label or folder filter that keeps at most this fraction of the images is searched exactly.
SELECTIVE_FRACTION = 0.5

#: One query item: an image file, its encoded bytes, vector(s), the id of a catalogued image,
#: or a region of one of these images.
QueryLike = str | os.PathLike[str] | bytes | np.ndarray | int | Region
Query = QueryLike | Sequence[QueryLike]


class Searcher:
    """Searches one collection's store through its index manager."""

    def __init__(self, store: Store, settings: Settings, indexes: IndexManager) -> None:
        self.store = store
        self.settings = settings
        self.indexes = indexes
        #: descriptor id -> (state stamp, ready descriptor): models and fitted state loaded once
        self._instances: dict[int, tuple[int | None, Descriptor]] = {}
        #: each thread's last filter (change tokens are per thread's connection)
        self._filters = threading.local()

    def instance(self, record: DescriptorRecord) -> Descriptor:
        """The ready descriptor of a record, loaded once and again only after a refit."""
        stamp = self.store.state_stamp(record.id)
        held = self._instances.get(record.id)
        if held is None or held[0] != stamp or held[1].spec != record.spec:
            held = (stamp, holdings.instance(self.store, record))
            self._instances[record.id] = held
        return held[1]

    def search(self, query: Query, request: SearchRequest) -> SearchResult:
        """Rank the collection for ``query`` as ``request`` says, on one reading of what other
        processes have committed (``Store.pinned``)."""
        started = time.perf_counter()
        with self.store.pinned():
            return self._search(query, request, started)

    def _search(self, query: Query, request: SearchRequest, started: float) -> SearchResult:
        records = [holdings.find(self.store, spec) for spec in request.descriptors]
        metrics = [
            holdings.check_metric(r, m) for r, m in zip(records, request.metrics, strict=True)
        ]
        depth = max(request.depth, RRF_DEPTH) if request.fused else request.depth
        chosen = self._filter(request)
        left_out = None if chosen is None else chosen.left_out
        # a filter that keeps few images (a label among many) is answered by exact search: a
        # graph or lists searched from the query's part of the space find too few of them, or
        # not the nearest, when the images kept lie elsewhere
        exact = request.exact or (chosen is not None and chosen.selective)
        rankings, kinds, n_queries = [], [], 0
        for record, metric in zip(records, metrics, strict=True):
            index = self.indexes.index(record, metric, exact=exact)
            if not len(index):
                raise NotFoundError(
                    f"the collection at {self.store.root} holds no images with "
                    f"{holdings.short_label(record.spec)} vectors yet: add some with "
                    "`cbir index DIR`"
                )
            vectors, query_ids = self.query_vectors(query, record)
            n_queries = len(vectors)
            if request.feedback:
                vectors = self._moved(vectors, record, request.feedback)
            kinds.append(index.kind)
            exclude = np.asarray(query_ids, np.int64) if request.exclude_queries else None
            if left_out is not None:
                exclude = left_out if exclude is None else np.union1d(exclude, left_out)
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
            ids, scores = rrf_fuse(np.stack([r[0][:cut] for r in rankings]), request.depth)
        ids, scores = ids[request.offset :], scores[request.offset :]
        score: ScoreKind = "distance"
        if request.fused or (request.combine == "rrf" and n_queries > 1 and not request.expand):
            score = "rrf"
        id_list = ids.tolist()
        hits = tuple(
            Hit(rank, i, path, s, label)
            for rank, i, (path, label), s in zip(
                range(request.offset + 1, request.offset + 1 + len(id_list)),
                id_list,
                self.store.names(id_list),
                scores.tolist(),
                strict=True,
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
            offset=request.offset,
            feedback=(len(request.feedback.like), len(request.feedback.unlike))
            if request.feedback
            else (0, 0),
        )

    def _moved(self, vectors: np.ndarray, record: DescriptorRecord, fb: Feedback) -> np.ndarray:
        """The query vectors after one round of relevance feedback."""
        return rocchio(
            vectors,
            self.stored_vectors(record, fb.like),
            self.stored_vectors(record, fb.unlike),
            fb,
        )

    def stored_vectors(self, record: DescriptorRecord, ids: Sequence[int]) -> np.ndarray:
        """Stored vectors of catalogued images (a NotFoundError names an id without one)."""
        if not ids:
            return np.empty((0, record.dim), np.float32)
        try:
            return self.store.vectors_for(record.id, list(ids))
        except KeyError as exc:  # the store names the first id it lacks
            raise NotFoundError(
                f"no image with id {exc.args[0]} has vectors of "
                f"{holdings.short_label(record.spec)} in the collection"
            ) from None

    def _filter(self, request: SearchRequest) -> Filtered | None:
        """What the request's label or folder filter keeps and leaves out (None: no filter)."""
        if not request.filtered:
            return None
        return self.filtered(label=request.label, folder=request.folder)

    def filtered(self, *, label: str | None = None, folder: str | None = None) -> Filtered:
        """The indexed images a label and folder filter keep and leave out (None: no filter of
        that kind), decided once per filter and state of the catalogue: paging through a
        filtered search or listing reads the catalogue once, not at every page."""
        token, key = self.store.change_token(), (label, folder)
        held: Filtered | None = getattr(self._filters, "held", None)
        if held is None or held.token != token or held.key != key:
            ids, paths, labels = self.store.named_images()
            if label is None and folder is None:  # a listing of everything: nothing to test
                keep = np.ones(len(ids), bool)
            else:
                passes = name_filter(label=label, folder=folder)
                keep = np.fromiter(map(passes, paths, labels), bool, len(ids))
            held = Filtered(token, key, ids[keep], ids[~keep])
            self._filters.held = held
        return held

    def query_vectors(self, query: Query, record: DescriptorRecord) -> tuple[np.ndarray, list[int]]:
        """Vectors for the query items, and the catalogue ids of those in the collection."""
        if isinstance(query, np.ndarray):
            return self._checked(_as_vectors(query), record), []
        single = str | bytes | os.PathLike | int | np.integer | Region
        items = [query] if isinstance(query, single) else list(query)
        if not items:
            raise InvalidRequestError("no query given")
        rows: list[np.ndarray] = []
        ids: list[int] = []
        to_describe: list[tuple[int, str | bytes | Region]] = []  # (row, image) decoded here
        for item in items:
            if isinstance(item, np.ndarray):
                rows.extend(_as_vectors(item))
                continue
            if isinstance(item, Region):
                to_describe.append((len(rows), item))
                rows.append(np.empty(0, np.float32))
                continue
            if isinstance(item, int | np.integer) and not isinstance(item, bool):
                ids.append(int(item))
                rows.append(self.stored_vectors(record, [int(item)])[0])
                continue
            if not isinstance(item, str | bytes | os.PathLike):
                raise InvalidRequestError(
                    "a query item is an image file, its bytes, a vector, an image id or a "
                    f"Region, got {type(item).__name__}"
                )
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

    def catalogued(self, image_id: int) -> ImageRecord:
        """The catalogue row of an indexed image, or a NotFoundError naming the id."""
        try:
            (rec,) = self.store.records([image_id])
        except KeyError:
            rec = None
        if rec is None or rec.status != "ok":
            raise NotFoundError(f"no image with id {image_id} in the collection")
        return rec

    def _describe(
        self, items: list[tuple[int, str | bytes | Region]], record: DescriptorRecord
    ) -> np.ndarray:
        """Vectors of query images (paths or encoded bytes): each decoded as indexing decodes
        it, then described in one batch; an unusable image is named in the error."""
        descriptor = self.instance(record)
        together = self._decoded_with(record)
        arrays = []
        for _, item in items:
            source, box = (item.source, item.box) if isinstance(item, Region) else (item, None)
            if isinstance(source, int | np.integer):
                source = self.catalogued(int(source)).path
            try:
                arrays.append(
                    extract_arrays(
                        source,
                        descriptor,
                        limits=self.settings.limits,
                        decoded_with=together,
                        box=box,
                    )
                )
            except images.ImageError as exc:
                name = "query bytes" if isinstance(source, bytes) else str(source)
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
    return np.atleast_2d(array).astype(np.float32, copy=False)


@dataclass(frozen=True)
class Filtered:
    """What a label and folder filter decided, and for which catalogue state and filter."""

    token: tuple[int, int, int]
    key: tuple[str | None, str | None]
    #: ids of the indexed images it keeps and leaves out, ascending
    kept: np.ndarray
    left_out: np.ndarray

    @property
    def selective(self) -> bool:
        """Whether it keeps at most :data:`SELECTIVE_FRACTION` of the images."""
        return len(self.kept) <= SELECTIVE_FRACTION * (len(self.kept) + len(self.left_out))


def name_filter(
    *, label: str | None = None, folder: str | None = None
) -> Callable[[str, str | None], bool]:
    """The test of an indexed image's path and label under a label filter and a folder filter:
    ``folder`` is the name of the folder holding it, or the end of that folder's path
    (``cats/2024``); None filters nothing. The filter is parsed once, as the test runs over every
    image of a collection when a filter is new. Catalogued paths are absolute and normalised,
    so the folder test is one comparison of strings: the path's folder ends with ``/`` and the
    filter's parts."""
    want = None if folder is None else "/" + "/".join(Path(folder.strip("/")).parts)

    def passes(path: str, image_label: str | None) -> bool:
        if label is not None and image_label != label:
            return False
        if want is not None:
            return want != "/" and path[: path.rfind("/")].endswith(want)
        return True

    return passes


def unchanged(rec: ImageRecord) -> bool:
    """Whether a catalogued file is still as it was indexed (same size and modification time)."""
    try:
        st = os.stat(rec.path)
    except OSError:
        return False
    return (st.st_size, st.st_mtime_ns) == (rec.size, rec.mtime_ns)
