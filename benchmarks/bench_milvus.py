"""The milvus index kind on Milvus Lite and on a standalone Milvus server, beside FAISS HNSW and
exact search, on the same vectors in one run: insert rate, index build time, single-query
latency (median, p99) and recall@10 against exact search.

The vectors are those of ``bench_index.py`` (clusters in a low-dimensional latent, projected
to 256 dimensions, rectified, unit length, plus noise); the queries come from the same
distribution and are never indexed. Every index is a cbir index kind searched through its
``search`` (the metric's distances, ``MISSING`` padding), HNSW with the same M, efConstruction
and ef everywhere. The server is the ``milvus`` PyPI package's standalone Milvus 2.3, started
on 127.0.0.1 for the run and killed after it (``tests/milvus_server.py``).

``python benchmarks/bench_milvus.py [N]`` (default 100,000) puts its section, "Milvus", into
docs/benchmarks.md (as ``run_all.py milvus`` does).
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_index import CLUSTERS, DIM, LATENT, features, raw_faiss, recall, timed
from common import md_table, publish, wrap

from cbir.index import create_index

QUERIES = 1000
SECTION = "## Milvus"
INTRO = wrap(
    "The `milvus` index kind on Milvus Lite (a file, in the cbir process) and on a real "
    "standalone Milvus server (the `milvus` PyPI package, Milvus 2.3.5, started on 127.0.0.1 "
    "for the run), beside FAISS HNSW and exact search on the same vectors in one run "
    "(`benchmarks/bench_milvus.py`; needs `cbir[milvus,milvus-server]`)."
)
#: Single queries timed one by one (median and p99).
TIMED = 300
K = 10
#: Rows given to ``add`` at a time, as the index manager does from the segments.
ADD_BATCH = 10_000
#: Queries sent to Milvus in one search when measuring recall.
QUERY_BATCH = 100
#: Seconds to wait for Milvus to finish building its index.
BUILD_TIMEOUT = 1800
METRIC = "euclidean"


def vectors(n: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` indexed vectors and the held-out queries."""
    rng = np.random.default_rng(2026)
    centres = rng.normal(0, 1, (CLUSTERS, LATENT))
    W = rng.normal(0, 1, (LATENT, DIM)) / np.sqrt(LATENT)
    return features(n, rng, centres, W), features(QUERIES, rng, centres, W)


def wait_for_milvus_index(index: object, n: int) -> None:
    """Flush what was written (Milvus seals it and builds its index on the sealed segments),
    wait until every row is indexed, then load the collection again so that searches use the
    index, not the raw rows."""
    from pymilvus import MilvusClient

    client = MilvusClient(uri=index.uri)
    client.flush(index.name)
    deadline = time.monotonic() + BUILD_TIMEOUT
    while time.monotonic() < deadline:
        state = client.describe_index(index.name, "vector")
        if int(state.get("indexed_rows", 0)) >= n and not int(state.get("pending_index_rows", 0)):
            break
        time.sleep(0.2)
    else:
        raise SystemExit(f"Milvus did not index {n} rows in {BUILD_TIMEOUT} s: {state}")
    client.release_collection(index.name)
    client.load_collection(index.name)


def raw_milvus(index: object) -> Callable[[np.ndarray], object]:
    """The same search sent to Milvus with pymilvus directly (euclidean's route is native: the
    query as it is), without cbir's layer (distances, padding, consistency bookkeeping)."""
    from pymilvus import MilvusClient

    client = MilvusClient(uri=index.uri)
    search_params = {"metric_type": "L2", "params": {"ef": index.ef_search}}

    def search(q: np.ndarray) -> object:
        return client.search(index.name, data=[q], limit=K, search_params=search_params,
                             consistency_level="Eventually")  # fmt: skip

    return search


