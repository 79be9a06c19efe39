"""The milvus index kind on Milvus Lite (a file in the test's folder, in this process) and on a
real standalone Milvus server (started once for the session on 127.0.0.1, killed at the end).

The index contract itself runs over every kind, milvus included, in ``tests/test_index.py``;
here: the answers users rely on at a more realistic size (clustered vectors, held-out queries),
updates, saving and reconnecting, a server whose collection vanished, a collection indexed and
searched through the CLI, and the token kept out of every command line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pymilvus", reason="the milvus kind needs pymilvus: pip install 'cbir[milvus]'")

from cbir import Collection
from cbir.config import Settings
from cbir.errors import CorruptError, InvalidRequestError
from cbir.index import MISSING, create_index, load_index
from tests.conftest import write_colour_set

BACKENDS = ["lite", "server"]
#: Search breadth and candidates that make HNSW find every true neighbour of sets this small.
THOROUGH = {"ef_search": 256, "rerank": 20}
SECRET = "cbir-test-secret-7d1f"


@pytest.fixture(scope="session")
def milvus_server(tmp_path_factory):
    """A standalone Milvus server (the ``milvus`` package, ~8 s to start), for the session."""
    pytest.importorskip("milvus", reason="the server tests need: pip install 'cbir[milvus-server]'")
    from tests.milvus_server import start

    server = start(tmp_path_factory.mktemp("milvus-server"))
    yield server.uri
    server.kill()


@pytest.fixture(params=BACKENDS)
def uri(request, tmp_path):
    if request.param == "lite":
        return str(tmp_path / "lite.db")
    return request.getfixturevalue("milvus_server")


@pytest.fixture(scope="module")
def clustered():
    """Vectors with the structure of image features (clusters in a low-dimensional latent,
    projected, rectified, plus noise) and queries from the same clusters, never indexed; and
    the same as L1-normalised histograms."""
    rng = np.random.default_rng(11)
    latent, dim, clusters = 8, 48, 30
    centres = rng.normal(0, 1, (clusters, latent))
    W = rng.normal(0, 1, (latent, dim))

    def draw(n: int) -> np.ndarray:
        z = centres[rng.integers(0, clusters, n)] + rng.normal(0, 0.3, (n, latent))
        return (np.maximum(z @ W, 0) + rng.random((n, dim)) * 0.05).astype(np.float32)

    X, Q = draw(1500), draw(20)
    ids = np.arange(10_000, 11_500)
    return ids, X, Q


def exact(metric, ids, X, Q, k, **kw):
    index = create_index("exact", metric=metric, dim=X.shape[1])
    index.add(ids, X)
    return index.search(Q, k, **kw)


def milvus(uri, metric, ids, X, **params):
    index = create_index("milvus", metric=metric, dim=X.shape[1], uri=uri, **params)
    index.add(ids, X)
    return index


@pytest.mark.parametrize("metric", ["euclidean", "cosine", "bhattacharyya", "chi2"])
def test_the_top_k_is_that_of_exact_search(uri, metric, clustered):
    """L2 natively, cosine (unit rows' inner product), an inner-product route (Bhattacharyya's
    square-root embedding) and chi-square through the square-root candidates and a re-rank."""
    ids, X, Q = clustered
    index = milvus(uri, metric, ids, X, **THOROUGH)
    want_d, want_i = exact(metric, ids, X, Q, 10)
    got_d, got_i = index.search(Q, 10)
    np.testing.assert_array_equal(got_i, want_i)
    np.testing.assert_allclose(got_d, want_d, rtol=1e-4, atol=1e-5)


def test_upsert_replaces_remove_deletes_and_exclude_filters(uri, clustered):
    ids, X, Q = clustered
    index = milvus(uri, "euclidean", ids, X, **THOROUGH)
    assert len(index) == len(ids)
    # a rewritten image replaces its row: the query's own vector is now at id 10_005
    index.add(np.array([10_005]), Q[:1])
    assert len(index) == len(ids)
    d, i = index.search(Q[:1], 3)
    assert i[0, 0] == 10_005 and d[0, 0] == pytest.approx(0, abs=1e-5)
    # removing counts only what was held, and the removed rows never come back
    assert index.remove(np.array([10_005, 10_006, 99])) == 2
    assert len(index) == len(ids) - 2
    _, i = index.search(Q, 50)
    assert not np.isin([10_005, 10_006], i).any()
    keep = ~np.isin(ids, [10_005, 10_006])
    np.testing.assert_array_equal(i[:, :10], exact("euclidean", ids[keep], X[keep], Q, 10)[1])
    # exclude: the ids asked never appear, and what is left is exact search's answer without them
    top = i[:, :3].ravel()
    d, i = index.search(Q, 10, exclude=top)
    assert not np.isin(top, i).any()
    np.testing.assert_array_equal(i, exact("euclidean", ids[keep], X[keep], Q, 10, exclude=top)[1])
    # fewer rows left than asked: padded with MISSING at an infinite distance
    small = milvus(uri, "euclidean", ids[:5], X[:5])
    d, i = small.search(Q[:2], 10, exclude=ids[:2])
    assert i.shape == (2, 5) and (i[:, 3:] == MISSING).all() and np.isinf(d[:, 3:]).all()
    assert set(i[0, :3]) == set(ids[2:5])


def test_saved_and_loaded_it_reconnects_and_a_dropped_collection_is_corrupt(
    uri, clustered, tmp_path
):
    from pymilvus import MilvusClient

    ids, X, Q = clustered
    index = milvus(uri, "chi2", ids, X, **THOROUGH)
    index.save(tmp_path / "index.npz")
    back = load_index(tmp_path / "index.npz")
    assert back.kind == "milvus" and back.metric.name == "chi2" and len(back) == len(ids)
    np.testing.assert_array_equal(back.search(Q, 10)[1], index.search(Q, 10)[1])
    # the server's collection gone (or changed behind cbir's back): not trusted
    client = MilvusClient(uri=uri)
    client.delete(index.name, ids=[int(ids[0])])
    with pytest.raises(CorruptError, match="holds 1499 rows"):
        load_index(tmp_path / "index.npz")
    client.drop_collection(index.name)
    with pytest.raises(CorruptError, match="has no collection"):
        load_index(tmp_path / "index.npz")


def test_the_uri_never_carries_credentials_and_one_is_needed(tmp_path, monkeypatch):
    monkeypatch.delenv("CBIR_MILVUS_URI", raising=False)
    with pytest.raises(InvalidRequestError, match="CBIR_MILVUS_TOKEN"):
        create_index("milvus", metric="euclidean", dim=4, uri="http://root:pw@127.0.0.1:19530")
    with pytest.raises(InvalidRequestError, match="CBIR_MILVUS_URI"):
        create_index("milvus", metric="euclidean", dim=4)
    with pytest.raises(InvalidRequestError, match=r"http\(s\)://HOST:PORT"):
        create_index("milvus", metric="euclidean", dim=4, uri="milvus.sqlite")


def test_without_pymilvus_the_kind_says_what_to_install(monkeypatch):
    from cbir.errors import UnavailableError

    monkeypatch.setitem(sys.modules, "pymilvus", None)  # as if it were not installed
    with pytest.raises(UnavailableError, match=r"pip install 'cbir\[milvus\]'"):
        create_index("milvus", metric="euclidean", dim=4, uri="http://127.0.0.1:1")


@pytest.fixture
def colours(tmp_path):
    root = tmp_path / "images"
    write_colour_set(root, per_class=8)
    return root


def test_a_collection_rebuilds_an_index_whose_server_collection_vanished(uri, colours, tmp_path):
    from pymilvus import MilvusClient

    settings = Settings(collection=tmp_path / "col", workers=1, index="milvus",
                        index_params={"uri": uri})  # fmt: skip
    query = sorted((colours / "red").iterdir())[0]
    with Collection(tmp_path / "col", settings=settings, create=True) as col:
        col.add(colours, descriptors=["color-hist"], labels="folder")
        # k = the images of one colour: past them every histogram is at the same distance
        want = [h.id for h in col.search(query, k=8, exact=True)]
        assert [h.id for h in col.search(query, k=8)] == want
        name = col.index(col.descriptors[0], "hellinger").name
    client = MilvusClient(uri=uri)
    client.drop_collection(name)
    with Collection(tmp_path / "col", settings=settings) as col:
        result = col.search(query, k=8)
        assert result.indexes == ("milvus",) and [h.id for h in result] == want
    assert client.has_collection(name)  # made again under the same name


def _cli(*args: str, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "cbir.cli", *args], env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _every_command_line() -> str:
    return subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout


def test_cli_index_and_search_through_milvus_give_exact_hits_and_hide_the_token(
    uri, colours, tmp_path
):
    """`cbir index DIR --index milvus --uri URI`, then `cbir search` the same way, in processes
    of their own: the hits of exact search; the token (from the environment) is in no command
    line while they run and in no file they leave."""
    src = str(Path(__file__).resolve().parent.parent / "src")
    env = {**os.environ, "CBIR_WORKERS": "1", "CBIR_COLLECTION": str(tmp_path / "col"),
           "CBIR_MILVUS_TOKEN": SECRET, "PYTHONPATH": src}  # fmt: skip
    env.pop("CBIR_MILVUS_URI", None)
    query = str(sorted((colours / "blue").iterdir())[0])
    runs = [
        ("index", str(colours), "-d", "color-hist", "--index", "milvus", "--uri", uri, "--json"),
        # k = the images of one colour: past them every histogram is at the same distance
        ("search", query, "-k", "8", "--index", "milvus", "--uri", uri, "--json"),
        ("search", query, "-k", "8", "--exact", "--json"),
    ]
    outputs = []
    for args in runs:
        process = _cli(*args, env=env)
        deadline = time.monotonic() + 120
        while process.poll() is None and time.monotonic() < deadline:
            assert SECRET not in _every_command_line()
            time.sleep(0.05)
        out, err = process.communicate(timeout=5)
        assert process.returncode == 0, err
        outputs.append(json.loads(out))
    built = outputs[0]["indexes"]
    assert built == [{"descriptor": "color-hist", "metric": "hellinger", "kind": "milvus",
                      "vectors": 32}]  # fmt: skip
    fast, slow = outputs[1], outputs[2]
    assert fast["indexes"] == ["milvus"] and slow["indexes"] == ["exact"]
    assert [h["id"] for h in fast["hits"]] == [h["id"] for h in slow["hits"]]
    for path in (tmp_path / "col").rglob("*"):
        if path.is_file() and path.stat().st_size < 50 << 20:
            assert SECRET.encode() not in path.read_bytes(), path
    no_flag = subprocess.run(
        [sys.executable, "-m", "cbir.cli", "search", query, "--token", SECRET],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert no_flag.returncode == 2 and "No such option" in no_flag.stderr
