"""Approximate indexes at scale: build time, memory, recall@10 and latency through
``Collection.search``, beside raw FAISS on the very same index, in one run.

The vectors have the structure of real image features, not i.i.d. noise: a 32-dimensional
latent drawn from a mixture of many clusters, projected to 256 dimensions, passed through a
ReLU and scaled to unit length (as pooled CNN features are), plus noise. Queries come from the
same distribution but are never indexed (copies of indexed vectors plus noise make every
index look perfect).

``python benchmarks/bench_index.py [N]`` (default 1,000,000) writes a collection of N vectors
under benchmarks/results/ (kept out of git) and prints a Markdown section; ``run_all.py scale``
puts it in docs/benchmarks.md.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import WORK, md_table

from cbir.collection import Collection
from cbir.config import Settings
from cbir.index.manager import choose_kind
from cbir.store import ImageUpdate

DIM = 256
LATENT = 32
CLUSTERS = 2000
#: Spread of a cluster in the latent space, and of the noise added after projection.
CLUSTER_SPREAD, NOISE = 0.35, 0.02
QUERIES = 1000
#: Single queries timed one by one (median and p99).
TIMED = 500
K = 10
WRITE_BATCH = 50_000
#: A 256-value descriptor to file the synthetic vectors under (they are searched as vectors).
SPEC = "color-hist:space=hsv,bins=16x4x4"


def features(n: int, rng: np.random.Generator, centres: np.ndarray, W: np.ndarray) -> np.ndarray:
    """``n`` synthetic features: latent cluster points, projected, rectified, unit length."""
    z = centres[rng.integers(0, len(centres), n)] + rng.normal(0, CLUSTER_SPREAD, (n, LATENT))
    X = np.maximum(z @ W, 0) + rng.normal(0, NOISE, (n, DIM))
    X /= np.linalg.norm(X, axis=1, keepdims=True) + 1e-12
    return X.astype(np.float32)


def make_collection(n: int, col_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """The collection of ``n`` vectors (made once per size), and the held-out queries."""
    rng = np.random.default_rng(2026)
    centres = rng.normal(0, 1, (CLUSTERS, LATENT))
    W = rng.normal(0, 1, (LATENT, DIM)) / np.sqrt(LATENT)
    queries = features(QUERIES, rng, centres, W)
    marker = col_dir / f"ready-{n}"
    if not marker.exists():
        settings = Settings(collection=col_dir, workers=1)
        with Collection(col_dir, settings=settings, create=True) as col:
            (record,) = col._ingest.register([SPEC])
            col.store.acquire()
            for lo in range(0, n, WRITE_BATCH):
                X = features(min(WRITE_BATCH, n - lo), rng, centres, W)
                col.store.write_batch([_update(lo + i, record.spec, x) for i, x in enumerate(X)])
            col.store.release()
        marker.touch()
    return queries


def _update(n: int, spec: str, vector: np.ndarray) -> ImageUpdate:
    path = f"/synthetic/{n:07d}.jpg"
    return ImageUpdate(path, 1, 1, None, "ok", label=f"c{n % 10}", vectors={spec: vector})


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    hits = [len(set(f) & set(t)) / len(t) for f, t in zip(found, truth, strict=True)]
    return float(np.mean(hits))


def raw_faiss(index: object) -> Callable[[np.ndarray], object] | None:
    """The FAISS index under a cbir one, searched directly with the same parameters (for a
    re-ranking kind, for as many candidates as it re-ranks)."""
    import faiss

    raw = getattr(index, "_index", None)
    if raw is None:
        return None
    if index.kind == "hnsw":
        params = faiss.SearchParametersHNSW(efSearch=index.ef_search)
        return partial(_one_query, raw, K, params)
    params = faiss.SearchParametersIVF(nprobe=index.nprobe)
    return partial(_one_query, raw, index.rerank * K, params)


def _one_query(raw: object, k: int, params: object, q: np.ndarray) -> object:
    return raw.search(q[None, :], k, params=params)


def timed(fn: Callable[[np.ndarray], object], items: np.ndarray) -> tuple[float, float]:
    """Median and p99 milliseconds of ``fn(item)`` over the items."""
    samples = []
    for item in items:
        t0 = time.perf_counter()
        fn(item)
        samples.append(time.perf_counter() - t0)
    a = np.asarray(samples) * 1000
    return float(np.median(a)), float(np.percentile(a, 99))


def main(n: int = 1_000_000) -> str:
    col_dir = WORK / f"scale-{n}"
    t0 = time.perf_counter()
    Q = make_collection(n, col_dir)
    print(f"collection of {n:,} vectors ready ({time.perf_counter() - t0:.0f} s)", flush=True)
    rows = []
    truth = None
    for kind in ("exact", "hnsw", "ivf-pq", "auto"):
        settings = Settings(collection=col_dir, workers=1, index=kind)
        with Collection(col_dir, settings=settings) as col:
            record = col.descriptors[0]
            chosen = choose_kind(settings, n, DIM)
            for old in (col_dir / "indexes").glob(f"*-{chosen}.*") if kind != "auto" else ():
                old.unlink()  # measure the build
            t0 = time.perf_counter()
            index = col.index(record, "euclidean")
            build = time.perf_counter() - t0
            print(f"{kind}: {index.kind} built in {build:.0f} s", flush=True)
            t0 = time.perf_counter()
            _, found = index.search(Q, K)
            batch_qps = len(Q) / (time.perf_counter() - t0)
            if truth is None:
                truth = found  # exact search comes first
            r = recall(found, truth)
            cbir_ms = timed(partial(col.search, k=K, metric="euclidean"), Q[:TIMED])
            direct = raw_faiss(index)
            raw_ms = timed(direct, Q[:TIMED]) if direct else (float("nan"), float("nan"))
            ram = index.memory_bytes() / n if hasattr(index, "memory_bytes") else DIM * 4
            files = list((col_dir / "indexes").glob(f"*-{index.kind}.npz"))
            disk = sum(f.stat().st_size for f in files) / n if files else 0
            rows.append([
                kind if kind != "auto" else f"auto ({index.kind})", f"{build:.0f}",
                f"{ram:.0f}", f"{disk:.0f}", f"{r:.3f}", f"{cbir_ms[0]:.3f}", f"{cbir_ms[1]:.3f}",
                f"{raw_ms[0]:.3f}", f"{raw_ms[1]:.3f}",
                f"{cbir_ms[0] / raw_ms[0]:.2f}x" if raw_ms[0] == raw_ms[0] else "-",
                f"{batch_qps:,.0f}",
            ])  # fmt: skip
    table = md_table(
        ["index", "build s", "RAM B/image", "index file B/image", "recall@10",
         "cbir median ms", "cbir p99 ms", "raw FAISS median ms", "raw p99 ms",
         "cbir / raw", "batch queries/s"],
        rows,
    )  # fmt: skip
    return (
        f"{n:,} vectors of {DIM} dims ({CLUSTERS} clusters in a {LATENT}-d latent, projected, "
        f"rectified, unit length); {QUERIES} held-out queries; euclidean; k={K}. Latency is one "
        f"query through `Collection.search` (hits with paths and labels) beside the same FAISS "
        f"index searched directly with the same parameters (for IVF-PQ, the candidates it "
        f"re-ranks). Recall against exact search.\n\n{table}\n"
    )


if __name__ == "__main__":
    print(main(int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000))
