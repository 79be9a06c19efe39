"""Distance metrics: the contract all metrics keep; agreement with SciPy and worked cases."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.distance import cdist, jensenshannon
from scipy.stats import entropy, wasserstein_distance

from cbir.metrics import describe_metrics, get_metric, metric_names, pairwise_distances, take_rows
from cbir.metrics.distribution import KL_EPS

EXPECTED = {
    "euclidean", "sqeuclidean", "manhattan", "chebyshev", "cosine", "correlation", "canberra",
    "chi2", "kl", "jeffrey", "js", "bhattacharyya", "hellinger", "intersection", "emd", "cramer",
    "ks",
}  # fmt: skip
ALL = metric_names()
VECTOR = [n for n in ALL if not get_metric(n).nonnegative and not get_metric(n).binary]
HIST = [n for n in ALL if get_metric(n).nonnegative]
DTYPES = [np.float32, np.float64]
SCIPY_NAMES = {
    "euclidean": "euclidean", "sqeuclidean": "sqeuclidean", "manhattan": "cityblock",
    "chebyshev": "chebyshev", "cosine": "cosine", "correlation": "correlation",
    "canberra": "canberra",
}  # fmt: skip


def sample(name: str, rows: int, dim: int = 12, seed: int = 0) -> np.ndarray:
    """Typical input with the awkward rows users hit: an all-zero row, a constant row, and (for
    histograms) many empty bins; signed values for metrics that accept any vectors."""
    rng = np.random.default_rng(seed)
    if get_metric(name).binary:  # hash bits: 0/1 only
        X = (rng.random((rows, dim)) < 0.5).astype(np.float64)
        X[0], X[1] = 0.0, 1.0
        return X
    if get_metric(name).nonnegative:
        X = rng.random((rows, dim)) * 10
        X[X < 3] = 0.0  # empty bins
    else:
        X = rng.standard_normal((rows, dim)) * 3
    X[0] = 0.0
    X[1] = 2.5
    return X


def normalised(X: np.ndarray) -> np.ndarray:
    P = np.asarray(X, dtype=np.float64).copy()
    P[P.sum(axis=1) == 0] = 1.0
    return P / P.sum(axis=1, keepdims=True)


def smoothed(P: np.ndarray) -> np.ndarray:
    return (P + KL_EPS) / (1 + P.shape[1] * KL_EPS)


def tol(name: str, dtype: type) -> float:
    """Absolute tolerance relative to the scale of the metric's values on ``sample`` data."""
    scale = {"sqeuclidean": 1e3, "euclidean": 30, "manhattan": 100, "chebyshev": 10}.get(name, 10)
    return scale * (1e-5 if dtype is np.float32 else 1e-12)


# ---- the contract ----------------------------------------------------------------------------


def test_builtin_names_are_registered_and_described() -> None:
    info = {m["name"]: m for m in describe_metrics()}
    assert set(info) >= EXPECTED
    for m in info.values():
        assert m["description"].strip() and m["formula"].strip()
    assert info["kl"]["symmetric"] is False
    assert all(info[n]["symmetric"] for n in EXPECTED - {"kl"})


@pytest.mark.parametrize(
    ("alias", "name"),
    [("l2", "euclidean"), ("cityblock", "manhattan"), ("l1", "manhattan"), ("linf", "chebyshev")],
)
def test_aliases(alias: str, name: str) -> None:
    assert get_metric(alias) is get_metric(name)


def test_unknown_metric_lists_registered_ones() -> None:
    with pytest.raises(ValueError, match="unknown metric 'nope'") as err:
        get_metric("nope")
    for name in ("euclidean", "chi2", "emd"):
        assert name in str(err.value)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ALL)
def test_identity(name: str, dtype: type) -> None:
    X = sample(name, 10).astype(dtype)
    D = get_metric(name).pairwise(X)
    assert np.abs(np.diag(D)).max() <= tol(name, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ALL)
def test_shape_dtype_finite_nonnegative(name: str, dtype: type) -> None:
    X, Y = sample(name, 5, seed=1).astype(dtype), sample(name, 7, seed=2).astype(dtype)
    D = get_metric(name).pairwise(X, Y)
    assert D.shape == (5, 7)
    assert D.dtype == np.float64
    assert np.isfinite(D).all()
    assert (D >= 0).all()
    # Distinct rows are told apart.
    assert (D[2:, 2:] > 0).all()


