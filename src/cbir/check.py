"""Checking a collection (``cbir check``, ``Collection.check``): can everything in it be trusted?

The store checks its own catalogue and vector files (:meth:`cbir.store.Store.verify`). Here the
rest is added: what fitted descriptors learned loads, and each saved index (FAISS, or a server's,
from the records the index manager keeps: :meth:`IndexManager.saved`) is in step with the change
feed. An index behind the feed is fine (the next search catches it up); one at the current
generation that holds a different number of vectors than the catalogue would be trusted while
wrong, so it is an error. ``repair`` removes what cannot be trusted, so that the next
``cbir index`` (or search, for an index) redoes it; nothing a user gave is touched.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from cbir import holdings
from cbir.errors import CbirError
from cbir.features import create_descriptor
from cbir.index.manager import IndexManager
from cbir.store import Finding, Store

__all__ = ["CheckReport", "Finding", "check_collection"]


@dataclass
class CheckReport:
    """What a check found, and what it looked at."""

    path: str
    findings: list[Finding] = field(default_factory=list)
    #: what was looked at: images, vectors, segments, fitted states, indexes
    checked: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    #: findings a repair removed (the findings are those of a check run after it)
    repaired: list[Finding] = field(default_factory=list)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.error]

    @property
    def ok(self) -> bool:
        """Nothing that cannot be trusted (notes may remain)."""
        return not self.errors

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "ok": self.ok,
            "errors": [f.to_dict() for f in self.errors],
            "notes": [f.to_dict() for f in self.findings if not f.error],
            "repaired": [f.to_dict() for f in self.repaired],
            "checked": self.checked,
            "seconds": round(self.seconds, 3),
        }


def check_collection(store: Store, indexes: IndexManager, *, repair: bool = False) -> CheckReport:
    """Check a collection; with ``repair`` remove what cannot be trusted (it takes the writer,
    so a running ``cbir index`` makes it a ``BusyError``) and check again."""
    started = time.perf_counter()
    if not repair:
        report = _check(store, indexes, repair=False)
    else:
        store.acquire()
        try:
            first = _check(store, indexes, repair=True)
            report = _check(store, indexes, repair=False)
            report.repaired = [f for f in first.findings if f.repaired]
        finally:
            store.release()
    report.seconds = time.perf_counter() - started
    return report


def _check(store: Store, indexes: IndexManager, *, repair: bool) -> CheckReport:
    findings, checked = store.verify(repair=repair)
    report = CheckReport(str(store.root.resolve()), findings, checked)
    if any(f.what == "catalogue" for f in findings):
        return report  # the catalogue itself is damaged: nothing else can be read from it
    checked["fitted_states"] = _check_states(store, findings, repair)
    checked["indexes"] = _check_indexes(store, indexes, findings, repair)
    return report


def _check_states(store: Store, findings: list[Finding], repair: bool) -> int:
    """Each fitted descriptor's state loads; one that must learn has it."""
    checked = 0
    for record in store.descriptors():
        label = holdings.short_label(record.spec)
        try:
            learns = create_descriptor(record.spec).requires_fit
        except CbirError:  # a kind this installation cannot run: nothing to say about it
            continue
        if store.has_state(record.id):
            checked += 1
            try:
                store.load_state(record.id)
                continue
            except (OSError, ValueError) as exc:
                why = f"what {label} learned cannot be read ({exc})"
        elif learns and store.vector_count(record.id):
            why = f"{label} has vectors but what it learned from the collection is missing"
        else:
            continue
        message = f"{why}: its vectors cannot be trusted (the next cbir index fits it again)"
        findings.append(Finding("fitted-state", message, error=True, repaired=repair))
        if repair:
            store.clear_vectors(record.id)
    return checked


def _check_indexes(
    store: Store, indexes: IndexManager, findings: list[Finding], repair: bool
) -> int:
    """Each saved index's record against the change feed (the index itself is not loaded)."""
    generations = store.generations()
    counts = store.vector_counts()
    labels = {d.id: holdings.short_label(d.spec) for d in store.descriptors()}
    saved = indexes.saved()
    for entry in saved:
        descriptor_id, generation = entry["descriptor_id"], entry.get("generation")
        name = f"the {entry['kind']} index of {labels.get(descriptor_id, descriptor_id)} " + (
            f"({entry['metric']})"
        )
        current = generations.get(descriptor_id)
        if current is None:
            finding = Finding("index", f"{name} serves a descriptor the collection no longer "
                              "has", error=False, repaired=repair)  # fmt: skip
        elif not isinstance(generation, int) or generation > current:
            finding = Finding("index", f"{name} is from another state of the collection "
                              "(rebuilt at the next search)", error=False,
                              repaired=repair)  # fmt: skip
        elif generation == current and entry.get("vectors", counts.get(descriptor_id, 0)) != (
            counts.get(descriptor_id, 0)
        ):  # a kind whose record does not count its vectors is not judged by the count
            finding = Finding("index", f"{name} holds {entry.get('vectors')} vectors at the "
                              f"current generation, the catalogue {counts.get(descriptor_id, 0)}",
                              error=True, repaired=repair)  # fmt: skip
        elif generation < current and store.changes_since(descriptor_id, generation).reset:
            finding = Finding("index", f"{name} is too far behind to catch up (rebuilt at the "
                              "next search)", error=False)  # fmt: skip
        else:
            continue  # current, or caught up at the next search
        findings.append(finding)
        if finding.repaired:
            indexes.discard(descriptor_id, entry["metric"], entry["kind"])
    return len(saved)
