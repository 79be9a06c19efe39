"""The Python API: a collection of images you can add to, search and inspect.

>>> col = Collection("photos.cbir")
>>> col.add("~/Pictures", labels="folder")
>>> col.search("query.jpg", k=10, descriptor="color-regional", metric="chi2")

A thin facade over the rooms that do the work: ``ingest`` (discover, plan, extract, fit),
``search`` (query vectors, ranking, fusion, expansion) over the ``index`` manager, ``export``,
all on one ``store``. The CLI and the server are thin faces over this class.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cbir import holdings
from cbir.check import CheckReport, check_collection
from cbir.config import Settings
from cbir.errors import InvalidRequestError, NotFoundError
from cbir.export import export
from cbir.features import Descriptor, get_descriptor_class, metrics_for
from cbir.index.manager import IndexManager, SearchIndex, choose_kind
from cbir.ingest import (
    LABEL_SOURCES,
    REFIT_GROWTH,
    FitReport,
    IndexInterrupted,
    IndexReport,
    Ingest,
    Labels,
    ProgressCallback,
    Run,
)
from cbir.search.explain import Explanation, explain
from cbir.search.feedback import Feedback
from cbir.search.request import SearchRequest
from cbir.search.result import Hit, SearchResult
from cbir.search.searcher import Query, QueryLike, Searcher
from cbir.store import DescriptorRecord, ImageRecord, Store
from cbir.thumbnails import DEFAULT_SIDE, thumbnail

__all__ = [
    "LABEL_SOURCES",
    "REFIT_GROWTH",
    "Collection",
    "FitReport",
    "IndexInterrupted",
    "IndexReport",
    "ProgressCallback",
    "QueryLike",
]


class Collection:
    """A collection directory: catalogue, vectors of each descriptor, search.

    Safe to share between threads: searches may run in several at once, and one thread at a
    time writes (another gets ``cbir.errors.BusyError``, as another process does).
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        settings: Settings | None = None,
        create: bool = True,
    ) -> None:
        self.settings = settings or Settings.from_env()
        self.path = Path(path) if path is not None else self.settings.collection
        self.store = Store(self.path, create=create)
        self.indexes = IndexManager(self.store, self.settings)
        self._ingest = Ingest(self.store, self.settings)
        self._searcher = Searcher(self.store, self.settings, self.indexes)

    def close(self) -> None:
        """Save updated indexes, release the catalogue (and the write lock, if held)."""
        self.indexes.save()
        self.store.close()

    def __enter__(self) -> Collection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return self.store.counts()["ok"]

    # -- descriptors ---------------------------------------------------------------------------
    @property
    def descriptors(self) -> list[DescriptorRecord]:
        """The descriptors this collection holds vectors for (the first is the default)."""
        return self.store.descriptors()

    def descriptor(self, spec: str | None = None) -> DescriptorRecord:
        """The collection's descriptor matching ``spec`` (a name, or a name with parameters)."""
        return holdings.find(self.store, spec)

    def instance(self, record: DescriptorRecord) -> Descriptor:
        """A ready descriptor object for a record, with what it learned from this collection."""
        return holdings.instance(self.store, record)

    # -- adding and removing -------------------------------------------------------------------
    def add(
        self,
        *sources: str | os.PathLike[str],
        descriptors: Sequence[str | Descriptor] | None = None,
        labels: Labels = None,
        all_files: bool = False,
        retry_skipped: bool = False,
        progress: ProgressCallback | None = None,
        cancel: threading.Event | None = None,
    ) -> IndexReport:
        """Add folders (recursively) and files; re-extract changed ones, keep unchanged ones.

        ``descriptors`` adds descriptors to the collection (a new collection without them gets
        the settings' defaults); every image gets vectors for every descriptor the collection
        holds. ``labels="folder"`` labels each image with the first folder below its source
        folder; a dict maps paths to labels. Files skipped before are retried only when they
        changed, or with ``retry_skipped`` (e.g. after raising ``max_pixels``). Ctrl-C, or
        setting ``cancel`` from another thread, raises :class:`IndexInterrupted` after the
        finished work is saved.
        """
        return self._ingest.add(
            sources,
            descriptors=descriptors,
            labels=labels,
            all_files=all_files,
            retry_skipped=retry_skipped,
            run=Run(progress, cancel),
        )

    def fit(
        self,
        descriptor: str | None = None,
        *,
        progress: ProgressCallback | None = None,
        cancel: threading.Event | None = None,
    ) -> FitReport:
        """(Re)fit a descriptor that learns from the collection on what the collection holds
        now, and recompute its vectors. Returns what the fit reported (e.g. held-out accuracy)."""
        record = self.descriptor(descriptor)
        info = self._ingest.fit(record, Run(progress, cancel))
        return FitReport(holdings.short_label(record.spec), info)

    def remove(self, paths: Iterable[str | os.PathLike[str]] = (), *, missing: bool = False) -> int:
        """Drop images by path (a folder drops everything under it), and with ``missing=True``
        every catalogued file that no longer exists. Returns how many were removed."""
        targets: set[int] = set()
        for p in paths:
            hits = self.store.ids_under(str(Path(p).expanduser().resolve()))
            if not hits:
                raise NotFoundError(f"{p} is not in the collection")
            targets.update(hits)
        if missing:
            targets.update(r.id for r in self.store.images() if not os.path.exists(r.path))
        if not targets:
            return 0
        try:
            return self.store.remove_images(sorted(targets))
        finally:
            self.store.release()

    def remove_ids(self, image_ids: Iterable[int]) -> int:
        """Drop images by catalogue id (each must be in the collection). Returns how many."""
        ids = sorted({self.image(i).id for i in image_ids})
        if not ids:
            return 0
        try:
            return self.store.remove_images(ids)
        finally:
            self.store.release()

    # -- browsing ------------------------------------------------------------------------------
    def image(self, image_id: int) -> ImageRecord:
        """The catalogue row of an indexed image (a NotFoundError names an unknown id)."""
        return self._searcher.catalogued(image_id)

    def listing(
        self,
        offset: int = 0,
        limit: int = 50,
        *,
        label: str | None = None,
        folder: str | None = None,
    ) -> tuple[int, list[ImageRecord]]:
        """One page of the indexed images in catalogue order, optionally only those with
        ``label`` or in a folder named ``folder`` (as search filters): ``(total, page)``."""
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise InvalidRequestError(f"offset must be an integer >= 0, got {offset!r}")
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise InvalidRequestError(f"limit must be a positive integer, got {limit!r}")
        kept = self._searcher.filtered(label=label, folder=folder).kept
        return len(kept), self.store.records(kept[offset : offset + limit])

    def thumbnail(self, image_id: int, side: int = DEFAULT_SIDE) -> Path:
        """The file of an indexed image's thumbnail, made once and kept (``cbir.thumbnails``)."""
        return thumbnail(self.path, self.image(image_id), side, self.settings.limits)

    def copies_of(
        self, image_id: int, descriptor: str = "phash", *, threshold: int | None = None
    ) -> SearchResult:
        """The near duplicates of one image: hashes of ``descriptor`` within ``threshold`` bits
        (see :meth:`duplicates`), closest first, scored in differing bits."""
        from cbir.duplicates import copies_of

        return copies_of(self, image_id, descriptor, threshold)

    # -- searching -----------------------------------------------------------------------------
    def search(
        self,
        query: Query,
        k: int = 10,
        *,
        descriptor: str | Sequence[str | None] | None = None,
        metric: str | Sequence[str | None] | None = None,
        combine: str = "mean",
        exclude_queries: bool = False,
        expand: int = 0,
        exact: bool = False,
        ef: int | None = None,
        nprobe: int | None = None,
        rerank: int | None = None,
        offset: int = 0,
        feedback: Feedback | None = None,
        label: str | None = None,
        folder: str | None = None,
    ) -> SearchResult:
        """The ``k`` images closest to the query (an image path, encoded bytes, a vector, the
        id of an image in the collection, a :class:`cbir.search.Region` of an image, or a list
        of these combined by ``combine``: "mean", "min" or "rrf").

        ``descriptor`` defaults to the collection's first, ``metric`` to the descriptor's
        default. Several descriptors (a list, with one metric each or None for their defaults)
        are fused late: each ranks the collection, and the rankings are merged by reciprocal
        rank fusion (scores are then RRF scores, higher is better). ``exclude_queries`` leaves
        query images that are in the collection out. ``expand=K`` re-searches with the query
        averaged with its top K results (average query expansion, see ``cbir.search``).
        Past ``Settings.auto_threshold`` images an approximate index answers (``exact=True``
        scans instead); ``ef`` (HNSW), ``nprobe`` (IVF) and ``rerank`` (candidates ranked
        again per result) trade its speed for recall, per query. ``offset`` skips that many
        results (pages). ``feedback`` (:class:`cbir.search.Feedback`: ids marked relevant and
        not relevant, and Rocchio's weights) moves the query before ranking. ``label`` and
        ``folder`` keep only images with that label, or in a folder of that name. The result
        iterates over its hits and says what ranked them (``to_dict()`` for JSON).
        """
        request = SearchRequest.build(
            k,
            descriptor=descriptor,
            metric=metric,
            combine=combine,
            exclude_queries=exclude_queries,
            expand=expand,
            exact=exact,
            ef=ef,
            nprobe=nprobe,
            rerank=rerank,
            offset=offset,
            feedback=feedback,
            label=label,
            folder=folder,
        )
        return self._searcher.search(query, request)

    def explain(
        self,
        query: Query,
        hit: int | Hit,
        *,
        descriptor: str | None = None,
        metric: str | None = None,
    ) -> Explanation:
        """Why ``hit`` (an image id, or a :class:`cbir.Hit`) is close to ``query`` (any query
        :meth:`search` takes): each block's share of the distance for a fused descriptor, the
        colours two histograms share most, heat maps of the matching places for a CNN
        descriptor (see ``cbir.search.explain``); ``to_dict()`` for JSON."""
        record = self.descriptor(descriptor)
        image_id = hit.id if isinstance(hit, Hit) else hit
        return explain(
            self._searcher, query, image_id, record, holdings.check_metric(record, metric)
        )

    def query_vectors(
        self, query: Query, record: DescriptorRecord
    ) -> tuple[np.ndarray, list[int]]:
        """Vectors for the query items, and the catalogue ids of those that are in the collection.

        A query file already in the collection, unchanged, uses its stored vector.
        """
        return self._searcher.query_vectors(query, record)

    def index(self, record: DescriptorRecord, metric: str) -> SearchIndex:
        """The index of a descriptor under a metric, kept in step with the collection."""
        return self.indexes.index(record, holdings.check_metric(record, metric))

    def build_indexes(self) -> list[dict[str, Any]]:
        """Bring up to date (build, catch up, save) the approximate index of each descriptor
        under its default metric, where the settings choose one for its size: what ``cbir
        index`` does after adding, so the first search finds it ready. Returns what each
        holds: descriptor, metric, kind, vectors."""
        built = []
        for record in self.descriptors:
            n = self.store.vector_count(record.id)
            if not n or choose_kind(self.settings, n, record.dim) == "exact":
                continue
            index = self.indexes.index(record, record.metric)
            built.append(
                {
                    "descriptor": holdings.short_label(record.spec),
                    "metric": record.metric,
                    "kind": index.kind,
                    "vectors": len(index),
                }
            )
        self.indexes.save()
        return built

    def vectors(self, descriptor: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """All ``(image_ids, vectors)`` of a descriptor."""
        return self.store.load_vectors(self.descriptor(descriptor).id)

    def duplicates(self, descriptor: str = "phash", *, threshold: int | None = None) -> Any:
        """Exact duplicates (identical files) and near duplicates (perceptual hashes of
        ``descriptor`` within ``threshold`` bits; default scaled with the hash length): a
        :class:`cbir.duplicates.DuplicateReport`."""
        from cbir.duplicates import duplicate_report

        return duplicate_report(self, descriptor, threshold)

    # -- inspecting and exporting --------------------------------------------------------------
    def check(self, *, repair: bool = False) -> CheckReport:
        """Verify that everything in the collection can be trusted: the catalogue's integrity,
        every descriptor's vectors present, of the right length and finite, every segment file
        listed and every listed file present, no duplicate paths, fitted states loadable, saved
        indexes in step with the change feed. ``repair`` removes what cannot be trusted
        (needs the writer) so that the next ``add`` redoes it. See :mod:`cbir.check`."""
        return check_collection(self.store, self.indexes, repair=repair)

    def skipped(self) -> list[tuple[str, str]]:
        """``(path, reason)`` of every file that was skipped."""
        return [(r.path, r.reason or "") for r in self.store.images(status="skipped")]

    def info(self) -> dict[str, Any]:
        """Counts, descriptors (with parameters and vector counts), labels and skipped files."""
        counts = self.store.counts()
        vec_counts = self.store.vector_counts()
        labels = [r.label for r in self.store.images(status="ok") if r.label is not None]
        size = sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())
        return {
            "path": str(self.path.resolve()),
            "images": counts["ok"],
            "skipped": counts["skipped"],
            "labels": len(set(labels)),
            "labelled_images": len(labels),
            "descriptors": [
                {
                    "label": holdings.short_label(d.spec),
                    "spec": d.spec,
                    "name": d.name,
                    "params": d.params,
                    "dim": d.dim,
                    "default_metric": d.metric,
                    "vectors": vec_counts.get(d.id, 0),
                    "fitted_on_collection": self.store.has_state(d.id),
                }
                for d in self.descriptors
            ],
            "disk_bytes": size,
            "indexes": self._saved_indexes(),
            "skipped_files": [{"path": p, "reason": r} for p, r in self.skipped()],
        }

    def summary(self) -> dict[str, Any]:
        """What a client needs to search: counts, labels with their counts, and each
        descriptor with the metrics that apply to it; no file paths, no walk of the disk."""
        counts = self.store.counts()
        vec_counts = self.store.vector_counts()
        labels: dict[str, int] = {}
        for r in self.store.images(status="ok"):
            if r.label is not None:
                labels[r.label] = labels.get(r.label, 0) + 1
        return {
            "images": counts["ok"],
            "skipped": counts["skipped"],
            "labels": dict(sorted(labels.items())),
            "descriptors": [
                {
                    "label": holdings.short_label(d.spec),
                    "name": d.name,
                    "dim": d.dim,
                    "default_metric": d.metric,
                    "metrics": metrics_for(d.name),
                    "vectors": vec_counts.get(d.id, 0),
                    "hash": get_descriptor_class(d.name).binary,
                }
                for d in self.descriptors
            ],
        }

    def _saved_indexes(self) -> list[dict[str, Any]]:
        """Each saved approximate index: what it serves, how current it is, and its bytes per
        image in RAM and on disk (its file; a re-ranking index also reads the full vectors
        from the segments)."""
        labels = {d.id: holdings.short_label(d.spec) for d in self.descriptors}
        generations = self.store.generations()
        out = []
        for saved in self.indexes.saved():
            n = saved.get("vectors") or 0
            ram, file_bytes = saved.get("ram_bytes"), saved.get("file_bytes")
            out.append(
                {
                    "descriptor": labels.get(saved["descriptor_id"], str(saved["descriptor_id"])),
                    "metric": saved["metric"],
                    "kind": saved["kind"],
                    "vectors": n,
                    "current": saved.get("generation") == generations.get(saved["descriptor_id"]),
                    "ram_bytes_per_image": ram / n if n and ram is not None else None,
                    "disk_bytes_per_image": file_bytes / n if n and file_bytes else None,
                    "reranks_from_segments": bool(saved.get("reads_vectors")),
                }
            )
        return out

    def export(
        self,
        out_dir: str | os.PathLike[str],
        *,
        descriptor: str | None = None,
        format: str = "npy",
    ) -> list[Path]:
        """Write the catalogue and one descriptor's vectors for other tools.

        ``format="npy"``: ``catalogue.csv``, ``vectors.npy`` and ``vectors.csv`` (id, path,
        label of each row of ``vectors.npy``). ``format="parquet"``: ``catalogue.parquet`` and
        ``vectors.parquet`` (id, path, label, vector). Returns the files written.
        """
        return export(self.store, self.descriptor(descriptor), out_dir, format)