@pytest.mark.parametrize("name", [n for n in ALL if get_metric(n).symmetric])
def test_symmetry(name: str) -> None:
    X, Y = sample(name, 6, seed=1), sample(name, 8, seed=2)
    metric = get_metric(name)
    np.testing.assert_allclose(metric(X, Y), metric(Y, X).T, rtol=1e-9, atol=1e-12)


def test_kl_is_asymmetric_with_the_query_first() -> None:
    p, q = np.array([[0.9, 0.1]]), np.array([[0.5, 0.5]])
    kl = get_metric("kl")
    assert not kl.symmetric
    assert kl(p, q)[0, 0] == pytest.approx(entropy(smoothed(p)[0], smoothed(q)[0]))
    assert kl(p, q)[0, 0] != pytest.approx(kl(q, p)[0, 0])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", [n for n in ALL if not get_metric(n).binary])
def test_zero_rows_and_empty_bins_stay_finite(name: str, dtype: type) -> None:
    Z = np.zeros((3, 9), dtype=dtype)
    sparse = np.zeros((3, 9), dtype=dtype)
    sparse[0, 0] = 1.0  # one full bin
    sparse[1, 8] = 5.0  # disjoint from row 0
    sparse[2, 4] = 1e-30  # tiny mass
    D = get_metric(name).pairwise(np.vstack([Z, sparse]), np.vstack([sparse, Z]))
    assert np.isfinite(D).all()
    assert (D >= 0).all()
    # Zero rows are identical to each other.
    assert get_metric(name).pairwise(Z)[0, 1] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("name", VECTOR)
def test_large_float32_values_do_not_overflow(name: str) -> None:
    X = np.array([[3e30, -1e30, 2e30], [1e30, 1e30, -3e30]], dtype=np.float32)
    D = get_metric(name).pairwise(X)
    assert np.isfinite(D).all()
    assert D[0, 1] > 0
    expected = cdist(X.astype(np.float64), X.astype(np.float64), SCIPY_NAMES[name])
    np.testing.assert_allclose(D, expected, rtol=1e-5)


@pytest.mark.parametrize("name", ALL)
def test_float32_agrees_with_float64(name: str) -> None:
    X, Y = sample(name, 6, seed=3), sample(name, 9, seed=4)
    metric = get_metric(name)
    X32, Y32 = X.astype(np.float32), Y.astype(np.float32)
    D64 = metric(X32.astype(np.float64), Y32.astype(np.float64))
    np.testing.assert_allclose(metric(X32, Y32), D64, rtol=1e-4, atol=tol(name, np.float32))
    # Mixed precision: a float64 query against a float32 collection.
    np.testing.assert_allclose(
        metric.compare(metric.prepare(X), metric.prepare(Y32)), D64, rtol=1e-4, atol=1e-4
    )


@pytest.mark.parametrize("name", ALL)
def test_pairwise_with_itself(name: str) -> None:
    X = sample(name, 7)
    metric = get_metric(name)
    # pairwise(X) and pairwise(X, X) may take two BLAS paths, which differ in the last bits
    # under some OpenBLAS kernels: equal to rounding, not bit for bit
    np.testing.assert_allclose(metric.pairwise(X), metric.pairwise(X, X), rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(pairwise_distances(X, metric=name), metric.pairwise(X))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ALL)
def test_blocks_of_prepared_rows_match_full_result(name: str, dtype: type) -> None:
    metric = get_metric(name)
    X, Y = sample(name, 9, seed=5).astype(dtype), sample(name, 23, seed=6).astype(dtype)
    PX, PY = metric.prepare(X), metric.prepare(Y)
    full = metric.compare(PX, PY)
    blocks = np.vstack([
        np.hstack([
            metric.compare(take_rows(PX, slice(i, i + 4)), take_rows(PY, slice(j, j + 10)))
            for j in range(0, 23, 10)
        ])
        for i in range(0, 9, 4)
    ])  # fmt: skip
    np.testing.assert_allclose(blocks, full, rtol=1e-6, atol=tol(name, dtype))
    picked = np.array([22, 0, 5])
    np.testing.assert_allclose(
        metric.compare(PX, take_rows(PY, picked)), full[:, picked], rtol=1e-6, atol=tol(name, dtype)
    )


