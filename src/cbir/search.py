"""From query vectors to one ranked list: single queries, and sets of queries combined.

A set of query images is combined in one of three ways, because users mean different things by
"more like these":

- ``mean``: average the query descriptors and search once (the centroid of the set; best when
  the queries show one thing).
- ``min``: a collection image's distance is its distance to the *closest* query ("like any of
  these"; keeps several distinct looks).
- ``rrf``: reciprocal rank fusion of the queries' own rankings, score = sum 1 / (60 + rank)
  over each query's top ``depth`` (Cormack et al., 2009); robust when the distances of different
  queries are not comparable.

The same fusion merges the rankings of several descriptors (late fusion, see
``Collection.search``): their distances are not comparable at all, their ranks are.

Average query expansion (``expand=K``, Chum et al., 2007) searches again with the query averaged
with its own top K results: the neighbours that agree with it pull the query toward the rest of
its kind. It costs a second search and lifts MAP where relevant images form clusters (docs/deep.md).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from cbir.index import ExactIndex

COMBINE_MODES = ("mean", "min", "rrf")
RRF_K = 60
#: How deep each ranking goes before reciprocal rank fusion (deeper ranks add < 1/1060 each).
RRF_DEPTH = 1000


@dataclass(frozen=True)
class Hit:
    """One result: its rank (1 = best), catalogue id, path, label and score."""

    rank: int
    id: int
    path: str
    score: float
    label: str | None = None

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def ranked_ids(
    index: ExactIndex,
    queries: np.ndarray,
    k: int,
    *,
    combine: str = "mean",
    exclude: np.ndarray | None = None,
    rrf_depth: int = RRF_DEPTH,
) -> tuple[np.ndarray, np.ndarray]:
    """One ranked list ``(ids, scores)`` for a query set (scores: distances, or RRF scores)."""
    if combine not in COMBINE_MODES:
        raise ValueError(f"combine must be one of {', '.join(COMBINE_MODES)}, got {combine!r}")
    queries = np.atleast_2d(np.asarray(queries))
    if len(queries) == 0:
        raise ValueError("no query vectors")
    if combine == "mean" or len(queries) == 1:
        center = queries.astype(np.float64).mean(axis=0, keepdims=True)
        d, i = index.search(center, k, exclude=exclude)
        return i[0], d[0]
    if combine == "min":
        d, i = index.search(queries, k, reduce="min", exclude=exclude)
        return i[0], d[0]
    return rrf_fuse(index.search(queries, max(k, rrf_depth), exclude=exclude)[1], k)


def rrf_fuse(rankings: np.ndarray, k: int, *, rrf_k: int = RRF_K) -> tuple[np.ndarray, np.ndarray]:
    """Fuse ``(m, depth)`` id rankings by reciprocal rank: best ``k`` ids and their scores."""
    rankings = np.asarray(rankings, dtype=np.int64)
    ranks = np.broadcast_to(np.arange(1, rankings.shape[1] + 1), rankings.shape)
    ids, inverse = np.unique(rankings.ravel(), return_inverse=True)
    scores = np.bincount(inverse, weights=1.0 / (rrf_k + ranks.ravel()), minlength=len(ids))
    order = np.lexsort((ids, -scores))[:k]
    return ids[order], scores[order]


def expand_query(queries: np.ndarray, neighbours: np.ndarray) -> np.ndarray:
    """Average query expansion: one query, the mean of the query vector(s) and the vectors of
    their top results (each counts once)."""
    rows = np.vstack([np.atleast_2d(queries), np.atleast_2d(neighbours)]).astype(np.float64)
    return rows.mean(axis=0, keepdims=True)
