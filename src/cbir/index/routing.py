"""What every engine-backed index kind (FAISS, Milvus) does around its engine, in one place.

An engine computes a few metrics (:data:`cbir.metrics.base.SPACES`) over the route embedding of
the vectors; cbir answers in the metric the user asked for. Three pieces sit between the two:

- :class:`InnerProductAsL2`: an inner-product route searched as L2 (graphs link true
  neighbours under L2, not under an asymmetric inner product);
- :func:`rerank`: candidates ranked again by the true metric on the full vectors (candidate
  routes, quantised codes), block by block over the queries;
- :class:`VectorCopy`: the full vectors an index keeps for that re-rank when nothing else can
  read them (an index made on its own, outside a collection).

:class:`RoutedIndex` puts them together for a kind: the FAISS and Milvus kinds derive from it.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from numpy.lib.npyio import NpzFile

from cbir.index.base import MISSING
from cbir.metrics import Metric
from cbir.metrics.base import Route

#: Candidates per wanted result ranked again by the true metric (rerank routes, lossy codes).
DEFAULT_RERANK = 10
#: Queries re-ranked together (bounds the candidate distance matrix).
RERANK_QUERY_BLOCK = 64
#: The first batch's largest squared norm times this is the radius of the inner-product-as-L2
#: embedding (room for rows added later).
MIPS_HEADROOM = 1.5

#: Reads the full vectors of sorted, unique ids, one row per id.
VectorSource = Callable[[np.ndarray], np.ndarray]


def ranked(D: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows sorted by (distance, id), cut to ``k``, empty slots as (inf, MISSING)."""
    ids = np.where(np.isfinite(D), ids, MISSING)
    D = np.where(ids == MISSING, np.inf, D)
    order = np.lexsort((ids, D), axis=-1)[:, :k]
    return np.take_along_axis(D, order, axis=1), np.take_along_axis(ids, order, axis=1)


def rerank(
    metric: Metric, Q: np.ndarray, ids: np.ndarray, k: int, vectors: VectorSource
) -> tuple[np.ndarray, np.ndarray]:
    """The candidates ``ids`` (a row per query, MISSING for none) ranked by ``metric`` on the
    full vectors; the best ``k`` of each row kept. Each candidate is read once, however many
    queries share it."""
    D = np.full(ids.shape, np.inf)
    wanted = np.unique(ids[ids != MISSING])
    if len(wanted):
        PV = metric.prepare(np.asarray(vectors(wanted)))
        for lo in range(0, len(Q), RERANK_QUERY_BLOCK):
            block = slice(lo, lo + RERANK_QUERY_BLOCK)
            cand = ids[block]
            cols = np.searchsorted(wanted, np.where(cand == MISSING, wanted[0], cand))
            full = metric.compare(metric.prepare(Q[block]), PV)
            D[block] = np.where(cand == MISSING, np.inf, np.take_along_axis(full, cols, axis=1))
    return ranked(D, ids, k)


class InnerProductAsL2:
    """Inner-product rows as rows whose L2 distance ranks the same (Bachrach et al. 2014,
    "Speeding up the Xbox recommender system"): a database row gets one more coordinate,
    ``sqrt(R^2 - ||x||^2)``, a query a 0, so ``||q - x||^2 = ||q||^2 + R^2 - 2 q.x``.

    A graph built on inner products links rows that are not neighbours (kl's ``ln q`` rows); one
    built on these L2 distances does. ``R^2`` is fixed by the first batch with headroom; a row
    past it sets ``outgrown`` (its distances would be wrong), and the index is then rebuilt.
    The scores lose float32 digits to the radius, so the kinds re-rank what this finds.
    """

    def __init__(self, radius2: float = 0.0, outgrown: bool = False) -> None:
        self.radius2 = radius2
        self.outgrown = outgrown

    def rows(self, E: np.ndarray) -> np.ndarray:
        """Database rows, one coordinate longer."""
        norms = np.einsum("ij,ij->i", E, E, dtype=np.float64)
        if not self.radius2:
            self.radius2 = float(norms.max(initial=0.0)) * MIPS_HEADROOM or 1.0
        self.outgrown |= bool(norms.max(initial=0.0) > self.radius2)
        extra = np.sqrt(np.maximum(self.radius2 - norms, 0.0)).astype(E.dtype)
        return np.hstack([E, extra[:, None]])

    @staticmethod
    def queries(E: np.ndarray) -> np.ndarray:
        """Query rows, with a zero in the extra coordinate."""
        return np.hstack([E, np.zeros((len(E), 1), E.dtype)])

    def state(self) -> np.ndarray:
        """What a saved index keeps of it (``InnerProductAsL2(*state)`` restores it)."""
        return np.array([self.radius2, float(self.outgrown)])


