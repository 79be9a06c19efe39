"""Every metric through an approximate index: recall@10 of its route (native, embedded, or
candidates + exact re-rank) against the exact ranking under that metric, and the speed beside
the exact scan, in one run.

Two sets of 405-d regional colour histograms (`color-regional`, 5 regions x 81 HSV bins):

- the real ones of CIFAR-10 train (50,000, indexed once into benchmarks/results/), every metric
  that applies to histograms;
- a million: those 50,000 tiled with noise (each copy's bins multiplied by log-normal noise and
  each region scaled back to its mass, so the copies stay histograms with the sparsity of the
  originals), for chi-square and intersection, the two the scale issue sets goals for.

Queries are the histograms of CIFAR-10 test images (held out). The approximate index is HNSW
(``--index hnsw``) over each metric's route; latencies are single queries through
``Collection.search``. Usage: ``python benchmarks/bench_routes.py [N] [--reuse]`` (N=0: the
real histograms only); ``run_all.py routes`` puts its section into docs/benchmarks.md.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_index import recall, timed
from common import WORK, dataset, image_files, md_table, publish, wrap

from cbir.collection import Collection
from cbir.config import Settings
from cbir.features import create_descriptor, metrics_for
from cbir.metrics import get_metric
from cbir.metrics.base import SPACES
from cbir.store import ImageUpdate

SPEC = "color-regional"
QUERIES = 200
#: Single queries timed through Collection.search per metric, and for the exact scan at 1M.
TIMED, TIMED_EXACT_AT_SCALE = 200, 20
K = 10
#: Standard deviation of the log of the multiplicative noise on each bin of a tiled copy.
TILE_NOISE = 0.5
WRITE_BATCH = 50_000
SCALE_METRICS = ("chi2", "intersection")
KIND = "hnsw"
GOAL_RECALL, GOAL_SPEEDUP = 0.95, 50.0

SECTION = "## Every metric through an approximate index"
INTRO = wrap(
    f"`benchmarks/bench_routes.py`. Goals: chi-square and intersection on a million 405-d "
    f"regional colour histograms at least {GOAL_RECALL} recall@10 against their exact "
    f"ranking, at least {GOAL_SPEEDUP:g}x faster than the exact scan; every other metric's "
    "recall through its route reported. Each metric's route is the one `cbir metrics` prints: "
    "native (FAISS computes it), exact embedding (the index ranks embedded rows exactly as the "
    "metric does), or candidates from the closest embedding ranked again by the true metric on "
    f"the full vectors. Index: {KIND.upper()} over the route's space (M=32, ef 64; KL and "
    "Jeffrey search four times as wide, as their routes declare)."
)


def regional_collection() -> tuple[Path, np.ndarray]:
    """CIFAR-10 train indexed with color-regional (once, shared with bench_search), and the
    histograms of CIFAR-10 test queries."""
    col_dir = WORK / "cifar10-train"
    with Collection(col_dir, settings=Settings(collection=col_dir, workers=2)) as col:
        col.add(dataset("cifar10/train"), descriptors=[SPEC], labels="folder")
        files = image_files(dataset("cifar10/test"), QUERIES)
        Q, _ = col.query_vectors([str(f) for f in files], col.descriptor(SPEC))
    return col_dir, Q


def tiled_collection(n: int, base_dir: Path) -> Path:
    """``n`` histograms: the base collection's, then noisy copies of them (written once)."""
    col_dir = WORK / f"regional-{n}"
    marker = col_dir / f"ready-{n}"
    if marker.exists():
        return col_dir
    d = create_descriptor(SPEC)
    with Collection(base_dir) as base:
        _, X = base.vectors(SPEC)
    regions = X.shape[1] // d.bins_per_region
    rng = np.random.default_rng(2026)
    with Collection(col_dir, settings=Settings(collection=col_dir), create=True) as col:
        col.store.add_descriptor(d.spec, d.name, d.get_params(), d.dim, d.default_metric)
        col.store.acquire()
        try:
            for lo in range(0, n, WRITE_BATCH):
                rows = np.arange(lo, min(lo + WRITE_BATCH, n)) % len(X)
                H = X[rows].astype(np.float64)
                if lo >= len(X):  # the originals first, then the copies
                    H *= rng.lognormal(0.0, TILE_NOISE, H.shape)
                    blocks = H.reshape(len(H), regions, -1)
                    mass = X[rows].reshape(len(H), regions, -1).sum(axis=2, keepdims=True)
                    blocks *= mass / np.maximum(blocks.sum(axis=2, keepdims=True), 1e-300)
                col.store.write_batch([_update(lo + i, d.spec, h) for i, h in enumerate(H)])
        finally:
            col.store.release()
    marker.touch()
    return col_dir


