"""Distances between real vectors of any sign: L2, L1, L-inf, cosine, correlation, Canberra.

Conventions shared by every metric in :mod:`cbir.metrics`:

* Every metric is a distance: smaller is closer, ``d >= 0``, ``d(x, x) = 0`` up to float rounding
  and ``d(x, y) = d(y, x)`` unless the metric says ``symmetric=False``.
* No NaN or inf comes out for finite input, including all-zero rows and float32 input. The one
  exception is a true result beyond the float64 range: the squared-distance metrics (euclidean,
  sqeuclidean) square the inputs, so keep magnitudes below ~1e150.
* Output is a float64 ``(m, n)`` matrix. float32 input is kept in float32 for the matrix products
  (they are memory-bound, so this halves the time); everything else is accumulated in float64.
* ``prepare`` does all per-row work once (norms, unit rows, float64 conversion) and returns an
  array or a tuple of row-aligned arrays, so search can slice the prepared collection with
  :func:`cbir.metrics.take_rows` and call ``compare`` per block.

Degenerate vectors: cosine defines the distance between two zero vectors as 0 and between a zero
vector and any other as 1; correlation does the same for constant vectors (zero variance). Canberra
counts ``0/0`` terms as 0, like SciPy.

Euclidean-type metrics use ``||x||^2 + ||y||^2 - 2 x.y`` (one matrix product). That formula
cancels badly for near-duplicates, exactly the pairs retrieval cares most about, so pairs whose
result is within ~1000x rounding error of zero are recomputed directly from ``x - y`` in float64;
identical rows therefore give exactly 0. (The distribution metrics built on matrix products do
the same.)
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy.spatial.distance import cdist

from cbir.metrics.base import Metric, Prepared, Route, register_metric

#: float32 rows with larger magnitudes are kept in float64: products could overflow float32.
FLOAT32_SAFE_MAX = 1e15

#: Recompute a pair directly when ``d^2 <= rel * (||x||^2 + ||y||^2)``. The worst relative error
#: of the product measured at d=405 is ~1e-6 (float32) and ~2e-15 (float64), so results outside
#: this zone are good to ~1e-3 (float32) and ~1e-7 (float64) relative.
_REFINE_REL = {np.dtype(np.float32): 1e-3, np.dtype(np.float64): 1e-8}

#: Elements per temporary when recomputing near pairs (bounds memory at ~8 MB).
_REFINE_CHUNK = 1 << 20


def working_array(X: np.ndarray) -> np.ndarray:
    """C-contiguous float32 (if the input is float32 and products cannot overflow) or float64."""
    A = np.asarray(X)
    if A.dtype == np.float32 and (A.size == 0 or float(np.abs(A).max()) <= FLOAT32_SAFE_MAX):
        return np.ascontiguousarray(A)
    return np.ascontiguousarray(A, dtype=np.float64)


def gram(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """``A @ B.T`` in the collection's precision: the small query block ``A`` is cast, never ``B``.

    Casting ``B`` would copy the whole collection block on every query.
    """
    if A.dtype != B.dtype:
        if B.dtype == np.float32 and (A.size == 0 or np.abs(A).max() <= FLOAT32_SAFE_MAX):
            A = A.astype(np.float32)
        else:
            A = A.astype(np.float64, copy=False)
            B = B.astype(np.float64, copy=False)
    return A @ B.T


def _row_sq_norms(W: np.ndarray) -> np.ndarray:
    return np.einsum("ij,ij->i", W, W, dtype=np.float64)


def prepare_sq_euclidean(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows in working precision plus their squared norms (float64), for :func:`sq_euclidean`."""
    W = working_array(X)
    return W, _row_sq_norms(W)