class VectorCopy:
    """Full vectors by id, kept by an index that has no source to read them from.

    A replaced or removed id's row is marked dead, not moved; the index that owns the copy is
    rebuilt when its dead rows pile up, and the copy with it.
    """

    def __init__(self, dim: int) -> None:
        self._ids = np.empty(0, np.int64)
        self._alive = np.empty(0, bool)
        self._rows = np.empty((0, dim), np.float32)

    @property
    def nbytes(self) -> int:
        return self._ids.nbytes + self._alive.nbytes + self._rows.nbytes

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        self.remove(ids)
        self._ids = np.concatenate([self._ids, ids])
        self._alive = np.concatenate([self._alive, np.ones(len(ids), bool)])
        self._rows = np.concatenate([self._rows, np.asarray(vectors, np.float32)])

    def remove(self, ids: np.ndarray) -> None:
        hit = np.isin(self._ids, ids) & self._alive
        if hit.any():
            alive = self._alive.copy()  # a reader in another thread keeps the mask it took
            alive[hit] = False
            self._alive = alive

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        """The rows of sorted, unique ``ids`` (all held)."""
        rows = np.flatnonzero(np.isin(self._ids, ids) & self._alive)
        return self._rows[rows[np.argsort(self._ids[rows])]]

    def arrays(self, prefix: str) -> dict[str, np.ndarray]:
        """Its arrays for ``np.savez``, named with ``prefix``."""
        return {
            f"{prefix}ids": self._ids,
            f"{prefix}alive": self._alive,
            f"{prefix}rows": self._rows,
        }

    @classmethod
    def from_arrays(cls, data: NpzFile, prefix: str, dim: int) -> VectorCopy | None:
        """The copy saved by :meth:`arrays` in an open ``np.load`` file, or None if none was."""
        if f"{prefix}rows" not in data.files:
            return None
        copy = cls(dim)
        copy._ids = data[f"{prefix}ids"].astype(np.int64)
        copy._alive = data[f"{prefix}alive"].astype(bool)
        copy._rows = data[f"{prefix}rows"].astype(np.float32)
        if not len(copy._ids) == len(copy._alive) == len(copy._rows):
            raise ValueError("the saved vector copy's arrays differ in length")
        return copy


class RoutedIndex:
    """What an engine-backed kind does around its engine: rows embedded by the metric's route
    (inner products on a graph searched as L2), and the full vectors a re-rank reads. A kind
    sets these attributes in its constructor."""

    metric: Metric
    route: Route
    dim: int
    #: the engine keeps approximations of the vectors (quantised codes)
    lossy: bool
    #: reads the full vectors of ids (None: the index keeps a :class:`VectorCopy`)
    source: VectorSource | None
    _mips: InnerProductAsL2 | None
    _copy: VectorCopy | None

    @property
    def needs_rerank(self) -> bool:
        """Whether results are ranked again by the true metric on the full vectors: for
        candidate routes, quantised codes, and inner products searched as L2 (whose scores
        lose float32 digits to the radius)."""
        return not self.route.exact or self.lossy or self._mips is not None

    def _embedded(self, X: np.ndarray, query: bool = False) -> np.ndarray:
        """Rows embedded by the route, float32 (one coordinate more for an inner product
        searched as L2)."""
        E = self.route.queries(X) if query else self.route.embed(X)
        E = np.ascontiguousarray(E, dtype=np.float32)
        if self._mips is not None:
            E = self._mips.queries(E) if query else self._mips.rows(E)
        return E

    def _full_vectors(self) -> VectorSource:
        if self.source is not None:
            return self.source
        if self._copy is None:  # nothing added yet: no candidate is ever read
            self._copy = VectorCopy(self.dim)
        return self._copy
