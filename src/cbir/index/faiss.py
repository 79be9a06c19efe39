"""Approximate (and exact) indexes on FAISS, for every registered metric.

FAISS computes only a few metrics itself; each cbir metric declares its route onto them
(:class:`cbir.metrics.base.Route`). An index here holds the route's embedding of the vectors in
a FAISS index built from a factory string, and answers in the metric the user asked for:

- ``native`` and ``embedded`` routes rank exactly as the metric does, and the index's scores are
  turned back into the metric's distances (float32 precision);
- ``rerank`` routes, and indexes that keep only quantised codes (PQ, SQ8), fetch ``rerank``
  times ``k`` candidates and rank them again with the true metric on the full vectors. Those
  come from ``source`` (the collection's segment files, read through the store) or, for an
  index made on its own, from a copy the index keeps.

Updates: FAISS numbers rows in the order they are added; the index maps those row numbers to
cbir ids. Removing (or replacing) an image marks its row dead, and searches skip dead rows with
an ID selector inside FAISS (HNSW cannot delete, and one mechanism serves every kind). When dead
rows pass :data:`MAX_DEAD_FRACTION`, or an index trained on few vectors has grown far past them,
``stale`` says so and the index manager rebuilds it from the store.

Kinds: ``flat`` (FAISS's exact scan), ``hnsw``, ``ivf-flat``, ``ivf-pq``, ``sq8``, ``hnsw-sq``
and ``faiss`` (any factory string, e.g. ``factory="PCA64,IVF1024,PQ16"``). ``faiss`` is imported
only when one of them is made.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any, ClassVar

import numpy as np

from cbir.errors import CorruptError, InvalidRequestError, UnavailableError
from cbir.index.base import (
    MISSING,
    SearchParams,
    atomic_save,
    check_query,
    check_rows,
    positive_int,
    register_index,
)
from cbir.index.routing import (
    DEFAULT_RERANK,
    InnerProductAsL2,
    RoutedIndex,
    VectorCopy,
    VectorSource,
    rerank,
)
from cbir.metrics import Metric, get_metric
from cbir.metrics.base import Route

#: Dead (removed or replaced) rows, as a fraction of the index, past which it is rebuilt.
MAX_DEAD_FRACTION = 0.2
#: An index that learned from training vectors (IVF lists, PQ codebooks) is rebuilt when it has
#: grown to this many times the vectors it was trained on.
MAX_GROWTH = 4.0
#: FAISS's defaults are tuned for recall above 0.95 on clustered real features.
DEFAULT_M = 32
DEFAULT_EF_CONSTRUCTION = 80
DEFAULT_EF_SEARCH = 64
#: IVF lists per square root of the vectors trained on (FAISS's guideline: 4 to 16 sqrt(n)).
LISTS_PER_ROOT = 4
#: Training vectors FAISS wants per centroid (it warns below 39).
POINTS_PER_CENTROID = 39
DEFAULT_NPROBE = 16
#: A graph search that may return only some of the rows widens by the fraction it skips, up to
#: this breadth (a search of the default breadth that skips 31 rows in 32).
MAX_FILTERED_EF = 2048
#: PQ: dimensions per code byte by default, and bits per sub-quantiser code.
PQ_DIMS_PER_BYTE = 8
PQ_BITS = 8

#: The FAISS metric of each route space.
_SPACES = {"l2": "METRIC_L2", "ip": "METRIC_INNER_PRODUCT", "l1": "METRIC_L1",
           "linf": "METRIC_Linf", "canberra": "METRIC_Canberra"}  # fmt: skip
#: The spaces FAISS computes over quantised codes (PQ, SQ).
LOSSY_SPACES = ("l2", "ip")
#: Factory components that keep approximations of the vectors, not the vectors.
_LOSSY = re.compile(r"PQ|SQ|LSH|PCA|OPQ|RR|ITQ|RQ|LSQ")

_DEFAULT_PARAMS = SearchParams()


def import_faiss() -> Any:
    """The ``faiss`` module, or an error saying what to install."""
    try:
        import faiss
    except ImportError as exc:  # pragma: no cover - faiss-cpu is a core dependency
        raise UnavailableError(
            f"approximate indexes need FAISS ({exc}); install it with: pip install faiss-cpu"
        ) from None
    return faiss


@register_index
class FaissIndex(RoutedIndex):
    """A FAISS index built from a factory string over a metric's route embedding.

    ``rerank``: candidates per result re-ranked exactly (where needed); ``source``: reads the
    full vectors of ids for that re-rank (None: the index keeps a copy of them). ``label`` (the
    name of an index held in a server) and ``home`` (the folder of a collection's indexes) are
    for kinds that keep their data outside the saved file; this one needs neither.
    """

    kind: ClassVar[str] = "faiss"
    approximate: ClassVar[bool] = True
    #: Constructor parameters a kind sets itself (the named kinds make their own factory).
    fixed_parameters: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        metric: str | Metric = "euclidean",
        *,
        dim: int,
        factory: str = "Flat",
        rerank: int = DEFAULT_RERANK,
        ef_search: int = DEFAULT_EF_SEARCH,
        nprobe: int = DEFAULT_NPROBE,
        source: VectorSource | None = None,
        label: str | None = None,
        home: str | os.PathLike[str] | None = None,
    ) -> None:
        del label, home  # the index lives in this process and in its saved file
        self.metric = get_metric(metric)
        self.dim = dim
        self.factory = str(factory)
        self.rerank = positive_int("rerank", rerank)
        self.ef_search = positive_int("ef_search", ef_search)
        self.nprobe = positive_int("nprobe", nprobe)
        self.source = source
        self.lossy = bool(_LOSSY.search(self.factory))
        # FAISS's quantised codes know only L2 and inner product
        self.route: Route = self.metric.route_for(LOSSY_SPACES if self.lossy else tuple(_SPACES))
        self.nlist: int | None = None  # IVF kinds: lists (None: from the first batch)
        self.pq_bytes: int | None = None  # PQ kinds: bytes per code (None: from the width)
        self._width = 0  # columns FAISS holds: the embedding's, zero-padded for PQ
        # an inner-product route on a graph is searched as L2
        self._mips = InnerProductAsL2() if self.route.space == "ip" and "HNSW" in factory else None
        self._index: Any = None  # made at the first add (trained kinds need the vectors)
        self._layout_of: tuple[Any, tuple[str, bool, int]] | None = None
        self._params_cache: dict[tuple[str, bool, int], Any] = {}
        self._faiss_bytes: tuple[int, int] | None = None  # (rows, serialised bytes) when known
        self._trained_on = 0
        self._labels = np.empty(0, np.int64)  # FAISS row -> cbir id
        self._alive = np.empty(0, bool)
        self._count = 0  # live rows (kept, not summed per search)
        self._copy: VectorCopy | None = None  # full vectors, when no source reads them

    # -- what it holds -------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._count

    @property
    def stale(self) -> bool:
        """Whether rebuilding would serve better: many dead rows, or far outgrown training."""
        rows = len(self._alive)
        if rows and (rows - len(self)) > MAX_DEAD_FRACTION * rows:
            return True
        if self._mips is not None and self._mips.outgrown:
            return True
        return bool(self._trained_on) and len(self) > MAX_GROWTH * self._trained_on

    def memory_bytes(self) -> int:
        """Bytes held in RAM for the vectors (FAISS's structures, the id map, any copy). FAISS
        holds what it serialises; the size is that of the last save (or load), else measured."""
        rows = 0 if self._index is None else self._index.ntotal
        if self._faiss_bytes is None or self._faiss_bytes[0] != rows:
            blob = 0 if self._index is None else len(import_faiss().serialize_index(self._index))
            self._faiss_bytes = (rows, blob)
        held = self._faiss_bytes[1]
        copy = 0 if self._copy is None else self._copy.nbytes
        return held + self._labels.nbytes + self._alive.nbytes + copy

    # -- updating ------------------------------------------------------------------------------
    def _factory_for(self, expected: int, sample: int, width: int) -> tuple[str, int]:
        """The factory string for about ``expected`` rows of ``width`` columns, trained on
        ``sample`` of them, and the columns FAISS is to hold (kinds fill in sizes)."""
        return self.factory, width

    def _embedded(self, X: np.ndarray, query: bool = False) -> np.ndarray:
        """The route's rows, zero-padded to the held width (zeros change no L2, inner product,
        L1 or L-inf)."""
        return self._padded(super()._embedded(X, query))

    def _padded(self, E: np.ndarray) -> np.ndarray:
        if self._width > E.shape[1]:
            E = np.pad(E, ((0, 0), (0, self._width - E.shape[1])))
        return E

    def _new_index(self, embedded: np.ndarray, expected: int) -> Any:
        """A FAISS index for about ``expected`` rows, trained on ``embedded`` if it learns."""
        faiss = import_faiss()
        metric = getattr(faiss, _SPACES["l2" if self._mips is not None else self.route.space])
        factory, self._width = self._factory_for(expected, len(embedded), embedded.shape[1])
        try:
            index = faiss.index_factory(self._width, factory, metric)
        except RuntimeError as exc:
            raise InvalidRequestError(f"FAISS cannot build {factory!r}: {exc}") from None
        self.factory = factory  # resolved: a reload needs no first batch
        embedded = self._padded(embedded)
        hnsw = getattr(_innermost(index), "hnsw", None)
        if hnsw is not None:
            hnsw.efConstruction = DEFAULT_EF_CONSTRUCTION
        if not index.is_trained:
            index.train(embedded)
            self._trained_on = expected
        return index

    def train(self, vectors: np.ndarray, expected: int | None = None) -> None:
        """Make the FAISS index from a sample of the vectors, sized for ``expected`` of them
        (IVF lists, PQ codes); without it the first ``add`` is the sample. Kinds that learn
        nothing only take the width from it."""
        if self._index is not None:
            raise InvalidRequestError("the index is already trained")
        _, sample = check_rows(np.arange(len(vectors)), vectors, self.dim)
        self._index = self._new_index(self._embedded(sample), expected or len(sample))

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        ids, vectors = check_rows(ids, vectors, self.dim)
        if not len(ids):
            return
        self._kill(ids)  # a replaced row is dead; its new version is appended
        embedded = self._embedded(vectors)
        if self._index is None:
            self._index = self._new_index(embedded, len(embedded))
        self._index.add(self._padded(embedded))
        self._labels = np.concatenate([self._labels, ids])
        self._alive = np.concatenate([self._alive, np.ones(len(ids), bool)])
        self._count += len(ids)
        if self.needs_rerank and self.source is None:
            self._copy = self._copy or VectorCopy(self.dim)
            self._copy.add(ids, vectors)

    def remove(self, ids: np.ndarray) -> int:
        return self._kill(np.asarray(ids, dtype=np.int64).reshape(-1))

    def _kill(self, ids: np.ndarray) -> int:
        if not len(ids) or not len(self._labels):
            return 0
        hit = np.isin(self._labels, ids) & self._alive
        if hit.any():
            alive = self._alive.copy()  # a search in another thread keeps the mask it took
            alive[hit] = False
            # the count first: a search that sees it short of the mask's length filters
            self._count -= int(hit.sum())
            self._alive = alive
            if self._copy is not None:
                self._copy.remove(ids)
        return int(hit.sum())

    # -- searching -----------------------------------------------------------------------------
    def search(
        self,
        queries: np.ndarray,
        k: int,
        *,
        exclude: np.ndarray | None = None,
        params: SearchParams | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        Q = check_query(queries, k, self.dim)
        params = params or _DEFAULT_PARAMS
        k = min(k, len(self))
        m = len(Q)
        if k == 0 or self._index is None:
            return np.full((m, k), np.inf), np.full((m, k), MISSING, np.int64)
        labels, alive = self._labels, self._alive
        keep = self._kept(labels, alive, exclude)
        wanted = k * (params.rerank or self.rerank) if self.needs_rerank else k
        wanted = min(wanted, len(labels))
        embedded = self._embedded(Q, query=True)
        S, rows = self._faiss_search(embedded, wanted, keep, params)
        found = rows >= 0
        complete = bool(found.all())  # no slot left empty: the common case, fewer passes
        if complete:
            ids = labels[rows]
        else:
            ids = np.where(found, labels[np.where(found, rows, 0)], MISSING)
        if self.needs_rerank:
            return rerank(self.metric, Q, ids, k, self._full_vectors())
        # FAISS returns each row best first and the conversion keeps the order
        D = self.route.distance(S.astype(np.float64), Q)
        return (D if complete else np.where(found, D, np.inf)), ids

    def _kept(
        self, labels: np.ndarray, alive: np.ndarray, exclude: np.ndarray | None
    ) -> np.ndarray | None:
        """The rows a search may return, or None when it may return every row (no dead rows,
        nothing excluded: the common case)."""
        if exclude is not None and len(exclude):
            return alive & ~np.isin(labels, np.asarray(exclude, np.int64))
        return None if self._count == len(alive) else alive

    def _faiss_search(
        self, embedded: np.ndarray, k: int, keep: np.ndarray | None, params: SearchParams
    ) -> tuple[np.ndarray, np.ndarray]:
        faiss = import_faiss()
        family, wrapped, nlist = self._layout()
        breadth = 0  # what the family's parameters set
        if family == "hnsw":
            breadth = max(params.ef or self.ef_search * self.route.breadth, k)
        elif family == "ivf":
            breadth = min(params.nprobe or self.nprobe, nlist)
        if keep is None:
            search_params = self._search_params(family, wrapped, breadth)
            S, rows = self._index.search(embedded, k, params=search_params)
            return S, rows
        # rows skipped (dead, excluded) leave a search of the usual breadth fewer to find:
        # widen it by as much (a breadth given per query too: it is the breadth among the rows
        # the search may return)
        widen = len(keep) / max(int(np.count_nonzero(keep)), 1)
        if family == "hnsw":
            breadth = min(math.ceil(breadth * widen), max(breadth, MAX_FILTERED_EF))
        elif family == "ivf":
            breadth = min(math.ceil(breadth * widen), nlist)
        bits = np.packbits(keep, bitorder="little")  # held until the search returns
        selector = faiss.IDSelectorBitmap(len(keep), faiss.swig_ptr(bits))
        search_params = _make_search_params(faiss, family, wrapped, breadth, selector)
        S, rows = self._index.search(embedded, k, params=search_params)
        del bits
        return S, rows

    def _search_params(self, family: str, wrapped: bool, breadth: int) -> Any:
        """FAISS search parameters without a selector, made once per setting (FAISS only reads
        them, so searches in several threads share them)."""
        key = (family, wrapped, breadth)
        cached = self._params_cache.get(key)
        if cached is None:
            cached = _make_search_params(import_faiss(), family, wrapped, breadth, None)
            self._params_cache[key] = cached
        return cached

    def _layout(self) -> tuple[str, bool, int]:
        """What takes the search parameters: "hnsw", "ivf" (with its list count) or "flat",
        and whether it sits under a pre-transform (PCA, OPQ); found once per FAISS index."""
        if self._layout_of is not None and self._layout_of[0] is self._index:
            return self._layout_of[1]
        faiss = import_faiss()
        outer = faiss.downcast_index(self._index)
        wrapped = isinstance(outer, faiss.IndexPreTransform)
        inner = faiss.downcast_index(outer.index) if wrapped else outer
        if hasattr(inner, "hnsw"):
            layout = ("hnsw", wrapped, 0)
        elif hasattr(inner, "nprobe"):
            layout = ("ivf", wrapped, int(inner.nlist))
        else:
            layout = ("flat", wrapped, 0)
        self._layout_of = (self._index, layout)
        return layout

    # -- saving --------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> None:
        faiss = import_faiss()
        blob = np.empty(0, np.uint8) if self._index is None else faiss.serialize_index(self._index)
        self._faiss_bytes = (0 if self._index is None else self._index.ntotal, len(blob))
        atomic_save(
            path,
            kind=np.array(self.kind),
            metric=np.array(self.metric.name),
            dim=np.array(self.dim),
            factory=np.array(self.factory),
            settings=np.array(
                [self.rerank, self.ef_search, self.nprobe, self._trained_on, self._width]
            ),
            faiss=blob,
            mips=np.empty(0) if self._mips is None else self._mips.state(),
            labels=self._labels,
            alive=self._alive,
            **({} if self._copy is None else self._copy.arrays("copy_")),
        )

    @classmethod
    def load(
        cls, path: str | os.PathLike[str], source: VectorSource | None = None
    ) -> FaissIndex:
        faiss = import_faiss()
        try:
            with np.load(path, allow_pickle=False) as data:
                rerank, ef_search, nprobe, trained_on, width = (int(v) for v in data["settings"])
                index = cls._restored(
                    str(data["metric"]), int(data["dim"]), str(data["factory"]), rerank,
                    ef_search, nprobe, source,
                )  # fmt: skip
                blob = data["faiss"]
                index._labels = data["labels"].astype(np.int64)
                index._alive = data["alive"].astype(bool)
                index._count = int(index._alive.sum())
                index._copy = VectorCopy.from_arrays(data, "copy_", index.dim)
                if index._mips is not None:
                    radius2, outgrown = (float(v) for v in data["mips"])
                    index._mips = InnerProductAsL2(radius2, bool(outgrown))
            index._index = faiss.deserialize_index(blob) if len(blob) else None
            index._faiss_bytes = (0 if index._index is None else index._index.ntotal, len(blob))
        except (OSError, KeyError, ValueError, RuntimeError) as exc:
            raise CorruptError(
                f"{path} is not a saved FAISS index ({exc}); it will be rebuilt"
            ) from exc
        held = 0 if index._index is None else index._index.ntotal
        if not len(index._labels) == len(index._alive) == held:
            raise CorruptError(f"{path} holds {held} FAISS rows but {len(index._labels)} ids")
        if index.needs_rerank and source is None and index._copy is None:
            raise CorruptError(f"{path} keeps no vectors to re-rank with and none were given")
        index._trained_on, index._width = trained_on, width
        return index

    @classmethod
    def _restored(
        cls, metric: str, dim: int, factory: str, rerank: int, ef_search: int, nprobe: int,
        source: VectorSource | None,
    ) -> FaissIndex:  # fmt: skip
        """An index of this kind with saved settings (the kind's own arguments are in the
        resolved ``factory``)."""
        index = cls.__new__(cls)
        FaissIndex.__init__(
            index, metric, dim=dim, factory=factory, rerank=rerank, ef_search=ef_search,
            nprobe=nprobe, source=source,
        )  # fmt: skip
        return index


def _innermost(index: Any) -> Any:
    """The index under FAISS's pre-transform wrapper (PCA, OPQ), where search parameters go."""
    faiss = import_faiss()
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexPreTransform):
        return faiss.downcast_index(index.index)
    return index


