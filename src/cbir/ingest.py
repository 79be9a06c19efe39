"""Adding images to a collection: discover the files, plan what each needs, extract on the
worker pool, fit the descriptors that learn from the collection.

Results are written in batches as they come, each batch atomically (see ``cbir.store``), when
``Settings.flush_every`` results are waiting or the oldest has waited ``Settings.flush_seconds``,
so an interrupted or killed run keeps every finished batch (a kill loses at most those seconds of
work, and the chunks in flight) and the same command continues. A run stops early, keeping its
work, when its ``cancel`` event is set (Ctrl-C sets the same event); :class:`IndexInterrupted`
then carries the report.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cbir import holdings, images
from cbir.config import Settings
from cbir.errors import InvalidRequestError, NotFoundError
from cbir.executors import executor_for
from cbir.extraction import Task, extract_arrays
from cbir.faults import pause_point
from cbir.features import Descriptor, create_descriptor
from cbir.store import DescriptorRecord, ImageUpdate, Store

LABEL_SOURCES = ("folder",)
#: A descriptor learned from the collection's vectors is refitted when the collection has grown
#: to this many times the images it learned from (see ``Ingest.refit_grown``).
REFIT_GROWTH = 2.0
#: The seed of the sample a descriptor that learns from images is fitted on (reproducible fits).
FIT_SEED = 0
ProgressCallback = Callable[[int, int], None]
Labels = str | dict[str, str] | None


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
    #: worker processes used for extraction (1: in this process)
    workers: int = 1

    @property
    def rate(self) -> float:
        """Images described per second over the whole run."""
        return self.extracted / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["skipped"] = [{"path": p, "reason": r} for p, r in self.skipped]
        out["rate"] = round(self.rate, 1)
        return out


@dataclass(frozen=True)
class FitReport:
    """What ``Collection.fit`` did: the descriptor (short label) and what its fit reported
    (e.g. a classifier head's held-out accuracy)."""

    descriptor: str
    info: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"descriptor": self.descriptor, "fit": self.info}


class IndexInterrupted(KeyboardInterrupt):
    """A run stopped early (Ctrl-C, or its cancel event): everything finished before it is
    saved; ``report`` says what."""

    def __init__(self, report: IndexReport) -> None:
        super().__init__("indexing interrupted; the work done so far is saved")
        self.report = report


@dataclass(frozen=True)
class Run:
    """One run's callbacks: progress as (done, total), and the event that stops it."""

    progress: ProgressCallback | None = None
    cancel: threading.Event | None = None


