"""Approximate indexes behind a collection: every metric's route, ``auto``, saved indexes kept in
step with the change feed, and per-query settings.

The index contract itself (exact answers with exhaustive settings, updates, save / load) runs
over every kind in ``tests/test_index.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cbir import Collection
from cbir.config import Settings
from cbir.errors import InvalidRequestError
from cbir.index import SearchParams, create_index
from cbir.index.manager import choose_kind
from cbir.metrics import get_metric, metric_names
from cbir.store import ImageUpdate
from tests.conftest import write_colour_set

SPACE_DISTANCES = {
    "l2": lambda Q, X: ((Q[:, None, :] - X[None]) ** 2).sum(-1),
    "ip": lambda Q, X: Q @ X.T,
    "l1": lambda Q, X: np.abs(Q[:, None, :] - X[None]).sum(-1),
    "linf": lambda Q, X: np.abs(Q[:, None, :] - X[None]).max(-1),
    "canberra": lambda Q, X: (
        np.abs(Q[:, None, :] - X[None]) / (np.abs(Q[:, None, :]) + np.abs(X[None]))
    ).sum(-1),
}


@pytest.fixture(scope="module")
def histograms():
    """Clustered histograms with empty bins (and one empty histogram), as colour descriptors."""
    rng = np.random.default_rng(3)
    centres = rng.dirichlet(np.full(32, 0.3), size=12)
    X = np.vstack([rng.dirichlet(c * 150 + 0.01, size=60) for c in centres])
    X[X < 0.005] = 0
    X[7] = 0
    Q = np.vstack([rng.dirichlet(c * 150 + 0.01, size=2) for c in centres])
    return X, Q


@pytest.mark.parametrize("metric", metric_names())
def test_every_route_embedding_gives_the_metric_or_only_candidates(metric, histograms):
    """A native or embedded route must give back the metric's distances from the index's own
    scores: then the index ranks exactly as the metric does."""
    X, Q = histograms
    m = get_metric(metric)
    if m.binary:
        X, Q = (X > 0.03).astype(float), (Q > 0.03).astype(float)
    route = m.route
    scores = SPACE_DISTANCES[route.space](route.queries(Q), route.embed(X))
    if route.kind == "rerank":
        assert route.distance is None
        return
    np.testing.assert_allclose(route.distance(scores, Q), m.pairwise(Q, X), atol=1e-9)


@pytest.mark.parametrize("metric", ["kl", "jeffrey", "chi2", "js", "intersection", "canberra"])
def test_hnsw_finds_the_true_neighbours_of_hard_metrics(metric, histograms):
    """The candidate and inner-product routes on a graph: recall@10 against exact search."""
    X, Q = histograms
    ids = np.arange(len(X))
    exact = create_index("exact", metric=metric, dim=X.shape[1])
    exact.add(ids, X)
    hnsw = create_index("hnsw", metric=metric, dim=X.shape[1])
    hnsw.add(ids, X)
    _, want = exact.search(Q, 10)
    D, got = hnsw.search(Q, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(want, got, strict=True)])
    assert recall >= 0.95
    full = get_metric(metric).pairwise(Q, X)  # the scores are the metric's own
    np.testing.assert_allclose(D, np.take_along_axis(full, got, axis=1), rtol=1e-5, atol=1e-6)


def _labelled_clusters(n: int, dim: int, seed: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """``n`` rows around 50 centres, and each row's centre."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(50, dim))
    cluster = rng.integers(0, 50, n)
    return (centres[cluster] + rng.normal(0, 0.4, (n, dim))).astype(np.float32), cluster