def _make_search_params(
    faiss: Any, family: str, wrapped: bool, breadth: int, selector: Any
) -> Any:
    """FAISS's search parameters for an index family: efSearch (HNSW) or nprobe (IVF) set to
    ``breadth``, rows filtered by ``selector``; None when there is nothing to set."""
    kwargs = {} if selector is None else {"sel": selector}
    if family == "hnsw":
        made = faiss.SearchParametersHNSW(efSearch=breadth, **kwargs)
    elif family == "ivf":
        made = faiss.SearchParametersIVF(nprobe=breadth, **kwargs)
    else:
        made = faiss.SearchParameters(**kwargs) if kwargs else None
    if wrapped and made is not None:
        made = faiss.SearchParametersPreTransform(index_params=made)
    return made


def _lists_for(expected: int, sample: int) -> int:
    """IVF lists for about ``expected`` vectors: ~4 sqrt(n), and no fewer training vectors per
    list than k-means needs."""
    return max(1, min(round(LISTS_PER_ROOT * math.sqrt(expected)), sample // POINTS_PER_CENTROID))


@register_index
class FlatIndex(FaissIndex):
    """FAISS's exact scan over the route embedding (exact routes only; no training)."""

    kind: ClassVar[str] = "flat"
    fixed_parameters: ClassVar[tuple[str, ...]] = ("factory",)

    def __init__(self, metric: str | Metric = "euclidean", *, dim: int, **params: Any) -> None:
        super().__init__(metric, dim=dim, factory="Flat", **params)


@register_index
class HNSWIndex(FaissIndex):
    """HNSW graph (Malkov & Yashunin): the fastest search at high recall; ``M`` links per node,
    ``ef_search`` (per query: ``ef``) the breadth of the search."""

    kind: ClassVar[str] = "hnsw"
    fixed_parameters: ClassVar[tuple[str, ...]] = ("factory",)

    def __init__(
        self, metric: str | Metric = "euclidean", *, dim: int, M: int = DEFAULT_M, **params: Any
    ) -> None:
        super().__init__(metric, dim=dim, factory=f"HNSW{positive_int('M', M)}", **params)


@register_index
class HNSWSQIndex(FaissIndex):
    """HNSW over 8-bit scalar-quantised vectors: a quarter of the memory, re-ranked exactly."""

    kind: ClassVar[str] = "hnsw-sq"
    fixed_parameters: ClassVar[tuple[str, ...]] = ("factory",)

    def __init__(
        self, metric: str | Metric = "euclidean", *, dim: int, M: int = DEFAULT_M, **params: Any
    ) -> None:
        super().__init__(metric, dim=dim, factory=f"HNSW{positive_int('M', M)}_SQ8", **params)


@register_index
class SQ8Index(FaissIndex):
    """A scan over 8-bit scalar-quantised vectors, re-ranked exactly."""

    kind: ClassVar[str] = "sq8"
    fixed_parameters: ClassVar[tuple[str, ...]] = ("factory",)

    def __init__(self, metric: str | Metric = "euclidean", *, dim: int, **params: Any) -> None:
        super().__init__(metric, dim=dim, factory="SQ8", **params)


@register_index
class IVFFlatIndex(FaissIndex):
    """Inverted lists over k-means cells (``nlist``, default from the first batch), ``nprobe``
    cells searched per query."""

    kind: ClassVar[str] = "ivf-flat"
    fixed_parameters: ClassVar[tuple[str, ...]] = ("factory",)

    def __init__(
        self,
        metric: str | Metric = "euclidean",
        *,
        dim: int,
        nlist: int | None = None,
        **params: Any,
    ) -> None:
        super().__init__(metric, dim=dim, factory="IVF{nlist},Flat", **params)
        self.nlist = None if nlist is None else positive_int("nlist", nlist)

    def _factory_for(self, expected: int, sample: int, width: int) -> tuple[str, int]:
        return self.factory.format(nlist=self.nlist or _lists_for(expected, sample)), width


@register_index
class IVFPQIndex(FaissIndex):
    """Inverted lists of product-quantised codes (``pq_bytes`` per vector, default an eighth
    of the width), re-ranked exactly on the full vectors: the least memory per image."""

    kind: ClassVar[str] = "ivf-pq"
    fixed_parameters: ClassVar[tuple[str, ...]] = ("factory",)

    def __init__(
        self,
        metric: str | Metric = "euclidean",
        *,
        dim: int,
        nlist: int | None = None,
        pq_bytes: int | None = None,
        **params: Any,
    ) -> None:
        super().__init__(metric, dim=dim, factory="IVF{nlist},PQ{m}x{bits}", **params)
        self.nlist = None if nlist is None else positive_int("nlist", nlist)
        self.pq_bytes = None if pq_bytes is None else positive_int("pq_bytes", pq_bytes)

    def _factory_for(self, expected: int, sample: int, width: int) -> tuple[str, int]:
        m = min(self.pq_bytes or -(-width // PQ_DIMS_PER_BYTE), width)
        # a code's sub-vectors split the width evenly: pad it with zeros to a multiple of m
        # centroids per sub-quantiser: 2^bits, with enough training vectors for each
        bits = max(1, min(PQ_BITS, int(math.log2(max(sample // POINTS_PER_CENTROID, 2)))))
        return (
            self.factory.format(nlist=self.nlist or _lists_for(expected, sample), m=m, bits=bits),
            -(-width // m) * m,
        )
