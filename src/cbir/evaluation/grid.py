"""Experiment grids: every descriptor against every metric on labelled images.

The stages are kept apart (as in PyRetri): extract each descriptor once for all items (in
parallel, cached on disk), rank every query under every metric (blocked distance matrices),
score the rankings, then write tables, curves, mosaics and TREC files. Two protocols: leave-one-
out over one labelled set (each item queries all the others), or a query set against a
separate collection (e.g. CIFAR-10 test against train).
"""

from __future__ import annotations

import hashlib
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cbir import images
from cbir.config import DEFAULT_DESCRIPTORS, Settings
from cbir.evaluation.datasets import LabelledSet, Qrels, Relevance
from cbir.evaluation.measures import (
    average_precision,
    interpolated_precision_11,
    mean_over_queries,
    per_class_mean,
    precision_curve,
    summarise,
)
from cbir.extraction import Task, extract_arrays, run_tasks
from cbir.features import DerivedDescriptor, create_descriptor, metric_applies
from cbir.metrics import as_matrix, get_metric, metric_names
from cbir.store import ImageUpdate

GridProgress = Callable[[str, int, int], None]
#: Rankings longer than this are cut for large collections (full AP needs the full ranking,
#: which costs a sort of the whole collection per query); see ``GridConfig.depth``.
FULL_RANKING_LIMIT = 20_000


@dataclass
class GridConfig:
    """What to run. ``metrics=None`` means every metric that applies to each descriptor."""

    descriptors: Sequence[str] = DEFAULT_DESCRIPTORS
    metrics: Sequence[str] | None = None
    ks: Sequence[int] = (10,)
    map_k: int = 100
    #: ranking depth; None = the whole collection up to FULL_RANKING_LIMIT items, else 1000
    depth: int | None = None
    #: evaluate only this many (seeded random) queries; None = all
    sample_queries: int | None = None
    seed: int = 0
    #: average query expansion: each query searches again averaged with its top ``expand``
    #: results (0 = off); reported as metric "<name>+qe<k>"
    expand: int = 0
    #: ranked results kept per query for mosaics and TREC runs (the measures see the full
    #: ranking; keeping all of it for every combination would cost gigabytes)
    keep: int = 100


@dataclass
class Combination:
    """The scores of one descriptor under one metric."""

    descriptor: str
    metric: str
    summary: dict[str, float]
    curve11: np.ndarray
    precision_at: tuple[np.ndarray, np.ndarray]
    per_class_ap: dict[str, float]
    query_ms: float
    ranked: np.ndarray  # (q, keep) collection indices, best first
    distances: np.ndarray  # (q, keep)
    relevant: np.ndarray  # (q, keep) bool: is ranked[i, j] relevant to query i

    @property
    def label(self) -> str:
        return f"{self.descriptor} / {self.metric}"

    def row(self) -> dict[str, Any]:
        return {
            "descriptor": self.descriptor,
            "metric": self.metric,
            **self.summary,
            "query ms": round(self.query_ms, 3),
        }


@dataclass
class GridResult:
    """Everything a grid run measured."""

    combinations: list[Combination]
    query_index: np.ndarray  # indices into the query set of the evaluated queries
    leave_one_out: bool
    depth: int
    #: the judgments used, when they came from a qrels file rather than labels
    qrels: Qrels | None
    #: seconds spent extracting (0 when every descriptor came from the cache)
    extract_seconds: float
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    def rows(self) -> list[dict[str, Any]]:
        return [c.row() for c in self.combinations]


def applicable_metrics(descriptor: str, metrics: Sequence[str] | None) -> list[str]:
    """The metrics to try with a descriptor (``None``: every one that applies to it)."""
    names = metric_names() if metrics is None else [get_metric(m).name for m in metrics]
    return [m for m in names if metric_applies(descriptor, m)]


