"""Query latency of exact search over CIFAR-10 train (50,000 images), for every metric.

The collection is indexed once with `color-regional` (405 dims) into benchmarks/results/ (kept
out of git). Latency is one query vector against the loaded index (median and p95 of 100 CIFAR-10
test images); the time to describe a query image is reported beside it.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import WORK, dataset, image_files, md_table, percentiles_ms, publish

from cbir.collection import Collection
from cbir.config import Settings
from cbir.extraction import extract_images
from cbir.features import create_descriptor, metrics_for

DESCRIPTOR = "color-regional"
SECTION = "## Exact search latency over CIFAR-10 train"
INTRO = "Goal: cosine and euclidean under 20 ms, every other metric under 250 ms (p95 reported)."


def main(queries: int = 100) -> str:
    col_dir = WORK / "cifar10-train"
    settings = Settings(collection=col_dir, workers=2)
    with Collection(col_dir, settings=settings) as col:
        t0 = time.perf_counter()
        spec = create_descriptor(DESCRIPTOR).spec
        report = col.add(dataset("cifar10/train"), descriptors=[spec], labels="folder")
        print(
            f"indexed {len(col)} images ({report.extracted} extracted, "
            f"{time.perf_counter() - t0:.0f} s)"
        )
        record = col.descriptor(spec)
        d = create_descriptor(record.spec)
        qfiles = image_files(dataset("cifar10/test"), queries)
        t0 = time.perf_counter()
        Q = extract_images(qfiles, d, limits=settings.limits)
        describe_ms = (time.perf_counter() - t0) / len(qfiles) * 1000
        rows = []
        for name in metrics_for(d):
            index = col.index(record, name)
            index.search(Q[:1], 10)  # warm up
            samples = []
            for q in Q:
                t0 = time.perf_counter()
                index.search(q[None, :], 10)
                samples.append(time.perf_counter() - t0)
            med, p95 = percentiles_ms(samples)
            goal = 20 if name in ("cosine", "euclidean") else 250
            rows.append(
                [name, f"{med:.1f}", f"{p95:.1f}", f"< {goal}", "yes" if p95 < goal else "NO"]
            )
        n = len(col)
    text = (
        f"{n:,} vectors of {record.spec} ({record.dim} dims); query description "
        f"{describe_ms:.1f} ms per image.\n\n"
        + md_table(["metric", "median ms", "p95 ms", "goal ms", "met"], rows)
    )
    print(text)
    return text


if __name__ == "__main__":
    publish(SECTION, INTRO, main())
