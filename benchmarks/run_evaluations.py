"""Run `cbir evaluate` on the shared data sets and the demo set, and write docs/results.md.

Reports go to benchmarks/results/eval-* (kept out of git); docs/ gets the tables and the curve
plots (aggregate numbers, no images of the data sets) and one mosaic of the demo collection.
Usage: python benchmarks/run_evaluations.py [dtd10 coil100 mnist cifar demo]
"""

from __future__ import annotations

import csv
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, WORK, dataset, machine, md_table

from cbir.config import DEFAULT_DESCRIPTORS, Settings
from cbir.evaluation import GridConfig, evaluate_dataset
from cbir.metrics import metric_names

DOCS = REPO / "docs"
FIGURES = DOCS / "results"
#: The seeds' comparison: the metrics users usually try first.
COMMON_METRICS = [
    "euclidean",
    "cosine",
    "manhattan",
    "chi2",
    "kl",
    "bhattacharyya",
    "intersection",
    "hellinger",
    "canberra",
    "correlation",
]

#: Every metric for real-valued vectors (hamming compares hash bits only).
HANDCRAFTED_METRICS = [m for m in metric_names() if m != "hamming"]

RUNS = {
    "dtd10": dict(
        data="dtd10",
        queries=None,
        metrics=HANDCRAFTED_METRICS,
        sample=None,
        note="every hand-crafted descriptor x every metric, leave-one-out, all queries",
    ),
    "coil100": dict(
        data="coil100",
        queries=None,
        metrics=HANDCRAFTED_METRICS,
        sample=1000,
        note="leave-one-out, 1,000 random queries against all 7,098 images",
    ),
    "mnist": dict(
        data="mnist_test",
        queries=None,
        metrics=COMMON_METRICS,
        sample=1000,
        note="leave-one-out, 1,000 random queries against all 10,000 images",
    ),
    "cifar": dict(
        data="cifar10/train",
        queries="cifar10/test",
        metrics=COMMON_METRICS,
        sample=1000,
        note="1,000 random test images queried against the 50,000 "
        "training images (rankings 1,000 deep)",
    ),
}


#: The deep descriptors (issue 3): the default `cnn` beside the naive recipe (head average-
#: pooled at 224 px, no centring, no augmentation) and its variants, the multi-level and
#: local-feature ones.
NAIVE_CNN = "cnn:size=224,layers=7,center=false,augment=0"
DEEP_LOO = [
    "cnn",
    NAIVE_CNN,
    "cnn:size=224",
    "cnn:pool=gem",
    "cnn:augment=0",
    "cnn:center=false,augment=0",
    "cnn-hist",
    "bovw",
    "bovw:detector=sift",
    "fusion:parts=cnn[center=false;augment=0]+color-regional,weights=3x1",
]
DEEP_RUNS = {
    "dtd10-deep": dict(
        data="dtd10",
        queries=None,
        metrics=["cosine", "euclidean"],
        sample=None,
        descriptors=[*DEEP_LOO, "cnn:precision=fp32"],
        note="deep descriptors, leave-one-out, all queries",
    ),
    "coil100-deep": dict(
        data="coil100",
        queries=None,
        metrics=["cosine", "euclidean"],
        sample=1000,
        descriptors=[
            "cnn",
            "cnn:augment=0",
            NAIVE_CNN,
            "cnn-hist",
            "bovw",
            "fusion:parts=cnn[center=false;augment=0]+color-hist",
        ],
        note="deep descriptors, leave-one-out, 1,000 random queries against all 7,098 images",
    ),
    "cifar-deep": dict(
        data="cifar10/train",
        queries="cifar10/test",
        metrics=["cosine"],
        sample=None,
        descriptors=["cnn", "cnn:augment=0", NAIVE_CNN, "cnnp", "cnnp:output=hidden"],
        note="deep descriptors: all 10,000 test images queried against the 50,000 training "
        "images (rankings 1,000 deep); cnnp trained on the training labels",
    ),
}
RUNS.update(DEEP_RUNS)


def run(name: str) -> dict:
    spec = RUNS[name]
    out = WORK / f"eval-{name}"
    queries = dataset(spec["queries"]) if spec["queries"] else None
    config = GridConfig(
        descriptors=spec.get("descriptors", DEFAULT_DESCRIPTORS),
        metrics=spec["metrics"],
        sample_queries=spec["sample"],
        map_k=100,
        ks=(10,),
    )
    started = time.perf_counter()
    report = evaluate_dataset(
        dataset(spec["data"]), queries, config, out, settings=Settings(workers=2), mosaics=3
    )
    seconds = time.perf_counter() - started
    FIGURES.mkdir(parents=True, exist_ok=True)
    for plot in ("pr_curves.png", "precision_at_k.png"):
        shutil.copy(out / plot, FIGURES / f"{name}-{plot}")
    print(f"{name}: {seconds:.0f} s", flush=True)
    return {
        "name": name,
        "seconds": seconds,
        "out": out,
        "advice": report["recommendation"],
        **spec,
    }


def demo_mosaic() -> None:
    """A mosaic for the docs, made from the demo collection (the data sets' own images stay out
    of the repository)."""
    from cbir.demo import make_demo_images

    collection, _ = make_demo_images(WORK / "demo-images")
    out = WORK / "eval-demo"
    evaluate_dataset(
        collection,
        None,
        GridConfig(descriptors=["color-regional"], metrics=["hellinger"]),
        out,
        settings=Settings(workers=2),
        mosaics=1,
        k=8,
    )
    FIGURES.mkdir(parents=True, exist_ok=True)
    shutil.copy(next((out / "mosaics").glob("*.png")), FIGURES / "demo-mosaic.png")


TOP_COLUMNS = [
    "descriptor",
    "metric",
    "MAP",
    "mAP@100(trec)",
    "mAP@100(retrieved)",
    "P@10",
    "nDCG@10",
    "query ms",
]


def section(name: str) -> str:
    """The docs section of one finished evaluation: summary, best 15 rows, the MAP grid."""
    out = WORK / f"eval-{name}"
    with open(out / "results.csv") as fh:
        rows = sorted(csv.DictReader(fh), key=lambda r: -float(r["MAP"]))
    top = md_table(TOP_COLUMNS, [[_fmt(r.get(c, "")) for c in TOP_COLUMNS] for r in rows[:15]])
    grid = (out / "map_grid.md").read_text()
    summary = (out / "summary.md").read_text().split("\n", 2)[2].split("\nFiles:")[0]
    seconds = (WORK / f"eval-{name}.seconds").read_text().strip()
    return f"""## {name}: {RUNS[name]["note"]}

Whole `cbir evaluate` run: {seconds} s.
{summary}
The best 15 of {len(rows)} combinations:

{top}

{grid}
![PR curves]({FIGURES.name}/{name}-pr_curves.png)
![P@k]({FIGURES.name}/{name}-precision_at_k.png)
"""


def _fmt(value: str) -> str:
    try:
        return f"{float(value):.3f}"
    except ValueError:
        return value


def main(names: list[str]) -> None:
    for name in names:
        if name in RUNS:
            result = run(name)
            (WORK / f"eval-{name}.seconds").write_text(f"{result['seconds']:.0f}")
        elif name == "demo":
            demo_mosaic()
    done = [n for n in RUNS if (WORK / f"eval-{n}.seconds").exists()]
    body = "\n".join(section(n) for n in done)
    (WORK / "results-sections.md").write_text(body)
    print(f"machine: {machine()}")
    print(body)


if __name__ == "__main__":
    main(sys.argv[1:] or [*RUNS, "demo"])  # "sections" alone only rewrites the sections
