"""Distances between histograms (non-negative vectors read as probability distributions).

These metrics compare shapes, not totals: ``prepare`` L1-normalises each row to sum 1, so an image
with twice the pixels gives the same histogram. Conventions on top of those in
:mod:`cbir.metrics.vector`:

* Input must be non-negative; otherwise ``prepare`` raises ``ValueError`` naming the metric, the
  smallest value found and the metrics that accept any vectors.
* A zero row (an empty histogram) is read as the uniform distribution, so results stay finite and
  ``d(x, x) = 0`` still holds.
* ``kl`` and ``jeffrey`` divide by bin probabilities, so they smooth first:
  ``p' = (p + eps) / (1 + d * eps)`` with ``eps = 1e-6`` and ``d`` the number of bins. Without it
  one empty bin makes the divergence infinite. ``js``, ``bhattacharyya`` and ``hellinger`` are
  finite without smoothing (``0 log 0 = 0``; Bhattacharyya clips the coefficient at 1e-12).
* ``emd``, ``cramer`` and ``ks`` compare cumulative histograms, so they respect bin order (use
  them for ordered bins such as intensity or gradient-magnitude histograms); bins are unit-spaced.

How each is computed (no Python loop over rows; ``prepare`` does the per-row work once):
matrix products for ``kl``, ``jeffrey``, ``hellinger`` and ``bhattacharyya``; SciPy's C ``cdist`` on
(cumulative) histograms for ``intersection``, ``emd``, ``cramer`` and ``ks``; broadcasting over
cache-sized blocks of rows for ``chi2`` and ``js``, which need per-element division or logarithms.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy.special import rel_entr

from cbir.metrics.base import (
    Metric,
    Prepared,
    Route,
    get_metric,
    metric_names,
    register_metric,
)
from cbir.metrics.vector import (
    as_reported,
    cdist_compare,
    gram,
    refine_near,
    refine_tolerance,
    root_l2,
)

#: Smoothing for kl and jeffrey: p' = (p + KL_EPS) / (1 + d * KL_EPS).
KL_EPS = 1e-6

#: Bhattacharyya coefficients are clipped here so -ln(BC) stays finite (at most ~27.6).
BC_MIN = 1e-12

#: Elements in one broadcast temporary of chi2/js. 2^16 elements (256-512 KB) stay in L2 cache;
#: measured ~2x faster than 32 MB blocks, which stream through main memory once per operation.
_BLOCK_ELEMENTS = 1 << 16

#: Added to denominators / log arguments: turns 0/0 and 0 log 0 into 0, negligible otherwise.
_TINY = {np.dtype(np.float32): np.float32(1e-30), np.dtype(np.float64): 1e-300}


def histograms(X: np.ndarray, metric: str) -> np.ndarray:
    """Rows L1-normalised to sum 1 in float64 (zero rows -> uniform); rejects negative input."""
    A = np.asarray(X)
    if A.size:
        lowest = float(A.min())
        if lowest < 0:
            anything = [n for n in metric_names() if not get_metric(n).nonnegative]
            raise ValueError(
                f"metric {metric!r} needs non-negative vectors (histograms), but the smallest "
                f"value is {lowest:g}; metrics that accept any vectors: {', '.join(anything)}"
            )
    P = np.array(A, dtype=np.float64)
    if P.shape[1] == 0:
        return P
    # Divide by the row maximum first so the sum can neither overflow nor lose tiny rows.
    peak = P.max(axis=1)
    empty = peak == 0
    P /= np.where(empty, 1.0, peak)[:, None]
    P[empty] = 1.0
    P /= P.sum(axis=1, keepdims=True)
    return P


def _working(P: np.ndarray, X: np.ndarray) -> np.ndarray:
    """float32 if the user's input was float32 (halves memory traffic), else float64."""
    return np.ascontiguousarray(P, dtype=np.float32 if np.asarray(X).dtype == np.float32 else None)


def _smoothed(P: np.ndarray) -> np.ndarray:
    return (P + KL_EPS) / (1.0 + P.shape[1] * KL_EPS)