class Ingest:
    """The writing side of one collection: register descriptors, add images, fit."""

    def __init__(self, store: Store, settings: Settings) -> None:
        self.store = store
        self.settings = settings

    # -- descriptors ---------------------------------------------------------------------------
    def register(self, specs: Iterable[str | Descriptor]) -> list[DescriptorRecord]:
        """Record descriptors (and the base of each derived one, after it)."""
        records = []
        for spec in specs:
            d = create_descriptor(spec)
            for item in [d, d.base] if holdings.derives(d) else [d]:
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

    def _state_files(self) -> dict[str, str]:
        """spec -> file of each fitted descriptor's state, for the extraction workers."""
        return {
            d.spec: str(self.store.root / "models" / f"{d.id}.npz")
            for d in self.store.descriptors()
            if self.store.has_state(d.id)
        }

    # -- adding --------------------------------------------------------------------------------
    def add(
        self,
        sources: Sequence[str | os.PathLike[str]],
        *,
        descriptors: Sequence[str | Descriptor] | None = None,
        labels: Labels = None,
        all_files: bool = False,
        retry_skipped: bool = False,
        run: Run | None = None,
    ) -> IndexReport:
        """See :meth:`cbir.Collection.add`."""
        if isinstance(labels, str) and labels not in LABEL_SOURCES:
            raise InvalidRequestError(
                f"labels must be one of {', '.join(LABEL_SOURCES)} or a mapping, got {labels!r}"
            )
        run = run or Run()
        files, roots = discover(sources, all_files)
        requested = list(descriptors or ())
        for spec in requested:  # unknown names and bad parameters fail before any write
            create_descriptor(spec)
        started = time.perf_counter()
        report = IndexReport(scanned=len(files), workers=self.settings.worker_count)
        self.store.acquire()
        try:
            if not requested and not self.store.descriptors():
                requested = list(self.settings.default_descriptors)
            self.register(requested)
            label_of = _label_function(labels, roots)
            tasks, new_paths, refused = self._plan(files, label_of, retry_skipped, report)
            report.missing = _missing_under(self.store, roots)
            self._extract(tasks, new_paths, report, run, refused)
            if not report.interrupted and self._fit_pending(report):
                # descriptors fitted just now: extract them for every image (the rest is
                # unchanged, so only they are computed)
                again = IndexReport()
                tasks, _, _ = self._plan(files, label_of, False, again)
                self._extract(tasks, set(), again, run)
                report.interrupted = again.interrupted
                report.skipped += again.skipped
            if not report.interrupted:
                self._refit_grown(report)
                self.complete_derived()
        finally:
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
    ) -> tuple[list[Task], set[str], list[ImageUpdate]]:
        """Decide what each file needs: everything (new or changed content), only the
        descriptors it lacks, or nothing. Returns the tasks, the paths that are new, and the
        files refused before any task (a dangling or looping symlink), to be stored skipped
        with the status of the link itself, so they are not retried until it changes."""
        specs = holdings.extracted_together(self.store)
        ids_by_spec = {d.spec: d.id for d in self.store.descriptors()}
        known = {r.path: r for r in self.store.images()}
        present = self.store.present_descriptors()
        tasks: list[Task] = []
        new_paths: set[str] = set()
        refused: list[ImageUpdate] = []
        relabel: dict[str, str | None] = {}
        for path in files:
            label = label_of(path)
            rec = known.get(path)
            try:
                st = os.stat(path)
            except OSError as exc:
                try:
                    st = os.lstat(path)
                except OSError:  # gone since it was listed: nothing to record
                    report.skipped.append((path, f"cannot read file: {exc.strerror}"))
                    continue
                seen = rec is not None and rec.status == "skipped" and not retry_skipped
                if seen and (rec.size, rec.mtime_ns) == (st.st_size, st.st_mtime_ns):
                    report.still_skipped += 1
                else:
                    refused.append(_refused(path, st, exc, label))
                    new_paths.add(path)
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
        return tasks, new_paths, refused

    def _extract(
        self,
        tasks: list[Task],
        new_paths: set[str],
        report: IndexReport,
        run: Run,
        refused: Sequence[ImageUpdate] = (),
    ) -> None:
        """Run the tasks on the worker processes, writing results in batches as they come
        (after the files refused while planning)."""
        batch = _Batch(self.store, self.settings, report, new_paths)
        for update in refused:
            batch.take(update)

        def on_result(update: ImageUpdate) -> None:
            pause_point("extract")
            batch.take(update)
            if run.progress is not None:
                run.progress(batch.done, len(tasks))

        if run.progress is not None:
            run.progress(0, len(tasks))
        try:
            finished = executor_for(self.settings)(
                tasks,
                workers=self.settings.worker_count,
                limits=self.settings.limits,
                on_result=on_result,
                states=self._state_files(),
                cancel=run.cancel,
            )
        except KeyboardInterrupt:  # a second Ctrl-C, or one raised by a progress callback
            finished = False
        finally:  # whatever stopped the run (workers that keep dying too), keep what came
            batch.flush()
        report.interrupted = report.interrupted or not finished
        if finished:
            for d in self.store.descriptors():
                self.store.compact(d.id)

    # -- fitting -------------------------------------------------------------------------------
    def fit(self, record: DescriptorRecord, run: Run | None = None) -> dict[str, Any]:
        """See :meth:`cbir.Collection.fit`."""
        if not create_descriptor(record.spec).requires_fit:
            raise InvalidRequestError(
                f"descriptor {holdings.short_label(record.spec)} learns nothing from the "
                "collection"
            )
        self.store.acquire()
        try:
            info = self._fit_one(record)
            report = IndexReport()
            paths = [r.path for r in self.store.images(status="ok")]
            tasks, _, _ = self._plan(paths, lambda path: None, False, report)
            self._extract(tasks, set(), report, run or Run())
            if report.interrupted:
                raise IndexInterrupted(report)
            self.complete_derived()
        finally:
            self.store.release()
        return info

    def _fit_pending(self, report: IndexReport) -> bool:
        """Fit every descriptor that needs it and was not fitted yet; True if any was fitted
        from images (its vectors are then still to be extracted)."""
        from_images = False
        for record in self.store.descriptors():
            d = create_descriptor(record.spec)
            if d.requires_fit and not self.store.has_state(record.id):
                report.fitted[record.spec] = self._fit_one(record)
                from_images |= not holdings.derives(d)
        return from_images

    def _refit_grown(self, report: IndexReport) -> None:
        """Refit the descriptors derived from other vectors (centring, PCA, augmentation, a
        trained head) once the collection has grown to ``REFIT_GROWTH`` times what they
        learned from: a collection indexed a folder at a time should not stay tuned to its
        first folder. Cheap: they learn from stored vectors, no image is decoded again."""
        for record in self.store.descriptors():
            d = create_descriptor(record.spec)
            fitted_on = self.store.fitted_images(record.id)
            if not holdings.derives(d) or fitted_on is None:
                continue
            now = self.store.vector_count(holdings.find(self.store, d.base.spec).id)
            if now >= REFIT_GROWTH * max(fitted_on, 1):
                report.fitted[record.spec] = self._fit_one(record)

    def _fit_one(self, record: DescriptorRecord) -> dict[str, Any]:
        """Fit one descriptor on (a sample of) the collection and save what it learned."""
        d = create_descriptor(record.spec)
        if holdings.derives(d):
            base = holdings.find(self.store, d.base.spec)
            ids, vectors = self.store.load_vectors(base.id)
            if len(ids) == 0:
                raise InvalidRequestError(
                    f"descriptor {holdings.short_label(record.spec)} has no images to learn from"
                )
            d.fit_vectors(vectors, self.store.labels(ids) if d.needs_labels else None)
            learned_from = len(ids)
        else:
            records = self.store.images(status="ok")
            learned_from = fit_on_images(
                d, [r.path for r in records], [r.label for r in records], self.settings.limits
            )
        self.store.save_state(record.id, d.get_state(), images=learned_from)
        if d.dim != record.dim:  # learned by the fit, e.g. cnnp's number of classes
            self.store.set_dim(record.id, d.dim)
        return dict(getattr(d, "fit_report_", {}) or {})

    def complete_derived(self) -> None:
        """Compute the vectors of fitted derived descriptors for images that have their base's
        vectors but not theirs (new images, or all of them after a fit), block by block."""
        for record in self.store.descriptors():
            d = create_descriptor(record.spec)
            if not holdings.derives(d) or not self.store.has_state(record.id):
                continue
            d = holdings.instance(self.store, record)
            base = holdings.find(self.store, d.base.spec)
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


