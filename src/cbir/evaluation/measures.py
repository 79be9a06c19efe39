"""Retrieval-evaluation measures over a ranked relevance matrix, vectorised over queries.

Every measure takes

* ``rel``: bool array ``(q, D)``: ``rel[j, i-1]`` says whether query ``j``'s result at rank
  ``i`` (1-based, best first) is relevant. In leave-one-out the query itself is already removed.
* ``n_relevant``: int array ``(q,)``: ``R``, the number of relevant items for the query in the
  whole collection. ``R`` may exceed the depth ``D``; relevant items that are not ranked within
  ``D`` count as never retrieved.

Notation: ``rel_i`` is the relevance at rank ``i``, ``c_i = rel_1 + ... + rel_i`` the relevant
count within the top ``i`` and ``P@i = c_i / i``. A cut-off ``k`` larger than ``D`` treats the
missing ranks ``D+1 .. k`` as non-relevant, as trec_eval does for a run shorter than ``k``.

Queries with ``R = 0`` get NaN from every measure that divides by ``R`` (AP in all forms,
recall, nDCG, R-precision, interpolated precision). :func:`mean_over_queries` and
:func:`summarise` skip them and say how many were skipped, which matches trec_eval, where a
topic without relevant documents is not evaluated.

Everything is cumulative sums over the depth axis: no Python loop over queries or ranks.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "AP_NORMALISATIONS",
    "RECALL_LEVELS_11",
    "ap_at_k",
    "ap_at_k_min",
    "ap_at_k_retrieved",
    "ap_at_k_trec",
    "average_precision",
    "interpolated_precision_11",
    "mean_over_queries",
    "ndcg_at_k",
    "per_class_mean",
    "per_query_ap",
    "precision_at_k",
    "precision_curve",
    "r_precision",
    "recall_at_k",
    "summarise",
]

Normalise = Literal["retrieved", "min", "trec"]
#: The allowed ``normalise`` values of :func:`ap_at_k`.
AP_NORMALISATIONS: tuple[str, ...] = ("retrieved", "min", "trec")
#: The recall levels 0.0, 0.1, ..., 1.0 of the 11-point curve (``i / 10``, exactly rounded).
RECALL_LEVELS_11: NDArray[np.float64] = np.arange(11) / 10

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]
BoolArray = NDArray[np.bool_]


# ---------------------------------------------------------------------------------- checks


def _check_rel(rel: ArrayLike) -> BoolArray:
    arr = np.asarray(rel)
    if arr.ndim != 2:
        raise ValueError(f"rel must be a 2-d (queries, depth) array, got shape {arr.shape}")
    if arr.dtype != np.bool_:
        if arr.size and not np.isin(arr, (0, 1)).all():
            raise ValueError("rel must be boolean (or 0/1)")
        arr = arr.astype(bool)
    return arr


def _check_inputs(rel: ArrayLike, n_relevant: ArrayLike) -> tuple[BoolArray, IntArray, IntArray]:
    """Validated ``(rel, R, c)`` with ``c = cumsum(rel, axis=1)``."""
    rel = _check_rel(rel)
    R = np.asarray(n_relevant)
    if R.shape != (rel.shape[0],):
        raise ValueError(
            f"n_relevant must have shape ({rel.shape[0]},) to match rel, got {R.shape}"
        )
    whole = R.size == 0 or (np.isfinite(R).all() and (np.round(R) == R).all())
    if not np.issubdtype(R.dtype, np.integer) and not whole:
        raise ValueError("n_relevant must hold whole numbers")
    R = R.astype(np.int64)
    if (R < 0).any():
        raise ValueError("n_relevant must be non-negative")
    cum = np.cumsum(rel, axis=1, dtype=np.int64)
    if rel.shape[1] and (cum[:, -1] > R).any():
        bad = int(np.flatnonzero(cum[:, -1] > R)[0])
        raise ValueError(
            f"query {bad} has {int(cum[bad, -1])} relevant results in its ranking but "
            f"n_relevant = {int(R[bad])}"
        )
    return rel, R, cum


def _check_k(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    return int(k)


def _count_at(cum: IntArray, k: int) -> IntArray:
    """``c_k``: relevant results within the top ``k`` (ranks past the depth count as 0)."""
    kk = min(k, cum.shape[1])
    if kk == 0:
        return np.zeros(cum.shape[0], dtype=np.int64)
    return cum[:, kk - 1]


def _divide(num: ArrayLike, den: ArrayLike) -> FloatArray:
    """``num / den`` with NaN where ``den == 0``, without warnings."""
    num, den = np.broadcast_arrays(np.asarray(num, dtype=float), np.asarray(den, dtype=float))
    out = np.full(num.shape, np.nan)
    np.divide(num, den, out=out, where=den != 0)
    return out


def _precision_sum(rel: BoolArray, cum: IntArray, k: int) -> FloatArray:
    """``sum_{i <= k, rel_i} P@i`` per query."""
    kk = min(k, rel.shape[1])
    if kk == 0:
        return np.zeros(rel.shape[0])
    ranks = np.arange(1, kk + 1)
    prec = np.zeros(rel[:, :kk].shape)
    np.divide(cum[:, :kk], ranks, out=prec, where=rel[:, :kk])
    return prec.sum(axis=1)


# ---------------------------------------------------------------------------- average precision


def _average_precision(rel: BoolArray, R: IntArray, cum: IntArray) -> FloatArray:
    return _divide(_precision_sum(rel, cum, rel.shape[1]), R)


def average_precision(rel: ArrayLike, n_relevant: ArrayLike) -> FloatArray:
    """Average precision of each query over the whole given ranking, ``(q,)``.

    ``AP = (1 / R) * sum_{i <= D, rel_i} P@i``. This is the full-ranking AP when the depth
    ``D`` covers the collection, and trec_eval's ``map`` for the given run (``map_cut_k`` when
    ``D = k``). NaN when ``R = 0``.
    """
    return _average_precision(*_check_inputs(rel, n_relevant))


per_query_ap = average_precision


def _ap_at_k(rel: BoolArray, R: IntArray, cum: IntArray, k: int, normalise: str) -> FloatArray:
    if normalise not in AP_NORMALISATIONS:
        allowed = ", ".join(repr(n) for n in AP_NORMALISATIONS)
        raise ValueError(f"normalise must be one of {allowed}; got {normalise!r}")
    k = _check_k(k)
    num = _precision_sum(rel, cum, k)
    if normalise == "trec":
        return _divide(num, R)
    if normalise == "min":
        return _divide(num, np.minimum(R, k))
    ap = _divide(num, _count_at(cum, k))  # "retrieved"
    ap[np.isnan(ap)] = 0.0  # nothing relevant in the top k: AP@k = 0
    ap[R == 0] = np.nan
    return ap


def ap_at_k(rel: ArrayLike, n_relevant: ArrayLike, k: int, *, normalise: Normalise) -> FloatArray:
    """AP cut at rank ``k``, ``(q,)``: ``(1 / N) * sum_{i <= k, rel_i} P@i``.

    The papers disagree on the normaliser ``N``, so it must be named:

    * ``"retrieved"``: ``N = c_k``, the relevant results within the top ``k`` (common in CBIR
      papers); 0 when ``c_k = 0`` and ``R > 0``.
    * ``"min"``: ``N = min(R, k)`` (some hashing / retrieval papers); the nominal ``k``, even
      when ``k`` exceeds the depth.
    * ``"trec"``: ``N = R``, trec_eval's ``map_cut_k`` (ir_measures ``AP@k``).

    ``"min"`` and ``"trec"`` are at most ``"retrieved"``; all agree when every relevant item is
    in the top ``k``. NaN when ``R = 0``. A ValueError names the allowed ``normalise`` values.
    """
    rel, R, cum = _check_inputs(rel, n_relevant)
    return _ap_at_k(rel, R, cum, k, normalise)


def ap_at_k_retrieved(rel: ArrayLike, n_relevant: ArrayLike, k: int) -> FloatArray:
    """AP@k divided by the relevant results within the top ``k``: ``ap_at_k(..., "retrieved")``."""
    return ap_at_k(rel, n_relevant, k, normalise="retrieved")


def ap_at_k_min(rel: ArrayLike, n_relevant: ArrayLike, k: int) -> FloatArray:
    """AP@k divided by ``min(R, k)``: ``ap_at_k(..., normalise="min")``."""
    return ap_at_k(rel, n_relevant, k, normalise="min")


def ap_at_k_trec(rel: ArrayLike, n_relevant: ArrayLike, k: int) -> FloatArray:
    """AP@k divided by ``R`` (trec_eval's ``map_cut_k``): ``ap_at_k(..., normalise="trec")``."""
    return ap_at_k(rel, n_relevant, k, normalise="trec")


# -------------------------------------------------------------------------- cut-off measures


def precision_at_k(rel: ArrayLike, n_relevant: ArrayLike, k: int) -> FloatArray:
    """``P@k = c_k / k``, ``(q,)``; ranks past the depth count as non-relevant.

    P@k does not divide by ``R``: a query with ``R = 0`` gets 0, not NaN (``n_relevant`` is only
    checked for consistency). :func:`summarise` leaves such queries out all the same.
    """
    _, _, cum = _check_inputs(rel, n_relevant)
    k = _check_k(k)
    return _count_at(cum, k) / k


def recall_at_k(rel: ArrayLike, n_relevant: ArrayLike, k: int) -> FloatArray:
    """``R@k = c_k / R``, ``(q,)``; NaN when ``R = 0``."""
    _, R, cum = _check_inputs(rel, n_relevant)
    return _divide(_count_at(cum, _check_k(k)), R)


def _r_precision(R: IntArray, cum: IntArray) -> FloatArray:
    depth = cum.shape[1]
    r_max = int(R.max()) if R.size else 0
    if r_max > depth:
        raise ValueError(
            f"the ranking is too short for R-precision: depth {depth} but a query has "
            f"R = {r_max} relevant items (rank to depth >= max R)"
        )
    if depth == 0:
        return np.full(R.shape, np.nan)
    at_r = np.take_along_axis(cum, np.maximum(R - 1, 0)[:, None], axis=1)[:, 0]
    return _divide(at_r, R)


def r_precision(rel: ArrayLike, n_relevant: ArrayLike) -> FloatArray:
    """R-precision ``P@R = c_R / R``, ``(q,)``; NaN when ``R = 0``.

    Needs depth ``D >= max R``; otherwise a ValueError says the ranking is too short.
    """
    _, R, cum = _check_inputs(rel, n_relevant)
    return _r_precision(R, cum)


def _ndcg_at_k(rel: BoolArray, R: IntArray, k: int) -> FloatArray:
    kk = min(k, rel.shape[1])
    n_ideal = np.minimum(R, k)
    length = max(kk, int(n_ideal.max()) if R.size else 0)
    discount = 1.0 / np.log2(np.arange(2, length + 2))
    dcg = rel[:, :kk] @ discount[:kk] if kk else np.zeros(rel.shape[0])
    ideal = np.concatenate(([0.0], np.cumsum(discount)))[n_ideal]
    return _divide(dcg, ideal)


def ndcg_at_k(rel: ArrayLike, n_relevant: ArrayLike, k: int) -> FloatArray:
    """Binary-gain nDCG@k, ``(q,)``: ``DCG@k / IDCG@k``.

    ``DCG@k = sum_{i <= k} rel_i / log2(i + 1)`` and ``IDCG@k = sum_{i <= min(R, k)}
    1 / log2(i + 1)`` (all ``R`` relevant items at the top). Equals trec_eval's ``ndcg_cut_k``
    with 0/1 qrels. NaN when ``R = 0``.
    """
    rel, R, _ = _check_inputs(rel, n_relevant)
    return _ndcg_at_k(rel, R, _check_k(k))


# ------------------------------------------------------------------------------------ curves


def _interpolated_precision_11(rel: BoolArray, R: IntArray, cum: IntArray, rule: str) -> FloatArray:
    if rule not in ("exact", "trec_eval"):
        raise ValueError(f"rule must be 'exact' or 'trec_eval'; got {rule!r}")
    q, depth = rel.shape
    retrieved = cum[:, -1] if depth else np.zeros(q, dtype=np.int64)
    # Precision at the j-th relevant result (j = 1 .. c_D), then the running max from the end:
    # max_{i >= rank of j-th relevant} P@i (precision between relevant ranks only drops).
    m = int(retrieved.max()) if q else 0
    rows, cols = np.nonzero(rel)
    nth = cum[rows, cols]  # this is the nth relevant result of its row (1-based)
    at_rel = np.zeros((q, m + 1))  # a spare zero column, so indexing works when m = 0
    at_rel[rows, nth - 1] = nth / (cols + 1)
    best = np.maximum.accumulate(at_rel[:, ::-1], axis=1)[:, ::-1]
    # Relevant results needed to reach recall level r: the smallest c with c / R >= r.
    if rule == "exact":
        need = (np.arange(11) * R[:, None] + 9) // 10  # ceil(r * R) in integers
    else:  # trec_eval v9 (inside pytrec_eval): (long) (r * R + 0.9) in doubles
        need = (RECALL_LEVELS_11 * R[:, None] + 0.9).astype(np.int64)
    reached = need <= retrieved[:, None]
    out = np.take_along_axis(best, np.clip(need - 1, 0, m), axis=1)
    out[~reached] = 0.0
    out[R == 0] = np.nan
    return out


def interpolated_precision_11(
    rel: ArrayLike, n_relevant: ArrayLike, *, rule: Literal["exact", "trec_eval"] = "exact"
) -> FloatArray:
    """TREC 11-point interpolated precision, ``(q, 11)`` at recall ``0, 0.1, ..., 1.0``.

    ``iP(r) = max {P@i : i <= D, c_i / R >= r}``, and 0 when recall ``r`` is not reached within
    the depth. ``iP(0)`` is the best precision anywhere in the ranking. Rows with ``R = 0``
    are NaN.

    ``rule="exact"`` needs ``ceil(r * R)`` relevant results for level ``r``, which is the
    definition above. ``rule="trec_eval"`` copies trec_eval v9 (the one inside
    ``pytrec_eval`` and ir_measures' ``IPrec``), which computes ``(long) (r * R + 0.9)`` in
    floating point and so occasionally needs one relevant result fewer (``r = 0.7, R = 3``
    needs 2, not 3). The current trec_eval source rounds ``r * R`` to nearest instead, which
    differs more often.
    """
    rel, R, cum = _check_inputs(rel, n_relevant)
    return _interpolated_precision_11(rel, R, cum, rule)


def precision_curve(rel: ArrayLike, ks: ArrayLike) -> FloatArray:
    """``P@k`` for each ``k`` in ``ks``, ``(q, len(ks))``; ranks past the depth count as 0.

    Needs no ``R``, so queries with ``R = 0`` get zeros, not NaN.
    """
    rel = _check_rel(rel)
    ks_arr = np.asarray(ks).reshape(-1)
    if ks_arr.size and (not np.issubdtype(ks_arr.dtype, np.integer) or (ks_arr < 1).any()):
        raise ValueError(f"ks must be positive integers, got {ks!r}")
    ks_arr = ks_arr.astype(np.int64)
    cum = np.cumsum(rel, axis=1, dtype=np.int64)
    padded = np.concatenate((np.zeros((rel.shape[0], 1), dtype=np.int64), cum), axis=1)
    return padded[:, np.minimum(ks_arr, rel.shape[1])] / ks_arr


# ------------------------------------------------------------------------------- aggregation


def mean_over_queries(values: ArrayLike) -> tuple[float | FloatArray, int]:
    """``(mean over queries, queries skipped)``, skipping NaN (queries with ``R = 0``).

    ``values`` is ``(q,)`` (returns a float) or ``(q, m)`` (returns ``(m,)``, column-wise
    ``nanmean``; a row counts as skipped when it holds any NaN). An all-NaN column gives NaN,
    without a warning.
    """
    arr = np.asarray(values, dtype=float)
    if arr.ndim not in (1, 2):
        raise ValueError(f"values must be (queries,) or (queries, m), got shape {arr.shape}")
    nan = np.isnan(arr)
    kept = (~nan).sum(axis=0)
    total = np.where(nan, 0.0, arr).sum(axis=0)
    mean = _divide(total, kept)
    skipped = int((nan if arr.ndim == 1 else nan.any(axis=1)).sum())
    return (float(mean) if arr.ndim == 1 else mean), skipped


def per_class_mean(values: ArrayLike, classes: ArrayLike) -> dict[Hashable, float]:
    """``{class: mean of values over its queries}``, skipping NaN; NaN for an all-NaN class."""
    values = np.asarray(values, dtype=float)
    classes = np.asarray(classes)
    if values.shape != classes.shape or values.ndim != 1:
        raise ValueError(
            f"values and classes must be 1-d of the same length, got {values.shape} "
            f"and {classes.shape}"
        )
    labels, inverse = np.unique(classes, return_inverse=True)
    keep = ~np.isnan(values)
    sums = np.bincount(inverse[keep], weights=values[keep], minlength=labels.size)
    counts = np.bincount(inverse[keep], minlength=labels.size)
    means = _divide(sums, counts)
    return dict(zip(labels.tolist(), means.tolist(), strict=True))


def summarise(
    rel: ArrayLike,
    n_relevant: ArrayLike,
    *,
    ks: Sequence[int] = (10,),
    map_k: int | None = 100,
) -> dict[str, float]:
    """Mean over the queries with ``R > 0`` of the standard measures.

    Keys: ``MAP`` (:func:`average_precision` over the given ranking); ``mAP@{map_k}(retrieved)``,
    ``mAP@{map_k}(min)``, ``mAP@{map_k}(trec)`` (:func:`ap_at_k`; none when ``map_k`` is None);
    ``P@{k}``, ``R@{k}``, ``nDCG@{k}`` for each ``k`` in ``ks``; ``R-precision`` only when the
    depth is at least every query's ``R``; ``queries`` (all) and ``queries_without_relevant``
    (``R = 0``, left out of every mean, P@k included, as trec_eval does). A mean over no query
    is NaN.
    """
    rel, R, cum = _check_inputs(rel, n_relevant)
    skip = R == 0

    def mean(values: FloatArray) -> float:
        return float(mean_over_queries(np.where(skip, np.nan, values))[0])

    out: dict[str, float] = {"MAP": mean(_average_precision(rel, R, cum))}
    if map_k is not None:
        for normalise in AP_NORMALISATIONS:
            out[f"mAP@{map_k}({normalise})"] = mean(_ap_at_k(rel, R, cum, map_k, normalise))
    for k in ks:
        k = _check_k(k)
        count = _count_at(cum, k)
        out[f"P@{k}"] = mean(count / k)
        out[f"R@{k}"] = mean(_divide(count, R))
        out[f"nDCG@{k}"] = mean(_ndcg_at_k(rel, R, k))
    if not R.size or R.max() <= rel.shape[1]:
        out["R-precision"] = mean(_r_precision(R, cum))
    out["queries"] = int(R.size)
    out["queries_without_relevant"] = int(skip.sum())
    return out