# ---- agreement with SciPy --------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SCIPY_NAMES))
def test_vector_metrics_match_scipy_cdist(name: str) -> None:
    rng = np.random.default_rng(7)
    X, Y = rng.standard_normal((6, 11)), rng.standard_normal((8, 11))
    X[0, :4] = 0.0  # zeros in both: canberra's 0/0 terms
    Y[0, :4] = 0.0
    Y[3] = X[2]  # an exact duplicate
    Y[4] = X[3] + 1e-4  # a near duplicate, where x.x + y.y - 2x.y cancels
    expected = cdist(X, Y, SCIPY_NAMES[name])
    np.testing.assert_allclose(get_metric(name)(X, Y), expected, rtol=1e-7, atol=1e-12)


def test_near_duplicates_are_accurate_in_float32() -> None:
    rng = np.random.default_rng(8)
    x = rng.random(405).astype(np.float32) * 100
    y = x.copy()
    y[::50] += np.float32(1e-3)
    exact = np.sqrt(((x.astype(np.float64) - y) ** 2).sum())
    assert get_metric("euclidean")(x, y)[0, 0] == pytest.approx(exact, rel=1e-6)
    assert get_metric("euclidean")(x, x)[0, 0] == 0.0


def test_cosine_and_correlation_degenerate_vectors() -> None:
    zero, const, v, w = [0.0, 0.0, 0.0], [2.0, 2.0, 2.0], [1.0, 2.0, 3.0], [3.0, 1.0, 2.0]
    cos = get_metric("cosine")([zero, v], [zero, v, w])
    np.testing.assert_allclose(cos[:, :2], [[0.0, 1.0], [1.0, 0.0]], atol=1e-12)
    corr = get_metric("correlation")([zero, const, v], [const, v, w])
    np.testing.assert_allclose(corr[:, :2], [[0.0, 1.0], [0.0, 1.0], [1.0, 0.0]], atol=1e-12)
    assert corr[2, 2] == pytest.approx(1.5)  # r = -0.5 for v, w


def hist_pair(seed: int = 9) -> tuple[np.ndarray, np.ndarray]:
    X, Y = sample("chi2", 6, dim=10, seed=seed), sample("chi2", 5, dim=10, seed=seed + 1)
    return X, Y


def test_js_matches_scipy() -> None:
    X, Y = hist_pair()
    P, Q = normalised(X), normalised(Y)
    expected = np.array([[jensenshannon(p, q) for q in Q] for p in P])
    np.testing.assert_allclose(get_metric("js")(X, Y), expected, rtol=1e-7, atol=1e-7)


def test_kl_matches_scipy_entropy_of_smoothed_rows() -> None:
    X, Y = hist_pair()
    P, Q = smoothed(normalised(X)), smoothed(normalised(Y))
    expected = np.array([[entropy(p, q) for q in Q] for p in P])
    np.testing.assert_allclose(get_metric("kl")(X, Y), expected, rtol=1e-9, atol=1e-12)


def test_emd_matches_scipy_wasserstein() -> None:
    X, Y = hist_pair()
    P, Q = normalised(X), normalised(Y)
    bins = np.arange(X.shape[1])
    expected = np.array([[wasserstein_distance(bins, bins, p, q) for q in Q] for p in P])
    np.testing.assert_allclose(get_metric("emd")(X, Y), expected, rtol=1e-9, atol=1e-12)


def test_ks_matches_cumulative_gap() -> None:
    X, Y = hist_pair()
    F, G = np.cumsum(normalised(X), axis=1), np.cumsum(normalised(Y), axis=1)
    expected = np.abs(F[:, None, :] - G[None, :, :]).max(axis=2)
    np.testing.assert_allclose(get_metric("ks")(X, Y), expected, rtol=1e-9, atol=1e-12)


# ---- hand-computed cases ---------------------------------------------------------------------

