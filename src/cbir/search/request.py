"""A search's arguments, checked and normalised in one place for every face.

The CLI, the service and the Python API all build a :class:`SearchRequest` from what the user
gave; whatever is wrong is named with what is allowed, before any work is done.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from cbir.errors import InvalidRequestError
from cbir.index.base import SearchParams
from cbir.search.combine import COMBINE_MODES
from cbir.search.feedback import Feedback

#: The most results a query expansion may average (more only dilutes the query).
MAX_EXPAND = 100


@dataclass(frozen=True)
class SearchRequest:
    """What to search with: ``k`` results, one metric per descriptor (None: its default)."""

    k: int = 10
    descriptors: tuple[str | None, ...] = (None,)
    metrics: tuple[str | None, ...] = (None,)
    combine: str = "mean"
    exclude_queries: bool = False
    expand: int = 0
    #: Exact search whatever index the collection uses.
    exact: bool = False
    #: Per-query settings of approximate indexes (HNSW ``ef``, IVF ``nprobe``, ``rerank``).
    params: SearchParams = field(default_factory=SearchParams)
    #: Results skipped before the ``k`` returned (the next page starts at ``offset + k``).
    offset: int = 0
    #: Relevance feedback: the query moved toward / away from marked images (Rocchio).
    feedback: Feedback | None = None
    #: Only images with this label, only images in a folder of this name (or path ending).
    label: str | None = None
    folder: str | None = None

    def __post_init__(self) -> None:
        if not _is_int(self.k) or self.k < 1:
            raise InvalidRequestError(f"k must be a positive integer, got {self.k!r}")
        if not _is_int(self.offset) or self.offset < 0:
            raise InvalidRequestError(
                f"offset must be an integer >= 0 (results skipped), got {self.offset!r}"
            )
        for name in ("label", "folder"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise InvalidRequestError(f"{name} filter must be non-empty text, got {value!r}")
        if not _is_int(self.expand) or not 0 <= self.expand <= MAX_EXPAND:
            raise InvalidRequestError(
                f"expand must be an integer in 0..{MAX_EXPAND} (results averaged), "
                f"got {self.expand!r}"
            )
        if self.combine not in COMBINE_MODES:
            raise InvalidRequestError(
                f"combine must be one of {', '.join(COMBINE_MODES)}, got {self.combine!r}"
            )
        if not self.descriptors:
            raise InvalidRequestError("give at least one descriptor")
        if len(self.metrics) != len(self.descriptors):
            raise InvalidRequestError(
                f"give one metric per descriptor ({len(self.descriptors)}), or none; "
                f"got {len(self.metrics)}"
            )

    @classmethod
    def build(
        cls,
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
    ) -> SearchRequest:
        """From a user's arguments: a descriptor or a list of them (late fusion), and one
        metric for all, or one per descriptor."""
        specs = _as_tuple(descriptor) or (None,)
        metrics = _as_tuple(metric)
        if not metrics:
            metrics = (None,) * len(specs)
        elif len(metrics) == 1 and isinstance(metric, str):
            metrics = metrics * len(specs)
        return cls(
            k=k,
            descriptors=specs,
            metrics=metrics,
            combine=combine,
            exclude_queries=bool(exclude_queries),
            expand=expand,
            exact=bool(exact),
            params=SearchParams(ef=ef, nprobe=nprobe, rerank=rerank),
            offset=offset,
            feedback=feedback if feedback else None,
            label=label,
            folder=folder,
        )

    @property
    def depth(self) -> int:
        """How many ranked results the page needs: those skipped and those returned."""
        return self.offset + self.k

    @property
    def filtered(self) -> bool:
        return self.label is not None or self.folder is not None

    @property
    def fused(self) -> bool:
        """Several descriptors: their rankings are fused by reciprocal rank."""
        return len(self.descriptors) > 1


def _as_tuple(value: str | Sequence[str | None] | None) -> tuple[str | None, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(value)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