def refine_near(
    D: np.ndarray,
    near: np.ndarray,
    exact: Callable[[np.ndarray, np.ndarray], np.ndarray],
    width: int,
) -> None:
    """Overwrite ``D[i, j]`` with ``exact(i, j)`` (arrays of pair indices) wherever ``near``.

    Matrix-product formulas cancel for near-identical rows, exactly the pairs retrieval ranks
    first, so those few pairs are recomputed directly in float64 (``width`` = elements per pair,
    to bound the temporaries).
    """
    rows, cols = np.nonzero(near)
    step = max(1, _REFINE_CHUNK // max(width, 1))
    for s in range(0, rows.size, step):
        i, j = rows[s : s + step], cols[s : s + step]
        D[i, j] = exact(i, j)


def refine_tolerance(G: np.ndarray) -> float:
    """Relative size below which a result computed from the product ``G`` is recomputed."""
    return _REFINE_REL[G.dtype]


def sq_euclidean(Pq: Prepared, Pc: Prepared) -> np.ndarray:
    """Squared L2 from one matrix product; near-duplicate pairs are recomputed from x - y."""
    Wq, nq = Pq
    Wc, nc = Pc
    G = gram(Wq, Wc)
    S = nq[:, None] + nc[None, :]
    D = S - 2.0 * G
    near = np.less_equal(D, S * refine_tolerance(G))
    np.maximum(D, 0.0, out=D)

    def exact(i: np.ndarray, j: np.ndarray) -> np.ndarray:
        diff = Wq[i].astype(np.float64) - Wc[j]
        return np.einsum("ij,ij->i", diff, diff)

    refine_near(D, near, exact, Wq.shape[1])
    return D


def _euclidean(Pq: Prepared, Pc: Prepared) -> np.ndarray:
    return np.sqrt(sq_euclidean(Pq, Pc))


def _unit_rows(X: np.ndarray, center: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit-length (optionally centred) rows, their squared norms and a "degenerate" mask.

    Rows are first divided by their largest magnitude so squaring can neither overflow nor
    underflow; degenerate rows (zero, or constant when centring) become all-zero.
    """
    # One float64 copy, worked on in place: every temporary of X's size costs a fresh allocation
    # and its page faults, which made this several times slower than its arithmetic.
    Y = np.array(X, dtype=np.float64)
    if Y.shape[1]:
        top, bottom = Y.max(axis=1), Y.min(axis=1)
        scale = np.maximum(top, -bottom)  # the largest magnitude, without an abs() copy
    else:
        top = bottom = scale = np.zeros(Y.shape[0])
    degenerate = scale == 0
    Y /= np.where(degenerate, 1.0, scale)[:, None]
    if center:
        degenerate |= top == bottom
        Y -= Y.mean(axis=1, keepdims=True)
        Y[degenerate] = 0.0
    norm = np.sqrt(np.einsum("ij,ij->i", Y, Y))
    Y /= np.where(degenerate, 1.0, norm)[:, None]
    W = np.ascontiguousarray(Y, dtype=np.float32 if np.asarray(X).dtype == np.float32 else None)
    return W, _row_sq_norms(W), degenerate


def _prepare_cosine(X: np.ndarray) -> Prepared:
    return _unit_rows(X, center=False)


def _prepare_correlation(X: np.ndarray) -> Prepared:
    return _unit_rows(X, center=True)


def _angular(Pq: Prepared, Pc: Prepared) -> np.ndarray:
    """``1 - u.v`` for unit rows, computed as ``||u - v||^2 / 2`` so identical rows give 0."""
    D = sq_euclidean(Pq[:2], Pc[:2])
    D *= 0.5
    np.minimum(D, 2.0, out=D)
    zq, zc = Pq[2], Pc[2]
    if zq.any():
        D[zq, :] = 1.0
    if zc.any():
        D[:, zc] = 1.0
        if zq.any():
            D[np.ix_(zq, zc)] = 0.0
    return D


def _prepare_f64(X: np.ndarray) -> np.ndarray:
    """float64 C-contiguous, converted once: SciPy's ``cdist`` would copy anything else per call."""
    return np.ascontiguousarray(X, dtype=np.float64)


def _prepare_canberra(X: np.ndarray) -> np.ndarray:
    # Canberra is invariant to a common scale; halving keeps |x| + |y| and |x - y| finite.
    return _prepare_f64(X) * 0.5


#: What a zero becomes in the rows FAISS's Canberra compares: a 0/0 term is then 0, as in the
#: metric, and a term of a zero against any ordinary value stays 1 (float32 keeps it normal).
CANBERRA_NUDGE = 1e-30


def _zeros_nudged(X: np.ndarray) -> np.ndarray:
    X = np.asarray(X, dtype=np.float64)
    return np.where(X == 0, CANBERRA_NUDGE, X)


def cdist_compare(kind: str, factor: float = 1.0) -> Callable[[Prepared, Prepared], np.ndarray]:
    """A ``compare`` running SciPy's C ``cdist`` on float64 prepared rows."""

    def compare(Pq: Prepared, Pc: Prepared) -> np.ndarray:
        D = cdist(Pq, Pc, kind)
        if factor != 1.0:
            D *= factor
        return D

    compare.__name__ = f"cdist_{kind}"
    return compare


# -- routes onto an index (see cbir.metrics.base.Route) ------------------------------------------
def squared_l2(scores: np.ndarray, _queries: np.ndarray) -> np.ndarray:
    """An index's squared L2, which rounding can push below 0."""
    return np.maximum(scores, 0.0)


def root_l2(scores: np.ndarray, _queries: np.ndarray) -> np.ndarray:
    """L2 from an index's squared L2."""
    return np.sqrt(np.maximum(scores, 0.0))


def as_reported(scores: np.ndarray, _queries: np.ndarray) -> np.ndarray:
    """The index's own distance is the metric's."""
    return scores


def one_minus(scores: np.ndarray, _queries: np.ndarray) -> np.ndarray:
    """``1 - u.v`` of unit rows, in [0, 2]."""
    return np.clip(1.0 - scores, 0.0, 2.0)


def unit_rows(X: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (float64); a zero row stays zero."""
    return np.asarray(_unit_rows(X, center=False)[0], dtype=np.float64)


def _centred_unit_rows(X: np.ndarray) -> np.ndarray:
    return np.asarray(_unit_rows(X, center=True)[0], dtype=np.float64)


register_metric(
    Metric(
        name="euclidean",
        summary="Straight-line (L2) distance; the default for dense feature vectors.",
        formula="sqrt(sum_i (x_i - y_i)^2)",
        prepare=prepare_sq_euclidean,
        compare=_euclidean,
        aliases=("l2",),
        route=Route("native", "l2", distance=root_l2),
    )
)
register_metric(
    Metric(
        name="sqeuclidean",
        summary="Squared L2 distance: same ranking as euclidean, no square root.",
        formula="sum_i (x_i - y_i)^2",
        prepare=prepare_sq_euclidean,
        compare=sq_euclidean,
        aliases=("squared_euclidean",),
        route=Route("native", "l2", distance=squared_l2),
    )
)
register_metric(
    Metric(
        name="manhattan",
        summary="Sum of absolute differences (L1); less dominated by single large differences.",
        formula="sum_i |x_i - y_i|",
        prepare=_prepare_f64,
        compare=cdist_compare("cityblock"),
        aliases=("cityblock", "l1"),
        route=Route("native", "l1", distance=as_reported),
    )
)
register_metric(
    Metric(
        name="chebyshev",
        summary="Largest absolute coordinate difference (L-infinity).",
        formula="max_i |x_i - y_i|",
        prepare=_prepare_f64,
        compare=cdist_compare("chebyshev"),
        aliases=("linf",),
        route=Route("native", "linf", distance=as_reported),
    )
)
register_metric(
    Metric(
        name="cosine",
        summary="One minus the cosine of the angle: ignores vector length. Zero vectors: 0 to "
        "each other, 1 to anything else.",
        formula="1 - x.y / (||x|| ||y||)",
        prepare=_prepare_cosine,
        compare=_angular,
        route=Route("embedded", "ip", embed=unit_rows, distance=one_minus),
    )
)
register_metric(
    Metric(
        name="correlation",
        summary="One minus Pearson correlation: ignores offset and scale. Constant vectors: 0 "
        "to each other, 1 to anything else.",
        formula="1 - (x - mean(x)).(y - mean(y)) / (||x - mean(x)|| ||y - mean(y)||)",
        prepare=_prepare_correlation,
        compare=_angular,
        aliases=("pearson",),
        route=Route("embedded", "ip", embed=_centred_unit_rows, distance=one_minus),
    )
)
register_metric(
    Metric(
        name="canberra",
        summary="Weighted L1 where each coordinate is scaled by its magnitude; sensitive near 0.",
        formula="sum_i |x_i - y_i| / (|x_i| + |y_i|), with 0/0 = 0",
        prepare=_prepare_canberra,
        compare=cdist_compare("canberra"),
        # FAISS's own Canberra, on rows whose zeros are nudged off zero (it gives NaN for 0/0
        # terms): the same ranking but where values are as tiny; the candidates are re-ranked
        route=Route("rerank", "canberra", embed=_zeros_nudged),
    )
)
