"""Run every benchmark and write docs/benchmarks.md (needs ../shared/datasets or CBIR_DATASETS)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_extract
import bench_search
import eval_loo
from common import REPO, machine


def main() -> None:
    started = time.strftime("%Y-%m-%d")
    extract = bench_extract.main()
    search = bench_search.main()
    loo = eval_loo.main()
    doc = f"""# Benchmarks

Measured {started} on {machine()} with `make bench` (`benchmarks/run_all.py`).
The machine is shared and noisy: expect differences of 10-20% between runs.

## Extraction rate (images/s, one process, from bytes in memory)

Goal: colour histograms at least half the decode-only rate, every hand-crafted descriptor at
least a quarter. A descriptor's rate includes its own decode (JPEG draft mode at the size it
asks for), resize and description; the percentage compares it with the faster of two
decode-only rates: full size, and draft for the descriptor's own size without the resize.

{extract}

## Exact search latency over CIFAR-10 train

Goal: cosine and euclidean under 20 ms, every other metric under 250 ms (p95 reported).

{search}

## Leave-one-out retrieval on dtd10

{loo}
"""
    (REPO / "docs" / "benchmarks.md").write_text(doc)
    print("wrote docs/benchmarks.md")


if __name__ == "__main__":
    main()