# -- stage 1: extraction -----------------------------------------------------------------------
def extract_features(
    data: LabelledSet,
    specs: Sequence[str],
    *,
    settings: Settings,
    cache_dir: Path | None = None,
    progress: GridProgress | None = None,
    states: dict[str, str] | None = None,
) -> tuple[dict[str, np.ndarray], np.ndarray, list[tuple[str, str]], float]:
    """Vectors of every item for every descriptor, decoding each item once.

    Returns ``(features by spec, ok mask, skipped (id, reason), seconds)``. Items that
    cannot be decoded are masked out everywhere. Features are cached in ``cache_dir`` keyed by
    the descriptor spec and the item ids, so re-running a grid with other metrics is cheap.
    """
    specs = [create_descriptor(s).spec for s in specs]
    fingerprint = hashlib.sha1("\n".join(data.ids).encode()).hexdigest()[:16]
    features: dict[str, np.ndarray] = {}
    seconds = 0.0
    ok = np.ones(len(data), dtype=bool)
    todo = []
    for spec in specs:
        cached = _cache_path(cache_dir, spec, fingerprint)
        if cached is not None and cached.exists():
            with np.load(cached) as z:
                features[spec], mask = z["features"], z["ok"]
            ok &= mask
        else:
            todo.append(spec)
    skipped: list[tuple[str, str]] = []
    if todo:
        dims = {s: create_descriptor(s).dim for s in todo}
        out = {s: np.zeros((len(data), dims[s]), dtype=np.float32) for s in todo}
        fresh_ok = np.ones(len(data), dtype=bool)
        tasks = [  # arrays travel in the task, named by their id; files by their path
            Task(name, tuple(todo), array=item)
            if isinstance(item, np.ndarray)
            else Task(str(item), tuple(todo))
            for name, item in zip(data.ids, data.items, strict=True)
        ]
        position = {t.path: i for i, t in enumerate(tasks)}
        done = 0

        def on_result(update: ImageUpdate) -> None:
            nonlocal done
            done += 1
            i = position[update.path]
            if update.status != "ok":
                fresh_ok[i] = False
                skipped.append((data.ids[i], update.reason or "unknown reason"))
            else:
                for s, vec in update.vectors.items():
                    out[s][i] = vec
            if progress is not None and done % 64 == 0:
                progress("extracting", done, len(tasks))

        started = time.perf_counter()
        run_tasks(
            tasks,
            workers=settings.worker_count,
            max_pixels=settings.max_pixels,
            on_result=on_result,
            states=states,
        )
        seconds = time.perf_counter() - started  # one decode per image served them all
        for spec in todo:
            features[spec] = out[spec]
            cached = _cache_path(cache_dir, spec, fingerprint)
            if cached is not None:
                cached.parent.mkdir(parents=True, exist_ok=True)
                np.savez(cached, features=out[spec], ok=fresh_ok)
        ok &= fresh_ok
    return features, ok, skipped, seconds


def _cache_path(cache_dir: Path | None, spec: str, fingerprint: str) -> Path | None:
    if cache_dir is None:
        return None
    key = hashlib.sha1(f"{spec}|{fingerprint}".encode()).hexdigest()[:16]
    return cache_dir / f"{spec.split(':')[0]}-{key}.npz"


