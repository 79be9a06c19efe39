"""The Python API: a collection of images you can add to, search and inspect.

>>> col = Collection("photos.cbir")
>>> col.add("~/Pictures", labels="folder")
>>> col.search("query.jpg", k=10, descriptor="color-regional", metric="chi2")

The CLI and the server are thin faces over this class.
"""

from __future__ import annotations

import csv
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cbir import images
from cbir.config import Settings
from cbir.extraction import Task, extract_arrays, extract_images, run_tasks
from cbir.features import (
    DerivedDescriptor,
    Descriptor,
    create_descriptor,
    get_descriptor_class,
    metric_applies,
    metrics_for,
    parse_spec,
)
from cbir.index import ExactIndex
from cbir.metrics import get_metric
from cbir.search import COMBINE_MODES, RRF_DEPTH, Hit, expand_query, ranked_ids, rrf_fuse
from cbir.store import DescriptorRecord, ImageUpdate, Store, StoreError

LABEL_SOURCES = ("folder",)
#: A descriptor learned from the collection's vectors is refitted when the collection has grown
#: to this many times the images it learned from (see ``Collection._refit_grown``).
REFIT_GROWTH = 2.0
ProgressCallback = Callable[[int, int], None]
QueryLike = str | os.PathLike[str] | bytes | np.ndarray


@dataclass
class IndexReport:
    """What one ``add`` did."""

    scanned: int = 0
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    #: files skipped in an earlier run and not changed since (not retried)
    still_skipped: int = 0
    #: catalogued files under the indexed folders that no longer exist
    missing: list[str] = field(default_factory=list)
    interrupted: bool = False
    #: descriptor spec -> what fitting it on the collection reported (e.g. held-out accuracy)
    fitted: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: float = 0.0
    extracted: int = 0

    @property
    def rate(self) -> float:
        """Images described per second over the whole run."""
        return self.extracted / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["skipped"] = [{"path": p, "reason": r} for p, r in self.skipped]
        out["rate"] = round(self.rate, 1)
        return out


class IndexInterrupted(KeyboardInterrupt):
    """Ctrl-C during ``add``: everything finished before it is saved; ``report`` says what."""

    def __init__(self, report: IndexReport) -> None:
        super().__init__("indexing interrupted; the work done so far is saved")
        self.report = report


