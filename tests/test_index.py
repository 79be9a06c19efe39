"""The index contract, run over every registered index kind, and ranking on top of it.

Each kind must give what exact search gives where it is exact, round-trip add / remove / save /
load, honour ``exclude``, and refuse wrong arguments with a clear error.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from cbir.errors import CorruptError, InvalidRequestError
from cbir.index import (
    MISSING,
    ExactIndex,
    create_index,
    index_class,
    index_kinds,
    load_index,
    scan,
)
from cbir.metrics import get_metric, metric_names
from cbir.search import merge_min, ranked_ids, rrf_fuse

KINDS = index_kinds()
#: Parameters that make a kind work in many small pieces, where it has such a parameter, so the
#: tests cross the boundaries between them.
SMALL_PIECES: dict[str, list[dict]] = {"exact": [{"block_rows": n} for n in (3, 7, 64, 37)]}
#: Parameters that make an approximate kind visit everything (search breadth, lists probed,
#: candidates re-ranked) on these small sets: then it must answer exactly as exact search does.
EXHAUSTIVE: dict[str, dict] = {
    "hnsw": {"ef_search": 1024},
    "hnsw-sq": {"ef_search": 1024, "rerank": 64},
    "ivf-flat": {"nprobe": 4096},
    "ivf-pq": {"nprobe": 4096, "rerank": 64},
    "sq8": {"rerank": 64},
    "faiss": {"rerank": 64},
    "flat": {"rerank": 64},
    "milvus": {"ef_search": 1024, "rerank": 64},
}
EXACT_KINDS = [k for k in KINDS if not index_class(k).approximate]


#: The milvus kind needs its extra (pymilvus, milvus-lite); without it its cases are skipped.
HAS_PYMILVUS = importlib.util.find_spec("pymilvus") is not None


@pytest.fixture(scope="module", autouse=True)
def milvus_lite(tmp_path_factory):
    """The milvus kind runs here on Milvus Lite, in a file of its own (tests/test_milvus.py
    runs it on a real server too)."""
    with pytest.MonkeyPatch.context() as patch:
        if HAS_PYMILVUS:
            patch.setenv("CBIR_MILVUS_URI", str(tmp_path_factory.mktemp("milvus") / "lite.db"))
        yield


@pytest.fixture(autouse=True)
def _skip_a_kind_without_its_extra(request):
    callspec = getattr(request.node, "callspec", None)
    if callspec and callspec.params.get("kind") == "milvus" and not HAS_PYMILVUS:
        pytest.skip("the milvus kind needs pymilvus: pip install 'cbir[milvus]'")


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(7)
    X = rng.random((503, 24)).astype(np.float32)
    X[::50] = 0  # some empty histograms
    Q = rng.random((9, 24)).astype(np.float32)
    return np.arange(1000, 1503), X, Q


def small_pieces(kind: str) -> list[dict]:
    return SMALL_PIECES.get(kind, [{}])


def make(kind: str, metric: str, ids: np.ndarray, X: np.ndarray, **params):
    params = {**EXHAUSTIVE.get(kind, {}), **params}
    index = create_index(kind, metric=metric, dim=X.shape[1], **params)
    index.add(ids, X)
    return index


def test_the_exact_kind_is_registered():
    assert "exact" in KINDS
    with pytest.raises(InvalidRequestError, match=r"unknown index kind 'nope'.*exact"):
        create_index("nope", metric="euclidean", dim=3)
    with pytest.raises(InvalidRequestError, match="dim must be a positive integer"):
        create_index("exact", metric="euclidean", dim=0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("metric", metric_names())
def test_results_equal_a_full_sort(kind, metric, data):
    ids, X, Q = data
    if get_metric(metric).binary:  # hash bits: 0/1 only
        X, Q = (X > 0.5).astype(np.float32), (Q > 0.5).astype(np.float32)
    full = get_metric(metric).pairwise(Q, X)
    index = make(kind, metric, ids, X, **small_pieces(kind)[-1])
    d, i = index.search(Q, 11)
    assert d.shape == i.shape == (9, 11)
    np.testing.assert_allclose(d, np.sort(full, axis=1)[:, :11], rtol=1e-5, atol=1e-6)
    for row in range(len(Q)):  # the ids are the ones at those distances
        np.testing.assert_allclose(full[row, i[row] - 1000], d[row], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", EXACT_KINDS)
def test_ties_are_broken_by_id_whatever_the_blocks(kind):
    X = np.zeros((40, 4), np.float32)  # every row at the same distance
    ids = np.arange(40)[::-1].copy()
    for params in small_pieces(kind):
        index = create_index(kind, metric="euclidean", dim=4, **params)
        index.add(ids, X)
        assert index.search(X[:1], 5)[1][0].tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("kind", KINDS)
def test_add_replaces_and_remove_drops(kind, data):
    ids, X, Q = data
    index = make(kind, "euclidean", ids[:100], X[:100])
    assert len(index) == 100
    # rewriting an id replaces its row: the query's own vector now sits at id 1005
    index.add(np.array([1005]), Q[:1])
    assert len(index) == 100
    d, i = index.search(Q[:1], 1)
    assert i[0, 0] == 1005 and d[0, 0] == pytest.approx(0, abs=1e-5)
    assert index.remove(np.array([1005, 1006, 99999])) == 2
    assert len(index) == 98
    assert not np.isin([1005, 1006], index.search(Q, 98)[1]).any()
    # what is left answers as a fresh index of the same rows would
    keep = ~np.isin(ids[:100], [1005, 1006])
    fresh = make(kind, "euclidean", ids[:100][keep], X[:100][keep])
    np.testing.assert_array_equal(index.search(Q, 10)[1], fresh.search(Q, 10)[1])
    assert index.remove(index.search(Q, 98)[1][0]) == 98 and len(index) == 0


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("metric", ["chi2", "cosine"])
def test_save_and_load_round_trip(kind, metric, data, tmp_path):
    ids, X, Q = data
    index = make(kind, metric, ids, X)
    index.save(tmp_path / "index.npz")
    back = load_index(tmp_path / "index.npz")
    assert back.kind == kind and back.metric.name == metric and back.dim == X.shape[1]
    assert len(back) == len(index)
    want, got = index.search(Q, 7), back.search(Q, 7)
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_allclose(got[0], want[0])
    back.add(np.array([5]), Q[:1])  # a loaded index can still be updated
    assert back.search(Q[:1], 1)[1][0, 0] == 5


def test_a_file_that_is_not_an_index_is_corrupt(tmp_path):
    (tmp_path / "junk.npz").write_bytes(b"not an index")
    with pytest.raises(CorruptError, match="not a saved cbir index"):
        load_index(tmp_path / "junk.npz")


@pytest.mark.parametrize("kind", KINDS)
def test_exclude_pads_rows_with_missing(kind, data):
    ids, X, Q = data
    index = make(kind, "manhattan", ids[:6], X[:6])
    d, i = index.search(Q[:2], 10, exclude=ids[:2])
    assert i.shape == (2, 6)  # k is cut to the index's size
    assert not np.isin(ids[:2], i).any()
    assert (i[:, 4:] == MISSING).all() and np.isinf(d[:, 4:]).all()
    assert set(i[0, :4]) == set(ids[2:6])


@pytest.mark.parametrize("kind", KINDS)
def test_empty_index_and_k_beyond_its_size(kind, data):
    ids, X, Q = data
    empty = create_index(kind, metric="euclidean", dim=24, **EXHAUSTIVE.get(kind, {}))
    assert len(empty) == 0
    d, i = empty.search(Q, 5)
    assert d.shape == i.shape == (9, 0)
    small = make(kind, "euclidean", ids[:4], X[:4])
    _d, i = small.search(Q[:1], 10)
    assert i.shape == (1, 4) and sorted(i[0]) == list(ids[:4])


@pytest.mark.parametrize("kind", KINDS)
def test_wrong_arguments_say_what_is_wrong(kind, data):
    ids, X, Q = data
    index = make(kind, "euclidean", ids[:4], X[:4])
    with pytest.raises(InvalidRequestError, match="k must be a positive integer"):
        index.search(Q, 0)
    with pytest.raises(InvalidRequestError, match=r"3 dimensions, expected 24"):
        index.search(Q[:, :3], 2)
    with pytest.raises(InvalidRequestError, match=r"3 dimensions, expected 24"):
        index.add(ids[:2], X[:2, :3])
    with pytest.raises(InvalidRequestError, match="2 ids for 3 vectors"):
        index.add(ids[:2], X[:3])
    with pytest.raises(InvalidRequestError, match="unique"):
        index.add(np.array([1, 1]), X[:2])
    with pytest.raises(InvalidRequestError, match="NaN"):
        index.add(np.array([1]), np.full((1, 24), np.nan))


def test_scan_over_streamed_blocks_equals_the_index(data):
    ids, X, Q = data
    metric = get_metric("chi2")
    blocks = ((ids[lo : lo + 100], metric.prepare(X[lo : lo + 100])) for lo in range(0, 503, 100))
    streamed = scan(metric, Q, blocks, 5)
    ram = make("exact", "chi2", ids, X, block_rows=64).search(Q, 5)
    np.testing.assert_array_equal(ram[1], streamed[1])
    np.testing.assert_allclose(ram[0], streamed[0])


def test_min_combination_equals_the_minimum_over_queries(data):
    """Merging each query's top k is exact: the same as the minimum distance to any query."""
    ids, X, _Q = data
    index = make("exact", "manhattan", ids, X, block_rows=50)
    queries = X[[3, 200, 401]] + 0.01
    got_ids, got_d = ranked_ids(index, queries, 12, combine="min")
    full = get_metric("manhattan").pairwise(queries, X).min(axis=0)
    order = np.lexsort((ids, full))[:12]
    assert got_ids.tolist() == ids[order].tolist()
    np.testing.assert_allclose(got_d, full[order], rtol=1e-5, atol=1e-6)
    # merge_min keeps one entry per id, its smallest distance
    d = np.array([[0.1, 0.5], [0.2, 0.3]])
    i = np.array([[7, 8], [8, MISSING]])
    assert merge_min(d, i, 5)[0].tolist() == [7, 8]
    assert merge_min(d, i, 5)[1].tolist() == [0.1, 0.2]


