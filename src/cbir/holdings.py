"""The descriptors a collection holds: finding the one a user names, and building it ready to
use, with what it learned from the collection restored.

Used by ingest (what to extract and fit), search (what to query with) and evaluation alike, so a
name means the same descriptor everywhere.
"""

from __future__ import annotations

from functools import lru_cache

from cbir.errors import InvalidRequestError, NotFoundError
from cbir.features import (
    DerivedDescriptor,
    Descriptor,
    DescriptorUnavailableError,
    create_descriptor,
    get_descriptor_class,
    metric_applies,
    metrics_for,
    parse_spec,
)
from cbir.metrics import get_metric
from cbir.store import DescriptorRecord, Store


def derives(d: Descriptor) -> bool:
    """Whether a descriptor is computed from another descriptor's stored vectors."""
    return isinstance(d, DerivedDescriptor) and d.derives


@lru_cache(maxsize=256)
def short_label(spec: str) -> str:
    """How a person reads a descriptor's spec: only the parameters that differ from their
    defaults (``Descriptor.short_spec``); the whole spec for one that cannot run here (its
    extra is missing), which still names it exactly."""
    try:
        return create_descriptor(spec).short_spec
    except DescriptorUnavailableError:
        return spec


def find(store: Store, spec: str | None = None) -> DescriptorRecord:
    """The collection's descriptor matching ``spec`` (a name, or a name with parameters; None:
    the first, the default for search)."""
    held = store.descriptors()
    if not held:
        raise NotFoundError(
            f"the collection at {store.root} holds no descriptors yet; "
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
        have = ", ".join(short_label(d.spec) for d in held)
        raise NotFoundError(
            f"the collection has no vectors for {spec!r}; it holds: {have}. "
            f"Add them with: cbir index DIR --descriptor {spec}"
        )
    return matches[0]


def instance(store: Store, record: DescriptorRecord) -> Descriptor:
    """A ready descriptor object for a record: built from its spec, with what it learned from
    this collection restored (a clear error if it was never fitted)."""
    d = create_descriptor(record.spec)
    if d.requires_fit:
        state = store.load_state(record.id)
        if state is None:
            raise InvalidRequestError(
                f"descriptor {short_label(record.spec)} has not been fitted on this collection "
                "yet; run: cbir index DIR (it fits what needs fitting) or cbir fit"
            )
        d.set_state(state)
    return d


def extracted_together(store: Store, *, runnable_only: bool = False) -> tuple[str, ...]:
    """The specs the extraction workers compute from each image, from one decode: every
    descriptor the collection holds but the derived ones (computed from their base's vectors)
    and those still waiting to be fitted. ``runnable_only`` leaves out those that cannot run
    here (an extra is missing) instead of raising."""
    out = []
    for d in store.descriptors():
        try:
            obj = create_descriptor(d.spec)
        except DescriptorUnavailableError:
            if runnable_only:
                continue
            raise
        if derives(obj) or (obj.requires_fit and not store.has_state(d.id)):
            continue
        out.append(d.spec)
    return tuple(out)


def check_metric(record: DescriptorRecord, metric: str | None) -> str:
    """The metric to rank a descriptor's vectors with (None: its default), refused with the
    list of those that fit when its input domain does not match the descriptor's values."""
    return _checked_metric(record.name, metric or record.metric)


@lru_cache(maxsize=1024)
def _checked_metric(descriptor: str, metric: str) -> str:
    """:func:`check_metric` by names, remembered: every search asks it (a refusal is not kept,
    so a metric registered later is found)."""
    m = get_metric(metric)
    if not metric_applies(descriptor, m):
        needs = "hash bits (0/1 vectors)" if m.binary else "histograms (non-negative vectors)"
        raise InvalidRequestError(
            f"metric {m.name!r} compares {needs}, which descriptor {descriptor!r} does not "
            f"produce; use one of: {', '.join(metrics_for(descriptor))}"
        )
    return m.name
