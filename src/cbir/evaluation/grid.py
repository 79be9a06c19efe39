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

from cbir.config import DEFAULT_DESCRIPTORS, Settings
from cbir.errors import InvalidRequestError
from cbir.evaluation.datasets import LabelledSet, Qrels, Relevance
from cbir.evaluation.measures import (
    average_precision,
    interpolated_precision_11,
    mean_over_queries,
    per_class_mean,
    precision_curve,
    summarise,
)
from cbir.extraction import Task, run_tasks
from cbir.features import create_descriptor, metric_applies
from cbir.holdings import derives, short_label
from cbir.index import VectorIndex, create_index
from cbir.index.manager import choose_kind
from cbir.ingest import fit_on_images
from cbir.metrics import as_matrix, get_metric, metric_names
from cbir.search.combine import expand_each
from cbir.search.request import MAX_EXPAND
from cbir.store import ImageUpdate

GridProgress = Callable[[str, int, int], None]
#: Rankings longer than this are cut for large collections (full AP needs the full ranking,
#: which costs a sort of the whole collection per query); see ``GridConfig.depth``.
FULL_RANKING_LIMIT = 20_000
#: ... and then cut at this depth.
FULL_RANKING_CUT = 1000


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

    def __post_init__(self) -> None:
        # a metric may be given as a comma-separated list ("chi2,cosine"), as users type them
        if self.metrics is not None:
            names = [m.strip() for item in self.metrics for m in item.split(",") if m.strip()]
            self.metrics = names or None
        # each value is checked here, named as the user gave it, before any work is done
        for name, value in (("map_k", self.map_k), ("keep", self.keep)):
            _require_int(name, value, low=1)
        for k in self.ks:
            _require_int("k", k, low=1)
        for name, value in (("depth", self.depth), ("sample_queries", self.sample_queries)):
            if value is not None:
                _require_int(name, value, low=1)
        _require_int("expand", self.expand, low=0, high=MAX_EXPAND)


def _require_int(name: str, value: Any, *, low: int, high: int | None = None) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low
    if not ok or (high is not None and value > high):
        allowed = f"{low}..{high}" if high is not None else f"{low} or more"
        raise InvalidRequestError(f"{name} must be an integer, {allowed}; got {value!r}")


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


@dataclass
class Features:
    """Vectors of every item of one labelled set, by descriptor spec, and which items are
    usable (an item that cannot be decoded is masked out everywhere)."""

    by_spec: dict[str, np.ndarray]
    ok: np.ndarray
    skipped: list[tuple[str, str]]
    seconds: float

    def merged(self, other: Features) -> Features:
        """These features and ``other``'s, of the same items."""
        return Features(
            {**self.by_spec, **other.by_spec},
            self.ok & other.ok,
            self.skipped + other.skipped,
            self.seconds + other.seconds,
        )


# -- stage 1: extraction -----------------------------------------------------------------------
def extract_features(
    data: LabelledSet,
    specs: Sequence[str],
    *,
    settings: Settings,
    cache_dir: Path | None = None,
    progress: GridProgress | None = None,
    states: dict[str, str] | None = None,
) -> Features:
    """Vectors of every item for every descriptor, decoding each item once.

    Items that cannot be decoded are masked out everywhere. Features are cached in
    ``cache_dir`` keyed by the descriptor spec and the item ids, so re-running a grid with other
    metrics is cheap.
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
        if not run_tasks(
            tasks,
            workers=settings.worker_count,
            limits=settings.limits,
            on_result=on_result,
            states=states,
        ):
            raise KeyboardInterrupt  # Ctrl-C: an evaluation has nothing worth keeping half-done
        seconds = time.perf_counter() - started  # one decode per image served them all
        for spec in todo:
            features[spec] = out[spec]
            cached = _cache_path(cache_dir, spec, fingerprint)
            if cached is not None:
                cached.parent.mkdir(parents=True, exist_ok=True)
                np.savez(cached, features=out[spec], ok=fresh_ok)
        ok &= fresh_ok
    return Features(features, ok, skipped, seconds)


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
    index: str = "exact",
) -> tuple[np.ndarray, np.ndarray, float]:
    """Top ``depth`` collection indices and distances per query, and seconds per query.

    Ranks through the same index and expansion code as ``Collection.search``: an index of kind
    ``index`` (exact by default) whose ids are the collection's row numbers. ``self_index[i]``
    (leave-one-out) is the collection index of query ``i``, which is removed from its own
    ranking. Exact search breaks ties by collection index, so results are reproducible.
    ``expand`` > 0 ranks again with each query
    averaged with its top ``expand`` results.
    """
    C = as_matrix(collection)
    n = len(C)
    searched = create_index(index, metric=metric, dim=C.shape[1])
    searched.add(np.arange(n), C)
    depth = min(depth, n - (1 if self_index is not None else 0))
    ranked = np.empty((len(queries), depth), dtype=np.int64)
    dists = np.empty((len(queries), depth))
    started = time.perf_counter()
    for lo in range(0, len(queries), block):
        Q = as_matrix(queries[lo : lo + block])
        own = None if self_index is None else self_index[lo : lo + block]
        if expand:  # average query expansion, vectorised over the whole block
            near, _ = _ranking(searched, Q, min(expand, depth), own)
            Q = expand_each(Q, C[near])
        ranked[lo : lo + block], dists[lo : lo + block] = _ranking(searched, Q, depth, own)
    per_query = (time.perf_counter() - started) / max(1, len(queries))
    return ranked, dists, per_query


def _ranking(
    index: VectorIndex, Q: np.ndarray, k: int, own: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """Each query's top ``k`` ids and distances, without its own row (``own``) when given."""
    if own is None:
        distances, ids = index.search(Q, k)
        return ids, distances
    distances, ids = index.search(Q, k + 1)
    keep = ids != own[:, None]
    keep[keep.all(axis=1), -1] = False  # its own row was not among them: drop the last
    return ids[keep].reshape(len(Q), k), distances[keep].reshape(len(Q), k)


