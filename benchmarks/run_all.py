"""Run the benchmarks and put their figures into docs/benchmarks.md (needs ../shared/datasets
or CBIR_DATASETS).

``python benchmarks/run_all.py`` runs every part; ``... run_all.py search scale`` runs those
parts. Each part replaces only its own section of the document (its ``SECTION`` heading), so
the figures of parts not run stay as they were.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import ModuleType

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_extract
import bench_index
import bench_milvus
import bench_ray
import bench_routes
import bench_search
import eval_auto
import eval_loo
from common import WORK, publish

PARTS: dict[str, ModuleType] = {
    "extract": bench_extract,
    "search": bench_search,
    "loo": eval_loo,
    "ray": bench_ray,
    "scale": bench_index,
    "routes": bench_routes,
    "auto": eval_auto,
    "milvus": bench_milvus,
}


def main(parts: list[str]) -> None:
    WORK.mkdir(parents=True, exist_ok=True)
    for part in parts:
        module = PARTS[part]
        publish(module.SECTION, module.INTRO, module.main())
        print(f"wrote the {part!r} section of docs/benchmarks.md")


if __name__ == "__main__":
    chosen = sys.argv[1:] or list(PARTS)
    unknown = [p for p in chosen if p not in PARTS]
    if unknown:
        raise SystemExit(f"unknown part(s) {unknown}; choose from {', '.join(PARTS)}")
    main(chosen)