@pytest.mark.parametrize("kind", ["hnsw", "ivf-flat"])
def test_an_index_searched_with_most_rows_excluded_still_finds_k(kind):
    """Excluded rows scattered over the space (nine in ten): the search widens by as much, so
    it still returns k of the rows left, nearly all of them the exact ones."""
    X, _ = _labelled_clusters(20_000, 32)
    ids = np.arange(1, len(X) + 1)
    left_out = ids[ids % 10 != 0]
    Q, _ = _labelled_clusters(40, 32, seed=6)
    exact = create_index("exact", metric="euclidean", dim=32)
    index = create_index(kind, metric="euclidean", dim=32)
    for i in (exact, index):
        i.add(ids, X)
    _, truth = exact.search(Q, 10, exclude=left_out)
    _, found = index.search(Q, 10, exclude=left_out)
    assert (found != -1).all() and not np.isin(found, left_out).any()
    recall = np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth, strict=True)])
    assert recall >= 0.95


def test_a_label_filter_away_from_the_query_is_answered_exactly(tmp_path):
    """A search for one label from an image of another (cats from a plane) in a collection
    past the threshold: the images kept lie away from the query, where a graph search finds
    too few; a filter that keeps few images is searched exactly, so the answer is exact
    search's, k images long."""
    X, cluster = _labelled_clusters(8_000, 256)
    col_dir = tmp_path / "col"
    settings = Settings(collection=col_dir, index="hnsw", auto_threshold=100)
    spec = "color-hist:space=hsv,bins=16x4x4"  # 256 values: the vectors are filed under it
    with Collection(col_dir, settings=settings, create=True) as col:
        col.store.add_descriptor(spec, "color-hist", {}, 256, "euclidean")
        col.store.acquire()
        col.store.write_batch(
            [
                ImageUpdate(f"/x/{n}.png", 1, 1, None, "ok", label=f"c{c % 10}", vectors={spec: x})
                for n, (x, c) in enumerate(zip(X, cluster, strict=True))
            ]
        )
        col.store.release()
        queries = X[cluster % 10 == 3][:20]  # images of label c3, searched among c0
        for q in queries:
            got = col.search(q, 10, metric="euclidean", label="c0")
            want = col.search(q, 10, metric="euclidean", label="c0", exact=True)
            assert [h.id for h in got] == [h.id for h in want] and len(got) == 10
            assert {h.label for h in got} == {"c0"}
        assert col.search(queries[0], 10, metric="euclidean").indexes == ("hnsw",)


def test_canberra_candidates_come_in_the_metric_s_own_order(histograms):
    """FAISS's Canberra over rows with their zeros nudged off zero ranks as the metric does
    (0/0 terms count 0, not NaN), so its candidates need no wide net: one per result."""
    X, Q = histograms
    index = create_index("flat", metric="canberra", dim=X.shape[1], rerank=1)
    assert index.route.space == "canberra"
    index.add(np.arange(len(X)), X)
    D, ids = index.search(Q, 10)
    full = get_metric("canberra").pairwise(Q, X)
    np.testing.assert_allclose(D, np.sort(full, axis=1)[:, :10], atol=1e-9)
    np.testing.assert_allclose(D, np.take_along_axis(full, ids, axis=1), atol=1e-9)


def test_a_lossy_index_routes_l1_metrics_through_their_fallback(histograms):
    X, Q = histograms
    index = create_index("ivf-pq", metric="intersection", dim=X.shape[1], nprobe=64, rerank=50)
    assert index.route.space == "l2" and index.needs_rerank  # PQ has no L1: Hellinger's route
    index.add(np.arange(len(X)), X)
    D, ids = index.search(Q, 5)
    full = get_metric("intersection").pairwise(Q, X)
    np.testing.assert_allclose(D, np.take_along_axis(full, ids, axis=1), atol=1e-9)
    np.testing.assert_allclose(D, np.sort(full, axis=1)[:, :5], atol=1e-9)