# -- stage 2: ranking --------------------------------------------------------------------------
def rank(
    metric: str,
    queries: np.ndarray,
    collection: np.ndarray,
    depth: int,
    *,
    self_index: np.ndarray | None = None,
    block: int = 256,
    expand: int = 0,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Top ``depth`` collection indices and distances per query, and seconds per query.

    ``self_index[i]`` (leave-one-out) is the collection index of query ``i``, which is removed
    from its own ranking. Ties are broken by collection index, so results are reproducible.
    ``expand`` > 0 ranks again with each query averaged with its top ``expand`` results.
    """
    m = get_metric(metric)
    PC = m.prepare(as_matrix(collection))
    n = len(collection)
    depth = min(depth, n - (1 if self_index is not None else 0))
    ranked = np.empty((len(queries), depth), dtype=np.int64)
    dists = np.empty((len(queries), depth))
    started = time.perf_counter()
    C = as_matrix(collection) if expand else None
    for lo in range(0, len(queries), block):
        Q = as_matrix(queries[lo : lo + block])
        D = _distances(m, Q, PC, self_index, lo, block)
        if C is not None:  # average query expansion, vectorised over the whole block
            near = np.argpartition(D, min(expand, n) - 1, axis=1)[:, :expand]
            Q = (Q + C[near].sum(axis=1)) / (1 + near.shape[1])
            D = _distances(m, Q, PC, self_index, lo, block)
        if depth < n // 2:
            part = np.argpartition(D, depth - 1, axis=1)[:, :depth]
            part_d = np.take_along_axis(D, part, axis=1)
            order = np.lexsort((part, part_d), axis=-1)
            top = np.take_along_axis(part, order, axis=1)
        else:
            top = np.argsort(D, axis=1, kind="stable")[:, :depth]
        ranked[lo : lo + block] = top
        dists[lo : lo + block] = np.take_along_axis(D, top, axis=1)
    per_query = (time.perf_counter() - started) / max(1, len(queries))
    return ranked, dists, per_query


def _distances(
    m: Any, Q: np.ndarray, PC: Any, self_index: np.ndarray | None, lo: int, block: int
) -> np.ndarray:
    """Distances of a block of queries to the collection, each query's own row excluded."""
    D = m.compare(m.prepare(Q), PC)
    if self_index is not None:
        D[np.arange(len(D)), self_index[lo : lo + block]] = np.inf
    return D


# -- the whole grid ----------------------------------------------------------------------------
def run_grid(
    collection: LabelledSet,
    queries: LabelledSet | None = None,
    config: GridConfig | None = None,
    *,
    settings: Settings | None = None,
    cache_dir: Path | None = None,
    progress: GridProgress | None = None,
    qrels: Qrels | None = None,
) -> GridResult:
    """Score every (descriptor, metric) on ``collection`` (leave-one-out when ``queries`` is
    None, else ``queries`` against ``collection``). Relevant means sharing a label, or, with
    ``qrels``, what the judgments say (then only the judged queries are evaluated)."""
    config = config or GridConfig()
    settings = settings or Settings.from_env()
    started = time.perf_counter()
    specs = [create_descriptor(d).spec for d in config.descriptors]
    if not specs:
        raise ValueError("give at least one descriptor")
    loo = queries is None
    for spec in specs:
        if create_descriptor(spec).needs_labels and loo:
            raise ValueError(
                f"{spec.split(':')[0]} learns from the labels it would be scored on; evaluate "
                "it with a separate query set (--queries), e.g. CIFAR-10 test against train"
            )
    learned = [s for s in specs if create_descriptor(s).requires_fit]
    derived = {s: create_descriptor(s) for s in learned if _derives(create_descriptor(s))}
    from_images = [s for s in learned if s not in derived]
    extract_specs = list(
        dict.fromkeys(
            [s for s in specs if s not in learned] + [d.base.spec for d in derived.values()]
        )
    )
    feats_c, ok_c, skipped, seconds = extract_features(
        collection, extract_specs, settings=settings, cache_dir=cache_dir, progress=progress
    )
    states: dict[str, str] = {}

    def add_fitted(data: LabelledSet, extracted: tuple) -> tuple:
        """The extraction result with the descriptors fitted on images added to it."""
        if not from_images:
            return extracted
        feats, ok, skipped_, seconds_ = extracted
        fitted, ok_f, skipped_f, seconds_f = extract_features(
            data, from_images, settings=settings, progress=progress, states=states
        )
        return {**feats, **fitted}, ok & ok_f, skipped_ + skipped_f, seconds_ + seconds_f

    with tempfile.TemporaryDirectory(prefix="cbir-fit-") as state_dir:
        if from_images:
            seconds += _fit_on_images(collection, ok_c, from_images, settings, state_dir, states)
        feats_c, ok_c, skipped, seconds = add_fitted(collection, (feats_c, ok_c, skipped, seconds))
        if loo:
            feats_q, ok_q = feats_c, ok_c
            query_set = collection
        else:
            assert queries is not None
            feats_q, ok_q, skipped_q, seconds_q = add_fitted(
                queries,
                extract_features(
                    queries,
                    extract_specs,
                    settings=settings,
                    cache_dir=cache_dir,
                    progress=progress,
                ),
            )
            skipped += skipped_q
            seconds += seconds_q
            query_set = queries
    for spec, d in derived.items():  # fitted on the collection's vectors (and labels)
        base = feats_c[d.base.spec]
        labels = [_one_label(collection.labels[i]) for i in np.flatnonzero(ok_c)]
        d.fit_vectors(base[ok_c], labels if d.needs_labels else None)
        feats_c[spec] = d.transform_vectors(base)
        if not loo:
            feats_q[spec] = d.transform_vectors(feats_q[d.base.spec])
        if progress is not None:
            progress(f"fitted {spec.split(':')[0]}", 1, 1)
    coll_index = np.flatnonzero(ok_c)
    query_index = np.flatnonzero(ok_q)
    if qrels is not None:
        judged = np.array([query_set.ids[i] in qrels for i in query_index], dtype=bool)
        query_index = query_index[judged] if len(query_index) else query_index
    if config.sample_queries is not None and config.sample_queries < len(query_index):
        rng = np.random.default_rng(config.seed)
        query_index = np.sort(rng.choice(query_index, config.sample_queries, replace=False))
    if len(coll_index) < 2 or len(query_index) == 0:
        raise ValueError("too few usable images to evaluate (see the skipped files)")

    coll_labels = [collection.labels[i] for i in coll_index]
    q_labels = [query_set.labels[i] for i in query_index]
    if qrels is None:
        relevance = Relevance.from_labels(q_labels, coll_labels)
    else:
        relevance = Relevance.from_qrels(
            qrels, [query_set.ids[i] for i in query_index], [collection.ids[i] for i in coll_index]
        )
    n = len(coll_index)
    depth = config.depth or (n if n <= FULL_RANKING_LIMIT else 1000)
    self_pos = None
    if loo:  # position of each query inside coll_index
        self_pos = np.searchsorted(coll_index, query_index)
    q_local = np.arange(len(query_index))
    n_relevant = relevance.counts(q_local)
    if self_pos is not None:  # a query never counts itself (it is not in its own ranking)
        n_relevant -= relevance.matrix(q_local, self_pos[:, None])[:, 0]
    classes = np.array([sorted(lbl)[0] if lbl else "" for lbl in q_labels])

    plan = [(s, m) for s in specs for m in applicable_metrics(s, config.metrics)]
    if not plan:
        raise ValueError("no metric applies to the given descriptors")
    combos = []
    for done, (spec, metric) in enumerate(plan):
        if progress is not None:
            progress(f"{spec.split(':')[0]} / {metric}", done, len(plan))
        ranked, dists, per_query = rank(
            metric,
            feats_q[spec][query_index],
            feats_c[spec][coll_index],
            depth,
            self_index=self_pos,
            expand=config.expand,
        )
        rel = relevance.matrix(q_local, ranked)
        ap = average_precision(rel, n_relevant)
        ks = np.array([k for k in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000) if k <= rel.shape[1]])
        combos.append(
            Combination(
                descriptor=create_descriptor(spec).short_spec,
                metric=f"{metric}+qe{config.expand}" if config.expand else metric,
                summary=summarise(rel, n_relevant, ks=tuple(config.ks), map_k=config.map_k),
                curve11=mean_over_queries(interpolated_precision_11(rel, n_relevant))[0],
                # queries with nothing relevant are left out, as in summarise
                precision_at=(ks, mean_over_queries(precision_curve(rel, ks)[n_relevant > 0])[0]),
                per_class_ap=per_class_mean(ap, classes),
                query_ms=per_query * 1000,
                ranked=coll_index[ranked[:, : config.keep]],
                distances=dists[:, : config.keep].copy(),
                relevant=rel[:, : config.keep].copy(),
            )
        )
    if progress is not None:
        progress("done", len(plan), len(plan))
    return GridResult(
        combinations=combos,
        query_index=query_index,
        leave_one_out=loo,
        depth=depth,
        qrels=qrels,
        extract_seconds=seconds,
        skipped=skipped,
        seconds=time.perf_counter() - started,
    )


