"""Retrieval quality through the approximate index that ``auto`` picks past its threshold:
``cbir evaluate`` on dtd10 and COIL-100 run twice, exact and with ``auto`` forced (a threshold
of a few images), and the MAP of each descriptor under its default metric compared.

Both runs share the feature cache of their report folder (benchmarks/results/eval-auto-*), so
the descriptors are extracted once. Usage: ``python benchmarks/eval_auto.py``;
``run_all.py auto`` puts its section into docs/benchmarks.md.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import WORK, dataset, md_table, publish, wrap

from cbir.config import Settings
from cbir.evaluation import GridConfig, evaluate_dataset
from cbir.features import create_descriptor
from cbir.index.manager import choose_kind

#: (data set, queries sampled (None: all), descriptors) of each run.
RUNS = (
    ("dtd10", None, ("cnn", "color-regional", "lbp", "hog")),
    ("coil100", 1000, ("cnn", "color-regional", "lbp", "hog")),
)
#: Low enough that every set here is past it.
FORCED_THRESHOLD = 100
GOAL = 0.005

SECTION = "## Retrieval quality through the approximate index"
INTRO = wrap(
    "`benchmarks/eval_auto.py`: `cbir evaluate` leave-one-out, exact search beside `auto` "
    f"forced past its threshold (`--auto-threshold {FORCED_THRESHOLD}`), each descriptor under "
    f"its default metric. Goal: MAP within {GOAL} of exact."
)


def map_of(out: Path, settings: Settings, config: GridConfig, data: Path) -> float:
    evaluate_dataset(data, None, config, out, settings=settings, mosaics=0)
    with open(out / "results.csv") as fh:
        (row,) = list(csv.DictReader(fh))
    return float(row["MAP"])


def main() -> str:
    rows = []
    for name, sample, specs in RUNS:
        data = dataset(name)
        for spec in specs:
            d = create_descriptor(spec)
            out = WORK / f"eval-auto-{name}-{d.name}"
            config = GridConfig(descriptors=[spec], metrics=[d.default_metric],
                                sample_queries=sample)  # fmt: skip
            exact = map_of(out, Settings(workers=2, index="exact"), config, data)
            forced = Settings(workers=2, auto_threshold=FORCED_THRESHOLD)
            approximate = map_of(out, forced, config, data)
            kind = choose_kind(forced, FORCED_THRESHOLD, d.dim)
            gap = approximate - exact
            print(f"{name} {spec}: exact {exact:.4f}, {kind} {approximate:.4f}", flush=True)
            rows.append([
                name, spec, d.default_metric, f"{exact:.4f}", kind, f"{approximate:.4f}",
                f"{gap:+.4f}", "met" if abs(gap) <= GOAL else "not met",
            ])  # fmt: skip
    text = md_table(
        ["data set", "descriptor", "metric", "MAP exact", "auto picks", "MAP auto", "difference",
         f"within {GOAL}"],
        rows,
    )  # fmt: skip
    print(text)
    return text


if __name__ == "__main__":
    publish(SECTION, INTRO, main())