class Collection:
    """A collection directory: catalogue, vectors of each descriptor, search."""

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
        self._indexes: dict[tuple[int, str], ExactIndex] = {}

    def close(self) -> None:
        """Release the catalogue (and the write lock, if held)."""
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

    def _register(self, specs: Iterable[str | Descriptor]) -> list[DescriptorRecord]:
        """Record descriptors (and the base of each derived one, after it)."""
        records = []
        for spec in specs:
            d = create_descriptor(spec)
            chain = [d, d.base] if _derives(d) else [d]
            for item in chain:
                records.append(
                    self.store.add_descriptor(
                        item.spec,
                        item.name,
                        _jsonable(item.get_params()),
                        item.dim,
                        item.default_metric,
                    )
                )
        return records

    def instance(self, record: DescriptorRecord) -> Descriptor:
        """A ready descriptor object for a record: built from its spec, with what it learned
        from this collection restored (a clear error if it was never fitted)."""
        d = create_descriptor(record.spec)
        if d.requires_fit:
            state = self.store.load_state(record.id)
            if state is None:
                raise ValueError(
                    f"descriptor {record.spec} has not been fitted on this collection yet; "
                    "run: cbir index DIR (it fits what needs fitting) or cbir fit"
                )
            d.set_state(state)
        return d

    def _state_files(self) -> dict[str, str]:
        """spec -> file of each fitted descriptor's state, for the extraction workers."""
        return {
            d.spec: str(self.store.root / "models" / f"{d.id}.npz")
            for d in self.descriptors
            if self.store.has_state(d.id)
        }

    def _worker_specs(self) -> tuple[str, ...]:
        """Descriptors the workers extract from images: not the derived ones (computed from
        their base's vectors here) nor those still waiting to be fitted."""
        out = []
        for d in self.descriptors:
            obj = create_descriptor(d.spec)
            if _derives(obj):
                continue
            if obj.requires_fit and not self.store.has_state(d.id):
                continue
            out.append(d.spec)
        return tuple(out)

    def descriptor(self, spec: str | None = None) -> DescriptorRecord:
        """The collection's descriptor matching ``spec`` (a name, or a name with parameters)."""
        held = self.descriptors
        if not held:
            raise ValueError(
                f"the collection at {self.path} holds no descriptors yet; "
                "index a folder first (cbir index DIR)"
            )
        if spec is None:
            return held[0]
        name, params = parse_spec(spec)
        cls = get_descriptor_class(name)  # raises for unknown names
        if params:
            wanted = create_descriptor(spec).spec
            matches = [d for d in held if d.spec == wanted]
        else:
            matches = [d for d in held if d.name == cls.name]
        if len(matches) > 1 and not params:
            # the name alone means its default parameters, else the first added (a derived
            # descriptor comes before the base it was computed from)
            default = [d for d in matches if d.spec == create_descriptor(cls.name).spec]
            matches = default or matches[:1]
        if not matches:
            have = ", ".join(d.spec for d in held)
            raise ValueError(
                f"the collection has no vectors for {spec!r}; it holds: {have}. "
                f"Add them with: cbir index DIR --descriptor {spec}"
            )
        return matches[0]

    # -- adding and removing -------------------------------------------------------------------
    def add(
        self,
        *sources: str | os.PathLike[str],
        descriptors: Sequence[str | Descriptor] | None = None,
        labels: str | dict[str, str] | None = None,
        all_files: bool = False,
        retry_skipped: bool = False,
        progress: ProgressCallback | None = None,
    ) -> IndexReport:
        """Add folders (recursively) and files; re-extract changed ones, keep unchanged ones.

        ``descriptors`` adds descriptors to the collection (a new collection without them gets
        the settings' defaults); every image gets vectors for every descriptor the collection
        holds. ``labels="folder"`` labels each image with the first folder below its source
        folder; a dict maps paths to labels. Files skipped before are retried only when they
        changed, or with ``retry_skipped`` (e.g. after raising ``max_pixels``). Ctrl-C raises
        :class:`IndexInterrupted` after the finished work is saved.
        """
        if isinstance(labels, str) and labels not in LABEL_SOURCES:
            raise ValueError(
                f"labels must be one of {', '.join(LABEL_SOURCES)} or a mapping, got {labels!r}"
            )
        started = time.perf_counter()
        report = IndexReport()
        self.store.acquire()
        try:
            requested = list(descriptors or ())
            if not requested and not self.descriptors:
                requested = list(self.settings.default_descriptors)
            self._register(requested)
            files, roots = _discover(sources, all_files)
            report.scanned = len(files)
            label_of = _label_function(labels, roots)
            tasks, new_paths = self._plan(files, label_of, retry_skipped, report)
            report.missing = _missing_under(self.store, roots)
            self._extract(tasks, new_paths, report, progress)
            if not report.interrupted and self._fit_pending(report):
                # descriptors fitted just now: extract them for every image (the rest is
                # unchanged, so only they are computed)
                again = IndexReport()
                tasks, _ = self._plan(files, label_of, False, again)
                self._extract(tasks, set(), again, progress)
                report.interrupted = again.interrupted
                report.skipped += again.skipped
            if not report.interrupted:
                self._refit_grown(report)
                self._complete_derived()
        finally:
            self._indexes.clear()
            report.seconds = time.perf_counter() - started
            self.store.release()
        if report.interrupted:
            raise IndexInterrupted(report)
        return report

    def _plan(
        self,
        files: list[str],
        label_of: Callable[[str], str | None],
        retry_skipped: bool,
        report: IndexReport,
    ) -> tuple[list[Task], set[str]]:
        """Decide what each file needs: everything (new or changed content), only the
        descriptors it lacks, or nothing. Returns the tasks and the paths that are new."""
        specs = self._worker_specs()
        ids_by_spec = {d.spec: d.id for d in self.descriptors}
        known = {r.path: r for r in self.store.images()}
        present = self.store.present_descriptors()
        tasks: list[Task] = []
        new_paths: set[str] = set()
        relabel: dict[str, str | None] = {}
        for path in files:
            label = label_of(path)
            rec = known.get(path)
            try:
                st = os.stat(path)
            except OSError as exc:
                report.skipped.append((path, f"cannot read file: {exc.strerror}"))
                continue
            same_stat = rec is not None and (rec.size, rec.mtime_ns) == (st.st_size, st.st_mtime_ns)
            if rec is None or (rec.status == "skipped" and (retry_skipped or not same_stat)):
                tasks.append(Task(path, specs, label=label))
                new_paths.add(path)
            elif rec.status == "skipped":
                report.still_skipped += 1
            else:
                missing = tuple(s for s in specs if ids_by_spec[s] not in present.get(rec.id, ()))
                if same_stat and not missing:
                    report.unchanged += 1
                    if label is not None and label != rec.label:
                        relabel[path] = label
                else:  # hashed in the worker: same content only gets what it lacks
                    tasks.append(Task(path, specs, rec.sha256, missing, label))
        if relabel:
            self.store.set_labels(relabel)
        return tasks, new_paths

    def _extract(
        self,
        tasks: list[Task],
        new_paths: set[str],
        report: IndexReport,
        progress: ProgressCallback | None,
    ) -> None:
        """Run the tasks on the worker processes, writing results in batches as they come."""
        buffer: list[ImageUpdate] = []
        done = 0

        def on_result(update: ImageUpdate) -> None:
            nonlocal done
            done += 1
            buffer.append(update)
            if update.status == "skipped":
                report.skipped.append((update.path, update.reason or "unknown reason"))
            elif update.status == "unchanged":
                report.unchanged += 1
            elif update.path in new_paths:
                report.added += 1
            else:
                report.updated += 1
            if update.status == "ok":
                report.extracted += 1
            if len(buffer) >= self.settings.flush_every:
                self.store.write_batch(buffer)
                buffer.clear()
            if progress is not None:
                progress(done, len(tasks))

        if progress is not None:
            progress(0, len(tasks))
        try:
            run_tasks(
                tasks,
                workers=self.settings.worker_count,
                max_pixels=self.settings.max_pixels,
                on_result=on_result,
                states=self._state_files(),
            )
        except KeyboardInterrupt:
            report.interrupted = True
        self.store.write_batch(buffer)
        if not report.interrupted:
            for d in self.descriptors:
                self.store.compact(d.id)

    # -- fitting -------------------------------------------------------------------------------
    def fit(
        self, descriptor: str | None = None, *, progress: ProgressCallback | None = None
    ) -> dict[str, Any]:
        """(Re)fit a descriptor that learns from the collection on what the collection holds
        now, and recompute its vectors. Returns what the fit reported (e.g. held-out accuracy)."""
        record = self.descriptor(descriptor)
        if not create_descriptor(record.spec).requires_fit:
            raise ValueError(f"descriptor {record.spec} learns nothing from the collection")
        self.store.acquire()
        try:
            info = self._fit_one(record)
            report = IndexReport()
            paths = [r.path for r in self.store.images(status="ok")]
            tasks, _ = self._plan(paths, lambda path: None, False, report)
            self._extract(tasks, set(), report, progress)
            if report.interrupted:
                raise IndexInterrupted(report)
            self._complete_derived()
        finally:
            self._indexes.clear()
            self.store.release()
        return info

    def _fit_pending(self, report: IndexReport) -> bool:
        """Fit every descriptor that needs it and was not fitted yet; True if any was fitted
        from images (its vectors are then still to be extracted)."""
        from_images = False
        for record in self.descriptors:
            d = create_descriptor(record.spec)
            if d.requires_fit and not self.store.has_state(record.id):
                report.fitted[record.spec] = self._fit_one(record)
                from_images |= not _derives(d)
        return from_images

    def _refit_grown(self, report: IndexReport) -> None:
        """Refit the descriptors derived from other vectors (centring, PCA, augmentation, a
        trained head) once the collection has grown to ``REFIT_GROWTH`` times what they
        learned from: a collection indexed a folder at a time should not stay tuned to its
        first folder. Cheap: they learn from stored vectors, no image is decoded again."""
        for record in self.descriptors:
            d = create_descriptor(record.spec)
            fitted_on = self.store.fitted_images(record.id)
            if not _derives(d) or fitted_on is None:
                continue
            now = self.store.vector_count(self.descriptor(d.base.spec).id)
            if now >= REFIT_GROWTH * max(fitted_on, 1):
                report.fitted[record.spec] = self._fit_one(record)

    def _fit_one(self, record: DescriptorRecord) -> dict[str, Any]:
        """Fit one descriptor on (a sample of) the collection and save what it learned."""
        d = create_descriptor(record.spec)
        rng = np.random.default_rng(0)
        if isinstance(d, DerivedDescriptor) and d.derives:
            base = self.descriptor(d.base.spec)
            ids, vectors = self.store.load_vectors(base.id)
            labels = self.store.labels(ids) if d.needs_labels else None
            if len(ids) == 0:
                raise ValueError(f"descriptor {record.spec} has no images to learn from")
            d.fit_vectors(vectors, labels)
            learned_from = len(ids)
        else:
            records = self.store.images(status="ok")
            if not records:
                raise ValueError(f"descriptor {record.spec} has no images to learn from")
            if len(records) > d.fit_sample:
                keep = np.sort(rng.choice(len(records), d.fit_sample, replace=False))
                records = [records[i] for i in keep]
            arrays, labels = [], []
            for r in records:
                try:
                    arrays.append(extract_arrays(r.path, d, max_pixels=self.settings.max_pixels))
                    labels.append(r.label)
                except images.ImageError:
                    continue  # changed or gone since it was indexed: fit on the others
            d.fit(arrays, labels if d.needs_labels else None)
            learned_from = len(arrays)
        self.store.save_state(record.id, d.get_state(), images=learned_from)
        if d.dim != record.dim:  # learned by the fit, e.g. cnnp's number of classes
            self.store.set_dim(record.id, d.dim)
        return dict(getattr(d, "fit_report_", {}) or {})

    def _complete_derived(self) -> None:
        """Compute the vectors of fitted derived descriptors for images that have their base's
        vectors but not theirs (new images, or all of them after a fit), block by block."""
        for record in self.descriptors:
            d = create_descriptor(record.spec)
            if not _derives(d) or not self.store.has_state(record.id):
                continue
            d = self.instance(record)
            base = self.descriptor(d.base.spec)
            todo = self.store.ids_without(record.id, having=base.id)
            if not len(todo):
                continue
            # stream the base's vectors (one read per block, not one query per image)
            for ids, block in self.store.iter_vector_blocks(base.id, self.settings.block_rows):
                wanted = np.isin(ids, todo)
                if wanted.any():
                    vectors = d.transform_vectors(block[wanted])
                    self.store.write_vectors(record.id, ids[wanted], vectors)
            self.store.compact(record.id)

    def remove(self, paths: Iterable[str | os.PathLike[str]] = (), *, missing: bool = False) -> int:
        """Drop images by path (a folder drops everything under it), and with ``missing=True``
        every catalogued file that no longer exists. Returns how many were removed."""
        targets: set[int] = set()
        for p in paths:
            hits = self.store.ids_under(str(Path(p).expanduser().resolve()))
            if not hits:
                raise ValueError(f"{p} is not in the collection")
            targets.update(hits)
        if missing:
            targets.update(r.id for r in self.store.images() if not os.path.exists(r.path))
        if not targets:
            return 0
        try:
            removed = self.store.remove_images(sorted(targets))
        finally:
            self._indexes.clear()
            self.store.release()
        return removed

    # -- searching -----------------------------------------------------------------------------
    def search(
        self,
        query: QueryLike | Sequence[QueryLike],
        k: int = 10,
        *,
        descriptor: str | Sequence[str] | None = None,
        metric: str | Sequence[str | None] | None = None,
        combine: str = "mean",
        exclude_queries: bool = False,
        expand: int = 0,
    ) -> list[Hit]:
        """The ``k`` images closest to the query (an image path, encoded bytes, a vector, or a
        list of these combined by ``combine``: "mean", "min" or "rrf").

        ``descriptor`` defaults to the collection's first, ``metric`` to the descriptor's
        default. Several descriptors (a list, with one metric each or None for their defaults)
        are fused late: each ranks the collection, and the rankings are merged by reciprocal
        rank fusion (scores are then RRF scores, higher is better). ``exclude_queries`` leaves
        query images that are in the collection out. ``expand=K`` re-searches with the query
        averaged with its top K results (average query expansion, see ``cbir.search``).
        """
        if not isinstance(expand, int) or isinstance(expand, bool) or not 0 <= expand <= 100:
            raise ValueError(
                f"expand must be an integer in 0..100 (results averaged), got {expand!r}"
            )
        if combine not in COMBINE_MODES:
            raise ValueError(f"combine must be one of {', '.join(COMBINE_MODES)}, got {combine!r}")
        specs = [descriptor] if descriptor is None or isinstance(descriptor, str) else descriptor
        metrics = [metric] * len(specs) if metric is None or isinstance(metric, str) else metric
        if not specs:
            raise ValueError("give at least one descriptor")
        if len(metrics) != len(specs):
            raise ValueError(
                f"give one metric per descriptor ({len(specs)}), or none; got {len(metrics)}"
            )
        rankings = []
        for spec, m in zip(specs, metrics, strict=True):
            record = self.descriptor(spec)
            metric_name = self._check_metric(record, m)
            vectors, query_ids = self.query_vectors(query, record)
            index = self.index(record, metric_name)
            exclude = np.asarray(query_ids, dtype=np.int64) if exclude_queries else None
            depth = k if len(specs) == 1 else max(k, RRF_DEPTH)
            if expand:
                top, _ = ranked_ids(index, vectors, expand, combine=combine, exclude=exclude)
                vectors = expand_query(vectors, self.store.vectors_for(record.id, top.tolist()))
            rankings.append(ranked_ids(index, vectors, depth, combine=combine, exclude=exclude))
        if len(rankings) == 1:
            ids, scores = rankings[0]
        else:
            depth = min(len(r[0]) for r in rankings)
            ids, scores = rrf_fuse(np.stack([r[0][:depth] for r in rankings]), k)
        return [
            Hit(rank=n + 1, id=r.id, path=r.path, score=float(s), label=r.label)
            for n, (r, s) in enumerate(zip(self.store.records(ids), scores, strict=True))
        ]

    def _check_metric(self, record: DescriptorRecord, metric: str | None) -> str:
        m = get_metric(metric or record.metric)
        if not metric_applies(record.name, m):
            needs = "hash bits (0/1 vectors)" if m.binary else "histograms (non-negative vectors)"
            raise ValueError(
                f"metric {m.name!r} compares {needs}, which descriptor {record.name!r} does not "
                f"produce; use one of: {', '.join(metrics_for(record.name))}"
            )
        return m.name

    def query_vectors(
        self, query: QueryLike | Sequence[QueryLike], record: DescriptorRecord
    ) -> tuple[np.ndarray, list[int]]:
        """Vectors for the query items, and the catalogue ids of those that are in the collection.

        A query file already in the collection, unchanged, uses its stored vector.
        """
        items: list[QueryLike]
        if isinstance(query, np.ndarray):
            return np.atleast_2d(query).astype(np.float32), []
        items = [query] if isinstance(query, str | bytes | os.PathLike) else list(query)
        if not items:
            raise ValueError("no query given")
        rows: list[np.ndarray] = []
        ids: list[int] = []
        descriptor: Descriptor | None = None
        for item in items:
            if isinstance(item, np.ndarray):
                rows.extend(np.atleast_2d(item).astype(np.float32))
                continue
            if not isinstance(item, bytes):
                path = str(Path(item).expanduser().resolve())
                rec = self.store.image_by_path(path)
                if rec is not None and rec.status == "ok" and _unchanged(rec):
                    try:
                        rows.append(self.store.vectors_for(record.id, [rec.id])[0])
                        ids.append(rec.id)
                        continue
                    except KeyError:
                        pass
                item = path
            descriptor = descriptor or self.instance(record)
            try:
                rows.append(
                    extract_images([item], descriptor, max_pixels=self.settings.max_pixels)[0]
                )
            except images.ImageError as exc:
                name = "query bytes" if isinstance(item, bytes) else str(item)
                raise images.ImageError(exc.reason, name) from None
        matrix = np.stack(rows)
        if matrix.shape[1] != record.dim:
            raise ValueError(
                f"query vectors have {matrix.shape[1]} dimensions; descriptor "
                f"{record.spec} has {record.dim}"
            )
        return matrix, ids

    def index(self, record: DescriptorRecord, metric: str) -> ExactIndex:
        """The exact index of a descriptor under a metric (cached until the collection changes)."""
        key = (record.id, metric)
        if key not in self._indexes:
            index = ExactIndex(metric, block_rows=self.settings.block_rows)
            n = self.store.vector_count(record.id)
            if n * record.dim * 4 * 2 <= self.settings.memory_budget:
                index.add_all(*self.store.load_vectors(record.id))
            else:
                index.stream_from(
                    lambda: self.store.iter_vector_blocks(record.id, self.settings.block_rows),
                    record.dim,
                )
            self._indexes[key] = index
        return self._indexes[key]

    def vectors(self, descriptor: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """All ``(image_ids, vectors)`` of a descriptor."""
        return self.store.load_vectors(self.descriptor(descriptor).id)

    # -- inspecting and exporting --------------------------------------------------------------
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
            "skipped_files": [{"path": p, "reason": r} for p, r in self.skipped()],
        }

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
        if format not in ("npy", "parquet"):
            raise ValueError(f"format must be npy or parquet, got {format!r}")
        record = self.descriptor(descriptor)
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        catalogue = self.store.images()
        cols = [
            "id",
            "path",
            "sha256",
            "size",
            "mtime_ns",
            "status",
            "reason",
            "label",
            "width",
            "height",
        ]
        ids, matrix = self.store.load_vectors(record.id)
        order = np.argsort(ids, kind="stable")
        ids, matrix = ids[order], matrix[order]
        recs = self.store.records(ids)
        if format == "parquet":
            try:
                import pyarrow as pa
                import pyarrow.parquet as pq
            except ImportError:
                raise ValueError(
                    "Parquet export needs pyarrow: pip install 'cbir[parquet]' "
                    "(or use --format npy)"
                ) from None
            table = pa.table({c: [getattr(r, c) for r in catalogue] for c in cols})
            pq.write_table(table, out / "catalogue.parquet")
            flat = pa.array(matrix.reshape(-1), type=pa.float32())
            vectors = pa.table(
                {
                    "id": ids,
                    "path": [r.path for r in recs],
                    "label": [r.label for r in recs],
                    "vector": pa.FixedSizeListArray.from_arrays(flat, record.dim),
                }
            )
            vectors = vectors.replace_schema_metadata({"descriptor": record.spec})
            pq.write_table(vectors, out / "vectors.parquet")
            return [out / "catalogue.parquet", out / "vectors.parquet"]
        with open(out / "catalogue.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(cols)
            w.writerows([getattr(r, c) for c in cols] for r in catalogue)
        np.save(out / "vectors.npy", matrix)
        with open(out / "vectors.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["row", "id", "path", "label", "descriptor"])
            w.writerows([n, r.id, r.path, r.label, record.spec] for n, r in enumerate(recs))
        return [out / "catalogue.csv", out / "vectors.npy", out / "vectors.csv"]


def _derives(d: Descriptor) -> bool:
    """Whether a descriptor is computed from another descriptor's stored vectors."""
    return isinstance(d, DerivedDescriptor) and d.derives


def _jsonable(params: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in params.items()}


def _unchanged(rec: Any) -> bool:
    try:
        st = os.stat(rec.path)
    except OSError:
        return False
    return (st.st_size, st.st_mtime_ns) == (rec.size, rec.mtime_ns)


def _discover(
    sources: Sequence[str | os.PathLike[str]], all_files: bool
) -> tuple[list[str], list[Path]]:
    """Image files under the given folders (recursively) and the given files, sorted."""
    if not sources:
        raise ValueError("give at least one folder or image file to add")
    found: set[str] = set()
    roots: list[Path] = []
    for source in sources:
        root = Path(source).expanduser().resolve()
        if root.is_dir():
            roots.append(root)
            for folder, dirs, names in os.walk(root):
                dirs[:] = [d for d in dirs if not d.startswith(".")]
                for name in names:
                    if name.startswith("."):
                        continue
                    if all_files or os.path.splitext(name)[1].lower() in images.IMAGE_EXTENSIONS:
                        found.add(os.path.join(folder, name))
        elif root.exists():
            found.add(str(root))
        else:
            raise StoreError(f"{source} does not exist")
    return sorted(found), roots


def _label_function(
    labels: str | dict[str, str] | None, roots: list[Path]
) -> Callable[[str], str | None]:
    if labels is None:
        return lambda path: None
    if isinstance(labels, dict):
        table = {str(Path(k).expanduser().resolve()): v for k, v in labels.items()}
        return table.get

    def folder_label(path: str) -> str | None:
        for root in roots:
            rel = Path(path).relative_to(root) if Path(path).is_relative_to(root) else None
            if rel is not None and len(rel.parts) > 1:
                return rel.parts[0]
        return None

    return folder_label


def _missing_under(store: Store, roots: list[Path]) -> list[str]:
    """Catalogued files under the indexed folders that are gone from disk."""
    prefixes = tuple(str(r).rstrip(os.sep) + os.sep for r in roots)
    if not prefixes:
        return []
    return sorted(
        r.path for r in store.images() if r.path.startswith(prefixes) and not os.path.exists(r.path)
    )
