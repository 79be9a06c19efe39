"""What a search returns: the hits, and what produced them.

A :class:`SearchResult` is the one answer of every face: ``Collection.search`` returns it,
``cbir search --json`` prints its ``to_dict()``, the service sends the same dict as JSON.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

#: What a hit's score means: a distance (smaller is closer), a similarity (larger is closer),
#: or a reciprocal-rank-fusion score of several rankings (larger is better).
ScoreKind = Literal["distance", "similarity", "rrf"]
SCORE_KINDS: tuple[ScoreKind, ...] = ("distance", "similarity", "rrf")


class Hit(NamedTuple):
    """One result: its rank (1 = best), catalogue id, path, label and score.

    A named tuple rather than a frozen dataclass: as immutable, and made by the C constructor of
    a tuple, where a frozen dataclass sets its fields one by one through ``object.__setattr__``;
    a search makes one per result.
    """

    rank: int
    id: int
    path: str
    score: float
    label: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return self._asdict()


@dataclass(frozen=True)
class SearchResult:
    """The ranked hits of one search, with the descriptors and metrics that ranked them.

    Iterating, indexing and ``len`` go over the hits, so ``for hit in col.search(...)`` reads
    as a list of hits.
    """

    hits: tuple[Hit, ...]
    #: short labels of the descriptors used (``Descriptor.short_spec``), one per ranking fused
    descriptors: tuple[str, ...]
    #: their full specs, which name the vectors inside the collection
    specs: tuple[str, ...]
    #: the metric of each descriptor
    metrics: tuple[str, ...]
    score: ScoreKind
    #: how several query images were combined ("mean", "min", "rrf")
    combine: str = "mean"
    #: how many query vectors there were
    queries: int = 1
    #: average query expansion with this many results (0: off)
    expand: int = 0
    #: seconds from the request to the ranked hits (query vectors included)
    seconds: float = 0.0
    #: the kind of index each ranking came from ("exact", "exact-stream", ...)
    indexes: tuple[str, ...] = field(default_factory=tuple)
    #: results skipped before the first hit (``rank`` counts from ``offset + 1``)
    offset: int = 0
    #: relevance feedback applied: how many images were marked relevant, not relevant
    feedback: tuple[int, int] = (0, 0)

    def __iter__(self) -> Iterator[Hit]:
        return iter(self.hits)

    def __len__(self) -> int:
        return len(self.hits)

    def __getitem__(self, n: int) -> Hit:
        return self.hits[n]

    @property
    def fused(self) -> bool:
        """Whether several descriptors' rankings were fused (late fusion)."""
        return len(self.descriptors) > 1

    @property
    def title(self) -> str:
        """A one-line heading: descriptors and metrics, as a person reads them."""
        pairs = "  +  ".join(
            f"{d}  |  {m}" for d, m in zip(self.descriptors, self.metrics, strict=True)
        )
        return ("late fusion (rrf): " if self.fused else "") + pairs

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data: what ``cbir search --json`` prints and the service sends."""
        return {
            "descriptors": list(self.descriptors),
            "specs": list(self.specs),
            "metrics": list(self.metrics),
            "score": self.score,
            "fusion": "rrf" if self.fused else None,
            "combine": self.combine,
            "queries": self.queries,
            "expand": self.expand,
            "indexes": list(self.indexes),
            "seconds": round(self.seconds, 6),
            "offset": self.offset,
            "feedback": {"like": self.feedback[0], "unlike": self.feedback[1]},
            "hits": [h.to_dict() for h in self.hits],
        }
