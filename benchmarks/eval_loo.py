"""Leave-one-out MAP and P@10 of each hand-crafted descriptor on dtd10, under every metric.

Every image queries all the others; relevant = same folder. AP is over the full ranking.
(The evaluation issue brings the full tooling; this is the small script the foundation needs.)
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
from common import WORK, dataset, md_table, publish

from cbir.collection import Collection
from cbir.config import DEFAULT_DESCRIPTORS, Settings
from cbir.features import create_descriptor, metrics_for
from cbir.metrics import get_metric

SECTION = "## Leave-one-out retrieval on dtd10"
INTRO = "Every image queries all the others (`benchmarks/eval_loo.py`); relevant: the same class."


def loo_scores(D: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """MAP (full ranking) and mean P@10, leaving each query out of its own ranking."""
    n = len(labels)
    D = D.copy()
    np.fill_diagonal(D, np.inf)
    order = np.argsort(D, axis=1, kind="stable")[:, : n - 1]
    rel = labels[order] == labels[:, None]
    hits = np.cumsum(rel, axis=1)
    ranks = np.arange(1, n)
    n_rel = rel.sum(axis=1)
    ap = (hits / ranks * rel).sum(axis=1) / np.maximum(n_rel, 1)
    p10 = rel[:, :10].mean(axis=1)
    return float(ap.mean()), float(p10.mean())


def main(name: str = "dtd10") -> str:
    col_dir = WORK / f"loo-{name}"
    with Collection(col_dir, settings=Settings(collection=col_dir, workers=2)) as col:
        col.add(dataset(name), descriptors=list(DEFAULT_DESCRIPTORS), labels="folder")
        rows, grid = [], {}
        current = {create_descriptor(d).spec for d in DEFAULT_DESCRIPTORS}
        for record in (d for d in col.descriptors if d.spec in current):
            ids, X = col.vectors(record.spec)
            labels = np.array(col.store.labels(ids))
            best = None
            for metric in metrics_for(record.name):
                m = get_metric(metric)
                scores = loo_scores(m.pairwise(X), labels)
                grid[(record.name, metric)] = scores
                if best is None or scores[0] > best[1][0]:
                    best = (metric, scores)
            default = grid[(record.name, record.metric)]
            rows.append(
                [
                    record.name,
                    record.metric,
                    f"{default[0]:.3f}",
                    f"{default[1]:.3f}",
                    best[0],
                    f"{best[1][0]:.3f}",
                ]
            )
    metrics = sorted({m for _, m in grid})
    full = md_table(
        ["descriptor", *metrics],
        [
            [
                d.split(":")[0],
                *[f"{grid[(d, m)][0]:.3f}" if (d, m) in grid else "-" for m in metrics],
            ]
            for d in dict.fromkeys(k[0] for k in grid)
        ],
    )
    text = (
        md_table(["descriptor", "default metric", "MAP", "P@10", "best metric", "its MAP"], rows)
        + "\n\nMAP of every descriptor x metric:\n\n"
        + full
    )
    print(text)
    return text


if __name__ == "__main__":
    publish(SECTION, INTRO, main(*(sys.argv[1:2] or [])))
