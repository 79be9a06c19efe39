"""Shared helpers for the benchmark scripts: where the data sets are, timing, Markdown."""

from __future__ import annotations

import os
import platform
import re
import textwrap
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


def wrap(paragraph: str) -> str:
    """A paragraph folded to the width of the docs."""
    return textwrap.fill(paragraph, width=96, break_on_hyphens=False)


def write_section(heading: str, body: str, doc: Path = REPO / "docs" / "benchmarks.md") -> None:
    """Put ``heading`` and ``body`` into ``doc`` in place of that heading's earlier section (up to
    the next ``## `` heading), or at the end if it has none: every other section stays as it
    is, so each benchmark publishes its own figures without dropping the others'."""
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    section = f"{heading}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", re.M | re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    doc.write_text(text.rstrip("\n") + "\n")


def publish(heading: str, intro: str, text: str) -> None:
    """A benchmark's section of docs/benchmarks.md: what it measures and its goals (``intro``),
    when and where it ran, and its figures (``text``)."""
    stamp = f"Measured {time.strftime('%Y-%m-%d')} on {machine()}."
    write_section(heading, f"{intro.strip()}\n\n{stamp}\n\n{text.strip()}")
