"""Run `cbir evaluate` on the shared data sets and the demo set, and write docs/results.md.

Reports go to benchmarks/results/eval-* (kept out of git); docs/ gets the tables and the curve
plots (aggregate numbers, no images of the data sets) and one mosaic of the demo collection.
Usage: python benchmarks/run_evaluations.py [dtd10 coil100 mnist cifar demo]
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, WORK, dataset, machine

from cbir.config import DEFAULT_DESCRIPTORS, Settings
from cbir.evaluation import GridConfig, evaluate_dataset

DOCS = REPO / "docs"
FIGURES = DOCS / "results"
#: The seeds' comparison: the metrics users usually try first.
COMMON_METRICS = ["euclidean", "cosine", "manhattan", "chi2", "kl", "bhattacharyya",
                  "intersection", "hellinger", "canberra", "correlation"]

RUNS = {
    "dtd10": dict(data="dtd10", queries=None, metrics=None, sample=None,
                  note="every hand-crafted descriptor x every metric, leave-one-out, all queries"),
    "coil100": dict(data="coil100", queries=None, metrics=None, sample=1000,
                    note="leave-one-out, 1,000 random queries against all 7,098 images"),
    "mnist": dict(data="mnist_test", queries=None, metrics=COMMON_METRICS, sample=1000,
                  note="leave-one-out, 1,000 random queries against all 10,000 images"),
    "cifar": dict(data="cifar10/train", queries="cifar10/test", metrics=COMMON_METRICS,
                  sample=1000, note="1,000 random test images queried against the 50,000 "
                  "training images (rankings 1,000 deep)"),
}


def run(name: str) -> dict:
    spec = RUNS[name]
    out = WORK / f"eval-{name}"
    queries = dataset(spec["queries"]) if spec["queries"] else None
    config = GridConfig(descriptors=DEFAULT_DESCRIPTORS, metrics=spec["metrics"],
                        sample_queries=spec["sample"], map_k=100, ks=(10,))
    started = time.perf_counter()
    report = evaluate_dataset(dataset(spec["data"]), queries, config, out,
                              settings=Settings(workers=2), mosaics=3)
    seconds = time.perf_counter() - started
    FIGURES.mkdir(parents=True, exist_ok=True)
    for plot in ("pr_curves.png", "precision_at_k.png"):
        shutil.copy(out / plot, FIGURES / f"{name}-{plot}")
    print(f"{name}: {seconds:.0f} s")
    return {"name": name, "seconds": seconds, "out": out, "report": report, **spec}


def demo_mosaic() -> None:
    """A mosaic for the docs, made from the demo collection (the data sets' own images stay out
    of the repository)."""
    from cbir.demo import make_demo_images

    collection, _ = make_demo_images(WORK / "demo-images")
    out = WORK / "eval-demo"
    evaluate_dataset(collection, None, GridConfig(descriptors=["color-regional"],
                     metrics=["hellinger"]), out, settings=Settings(workers=2), mosaics=1, k=8)
    FIGURES.mkdir(parents=True, exist_ok=True)
    shutil.copy(next((out / "mosaics").glob("*.png")), FIGURES / "demo-mosaic.png")


def section(result: dict) -> str:
    out: Path = result["out"]
    name = result["name"]
    table = (out / "results.md").read_text()
    grid = (out / "map_grid.md").read_text()
    summary = (out / "summary.md").read_text().split("\n", 2)[2]
    return f"""## {name}: {result['note']}

Wall time of the whole `cbir evaluate` run: {result['seconds']:.0f} s.

{summary}
{table}

MAP of every descriptor x metric:

{grid}

![PR curves]({FIGURES.name}/{name}-pr_curves.png)
![P@k]({FIGURES.name}/{name}-precision_at_k.png)
"""


def main(names: list[str]) -> None:
    results = [run(n) for n in names if n in RUNS]
    if "demo" in names:
        demo_mosaic()
    body = "\n".join(section(r) for r in results)
    (WORK / "results-sections.md").write_text(body)
    print(f"machine: {machine()}")
    print(body)


if __name__ == "__main__":
    main(sys.argv[1:] or [*RUNS, "demo"])
