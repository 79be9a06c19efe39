"""Writing a grid's results: tables, curves, per-class AP, mosaics, TREC files and a summary."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

from cbir import images
from cbir.evaluation.artefacts import (
    make_mosaic,
    plot_pr_curves,
    plot_precision_at_k,
    recommend,
    write_grid_table,
    write_per_class,
    write_results_table,
    write_trec_qrels,
    write_trec_run,
)
from cbir.evaluation.datasets import LabelledSet
from cbir.evaluation.grid import Combination, GridResult

#: qrels files list every relevant pair; past this many pairs (CIFAR-10: 50 million) they are
#: not written, and the summary says so.
MAX_QRELS_PAIRS = 5_000_000
#: Longest file name written (before the extension); file systems allow 255 bytes.
MAX_FILE_STEM = 150


def best_per_descriptor(result: GridResult, by: str = "MAP") -> list[Combination]:
    """Each descriptor's best metric, best descriptor first: what the curves show."""
    best: dict[str, Combination] = {}
    for c in result.combinations:
        if c.descriptor not in best or c.summary[by] > best[c.descriptor].summary[by]:
            best[c.descriptor] = c
    return sorted(best.values(), key=lambda c: -c.summary[by])


def write_report(
    result: GridResult,
    collection: LabelledSet,
    queries: LabelledSet | None,
    out_dir: str | Path,
    *,
    mosaics: int = 5,
    k: int = 10,
    trec_runs: int = 5,
    trec_depth: int = 100,
    seed: int = 0,
) -> dict[str, Any]:
    """Write every artefact of ``result`` into ``out_dir``; returns the recommendation and the
    files written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    query_set = queries or collection
    rows = result.rows()
    files: list[Path] = []
    files += write_results_table(rows, out)
    files += write_grid_table(
        {(c.descriptor, c.metric): c.summary["MAP"] for c in result.combinations}, out
    )
    leaders = best_per_descriptor(result)
    per_class: dict[str, dict[str, float]] = {}
    for c in leaders:
        for cls, ap in c.per_class_ap.items():
            per_class.setdefault(cls, {})[c.label] = ap
    files += [*write_per_class(per_class, out)]
    files.append(plot_pr_curves({c.label: c.curve11 for c in leaders}, out / "pr_curves.png"))
    files.append(
        plot_precision_at_k({c.label: c.precision_at for c in leaders}, out / "precision_at_k.png")
    )
    advice = recommend(rows, by="MAP")

    best = leaders[0]
    rng = np.random.default_rng(seed)
    picks = rng.choice(
        len(result.query_index), min(mosaics, len(result.query_index)), replace=False
    )
    for row in sorted(picks.tolist()):
        q = int(result.query_index[row])
        top = best.ranked[row, :k]
        results = [
            (_thumbnail(collection.items[i]), bool(rel), float(d))
            for i, d, rel in zip(
                top.tolist(),
                best.distances[row, :k].tolist(),
                best.relevant[row, :k].tolist(),
                strict=True,
            )
        ]
        name = _file_name(query_set.ids[q])
        files.append(
            make_mosaic(
                _thumbnail(query_set.items[q]),
                results,
                out / "mosaics" / f"{name}.png",
                title=f"{best.label}: query {query_set.ids[q]} (scores are distances)",
                query_caption=", ".join(sorted(query_set.labels[q])) or "query",
            )
        )

    notes = []
    if result.qrels is not None:  # the user's own judgments, as given
        given = {_safe(q): {_safe(d) for d in docs} for q, docs in result.qrels.items()}
        files.append(write_trec_qrels(given, out / "trec" / "qrels.txt"))
    elif (pairs := _relevant_pairs(result, collection, query_set)) <= MAX_QRELS_PAIRS:
        qrels = _qrels(result, collection, query_set)
        files.append(write_trec_qrels(qrels, out / "trec" / "qrels.txt"))
    else:
        notes.append(f"qrels not written: {pairs:,} relevant pairs (limit {MAX_QRELS_PAIRS:,}).")
    for c in sorted(result.combinations, key=lambda c: -c.summary["MAP"])[:trec_runs]:
        run = {
            _safe(query_set.ids[int(q)]): [
                (_safe(collection.ids[int(i)]), -float(d))  # trec_eval wants higher = better
                for i, d in zip(
                    c.ranked[row, :trec_depth], c.distances[row, :trec_depth], strict=True
                )
            ]
            for row, q in enumerate(result.query_index)
        }
        name = _safe(f"{c.descriptor}__{c.metric}")
        path = out / "trec" / f"{_file_name(name)}.run"
        files.append(write_trec_run(run, path, tag=name))
    summary = _summary_text(result, collection, queries, advice, notes, trec_depth)
    (out / "summary.md").write_text(summary)
    files.append(out / "summary.md")
    return {"recommendation": advice, "files": files, "summary": summary}


def _thumbnail(item: str | np.ndarray) -> Any:
    try:
        if isinstance(item, np.ndarray):
            return images.from_array(item)
        return images.load(item, max_side=256)
    except images.ImageError:
        return np.zeros((32, 32), dtype=np.uint8)


def _safe(name: str) -> str:
    """An identifier without whitespace or path separators (TREC ids, file names); percent-
    encoding keeps different names different."""
    return quote(name, safe="-_.+")


def _file_name(name: str) -> str:
    """``_safe(name)`` short enough for any file system (255 bytes a name): a long one (a
    fusion's full spec, a deep path) keeps its start and gets a digest of the whole."""
    safe = _safe(name)
    if len(safe) <= MAX_FILE_STEM:
        return safe
    digest = hashlib.sha1(safe.encode()).hexdigest()[:16]
    return f"{safe[: MAX_FILE_STEM - 17]}~{digest}"


def _relevant_pairs(result: GridResult, collection: LabelledSet, query_set: LabelledSet) -> int:
    counts: dict[str, int] = {}
    for labels in collection.labels:
        for lbl in labels:
            counts[lbl] = counts.get(lbl, 0) + 1
    return sum(
        max((counts.get(lbl, 0) for lbl in query_set.labels[int(q)]), default=0)
        for q in result.query_index
    )


def _qrels(
    result: GridResult, collection: LabelledSet, query_set: LabelledSet
) -> dict[str, set[str]]:
    by_label: dict[str, set[str]] = {}
    for name, labels in zip(collection.ids, collection.labels, strict=True):
        for lbl in labels:
            by_label.setdefault(lbl, set()).add(_safe(name))
    qrels = {}
    for q in result.query_index:
        qid = _safe(query_set.ids[int(q)])
        relevant = set().union(*(by_label.get(lbl, set()) for lbl in query_set.labels[int(q)]))
        if result.leave_one_out:
            relevant.discard(qid)
        qrels[qid] = relevant
    return qrels


def _summary_text(
    result: GridResult,
    collection: LabelledSet,
    queries: LabelledSet | None,
    advice: dict[str, Any],
    notes: list[str],
    trec_depth: int,
) -> str:
    protocol = (
        f"leave-one-out over {collection.name} ({len(collection):,} images)"
        if queries is None
        else f"{queries.name} ({len(queries):,} queries) against {collection.name} "
        f"({len(collection):,} images)"
    )
    n_desc = len({c.descriptor for c in result.combinations})
    extract = (
        f"{result.extract_seconds:.1f} s for {n_desc} descriptors, each image decoded once"
        if result.extract_seconds
        else "features from the cache"
    )
    lines = [
        "# Evaluation summary",
        "",
        f"- Protocol: {protocol}; {len(result.query_index):,} queries evaluated, rankings "
        f"{result.depth:,} deep (MAP is over that ranking).",
        f"- Grid: {len(result.combinations)} descriptor x metric combinations in "
        f"{result.seconds:.1f} s (extraction: {extract}).",
        f"- Skipped images: {len(result.skipped)}.",
        f"- Recommendation: {advice['text']}",
        "",
        "Files: `results.md`/`.csv` (every combination), `map_grid.md` (MAP, descriptor x "
        "metric), `per_class_ap.md`, `pr_curves.png`, `precision_at_k.png`, `mosaics/`, and "
        f"`trec/` (runs of the best combinations, {trec_depth} deep, scores = -distance; check "
        "them with `trec_eval -m map_cut.100 -m P.10 trec/qrels.txt trec/<run>`).",
        *notes,
    ]
    return "\n".join(lines) + "\n"