# -- the whole grid ----------------------------------------------------------------------------
@dataclass(frozen=True)
class _Specs:
    """The grid's descriptors, by how their vectors are made."""

    all: list[str]
    #: fitted on the collection's stored vectors (and labels), computed from their base's
    derived: dict[str, Any]
    #: fitted on the collection's images, then extracted
    from_images: list[str]
    #: extracted directly (including the bases of the derived ones)
    extracted: list[str]


@dataclass(frozen=True)
class _Protocol:
    """Which items are evaluated, and what is relevant to each query."""

    coll_index: np.ndarray  # usable collection items
    query_index: np.ndarray  # evaluated queries (indices into the query set)
    relevance: Relevance
    n_relevant: np.ndarray
    #: leave-one-out: each query's position in ``coll_index`` (removed from its own ranking)
    self_pos: np.ndarray | None
    classes: np.ndarray  # each query's class, for per-class AP
    depth: int


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
    specs = _sort_specs(config, loo=queries is None)
    plan = [(s, m) for s in specs.all for m in applicable_metrics(s, config.metrics)]
    if not plan:
        raise ValueError("no metric applies to the given descriptors")
    coll, query = _features(collection, queries, specs, settings, cache_dir, progress)
    query_set = queries if queries is not None else collection
    protocol = _protocol(collection, query_set, coll.ok, query.ok, config, qrels)
    combos = []
    for done, (spec, metric) in enumerate(plan):
        if progress is not None:
            progress(f"{short_label(spec)} / {metric}", done, len(plan))
        combos.append(_score(spec, metric, coll, query, protocol, config, settings))
    if progress is not None:
        progress("done", len(plan), len(plan))
    return GridResult(
        combinations=combos,
        query_index=protocol.query_index,
        leave_one_out=queries is None,
        depth=protocol.depth,
        qrels=qrels,
        extract_seconds=coll.seconds + (query.seconds if query is not coll else 0.0),
        skipped=coll.skipped + (query.skipped if query is not coll else []),
        seconds=time.perf_counter() - started,
    )


def _sort_specs(config: GridConfig, *, loo: bool) -> _Specs:
    specs = [create_descriptor(d).spec for d in config.descriptors]
    if not specs:
        raise ValueError("give at least one descriptor")
    for spec in specs:
        if create_descriptor(spec).needs_labels and loo:
            raise ValueError(
                f"{short_label(spec)} learns from the labels it would be scored on; evaluate "
                "it with a separate query set (--queries), e.g. CIFAR-10 test against train"
            )
    learned = [s for s in specs if create_descriptor(s).requires_fit]
    derived = {s: create_descriptor(s) for s in learned if derives(create_descriptor(s))}
    plain = [s for s in specs if s not in learned] + [d.base.spec for d in derived.values()]
    return _Specs(
        all=specs,
        derived=derived,
        from_images=[s for s in learned if s not in derived],
        extracted=list(dict.fromkeys(plain)),
    )


def _features(
    collection: LabelledSet,
    queries: LabelledSet | None,
    specs: _Specs,
    settings: Settings,
    cache_dir: Path | None,
    progress: GridProgress | None,
) -> tuple[Features, Features]:
    """Every descriptor's vectors of the collection and of the queries (the same object in
    leave-one-out), fitting on the collection what learns from it, as a collection does."""

    def extract(data: LabelledSet) -> Features:
        return extract_features(
            data, specs.extracted, settings=settings, cache_dir=cache_dir, progress=progress
        )

    coll = extract(collection)
    states: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="cbir-fit-") as state_dir:
        if specs.from_images:
            coll.seconds += _fit_on_images(
                collection, coll.ok, specs.from_images, settings, state_dir, states
            )

        def with_fitted(data: LabelledSet, base: Features) -> Features:
            if not specs.from_images:
                return base
            fitted = extract_features(
                data, specs.from_images, settings=settings, progress=progress, states=states
            )
            return base.merged(fitted)

        coll = with_fitted(collection, coll)
        query = coll if queries is None else with_fitted(queries, extract(queries))
    for spec, d in specs.derived.items():  # fitted on the collection's vectors (and labels)
        base = coll.by_spec[d.base.spec]
        labels = [_one_label(collection.labels[i]) for i in np.flatnonzero(coll.ok)]
        d.fit_vectors(base[coll.ok], labels if d.needs_labels else None)
        coll.by_spec[spec] = d.transform_vectors(base)
        if query is not coll:
            query.by_spec[spec] = d.transform_vectors(query.by_spec[d.base.spec])
        if progress is not None:
            progress(f"fitted {short_label(spec)}", 1, 1)
    return coll, query