def test_rrf_fusion_by_hand():
    # query A ranks 1,2,3; query B ranks 3,1,4 -> 1: 1/61+1/62, 3: 1/63+1/61, 2: 1/62, 4: 1/63
    ids, scores = rrf_fuse(np.array([[1, 2, 3], [3, 1, 4]]), 4)
    assert ids.tolist() == [1, 3, 2, 4]
    assert scores[0] == pytest.approx(1 / 61 + 1 / 62)
    assert scores[3] == pytest.approx(1 / 63)
    # a MISSING slot counts for nothing
    ids, _ = rrf_fuse(np.array([[1, MISSING], [2, 1]]), 4)
    assert ids.tolist() == [1, 2]


def test_mean_combination_searches_the_centroid(data):
    ids, X, Q = data
    index = ExactIndex("euclidean", dim=24)
    index.add(ids, X)
    got, _ = ranked_ids(index, Q[:3], 5, combine="mean")
    _, want = index.search(Q[:3].mean(axis=0, keepdims=True), 5)
    assert got.tolist() == want[0].tolist()


def test_searches_while_another_thread_updates(data):
    """Updates swap whole arrays, so a search never sees half an update."""
    import threading

    ids, X, Q = data
    index = make("exact", "euclidean", ids, X)
    stop = threading.Event()
    failures: list[BaseException] = []

    def searcher():
        while not stop.is_set():
            try:
                d, i = index.search(Q, 5)
                assert (i != MISSING).all() and np.isfinite(d).all()
            except BaseException as exc:  # pragma: no cover - reported below
                failures.append(exc)
                return

    threads = [threading.Thread(target=searcher) for _ in range(3)]
    for t in threads:
        t.start()
    for n in range(200):
        index.remove(ids[n % 50 : n % 50 + 1])
        index.add(ids[n % 50 : n % 50 + 1], X[n % 50 : n % 50 + 1])
    stop.set()
    for t in threads:
        t.join()
    assert not failures and len(index) == len(ids)
