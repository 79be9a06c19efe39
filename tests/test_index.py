"""Exact search: blocked top-k equals a full sort, for every metric, in RAM and streamed."""

from __future__ import annotations

import numpy as np
import pytest

from cbir.index import ExactIndex
from cbir.metrics import get_metric, metric_names
from cbir.search import ranked_ids, rrf_fuse


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(7)
    X = rng.random((503, 24)).astype(np.float32)
    X[::50] = 0  # some empty histograms
    Q = rng.random((9, 24)).astype(np.float32)
    return np.arange(1000, 1503), X, Q


@pytest.mark.parametrize("metric", metric_names())
def test_blocked_topk_equals_full_sort(data, metric):
    ids, X, Q = data
    if get_metric(metric).binary:  # hash bits: 0/1 only
        X, Q = (X > 0.5).astype(np.float32), (Q > 0.5).astype(np.float32)
    full = get_metric(metric).pairwise(Q, X)
    index = ExactIndex(metric, block_rows=37).add_all(ids, X)
    d, i = index.search(Q, 11)
    assert d.shape == i.shape == (9, 11)
    np.testing.assert_allclose(d, np.sort(full, axis=1)[:, :11], rtol=1e-5, atol=1e-6)
    for row in range(len(Q)):  # the ids are the ones at those distances
        np.testing.assert_allclose(full[row, i[row] - 1000], d[row], rtol=1e-5, atol=1e-6)


def test_streamed_blocks_equal_in_memory(data):
    ids, X, Q = data

    def source():
        for lo in range(0, len(X), 100):
            yield ids[lo : lo + 100], X[lo : lo + 100]

    ram = ExactIndex("chi2", block_rows=64).add_all(ids, X).search(Q, 5)
    streamed = ExactIndex("chi2", block_rows=64).stream_from(source, X.shape[1]).search(Q, 5)
    np.testing.assert_array_equal(ram[1], streamed[1])
    np.testing.assert_allclose(ram[0], streamed[0])


def test_k_larger_than_the_collection_and_bad_k(data):
    ids, X, Q = data
    index = ExactIndex("euclidean").add_all(ids[:4], X[:4])
    _d, i = index.search(Q[:1], 10)
    assert i.shape == (1, 4) and sorted(i[0]) == list(ids[:4])
    with pytest.raises(ValueError, match="k must be a positive integer"):
        index.search(Q, 0)
    with pytest.raises(ValueError, match=r"24 dimensions, expected 3"):
        ExactIndex("euclidean").add_all(ids[:4], X[:4, :3]).search(Q, 2)


def test_exclude_and_min_reduction(data):
    ids, X, _Q = data
    index = ExactIndex("manhattan", block_rows=50).add_all(ids, X)
    _d, i = index.search(X[:1], 3, exclude=ids[:1])
    assert ids[0] not in i[0] and len(i[0]) == 3
    dm, im = index.search(X[:2], 4, reduce="min")
    assert dm.shape == (1, 4) and set(im[0][:2]) == {ids[0], ids[1]}
    full = get_metric("manhattan").pairwise(X[:2], X).min(axis=0)
    np.testing.assert_allclose(dm[0], np.sort(full)[:4], rtol=1e-5, atol=1e-6)


def test_rrf_fusion_by_hand():
    # query A ranks 1,2,3; query B ranks 3,1,4 -> 1: 1/61+1/62, 3: 1/63+1/61, 2: 1/62, 4: 1/63
    ids, scores = rrf_fuse(np.array([[1, 2, 3], [3, 1, 4]]), 4)
    assert ids.tolist() == [1, 3, 2, 4]
    assert scores[0] == pytest.approx(1 / 61 + 1 / 62)
    assert scores[3] == pytest.approx(1 / 63)


def test_mean_combination_searches_the_centroid(data):
    ids, X, Q = data
    index = ExactIndex("euclidean").add_all(ids, X)
    got, _ = ranked_ids(index, Q[:3], 5, combine="mean")
    _, want = index.search(Q[:3].mean(axis=0, keepdims=True), 5)
    assert got.tolist() == want[0].tolist()