def _derives(d: Any) -> bool:
    return isinstance(d, DerivedDescriptor) and d.derives


def _one_label(labels: Any) -> str | None:
    """The label a classifier trains on: the item's only (or first) label."""
    return sorted(labels)[0] if labels else None


def _fit_on_images(
    data: LabelledSet,
    ok: np.ndarray,
    specs: Sequence[str],
    settings: Settings,
    state_dir: str,
    states: dict[str, str],
) -> float:
    """Fit descriptors that learn from images on a seeded sample of the collection, saving each
    one's state to a file the extraction workers load. Returns the seconds it took."""
    started = time.perf_counter()
    rng = np.random.default_rng(0)
    for spec in specs:
        d = create_descriptor(spec)
        usable = np.flatnonzero(ok)
        if len(usable) > d.fit_sample:
            usable = np.sort(rng.choice(usable, d.fit_sample, replace=False))
        arrays, labels = [], []
        for i in usable:
            item = data.items[i]
            try:
                if isinstance(item, np.ndarray):
                    arrays.append(images.to_array(images.from_array(item), d.input_spec))
                else:
                    arrays.append(extract_arrays(item, d, max_pixels=settings.max_pixels))
                labels.append(_one_label(data.labels[i]))
            except images.ImageError:
                continue
        d.fit(arrays, labels if d.needs_labels else None)
        path = Path(state_dir) / f"{len(states)}.npz"
        np.savez(path, **d.get_state())
        states[spec] = str(path)
    return time.perf_counter() - started
