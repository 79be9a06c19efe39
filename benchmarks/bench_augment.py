"""How much the ``cnn`` descriptor's neighbourhood augmentation (``augment``, ``alpha``) helps,
and what it costs where an image has few of its kind.

Leave-one-out MAP (full ranking) and P@10 on dtd10 and COIL-100 for several ``augment`` x
``alpha``, and the same on thinned copies of the sets (2 or 5 images per class, drawn at
random), where most of an image's 20 nearest neighbours are of other kinds. The raw
EfficientNet-Lite0 vectors are extracted once (or read from the cache that
``run_evaluations.py`` leaves); each setting is then fitted on the set, as ``cbir index`` does.

Usage: python benchmarks/bench_augment.py      (writes benchmarks/results/augment.md)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import WORK, dataset, machine, md_table

from cbir.config import Settings
from cbir.evaluation.datasets import from_folders
from cbir.evaluation.grid import extract_features, rank
from cbir.evaluation.measures import summarise
from cbir.features import create_descriptor

RAW = "cnn:center=false,augment=0"
SETTINGS = [(0, 0.0), (5, 3.0), (10, 3.0), (20, 3.0), (40, 3.0), (10, 0.0), (20, 0.0)]
#: (data set, images kept per class or None for all, queries sampled or None for all)
SETS = [
    ("dtd10", None, None),
    ("coil100", None, 1000),
    ("dtd10", 5, None),
    ("coil100", 5, None),
    ("coil100", 2, None),
]


def raw_vectors(name: str) -> tuple[np.ndarray, np.ndarray]:
    data = from_folders(dataset(name))
    cache = WORK / f"eval-{name}-deep" / "features"  # shared with run_evaluations.py
    features = extract_features(data, [RAW], settings=Settings(workers=2), cache_dir=cache)
    labels = np.array(data.primary_labels())
    return features.by_spec[create_descriptor(RAW).spec][features.ok], labels[features.ok]


def loo(vectors: np.ndarray, labels: np.ndarray, queries: np.ndarray) -> tuple[float, float]:
    """Leave-one-out MAP over the full ranking and P@10, cosine: the protocol (and the code)
    of ``cbir evaluate``."""
    ranked, _, _ = rank("cosine", vectors[queries], vectors, len(vectors), self_index=queries)
    relevant = labels[ranked] == labels[queries, None]
    n_relevant = (labels[None, :] == labels[queries, None]).sum(axis=1) - 1
    summary = summarise(relevant, n_relevant, ks=(10,), map_k=None)
    return summary["MAP"], summary["P@10"]


def main() -> None:
    cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    rows = []
    started = time.perf_counter()
    for name, per_class, sample in SETS:
        if name not in cache:
            cache[name] = raw_vectors(name)
        raw, labels = cache[name]
        rng = np.random.default_rng(0)
        if per_class:
            keep = np.concatenate(
                [
                    rng.choice(np.flatnonzero(labels == c), per_class, replace=False)
                    for c in np.unique(labels)
                ]
            )
            raw, labels = raw[keep], labels[keep]
        queries = np.arange(len(raw))
        if sample and sample < len(raw):
            queries = np.sort(rng.choice(len(raw), sample, replace=False))
        what = f"{name}, {per_class} per class" if per_class else name
        row = [what, str(len(raw))]
        for augment, alpha in SETTINGS:
            d = create_descriptor("cnn", augment=augment, alpha=alpha).fit_vectors(raw)
            mean_ap, p10 = loo(d.transform_vectors(raw), labels, queries)
            row.append(f"{mean_ap:.3f} / {p10:.3f}")
        rows.append(row)
        print(" | ".join(row), flush=True)
    header = ["set", "images"] + [
        "no augmentation" if a == 0 else f"augment={a}, alpha={al:g}" for a, al in SETTINGS
    ]
    text = (
        f"Leave-one-out MAP / P@10 of `cnn` (centred, cosine) by augmentation; {machine()}; "
        f"{time.perf_counter() - started:.0f} s.\n\n{md_table(header, rows)}\n"
    )
    WORK.mkdir(parents=True, exist_ok=True)
    (WORK / "augment.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
