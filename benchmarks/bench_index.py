"""Approximate indexes at scale: build time, memory, recall@10 and latency through
``Collection.search``, beside raw FAISS on the very same index, in one run.

Two sets of vectors:

- synthetic, N of them (default 1,000,000) with the structure of real image features, not
  i.i.d. noise: a 64-dimensional latent drawn from a mixture of many broad clusters, projected
  to 256 dimensions, rectified and scaled to unit length (as pooled CNN features are), plus
  noise. Queries come from the same distribution but are never indexed (copies of indexed
  vectors plus noise make every index look perfect);
- the real `cnn` vectors of CIFAR-10 train (50,000 images, indexed once with ``cbir index``),
  queried with CIFAR-10 test images (held out).

Each index kind is built once (or loaded, with ``--reuse``) and searched with several settings
per query. Recall is against exact search of the same queries. Usage:
``python benchmarks/bench_index.py [N] [--reuse] [--no-cifar]``; ``run_all.py scale`` runs it
with the defaults and puts its section into docs/benchmarks.md. Collections are written under
benchmarks/results/ (kept out of git).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import WORK, dataset, image_files, md_table, publish, wrap

from cbir.collection import Collection
from cbir.config import Settings
from cbir.features import create_descriptor
from cbir.index.manager import choose_kind
from cbir.store import DescriptorRecord, ImageUpdate

DIM = 256
LATENT = 64
CLUSTERS = 2000
#: Spread of a cluster in the latent space (the centres are unit normal), and of the noise
#: added after projection: broad, overlapping clusters, as real features have.
CLUSTER_SPREAD, NOISE = 1.0, 0.02
QUERIES = 1000
#: Single queries timed one by one (median and p99), each a different held-out query.
TIMED = 500
K = 10
WRITE_BATCH = 50_000
#: A 256-value descriptor to file the synthetic vectors under (they are searched as vectors).
SPEC = "color-hist:space=hsv,bins=16x4x4"
METRIC = "euclidean"
CIFAR_SPEC = "cnn"
#: Goals of the scale issue at a million vectors.
GOAL_RECALL, GOAL_MS, GOAL_QUANTISED_RECALL, GOAL_QUANTISED_BYTES = 0.95, 1.0, 0.90, 256
GOAL_OVERHEAD_RATIO, GOAL_OVERHEAD_MS = 1.2, 0.1

SECTION = "## Approximate search at scale"
INTRO = wrap(
    f"`benchmarks/bench_index.py`. Goals at a million vectors: recall@10 at least {GOAL_RECALL} "
    f"with a median single-query latency under {GOAL_MS:g} ms through `Collection.search`; cbir's "
    f"latency at most {GOAL_OVERHEAD_RATIO}x raw FAISS on the same index with the same "
    f"parameters, or {GOAL_OVERHEAD_MS} ms more, whichever is larger; a quantised index of at "
    f"most {GOAL_QUANTISED_BYTES} bytes per image in RAM with recall@10 at least "
    f"{GOAL_QUANTISED_RECALL} after re-ranking. Latency is one query at a time through "
    "`Collection.search` (hits with paths and labels), each query a different held-out one, "
    "beside the FAISS index under it searched directly with the same parameters (for IVF-PQ, "
    "for the candidates it re-ranks, without the re-rank). Ready: seconds to build the index "
    "(or to load it, in a run with `--reuse`, or a later setting of the same index). RAM and "
    "file bytes are per image, for the index alone (the full vectors stay in the collection's "
    "segments)."
)


@dataclass(frozen=True)
class Setting:
    """One row: an index kind, the parameters it is built with, and those of each query."""

    label: str
    kind: str
    build: dict[str, Any] = field(default_factory=dict)
    query: dict[str, int] = field(default_factory=dict)


SETTINGS = (
    Setting("exact", "exact"),
    Setting("HNSW32, ef 64", "hnsw"),
    Setting("HNSW32, ef 128", "hnsw", query={"ef": 128}),
    Setting("IVF-PQ, width/8 B codes, nprobe 16", "ivf-pq"),
    Setting("IVF-PQ, width/8 B codes, nprobe 32", "ivf-pq", query={"nprobe": 32}),
    Setting("IVF-PQ, 64 B codes, nprobe 32", "ivf-pq", {"pq_bytes": 64}, {"nprobe": 32}),
    Setting("auto", "auto"),
)


def features(n: int, rng: np.random.Generator, centres: np.ndarray, W: np.ndarray) -> np.ndarray:
    """``n`` synthetic features: latent cluster points, projected, rectified, unit length."""
    z = centres[rng.integers(0, len(centres), n)] + rng.normal(0, CLUSTER_SPREAD, (n, LATENT))
    X = np.maximum(z @ W, 0) + rng.normal(0, NOISE, (n, DIM))
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    return X.astype(np.float32)


def synthetic_collection(n: int, col_dir: Path) -> np.ndarray:
    """The collection of ``n`` synthetic vectors (written once per size), and the held-out
    queries."""
    rng = np.random.default_rng(2026)
    centres = rng.normal(0, 1, (CLUSTERS, LATENT))
    W = rng.normal(0, 1, (LATENT, DIM)) / np.sqrt(LATENT)
    queries = features(QUERIES, rng, centres, W)
    marker = col_dir / f"ready-{n}"
    if not marker.exists():
        d = create_descriptor(SPEC)
        with Collection(col_dir, settings=Settings(collection=col_dir), create=True) as col:
            col.store.add_descriptor(d.spec, d.name, d.get_params(), d.dim, d.default_metric)
            col.store.acquire()
            try:
                for lo in range(0, n, WRITE_BATCH):
                    X = features(min(WRITE_BATCH, n - lo), rng, centres, W)
                    col.store.write_batch([_update(lo + i, d.spec, x) for i, x in enumerate(X)])
            finally:
                col.store.release()
        marker.touch()
    return queries


def _update(n: int, spec: str, vector: np.ndarray) -> ImageUpdate:
    path = f"/synthetic/{n:07d}.jpg"
    return ImageUpdate(path, 1, 1, None, "ok", label=f"c{n % 10}", vectors={spec: vector})


def cifar_collection(queries: int = QUERIES) -> tuple[Path, np.ndarray]:
    """CIFAR-10 train indexed with `cnn` (once), and the `cnn` vectors of CIFAR-10 test images
    (an even sample across classes) described with the collection's fitted descriptor."""
    col_dir = WORK / "cifar10-train-cnn"
    settings = Settings(collection=col_dir, workers=2)
    with Collection(col_dir, settings=settings) as col:
        col.add(dataset("cifar10/train"), descriptors=[CIFAR_SPEC], labels="folder")
        files = image_files(dataset("cifar10/test"), queries)
        Q, _ = col.query_vectors([str(f) for f in files], col.descriptor())
    return col_dir, Q


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    hits = [len(set(f) & set(t)) / len(t) for f, t in zip(found, truth, strict=True)]
    return float(np.mean(hits))