HALF = [1.0, 1.0]  # normalised to (1/2, 1/2)
LEFT = [3.0, 0.0]  # (1, 0)
RIGHT = [0.0, 7.0]  # (0, 1)


@pytest.mark.parametrize(
    ("name", "x", "y", "expected"),
    [
        # 1/2 sum (p - q)^2 / (p + q)
        ("chi2", HALF, LEFT, 0.5 * (0.25 / 1.5 + 0.25 / 0.5)),
        ("chi2", LEFT, RIGHT, 1.0),
        # -ln sum sqrt(p q)
        ("bhattacharyya", HALF, LEFT, -np.log(np.sqrt(0.5))),
        ("bhattacharyya", LEFT, RIGHT, -np.log(1e-12)),
        # sqrt(1 - BC)
        ("hellinger", HALF, LEFT, np.sqrt(1 - np.sqrt(0.5))),
        ("hellinger", LEFT, RIGHT, 1.0),
        # 1 - sum min(p, q)
        ("intersection", HALF, LEFT, 0.5),
        ("intersection", [2.0, 3.0, 5.0], [5.0, 3.0, 2.0], 0.3),
        ("intersection", [0.0, 0.0], HALF, 0.0),  # an empty histogram is uniform
        # (p - q)(ln p - ln q) summed: (1/4 - 1/2) ln(1/2) + (3/4 - 1/2) ln(3/2) = ln(3) / 4
        ("jeffrey", [1.0, 3.0], HALF, np.log(3) / 4),
        # cumulative (1, 1, 1) vs (0, 0, 1)
        ("cramer", [1.0, 0.0, 0.0], [0.0, 0.0, 1.0], np.sqrt(2)),
        ("cramer", [1.0, 1.0, 0.0], [0.0, 1.0, 1.0], np.sqrt(0.5)),
        ("emd", [1.0, 0.0, 0.0], [0.0, 0.0, 1.0], 2.0),
        ("ks", [1.0, 0.0, 0.0], [0.0, 0.0, 1.0], 1.0),
        ("js", LEFT, RIGHT, np.sqrt(np.log(2))),
    ],
)
def test_hand_computed(name: str, x: list[float], y: list[float], expected: float) -> None:
    assert get_metric(name)(x, y)[0, 0] == pytest.approx(expected, rel=1e-5, abs=1e-9)


def test_jeffrey_smoothing_keeps_disjoint_histograms_finite() -> None:
    d = 2
    p1 = (1 + KL_EPS) / (1 + d * KL_EPS)  # smoothed mass of the full bin
    p0 = KL_EPS / (1 + d * KL_EPS)  # smoothed mass of the empty bin
    expected = 2 * (p1 - p0) * np.log(p1 / p0)
    assert get_metric("jeffrey")(LEFT, RIGHT)[0, 0] == pytest.approx(expected, rel=1e-9)


# ---- input validation --------------------------------------------------------------------------


@pytest.mark.parametrize("name", HIST)
def test_negative_input_to_histogram_metric_is_rejected(name: str) -> None:
    X = np.array([[0.2, -0.5, 1.0]])
    with pytest.raises(ValueError, match="non-negative") as err:
        get_metric(name).pairwise(X)
    message = str(err.value)
    assert repr(name) in message
    assert "-0.5" in message
    assert "euclidean" in message and "cosine" in message


def test_js_keeps_its_precision_for_nearly_identical_histograms() -> None:
    """The entropy-difference formula cancels when p ~ q (the pairs ranked first); those pairs
    are summed from their terms, as SciPy's jensenshannon does, so both agree closely."""
    from scipy.spatial.distance import jensenshannon

    rng = np.random.default_rng(1)
    P = rng.random((6, 64))
    P /= P.sum(axis=1, keepdims=True)
    Q = P * (1 + 1e-4 * rng.standard_normal(P.shape))
    Q /= Q.sum(axis=1, keepdims=True)
    got = np.diag(get_metric("js").pairwise(P, Q))
    want = np.array([jensenshannon(p, q) for p, q in zip(P, Q, strict=True)])
    np.testing.assert_allclose(got, want, rtol=1e-7)
