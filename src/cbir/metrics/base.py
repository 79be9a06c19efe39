"""The metric interface and its name table, in the spirit of ``sklearn.metrics.pairwise``.

A metric is split in two vectorised halves so search can pay the per-vector work once:
``prepare(X)`` turns an ``(n, d)`` matrix into a row-aligned "prepared" form (an array or a
tuple of arrays whose first axis has ``n`` rows), and ``compare(Pq, Pc)`` turns a prepared query
block and a prepared ``(n, d)`` collection block into an ``(m, n)`` float distance matrix.
Search prepares the collection once, slices the prepared rows into blocks and keeps memory bounded.

A vector index (FAISS, Milvus) knows only a few metrics of its own. Each metric therefore declares
its :class:`Route` onto one: ``native`` (the index computes it), ``embedded`` (an exact embedding
turns it into one the index computes, e.g. the square root of a histogram for Hellinger), or
``rerank`` (an embedding that only finds candidates, which are then ranked by the true metric).
The exact search needs no route; every approximate index reads it from here.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import pkgutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

Prepared = Any  # np.ndarray or tuple[np.ndarray, ...], first axis = rows

#: The metrics a vector index computes itself over embedded rows: squared L2 (as FAISS and
#: Milvus report it), inner product (larger is closer), L1, L-infinity and Canberra (FAISS's).
SPACES = ("l2", "ip", "l1", "linf", "canberra")
RouteKind = Literal["native", "embedded", "rerank"]


def _as_float64(X: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(X, dtype=np.float64)


@dataclass(frozen=True)
class Route:
    """How a metric is searched by an index that computes only the metrics in :data:`SPACES`.

    ``embed`` maps database rows (and ``embed_query`` query rows, when the embedding is
    asymmetric) to float64 rows the index compares in ``space``. ``distance`` turns the index's
    scores for a query block back into the metric's distances (given the raw queries); a route
    without one (``rerank``) only finds candidates, which the index ranks again with the true
    metric. ``fallback`` names the metric whose route finds candidates in an index that lacks
    ``space`` (Milvus has no L1). ``breadth``: how many times its default search breadth a
    graph index (HNSW's ef) takes for this route, where the embedding is one a graph navigates
    poorly; a breadth given per query is taken as it is.
    """

    kind: RouteKind
    space: str
    embed: Callable[[np.ndarray], np.ndarray] = _as_float64
    embed_query: Callable[[np.ndarray], np.ndarray] | None = None
    distance: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None
    fallback: str = "euclidean"
    breadth: int = 1

    def __post_init__(self) -> None:
        if self.space not in SPACES:
            raise ValueError(f"route space must be one of {', '.join(SPACES)}, got {self.space!r}")
        if (self.distance is None) != (self.kind == "rerank"):
            raise ValueError("a rerank route has no distance; native and embedded ones have one")

    @property
    def exact(self) -> bool:
        """The index's ranking of the embedded rows is the metric's ranking."""
        return self.distance is not None

    def queries(self, X: np.ndarray) -> np.ndarray:
        """Query rows embedded for the index."""
        return (self.embed_query or self.embed)(X)


#: A metric that declares no route (a plug-in) finds candidates by L2 on its raw rows, and the
#: candidates are ranked by the metric itself.
RERANK_BY_L2 = Route("rerank", "l2")


@dataclass(frozen=True)
class Metric:
    """A distance (smaller is closer) between rows of two matrices."""

    name: str
    summary: str
    formula: str
    prepare: Callable[[np.ndarray], Prepared]
    compare: Callable[[Prepared, Prepared], np.ndarray]
    symmetric: bool = True
    #: Needs non-negative input (histograms); ``prepare`` raises ValueError otherwise.
    nonnegative: bool = False
    #: Needs 0/1 input (hash bits); ``prepare`` raises ValueError otherwise.
    binary: bool = False
    aliases: tuple[str, ...] = field(default_factory=tuple)
    #: How an approximate index searches it (see :class:`Route`).
    route: Route = RERANK_BY_L2

    def route_for(self, spaces: tuple[str, ...]) -> Route:
        """The route onto an index that computes only ``spaces``: the metric's own, or one
        that finds candidates through its ``fallback`` metric's embedding, for a re-rank."""
        if self.route.space in spaces:
            return self.route
        other = get_metric(self.route.fallback).route
        if other.space not in spaces:
            raise ValueError(
                f"metric {self.name!r} has no route onto an index of {', '.join(spaces)}"
            )
        return Route("rerank", other.space, other.embed, embed_query=other.embed_query)

    def pairwise(self, X: np.ndarray, Y: np.ndarray | None = None) -> np.ndarray:
        """``(m, d) x (n, d) -> (m, n)`` distances; ``Y=None`` compares ``X`` with itself."""
        X = as_matrix(X)
        PX = self.prepare(X)
        PY = PX if Y is None else self.prepare(as_matrix(Y, X.shape[1]))
        return self.compare(PX, PY)

    __call__ = pairwise


def as_matrix(X: Any, dim: int | None = None) -> np.ndarray:
    """A 2-D float32/float64 C-contiguous array (1-D input is one row); checks the dimension."""
    A = np.asarray(X)
    if A.ndim == 1:
        A = A[None, :]
    if A.ndim != 2:
        raise ValueError(
            f"expected a vector or a matrix of vectors, got an array of shape {A.shape}"
        )
    if A.dtype != np.float32:
        A = A.astype(np.float64)
    if dim is not None and A.shape[1] != dim:
        raise ValueError(f"vectors have {A.shape[1]} dimensions, expected {dim}")
    if not np.isfinite(A).all():
        raise ValueError("vectors contain NaN or infinite values")
    return np.ascontiguousarray(A)


def take_rows(prepared: Prepared, rows: slice | np.ndarray) -> Prepared:
    """Select rows of a prepared matrix (an array or a tuple of row-aligned arrays)."""
    if isinstance(prepared, tuple):
        return tuple(p[rows] for p in prepared)
    return prepared[rows]


_METRICS: dict[str, Metric] = {}
_ALIASES: dict[str, str] = {}


def register_metric(metric: Metric) -> Metric:
    """Make ``metric`` available by its name and aliases."""
    if metric.name in _METRICS:
        raise ValueError(f"metric name {metric.name!r} is already registered")
    _METRICS[metric.name] = metric
    for alias in metric.aliases:
        _ALIASES[alias] = metric.name
    return metric


_loaded = False


def _ensure_builtins() -> None:
    """Import every metric module of this package, then plug-ins declared under the
    ``cbir.metrics`` entry point group: a new metric is one ``register_metric`` call."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    import cbir.metrics as package

    for module in pkgutil.iter_modules(package.__path__):
        if module.name != "base" and not module.name.startswith("_"):
            importlib.import_module(f"cbir.metrics.{module.name}")
    for entry in importlib.metadata.entry_points(group="cbir.metrics"):
        try:
            entry.load()
        except Exception as exc:  # a broken plug-in must not take the built-ins down
            warnings.warn(f"cbir plug-in {entry.name!r} failed to load: {exc}", stacklevel=2)


def metric_names() -> list[str]:
    """Registered metric names, sorted."""
    _ensure_builtins()
    return sorted(_METRICS)


def get_metric(name: str | Metric) -> Metric:
    """The metric registered under ``name`` (or an alias), or a clear error listing them all."""
    if isinstance(name, Metric):
        return name
    _ensure_builtins()
    key = _ALIASES.get(name, name)
    if key not in _METRICS:
        raise ValueError(
            f"unknown metric {name!r}; registered metrics: {', '.join(sorted(_METRICS))}"
        )
    return _METRICS[key]


def describe_metrics() -> list[dict[str, Any]]:
    """Name, aliases, one-line summary, formula and properties of each metric."""
    return [
        {
            "name": m.name,
            "aliases": list(m.aliases),
            "description": m.summary,
            "formula": m.formula,
            "symmetric": m.symmetric,
            "needs_nonnegative": m.nonnegative,
            "needs_binary": m.binary,
            "route": m.route.kind,
            "index_space": m.route.space,
        }
        for m in (get_metric(n) for n in metric_names())
    ]


def pairwise_distances(
    X: np.ndarray, Y: np.ndarray | None = None, metric: str = "euclidean"
) -> np.ndarray:
    """Distances between the rows of ``X`` and ``Y`` under a registered metric."""
    return get_metric(metric).pairwise(X, Y)