Kernel = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def _blockwise(A: np.ndarray, B: np.ndarray, kernel: Kernel) -> np.ndarray:
    """``out[i, j] = kernel(A[i], B[j])`` over broadcast ``(bm, bn, d)`` blocks of bounded size.

    The two block-sized work buffers are allocated once: fresh allocations of this size per block
    went through mmap/munmap and doubled the run time.
    """
    A = A.astype(B.dtype, copy=False)
    m, d = A.shape
    n = B.shape[0]
    out = np.empty((m, n))
    bn = max(1, min(n, _BLOCK_ELEMENTS // max(d, 1)))
    bm = max(1, min(m, _BLOCK_ELEMENTS // max(bn * d, 1)))
    work1 = np.empty((bm, bn, d), dtype=B.dtype)
    work2 = np.empty_like(work1)
    for i in range(0, m, bm):
        a = A[i : i + bm, None, :]
        for j in range(0, n, bn):
            b = B[None, j : j + bn, :]
            shape = (a.shape[0], b.shape[1])
            out[i : i + bm, j : j + bn] = kernel(
                a, b, work1[: shape[0], : shape[1]], work2[: shape[0], : shape[1]]
            )
    return out


def _chi2_terms(a: np.ndarray, b: np.ndarray, num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """``sum (a - b)^2 / (a + b)`` over the last axis (float64 accumulation)."""
    np.subtract(a, b, out=num)
    np.square(num, out=num)
    np.add(a, b, out=den)
    den += _TINY[den.dtype]
    num /= den
    return num.sum(axis=-1, dtype=np.float64)


def _prepare_chi2(X: np.ndarray) -> Prepared:
    return _working(histograms(X, "chi2"), X)


def _chi2(Pq: Prepared, Pc: Prepared) -> np.ndarray:
    D = _blockwise(Pq, Pc, _chi2_terms)
    D *= 0.5
    return np.clip(D, 0.0, 1.0, out=D)


def _xlogx_sum(
    a: np.ndarray, b: np.ndarray, m: np.ndarray | None = None, t: np.ndarray | None = None
) -> np.ndarray:
    """``sum m log m`` with ``m = a + b`` over the last axis (``0 log 0 = 0``)."""
    m = np.add(a, b, out=m)
    t = np.add(m, _TINY[m.dtype], out=t)
    np.log(t, out=t)
    t *= m
    return t.sum(axis=-1, dtype=np.float64)


def _prepare_js(X: np.ndarray) -> Prepared:
    # Half-histograms make the mixture one addition; sum p log p uses the same kernel as the
    # pairs (m = p/2 + p/2 = p exactly), so rounding cancels and js(p, p) is 0.
    H = _working(histograms(X, "js"), X) * 0.5
    return H, _xlogx_sum(H, H)


def _js(Pq: Prepared, Pc: Prepared) -> np.ndarray:
    Hq, Eq = Pq
    Hc, Ec = Pc
    if Hq.dtype != Hc.dtype:
        # Pairs are computed in the collection's precision; sum p log p must match it exactly.
        Hq = Hq.astype(Hc.dtype)
        Eq = _xlogx_sum(Hq, Hq)
    D = 0.5 * (Eq[:, None] + Ec[None, :]) - _blockwise(Hq, Hc, _xlogx_sum)
    # The entropy difference cancels for nearly identical histograms (the pairs retrieval ranks
    # first): those few pairs are summed from their terms, as SciPy's jensenshannon does.
    scale = np.abs(Eq)[:, None] + np.abs(Ec)[None, :] + 1.0
    near = np.less_equal(D, scale * refine_tolerance(Hc))

    def exact(i: np.ndarray, j: np.ndarray) -> np.ndarray:
        a, b = Hq[i].astype(np.float64), Hc[j].astype(np.float64)
        half_mix = 0.5 * (a + b)
        return (rel_entr(a, half_mix) + rel_entr(b, half_mix)).sum(axis=1)

    refine_near(D, near, exact, Hq.shape[1])
    np.clip(D, 0.0, np.log(2.0), out=D)
    return np.sqrt(D, out=D)


def _prepare_kl(X: np.ndarray) -> Prepared:
    S = _smoothed(histograms(X, "kl"))
    logS = np.log(S)
    return _working(S, X), _working(logS, X), np.einsum("ij,ij->i", S, logS)


def _kl(Pq: Prepared, Pc: Prepared) -> np.ndarray:
    Sq, logSq, Eq = Pq
    logSc = Pc[1]
    G = gram(Sq, logSc)
    D = Eq[:, None] - G
    near = np.less_equal(D, (np.abs(Eq)[:, None] + 1.0) * refine_tolerance(G))
    np.maximum(D, 0.0, out=D)

    def exact(i: np.ndarray, j: np.ndarray) -> np.ndarray:
        gap = logSq[i].astype(np.float64) - logSc[j]
        return np.einsum("ij,ij->i", Sq[i].astype(np.float64), gap)

    refine_near(D, near, exact, Sq.shape[1])
    return D


def _prepare_jeffrey(X: np.ndarray) -> Prepared:
    S = _smoothed(histograms(X, "jeffrey"))
    logS = np.log(S)
    return _working(np.hstack([S, logS]), X), np.einsum("ij,ij->i", S, logS)


def _jeffrey(Pq: Prepared, Pc: Prepared) -> np.ndarray:
    # [log p | p] . [q | log q] = p.log q + q.log p: both cross terms in one product.
    Cq, Eq = Pq
    Cc, Ec = Pc
    d = Cq.shape[1] // 2
    G = gram(np.hstack([Cq[:, d:], Cq[:, :d]]), Cc)
    D = Eq[:, None] + Ec[None, :] - G
    scale = np.abs(Eq)[:, None] + np.abs(Ec)[None, :] + 1.0
    near = np.less_equal(D, scale * refine_tolerance(G))
    np.maximum(D, 0.0, out=D)

    def exact(i: np.ndarray, j: np.ndarray) -> np.ndarray:
        diff = Cq[i].astype(np.float64) - Cc[j]
        return np.einsum("ij,ij->i", diff[:, :d], diff[:, d:])

    refine_near(D, near, exact, 2 * d)
    return D


def _prepare_root(name: str) -> Callable[[np.ndarray], Prepared]:
    """sqrt(p) rows: the Bhattacharyya coefficient is then one matrix product."""

    def prepare(X: np.ndarray) -> Prepared:
        return _working(np.sqrt(histograms(X, name)), X)

    return prepare


def _bc(Rq: np.ndarray, Rc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``BC = sqrt(p).sqrt(q)`` and ``1 - BC``, clipped to [0, 1].

    ``1 - BC`` cancels for near-identical rows, so there it is recomputed as
    ``||sqrt(p) - sqrt(q)||^2 / 2`` (equal for normalised rows), which is exactly 0 for identical
    rows.
    """
    G = gram(Rq, Rc)
    BC = np.clip(G, 0.0, 1.0, dtype=np.float64)
    gap = 1.0 - BC
    near = np.less_equal(gap, refine_tolerance(G))

    def exact(i: np.ndarray, j: np.ndarray) -> np.ndarray:
        diff = Rq[i].astype(np.float64) - Rc[j]
        return 0.5 * np.einsum("ij,ij->i", diff, diff)

    refine_near(gap, near, exact, Rq.shape[1])
    np.clip(gap, 0.0, 1.0, out=gap)
    return BC, gap


def _hellinger(Pq: Prepared, Pc: Prepared) -> np.ndarray:
    return np.sqrt(_bc(Pq, Pc)[1])


def _bhattacharyya(Pq: Prepared, Pc: Prepared) -> np.ndarray:
    BC, gap = _bc(Pq, Pc)
    # -ln(BC) = -log1p(-gap) keeps near pairs precise; far pairs use BC itself (precise near 0).
    close = gap < 0.5
    D = -np.log(np.maximum(BC, BC_MIN))
    D[close] = -np.log1p(-gap[close])
    return np.maximum(D, 0.0, out=D)


def _prepare_normalised(name: str) -> Callable[[np.ndarray], Prepared]:
    def prepare(X: np.ndarray) -> Prepared:
        return histograms(X, name)

    return prepare


def _prepare_cumulative(name: str) -> Callable[[np.ndarray], Prepared]:
    """Cumulative histograms, float64 contiguous for ``cdist``; the last entry is exactly 1."""

    def prepare(X: np.ndarray) -> Prepared:
        F = np.cumsum(histograms(X, name), axis=1)
        if F.shape[1]:
            F[:, -1] = 1.0
        return F

    return prepare


Compare = Callable[[Prepared, Prepared], np.ndarray]


def _clipped(compare: Compare, top: float) -> Compare:
    """Clip rounding overshoot of a bounded distance."""

    def clipped(Pq: Prepared, Pc: Prepared) -> np.ndarray:
        D = compare(Pq, Pc)
        return np.clip(D, 0.0, top, out=D)

    return clipped


# -- routes onto an index (see cbir.metrics.base.Route) ------------------------------------------
# Every embedding reads rows as these metrics do: L1-normalised, an empty row as uniform.
def root_histograms(X: np.ndarray) -> np.ndarray:
    """sqrt(p): L2 between these is sqrt(2) x Hellinger, their product the Bhattacharyya
    coefficient (and good candidates for the other histogram metrics)."""
    return np.sqrt(histograms(X, "hellinger"))


def _normalised(X: np.ndarray) -> np.ndarray:
    return histograms(X, "intersection")


def _cumulative(X: np.ndarray) -> np.ndarray:
    return _prepare_cumulative("emd")(X)


def _hellinger_from_l2(scores: np.ndarray, _queries: np.ndarray) -> np.ndarray:
    return np.sqrt(np.clip(scores / 2.0, 0.0, 1.0))


def _bhattacharyya_from_ip(scores: np.ndarray, _queries: np.ndarray) -> np.ndarray:
    return np.maximum(-np.log(np.clip(scores, BC_MIN, 1.0)), 0.0)


def _half_l1(scores: np.ndarray, _queries: np.ndarray) -> np.ndarray:
    return np.clip(scores / 2.0, 0.0, 1.0)


def _at_most_one(scores: np.ndarray, _queries: np.ndarray) -> np.ndarray:
    return np.clip(scores, 0.0, 1.0)


# KL(p||q) = sum p' ln p' - sum p' ln q': for a given query only the product p'.ln q' varies, so
# the divergence ranks exactly as an inner product of p' (query side) with ln q' (database side).
# Jeffrey's divergence splits the same way with three blocks: p'.ln q' + ln p'.q' - q'.ln q'.
def _kl_database(X: np.ndarray) -> np.ndarray:
    return np.log(_smoothed(histograms(X, "kl")))


def _kl_query(X: np.ndarray) -> np.ndarray:
    return _smoothed(histograms(X, "kl"))


def _jeffrey_database(X: np.ndarray) -> np.ndarray:
    Q = _smoothed(histograms(X, "jeffrey"))
    logs = np.log(Q)
    return np.hstack([logs, Q, -np.einsum("ij,ij->i", Q, logs)[:, None]])


def _jeffrey_query(X: np.ndarray) -> np.ndarray:
    P = _smoothed(histograms(X, "jeffrey"))
    return np.hstack([P, np.log(P), np.ones((len(P), 1))])


def _divergence_from_ip(scores: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """``sum p' ln p' - score``: the divergence from the inner product of its embedding."""
    P = _smoothed(histograms(queries, "kl"))
    entropy_term = np.einsum("ij,ij->i", P, np.log(P))
    return np.maximum(entropy_term[:, None] - scores, 0.0)


register_metric(
    Metric(
        name="chi2",
        summary="Symmetric chi-square: bin differences weighted by bin mass, in [0, 1]; a "
        "standard choice for colour and texture histograms.",
        formula="1/2 sum_i (p_i - q_i)^2 / (p_i + q_i), with 0/0 = 0",
        prepare=_prepare_chi2,
        compare=_chi2,
        aliases=("chi_square", "chisquare"),
        nonnegative=True,
        route=Route("rerank", "l2", embed=root_histograms),
    )
)
#: KL and Jeffrey as inner products with log-histograms: a graph finds their neighbours only
#: with a wider search than other routes need (the recall of each route, at this breadth, is in
#: docs/benchmarks.md, "Every metric through an approximate index").
DIVERGENCE_GRAPH_BREADTH = 4


register_metric(
    Metric(
        name="kl",
        summary="Kullback-Leibler divergence KL(query || candidate), smoothed (eps=1e-6); "
        "asymmetric.",
        formula="sum_i p'_i ln(p'_i / q'_i), p' = (p + 1e-6) / (1 + d 1e-6)",
        prepare=_prepare_kl,
        compare=_kl,
        symmetric=False,
        aliases=("kullback_leibler", "kl_divergence"),
        nonnegative=True,
        route=Route(
            "embedded",
            "ip",
            _kl_database,
            embed_query=_kl_query,
            distance=_divergence_from_ip,
            breadth=DIVERGENCE_GRAPH_BREADTH,
        ),
    )
)
register_metric(
    Metric(
        name="jeffrey",
        summary="Jeffrey (J) divergence: KL in both directions, smoothed (eps=1e-6); symmetric.",
        formula="sum_i (p'_i - q'_i) ln(p'_i / q'_i) = KL(p'||q') + KL(q'||p')",
        prepare=_prepare_jeffrey,
        compare=_jeffrey,
        aliases=("jeffreys", "j_divergence"),
        nonnegative=True,
        route=Route(
            "embedded",
            "ip",
            _jeffrey_database,
            embed_query=_jeffrey_query,
            distance=_divergence_from_ip,
            breadth=DIVERGENCE_GRAPH_BREADTH,
        ),
    )
)
register_metric(
    Metric(
        name="js",
        summary="Jensen-Shannon distance (square root of the JS divergence, natural log), in "
        "[0, sqrt(ln 2)]; finite without smoothing.",
        formula="sqrt(KL(p||m)/2 + KL(q||m)/2), m = (p + q) / 2",
        prepare=_prepare_js,
        compare=_js,
        aliases=("jensenshannon", "jensen_shannon"),
        nonnegative=True,
        # FAISS's own Jensen-Shannon gives NaN on empty bins; Hellinger's embedding finds the
        # candidates instead
        route=Route("rerank", "l2", embed=root_histograms),
    )
)
register_metric(
    Metric(
        name="bhattacharyya",
        summary="Bhattacharyya distance: minus the log of the histograms' overlap coefficient.",
        formula="-ln(max(BC, 1e-12)), BC = sum_i sqrt(p_i q_i)",
        prepare=_prepare_root("bhattacharyya"),
        compare=_bhattacharyya,
        nonnegative=True,
        route=Route("embedded", "ip", root_histograms, distance=_bhattacharyya_from_ip),
    )
)
register_metric(
    Metric(
        name="hellinger",
        summary="Hellinger distance, in [0, 1]; a true metric on distributions.",
        formula="sqrt(1 - BC), BC = sum_i sqrt(p_i q_i)",
        prepare=_prepare_root("hellinger"),
        compare=_hellinger,
        nonnegative=True,
        route=Route("embedded", "l2", root_histograms, distance=_hellinger_from_l2),
    )
)
register_metric(
    Metric(
        name="intersection",
        summary="One minus histogram intersection (Swain & Ballard), in [0, 1].",
        formula="1 - sum_i min(p_i, q_i) = 1/2 sum_i |p_i - q_i|",
        prepare=_prepare_normalised("intersection"),
        compare=_clipped(cdist_compare("cityblock", 0.5), 1.0),
        aliases=("histogram_intersection",),
        nonnegative=True,
        route=Route("embedded", "l1", _normalised, distance=_half_l1, fallback="hellinger"),
    )
)
register_metric(
    Metric(
        name="emd",
        summary="1-D earth mover's (Wasserstein-1) distance for ordered bins, unit bin spacing.",
        formula="sum_i |P_i - Q_i|, P, Q = cumulative histograms",
        prepare=_prepare_cumulative("emd"),
        compare=cdist_compare("cityblock"),
        aliases=("wasserstein", "earth_movers"),
        nonnegative=True,
        route=Route("embedded", "l1", _cumulative, distance=as_reported, fallback="cramer"),
    )
)
register_metric(
    Metric(
        name="cramer",
        summary="Cramer distance for ordered bins: L2 between cumulative histograms.",
        formula="sqrt(sum_i (P_i - Q_i)^2), P, Q = cumulative histograms",
        prepare=_prepare_cumulative("cramer"),
        compare=cdist_compare("euclidean"),
        nonnegative=True,
        route=Route("embedded", "l2", _cumulative, distance=root_l2),
    )
)
register_metric(
    Metric(
        name="ks",
        summary="Kolmogorov-Smirnov statistic for ordered bins: largest gap between cumulative "
        "histograms, in [0, 1].",
        formula="max_i |P_i - Q_i|, P, Q = cumulative histograms",
        prepare=_prepare_cumulative("ks"),
        compare=_clipped(cdist_compare("chebyshev"), 1.0),
        aliases=("kolmogorov_smirnov",),
        nonnegative=True,
        route=Route("embedded", "linf", _cumulative, distance=_at_most_one, fallback="cramer"),
    )
)