def raw_faiss(index: Any, query: dict[str, int]) -> Callable[[np.ndarray], object] | None:
    """The FAISS index under a cbir one, searched directly with the same parameters (for a
    re-ranking kind, for as many candidates as it re-ranks)."""
    import faiss

    raw = getattr(index, "_index", None)
    if raw is None:
        return None
    if index.kind == "hnsw":
        params = faiss.SearchParametersHNSW(efSearch=max(query.get("ef", index.ef_search), K))
        return partial(_one_query, raw, K, params)
    params = faiss.SearchParametersIVF(nprobe=query.get("nprobe", index.nprobe))
    return partial(_one_query, raw, query.get("rerank", index.rerank) * K, params)


def _one_query(raw: Any, k: int, params: object, q: np.ndarray) -> object:
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


def _built(col: Collection, record: DescriptorRecord, kind: str, reuse: bool) -> tuple[Any, str]:
    """The index of ``kind`` (its saved copy removed first unless ``reuse``), and the seconds
    it took to be ready: built, or loaded when a saved copy fits."""
    if not reuse:
        for old in (col.store.root / "indexes").glob(f"{record.id}-{METRIC}-{kind}.*"):
            old.unlink()
    t0 = time.perf_counter()
    index = col.index(record, METRIC)
    seconds = time.perf_counter() - t0
    col.indexes.save()
    return index, f"{seconds:.0f}"


