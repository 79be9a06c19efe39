"""From query vectors to one ranked list: single queries, and sets of queries combined.

A set of query images is combined in one of three ways, because users mean different things by
"more like these":

- ``mean``: average the query descriptors and search once (the centroid of the set; best when
  the queries show one thing).
- ``min``: a collection image's distance is its distance to the *closest* query ("like any of
  these"; keeps several distinct looks). Each query's own top k is searched and the lists are
  merged: exact, since an image in the min-top-k is always in its nearest query's top k.
- ``rrf``: reciprocal rank fusion of the queries' own rankings, score = sum 1 / (60 + rank)
  over each query's top ``depth`` (Cormack et al., 2009); robust when the distances of different
  queries are not comparable.

The same fusion merges the rankings of several descriptors (late fusion): their distances are
not comparable at all, their ranks are.

Average query expansion (``expand=K``, Chum et al., 2007) searches again with the query averaged
with its own top K results: the neighbours that agree with it pull the query toward the rest of
its kind. It costs a second search and lifts MAP where relevant images form clusters
(docs/deep.md).

Everything here works on any index kind through ``search(Q, k, exclude=...)``.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from cbir.errors import InvalidRequestError
from cbir.index.base import MISSING, SearchParams

COMBINE_MODES = ("mean", "min", "rrf")
RRF_K = 60
#: How deep each ranking goes before reciprocal rank fusion (deeper ranks add < 1/1060 each).
RRF_DEPTH = 1000


class Searchable(Protocol):
    """What ranking needs of an index: the search of ``cbir.index.VectorIndex``."""

    def search(
        self,
        queries: np.ndarray,
        k: int,
        *,
        exclude: np.ndarray | None = None,
        params: SearchParams | None = None,
    ) -> tuple[np.ndarray, np.ndarray]: ...


def ranked_ids(
    index: Searchable,
    queries: np.ndarray,
    k: int,
    *,
    combine: str = "mean",
    exclude: np.ndarray | None = None,
    rrf_depth: int = RRF_DEPTH,
    params: SearchParams | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One ranked list ``(ids, scores)`` for a query set (scores: distances, or RRF scores)."""
    if combine not in COMBINE_MODES:
        raise InvalidRequestError(
            f"combine must be one of {', '.join(COMBINE_MODES)}, got {combine!r}"
        )
    queries = np.atleast_2d(np.asarray(queries))
    if len(queries) == 0:
        raise InvalidRequestError("no query vectors")
    if combine == "mean" or len(queries) == 1:
        center = queries if len(queries) == 1 else queries.mean(axis=0, keepdims=True, dtype=float)
        d, i = index.search(center, k, exclude=exclude, params=params)
        found = i[0] != MISSING
        if found.all():  # the common case: no copies to make
            return i[0], d[0]
        return i[0][found], d[0][found]
    if combine == "min":
        return merge_min(*index.search(queries, k, exclude=exclude, params=params), k)
    _, i = index.search(queries, max(k, rrf_depth), exclude=exclude, params=params)
    return rrf_fuse(i, k)


def merge_min(distances: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-query top-k lists into one: each id scored by its smallest distance to any
    query, the best ``k`` kept (ties by id)."""
    found = ids.ravel() != MISSING
    d, i = distances.ravel()[found], ids.ravel()[found]
    order = np.lexsort((i, d))  # the first occurrence of an id is its smallest distance
    d, i = d[order], i[order]
    _, first = np.unique(i, return_index=True)
    first.sort()
    return i[first][:k], d[first][:k]


def rrf_fuse(rankings: np.ndarray, k: int, *, rrf_k: int = RRF_K) -> tuple[np.ndarray, np.ndarray]:
    """Fuse ``(m, depth)`` id rankings by reciprocal rank: best ``k`` ids and their scores.
    ``MISSING`` slots (a ranking shorter than the others) count for nothing."""
    rankings = np.asarray(rankings, dtype=np.int64)
    ranks = np.broadcast_to(np.arange(1, rankings.shape[1] + 1), rankings.shape)
    found = rankings.ravel() != MISSING
    ids, inverse = np.unique(rankings.ravel()[found], return_inverse=True)
    weights = 1.0 / (rrf_k + ranks.ravel()[found])
    scores = np.bincount(inverse, weights=weights, minlength=len(ids))
    order = np.lexsort((ids, -scores))[:k]
    return ids[order], scores[order]


def expand_query(queries: np.ndarray, neighbours: np.ndarray) -> np.ndarray:
    """Average query expansion: one query, the mean of the query vector(s) and the vectors of
    their top results (each counts once)."""
    rows = np.vstack([np.atleast_2d(queries), np.atleast_2d(neighbours)]).astype(np.float64)
    return rows.mean(axis=0, keepdims=True)


def expand_each(queries: np.ndarray, neighbours: np.ndarray) -> np.ndarray:
    """:func:`expand_query` for many single queries at once: ``(m, d)`` queries and their
    ``(m, K, d)`` neighbours' vectors give ``(m, d)`` expanded queries."""
    return (queries + neighbours.sum(axis=1)) / (1 + neighbours.shape[1])