def fit_on_images(
    d: Descriptor,
    items: Sequence[str | np.ndarray],
    labels: Sequence[str | None],
    limits: images.Limits,
) -> int:
    """Fit a descriptor that learns from images on a seeded sample of ``items`` (paths, or
    arrays of images that came as arrays) of at most ``d.fit_sample``; items that cannot be
    read any more are left out. Returns how many images it learned from. Collections and
    evaluation grids fit through this one function."""
    if not items:
        raise InvalidRequestError(f"descriptor {d.short_spec} has no images to learn from")
    chosen = np.arange(len(items))
    if len(items) > d.fit_sample:
        rng = np.random.default_rng(FIT_SEED)
        chosen = np.sort(rng.choice(len(items), d.fit_sample, replace=False))
    arrays, kept_labels = [], []
    for i in chosen:
        item = items[i]
        try:
            if isinstance(item, np.ndarray):
                arrays.append(images.to_array(images.from_array(item), d.input_spec))
            else:
                arrays.append(extract_arrays(item, d, limits=limits))
        except images.ImageError:
            continue  # changed or gone since it was listed: fit on the others
        kept_labels.append(labels[i])
    d.fit(arrays, kept_labels if d.needs_labels else None)
    return len(arrays)


def _refused(path: str, link: os.stat_result, exc: OSError, label: str | None) -> ImageUpdate:
    """A file that cannot even be looked at (a dangling or looping symlink), as skipped, with
    the status of the link itself."""
    return ImageUpdate(
        path=path,
        size=link.st_size,
        mtime_ns=link.st_mtime_ns,
        sha256=None,
        status="skipped",
        reason=f"cannot read file: {exc.strerror} (a symbolic link to nothing readable)",
        label=label,
    )


class _Batch:
    """Results waiting to be written, and the report's counts of what they were: written when
    ``flush_every`` wait, or when the oldest has waited ``flush_seconds``."""

    def __init__(
        self, store: Store, settings: Settings, report: IndexReport, new_paths: set[str]
    ) -> None:
        self.store, self.report, self.new_paths = store, report, new_paths
        self.size, self.seconds = settings.flush_every, settings.flush_seconds
        self.pending: list[ImageUpdate] = []
        self.since = 0.0  # when the oldest pending result came
        self.done = 0

    def take(self, update: ImageUpdate) -> None:
        self.done += 1
        self.pending.append(update)
        report = self.report
        if update.status == "skipped":
            report.skipped.append((update.path, update.reason or "unknown reason"))
        elif update.status == "unchanged":
            report.unchanged += 1
        elif update.path in self.new_paths:
            report.added += 1
        else:
            report.updated += 1
        if update.status == "ok":
            report.extracted += 1
        now = time.monotonic()
        if len(self.pending) == 1:
            self.since = now
        if len(self.pending) >= self.size or now - self.since >= self.seconds:
            self.flush()

    def flush(self) -> None:
        self.store.write_batch(self.pending)
        self.pending = []


def _jsonable(params: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in params.items()}


def discover(
    sources: Sequence[str | os.PathLike[str]], all_files: bool
) -> tuple[list[str], list[Path]]:
    """Image files under the given folders (recursively) and the given files, sorted, and the
    folders (the roots labels and missing files are reckoned from)."""
    if not sources:
        raise InvalidRequestError("give at least one folder or image file to add")
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
            raise NotFoundError(f"{source} does not exist")
    return sorted(found), roots


def _label_function(labels: Labels, roots: list[Path]) -> Callable[[str], str | None]:
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