def measure(col_dir: Path, Q: np.ndarray, n: int, reuse: bool) -> Iterator[list[str]]:
    """One table row per setting, exact first (it gives the true neighbours)."""
    truth = None
    built: set[tuple[str, str]] = set()  # (kind, parameters) made in this run
    for setting in SETTINGS:
        settings = Settings(collection=col_dir, index=setting.kind, index_params=setting.build)
        with Collection(col_dir, settings=settings) as col:
            record = col.descriptor()
            kind = choose_kind(settings, n, record.dim)
            made = (kind, repr(sorted(setting.build.items())))
            index, build = _built(col, record, kind, reuse or made in built)
            built.add(made)
            print(f"{setting.label}: {index.kind} ready ({build} s)", flush=True)
            search = partial(col.search, k=K, metric=METRIC, **setting.query)
            search(Q[0])  # warm the caches the first query fills
            t0 = time.perf_counter()
            found = _batch_ids(col, record, Q, setting)
            batch_qps = len(Q) / (time.perf_counter() - t0)
            truth = found if truth is None else truth
            cbir_ms = timed(search, Q[:TIMED])
            direct = raw_faiss(index, setting.query)
            raw_ms = timed(direct, Q[:TIMED]) if direct else (float("nan"),) * 2
            ram = index.memory_bytes() / n if hasattr(index, "memory_bytes") else record.dim * 4
            files = list((col_dir / "indexes").glob(f"{record.id}-{METRIC}-{index.kind}.npz"))
            disk = sum(f.stat().st_size for f in files) / n
            label = f"auto ({index.kind})" if setting.kind == "auto" else setting.label
            yield [
                label, build, f"{ram:.0f}", f"{disk:.0f}", f"{recall(found, truth):.3f}",
                f"{cbir_ms[0]:.3f}", f"{cbir_ms[1]:.3f}", f"{raw_ms[0]:.3f}", f"{raw_ms[1]:.3f}",
                _overhead(cbir_ms[0], raw_ms[0]), f"{batch_qps:,.0f}",
            ]  # fmt: skip


def _batch_ids(col: Collection, record: DescriptorRecord, Q: np.ndarray, s: Setting) -> Any:
    """The ids of each query's top K, all queries in one call to the index."""
    from cbir.index import SearchParams

    index = col.index(record, METRIC)
    params = SearchParams(**s.query) if s.query and index.kind != "exact" else None
    _, ids = index.search(Q, K, params=params)
    return ids


def _overhead(cbir_ms: float, raw_ms: float) -> str:
    if raw_ms != raw_ms:  # no FAISS under it
        return "-"
    allowed = max(GOAL_OVERHEAD_RATIO * raw_ms, raw_ms + GOAL_OVERHEAD_MS)
    verdict = "met" if cbir_ms <= allowed else "not met"
    return f"{cbir_ms / raw_ms:.2f}x, +{cbir_ms - raw_ms:.3f} ms ({verdict})"


HEADER = [
    "index", "ready s", "RAM B/image", "file B/image", "recall@10", "cbir median ms",
    "cbir p99 ms", "raw FAISS median ms", "raw p99 ms", "cbir vs raw", "batch queries/s",
]  # fmt: skip


def main(n: int = 1_000_000, reuse: bool = False, cifar: bool = True) -> str:
    col_dir = WORK / f"scale-{n}"
    t0 = time.perf_counter()
    Q = synthetic_collection(n, col_dir)
    print(f"collection of {n:,} vectors ready ({time.perf_counter() - t0:.0f} s)", flush=True)
    text = (
        wrap(
            f"{n:,} synthetic vectors of {DIM} dims ({CLUSTERS} clusters of spread "
            f"{CLUSTER_SPREAD} in a {LATENT}-d latent, projected, rectified, unit length, noise "
            f"{NOISE}); {QUERIES} held-out queries; {METRIC}; k={K}."
        )
        + "\n\n"
        + md_table(HEADER, list(measure(col_dir, Q, n, reuse)))
        + "\n"
    )
    if cifar:
        cifar_dir, Qc = cifar_collection()
        with Collection(cifar_dir) as col:
            m = len(col)
        text += (
            "\n"
            + wrap(
                f"The real `cnn` vectors of CIFAR-10 train ({m:,} images), queried with "
                f"{len(Qc)} CIFAR-10 test images; {METRIC}; k={K}. At this size `auto` is just "
                "past its threshold."
            )
            + "\n\n"
            + md_table(HEADER, list(measure(cifar_dir, Qc, m, reuse)))
            + "\n"
        )
    print(text)
    return text


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    text = main(
        int(args[0]) if args else 1_000_000,
        reuse="--reuse" in sys.argv,
        cifar="--no-cifar" not in sys.argv,
    )
    publish(SECTION, INTRO, text)
