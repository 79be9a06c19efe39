"""Shared helpers for the benchmark scripts: where the data sets are, timing, Markdown."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
DATASETS = Path(os.environ.get("CBIR_DATASETS", REPO.parent / "shared" / "datasets"))
#: Derived data (collections, vectors) stays here, out of git.
WORK = REPO / "benchmarks" / "results"


def dataset(name: str) -> Path:
    """A labelled folder-per-class data set, or a clear message when it is absent."""
    path = DATASETS / name
    if not path.is_dir():
        raise SystemExit(f"data set {path} not found (set CBIR_DATASETS to the datasets folder)")
    return path


def image_files(root: Path, limit: int | None = None) -> list[Path]:
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in {".jpg", ".png", ".jpeg"})
    if limit is not None and len(files) > limit:
        step = len(files) / limit  # an even sample across classes
        files = [files[int(i * step)] for i in range(limit)]
    return files


def rate(fn: Callable[[], int], repeats: int = 1) -> float:
    """Items per second of ``fn`` (which returns how many items it did), best of ``repeats``."""
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        n = fn()
        best = max(best, n / (time.perf_counter() - t0))
    return best


def percentiles_ms(samples: list[float]) -> tuple[float, float]:
    a = np.asarray(samples) * 1000
    return float(np.median(a)), float(np.percentile(a, 95))


def machine() -> str:
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, NumPy {np.__version__}"
    )


def md_table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