def _protocol(
    collection: LabelledSet,
    query_set: LabelledSet,
    coll_ok: np.ndarray,
    query_ok: np.ndarray,
    config: GridConfig,
    qrels: Qrels | None,
) -> _Protocol:
    """The evaluated queries (judged ones only with qrels; a seeded sample if asked) and what
    is relevant to each."""
    loo = query_set is collection
    coll_index = np.flatnonzero(coll_ok)
    query_index = np.flatnonzero(query_ok)
    if qrels is not None:
        judged = np.array([query_set.ids[i] in qrels for i in query_index], dtype=bool)
        query_index = query_index[judged] if len(query_index) else query_index
    if config.sample_queries is not None and config.sample_queries < len(query_index):
        rng = np.random.default_rng(config.seed)
        query_index = np.sort(rng.choice(query_index, config.sample_queries, replace=False))
    if len(coll_index) < 2 or len(query_index) == 0:
        raise ValueError("too few usable images to evaluate (see the skipped files)")
    q_labels = [query_set.labels[i] for i in query_index]
    if qrels is None:
        relevance = Relevance.from_labels(q_labels, [collection.labels[i] for i in coll_index])
    else:
        relevance = Relevance.from_qrels(
            qrels, [query_set.ids[i] for i in query_index], [collection.ids[i] for i in coll_index]
        )
    n = len(coll_index)
    self_pos = np.searchsorted(coll_index, query_index) if loo else None
    q_local = np.arange(len(query_index))
    n_relevant = relevance.counts(q_local)
    if self_pos is not None:  # a query never counts itself (it is not in its own ranking)
        n_relevant -= relevance.matrix(q_local, self_pos[:, None])[:, 0]
    return _Protocol(
        coll_index=coll_index,
        query_index=query_index,
        relevance=relevance,
        n_relevant=n_relevant,
        self_pos=self_pos,
        classes=np.array([sorted(lbl)[0] if lbl else "" for lbl in q_labels]),
        depth=config.depth or (n if n <= FULL_RANKING_LIMIT else FULL_RANKING_CUT),
    )


#: Cut-offs of the precision-at-k curve.
CURVE_KS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)


def _score(
    spec: str,
    metric: str,
    coll: Features,
    query: Features,
    protocol: _Protocol,
    config: GridConfig,
    settings: Settings,
) -> Combination:
    """Rank the evaluated queries under one descriptor and metric, and measure the rankings
    (through the index a collection of this size would use under ``settings``)."""
    p = protocol
    vectors = coll.by_spec[spec][p.coll_index]
    ranked, dists, per_query = rank(
        metric,
        query.by_spec[spec][p.query_index],
        vectors,
        p.depth,
        self_index=p.self_pos,
        expand=config.expand,
        index=choose_kind(settings, len(vectors), vectors.shape[1]),
    )
    rel = p.relevance.matrix(np.arange(len(p.query_index)), ranked)
    ap = average_precision(rel, p.n_relevant)
    ks = np.array([k for k in CURVE_KS if k <= rel.shape[1]])
    return Combination(
        descriptor=short_label(spec),
        metric=f"{metric}+qe{config.expand}" if config.expand else metric,
        summary=summarise(rel, p.n_relevant, ks=tuple(config.ks), map_k=config.map_k),
        curve11=mean_over_queries(interpolated_precision_11(rel, p.n_relevant))[0],
        # queries with nothing relevant are left out, as in summarise
        precision_at=(ks, mean_over_queries(precision_curve(rel, ks)[p.n_relevant > 0])[0]),
        per_class_ap=per_class_mean(ap, p.classes),
        query_ms=per_query * 1000,
        ranked=p.coll_index[ranked[:, : config.keep]],
        distances=dists[:, : config.keep].copy(),
        relevant=rel[:, : config.keep].copy(),
    )


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
    """Fit descriptors that learn from images on the collection's usable items (as
    ``Collection`` fits them), saving each one's state to a file the extraction workers load.
    Returns the seconds it took."""
    started = time.perf_counter()
    usable = np.flatnonzero(ok)
    items = [data.items[i] for i in usable]
    labels = [_one_label(data.labels[i]) for i in usable]
    for spec in specs:
        d = create_descriptor(spec)
        fit_on_images(d, items, labels, settings.limits)
        path = Path(state_dir) / f"{len(states)}.npz"
        np.savez(path, **d.get_state())
        states[spec] = str(path)
    return time.perf_counter() - started