def _update(n: int, spec: str, histogram: np.ndarray) -> ImageUpdate:
    path = f"/tiled/{n:07d}.jpg"
    return ImageUpdate(path, 1, 1, None, "ok", vectors={spec: histogram.astype(np.float32)})


def route_name(metric: str) -> str:
    route = get_metric(metric).route_for(SPACES)
    if route.kind == "native":
        return f"native ({route.space})"
    if route.exact:
        return f"exact embedding ({route.space})"
    return f"{route.space} candidates, re-ranked"


def measure(
    col_dir: Path, Q: np.ndarray, metrics: list[str], timed_exact: int, reuse: bool
) -> list[list[str]]:
    """One row per metric: route, build time (or "loaded", with ``reuse``), recall@10, median
    ms of the route and of the exact scan."""
    rows = []
    settings = Settings(collection=col_dir, index=KIND)
    with Collection(col_dir, settings=settings) as col:
        record = col.descriptor()
        n = len(col)
        for metric in metrics:
            exact = col.indexes.index(record, metric, exact=True)
            _, truth = exact.search(Q, K)
            if not reuse:
                for old in (col_dir / "indexes").glob(f"{record.id}-{metric}-{KIND}.*"):
                    old.unlink()
            t0 = time.perf_counter()
            index = col.index(record, metric)
            col.indexes.save()
            built = "loaded" if reuse else f"{time.perf_counter() - t0:.0f}"
            _, found = index.search(Q, K)
            route_ms, _ = timed(lambda q, m=metric: col.search(q, K, metric=m), Q[:TIMED])
            exact_ms, _ = timed(
                lambda q, m=metric: col.search(q, K, metric=m, exact=True), Q[:timed_exact]
            )
            r = recall(found, truth)
            print(f"{metric}: recall {r:.3f}, {route_ms:.2f} ms vs {exact_ms:.1f} ms", flush=True)
            rows.append([
                metric, route_name(metric), built, f"{r:.3f}", f"{route_ms:.2f}",
                f"{exact_ms:.1f}", f"{exact_ms / route_ms:,.0f}x",
            ])  # fmt: skip
    print(f"{n:,} vectors measured", flush=True)
    return rows


HEADER = ["metric", "route", "build s", "recall@10", "route median ms", "exact median ms",
          "speed-up"]  # fmt: skip


def main(n: int = 1_000_000, reuse: bool = False) -> str:
    base_dir, Q = regional_collection()
    small = measure(base_dir, Q, metrics_for(create_descriptor(SPEC)), TIMED, reuse)
    text = ""
    if n:
        big_dir = tiled_collection(n, base_dir)
        big = measure(big_dir, Q, list(SCALE_METRICS), TIMED_EXACT_AT_SCALE, reuse)
        verdicts = []
        for row in big:
            r, speedup = float(row[3]), float(row[6].rstrip("x").replace(",", ""))
            met = r >= GOAL_RECALL and speedup >= GOAL_SPEEDUP
            verdicts.append([*row, "met" if met else "not met"])
        text = (
            wrap(
                f"{n:,} histograms (50,000 CIFAR-10 train ones and noisy copies, log-normal "
                f"noise of sigma {TILE_NOISE} on each bin); {QUERIES} CIFAR-10 test queries; "
                f"k={K}."
            )
            + "\n\n"
            + md_table([*HEADER, "goal"], verdicts)
            + "\n\n"
        )
    text += (
        wrap(
            f"Every metric on the 50,000 real CIFAR-10 train histograms; {QUERIES} CIFAR-10 "
            f"test queries; k={K}:"
        )
        + "\n\n"
        + md_table(HEADER, small)
        + "\n"
    )
    print(text)
    return text


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    publish(SECTION, INTRO, main(int(args[0]) if args else 1_000_000, "--reuse" in sys.argv))