def measure(
    label: str, index: object, X: np.ndarray, Q: np.ndarray, truth: np.ndarray | None
) -> tuple[list[object], np.ndarray]:
    n = len(X)
    ids = np.arange(n)
    t0 = time.perf_counter()
    for lo in range(0, n, ADD_BATCH):
        index.add(ids[lo : lo + ADD_BATCH], X[lo : lo + ADD_BATCH])
    inserted = time.perf_counter() - t0
    t0 = time.perf_counter()
    if index.kind == "milvus":
        wait_for_milvus_index(index, n)
    built = time.perf_counter() - t0
    found = np.vstack([index.search(Q[lo : lo + QUERY_BATCH], K)[1]
                       for lo in range(0, len(Q), QUERY_BATCH)])  # fmt: skip
    r = 1.0 if truth is None else recall(found, truth)
    median, p99 = timed(lambda q: index.search(q[None, :], K), Q[:TIMED])
    raw = raw_milvus(index) if index.kind == "milvus" else raw_faiss(index)
    raw_median = timed(raw, Q[:TIMED])[0] if raw else float("nan")
    print(f"{label}: insert {inserted:.1f} s, build {built:.1f} s, recall {r:.3f}, "
          f"{median:.2f} / {p99:.2f} ms, raw {raw_median:.2f} ms", flush=True)  # fmt: skip
    row = [label, f"{n / inserted:,.0f}", f"{inserted:.1f}", f"{built:.1f}",
           f"{inserted + built:.1f}", f"{median:.2f}", f"{p99:.2f}",
           "-" if raw is None else f"{raw_median:.2f}", f"{r:.3f}"]  # fmt: skip
    return row, found


def main(n: int = 100_000) -> str:
    import milvus
    import milvus_lite
    import pymilvus
    from tests.milvus_server import start

    X, Q = vectors(n)
    rows = []
    with tempfile.TemporaryDirectory(prefix="cbir-bench-milvus-") as tmp:
        server = start(Path(tmp) / "server")
        try:
            kinds = [
                ("exact (cbir, in RAM)", "exact", {}),
                ("FAISS HNSW (cbir hnsw)", "hnsw", {}),
                ("Milvus Lite (cbir milvus, HNSW)", "milvus", {"uri": f"{tmp}/lite.db"}),
                ("Milvus 2.3.5 standalone server (cbir milvus, HNSW)", "milvus",
                 {"uri": server.uri}),
            ]  # fmt: skip
            truth = None
            for label, kind, params in kinds:
                index = create_index(kind, metric=METRIC, dim=DIM, **params)
                row, found = measure(label, index, X, Q, truth)
                truth = found if truth is None else truth  # exact search comes first
                rows.append(row)
                del index
        finally:
            server.kill()
    table = md_table(
        ["index", "insert rows/s", "insert s", "index build s", "total s", "median ms",
         "p99 ms", "engine alone median ms", "recall@10"],
        rows,
    )  # fmt: skip
    versions = (f"pymilvus {pymilvus.__version__}, milvus-lite {milvus_lite.__version__}, "
                f"milvus (server) {milvus.__version__}")  # fmt: skip
    return (
        f"{versions}.\n\n"
        f"{n:,} vectors of {DIM} dims ({CLUSTERS} clusters in a {LATENT}-d latent, projected, "
        f"rectified, unit length, plus noise); {QUERIES} held-out queries; {METRIC}; k={K}. "
        f"Inserted {ADD_BATCH:,} rows per `add`. HNSW M=32, efConstruction=80, ef=64 for FAISS "
        f"and both Milvus. Index build: for Milvus, flush, wait until every row is indexed, and "
        f"load the collection again (FAISS builds its graph while inserting). Latency: one "
        f"query through the index's `search`, {TIMED} queries, beside the same search sent to "
        f"the engine directly (FAISS's `search`, pymilvus's `MilvusClient.search`); recall@10 "
        f"against exact search "
        f"over all {QUERIES} queries.\n\n{table}\n"
    )


if __name__ == "__main__":
    publish(SECTION, INTRO, main(int(sys.argv[1]) if len(sys.argv) > 1 else 100_000))
