"""Run the benchmarks and write docs/benchmarks.md (needs ../shared/datasets or CBIR_DATASETS).

``python benchmarks/run_all.py`` runs all three parts; ``... run_all.py search`` re-runs one part
and keeps the latest figures of the others (each part's text is kept in benchmarks/results/).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_extract
import bench_search
import eval_loo
from common import REPO, WORK, machine

PARTS = {"extract": bench_extract.main, "search": bench_search.main, "loo": eval_loo.main}


def main(parts: list[str]) -> None:
    WORK.mkdir(parents=True, exist_ok=True)
    for part in parts:
        text = PARTS[part]()
        stamp = f"Measured {time.strftime('%Y-%m-%d')} on {machine()}."
        (WORK / f"section-{part}.md").write_text(f"{stamp}\n\n{text}\n")
    section = {
        p: (WORK / f"section-{p}.md").read_text()
        if (WORK / f"section-{p}.md").exists()
        else "(not measured yet)\n"
        for p in PARTS
    }
    doc = f"""# Benchmarks

Made with `make bench` (`benchmarks/run_all.py`). The machine is shared and noisy: expect
differences of 10-20% between runs.

## Extraction rate (images/s, one process, from bytes in memory)

Goal: colour histograms at least half the decode-only rate, every hand-crafted descriptor at
least a quarter. A descriptor's rate includes its own decode (JPEG draft mode at the size it
asks for), resize and description; the percentage compares it with the faster of two
decode-only rates: full size, and draft for the descriptor's own size without the resize.
On a shared machine the absolute rates move by up to 40% between runs; the percentages are
steadier. Compare runs before drawing conclusions.

{section["extract"]}
## Exact search latency over CIFAR-10 train

Goal: cosine and euclidean under 20 ms, every other metric under 250 ms (p95 reported).

{section["search"]}
## Leave-one-out retrieval on dtd10

{section["loo"]}"""
    (REPO / "docs" / "benchmarks.md").write_text(doc)
    print("wrote docs/benchmarks.md")


if __name__ == "__main__":
    chosen = sys.argv[1:] or list(PARTS)
    unknown = [p for p in chosen if p not in PARTS]
    if unknown:
        raise SystemExit(f"unknown part(s) {unknown}; choose from {', '.join(PARTS)}")
    main(chosen)
