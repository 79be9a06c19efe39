"""Evaluation: which descriptor and metric suit a set of labelled images."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cbir.config import Settings
from cbir.evaluation.datasets import LabelledSet, from_qrels, load_labelled
from cbir.evaluation.grid import GridConfig, GridProgress, GridResult, run_grid

__all__ = [
    "GridConfig",
    "GridResult",
    "LabelledSet",
    "evaluate_dataset",
    "load_labelled",
    "run_grid",
]


def evaluate_dataset(
    data: str | Path | LabelledSet,
    queries: str | Path | LabelledSet | None,
    config: GridConfig,
    output: str | Path,
    *,
    settings: Settings | None = None,
    mosaics: int = 5,
    k: int = 10,
    progress: GridProgress | None = None,
    qrels: str | Path | None = None,
) -> dict[str, Any]:
    """Load the labelled data, run the grid and write the report into ``output``. With
    ``qrels`` (a TREC qrels file whose docnos are the data's ids, e.g. relative paths), the
    judgments decide relevance instead of the labels."""
    from cbir.evaluation.report import write_report

    collection = data if isinstance(data, LabelledSet) else load_labelled(data)
    query_set = (
        queries if queries is None or isinstance(queries, LabelledSet) else load_labelled(queries)
    )
    output = Path(output)
    judgments = None
    if qrels is not None:
        judgments = from_qrels(qrels, collection)
    result = run_grid(
        collection,
        query_set,
        config,
        settings=settings,
        cache_dir=output / "features",
        progress=progress,
        qrels=judgments,
    )
    report = write_report(result, collection, query_set, output, mosaics=mosaics, k=k)
    return {**report, "rows": result.rows(), "result": result}