def test_auto_is_exact_below_its_threshold_and_compact_past_the_memory_budget():
    s = Settings(index="auto", auto_threshold=1000, memory_budget=1 << 20)
    assert choose_kind(s, 999, 64) == "exact"
    assert choose_kind(s, 1000, 64) == "hnsw"  # 1000 x 64 floats, twice, fit in 1 MiB
    assert choose_kind(s, 10_000, 64) == "ivf-pq"
    assert choose_kind(Settings(index="sq8"), 5, 64) == "sq8"
    with pytest.raises(InvalidRequestError, match=r"unknown index 'nope'; choose auto or.*hnsw"):
        choose_kind(Settings(index="nope"), 5, 64)


def test_search_settings_are_checked():
    with pytest.raises(InvalidRequestError, match="ef must be a positive integer"):
        SearchParams(ef=0)
    with pytest.raises(InvalidRequestError, match="rerank must be a positive integer"):
        SearchParams(rerank=-3)


@pytest.fixture
def colours(tmp_path):
    root = tmp_path / "images"
    write_colour_set(root, per_class=12)
    return root


def _settings(tmp_path, **kw) -> Settings:
    return Settings(collection=tmp_path / "col", workers=1, index="auto", auto_threshold=10, **kw)


@pytest.mark.parametrize("metric", ["chi2", "kl", "euclidean", "intersection", "hellinger"])
def test_a_collection_past_the_threshold_answers_as_exact_search(tmp_path, colours, metric):
    with Collection(tmp_path / "col", settings=_settings(tmp_path), create=True) as col:
        col.add(colours, descriptors=["color-hist"], labels="folder")
        query = sorted((colours / "red").iterdir())[0]
        fast = col.search(query, k=10, metric=metric)
        exact = col.search(query, k=10, metric=metric, exact=True)
        assert fast.indexes == ("hnsw",) and exact.indexes == ("exact",)
        assert [h.id for h in fast] == [h.id for h in exact]
        np.testing.assert_allclose(
            [h.score for h in fast], [h.score for h in exact], rtol=1e-5, atol=1e-6
        )
        assert col.search(query, k=3, metric=metric, ef=8, rerank=2).hits  # per query


def test_the_index_is_saved_reloaded_and_kept_in_step(tmp_path, colours, monkeypatch):
    from cbir.index.manager import IndexManager

    settings = _settings(tmp_path)
    with Collection(tmp_path / "col", settings=settings, create=True) as col:
        col.add(colours / "red", descriptors=["color-hist"], labels="folder")
        col.add(colours / "blue", labels="folder")
        query = sorted((colours / "red").iterdir())[0]
        col.search(query, k=3)
    saved = sorted(p.name for p in (tmp_path / "col" / "indexes").iterdir())
    assert saved == ["1-hellinger-hnsw.json", "1-hellinger-hnsw.npz"]  # color-hist's metric

    def no_build(*args, **kwargs):
        raise AssertionError("the saved index should have been used")

    with Collection(tmp_path / "col", settings=settings) as reader:
        monkeypatch.setattr(IndexManager, "_build_approximate", no_build)
        assert len(reader.search(query, k=50)) == 24
        with Collection(tmp_path / "col", settings=settings) as writer:  # another process
            writer.add(colours / "green", labels="folder")
        # the reader catches its index up through the change feed, without a rebuild
        result = reader.search(sorted((colours / "green").iterdir())[0], k=12)
        assert {Path(h.path).parent.name for h in result} == {"green"}
        monkeypatch.undo()


def test_a_corrupt_saved_index_is_rebuilt(tmp_path, colours):
    settings = _settings(tmp_path)
    with Collection(tmp_path / "col", settings=settings, create=True) as col:
        col.add(colours, descriptors=["color-hist"], labels="folder")
        query = sorted((colours / "red").iterdir())[0]
        want = [h.id for h in col.search(query, k=5)]
    index_file = tmp_path / "col" / "indexes" / "1-hellinger-hnsw.npz"
    index_file.write_bytes(b"not an index")
    with Collection(tmp_path / "col", settings=settings) as col:
        assert [h.id for h in col.search(query, k=5)] == want
    assert index_file.stat().st_size > 1000  # written again


def test_evaluation_ranks_through_the_index_search_would_use(tmp_path):
    """`cbir evaluate --index ...` measures the index users search with: with an approximate
    kind forced past a low threshold, MAP stays that of exact search on a set this small."""
    from cbir.evaluation import GridConfig, load_labelled, run_grid

    write_colour_set(tmp_path / "set", per_class=10, seed=4)
    config = GridConfig(descriptors=["color-hist"], metrics=["chi2", "euclidean"])
    maps = {}
    for kind in ("exact", "hnsw", "ivf-pq"):
        settings = Settings(workers=1, index="auto" if kind == "hnsw" else kind, auto_threshold=5)
        result = run_grid(load_labelled(tmp_path / "set"), None, config, settings=settings)
        maps[kind] = [c.summary["MAP"] for c in result.combinations]
    assert maps["hnsw"] == pytest.approx(maps["exact"], abs=0.005)
    assert maps["ivf-pq"] == pytest.approx(maps["exact"], abs=0.005)


def test_cbir_index_builds_the_index_it_is_told_to_with_its_parameters(tmp_path, colours):
    """`cbir index --index hnsw --index-param M=8` leaves a saved HNSW index that the next
    search uses as it is; a malformed parameter is refused before any work."""
    from typer.testing import CliRunner

    from cbir.cli import app

    runner = CliRunner()
    env = {"CBIR_WORKERS": "1", "CBIR_COLLECTION": str(tmp_path / "col")}
    args = ["index", str(colours), "-d", "color-hist", "--index", "hnsw", "--index-param", "M=8"]
    result = runner.invoke(app, [*args, "--json"], env=env)
    assert result.exit_code == 0, result.output
    built = json.loads(result.output)["indexes"]
    assert built == [
        {"descriptor": "color-hist", "metric": "hellinger", "kind": "hnsw", "vectors": 48}
    ]
    record = json.loads((tmp_path / "col" / "indexes" / "1-hellinger-hnsw.json").read_text())
    assert record["params"] == {"M": 8}
    (saved,) = json.loads(runner.invoke(app, ["info", "--json"], env=env).output)["indexes"]
    assert saved["kind"] == "hnsw" and saved["vectors"] == 48 and saved["current"]
    # the vectors (288 float32 values) and the graph's links (2M on the base level), no more
    # than a few hundred bytes of FAISS's own headers over 48 images
    vector_bytes, link_bytes = 288 * 4, 2 * 8 * 4
    assert vector_bytes < saved["ram_bytes_per_image"] < vector_bytes + 2 * link_bytes + 200
    assert not saved["reranks_from_segments"]
    assert "saved indexes" in runner.invoke(app, ["info"], env=env).output
    bad = runner.invoke(app, ["index", str(colours), "--index-param", "M"], env=env)
    assert bad.exit_code == 2 and "KEY=VALUE" in bad.output
    # a parameter the kind does not take is named, with those it takes
    query = next(p for p in sorted(colours.rglob("*")) if p.is_file())
    args = ["search", str(query), "--index", "hnsw", "--uri", "http://127.0.0.1:19530"]
    wrong = runner.invoke(app, args, env=env)
    assert wrong.exit_code == 2, wrong.output
    assert "takes no parameter 'uri'" in wrong.output and "ef_search" in wrong.output


def test_a_collection_names_its_indexes_by_its_identity_not_its_path(tmp_path, colours):
    """A server-held index is found again when the collection is opened by another path (a
    symlink, a moved disk), and two collections never share one."""
    from cbir.store import Store

    with Collection(tmp_path / "a", settings=_settings(tmp_path), create=True) as col:
        col.add(colours / "red", descriptors=["color-hist"])
    (tmp_path / "link").symlink_to(tmp_path / "a")
    first, again = Store(tmp_path / "a"), Store(tmp_path / "link")
    other = Store(tmp_path / "b", create=True)
    assert first.uuid == again.uuid != other.uuid
    assert len(first.uuid) == 32
